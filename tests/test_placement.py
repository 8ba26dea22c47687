"""Where the tensor-parallel groups sit on the nodes: the pure count (at topologies we cannot run), the
advice rule that reads it, and a real 2-node `ray.cluster_utils.Cluster` whose tensor-parallel group
spans both nodes (tests/tp_across_nodes.py, in its own process)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from openclaw import load_config
from openclaw.advice.layout_rules import rule_tensor_across_nodes
from openclaw.advice.rules import RULES, Facts, placement_line
from openclaw.engine.parallel.mesh import mesh_layout, nodes_spanned

REPO = Path(__file__).resolve().parents[1]
TEXT_LM = REPO / "jobs" / "configs" / "text-lm.yaml"
EIGHT_NODES_OF_8 = [rank // 8 for rank in range(64)]


def test_tensor_groups_within_nodes_of_8_and_across_them_at_64_ranks():
    assert nodes_spanned(mesh_layout(64, tensor=8), EIGHT_NODES_OF_8) == 1
    assert nodes_spanned(mesh_layout(64, tensor=16), EIGHT_NODES_OF_8) == 2
    cube = mesh_layout(64, pipeline=4, tensor=4)  # 4 x 4 x 4: tensor innermost, stages outermost
    assert nodes_spanned(cube, EIGHT_NODES_OF_8) == 1
    assert nodes_spanned(cube, EIGHT_NODES_OF_8, "pp") == 4 and nodes_spanned(cube, EIGHT_NODES_OF_8, "dp_shard") == 2


def test_an_uneven_node_splits_the_group_that_straddles_it():
    """3 workers on one node and 5 on the next (an elastic run grown onto a half-free machine): the group
    of ranks 2 and 3 is split; nodes of 2, 4 and 2 split none."""
    assert nodes_spanned(mesh_layout(8, tensor=2), [0, 0, 0, 1, 1, 1, 1, 1]) == 2
    assert nodes_spanned(mesh_layout(8, tensor=2), [0, 0, 1, 1, 1, 1, 2, 2]) == 1
    with pytest.raises(ValueError, match="7 node numbers for a world of 8"):
        nodes_spanned(mesh_layout(8, tensor=2), [0] * 7)


def _cfg(tensor: int, workers: int):
    return load_config(TEXT_LM, {"parallelism.tensor": tensor, "scaling.min_workers": workers,
                                 "scaling.max_workers": workers, "train.micro_batch_size": 4})


def test_the_rule_keeps_each_group_on_a_node_with_the_largest_degree_that_fits():
    rec = rule_tensor_across_nodes(Facts(_cfg(4, 4), tensor_group_nodes=2, workers_per_node=(2, 2)))
    assert rec.key == "parallelism.tensor" and rec.value == 2
    assert "groups of 4 workers span up to 2 nodes (workers per node: 2, 2)" in rec.finding
    assert "factor of 2 goes to the data-parallel degree" in rec.effect
    load_config(TEXT_LM, {"parallelism.tensor": rec.value, "scaling.min_workers": 4, "scaling.max_workers": 4,
                          "train.micro_batch_size": 4})  # the change is a valid config
    uneven = rule_tensor_across_nodes(Facts(_cfg(2, 8), tensor_group_nodes=2, workers_per_node=(3, 5)))
    assert uneven.value == 1 and "give every node a multiple of 2 workers" in uneven.effect
    # a degree every node holds, not one that some node does (4 on nodes of 4, 2 and 2 still spans two)
    mixed = rule_tensor_across_nodes(Facts(_cfg(4, 8), tensor_group_nodes=2, workers_per_node=(4, 2, 2)))
    assert mixed.value == 2


def test_the_rule_is_quiet_on_one_node_without_tensor_parallelism_or_without_the_placement():
    assert rule_tensor_across_nodes(Facts(_cfg(2, 4), tensor_group_nodes=1, workers_per_node=(4,))) is None
    assert rule_tensor_across_nodes(Facts(_cfg(1, 4), tensor_group_nodes=2, workers_per_node=(2, 2))) is None
    assert rule_tensor_across_nodes(Facts(_cfg(2, 4))) is None
    assert rule_tensor_across_nodes in RULES
    assert placement_line(_cfg(2, 4), 1, (4,)) is None
    assert placement_line(_cfg(2, 2), 2, (1, 1)).startswith("advice: tensor-parallel groups of 2 workers span")


@pytest.mark.integration
@pytest.mark.slow
def test_a_tensor_parallel_group_across_two_nodes_is_recorded_and_advised(text_dir, tmp_path):
    """Two workers, one on each node of a real 2-node cluster, tensor-parallel over both: the attempt
    records that its group spans 2 nodes of 1 worker each, the run prints the advice at its start, and
    the end-of-run advice, read back from MLflow, names the rule and the key."""
    r = subprocess.run([sys.executable, str(REPO / "tests" / "tp_across_nodes.py"), str(tmp_path), str(text_dir)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    start = next(e for e in out["events"] if e["event"] == "start")
    assert start["tensor_group_nodes"] == 2 and start["workers_per_node"] == [1, 1], start
    advice = "advice: tensor-parallel groups of 2 workers span up to 2 nodes (workers per node: 1, 1)"
    assert advice in r.stdout and "Change: `--set parallelism.tensor=1`" in r.stdout, r.stdout[-3000:]
    assert "[tensor_across_nodes]" in r.stdout  # the end-of-run advice, from the run's events in MLflow
