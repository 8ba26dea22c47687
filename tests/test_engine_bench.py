"""The GPU-efficiency benches at tiny sizes on CPU, each run as its own process as a user runs it: the
engine against the bare loop with where the time goes, the engine eager against `train.compile`,
activation checkpointing none / selective / full, and the engine under FSDP2 and DDP against the bare
FSDP2 anchor under torchrun. Each checks the printed JSON: both sides, a ratio, and
for activation checkpointing that checkpointing keeps fewer activation bytes (measured, not assumed)."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import engine_overhead  # noqa: E402

from openclaw.engine.models import GPT  # noqa: E402

TINY = ["--dim", "32", "--depth", "2", "--heads", "2", "--block", "16", "--global-batch", "4", "--micro-batch", "2"]


def run_bench(script: str, *args: str) -> tuple[dict, str]:
    """The bench's JSON line (its last stdout line) and everything it printed."""
    r = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                       timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stdout


def test_engine_vs_bare_loop_prints_both_sides_a_ratio_and_where_the_time_goes():
    out, printed = run_bench("engine_overhead.py", *TINY, "--steps", "2", "--warmup", "1", "--repeats", "2",
                             "--where", "--where-steps", "2")
    assert len(out["openclaw_runs"]) == len(out["bare_runs"]) == 2 and min(out["openclaw_runs"] + out["bare_runs"]) > 0
    assert out["ratio"] == pytest.approx(out["openclaw_samples_per_s"] / out["bare_samples_per_s"], rel=1e-3)
    assert out["first_step_loss"]["openclaw"] == pytest.approx(out["first_step_loss"]["bare"], rel=1e-5)
    where = out["where"]
    assert where["clock"] == "self CPU time" and where["steps"] == 2 and 0 < len(where["top"]) <= 10
    assert 0 < sum(r["share"] for r in where["top"]) <= 1.0001
    assert [r["self_ms_per_step"] for r in where["top"]] == sorted((r["self_ms_per_step"] for r in where["top"]),
                                                                  reverse=True)
    assert any(r["name"].startswith("aten::") for r in where["top"])  # the model's operators, not only labels
    assert "where the time goes (" in printed and "self ms/step   share  calls/step  operator" in printed


def test_fsdp_and_ddp_against_the_bare_anchor_hold_the_same_bytes_and_reach_the_same_loss():
    """Both sides train the anchor's model from one seed on the same tokens: rank 0 holds the same
    parameter and optimizer bytes (FSDP half of DDP's at 2 ranks) and ends at the same loss."""
    out, printed = run_bench("fsdp_vs_bare.py", "--dim", "32", "--depth", "2", "--block", "16", "--batch", "2",
                             "--steps", "2", "--warmup", "1", "--repeats", "1")
    for s in ("fsdp", "ddp"):
        got = out["strategies"][s]
        assert set(got["speed"]["sides"]) == {f"bare {s}", f"openclaw {s}"}
        assert min(side["median"] for side in got["speed"]["sides"].values()) > 0
        assert got["held_bytes_rank0"][f"openclaw {s}"] == got["held_bytes_rank0"][f"bare {s}"] > 0
        assert got["final_loss"][f"openclaw {s}"] == pytest.approx(got["final_loss"][f"bare {s}"], abs=2e-4)
    assert out["fsdp_over_ddp_bytes"]["openclaw"] == out["fsdp_over_ddp_bytes"]["bare"] == pytest.approx(0.5, abs=0.02)
    assert "ratio openclaw fsdp / bare fsdp" in printed


def test_engine_eager_vs_train_compile_times_no_compile():
    out, _ = run_bench("engine_overhead.py", "--compile-sides", *TINY, "--steps", "2", "--warmup", "1",
                       "--repeats", "2")
    assert out["mode"] == "compile-sides" and len(out["eager_runs"]) == len(out["compiled_runs"]) == 2
    assert out["ratio"] == pytest.approx(out["compiled_samples_per_s"] / out["eager_samples_per_s"], rel=1e-3)
    assert set(out["figure"]["sides"]) == {"eager", "compiled"} and out["figure"]["base"] == "eager"
    assert out["compile_s"] > 0 and out["timed_steps_compiled"] == 0  # compiled, in the untimed steps only
    assert out["first_step_loss"]["compiled"] == pytest.approx(out["first_step_loss"]["eager"], rel=1e-4)
    assert "where" not in out  # no ratio target for this mode, no MFU on CPU: nothing missed


def test_full_activation_checkpointing_keeps_fewer_activation_bytes_than_none():
    out, printed = run_bench("activation_checkpointing.py", "--dim", "32", "--depth", "2", "--heads", "2",
                             "--block", "32", "--micro-batch", "2", "--steps", "1", "--repeats", "2")
    sides = out["sides"]
    assert [sides[m]["checkpointed_blocks"] for m in ("none", "selective", "full")] == [0, 1, 2]
    assert sides["full"]["saved_bytes"] < sides["selective"]["saved_bytes"] < sides["none"]["saved_bytes"]
    assert {s["first_step_loss"] for s in sides.values()} == {sides["none"]["first_step_loss"]}  # same math
    base = sides["none"]["step_ms"]["median"]
    for mode in ("selective", "full"):
        ms = sides[mode]["step_ms"]
        # the ratio of the unrounded medians; the printed medians are rounded to 0.1 ms (a tiny model's are ~1 ms)
        low, high = (ms["median"] - 0.05) / (base + 0.05), (ms["median"] + 0.05) / max(1e-9, base - 0.05)
        assert ms["n"] == 2 and low - 1e-3 <= ms["ratio"] <= high + 1e-3, (ms, base)
    assert sides["none"]["step_peak_bytes"] is None and "not measured per side" in printed  # CPU: no peak claimed


def test_the_gpu_presets_are_the_sizes_they_are_named_for():
    def params(preset: str) -> int:
        a = engine_overhead.parse_args(["--preset", preset])
        with torch.device("meta"):
            model = GPT(vocab_size=a.vocab, block_size=a.block, dim=a.dim, depth=a.depth, heads=a.heads)
        return sum(p.numel() for p in model.parameters())
    assert 0.28e9 < params("gpu-350m") < 0.36e9 and 0.95e9 < params("gpu-1b") < 1.05e9
    assert engine_overhead.parse_args(["--preset", "gpu-1b"]).mfu_target == 0.45
    assert engine_overhead.parse_args(["--preset", "gpu-1b", "--mfu-target", "0.5"]).mfu_target == 0.5
    with pytest.raises(SystemExit):
        engine_overhead.parse_args(["--preset", "gpu-1b", "--model", "mlp"])


def test_a_missed_target_is_named_and_a_met_or_unmeasured_one_is_not():
    assert engine_overhead.shortfalls(0.995, 0.47, 0.99, 0.45) == []
    missed = engine_overhead.shortfalls(0.97, 0.40, 0.99, 0.45)
    assert missed == ["engine / bare loop 0.9700 is below the target 0.99", "MFU 40.0% is below the target 45%"]
    assert engine_overhead.shortfalls(None, None, 0.99, 0.45) == []  # nothing measured: nothing missed
