"""A profile on request (`profile:`): traces recorded here by really profiling a small DDP model on two
gloo ranks (the engine and `StepProfiler`, no Ray), their summaries and the HTML report; the config's
checks; the artifact op through the spool; and a 2-worker digits run that logs the profile to MLflow."""
from __future__ import annotations

import base64
import contextlib
import gzip
import json
import re

import pytest
import torch

from conftest import digits_config
from openclaw.config import validate
from openclaw.errors import ConfigError
from openclaw.profiling.report import render
from openclaw.profiling.summary import (MEMORY_CATEGORIES, PHASES, intersect, is_comm, length, subtract,
                                        summarize, union)
from parallel_harness import spawn

MIN = {"data": {"train": "x"}}
STEPS, START, PROFILED = 7, 3, 3
CHECKPOINT_AT = 5
"""The stand-in loop checkpoints after this many steps: inside the profiled steps 4 to 6."""


def _config(storage: str, **profile):
    return validate({**MIN, "name": "prof", "model": {"name": "mlp", "kwargs": {"in_features": 64, "hidden": 128,
                                                                               "depth": 2, "num_classes": 10}},
                     "train": {"global_batch_size": 64, "micro_batch_size": 16, "max_steps": STEPS},
                     "scaling": {"min_workers": 2, "max_workers": 2}, "tracking": {"enabled": False},
                     "checkpoint": {"storage": storage}, "profile": profile})


def _profiled_loop(rank: int, world: int, storage: str, profiled: bool = True, run_dir: str | None = None) -> dict:
    """The attempt's order of events, on the real engine: data, step, checkpoint, `step_ends` (with
    `profiled` false: the same loop without a profiler, as the attempt runs it without a `profile` section).
    `run_dir`: where the profile goes (default `<storage>/prof`)."""
    from openclaw.engine.engine import Engine, phase
    from openclaw.engine.models import build_model
    from openclaw.engine.parallel.build import build_strategy
    from openclaw.engine.tasks import build_task
    from openclaw.profiling.capture import StepProfiler
    from openclaw.tracking.tracker import make_tracker
    cfg = _config(storage, start_step=START, steps=PROFILED, ranks="all", memory=True)
    torch.manual_seed(0)
    engine = Engine(build_model("mlp", cfg.model.kwargs), build_task("classification"), cfg.train, world_size=world,
                    strategy=build_strategy(cfg.parallelism, world=world, rank=rank))
    profiler = StepProfiler(cfg, engine, make_tracker(rank, False, None), run_dir or f"{storage}/prof", rank, world,
                            0, 64) if profiled else None
    g = torch.Generator().manual_seed(rank)
    losses = []
    for step in range(STEPS):
        with phase("data"):
            batches = [{"x": torch.randn(16, 64, generator=g), "y": torch.randint(0, 10, (16,), generator=g)}
                       for _ in range(2)]
        with phase("step"):
            losses.append(engine.train_step(step, batches).loss_sum)
        with phase("checkpoint"):
            if step + 1 == CHECKPOINT_AT:
                torch.save(engine.state_dict(), f"{storage}/ckpt-rank{rank}.pt")
        if profiler:
            profiler.step_ends(step + 1)
    return {"losses": losses}


def test_an_attempt_that_starts_past_the_profiled_steps_says_it_profiles_nothing(tmp_path):
    """A run resumed at step 500 with `profile: {steps: 5}` (start_step 20) ended without a profile and
    without a word."""
    from openclaw.engine.engine import Engine
    from openclaw.engine.models import build_model
    from openclaw.engine.tasks import build_task
    from openclaw.profiling.capture import StepProfiler
    from openclaw.tracking.tracker import NullTracker
    cfg = _config(str(tmp_path), start_step=START, steps=PROFILED)
    engine = Engine(build_model("mlp", cfg.model.kwargs), build_task("classification"), cfg.train)

    class Said(NullTracker):
        def __init__(self):
            self.said = []

        def progress(self, line):
            self.said.append(line["message"])
    for done, rank, says in ((START - 1, 0, False), (START + 1, 0, True), (START + 1, 1, False)):
        tracker = Said()
        StepProfiler(cfg, engine, tracker, str(tmp_path), rank, 2, done, 64)
        assert bool(tracker.said) == says, (done, rank, tracker.said)
        if says:
            assert f"past `profile.start_step` ({START})" in tracker.said[0] and "profiles nothing" in tracker.said[0]


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    storage = tmp_path_factory.mktemp("storage")
    results = spawn(2, _profiled_loop, str(storage))
    folder = storage / "prof" / "profile"
    traces = {r: json.loads(gzip.decompress((folder / f"rank{r}.trace.json.gz").read_bytes())) for r in (0, 1)}
    return {"folder": folder, "traces": traces, "results": results}


