#!/usr/bin/env python
"""Overhead of the openclaw engine over a bare PyTorch loop, on the same model and data, in one process.

    python bench/engine_overhead.py --model gpt --steps 30 --repeats 5            # CPU-sized defaults
    python bench/engine_overhead.py --preset gpu --steps 30 --repeats 5           # GPT dim 768 x 12 for an H100
    python bench/engine_overhead.py --preset gpu --compile
    python bench/engine_overhead.py --preset gpu-350m --precision bf16 --compile  # GPT dim 1024 x 24 (0.30B)
    python bench/engine_overhead.py --preset gpu-1b --precision bf16 --compile    # GPT dim 2048 x 20 (1.01B)
    python bench/engine_overhead.py --compile-sides --steps 10 --repeats 5        # engine eager vs train.compile
    python bench/engine_overhead.py --where                                       # and where the time goes

Both sides train their own copy of the same initial model on the same pre-generated device batches,
with the same AdamW (``openclaw.engine.build_optimizer``), the same autocast, gradient accumulation
(global / micro, world size 1) and clipping to 1.0. Only the loop differs: ``Engine.train_step`` versus
the textbook loop. Repeats alternate the two sides (ABBA) and the median of each side is reported;
the last line is one JSON object. No Ray: this needs only torch, pydantic and PyYAML, and it puts
``<repo>/platform`` on ``sys.path`` itself, so openclaw need not be installed.

``--compile-sides``: the two sides are the engine eager and the engine with ``train.compile: true``
(compiled block by block in place, as a run does), from the same initial weights on the same batches.
Every timed run follows ``--warmup`` untimed steps and the compile happens in the first of them, so no
compile time is timed; a timed step that compiled again is counted in the JSON (``timed_steps_compiled``).

Where the time goes: when the engine misses a target (``--ratio-target``: 0.99 of the bare loop;
``--mfu-target``: 45% for the gpu-1b preset), or always with ``--where``, ``--where-steps`` more steps of
the engine side run under ``torch.profiler``, and the top 10 operators and kernels by self time (device
time on CUDA, CPU time on CPUs) are printed and listed in the JSON (``where``).
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

from common import add_budget, alternate, figure  # noqa: E402  (bench/ is this script's folder)
from where_time_goes import print_where, profile_top  # noqa: E402
from openclaw.engine.flops import device_peak_flops, mfu, training_flops  # noqa: E402

PRESETS = {
    # name -> model -> defaults (explicit flags win)
    "cpu": {"gpt": dict(dim=128, depth=2, heads=4, block=64, vocab=256, global_batch=32, micro_batch=16),
            "mlp": dict(dim=128, depth=2, in_features=64, classes=10, global_batch=256, micro_batch=64)},
    "gpu": {"gpt": dict(dim=768, depth=12, heads=12, block=1024, vocab=256, global_batch=64, micro_batch=16),
            "mlp": dict(dim=4096, depth=4, in_features=1024, classes=1000, global_batch=4096, micro_batch=1024)},
    # GPT-2 medium's shape without its 50k-token embedding: 0.30B parameters
    "gpu-350m": {"gpt": dict(dim=1024, depth=24, heads=16, block=1024, vocab=256, global_batch=64, micro_batch=16)},
    # 1.01B parameters; the target: >= 45% MFU on an H100/H200
    "gpu-1b": {"gpt": dict(dim=2048, depth=20, heads=16, block=1024, vocab=256, global_batch=32, micro_batch=8,
                           mfu_target=0.45)},
}
def _check_deps() -> None:
    """Fail with one clear line when a package the engine needs cannot be imported (Ray, MLflow, pyarrow are not)."""
    missing, pkgs = [], []
    for mod, pkg, why in (("torch", "torch", "the model and both loops"),
                          ("pydantic", "pydantic", "openclaw.config (imported by openclaw.engine.engine)"),
                          ("yaml", "PyYAML", "openclaw.config (imported by openclaw.engine.engine)")):
        try:
            importlib.import_module(mod)
        except Exception as e:  # ImportError, or a broken build (e.g. a pydantic_core for another Python)
            pkgs.append(pkg)
            missing.append(f"{pkg} (import {mod}, for {why}: {type(e).__name__}: {e})")
    if missing:
        sys.exit("engine_overhead.py cannot import: " + "; ".join(missing) + ". Install them for this Python "
                 f"(pip install {' '.join(pkgs)}) or put their wheels on PYTHONPATH; Ray, MLflow and pyarrow are "
                 "not needed.")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("mlp", "gpt"), default="gpt")
    p.add_argument("--preset", choices=tuple(PRESETS), default="cpu",
                   help="size defaults (gpu: GPT dim 768 x 12; gpu-350m: 1024 x 24; gpu-1b: 2048 x 20)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each timed run")
    p.add_argument("--repeats", type=int, default=5)
    add_budget(p)
    p.add_argument("--global-batch", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (both sides)")
    p.add_argument("--compile-sides", action="store_true",
                   help="sides: the engine eager vs the engine with train.compile (instead of engine vs bare loop)")
    p.add_argument("--where", action=argparse.BooleanOptionalAction, default=None,
                   help="profile the engine side and print where the time goes (default: only on a missed target)")
    p.add_argument("--where-steps", type=int, default=3, help="steps profiled for --where")
    p.add_argument("--ratio-target", type=float, default=0.99, help="engine / bare loop below this: a shortfall")
    p.add_argument("--mfu-target", type=float, default=None, help="MFU below this: a shortfall (gpu-1b: 0.45)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    p.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                   help="wall clock (default), or this process's CPU time: steadier on a shared CPU box (CPU only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--data-batches", type=int, default=4, help="distinct pre-generated global batches, cycled")
    g = p.add_argument_group("model size (defaults from --preset)")
    g.add_argument("--dim", type=int, default=None, help="gpt width / mlp hidden width")
    g.add_argument("--depth", type=int, default=None, help="gpt blocks / mlp hidden layers")
    g.add_argument("--heads", type=int, default=None, help="gpt")
    g.add_argument("--block", type=int, default=None, help="gpt block size (tokens per sample)")
    g.add_argument("--vocab", type=int, default=None, help="gpt")
    g.add_argument("--in-features", type=int, default=None, help="mlp")
    g.add_argument("--classes", type=int, default=None, help="mlp")
    args = p.parse_args(argv)
    if args.model not in PRESETS[args.preset]:
        p.error(f"--preset {args.preset} has no {args.model} sizes (it has: {', '.join(PRESETS[args.preset])})")
    for key, value in PRESETS[args.preset][args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.global_batch % args.micro_batch:
        p.error(f"--global-batch {args.global_batch} is not divisible by --micro-batch {args.micro_batch}")
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0 or args.where_steps < 1:
        p.error("--steps, --repeats and --where-steps must be >= 1, --warmup >= 0")
    if args.compile_sides and (args.compile or args.warmup < 1):
        p.error("--compile-sides compiles one side itself (drop --compile) and needs --warmup >= 1")
    return args


def shortfalls(ratio: float | None, mfu_value: float | None, ratio_target: float | None,
               mfu_target: float | None) -> list[str]:
    """The targets the engine missed, one sentence each (none: it met every target it was measured on)."""
    out = []
    if ratio is not None and ratio_target is not None and ratio < ratio_target:
        out.append(f"engine / bare loop {ratio:.4f} is below the target {ratio_target}")
    if mfu_value is not None and mfu_target is not None and mfu_value < mfu_target:
        out.append(f"MFU {100 * mfu_value:.1f}% is below the target {100 * mfu_target:.0f}%")
    return out


def make_data(args: argparse.Namespace, device) -> list[list[dict]]:
    """`--data-batches` global batches of random tokens (gpt) or features and labels (mlp), split into
    micro-batches and put on the device before any timing; every side trains on these same tensors."""
    import torch
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    data = []
    for _ in range(max(1, args.data_batches)):
        if args.model == "gpt":
            x = torch.randint(0, args.vocab, (args.global_batch, args.block + 1), generator=gen)
            mbs = [{"x": c.to(device).contiguous()} for c in x.split(args.micro_batch)]
        else:
            x = torch.randn(args.global_batch, args.in_features, generator=gen)
            y = torch.randint(0, args.classes, (args.global_batch,), generator=gen)
            mbs = [{"x": a.to(device).contiguous(), "y": b.to(device).contiguous()}
                   for a, b in zip(x.split(args.micro_batch), y.split(args.micro_batch))]
        data.append(mbs)
    return data


def bare_loop(model, cfg, device, dtype, lm: bool, accumulation: int) -> Callable[[int, list], float]:
    """The textbook loop's step on `model`: the engine's AdamW, autocast, accumulation and clipping, written out."""
    import torch
    from torch.nn import functional as F

    from openclaw.engine.optim import build_optimizer

    model.train()  # once, as a plain loop does; the engine sets train mode itself
    opt = build_optimizer(model, cfg.optimizer, fused=device.type == "cuda")  # as the engine
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    use_autocast = dtype != torch.float32

    def loss_of(mb):
        if lm:
            tokens = mb["x"]
            logits = model(tokens[:, :-1])
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        return F.cross_entropy(model(mb["x"]).float(), mb["y"])

    def step(step: int, micro_batches) -> float:
        total = 0.0
        for mb in micro_batches:
            if use_autocast:
                with torch.autocast(device.type, dtype=dtype):
                    loss = loss_of(mb) / accumulation
            else:
                loss = loss_of(mb) / accumulation
            scaler.scale(loss).backward()
            total = total + loss.detach()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return total.item()
    return step


def report_sides(results: dict[str, list[float]], names: tuple[str, str], args: argparse.Namespace,
                 peak: float | None, flops_per_sample: float) -> dict[str, Any]:
    """Print each side's median, spread, tokens/s and MFU, and the ratio of the first side to the second;
    return them for the JSON line."""
    engine_side, base_side = names
    out: dict[str, Any] = {}
    med = {side: statistics.median(v) for side, v in results.items()}
    for side in names:
        v = results[side]
        line = (f"{side:>8}: median {med[side]:10.1f} samples/s  (min {min(v):.1f}, max {max(v):.1f}; "
                f"{1e3 * args.global_batch / med[side]:.2f} ms/step)")
        if args.model == "gpt":
            tps = med[side] * args.block
            out[f"{side}_tokens_per_s"] = round(tps, 1)
            line += f"  {tps:,.0f} tokens/s"
            if peak is not None:
                side_mfu = mfu(med[side] * flops_per_sample, peak, 1)
                out[f"{side}_mfu"] = round(side_mfu, 4)
                line += f"  MFU {100 * side_mfu:.1f}%"
            else:
                line += "  MFU: n/a"
        print(line)
    ratio = med[engine_side] / med[base_side]
    paired = statistics.median(a / b for a, b in zip(results[engine_side], results[base_side]))
    print(f"ratio {engine_side} / {base_side}: {ratio:.4f} (ratio of medians; median of per-repeat ratios {paired:.4f})")
    out.update({f"{engine_side}_samples_per_s": round(med[engine_side], 2),
                f"{base_side}_samples_per_s": round(med[base_side], 2),
                "ratio": round(ratio, 4), "paired_ratio_median": round(paired, 4)})
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    _check_deps()

    import torch

    from openclaw.config import TrainConfig
    from openclaw.engine.engine import Engine
    from openclaw.engine.precision import choose_precision, device_facts
    from openclaw.engine.models import GPT, MLP
    from openclaw.engine.tasks import Classification, LanguageModeling

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if args.timer == "cpu" and device.type != "cpu":
        sys.exit("--timer cpu only makes sense with --device cpu (it does not count GPU time)")
    clock = time.perf_counter if args.timer == "wall" else time.process_time
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    accumulation = args.global_batch // args.micro_batch
    cfg = TrainConfig(global_batch_size=args.global_batch, micro_batch_size=args.micro_batch,
                      max_steps=10 ** 9, grad_clip=1.0, precision=args.precision,
                      optimizer={"name": "adamw", "lr": args.lr, "weight_decay": args.weight_decay},
                      schedule={"name": "constant", "warmup_steps": 0})
    chosen = choose_precision(cfg.precision, device_facts(device), cfg.tf32)
    dtype, precision = chosen.dtype, chosen.name

    # ---- model: one init, two identical copies -------------------------------------------------
    torch.manual_seed(args.seed)
    if args.model == "gpt":
        base = GPT(vocab_size=args.vocab, block_size=args.block, dim=args.dim, depth=args.depth, heads=args.heads)
        task = LanguageModeling()
    else:
        base = MLP(in_features=args.in_features, hidden=args.dim, depth=args.depth, num_classes=args.classes)
        task = Classification()
    base = base.to(device)
    n_params = sum(p.numel() for p in base.parameters())
    names = ("compiled", "eager") if args.compile_sides else ("openclaw", "bare")
    engine_side, base_side = names
    raw = {engine_side: base, base_side: copy.deepcopy(base)}
    models = {k: (torch.compile(m) if args.compile else m) for k, m in raw.items()}

    # ---- data: identical pre-generated device batches -----------------------------------------
    data = make_data(args, device)
    sync()
    # Training FLOPs per sample, counted by torch's FlopCounterMode on one micro-batch (what the platform logs)
    flops_per_sample = training_flops(raw[base_side], task.loss, data[0][0]) / args.micro_batch

    # ---- the two step functions ----------------------------------------------------------------
    def engine_step_fn(engine):
        def step(step: int, micro_batches) -> float:
            stats = engine.train_step(step, micro_batches)
            return stats.loss_sum / stats.samples
        return step

    engines = {engine_side: Engine(models[engine_side], task, cfg.model_copy(update={"compile": args.compile_sides}),
                                   device=device)}
    if args.compile_sides:
        engines[base_side] = Engine(models[base_side], task, cfg, device=device)
    steps_fn = {side: engine_step_fn(e) for side, e in engines.items()}
    if not args.compile_sides:
        steps_fn[base_side] = bare_loop(models[base_side], cfg, device, dtype, args.model == "gpt", accumulation)
    counters = {side: 0 for side in names}
    timed_compiles = {side: 0 for side in names}

    def run(side: str, n: int) -> None:
        fn = steps_fn[side]
        for _ in range(n):
            s = counters[side]
            fn(s, data[s % len(data)])
            counters[side] = s + 1

    def compiled_steps(side: str) -> int:
        c = engines[side].compile_counters if side in engines else None
        return c.compiled_steps if c else 0

    def timed(side: str) -> float:
        run(side, args.warmup)
        sync()
        before = compiled_steps(side)
        t0 = clock()
        run(side, args.steps)
        sync()
        took = clock() - t0
        timed_compiles[side] += compiled_steps(side) - before
        return args.steps * args.global_batch / took

    # ---- same math check: first step from identical weights on identical data ------------------
    first = {side: steps_fn[side](0, data[0]) for side in names}
    counters = {side: 1 for side in names}
    sync()

    gpu_name = torch.cuda.get_device_name(device) if cuda else None
    peak = device_peak_flops(device, precision, chosen.tf32)
    size = (f"dim {args.dim} depth {args.depth} heads {args.heads} block {args.block} vocab {args.vocab}"
            if args.model == "gpt" else
            f"in {args.in_features} hidden {args.dim} depth {args.depth} classes {args.classes}")
    on_what = (f" ({gpu_name}; TF32 {'on' if chosen.tf32 else 'off'}; MFU vs the dense {precision} peak "
               f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown'})" if cuda else f" threads {torch.get_num_threads()}")
    compile_what = "train.compile on the compiled side only" if args.compile_sides else args.compile
    print(f"device {device}{on_what}, "
          f"torch {torch.__version__}, precision {precision}, compile {compile_what}, timer {args.timer}")
    billions = f" = {n_params / 1e9:.2f}B" if n_params >= 1e8 else ""
    print(f"model {args.model} ({size}; {n_params / 1e6:.2f}M{billions} params), global batch "
          f"{args.global_batch} = micro {args.micro_batch} x {accumulation}, {args.steps} steps (+{args.warmup} warmup) "
          f"x {args.repeats} repeats")
    print(f"first-step loss: {engine_side} {first[engine_side]:.6f}  {base_side} {first[base_side]:.6f}  "
          f"(|diff| {abs(first[engine_side] - first[base_side]):.2e})")

    # ---- alternate the sides ABBA to cancel drift; median per side -----------------------------
    results = alternate({side: (lambda side=side: timed(side)) for side in names}, args.repeats, args.budget_s)
    print("  samples/s: " + "; ".join(f"{s} {[round(v, 1) for v in results[s]]}" for s in names))

    summary: dict[str, Any] = {"mode": "compile-sides" if args.compile_sides else "engine-vs-bare",
                               "device": gpu_name or str(device), "model": args.model, "preset": args.preset,
                               "precision": precision, "compile": args.compile, "params": n_params,
                               "first_step_loss": {s: round(first[s], 6) for s in names}}
    summary.update(report_sides(results, names, args, peak, flops_per_sample))
    if args.model == "gpt" and peak is not None:
        summary["peak_flops"] = peak
        summary["flops_per_sample"] = flops_per_sample
    if args.compile_sides:
        counters_c = engines[engine_side].compile_counters
        summary.update({"compile_s": round(counters_c.compile_s, 2) if counters_c else None,
                        "timed_steps_compiled": timed_compiles[engine_side],
                        "figure": figure(f"engine eager vs train.compile, {args.model}, {summary['device']}, {precision}",
                                         {s: results[s] for s in names}, base=base_side, unit="samples/s", digits=1)})
        print(f"compile: {summary['compile_s']} s in the untimed steps; timed steps that compiled: "
              f"{summary['timed_steps_compiled']}")

    # ---- where the time goes: on a missed target, or when asked --------------------------------
    missed = shortfalls(None if args.compile_sides else summary["ratio"], summary.get(f"{engine_side}_mfu"),
                        args.ratio_target, args.mfu_target)
    if args.mfu_target is not None and peak is None:
        print(f"MFU target {100 * args.mfu_target:.0f}% not checked: no peak FLOP/s for this device")
    summary["shortfalls"] = missed
    if args.where or (args.where is None and missed):
        summary["where"] = profile_top(lambda: run(engine_side, 1), args.where_steps, cuda)
        print_where(summary["where"], engine_side, missed)
    summary.update({"timer": args.timer, "steps": args.steps, "repeats": len(results[names[0]]), "global_batch": args.global_batch,
                    "micro_batch": args.micro_batch, "threads": torch.get_num_threads() if not cuda else None,
                    **{f"{s}_runs": [round(v, 2) for v in results[s]] for s in names}})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
