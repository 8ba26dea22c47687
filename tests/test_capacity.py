"""Whether the cluster's nodes can hold the smallest worker group: pure logic at topologies we cannot run,
the check on a real local Ray instance, and the CLI's exit 2 where openclaw's own instance never could.
Before, a run no node could hold started, timed out starting its workers, and retried without end."""
import os
import subprocess
import sys

import pytest

from openclaw.launch.capacity import shortfall, workers_that_fit

GPU_NODE = {"CPU": 96.0, "GPU": 8.0, "memory": 1.0e12}
CPU_NODE = {"CPU": 2.0, "memory": 2.4e10}


def test_each_worker_fits_whole_on_one_node():
    assert workers_that_fit({"CPU": 1, "GPU": 1}, [GPU_NODE] * 64) == 512  # 64 nodes of 8 GPUs
    assert workers_that_fit({"CPU": 12, "GPU": 1}, [GPU_NODE] * 64) == 512  # 96 / 12 = 8 a node
    assert workers_that_fit({"CPU": 13, "GPU": 1}, [GPU_NODE] * 64) == 64 * 7  # the CPUs run out first
    assert workers_that_fit({"CPU": 3}, [CPU_NODE] * 5) == 0  # 10 CPUs in all, never 3 on one node
    assert workers_that_fit({"CPU": 0.1}, [{"CPU": 1.0}]) == 10  # Ray's fixed point: not 9
    assert workers_that_fit({"CPU": 1, "GPU": 0}, [CPU_NODE]) == 2  # a resource asked as 0 is not asked
    assert workers_that_fit({}, []) == sys.maxsize


def test_shortfall_says_what_is_missing_and_which_key_to_change():
    assert shortfall({"CPU": 1, "GPU": 1}, 512, [GPU_NODE] * 64) is None
    no_gpu = shortfall({"CPU": 1, "GPU": 1}, 2, [CPU_NODE])
    assert no_gpu.startswith("`scaling.min_workers` is 2, each worker asking for {CPU: 1, GPU: 1}, and the 1 "
                             "node(s) of this Ray instance hold 0 such worker(s) (they have CPU: 2, GPU: 0 in all)")
    assert "no node has a GPU" in no_gpu and "`scaling.use_gpu` to `auto`" in no_gpu
    custom = shortfall({"CPU": 1, "TPU": 4}, 1, [CPU_NODE, {"CPU": 8.0, "TPU": 2.0}])
    assert "no node has TPU 4" in custom and "`scaling.resources_per_worker.TPU`" in custom
    split = shortfall({"CPU": 3}, 1, [CPU_NODE] * 5)  # 10 CPUs, none with 3 on one node
    assert "they have CPU: 10 in all" in split and "no node has CPU 3" in split
    few = shortfall({"CPU": 1}, 3, [CPU_NODE])
    assert "hold 2 such worker(s)" in few and "Lower `scaling.min_workers` or `scaling.resources_per_worker`" in few


def test_address_local_is_a_local_instance_not_a_cluster(monkeypatch):
    """`--address local` (or RAY_ADDRESS=local) was taken for a cluster: the capacity check only noted a
    group no node could hold (and the run waited for ever), and Ray Data got no spare CPUs."""
    from openclaw.launch.ray_setup import cluster_address
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address("local") is None and cluster_address(None) is None
    assert cluster_address("10.0.0.1:6379") == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert cluster_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert cluster_address(None) == "auto" and cluster_address("ray://h:10001") == "ray://h:10001"


def test_a_dashboard_address_is_refused_saying_what_it_is_and_an_ipv6_address_is_checked():
    """RAY_ADDRESS=http://127.0.0.1:8265 (the usual export for `ray job submit`) said "no Ray cluster
    answers ... Name or service not known", even with the dashboard listening; [::1]:6379 likewise."""
    import socket

    from openclaw.errors import ConfigError
    from openclaw.launch.ray_setup import _check_reachable
    with pytest.raises(ConfigError, match=r"is a dashboard's address, which `ray job submit` takes"):
        _check_reachable("http://127.0.0.1:8265")
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        s.listen()
        _check_reachable(f"[::1]:{s.getsockname()[1]}")  # answers: no error


def test_on_a_cluster_that_may_add_gpu_nodes_gpus_are_not_talked_out_of():
    """A cluster's GPU nodes may start at zero (cluster.yaml, the KubeRay manifests): the note told a
    `use_gpu: true` run to set `auto` or `false`, which trains on CPUs there; and `auto` itself found no GPU
    on such a cluster and trained on its CPUs without a word."""
    from openclaw.launch.capacity import auto_gpu_note
    waiting = shortfall({"CPU": 1, "GPU": 1}, 2, [CPU_NODE], may_grow=True)
    assert "no node has a GPU yet" in waiting and "`auto`" not in waiting and "`false`" in waiting
    assert "`scaling.use_gpu: true`" in auto_gpu_note("auto", found_gpu=False, may_grow=True)
    assert auto_gpu_note("auto", found_gpu=True, may_grow=True) is None
    assert auto_gpu_note("auto", found_gpu=False, may_grow=False) is None  # openclaw's own local instance
    assert auto_gpu_note(False, found_gpu=False, may_grow=True) is None