TRACE_BYTES = 4_000_000


def _traces_taken(rank: int, world: int) -> dict:
    """Each rank's stand-in trace of 4 MB (rank 2's missing: it recorded none) to rank 0 as a profile's
    end sends them; on rank 0, the Python memory held as each one is taken, before it is let go."""
    import tracemalloc

    from openclaw.profiling.capture import send_to_rank0, traces_from_ranks
    mine = bytes([rank]) * TRACE_BYTES
    ranks = [0, 1, 3]
    if rank != 0:
        if rank in ranks:
            send_to_rank0(mine)
        return {}
    tracemalloc.start()
    base, held, got = tracemalloc.get_traced_memory()[0], [], []
    for r, trace in traces_from_ranks(mine, ranks):
        held.append(tracemalloc.get_traced_memory()[0] - base)
        got.append((r, len(trace), trace[:1] == bytes([r]), set(trace) == {r}))
        del trace
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return {"got": got, "held": held, "peak": peak}


@pytest.mark.parametrize("where", ["under-a-file", "unknown-storage"])
def test_a_profile_that_cannot_be_written_still_takes_every_trace_and_training_goes_on(tmp_path, where):
    """The run folder cannot be written (under a file; on storage no filesystem answers for): rank 0
    still takes each rank's trace, so no rank waits on it forever, and both ranks train to the end."""
    (tmp_path / "a-file").write_text("")
    run_dir = str(tmp_path / "a-file" / "prof") if where == "under-a-file" else "nosuchscheme://bucket/prof"
    results = spawn(2, _profiled_loop, str(tmp_path), True, run_dir)
    assert [len(r["losses"]) for r in results] == [STEPS, STEPS]
    assert not (tmp_path / "prof").exists()


def test_rank_0_takes_the_ranks_traces_one_at_a_time():
    """At a profile's end rank 0 takes each rank's trace only after it let the one before go: it holds one
    other rank's trace at a time (a gather of them all would hold every rank's at once, gigabytes over
    many GPU ranks). Four gloo ranks, 4 MB each, one of which recorded none."""
    out = spawn(4, _traces_taken)[0]
    assert out["got"] == [(0, TRACE_BYTES, True, True), (1, TRACE_BYTES, True, True), (3, TRACE_BYTES, True, True)]
    assert max(out["held"]) < 1.5 * TRACE_BYTES and out["peak"] < 2.5 * TRACE_BYTES, out  # not 2 x 4 MB held


# ---- the summary, on the recorded traces -------------------------------------------------------------


def test_tracking_off_the_profile_is_written_to_the_run_folder(profiled):
    names = sorted(p.name for p in profiled["folder"].iterdir())
    assert names == ["advice.json", "rank0.trace.json.gz", "rank1.trace.json.gz", "report.html", "summary.json"]
    advice = json.loads((profiled["folder"] / "advice.json").read_text())
    assert advice["facts"]["device_type"] == "cpu" and advice["facts"]["extra"]["profiled_ranks"] == [0, 1]
    assert advice["facts"]["model_blocks"] == 0  # an MLP: no blocks to checkpoint
    facts = advice["facts"]
    assert 0 < facts["step_s"] and facts["samples_per_s"] == pytest.approx(64 / facts["step_s"])


