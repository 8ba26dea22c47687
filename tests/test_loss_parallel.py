"""Loss parallelism under tensor parallelism (`parallelism.loss_parallel`), in real gloo groups: the gpt's
logits stay split by vocabulary, the losses and the evaluation agree with gathered logits, and a rank
saves less for the backward and gathers no logits."""
import pytest

from parallel_harness import GPT_KWARGS, build, my_micro_batches, saved_bytes, spawn, steps
from openclaw.engine.parallel.config import ParallelismConfig

BIG_VOCAB = dict(GPT_KWARGS, vocab_size=2048)
"""Logits of 2048 classes per token: the largest activation of the test gpt by far, as in a large LM."""
LOGITS_BYTES = 2 * 16 * 2048 * 4
"""One micro-batch's fp32 logits, whole: 2 samples x 16 tokens x 2048 classes."""


def _run(rank: int, world: int, parallelism: dict, split_logits_ok: bool = True) -> dict:
    """Three steps and an evaluation of the big-vocabulary gpt; what the head hands the loss, the bytes
    autograd saves in one micro-batch's forward, and the elements the all-gathers of a step receive."""
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    engine, layout = build(rank, world, parallelism, model_kwargs=BIG_VOCAB, split_logits_ok=split_logits_ok)
    head = []
    engine.model.head.register_forward_hook(
        lambda m, i, out: head.append((type(out).__name__, (out.to_local() if isinstance(out, DTensor) else out).shape[-1])))

    class Gathers(TorchDispatchMode):
        received = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__.startswith("all_gather_into_tensor"):
                self.received += out.numel()
            return out

    with Gathers() as gathers:
        history = steps(engine, layout, rank, 0, 3)
    saved = saved_bytes(engine, my_micro_batches(3, layout, rank)[0])
    evaluation = engine.strategy.evaluate(engine.model, my_micro_batches(4, layout, rank), engine.fns)
    return {"history": history, "head": head[0], "gathered": gathers.received, "saved": saved,
            "eval": evaluation}


@pytest.mark.parametrize("world,parallelism", [(2, {"strategy": "ddp", "tensor": 2}),
                                               (4, {"strategy": "fsdp", "tensor": 2})], ids=["tp", "fsdp-x-tp"])
def test_split_logits_agree_with_gathered_ones_and_a_rank_holds_half_of_them(world, parallelism):
    """With `loss_parallel` (the default) the head hands the loss a DTensor holding this rank's half of
    the 2048 classes, where without it every rank holds all of them. The losses, the gradient norms and
    the evaluation agree to float32 rounding. A step's all-gathers receive 65,536 fewer elements per
    micro-batch (its logits: 2 samples x 16 tokens x 2048 classes), and a micro-batch's forward saves
    half of their bytes less for the backward (the log-softmax the cross-entropy keeps: 131 KB less of
    262 KB)."""
    on = spawn(world, _run, dict(parallelism, loss_parallel=True))
    off = spawn(world, _run, dict(parallelism, loss_parallel=False))
    for a, b in zip(on, off):
        assert a["head"] == ("DTensor", 1024) and b["head"] == ("Tensor", 2048), (a["head"], b["head"])
        for (la, na), (lb, nb) in zip(a["history"], b["history"]):
            assert la == pytest.approx(lb, rel=1e-6) and na == pytest.approx(nb, rel=1e-5)
        assert a["eval"]["count"] == b["eval"]["count"] > 0
        assert a["eval"]["loss"] == pytest.approx(b["eval"]["loss"], rel=1e-6)
        micro_batches = 3 * len(my_micro_batches(0, _layout(world, parallelism), 0))
        assert b["gathered"] - a["gathered"] == micro_batches * 2 * 16 * 2048, (a["gathered"], b["gathered"])
        assert b["saved"] - a["saved"] > 0.9 * LOGITS_BYTES / 2, (a["saved"], b["saved"])


def _layout(world, parallelism):
    from openclaw.engine.parallel.build import layout_for
    from openclaw.engine.parallel.config import ParallelismConfig
    return layout_for(ParallelismConfig(**parallelism), world)


def test_a_task_that_needs_whole_logits_gets_them():
    """A user's loss function (`split_logits_ok=False`, as the attempt passes for any task but the built-in
    language modeling) gets the gathered logits as a plain tensor, `loss_parallel` or not."""
    got = spawn(2, _run, {"strategy": "ddp", "tensor": 2, "loss_parallel": True}, False)
    assert all(r["head"] == ("Tensor", 2048) for r in got), [r["head"] for r in got]


def _loss_parallel_by_default(rank: int, world: int) -> bool:
    from openclaw.engine.parallel.build import build_strategy
    from openclaw.engine.parallel.config import ParallelismConfig
    return build_strategy(ParallelismConfig(tensor=2), world=world, rank=rank).loss_parallel


def test_a_caller_that_does_not_say_its_loss_takes_split_logits_gets_whole_ones():
    """`build_strategy` used directly (an SDK user's engine, a bench) with its own task: `loss_parallel`
    is the config's default, but split logits are only for a loss that says it takes them."""
    assert ParallelismConfig().loss_parallel and spawn(2, _loss_parallel_by_default) == [False, False]
