"""Pure parts of the perf/ and system/ metrics (no Ray, no torch.distributed)."""
import math

from openclaw.engine.metrics import node_sample_vector, per_node_metrics


def test_one_system_sample_per_node_rides_a_sum_over_ranks():
    # 4 ranks on 2 nodes; ranks 0 and 2 are their node's first rank. A CPU node has no GPU keys.
    samples = {0: {"cpu_percent": 50.0, "memory_percent": 10.0, "memory_used_gb": 1.5},
               2: {"cpu_percent": 90.0, "memory_percent": 20.0, "memory_used_gb": 3.0, "gpu_memory_gb": 7.0}}
    summed = [sum(col) for col in zip(*(node_sample_vector(samples.get(r), r, 4) for r in range(4)))]
    got = per_node_metrics(summed)
    assert got == {"system/node0/cpu_percent": 50.0, "system/node0/memory_percent": 10.0,
                   "system/node0/memory_used_gb": 1.5, "system/node1/cpu_percent": 90.0,
                   "system/node1/memory_percent": 20.0, "system/node1/memory_used_gb": 3.0,
                   "system/node1/gpu_memory_gb": 7.0}
    assert not any(math.isnan(v) for v in got.values())


def test_a_single_worker_is_node0():
    assert per_node_metrics(node_sample_vector({"cpu_percent": 5.0}, 0, 1)) == {"system/node0/cpu_percent": 5.0}