def test_the_summary_finds_each_profiled_step_and_phase(profiled):
    for rank, trace in profiled["traces"].items():
        s = summarize(trace)
        assert s.rank == rank and len(s.steps) == PROFILED and s.device == {"type": "cpu"}
        assert s.kernel_idle_frac is None  # no GPU
        for p in PHASES:  # the checkpoint happens in one of the profiled steps
            assert s.seconds[p] > 0, p
        window = union(s.steps)
        for cat, ivs in s.intervals.items():  # merged, inside the steps
            assert ivs == union(ivs) and length(intersect(ivs, window)) == pytest.approx(length(ivs)), cat
        phases = union([iv for p in PHASES for iv in s.intervals[p]])  # the phases do not overlap
        assert length(phases) == pytest.approx(sum(s.seconds[p] for p in PHASES) * 1e6)
        outside = length(subtract(s.intervals["communication"], phases)) / 1e6 / s.wall_s  # a collective's tail
        assert sum(s.frac(p) for p in PHASES) + outside + s.idle_frac == pytest.approx(1.0, abs=1e-6)
        print(f"rank {rank}: step {s.wall_s / PROFILED * 1e3:.2f} ms, "
              + ", ".join(f"{p} {s.frac(p):.1%}" for p in (*PHASES, "communication")))


def test_profiling_changes_no_number(profiled, tmp_path):
    bare = spawn(2, _profiled_loop, str(tmp_path), False)
    assert [r["losses"] for r in bare] == [r["losses"] for r in profiled["results"]]
    assert not (tmp_path / "prof").exists()


def test_two_ddp_ranks_show_their_all_reduce_as_communication(profiled):
    for trace in profiled["traces"].values():
        s = summarize(trace)
        assert s.seconds["collectives"] > 0 and s.seconds["communication"] <= s.seconds["collectives"] + 1e-9
        names = {e["name"] for e in trace["traceEvents"] if e.get("ph") == "X" and is_comm(e["name"])}
        assert any("all_reduce" in n or "allreduce" in n for n in names), names


def test_top_operators_are_ordered_by_self_time(profiled):
    s = summarize(profiled["traces"][0])
    selfs = [op["self_ms"] for op in s.top_ops]
    assert s.top_ops and selfs == sorted(selfs, reverse=True)
    assert all(0 <= op["self_ms"] <= op["total_ms"] + 1e-9 and op["calls"] > 0 for op in s.top_ops)
    assert {"aten::addmm", "aten::mm"} & {op["name"] for op in s.top_ops}  # the MLP's matmuls
    assert s.top_kernels == []
    print("top operators:", ", ".join(f"{op['name']} {op['self_ms'] / PROFILED:.3f} ms" for op in s.top_ops[:5]))


def test_memory_at_the_peak_is_split_by_where_it_was_allocated(profiled):
    m = summarize(profiled["traces"][0]).memory
    assert m["device"] == "cpu" and m["peak_bytes"] > 0 and list(m["by_category"]) == list(MEMORY_CATEGORIES)
    assert sum(m["by_category"].values()) == m["peak_bytes"]  # on a CPU all of it was allocated during the profile
    assert sum(v > 0 for v in m["by_category"].values()) >= 2 and m["peak_phase"] in PHASES
    print("memory at the peak:", {k: v for k, v in m.items() if k != "device"})


def test_the_report_is_self_contained_with_a_timeline_row_per_rank(profiled):
    summaries = [summarize(t) for t in profiled["traces"].values()]
    page = render(summaries, [], title="Profile of prof")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page) and "<script" not in page
    assert "@import" not in page and "url(" not in page
    assert re.findall(r'<g class="rank-row" data-rank="(\d+)"', page) == ["0", "1"]
    assert 'class="seg communication"' in page or 'class="seg collectives"' in page
    for p in PHASES:
        assert f'class="seg {p}"' in page
    assert "No recommendation" in page
    written = (profiled["folder"] / "report.html").read_text()
    assert re.findall(r'<g class="rank-row" data-rank="(\d+)"', written) == ["0", "1"]


