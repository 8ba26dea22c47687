#!/usr/bin/env python
"""Overhead of the openclaw engine over a bare PyTorch loop, on the same model and data, in one process.

    python bench/engine_overhead.py --model gpt --steps 30 --repeats 5            # CPU-sized defaults
    python bench/engine_overhead.py --preset gpu --steps 30 --repeats 5           # GPT for an H100
    python bench/engine_overhead.py --preset gpu --compile

Both sides train their own copy of the same initial model on the same pre-generated device batches,
with the same AdamW (``openclaw.engine.build_optimizer``), the same autocast, gradient accumulation
(global / micro, world size 1) and clipping to 1.0. Only the loop differs: ``Engine.train_step`` versus
the textbook loop. Repeats alternate the two sides (ABBA) and the median of each side is reported;
the last line is one JSON object. No Ray: this needs only torch, pydantic and PyYAML, and it puts
``<repo>/platform`` on ``sys.path`` itself, so openclaw need not be installed.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

from openclaw.engine.flops import device_peak_flops, mfu, training_flops  # noqa: E402

PRESETS = {
    # name -> model -> defaults (explicit flags win)
    "cpu": {"gpt": dict(dim=128, depth=2, heads=4, block=64, vocab=256, global_batch=32, micro_batch=16),
            "mlp": dict(dim=128, depth=2, in_features=64, classes=10, global_batch=256, micro_batch=64)},
    "gpu": {"gpt": dict(dim=768, depth=12, heads=12, block=1024, vocab=256, global_batch=64, micro_batch=16),
            "mlp": dict(dim=4096, depth=4, in_features=1024, classes=1000, global_batch=4096, micro_batch=1024)},
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
    p.add_argument("--preset", choices=tuple(PRESETS), default="cpu", help="size defaults (gpu: GPT dim 768 x 12)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each timed run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--global-batch", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (both sides)")
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
    for key, value in PRESETS[args.preset][args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.global_batch % args.micro_batch:
        p.error(f"--global-batch {args.global_batch} is not divisible by --micro-batch {args.micro_batch}")
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    _check_deps()

    import torch
    from torch.nn import functional as F

    from openclaw.config import TrainConfig
    from openclaw.engine.engine import Engine
    from openclaw.engine.optim import build_optimizer
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
    raw = {"openclaw": base, "bare": copy.deepcopy(base)}
    models = {k: (torch.compile(m) if args.compile else m) for k, m in raw.items()}

    # ---- data: identical pre-generated device batches -----------------------------------------
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    data: list[list[dict[str, torch.Tensor]]] = []
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
    sync()
    # Training FLOPs per sample, counted by torch's FlopCounterMode on one micro-batch (what the platform logs)
    flops_per_sample = training_flops(raw["bare"], task.loss, data[0][0]) / args.micro_batch

    # ---- the two step functions ----------------------------------------------------------------
    engine = Engine(models["openclaw"], task, cfg, device=device)

    def openclaw_step(step: int, micro_batches) -> float:
        stats = engine.train_step(step, micro_batches)
        return stats.loss_sum / stats.samples

    bare_model = models["bare"]
    bare_model.train()  # once, as a plain loop does; the engine sets train mode itself
    bare_opt = build_optimizer(bare_model, cfg.optimizer, fused=device.type == "cuda")  # as the engine
    bare_scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    use_autocast = dtype != torch.float32

    def bare_loss(mb):
        if args.model == "gpt":
            tokens = mb["x"]
            logits = bare_model(tokens[:, :-1])
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        return F.cross_entropy(bare_model(mb["x"]).float(), mb["y"])

    def bare_step(step: int, micro_batches) -> float:
        total = 0.0
        for mb in micro_batches:
            if use_autocast:
                with torch.autocast(device.type, dtype=dtype):
                    loss = bare_loss(mb) / accumulation
            else:
                loss = bare_loss(mb) / accumulation
            bare_scaler.scale(loss).backward()
            total = total + loss.detach()
        bare_scaler.unscale_(bare_opt)
        torch.nn.utils.clip_grad_norm_(bare_model.parameters(), 1.0)
        bare_scaler.step(bare_opt)
        bare_scaler.update()
        bare_opt.zero_grad(set_to_none=True)
        return total.item()

    steps_fn = {"openclaw": openclaw_step, "bare": bare_step}
    counters = {"openclaw": 0, "bare": 0}

    def run(side: str, n: int) -> None:
        fn = steps_fn[side]
        for _ in range(n):
            s = counters[side]
            fn(s, data[s % len(data)])
            counters[side] = s + 1

    def timed(side: str) -> float:
        run(side, args.warmup)
        sync()
        t0 = clock()
        run(side, args.steps)
        sync()
        return args.steps * args.global_batch / (clock() - t0)

    # ---- same math check: first step from identical weights on identical data ------------------
    first = {side: steps_fn[side](0, data[0]) for side in ("openclaw", "bare")}
    counters = {"openclaw": 1, "bare": 1}
    sync()

    gpu_name = torch.cuda.get_device_name(device) if cuda else None
    peak = device_peak_flops(device, precision, chosen.tf32)
    size = (f"dim {args.dim} depth {args.depth} heads {args.heads} block {args.block} vocab {args.vocab}"
            if args.model == "gpt" else
            f"in {args.in_features} hidden {args.dim} depth {args.depth} classes {args.classes}")
    where = (f" ({gpu_name}; TF32 {'on' if chosen.tf32 else 'off'}; MFU vs the dense {precision} peak "
             f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown'})" if cuda else f" threads {torch.get_num_threads()}")
    print(f"device {device}{where}, "
          f"torch {torch.__version__}, precision {precision}, compile {args.compile}, timer {args.timer}")
    print(f"model {args.model} ({size}; {n_params / 1e6:.2f}M params), global batch {args.global_batch} = "
          f"micro {args.micro_batch} x {accumulation}, {args.steps} steps (+{args.warmup} warmup) x {args.repeats} "
          f"repeats")
    print(f"first-step loss: openclaw {first['openclaw']:.6f}  bare {first['bare']:.6f}  "
          f"(|diff| {abs(first['openclaw'] - first['bare']):.2e})")

    # ---- alternate the sides ABBA to cancel drift; median per side -----------------------------
    results: dict[str, list[float]] = {"openclaw": [], "bare": []}
    for r in range(args.repeats):
        order = ("openclaw", "bare") if r % 4 in (0, 3) else ("bare", "openclaw")
        for side in order:
            results[side].append(timed(side))
        print(f"  repeat {r + 1}/{args.repeats}: openclaw {results['openclaw'][-1]:10.1f}  "
              f"bare {results['bare'][-1]:10.1f} samples/s")

    summary = {"device": gpu_name or str(device), "model": args.model, "precision": precision,
               "compile": args.compile}
    med = {side: statistics.median(v) for side, v in results.items()}
    for side in ("openclaw", "bare"):
        v = results[side]
        line = (f"{side:>8}: median {med[side]:10.1f} samples/s  (min {min(v):.1f}, max {max(v):.1f}; "
                f"{1e3 * args.global_batch / med[side]:.2f} ms/step)")
        if args.model == "gpt":
            tps = med[side] * args.block
            summary[f"{side}_tokens_per_s"] = round(tps, 1)
            line += f"  {tps:,.0f} tokens/s"
            if peak is not None:
                side_mfu = mfu(med[side] * flops_per_sample, peak, 1)
                summary[f"{side}_mfu"] = round(side_mfu, 4)
                line += f"  MFU {100 * side_mfu:.1f}%"
            else:
                line += "  MFU: n/a"
        print(line)
    ratio = med["openclaw"] / med["bare"]
    paired = statistics.median(a / b for a, b in zip(results["openclaw"], results["bare"]))
    print(f"ratio openclaw / bare: {ratio:.4f} (ratio of medians; median of per-repeat ratios {paired:.4f})")
    summary.update({"openclaw_samples_per_s": round(med["openclaw"], 2), "bare_samples_per_s": round(med["bare"], 2),
                    "ratio": round(ratio, 4), "paired_ratio_median": round(paired, 4)})
    if args.model == "gpt" and peak is not None:
        summary["peak_flops"] = peak
        summary["flops_per_sample"] = flops_per_sample
    summary.update({"timer": args.timer, "steps": args.steps, "repeats": args.repeats, "global_batch": args.global_batch,
                    "micro_batch": args.micro_batch, "threads": torch.get_num_threads() if not cuda else None,
                    "openclaw_runs": [round(v, 2) for v in results["openclaw"]],
                    "bare_runs": [round(v, 2) for v in results["bare"]]})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
