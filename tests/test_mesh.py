"""The device mesh's layout and the pipeline's stage split: pure arithmetic, at topologies we cannot run."""
import pytest

from openclaw.engine.parallel.config import ParallelismConfig
from openclaw.engine.parallel.mesh import DIM_NAMES, mesh_layout


def test_64_ranks_as_4_replicas_of_4_shards_of_4_tensor_ranks():
    layout = mesh_layout(64, replicate=4, tensor=4)
    assert layout.shape == (1, 4, 4, 4) and layout.dp == 16 and layout.world == 64
    # tensor-parallel ranks are neighbours; shards next; replicas farthest apart
    assert layout.group("tp", 5) == [4, 5, 6, 7]
    assert layout.group("dp_shard", 5) == [1, 5, 9, 13]
    assert layout.group("dp_replicate", 5) == [5, 21, 37, 53]
    assert layout.group(("dp_replicate", "dp_shard"), 5) == sorted(r for r in range(64) if r % 4 == 1)
    # every rank's coordinates map back, and ranks of one tensor group read the same share of the batch
    assert all(layout.rank_of(layout.coords(r)) == r for r in range(64))
    assert {layout.dp_rank(r) for r in layout.group("tp", 42)} == {layout.dp_rank(42)}
    assert sorted({layout.dp_rank(r) for r in range(64)}) == list(range(16))
    assert len(layout.groups("tp")) == 16 and all(len(g) == 4 for g in layout.groups("tp"))


def test_4x4x4_pipeline_shard_tensor():
    layout = mesh_layout(64, pipeline=4, tensor=4)
    assert layout.shape == (4, 1, 4, 4) and layout.dp == 4
    assert layout.coords(63) == dict(zip(DIM_NAMES, (3, 0, 3, 3)))
    assert layout.group("pp", 0) == [0, 16, 32, 48]
    # the pipeline's first and last stages pair up per (shard, tensor) position: 16 pairs
    pairs = {(g[0], g[-1]) for g in layout.groups("pp")}
    assert len(pairs) == 16 and (5, 53) in pairs


@pytest.mark.parametrize("world,kw,shape", [(8, {}, (1, 1, 8, 1)), (8, {"replicate": 2}, (1, 2, 4, 1)),
                                            (8, {"tensor": 2, "pipeline": 2}, (2, 1, 2, 2)), (1, {}, (1, 1, 1, 1))])
def test_layouts(world, kw, shape):
    assert mesh_layout(world, **kw).shape == shape


def test_a_world_that_does_not_divide_is_refused_with_the_numbers():
    with pytest.raises(ValueError, match=r"a world of 6 rank\(s\) cannot be laid out .* not a multiple of 4"):
        mesh_layout(6, tensor=2, pipeline=2)


