"""`train.compile` in the engine, on CPU (Inductor): in place and per block, the same checkpoint keys
and losses as eager, its cost and health counted, a failure named, and its cache carried to a new
process through the run's compile cache."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import REPO
from openclaw.engine.compile import compile_units
from openclaw.engine.config import TrainConfig
from openclaw.engine.engine import Engine
from openclaw.engine.models import GPT, MLP
from openclaw.engine.tasks import Classification, LanguageModeling
from openclaw.errors import CompileError


def _engine(model, compile, task=None):
    cfg = TrainConfig(global_batch_size=8, micro_batch_size=4, max_steps=100, compile=compile)
    return Engine(model, task or LanguageModeling(), cfg, device=torch.device("cpu"))


def _steps(engine, data, first, n):
    return [engine.train_step(s, [{"x": data[s % 4][:4]}, {"x": data[s % 4][4:]}]) for s in range(first, first + n)]


def test_compile_is_per_block_in_place_keeps_checkpoint_keys_and_resumes_with_compile_toggled():
    torch.manual_seed(0)
    base = GPT(vocab_size=64, block_size=16, dim=32, depth=2, heads=2)
    assert compile_units(base) == list(base.blocks.values()) and compile_units(MLP()) != []
    data = torch.randint(0, 64, (4, 8, 17), generator=torch.Generator().manual_seed(1))
    eager, compiled = _engine(copy.deepcopy(base), False), _engine(copy.deepcopy(base), True)
    a, b = _steps(eager, data, 0, 3), _steps(compiled, data, 0, 3)
    assert [s.loss_sum for s in b] == pytest.approx([s.loss_sum for s in a], rel=1e-4)
    assert [s.compiled for s in b] == [True, False, False] and not any(s.compiled for s in a)
    m = compiled.compile_counters.metrics()
    assert m["perf/compile_s"] > 0 and m["perf/graph_breaks"] == 0 and m["perf/recompiles"] == 0
    state = compiled.state_dict()
    assert list(state["model"]) == list(eager.state_dict()["model"])  # no `_orig_mod.` anywhere
    assert not any("_orig_mod" in k for k in state["model"])

    # Resume the compiled run's checkpoint eager, and the eager run's compiled: both go on alike.
    resumed_eager, resumed_compiled = _engine(copy.deepcopy(base), False), _engine(copy.deepcopy(base), True)
    resumed_eager.load_state_dict(copy.deepcopy(state))
    resumed_compiled.load_state_dict(copy.deepcopy(eager.state_dict()))
    c, d = _steps(resumed_eager, data, 3, 2), _steps(resumed_compiled, data, 3, 2)
    reference = _steps(eager, data, 3, 2)
    assert [s.loss_sum for s in c] == pytest.approx([s.loss_sum for s in reference], rel=1e-4)
    assert [s.loss_sum for s in d] == pytest.approx([s.loss_sum for s in reference], rel=1e-4)


class _Breaks(nn.Module):
    """A model with a graph break (a data-dependent Python branch)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum().item() > 1e9:  # .item() breaks the graph
            x = x * 2
        return self.fc(x.float())


def test_a_failed_compile_names_the_key_or_falls_back_to_eager_as_configured():
    data = {"x": torch.randn(4, 4), "y": torch.tensor([0, 1, 0, 1])}
    strict = Engine(_Breaks(), Classification(), TrainConfig(global_batch_size=4, micro_batch_size=4,
                    compile={"fullgraph": True}), device=torch.device("cpu"))
    with pytest.raises(CompileError, match=r"`train.compile.fallback: eager`.*`train.compile: false`"):
        strict.train_step(0, [data])
    lenient = Engine(_Breaks(), Classification(), TrainConfig(global_batch_size=4, micro_batch_size=4,
                     compile={"fullgraph": True, "fallback": "eager"}), device=torch.device("cpu"))
    stats = lenient.train_step(0, [data])
    assert stats.finite and lenient.fell_back and lenient.compile is None
    # a restart trains eager too, as the run did since (its train state says so: it compiled again, and
    # compiled steps differ from eager ones in their last bits)
    from openclaw.engine.state import TrainState
    state = TrainState(step=1, compile_fell_back=lenient.fell_back)
    restarted = Engine(_Breaks(), Classification(), TrainConfig(global_batch_size=4, micro_batch_size=4,
                       compile={"fullgraph": True, "fallback": "eager"}), device=torch.device("cpu"))
    restarted.load_state_dict(copy.deepcopy(lenient.state_dict()))
    restarted.train_eager()
    assert restarted.compile is None and not restarted.fell_back
    assert lenient.train_step(1, [data]).finite and restarted.train_step(1, [data]).finite
    assert all(torch.equal(a, b) for a, b in zip(lenient.model.parameters(), restarted.model.parameters()))
    state.roll_back_to(TrainState(step=0).state_dict())  # a checkpoint from before the failure
    assert state.compile_fell_back == lenient.fell_back


