"""What a worker builds for its strategy to wrap (`engine.initial_model`), without a process group: the
whole model under DDP or on one rank; under a sharded strategy the model on the meta device, with the
whole weights on rank 0 only; and the models that must be built whole on every rank all the same."""
import pytest
import torch

from openclaw.engine.initial_model import initial_model, rank0_weights, whole_on_rank0_only
from openclaw.engine.models import GPT

GPT_KWARGS = {"vocab_size": 64, "block_size": 16, "dim": 32, "depth": 2, "heads": 4}


@pytest.mark.parametrize("sharded,world,expected", [(True, 64, True), (True, 2, True), (True, 1, False),
                                                    (False, 64, False), (False, 1, False)])
def test_only_sharded_strategies_over_several_ranks_build_the_whole_model_on_rank_0_alone(sharded, world, expected):
    assert whole_on_rank0_only(sharded, world) is expected


def test_a_sharded_gpt_is_built_on_meta_and_rank_0_alone_builds_the_seeded_weights():
    torch.manual_seed(0)
    reference = GPT(**GPT_KWARGS).state_dict()
    got = initial_model("gpt", GPT_KWARGS, seed=0, world=8, sharded=True)
    assert got.on_meta and all(p.is_meta for p in got.model.parameters())
    assert rank0_weights("gpt", GPT_KWARGS, seed=0, rank=7) == {}
    weights = rank0_weights("gpt", GPT_KWARGS, seed=0, rank=0)
    assert set(weights) == set(reference) and all(torch.equal(weights[k], reference[k]) for k in reference)


def test_ddp_and_one_rank_build_the_whole_seeded_model():
    torch.manual_seed(3)
    reference = GPT(**GPT_KWARGS).state_dict()
    for sharded, world in ((False, 4), (True, 1)):
        got = initial_model("gpt", GPT_KWARGS, seed=3, world=world, sharded=sharded)
        assert not got.on_meta
        assert all(torch.equal(got.model.state_dict()[k], reference[k]) for k in reference)


@pytest.mark.parametrize("name", ["user_models:keeps_a_cache", "user_models:built_from_a_value"])
def test_a_model_meta_cannot_carry_is_built_whole_on_every_rank(name):
    """A buffer outside the state dict would stay uninitialized (nothing sends it), and a constructor
    that reads a value fails on the meta device: both are built whole, with their values."""
    got = initial_model(name, {}, seed=0, world=4, sharded=True)
    assert not got.on_meta and not any(t.is_meta for t in (*got.model.parameters(), *got.model.buffers()))
    if name.endswith("keeps_a_cache"):
        assert torch.equal(got.model.scale, torch.full((64,), 0.5))
