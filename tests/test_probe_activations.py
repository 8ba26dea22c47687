"""What `train.micro_batch_size: auto` counts as a rank's activations when the model is not run as one
whole copy: blocks with activation checkpointing (they keep only their inputs, and the backward
recomputes one at a time), and a tensor-parallel rank's share, checked against real gloo ranks."""
import pytest
import torch

from openclaw import load_config
from openclaw.data.sources import resolve
from openclaw.data.stream import ShardedData, shard_specs
from openclaw.engine.memory import fake_tensors, probes_on_gpu, saved_activation_bytes
from openclaw.engine.models import GPT
from openclaw.engine.parallel.base import apply_activation_checkpointing
from openclaw.engine.precision import Precision
from openclaw.engine.tasks import LanguageModeling
from openclaw.runtime.micro_batch import resolve_micro_batch
from openclaw.runtime.micro_batch_probe import _ProbeStep
from parallel_harness import GPT_KWARGS, build, global_batch, saved_bytes, spawn

KWARGS = {"vocab_size": 256, "block_size": 64, "dim": 128, "depth": 4, "heads": 4}
FP32 = Precision("fp32", False, False, "")


def _config(text_dir, **overrides):
    return load_config(None, {"data.train": str(text_dir / "train"), "data.features": "x", "data.label": None,
                              "task": "language_modeling", "model.name": "gpt", "model.kwargs": KWARGS,
                              "train.global_batch_size": 256, **overrides})


def _data(text_dir) -> ShardedData:
    src = resolve(str(text_dir / "train"), "data.train")
    return ShardedData(src.spec, shard_specs(src.shards), "x", None)


def test_checkpointed_blocks_are_counted_by_their_inputs_plus_one_recomputed_block(text_dir):
    """With `full` checkpointing the forward saves each block's input only; the backward then recomputes
    one block at a time and holds its activations. The probe counts exactly that: the forward of a
    checkpointed copy plus one block's own saved tensors, each counted here on its own."""
    data, m = _data(text_dir), 4
    counted = {mode: _ProbeStep(_config(text_dir, **{"parallelism.activation_checkpointing": mode}), LanguageModeling(),
                                data, torch.device("cpu"), FP32, fake=True).activation_bytes(m)
               for mode in ("none", "selective", "full")}

    rows = data.batch(list(range(m)))
    with fake_tensors() as mode:
        gpt = GPT(**KWARGS).train()
        whole = saved_activation_bytes(lambda: LanguageModeling().loss(gpt, rows)[0], gpt.parameters())
        apply_activation_checkpointing(gpt, "full")
        forward = saved_activation_bytes(lambda: LanguageModeling().loss(gpt, rows)[0], gpt.parameters())
        x = mode.from_tensor(torch.zeros(m, KWARGS["block_size"], KWARGS["dim"]))
        block = gpt.blocks["0"]
        block.checkpointed = False  # its own activations, as its recompute holds them
        one_block = saved_activation_bytes(lambda: block(x), block.parameters())
    assert counted["none"] == whole
    assert counted["full"] == forward + one_block
    assert counted["full"] < counted["selective"] < counted["none"] / 1.2  # it pays, and the count shows it
    assert counted["full"] < 0.4 * counted["none"], counted


def test_checkpointing_lets_auto_choose_a_larger_micro_batch_in_the_same_budget(text_dir, tmp_path):
    """The advice for a micro-batch that does not fit ("recompute activations") is one the probe honours:
    in the same memory budget, `full` checkpointing resolves `auto` to a larger micro-batch."""
    sizes = {}
    for mode in ("none", "full"):
        cfg = _config(text_dir, **{"parallelism.activation_checkpointing": mode, "train.micro_batch_size": "auto",
                                   "train.memory_budget_gb": 0.05})
        resolved, auto = resolve_micro_batch(cfg, device=torch.device("cpu"), world=1, local_world=1,
                                             run_dir=str(tmp_path / mode), data=_data(text_dir))
        sizes[mode] = resolved.train.micro_batch_size
        assert auto.estimate_gb <= 0.05
    assert sizes["full"] >= 2 * sizes["none"], sizes
    assert sizes["none"] >= 1


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_the_probe_leaves_its_copy_checkpointed_as_the_engine_runs_it(text_dir, mode):
    step = _ProbeStep(_config(text_dir, **{"parallelism.activation_checkpointing": mode}), LanguageModeling(),
                      _data(text_dir), torch.device("cpu"), FP32, fake=True)
    flags = [b.checkpointed for b in step.model.blocks.values()]
    step.activation_bytes(2)
    assert [b.checkpointed for b in step.model.blocks.values()] == flags
    assert flags == ([True] * 4 if mode == "full" else [True, False, True, False])