def test_graph_breaks_are_counted():
    engine = Engine(_Breaks(), Classification(), TrainConfig(global_batch_size=4, micro_batch_size=4, compile=True),
                    device=torch.device("cpu"))
    engine.train_step(0, [{"x": torch.randn(4, 4), "y": torch.tensor([0, 1, 0, 1])}])
    assert engine.compile_counters.metrics()["perf/graph_breaks"] >= 1


def _worker(run_dir, cache_dir, load, save):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    r = subprocess.run([sys.executable, str(REPO / "bench" / "compile_restart.py"), "--child", "--run-dir",
                        str(run_dir), "--dim", "32", "--depth", "1", "--heads", "2", "--block", "16"]
                       + (["--load"] if load else []) + (["--save"] if save else []),
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_run_compile_cache_is_found_and_used_by_a_fresh_worker_on_a_new_node(tmp_path):
    """Each worker has its own empty Inductor cache (a new node): only the run's saved artifacts can hit."""
    first = _worker(tmp_path / "run", tmp_path / "node1", load=False, save=True)
    assert first["saved_bytes"] > 0 and (tmp_path / "run" / "compile_cache" / "rank0.bin").exists()
    assert (tmp_path / "run" / "compile_cache" / "rank0.kernels.tar").exists()  # the built CPU kernels
    warm = _worker(tmp_path / "run", tmp_path / "node2", load=True, save=False)
    cold = _worker(tmp_path / "run", tmp_path / "node3", load=False, save=False)
    assert warm["loaded_artifacts"] > 0 and warm["perf/compile_cache_hits"] > 0
    assert cold["loaded_artifacts"] == 0 and cold["perf/compile_cache_hits"] == 0


def _kernels_tar(n: int, size: int) -> tuple[bytes, dict[str, bytes]]:
    import io
    import tarfile
    bodies = {f"k{i % 3}/c_{i:02d}.so": os.urandom(size) for i in range(n)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, body in bodies.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue(), bodies


def _unpack_and_read_back(blob, root, barrier, results):
    from openclaw.runtime.compile_cache import _unpack_kernels
    barrier.wait()
    _unpack_kernels(blob, root)
    results.put({os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
                 for d, _, files in os.walk(root) for f in files if ".openclaw-unpack-" not in d})


def test_built_kernels_appear_whole_or_not_at_all_and_a_nodes_two_workers_share_them(tmp_path):
    """Unpacked in place, a node's two workers loading at once rewrote the files the other had just
    written and was reading (and a worker killed in a kernel left it cut short, which every later attempt
    on the node kept: Inductor loads a kernel it finds). Each is now unpacked aside and linked into place."""
    import multiprocessing
    blob, bodies = _kernels_tar(24, 1 << 20)
    ctx = multiprocessing.get_context("fork")
    for round_ in range(3):
        root = tmp_path / f"node{round_}"
        root.mkdir()
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_unpack_and_read_back, args=(blob, str(root), barrier, results)) for _ in range(2)]
        for p in procs:
            p.start()
        seen = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(60)
        assert all(got == bodies for got in seen), round_


def test_kernels_unpack_where_links_are_refused_and_a_killed_workers_folder_is_swept(tmp_path, monkeypatch):
    """`os.link` fails on some FUSE mounts (gcsfuse): the kernels go into place by rename instead. An
    unpack folder a killed worker left is swept once it is an hour old."""
    import time

    import openclaw.runtime.compile_cache as compile_cache
    blob, bodies = _kernels_tar(3, 1000)
    root = tmp_path / "inductor"
    (root / ".openclaw-unpack-dead").mkdir(parents=True)
    (root / ".openclaw-unpack-live").mkdir()
    old = time.time() - 7200
    os.utime(root / ".openclaw-unpack-dead", (old, old))

    def no_links(src, dst):
        raise OSError(95, "Operation not supported")
    monkeypatch.setattr(compile_cache.os, "link", no_links)
    compile_cache._unpack_kernels(blob, str(root))
    assert {n: (root / n).read_bytes() for n in bodies} == bodies
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == [".openclaw-unpack-live"]