def test_stage_blocks_split_evenly_with_earlier_stages_taking_the_rest():
    from openclaw.engine.parallel.layout_checks import stage_blocks
    assert stage_blocks(4, 2) == [[0, 1], [2, 3]]
    assert stage_blocks(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    from openclaw.errors import ConfigError
    with pytest.raises(ConfigError, match="`parallelism.pipeline` needs at least one block per stage"):
        stage_blocks(3, 4)


def test_a_pipeline_split_gives_each_stage_its_blocks_and_is_checked_before_any_worker_starts():
    """`parallelism.pipeline_split`: fewer blocks on a stage that does more besides (the last: the head)."""
    import torch

    from openclaw.config import load_config
    from openclaw.engine.models import GPT
    from openclaw.engine.parallel.layout_checks import check_layout, stage_blocks
    from openclaw.errors import ConfigError
    assert stage_blocks(8, 2, [5, 3]) == [[0, 1, 2, 3, 4], [5, 6, 7]]
    assert stage_blocks(6, 4, [1, 2, 2, 1]) == [[0], [1, 2], [3, 4], [5]]
    base = {"data": {"train": "x"}, "scaling": {"min_workers": 2, "max_workers": 2}}
    assert load_config(None, {"parallelism.pipeline": 2, "parallelism.pipeline_split": [5, 3]},
                       base=base).parallelism.pipeline_split == [5, 3]
    # one count per stage (interleaved: two stages per rank), each at least 1: the key and the numbers named
    with pytest.raises(ConfigError, match=r"`parallelism.pipeline_split` needs 4 block counts of at least 1 .*"
                                          r"`pipeline` 2, interleaved_1f1b\), got \[5, 3\]"):
        load_config(None, {"parallelism.pipeline": 2, "parallelism.pipeline_schedule": "interleaved_1f1b",
                           "parallelism.pipeline_split": [5, 3]}, base=base)
    with pytest.raises(ConfigError, match=r"needs 2 block counts of at least 1"):
        load_config(None, {"parallelism.pipeline": 2, "parallelism.pipeline_split": [4, 0]}, base=base)
    # without a pipeline the key does nothing, and the run says so
    assert any("`parallelism.pipeline_split` ([5, 3]) applies only with `pipeline` above 1" in s
               for s in ParallelismConfig(pipeline_split=[5, 3]).unused_settings())
    # counts that miss the model's blocks: found on the meta device, before any worker starts
    with torch.device("meta"):
        gpt = GPT(dim=48, depth=8, heads=6)
    check_layout(gpt, ParallelismConfig(pipeline=2, pipeline_split=[5, 3]), builtin_task=True)
    with pytest.raises(ConfigError, match=r"`parallelism.pipeline_split` \[4, 3\] gives 7 block\(s\) to 2 stage\(s\), "
                                          r"but the model has 8 block\(s\)"):
        check_layout(gpt, ParallelismConfig(pipeline=2, pipeline_split=[4, 3]), builtin_task=True)
    # the activations the first stage holds: its share of the blocks (5 of 8), not half
    even, split = ParallelismConfig(pipeline=2), ParallelismConfig(pipeline=2, pipeline_split=[5, 3])
    assert even.held_fraction(4) == pytest.approx(2 / 2) and split.held_fraction(4) == pytest.approx(2 * 5 / 8)


def test_parallelism_config_is_checked_before_any_worker_starts():
    from openclaw.config import load_config
    from openclaw.errors import ConfigError
    base = {"data": {"train": "x"}}
    # an elastic run with tensor parallelism takes whole layouts only: 2 or 4 workers, never 3
    elastic = load_config(None, {"parallelism.tensor": 2, "scaling.min_workers": 2, "scaling.max_workers": 4,
                                 "train.global_batch_size": 64}, base=base)
    assert elastic.worlds == [2, 4]
    with pytest.raises(ConfigError, match=r"`scaling.min_workers` \(3\) .* = 2: 3 is not. An elastic run takes the "
                                          r"multiples of 2 between them"):
        load_config(None, {"parallelism.tensor": 2, "scaling.min_workers": 3, "scaling.max_workers": 4,
                           "train.global_batch_size": 64}, base=base)
    with pytest.raises(ConfigError, match="needs `parallelism.strategy: fsdp`"):
        load_config(None, {"parallelism.replicate": 2}, base=base)
    # pipeline x tensor: whole layouts of 4 workers (2 stages of 2), the data-parallel degree elastic
    three_d = load_config(None, {"parallelism.strategy": "fsdp", "parallelism.tensor": 2, "parallelism.pipeline": 2,
                                 "scaling.min_workers": 4, "scaling.max_workers": 8}, base=base)
    assert three_d.worlds == [4, 8] and three_d.parallelism.model_parallel == 4
    with pytest.raises(ConfigError, match=r"`scaling.min_workers` \(2\) .* = 4: 2 is not"):
        load_config(None, {"parallelism.tensor": 2, "parallelism.pipeline": 2, "scaling.min_workers": 2,
                           "scaling.max_workers": 8}, base=base)
    with pytest.raises(ConfigError, match="data-parallel degree"):  # dp = 4 / 2 = 2: 12 % (4 x 2) != 0
        load_config(None, {"parallelism.tensor": 2, "scaling.min_workers": 4, "scaling.max_workers": 4,
                           "train.global_batch_size": 12, "train.micro_batch_size": 4}, base=base)
    ok = load_config(None, {"parallelism.strategy": "fsdp", "parallelism.tensor": 2, "scaling.min_workers": 4,
                            "scaling.max_workers": 4, "train.global_batch_size": 64}, base=base)
    assert ok.parallelism.model_parallel == 2 and ParallelismConfig().strategy == "ddp"


def test_the_model_is_checked_against_the_layout_on_the_meta_device_before_any_worker_starts():
    """What the wraps refuse (a model tensor parallelism cannot split, a pipeline of a model not shaped for
    one, of a user's loss, or of more stages than blocks), found on a model that holds no memory: a
    175B-parameter gpt costs the driver nothing."""
    import torch

    from openclaw.engine.models import GPT, MLP
    from openclaw.engine.parallel.layout_checks import check_layout
    from openclaw.errors import ConfigError
    with torch.device("meta"):
        huge = GPT(vocab_size=50304, block_size=2048, dim=12288, depth=96, heads=96)
        small, mlp = GPT(dim=48, depth=3, heads=6), MLP(64, 128, 2, 10)
    assert sum(p.numel() for p in huge.parameters()) > 170e9
    check_layout(huge, ParallelismConfig(strategy="fsdp", tensor=8), builtin_task=True)
    check_layout(huge, ParallelismConfig(pipeline=8, pipeline_schedule="interleaved_1f1b"), builtin_task=True)
    with pytest.raises(ConfigError, match=r"`parallelism.tensor` \(2\) needs a model that says how to split it"):
        check_layout(mlp, ParallelismConfig(tensor=2), builtin_task=True)
    with pytest.raises(ConfigError, match=r"`parallelism.tensor` \(4\) must divide `model.kwargs.heads` \(6\)"):
        check_layout(small, ParallelismConfig(tensor=4), builtin_task=True)
    with pytest.raises(ConfigError, match=r"`parallelism.pipeline` \(2 stage\(s\)\) needs a model that says how to "
                                          r"split it into stages: the built-in gpt, or .* MLP is neither"):
        check_layout(mlp, ParallelismConfig(pipeline=2), builtin_task=True)
    # a user's model shaped for a pipeline (tests/user_models.py): any schedule, not with TP
    from user_models import loose_parameter, staged_stack
    with torch.device("meta"):
        staged, loose = staged_stack(), loose_parameter()
    check_layout(staged, ParallelismConfig(pipeline=4, pipeline_schedule="gpipe"), builtin_task=True)
    with pytest.raises(ConfigError, match="at least one block per stage: 8 stage.*has 4 block"):
        check_layout(staged, ParallelismConfig(pipeline=8), builtin_task=True)
    check_layout(staged, ParallelismConfig(pipeline=2, pipeline_schedule="interleaved_1f1b"), builtin_task=True)
    with pytest.raises(ConfigError, match="at least one block per stage: 8 stage.*has 4 block"):  # 2 a rank
        check_layout(staged, ParallelismConfig(pipeline=4, pipeline_schedule="interleaved_1f1b"), builtin_task=True)
    with pytest.raises(ConfigError, match=r"`parallelism.tensor` \(2\) needs a model that says how to split it"):
        check_layout(staged, ParallelismConfig(pipeline=2, tensor=2), builtin_task=True)
    staged.parallelize_plan = lambda mesh: {}  # its stages split by its own plan
    check_layout(staged, ParallelismConfig(pipeline=2, tensor=2), builtin_task=True)
    with pytest.raises(ConfigError, match=r"parameters \['gate'\] are neither in a block nor in a module"):
        check_layout(loose, ParallelismConfig(pipeline=2), builtin_task=True)
    type(staged).pipeline_ends = (["embed", "nowhere"], ["norm", "head"])
    try:
        with pytest.raises(ConfigError, match=r"names \['nowhere'\], which it has no module called"):
            check_layout(staged, ParallelismConfig(pipeline=2), builtin_task=True)
    finally:
        type(staged).pipeline_ends = (["embed"], ["norm", "head"])
    staged.blocks["1"].tie = staged.embed  # the embedding's matrix inside a middle block too
    with pytest.raises(ConfigError, match="one parameter on two stages; a pipeline keeps a tie only between"):
        check_layout(staged, ParallelismConfig(pipeline=4, pipeline_schedule="gpipe"), builtin_task=True)
    with pytest.raises(ConfigError, match="needs a built-in `task`"):
        check_layout(small, ParallelismConfig(pipeline=2), builtin_task=False)
    with pytest.raises(ConfigError, match="at least one block per stage: 4 stage"):  # 2 ranks x 2 stages each
        check_layout(small, ParallelismConfig(pipeline=2, pipeline_schedule="interleaved_1f1b"), builtin_task=True)


@pytest.mark.parametrize("kw", [{"pipeline": 4, "tensor": 4}, {"replicate": 4, "tensor": 4}, {"pipeline": 2},
                                {}])
def test_one_rank_of_each_data_parallel_share_counts_it_in_the_totals(kw):
    """At 64 ranks, exactly one rank per data-parallel share counts that share's samples and loss."""
    layout = mesh_layout(64, **kw)
    counted = [layout.dp_rank(r) for r in range(64) if layout.counts_its_share(r)]
    assert sorted(counted) == list(range(layout.dp)) and layout.counts_its_share(0)


@pytest.mark.parametrize("world,kwargs", [(8, {"replicate": 2}), (16, {"replicate": 2, "tensor": 2}),
                                          (8, {"replicate": 4}), (64, {"replicate": 4, "tensor": 2, "pipeline": 2})])
def test_every_data_parallel_rank_reads_its_own_slice_when_replicas_and_shards_differ(world, kwargs):
    """A mutant numbering the data-parallel ranks by replicate x replicate lived: the tests used 4 x 4
    meshes only, where that is shard's count too; with 2 replicas of 4 shards two ranks read one slice."""
    layout = mesh_layout(world, **kwargs)
    assert sorted({layout.dp_rank(r) for r in range(world)}) == list(range(layout.dp))