# ---- tensor parallelism: one rank's share -----------------------------------------------------------

TP_KWARGS = dict(GPT_KWARGS, vocab_size=512, dim=64)
"""The harness's gpt, wider and with more classes, so that heads, hidden layers and logits weigh."""


class _FirstRows:
    """The harness's first global batch as the probe's data (its `batch(ids)` protocol)."""

    def __len__(self) -> int:
        return 8

    def batch(self, ids) -> dict[str, torch.Tensor]:
        return {"x": global_batch(0)["x"][:len(ids)]}


def _probed(parallelism: dict, m: int, precision: str = "fp32") -> int:
    cfg = load_config(None, {"data.train": "x", "data.features": "x", "data.label": None, "task": "language_modeling",
                             "model.name": "gpt", "model.kwargs": TP_KWARGS, "scaling.min_workers": 2,
                             "scaling.max_workers": 2, "train.global_batch_size": 8, "train.micro_batch_size": 2,
                             **{f"parallelism.{k}": v for k, v in parallelism.items()}})
    chosen = FP32 if precision == "fp32" else Precision(precision, False, False, "")
    return _ProbeStep(cfg, LanguageModeling(), _FirstRows(), torch.device("cpu"), chosen, fake=True).activation_bytes(m)


def _saved_on_rank(rank: int, world: int, parallelism: dict, m: int, precision: str) -> int:
    engine, _ = build(rank, world, parallelism, model_kwargs=TP_KWARGS, precision=precision)
    assert engine.precision.name == precision
    return saved_bytes(engine, {"x": global_batch(0)["x"][:m]})


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("loss_parallel", [True, False], ids=["split-logits", "gathered-logits"])
def test_a_tensor_parallel_rank_is_probed_for_its_share_of_the_activations(loss_parallel, precision):
    """Under TP a rank saves the column-wise layers' inputs whole (they are gathered from the sequence
    slices) and the rest split: heads, the MLP's hidden layer, the norms, and with loss parallelism the
    logits. Under bf16 autocast a column-wise layer saves a 16-bit copy of its gathered input, whole too.
    The probe, on one fake whole copy, counts what each of two real gloo ranks saves, to 0.1%; it used to
    count the whole model's (1.6-1.8x as much here), and so chose micro-batches that small."""
    parallelism, m = {"strategy": "ddp", "tensor": 2, "loss_parallel": loss_parallel}, 2
    real = spawn(2, _saved_on_rank, parallelism, m, precision)
    probed, whole = _probed(parallelism, m, precision), _probed({"strategy": "ddp"}, m, precision)
    assert real[0] == real[1]
    assert probed == pytest.approx(real[0], rel=1e-3), (probed, real)
    assert whole > 1.5 * real[0], (whole, real)


def test_a_whole_copy_on_a_gpu_is_only_for_ranks_that_run_the_whole_model():
    """On a GPU the probe measures a whole copy's peak and confirms the size with it only under DDP or
    FSDP; a TP rank or a pipeline stage runs a part, so it is counted on fake tensors instead."""
    gb = 10 ** 9
    assert probes_on_gpu(1, 1 * gb, 72 * gb) and not probes_on_gpu(1, 5 * gb, 72 * gb)
    assert not probes_on_gpu(2, 1 * gb, 72 * gb) and not probes_on_gpu(4, 10 ** 6, 72 * gb)