def _config(tmp_path, digits_dir, **over):
    from conftest import digits_config
    return digits_config(digits_dir, tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", **over)


@pytest.mark.integration
def test_on_a_cluster_the_check_only_notes_where_openclaws_own_instance_refuses(ray_local, digits_dir, tmp_path,
                                                                                capsys):
    from openclaw.errors import ConfigError
    from openclaw.launch.ray_setup import check_capacity
    fits = _config(tmp_path, digits_dir)
    check_capacity(fits, started_here=True)  # the session's instance holds the digits example's 2 workers
    assert capsys.readouterr().out == ""
    too_big = _config(tmp_path, digits_dir, **{"scaling.resources_per_worker": {"CPU": 1, "chips": 1}})
    check_capacity(too_big, started_here=False)  # nodes may join a cluster: Ray Train waits for them
    auto, out = capsys.readouterr().out.splitlines()
    # `use_gpu: auto` on a cluster with no GPU now: said, since GPU nodes may start at zero
    assert auto.startswith("openclaw: note: `scaling.use_gpu: auto` found no GPU on this cluster now")
    assert out.startswith("openclaw: note: `scaling.min_workers` is 2") and "no node has chips 1" in out
    assert out.rstrip().endswith("Ray Train waits for nodes that can.")
    with pytest.raises(ConfigError, match=r"no node has chips 1\. Lower `scaling.resources_per_worker.chips`"):
        check_capacity(too_big, started_here=True)


@pytest.mark.integration
def test_gpu_workers_on_openclaws_own_cpu_instance_exit_2_before_the_data_is_prepared(digits_dir, tmp_path):
    from conftest import BIN, REPO
    r = subprocess.run([str(BIN / "openclaw"), "train", str(REPO / "jobs" / "configs" / "digits.yaml"), "--set", f"data.train={digits_dir / 'train'}",
                        "--set", f"data.val={digits_dir / 'val'}", "--set", "scaling.use_gpu=true",
                        "--set", f"checkpoint.storage={tmp_path / 'runs'}",
                        "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})  # its own local Ray
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("openclaw: error: `scaling.min_workers` is 2, each worker asking for {CPU: 1, GPU: 1}")
    assert "no node has a GPU" in last and "Traceback" not in r.stdout + r.stderr
    assert "starting" not in r.stdout and not list((tmp_path / "runs").rglob("*"))  # no run opened, nothing prepared


def test_a_failed_start_says_the_innermost_error_not_the_controllers_wrapper():
    from ray.train import ControllerError
    from openclaw.runtime.controller_callbacks import start_failure_message
    ray_said = ("The worker group startup timed out after 10.0 seconds waiting for 2 workers. Potential causes "
                "include: (1) temporary insufficient cluster resources while waiting for autoscaling")  # Ray 2.60's
    said = start_failure_message(ControllerError(TimeoutError(ray_said)), 3)
    assert said == ("worker group start failed (3 so far): The worker group startup timed out after 10.0 seconds "
                    "waiting for 2 workers; Ray Train retries")
    assert start_failure_message(ControllerError(TimeoutError("")), 1).endswith("): TimeoutError; Ray Train retries")


def test_the_capacity_and_row_checks_hold_at_their_bounds():
    """Bounds a mutation of these checks survived: Ray's fixed point both ways (0.7 CPUs hold seven workers
    of 0.1; 0.9999 holds no worker of 1), a node with exactly what a worker asks is no missing resource, a
    resource asked as 0 is not named; a dataset of exactly one global batch trains, one row fewer is
    refused; evaluation rows are counted against the most data-parallel ranks the run may take."""
    from types import SimpleNamespace

    from openclaw.config import load_config
    from openclaw.errors import DataError
    from openclaw.launch.preflight import check_eval_rows, check_rows
    assert workers_that_fit({"CPU": 0.1}, [{"CPU": 0.7}]) == 7
    assert workers_that_fit({"CPU": 1}, [{"CPU": 0.9999}]) == 0
    few = shortfall({"CPU": 2, "GPU": 0}, 3, [CPU_NODE])
    assert "hold 1 such worker(s)" in few and "no node has" not in few and "GPU" not in few, few
    cfg = load_config(None, {"train.global_batch_size": 12, "train.micro_batch_size": 1, "scaling.min_workers": 1,
                             "scaling.max_workers": 4}, base={"data": {"train": "x"}})
    check_rows(SimpleNamespace(num_rows=12), cfg)
    with pytest.raises(DataError, match="has 11 rows, fewer than one global batch"):
        check_rows(SimpleNamespace(num_rows=11), cfg)
    check_eval_rows(SimpleNamespace(num_rows=4), cfg)
    with pytest.raises(DataError, match=r"scores 3 row\(s\) of `data.val`, fewer than the 4 data-parallel ranks"):
        check_eval_rows(SimpleNamespace(num_rows=3), cfg)
