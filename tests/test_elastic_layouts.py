"""Elastic runs with tensor parallelism take whole layouts only: Ray Train's elastic policy, which would
start as many workers as fit, is rounded down to multiples of replicate x tensor x pipeline
(`runtime.scaling.WholeLayoutsPolicy`), on Ray's own policy class and on a real run."""
from pathlib import Path

import pytest
import ray.train

import openclaw
from openclaw.runtime.ray_private import ElasticScalingPolicy
from openclaw.runtime.scaling import WholeLayoutsPolicy
from parallel_harness import bitwise, hop, spawn

REPO = Path(__file__).resolve().parents[1]


def test_the_policy_rounds_rays_count_down_to_whole_layouts():
    """Two nodes with room for 4 and 3 workers: Ray's elastic policy counts 7; under tensor 2, 6 start."""
    scaling = ray.train.ScalingConfig(num_workers=(2, 8), resources_per_worker={"CPU": 1})
    reserved = {"a": {"CPU": 4.0}, "b": {"CPU": 3.0}}
    assert ElasticScalingPolicy(scaling)._count_possible_workers(reserved) == 7
    assert WholeLayoutsPolicy(scaling, 2)._count_possible_workers(reserved) == 6
    assert WholeLayoutsPolicy(scaling, 4)._count_possible_workers(reserved) == 4
    assert WholeLayoutsPolicy(scaling, 4)._count_possible_workers({"a": {"CPU": 3.0}}) == 0  # under min: no start


@pytest.mark.integration
def test_an_elastic_fsdp_x_tensor_run_starts_on_a_whole_layout(ray_local, text_dir, tmp_path, mlflow_uri, capsys):
    """2 to 4 workers of 2.5 CPUs on the session's 8-CPU instance: room for 3, which tensor 2 cannot lay out
    (Ray's policy would start them, and every attempt would fail); the run starts with 2 and trains."""
    cfg = openclaw.load_config(REPO / "jobs" / "configs" / "text-lm-fsdp.yaml", {
        "data.train": str(text_dir / "train"), "data.val": str(text_dir / "val"), "tracking.uri": mlflow_uri,
        "checkpoint.storage": str(tmp_path / "runs"), "model.kwargs.block_size": 64, "model.kwargs.depth": 2,
        "parallelism.tensor": 2, "scaling.min_workers": 2, "scaling.max_workers": 4,
        "scaling.resources_per_worker": {"CPU": 2.5}, "train.max_steps": 4, "train.log_every": 2,
        "train.eval_every": 0, "checkpoint.every_steps": 4})
    assert cfg.worlds == [2, 4]
    result = openclaw.train(cfg)
    out = capsys.readouterr().out
    assert "start at step 0/4 with 2 worker(s) (mesh tensor 2), accumulation 2" in out, out[-2000:]
    assert "restart" not in out and result.metrics["step"] == 4


def test_fsdp_x_tensor_checkpoints_hop_between_the_worlds_an_elastic_run_takes(tmp_path):
    """What a shrink from 4 workers to 2 and a grow back do to the state under fsdp x tensor 2: the sharded
    checkpoint of 2 shards x 2 tensor ranks loads into 1 x 2, that one into 2 x 2 again (as restarted
    workers: built on the meta device, every weight from the checkpoint). Every parameter and optimizer
    state survives both hops bit for bit, and training goes on the same from each."""
    spec = {"strategy": "fsdp", "tensor": 2}
    at_4 = spawn(4, hop, spec, None, str(tmp_path / "a"), 3)
    at_2 = spawn(2, hop, spec, str(tmp_path / "a"), str(tmp_path / "b"), 3, True)
    back_at_4 = spawn(4, hop, spec, str(tmp_path / "b"), str(tmp_path / "c"), 3, True)
    state = at_4[0]["state"]
    tensors = bitwise(state, at_2[0]["state"])
    assert tensors == bitwise(state, back_at_4[0]["state"]) and tensors > 3 * len(state["model"]) // 2
    assert at_4[0]["next"] == back_at_4[0]["next"]
    assert all(abs(a - b) / a < 1e-6 for (a, _), (b, _) in zip(at_4[0]["next"], at_2[0]["next"]))