def test_the_report_lists_recommendations_with_their_key():
    from openclaw.advice.rules import Recommendation
    trace = _synthetic_trace()
    rec = Recommendation("data_wait", "the step waits on data for 10% of its time", "train.micro_batch_size", 32,
                         "up to 1.1x samples/s", 0.1)
    page = render([summarize(trace, rank=0)], [rec], title="t")
    assert "--set train.micro_batch_size=32" in page and "10% of its time" in page and "No recommendation" not in page


# ---- the summary's arithmetic, on a trace written by hand ------------------------------------------


def _synthetic_trace() -> dict:
    """One 100 µs step: data 0-10, the engine's step 10-90 (forward/backward 10-60), a collective 50-80
    on another thread; the loop's thread runs operators at 12-40 (with a child at 20-25) and 60-70."""
    x = lambda name, ts, dur, cat="cpu_op", tid=1: {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat,  # noqa
                                                     "tid": tid, "pid": 1}
    mem = lambda ts, b, total, addr: {"ph": "i", "name": "[memory]", "ts": ts, "tid": 1, "pid": 1,  # noqa
                                      "args": {"Bytes": b, "Total Allocated": total, "Addr": addr, "Device Type": 0}}
    return {"baseTimeNanoseconds": 0, "traceEvents": [
        x("ProfilerStep#1", 0, 100, "user_annotation"), x("openclaw/data", 0, 10, "user_annotation"),
        x("openclaw/step", 10, 80, "user_annotation"), x("openclaw/forward_backward", 10, 50, "user_annotation"),
        x("aten::mm", 12, 28), x("aten::fill_", 20, 5), x("aten::add_", 60, 10),
        x("gloo:all_reduce", 50, 30, "user_annotation", tid=2),
        mem(15, 100, 100, 1), mem(65, 50, 150, 2), mem(72, -100, 50, 1), mem(75, 30, 80, 3)]}


def test_the_summary_of_a_hand_written_trace():
    s = summarize(_synthetic_trace(), rank=3)
    assert s.rank == 3 and s.steps == [(0, 100)] and s.wall_s == pytest.approx(100e-6)
    assert s.intervals["optimizer"] == [(60, 90)] and s.intervals["data"] == [(0, 10)]
    # exposed: the collective's 50-80 less the loop thread's operators (60-70)
    assert s.intervals["communication"] == [(50, 60), (70, 80)] and s.intervals["collectives"] == [(50, 80)]
    # the exposed communication inside the forward/backward (10-60): what a micro-batch's compute leaves out;
    # the optimizer's (the finite-loss all-reduce) was taken out of the micro-batches' time too
    assert s.intervals["communication_in_forward_backward"] == [(50, 60)]
    from openclaw.profiling.facts import facts_from
    cfg = validate({**MIN, "train": {"max_steps": 100, "global_batch_size": 16, "micro_batch_size": 8},
                    "profile": {"start_step": 20, "steps": 1}})
    assert facts_from([s], cfg, global_batch_size=16, world_size=1).micro_batch_s == pytest.approx((50 - 10) / 2 / 1e6)
    assert s.idle_frac == pytest.approx(0.1)  # 90-100
    ops = {op["name"]: op for op in s.top_ops}
    assert ops["aten::mm"]["self_ms"] == pytest.approx(0.023) and ops["aten::mm"]["total_ms"] == pytest.approx(0.028)
    assert [op["name"] for op in s.top_ops] == ["aten::mm", "aten::add_", "aten::fill_"]
    assert s.memory["peak_bytes"] == 150 and s.memory["peak_phase"] == "optimizer"
    assert s.memory["by_category"]["forward"] == 100 and s.memory["by_category"]["optimizer"] == 50
    trace = _synthetic_trace()  # `profile.memory: false`: no memory events
    trace["traceEvents"] = [e for e in trace["traceEvents"] if e["name"] != "[memory]"]
    assert summarize(trace).memory == {} and "Not recorded" in render([summarize(trace)], [], title="t")


