#!/usr/bin/env bash
# The device check: one script, at most BUDGET_S (460 s) on one GPU (torch needed, Ray not). Prints every figure
# with its ratio; each step has its own time limit so one slow step cannot eat the others'.
#   bash bench/gpu_check.sh 2>&1 | tee gpu_check.log
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}"
# One budget for the whole check (default 460 s, under the 8 minutes a device session allows for it):
# each step gets its own limit or what is left, whichever is less, and once it is spent the rest are
# skipped, saying so. The steps run in order of importance.
BUDGET_S=${GPU_CHECK_BUDGET_S:-460}
START_S=$(date +%s)
step() {
  local name=$1 limit=$2 left; shift 2
  left=$(( BUDGET_S - ($(date +%s) - START_S) ))
  echo; echo "=== $name"
  if (( left < 15 )); then echo "!!! skipped: the check's ${BUDGET_S} s budget is spent"; cat >/dev/null; return; fi
  (( limit > left )) && limit=$left
  timeout "$limit" "$@" || echo "!!! step failed or timed out (exit $?)"
}

step "device, and the precision openclaw resolves on it" 60 "$PY" - <<'PY'
import torch
from openclaw.engine.flops import device_peak_flops, gpu_model
from openclaw.engine.precision import choose_precision, device_facts
d = torch.device("cuda")
facts = device_facts(d)
print(torch.cuda.get_device_name(d), "capability", facts.capability, "bf16", facts.bf16, "torch", torch.__version__)
print("peak table entry:", gpu_model(torch.cuda.get_device_name(d)))
for asked in ("auto", "bf16", "fp16", "fp32"):
    p = choose_precision(asked, facts)
    print(f"  {asked:>4} -> {p.name} scaler={p.scaler} tf32={p.tf32} peak={device_peak_flops(d, p.name, p.tf32)} ({p.reason})")
PY

step "engine steps on CUDA in each precision (finite losses, fused AdamW, fp16 scaler)" 120 "$PY" - <<'PY'
import torch
from openclaw.engine.config import TrainConfig
from openclaw.engine.engine import Engine
from openclaw.engine.models import GPT
from openclaw.engine.tasks import LanguageModeling
for prec in ("auto", "bf16", "fp16", "fp32"):
    torch.manual_seed(0)
    e = Engine(GPT(dim=256, depth=4, heads=4).cuda(), LanguageModeling(),
               TrainConfig(global_batch_size=16, micro_batch_size=8, precision=prec), device=torch.device("cuda"))
    x = torch.randint(0, 256, (16, 129), device="cuda")
    losses = [e.train_step(s, [{"x": x[:8]}, {"x": x[8:]}]).loss_sum / (16 * 128) for s in range(10)]
    fused = e.optimizer.defaults.get("fused")
    print(f"  {prec:>4} ({e.precision.name}): loss {losses[0]:.3f} -> {losses[-1]:.3f}, fused AdamW {fused}, "
          f"scaler {e.scaler.is_enabled()}")
    assert losses[-1] < losses[0] and all(l == l for l in losses)
PY

step "train.deterministic on CUDA: two GPT runs bitwise equal with it; how far apart without (an embedding's backward adds atomically)" 60 "$PY" - <<'PY'
import torch
from openclaw.engine.config import TrainConfig
from openclaw.engine.device import set_deterministic
from openclaw.engine.engine import Engine
from openclaw.engine.models import GPT
from openclaw.engine.tasks import LanguageModeling
def run(deterministic):
    set_deterministic(deterministic)
    torch.manual_seed(0)
    e = Engine(GPT(vocab_size=8192, dim=512, depth=4, heads=8, block_size=256).cuda(), LanguageModeling(),
               TrainConfig(global_batch_size=16, micro_batch_size=8, precision="bf16", deterministic=deterministic),
               device=torch.device("cuda"))
    x = torch.randint(0, 8192, (16, 257), generator=torch.Generator().manual_seed(1)).cuda()
    for s in range(5):
        e.train_step(s, [{"x": x[:8]}, {"x": x[8:]}])
    return torch.cat([p.detach().float().flatten() for p in e.model.parameters()])
off = [run(False) for _ in range(2)]  # first: once on, cuBLAS's fixed workspace stays set in this process
on = [run(True) for _ in range(2)]
print(f"deterministic: equal {torch.equal(*on)}; off: equal {torch.equal(*off)}, max diff {(off[0] - off[1]).abs().max().item():.3g}")
assert torch.equal(*on)
PY

step "fp8 (torchao float8 Linears) against bf16: the first-step probe's decision, and the fp8 tests" 150 "$PY" - <<'PY'
import torch
from openclaw.engine.config import TrainConfig
from openclaw.engine.engine import Engine
from openclaw.engine.models import GPT
from openclaw.engine.tasks import LanguageModeling
torch.manual_seed(0)
e = Engine(GPT(dim=2048, depth=4, heads=16, block_size=512).cuda(), LanguageModeling(),
           TrainConfig(global_batch_size=8, micro_batch_size=8, precision="fp8"), device=torch.device("cuda"))
print(f"  asked fp8 -> {e.precision.name}: {len(e.fp8_layers)} float8 Linears ({e.precision.reason})")
x = torch.randint(0, 256, (8, 513), device="cuda")
fp8_s, bf16_s = e.probe_fp8({"x": x})
print(f"  probe: fp8 {fp8_s * 1e3:.2f} ms vs bf16 {bf16_s * 1e3:.2f} ms per micro-batch (ratio {fp8_s / bf16_s:.3f}) "
      f"-> trains in {e.precision.name}")
