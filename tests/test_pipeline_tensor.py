"""Pipeline x tensor parallelism, with FSDP over the data-parallel ranks: torchtitan's 3-D layout, the
engine alone in real gloo groups on CPU (tests/parallel_harness.py), against one rank. Within a stage
the blocks are split over the tensor-parallel ranks; between stages each rank passes on its slice of
the sequence; the tied embedding and head, on the first and last stages, hold the same rows of it.

The tolerances are those of tests/test_parallel.py: the same maths, float32 sums in another order.
"""
import pytest
import torch

from parallel_harness import bitwise, hop, rel, spawn, train

N_STEPS = 6


def _same_run(reference, history, tol=1e-5):
    """The first len(history) steps of `reference` (the `one_rank` fixture's run, or another)."""
    losses, norms = zip(*reference[:len(history)])
    got_losses, got_norms = zip(*history)
    assert len(got_losses) == len(losses) and rel(losses, got_losses) < tol, (losses, got_losses)
    assert rel(norms, got_norms) < tol, (norms, got_norms)  # a wrong gradient scale shows in the norm


@pytest.mark.parametrize("spec,split", [
    ({"strategy": "ddp", "pipeline": 2, "tensor": 2}, True),
    ({"strategy": "fsdp", "pipeline": 2, "tensor": 2, "pipeline_schedule": "interleaved_1f1b",
      "loss_parallel": False}, False)], ids=["1f1b-split-logits", "interleaved-fsdp-gathered-logits"])
def test_two_stages_of_two_tensor_parallel_ranks_match_one_rank(one_rank, spec, split):
    got = spawn(4, train, spec, N_STEPS)
    _same_run(one_rank["history"], got[0]["history"])
    assert all(g["history"] == got[0]["history"] for g in got)  # the last stage's loss reaches every rank
    assert [g["split_logits"] for g in got] == [split] * 4


def _uneven(rank, world, parallelism):
    """The harness's run on 15-token sequences and a 63-word vocabulary: neither splits evenly in two."""
    import parallel_harness as h
    h.GPT_KWARGS = {**h.GPT_KWARGS, "vocab_size": 63}

    def tokens(step):
        g = torch.Generator().manual_seed(1000 + step)
        return {"x": (torch.randint(0, 63, (h.GLOBAL_BATCH, 1), generator=g) + torch.arange(16) * 3) % 63}
    h.global_batch = tokens
    return h.train(rank, world, parallelism, 4)


def test_uneven_slices_of_the_sequence_and_the_vocabulary_pass_between_stages():
    """Tensor parallelism cuts 15 positions into 8 and 7, and 63 logits into 32 and 31: the next stage and
    the loss rebuild the whole from each rank's slice with the step's whole length."""
    one = spawn(1, _uneven, {"strategy": "ddp"})[0]
    got = spawn(4, _uneven, {"strategy": "ddp", "pipeline": 2, "tensor": 2})
    _same_run(one["history"], got[0]["history"])
    assert got[0]["split_logits"]


def test_only_rank_0_builds_the_whole_model_under_pipeline_x_tensor():
    """As a worker builds it: on the meta device, rank 0's weights sent into every stage's split part."""
    spec = {"strategy": "ddp", "pipeline": 2, "tensor": 2}
    whole, meta = spawn(4, train, spec, 3), spawn(4, train, spec, 3, True)
    assert [m["built_on_meta"] for m in meta] == [True] * 4 and not whole[0]["built_on_meta"]
    assert [m["whole_state_keys"] > 20 for m in meta] == [True, False, False, False]
    assert [m["history"] for m in meta] == [w["history"] for w in whole]  # bit for bit


@pytest.mark.slow
def test_eight_ranks_match_one_rank_and_their_checkpoint_loads_at_four_and_one(one_rank, tmp_path):
    """pipeline 2 x data-parallel 2 x tensor 2, the data-parallel ranks as HSDP replicas and every block
    recomputed in the backward, trains as one rank does; its sharded checkpoint loads at pipeline 2 x
    tensor 2 under FSDP (a data-parallel rank lost, as an elastic shrink; built as a restarted worker
    builds it, every weight from the checkpoint) and into one rank, every parameter and optimizer state
    bit for bit."""
    spec = {"strategy": "fsdp", "pipeline": 2, "tensor": 2}
    eight = spawn(8, hop, {**spec, "replicate": 2, "activation_checkpointing": "full"}, None, str(tmp_path / "a"), 3)
    _same_run(one_rank["history"], eight[0]["history"])
    four = spawn(4, hop, spec, str(tmp_path / "a"), str(tmp_path / "b"), 3, True)
    one = spawn(1, hop, {"strategy": "fsdp"}, str(tmp_path / "b"), str(tmp_path / "c"), 3)
    # rank r of the 8 (pp, dp, tp) and rank r' of the 4 (pp, tp) at the same stage and tensor position
    # gather the same whole stage; one rank holds every stage
    for r8, r4 in ((0, 0), (1, 1), (4, 2), (7, 3)):
        assert bitwise(eight[r8]["state"], four[r4]["state"]) > 20
        keys = eight[r8]["state"]["model"].keys()
        assert bitwise(eight[r8]["state"]["model"], {k: one[0]["state"]["model"][k] for k in keys}) == len(keys)
    assert "tok.weight" in eight[0]["state"]["model"] and "head.weight" in eight[4]["state"]["model"]
    assert eight[0]["state"]["model"]["tok.weight"].equal(eight[4]["state"]["model"]["head.weight"])  # still tied
    # and training goes on alike from each
    _same_run(eight[0]["next"], four[0]["next"])
    _same_run(eight[0]["next"], one[0]["next"])