def test_a_gpu_trace_gives_kernel_idle_time_nccl_communication_and_the_device():
    """A trace shaped as a CUDA profile's (kernels on a stream, an NCCL kernel, the GPU's properties, CUDA
    memory events): compute and communication are read from the kernels, not the host's operators."""
    trace = _synthetic_trace()
    trace["traceEvents"] = [e for e in trace["traceEvents"] if not e["name"].startswith("gloo")]
    kernel = lambda name, ts, dur: {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur,  # noqa: E731
                                    "pid": 0, "tid": 7}
    trace["traceEvents"] += [kernel("ampere_sgemm_128x64_nn", 15, 35),
                             kernel("ncclDevKernel_AllReduce_Sum_f32", 45, 25),
                             {**kernel("ProfilerStep#1", 15, 90), "cat": "gpu_user_annotation"},  # on the GPU's
                             {**kernel("openclaw/step", 15, 90), "cat": "gpu_user_annotation"},  # timeline: not steps
                             {"ph": "i", "name": "[memory]", "ts": 16, "tid": 1, "pid": 1,
                              "args": {"Bytes": 4096, "Total Allocated": 1 << 20, "Addr": 9, "Device Type": 1}}]
    trace["deviceProperties"] = [{"id": 0, "name": "NVIDIA H100", "totalGlobalMem": 80 << 30,
                                  "computeMajor": 9, "computeMinor": 0}]
    s = summarize(trace, rank=0)
    assert s.steps == [(0, 100)] and s.intervals["optimizer"] == [(60, 90)]  # the host's marks, not the GPU's
    assert s.device == {"type": "cuda", "name": "NVIDIA H100", "memory_bytes": 80 << 30, "capability": [9, 0]}
    # kernels run 15-70 of the step's compute (10-90): the data wait (0-10) and the loop's own time (90-100)
    # are not launch gaps (a checkpoint in the profile made `launch_bound` the top recommendation)
    assert s.kernel_idle_frac == pytest.approx(1 - 55 / 80)
    assert s.intervals["communication"] == [(50, 70)]  # the NCCL kernel (45-70) less the sgemm (15-50)
    assert [k["name"] for k in s.top_kernels] == ["ampere_sgemm_128x64_nn", "ncclDevKernel_AllReduce_Sum_f32"]
    m = s.memory  # the GPU's allocator: what it held before the profile is its own category
    assert m["device"] == "cuda" and m["peak_bytes"] == 1 << 20 and m["by_category"]["forward"] == 4096
    assert m["by_category"]["before the profile"] == (1 << 20) - 4096
    page = render([s], [], title="gpu")
    assert "Top GPU kernels" in page and "ncclDevKernel_AllReduce_Sum_f32" in page


def test_the_facts_describe_the_runs_average_step_whatever_checkpoints_the_profile_held():
    """Five profiled steps (21-25) held the checkpoint of step 24 (every 24 steps): its 50 ms count once
    every 24 steps, over steps of 10 ms without it."""
    from openclaw.profiling.facts import facts_from, saves_in
    from openclaw.profiling.summary import RankSummary
    cfg = validate({**MIN, "train": {"max_steps": 100, "global_batch_size": 64, "micro_batch_size": 16},
                    "checkpoint": {"every_steps": 24}, "profile": {"start_step": 20, "steps": 5}})
    assert saves_in(cfg, 21, 25) == 1 and saves_in(cfg, 1, 100) == 5 and saves_in(cfg, 25, 47) == 0

    def summary(rank: int, data_s: float, checkpoint_s: float) -> RankSummary:
        seconds = {"data": data_s, "forward_backward": 0.03, "optimizer": 0.01, "checkpoint": checkpoint_s,
                   "communication": 0.005}
        return RankSummary(rank=rank, steps=[(i * 1e4, (i + 1) * 1e4) for i in range(5)], intervals={},
                           seconds=seconds, wall_s=0.05 + checkpoint_s, top_ops=[], top_kernels=[], memory={},
                           kernel_idle_frac=None, device={"type": "cpu"}, process={"peak_memory_bytes": 7})
    facts = facts_from([summary(0, 0.005, 0.05), summary(1, 0.01, 0.05)], cfg, global_batch_size=64, world_size=2)
    step = 0.01 + 0.05 / 24
    assert facts.step_s == pytest.approx(step) and facts.samples_per_s == pytest.approx(64 / step)
    assert facts.checkpoint_frac == pytest.approx(0.05 / 24 / step)
    assert facts.data_wait_frac == pytest.approx(0.01 / 5 / step)  # the worst rank's
    assert facts.comm_frac == pytest.approx(0.001 / step) and facts.compute_frac == pytest.approx(0.008 / step)
    assert facts.accumulation == 2 and facts.micro_batch_s == pytest.approx((0.03 - 0.005) / 5 / 2)
    assert facts.slowest_rank == 1 and facts.straggler_index == pytest.approx(0.045 / 0.0425)
    assert facts.peak_memory_bytes == 7 and facts.device_type == "cpu" and facts.kernel_idle_frac is None
    none_held = facts_from([summary(0, 0.005, 0.0)], cfg.model_copy(update={"profile": cfg.profile.model_copy(
        update={"start_step": 30})}), global_batch_size=64, world_size=2)
    assert none_held.checkpoint_frac is None and none_held.step_s == pytest.approx(0.01)