losses = [e.train_step(s, [{"x": x}]).loss_sum / (8 * 512) for s in range(5)]
print(f"  loss {losses[0]:.3f} -> {losses[-1]:.3f}")
assert all(l == l for l in losses)
PY
step "CommClock's CUDA events (the comm wait of DDP and FSDP on GPUs): two marks on the compute stream around a sleep kernel" 60 "$PY" - <<'PY'
import time
import torch
from openclaw.engine.parallel.base import CommClock
d = torch.device("cuda")
clock = CommClock(d, stream=torch.cuda.current_stream(d))
torch.cuda.synchronize(); t0 = time.perf_counter()
clock.launched(); torch.cuda._sleep(10**8); clock.done()
torch.cuda.synchronize(); wall = time.perf_counter() - t0
got = clock.take()
print(f"  events: {got * 1e3:.1f} ms; host wall around the kernel: {wall * 1e3:.1f} ms")
assert 0.5 * wall < got <= 1.05 * wall
PY

step "micro_batch_size: auto on CUDA: activations counted on fake tensors vs the real run's saved bytes and the allocator's peak (bf16; no checkpointing, then full)" 90 "$PY" - <<'PY'
import contextlib, torch
from openclaw.engine.memory import cuda_peak_bytes, fake_tensors, part_activation_bytes, saved_activation_bytes
from openclaw.engine.models import GPT
from openclaw.engine.parallel.base import apply_activation_checkpointing
from openclaw.engine.tasks import LanguageModeling
d, task = torch.device("cuda"), LanguageModeling()
x = torch.randint(0, 256, (8, 513))
def counted(fake, ac):
    mode = fake_tensors() if fake else contextlib.nullcontext()
    with mode, d:
        model = GPT(dim=512, depth=6, heads=8, block_size=512).train()
        apply_activation_checkpointing(model, ac)
        batch = {"x": (mode.from_tensor(x) if fake else x).to(d)}
        def loss():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return task.loss(model, batch)[0]
        got = saved_activation_bytes(loss, model.parameters())
        if ac != "none":  # the probe's count: the checkpointed forward, plus one block recomputed
            blocks = list(model.blocks.values())
            for b in blocks:
                b.checkpointed = False
            by_block, _ = part_activation_bytes(loss, model.parameters(), blocks)
            got += max(by_block)
            for b in blocks:
                b.checkpointed = True
    peak = None if fake else cuda_peak_bytes(lambda: loss().backward(), d)
    return got, peak
for ac in ("none", "full"):
    (fake, _), (real, peak) = counted(True, ac), counted(False, ac)
    print(f"  {ac}: counted, fake {fake / 1e6:.1f} MB vs real {real / 1e6:.1f} MB (equal: {fake == real}); "
          f"allocator peak of a forward and backward {peak / 1e6:.1f} MB, ratio peak/counted {peak / real:.2f}")
PY

step "the fp8 and precision tests on this machine" 120 "$PY" -m pytest -q -x tests/test_fp8.py tests/test_precision.py -m "not integration"
step "compile cache across a restart on a fresh node (cold vs warm)" 150 "$PY" bench/compile_restart.py --device cuda --dim 768 --depth 12 --heads 12 --block 1024 --repeats 2 --budget-s 140
step "engine vs bare loop, GPT dim 768 x 12 (the gpu preset), auto precision" 90 "$PY" bench/engine_overhead.py --preset gpu --steps 20 --repeats 3
step "engine vs bare loop, GPT dim 768 x 12 (the gpu preset), auto precision + compile" 150 "$PY" bench/engine_overhead.py --preset gpu --steps 20 --repeats 3 --compile
step "engine vs bare loop, GPT 1.01B (the gpu-1b preset, dim 2048 x 20), bf16 + compile; where the time goes below 0.99x or 45% MFU" 240 "$PY" bench/engine_overhead.py --preset gpu-1b --precision bf16 --compile --steps 5 --warmup 2 --repeats 2
step "activation checkpointing none / selective / full on CUDA: saved bytes, step peak, step time (GPT dim 1024 x 12, bf16)" 120 "$PY" bench/activation_checkpointing.py --device cuda --precision bf16 --dim 1024 --depth 12 --heads 16 --block 1024 --micro-batch 8 --steps 3 --repeats 3
step "int4 export on CUDA (torchao Int4WeightOnlyConfig, computing in bf16): runs, fp32 out, error near the CPU path's (0.16 on this random GPT)" 60 "$PY" - <<'PY'
import copy, torch
from openclaw.engine.models import build_model
from openclaw.exports.quantize import plan, quantize
dev = torch.device("cuda")
kw = {"vocab_size": 256, "block_size": 32, "dim": 256, "depth": 2, "heads": 4}
torch.manual_seed(0)
model = build_model("gpt", kw).eval().to(dev)
p = plan(model, "int4", None)
q = quantize(copy.deepcopy(model), p, dev)
x = torch.randint(0, 256, (4, 32), device=dev)
with torch.no_grad():
    full, out = model(x), q(x)
err = ((out - full).abs().mean() / full.abs().mean()).item()
layers = {type(q.get_submodule(n)).__name__ for n in p.quantized}
print(f"int4 on {dev}: {len(p.quantized)} layers {layers}, weight {type(q.get_submodule(p.quantized[0]).weight).__name__}, "
      f"relative mean error {err:.4f}, output {out.dtype}")
assert layers == {"Int4Linear"} and out.dtype == torch.float32 and out.isfinite().all() and err < 0.3
PY
echo; echo "=== done"