def test_interval_arithmetic():
    assert union([(5, 7), (0, 2), (1, 3)]) == [(0, 3), (5, 7)]
    assert intersect([(0, 3), (5, 7)], [(2, 6)]) == [(2, 3), (5, 6)]
    assert subtract([(0, 10)], [(2, 3), (5, 12)]) == [(0, 2), (3, 5)]
    assert subtract([(0, 2), (4, 6)], []) == [(0, 2), (4, 6)] and subtract([], [(0, 1)]) == []


# ---- labels and config ---------------------------------------------------------------------------------


def test_phase_labels_are_free_without_a_profiler_and_recorded_with_one():
    from torch.autograd.profiler import record_function
    from torch.profiler import profile

    from openclaw.engine.engine import phase

    def labelled():
        with phase("data"):
            pass

    def bare():
        with record_function("openclaw/data"):
            pass

    assert isinstance(phase("data"), contextlib.nullcontext)  # no profiler: no record_function at all
    with profile() as prof:
        labelled()
    assert "openclaw/data" in {e.key for e in prof.key_averages()}


def test_the_profile_section_is_off_by_default_and_checked_against_the_run():
    assert validate(MIN).profile is None
    cfg = validate({**MIN, "profile": {"ranks": [1, 0, 1]}, "train": {"max_steps": 30},
                    "scaling": {"min_workers": 2, "max_workers": 2}})
    assert cfg.profile.ranks == [0, 1] and cfg.profile.chosen(1) == [0]
    assert validate({**MIN, "profile": {}}).profile.chosen(4) == [0, 1, 2, 3]  # defaults: steps 21-25, all ranks
    with pytest.raises(ConfigError, match=r"`profile.start_step` \(20\) \+ `profile.steps` \(5\) must be at most "
                                          r"`train.max_steps` \(10\)"):
        validate({**MIN, "train": {"max_steps": 10}, "profile": {}})
    with pytest.raises(ConfigError, match=r"`profile.ranks` names rank 2.*`scaling.max_workers` \(2\)"):
        validate({**MIN, "scaling": {"min_workers": 2, "max_workers": 2}, "profile": {"ranks": [0, 2]}})
    for bad in (-1, [], [0, -2], "some", True):
        with pytest.raises(ConfigError, match="profile.ranks"):
            validate({**MIN, "profile": {"ranks": bad}})
    with pytest.raises(ConfigError, match="profile.steps"):
        validate({**MIN, "profile": {"steps": 0}})


# ---- the artifact op, delivered later from the spool -----------------------------------------------


@pytest.mark.integration
def test_an_artifact_op_keeps_in_the_spool_and_is_delivered_by_sync_spool(tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from openclaw.tracking.spool import append_ops
    from openclaw.tracking.writer import sync_spool
    client = MlflowClient(mlflow_uri)
    run = client.create_run(client.create_experiment("spooled", artifact_location=str(tmp_path / "artifacts")))
    body = gzip.compress(b'{"traceEvents": []}' * 100)
    spool = tmp_path / "spool.jsonl"
    append_ops(str(spool), mlflow_uri, run.info.run_id,
               [("artifact", ("profile/rank0.trace.json.gz", base64.b64encode(body).decode("ascii")))])
    assert sync_spool(str(spool), mlflow_uri) == 1
    got = client.download_artifacts(run.info.run_id, "profile/rank0.trace.json.gz", str(tmp_path / "down"))
    assert open(got, "rb").read() == body
    # uploaded: kept aside, so that a second upload cannot apply its ops again
    assert not spool.exists() and (tmp_path / "spool.jsonl.synced").exists()
    from openclaw.cli import main
    assert main(["sync-spool", str(spool), "--tracking-uri", mlflow_uri]) == 2


# ---- end to end ----------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_a_two_worker_digits_run_logs_its_profile_to_mlflow(ray_local, digits_dir, tmp_path, mlflow_uri):
    import openclaw
    from mlflow.tracking import MlflowClient
    common = {"train.max_steps": 8, "train.log_every": 4, "train.eval_every": 0, "checkpoint.every_steps": 4}
    profiled = openclaw.train(digits_config(digits_dir, tmp_path / "a", mlflow_uri, name="profiled", **common,
                                            profile={"start_step": 3, "steps": 2, "ranks": "all"}))
    bare = openclaw.train(digits_config(digits_dir, tmp_path / "b", mlflow_uri, name="bare", **common))
    client = MlflowClient(mlflow_uri)
    files = {a.path for a in client.list_artifacts(profiled.run_id, "profile")}
    assert {"profile/rank0.trace.json.gz", "profile/rank1.trace.json.gz", "profile/report.html",
            "profile/summary.json", "profile/advice.json"} <= files
    page = open(client.download_artifacts(profiled.run_id, "profile/report.html", str(tmp_path))).read()
    assert re.findall(r'<g class="rank-row" data-rank="(\d+)"', page) == ["0", "1"]
    assert 'class="seg collectives"' in page  # the two DDP ranks' all-reduce
    summaries = json.load(open(client.download_artifacts(profiled.run_id, "profile/summary.json", str(tmp_path))))
    assert [len(s["steps"]) for s in summaries] == [2, 2] and all(s["seconds"]["collectives"] > 0 for s in summaries)
    events = json.load(open(client.download_artifacts(profiled.run_id, "events.json", str(tmp_path))))
    profile_events = [(e["first_step"], e["last_step"], e["ranks"]) for e in events if e["event"] == "profile"]
    assert profile_events == [(4, 5, [0, 1])]
    assert client.get_run(profiled.run_id).info.status == "FINISHED"
    print(f"final loss with the profile {profiled.metrics['train/loss']!r}, without {bare.metrics['train/loss']!r}")
    assert profiled.metrics["train/loss"] == bare.metrics["train/loss"]  # the profiler changes no number


def test_the_reports_operator_means_count_only_the_ranks_that_list_the_operator():
    """An operator at 10 ms on one rank and 9 ms on the other, but past the second rank's top list, was
    shown as 5 ms: the missing entry counted as 0."""
    from openclaw.profiling.report import _mean_rows
    from openclaw.profiling.summary import RankSummary

    def rank(r, ops):
        return RankSummary(rank=r, steps=[(0, 1e4)], intervals={}, seconds={}, wall_s=0.01, top_ops=ops,
                           top_kernels=[], memory={}, kernel_idle_frac=None, device={"type": "cpu"})
    op = lambda name, ms: {"name": name, "self_ms": ms, "total_ms": ms, "calls": 1}  # noqa: E731
    rows = dict(_mean_rows([rank(0, [op("aten::mm", 10.0), op("aten::add", 4.0)]), rank(1, [op("aten::add", 6.0)])],
                           "top_ops", "self_ms"))
    assert rows["aten::mm"]["self_ms"] == 10.0 and rows["aten::add"]["self_ms"] == 5.0
