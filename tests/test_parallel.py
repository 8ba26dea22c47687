"""FSDP2, HSDP, tensor and pipeline parallelism against one rank (or DDP), and sharded checkpoints across
world sizes: the engine alone (no Ray), in real multi-process gloo groups on CPU (tests/parallel_harness.py).

The tolerances: each step's loss is a float32 sum over the batch, and a different reduction order
changes its last bit (a relative 1e-7), nothing more: the maths is the same.
"""
import pytest
import torch

from parallel_harness import ONE_RANK_STEPS as N_STEPS
from parallel_harness import (GLOBAL_BATCH, bitwise, build, hop, host_peak_growth, my_micro_batches, rel, spawn, train,
                              with_dropout, wrap_on_meta)


def _check_history(reference, got, tol):
    losses, norms = zip(*reference["history"])
    got_losses, got_norms = zip(*got["history"])
    assert len(got_losses) == N_STEPS and rel(losses, got_losses) < tol, (losses, got_losses)
    # a wrong gradient scale can hide from the loss behind clipping and Adam: the global norm shows it
    assert rel(norms, got_norms) < tol, (norms, got_norms)
    assert losses[-1] < losses[0]


def _check_weights(reference, got, atol):
    ref, new = reference["weights"], got["weights"]
    assert set(ref) == set(new) and len(ref) > 20
    worst = max((ref[k] - new[k]).abs().max().item() for k in ref)
    assert worst < atol, worst
    assert all(torch.allclose(ref[k], new[k], rtol=1e-5, atol=atol) for k in ref)


def test_fsdp_matches_ddp_at_two_ranks(one_rank):
    ddp = spawn(2, train, {"strategy": "ddp"}, N_STEPS)[0]
    fsdp = spawn(2, train, {"strategy": "fsdp"}, N_STEPS)[0]
    _check_history(ddp, fsdp, 1e-6)
    _check_weights(ddp, fsdp, 1e-5)
    _check_history(one_rank, fsdp, 1e-6)
    # each rank holds about half of the parameters, gradients and optimizer state (measured after a step)
    held = {name: sum(run["state_bytes"].values()) for name, run in (("ddp", ddp), ("fsdp", fsdp))}
    assert held["fsdp"] <= 0.55 * held["ddp"], held
    assert fsdp["state_bytes"]["grads"] <= 0.55 * ddp["state_bytes"]["grads"]


def test_dropout_follows_the_samples_so_a_resize_keeps_the_optimization():
    """Seeded by rank and step, the same samples drew other dropout masks at another world size (or in
    another micro-batch order): a run resized from 2 workers to 1 trained on other draws, 5% off in a
    step's gradient. Seeded by where each micro-batch starts in the global batch, they draw alike."""
    one = spawn(1, with_dropout, {"strategy": "ddp"})[0]
    for parallelism in ({"strategy": "ddp"}, {"strategy": "fsdp"}):
        two = spawn(2, with_dropout, parallelism)[0]
        assert rel(one["history"], two["history"]) < 1e-6, (parallelism, one["history"], two["history"])
        _check_weights(one, two, 1e-5)
    undropped = [norm for _, norm in spawn(1, train, {"strategy": "ddp"}, 6)[0]["history"]]
    assert rel(one["history"], undropped) > 1e-3  # dropout is drawn
    by_rank = spawn(1, with_dropout, {"strategy": "ddp"}, 6, False)[0], spawn(2, with_dropout, {"strategy": "ddp"}, 6, False)[0]
    assert rel(*(run["history"] for run in by_rank)) > 1e-3  # what a resize did before


@pytest.mark.parametrize("schedule,checkpointing", [("1f1b", "none"), ("interleaved_1f1b", "none"), ("1f1b", "full")])
def test_a_pipeline_draws_dropout_by_the_samples_so_a_resize_keeps_the_optimization(schedule, checkpointing):
    """A pipeline's schedule drew each step's masks from the data-parallel rank's seed, chunk after chunk:
    resized from two replicas to one, the same samples drew other masks. Each chunk's forward is now
    seeded by the sample it starts at (and its stage), as a micro-batch's is. Under activation
    checkpointing too, whose recompute in torch's shape inference failed against an inference forward in
    evaluation mode ("Recomputed values ... have different metadata")."""
    pp = {"strategy": "ddp", "pipeline": 2, "pipeline_schedule": schedule, "activation_checkpointing": checkpointing}
    one, two = spawn(2, with_dropout, pp)[0], spawn(4, with_dropout, pp)[0]  # one data-parallel replica; two
    assert rel(one["history"], two["history"]) < 1e-6, (one["history"], two["history"])
    _check_weights(one, two, 1e-5)
    by_rank = spawn(2, with_dropout, pp, 6, False)[0], spawn(4, with_dropout, pp, 6, False)[0]
    assert rel(*(run["history"] for run in by_rank)) > 1e-4  # what a resize did before


@pytest.mark.parametrize("world,parallelism", [(2, {"strategy": "fsdp"}), (4, {"strategy": "fsdp", "replicate": 2})],
                         ids=["fsdp", "hsdp"])
def test_fsdp_keeps_batch_norm_statistics_as_ddp_does(world, parallelism):
    """FSDP left each rank its own running statistics: the ranks evaluated with different ones, and a
    checkpoint kept one rank's, which a resume then gave them all. After each step every rank now holds
    rank 0's, which are DDP's (DDP hands rank 0's out before each forward)."""
    from parallel_harness import batch_norm_run
    ranks = spawn(world, batch_norm_run, parallelism)
    ddp = spawn(world, batch_norm_run, {"strategy": "ddp"})[0]
    assert set(ranks[0]["buffers"]) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    for other in ranks[1:]:  # what FSDP without the sync fails
        assert all(torch.equal(ranks[0]["buffers"][k], other["buffers"][k]) for k in ranks[0]["buffers"])
    # and they are rank 0's, DDP's (which rank 0 keeps with or without the sync: the meaning, not the fix)
    assert all(torch.allclose(ranks[0]["buffers"][k].float(), ddp["buffers"][k].float(), rtol=1e-5, atol=1e-7)
               for k in ddp["buffers"])
    assert not torch.allclose(ddp["buffers"]["1.running_mean"], spawn(world, batch_norm_run, {"strategy": "ddp"}, 1)[0][
        "buffers"]["1.running_mean"])  # the statistics move with the steps: the comparison can fail


@pytest.mark.parametrize("world", [2, 4], ids=["one-replica", "two-replicas"])
def test_a_pipeline_keeps_each_stages_batch_norm_statistics_as_ddp_does(world):
    """torch's pipeline stages learn their output shapes from a forward on uninitialized tensors, at each
    attempt's first step: in training mode, BatchNorm took it in (running statistics of inf, one batch
    too many). And each stage's replicas kept their own statistics, as FSDP's ranks did. A stage's
    statistics are now what DDP's rank 0 holds, on every replica of the stage."""
    from parallel_harness import batch_norm_run
    ranks = spawn(world, batch_norm_run, {"strategy": "ddp", "pipeline": 2}, 3, True)  # two stages
    ddp = spawn(world // 2, batch_norm_run, {"strategy": "ddp"}, 3, True)[0]
    assert sorted((r["stage"], r["dp_rank"]) for r in ranks) == [(s, d) for s in (0, 1) for d in range(world // 2)]
    for stage in (0, 1):
        first, *others = sorted((r for r in ranks if r["stage"] == stage), key=lambda r: r["dp_rank"])
        assert first["buffers"] and all(set(first["buffers"]) == set(o["buffers"]) for o in others)
        assert all(torch.equal(first["buffers"][k], o["buffers"][k]) for k in first["buffers"] for o in others)
        assert all(torch.allclose(b.float(), ddp["buffers"][k].float(), rtol=1e-5, atol=1e-6)
                   for k, b in first["buffers"].items()), stage
    assert sum(len(r["buffers"]) for r in ranks if r["dp_rank"] == 0) == len(ddp["buffers"])  # each on its stage


def test_a_pipeline_with_batch_norm_resumes_bit_for_bit(tmp_path):
    """A resumed pipeline's new stages run torch's shape inference again at their first step: in training
    mode BatchNorm took that forward in, and the resumed run's statistics, then its weights, parted from
    the uninterrupted run's. Now both end bit for bit alike."""
    from parallel_harness import batch_norm_run
    pp = {"strategy": "ddp", "pipeline": 2}
    straight = spawn(2, batch_norm_run, pp, 4, True)
    resumed = spawn(2, batch_norm_run, pp, 4, True, 2, str(tmp_path / "shards"))
    for a, b in zip(straight, resumed):
        assert bitwise(a["buffers"], b["buffers"]) == 3 and bitwise(a["params"], b["params"]) >= 2


@pytest.mark.parametrize("parallelism", [{"strategy": "fsdp"}, {"strategy": "fsdp", "tensor": 2}],
                         ids=["fsdp", "fsdp-x-tp"])
def test_sharding_moves_no_whole_model_to_the_device(parallelism):
    """A model bigger than one GPU must reach it a block at a time, as `fully_shard` shards it. A model
    on the meta device shows it on a CPU: copying it whole to the device raises ("Cannot copy out of
    meta tensor"); sharded block by block, each rank holds half of it, given memory on the device."""
    for got in spawn(2, wrap_on_meta, parallelism):
        assert "error" not in got, got.get("error")
        assert got["devices"] == ["cpu"]
        assert got["held"] <= 0.55 * got["whole"], got


@pytest.mark.parametrize("world,parallelism", [(2, {"strategy": "fsdp"}), (2, {"strategy": "ddp", "tensor": 2}),
                                               (2, {"strategy": "ddp", "pipeline": 2}),
                                               (4, {"strategy": "fsdp", "tensor": 2})],
                         ids=["fsdp", "tp", "pp", "fsdp-x-tp"])
def test_only_rank_0_builds_the_whole_model_and_the_run_is_the_same(world, parallelism):
    """As a worker builds it (`engine.initial_model`): every rank builds the model on the meta device,
    rank 0 alone builds it whole and sends its weights after the wrap. The losses, norms and final weights
    equal those of every rank building it whole, bit for bit."""
    whole = spawn(world, train, parallelism, 4)
    meta = spawn(world, train, parallelism, 4, True)
    for rank, (a, b) in enumerate(zip(whole, meta)):
        assert b["built_on_meta"] and not a["built_on_meta"]
        assert (b["whole_state_keys"] > 20) == (rank == 0), (rank, b["whole_state_keys"])
        assert a["history"] == b["history"]
        assert a["weights"].keys() == b["weights"].keys()  # a pipeline's too: each stage's, gathered
        assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    # the tied head and embedding go once, except to a pipeline's last stage, which holds the head alone
    tied_once = parallelism.get("pipeline", 1) == 1
    assert meta[0]["sent_keys"] == meta[0]["whole_state_keys"] - tied_once, meta[0]["sent_keys"]


def test_only_rank_0_holds_the_whole_model_in_host_memory():
    """A 228 MB gpt (57M fp32 parameters) under FSDP at 2 ranks. Built whole by every rank, each rank's
    peak resident memory grows by about the model or more (249 MB seen); as a worker builds it, rank 1's
    grows by its half and a tensor in flight (144 MB seen), and rank 0's by the whole and its half (353
    MB). Compared within the test, rank 1's growth against its own whole-build growth."""
    big = {"vocab_size": 256, "block_size": 64, "dim": 768, "depth": 8, "heads": 12}
    model_bytes = 4 * (12 * 768 * 768 * 8 + 256 * 768 + 64 * 768)  # the blocks' matrices and the embeddings
    whole = spawn(2, host_peak_growth, {"strategy": "fsdp"}, big, False)
    meta = spawn(2, host_peak_growth, {"strategy": "fsdp"}, big, True)
    assert min(whole) > 0.9 * model_bytes, (whole, model_bytes)  # the measure sees the model
    assert meta[0] > 0.9 * model_bytes and meta[1] < 0.75 * whole[1], (meta, whole, model_bytes)


def _step_peak_growth(rank: int, world: int, micro_batches: int) -> int:
    """How much this rank's peak resident memory grew over the first 1F1B training step of a 2-stage gpt
    with a 65,536-wide head, in `micro_batches` micro-batches of 16 x 16 tokens."""
    import parallel_harness as h
    from openclaw.engine.metrics import peak_memory_bytes
    h.GLOBAL_BATCH, h.MICRO = 16 * micro_batches, 16
    engine, layout = build(rank, world, {"strategy": "ddp", "pipeline": 2, "pipeline_schedule": "1f1b"},
                           model_kwargs={**h.GPT_KWARGS, "vocab_size": 65536})
    batches = my_micro_batches(0, layout, rank)
    before = peak_memory_bytes(torch.device("cpu"))
    engine.train_step(0, batches)
    return peak_memory_bytes(torch.device("cpu")) - before


def test_the_last_stage_keeps_no_micro_batch_logits_past_their_backward():
    """torch's schedules keep every micro-batch's output on the last stage until the end of the step unless
    told not to (`return_outputs=False`): a language model's logits for all of them at once, where 1F1B
    frees each after its backward. A micro-batch's logits are 67 MB here (16 x 16 x 65,536 fp32: above
    glibc's largest mmap threshold, so each is returned to the system when freed, and the peak resident
    memory counts what is live). The last stage's peak now grows by 4.4 times the logits of one
    micro-batch over a step of 4 micro-batches and over one of 16 alike (their forward and backward, and
    the head's gradient and optimizer state). With every output kept it grew by 8.4 times over 4 and by
    32.5 times over 16."""
    logits = 16 * 16 * 65536 * 4
    four, sixteen = (spawn(2, _step_peak_growth, n)[1] for n in (4, 16))
    assert logits < four < 6 * logits and abs(sixteen - four) < logits, (four / logits, sixteen / logits)


def test_tensor_parallel_at_two_ranks_matches_one_rank(one_rank):
    tp = spawn(2, train, {"strategy": "ddp", "tensor": 2}, N_STEPS)[0]
    _check_history(one_rank, tp, 1e-5)
    _check_weights(one_rank, tp, 1e-5)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved_1f1b"])
def test_pipeline_of_two_stages_matches_one_rank(one_rank, schedule):
    pp = spawn(2, train, {"strategy": "ddp", "pipeline": 2, "pipeline_schedule": schedule}, N_STEPS)
    _check_history(one_rank, pp[0], 1e-5)
    assert pp[0]["history"] == pp[1]["history"]  # the last stage's loss reaches the first
    _check_weights(one_rank, pp[0], 1e-5)  # every stage's weights, gathered: the tied head's copy included


def _stage_blocks(rank, world, parallelism):
    from parallel_harness import build
    engine, _ = build(rank, world, parallelism)
    return list(engine.module.blocks)


def test_a_pipeline_split_unevenly_holds_its_blocks_matches_one_rank_and_resumes_under_another(one_rank, tmp_path):
    """`parallelism.pipeline_split: [3, 1]`: the first stage holds 3 of the 4 blocks, the last 1 beside the
    head, and training is the same. Its checkpoint resumes under `[1, 3]` and goes on as it would have."""
    spec = {"strategy": "ddp", "pipeline": 2, "pipeline_split": [3, 1]}
    assert spawn(2, _stage_blocks, spec) == [["0", "1", "2"], ["3"]]
    pp = spawn(2, train, spec, N_STEPS)
    _check_history(one_rank, pp[0], 1e-5)
    before = spawn(2, hop, spec, None, str(tmp_path / "split"), 3)[0]
    after = spawn(2, hop, {**spec, "pipeline_split": [1, 3]}, str(tmp_path / "split"), str(tmp_path / "resplit"), 3)[0]
    assert rel([x for x, _ in before["next"]], [x for x, _ in after["next"]]) < 1e-6, (before["next"], after["next"])


@pytest.mark.parametrize("spec", [{"strategy": "fsdp", "replicate": 2}, {"strategy": "fsdp", "tensor": 2},
                                  {"strategy": "fsdp", "pipeline": 2}],
                         ids=["hsdp-2x2", "fsdp-x-tp", "fsdp-x-pp"])
def test_two_dimensional_meshes_at_four_ranks_match_one_rank(one_rank, spec):
    got = spawn(4, train, spec, N_STEPS)
    _check_history(one_rank, got[0], 1e-5)
    _check_weights(one_rank, got[0], 1e-5)  # a pipeline's too: each stage's, gathered


def test_hsdp_two_replicas_of_one_shard_and_activation_checkpointing(one_rank):
    hsdp = spawn(2, train, {"strategy": "fsdp", "replicate": 2, "activation_checkpointing": "full"}, N_STEPS)[0]
    _check_history(one_rank, hsdp, 1e-6)
    _check_weights(one_rank, hsdp, 1e-5)


def test_sharded_checkpoint_hops_two_ranks_one_rank_two_ranks_bit_for_bit(tmp_path):
    """The last hop loads as a restarted worker does: the model built on the meta device, given no
    initial weights (no rank builds it whole), every weight from the checkpoint."""
    spec = {"strategy": "fsdp"}
    saved_at_2 = spawn(2, hop, spec, None, str(tmp_path / "a"), 3)
    loaded_at_1 = spawn(1, hop, spec, str(tmp_path / "a"), str(tmp_path / "b"), 3)
    loaded_at_2 = spawn(2, hop, spec, str(tmp_path / "b"), str(tmp_path / "c"), 3, True)
    state = saved_at_2[0]["state"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    # every parameter and every optimizer state (moments and step counts), bit for bit after each hop
    tensors = bitwise(state, loaded_at_1[0]["state"])
    assert tensors == bitwise(state, loaded_at_2[0]["state"]) and tensors > 3 * len(state["model"]) // 2
    assert any(k.endswith("exp_avg_sq") for k in state["optimizer"]) and any(k.endswith(".step") for k in state["optimizer"])
    # and training goes on alike from each
    assert saved_at_2[0]["next"] == loaded_at_2[0]["next"]
    assert rel([x for x, _ in saved_at_2[0]["next"]], [x for x, _ in loaded_at_1[0]["next"]]) < 1e-6


def test_pipeline_checkpoint_loads_into_one_rank_and_a_model(tmp_path):
    """Each stage saves the parameters it holds, under the whole model's names."""
    pp = spawn(2, hop, {"strategy": "ddp", "pipeline": 2}, None, str(tmp_path / "pp"), 3)
    one = spawn(1, hop, {"strategy": "fsdp"}, str(tmp_path / "pp"), str(tmp_path / "one"), 3)
    assert rel([x for x, _ in pp[0]["next"]], [x for x, _ in one[0]["next"]]) < 1e-5
    assert one[0]["state"]["model"]["head.weight"].equal(one[0]["state"]["model"]["tok.weight"])


def _crash_while_exiting(rank, world):
    """Rank 0 dies by SIGSEGV in its process's exit, after `run_local`'s entry returned (its result saved,
    the group left): a finalizer multiprocessing runs as a child process exits, forked or spawned."""
    import os
    import signal
    from multiprocessing import util
    if rank == 0:
        util.Finalize(None, os.kill, args=(os.getpid(), signal.SIGSEGV), exitpriority=0)
    return rank * 10


def _crash_before_the_result(rank, world):
    import os
    import signal
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSEGV)
    return rank


def _environment_and_folder(rank, world):
    import os
    return os.environ.get("OPENCLAW_TEST_MARK"), os.getcwd(), os.environ["RANK"]


def test_ranks_run_with_the_callers_environment_and_folder_as_they_are_at_the_call(monkeypatch, tmp_path):
    """The ranks are forked from a server started at the first call; each still sees the caller's
    environment and working folder as they are when it calls, as a spawned rank would."""
    spawn(1, _environment_and_folder)  # the server runs from here on, if no test started it before
    monkeypatch.setenv("OPENCLAW_TEST_MARK", "set after the server started")
    monkeypatch.chdir(tmp_path)
    assert spawn(2, _environment_and_folder) == [("set after the server started", str(tmp_path), str(r)) for r in (0, 1)]
    monkeypatch.delenv("OPENCLAW_TEST_MARK")
    assert spawn(1, _environment_and_folder)[0][0] is None


def test_a_rank_crashing_as_it_exits_is_a_warning_and_one_crashing_before_its_result_an_error(caplog):
    """`run_local`: a crash in a rank's teardown, after it saved its result and left the group (seen once
    in the suite, a SIGSEGV from a finished 2-rank run), leaves the results whole; a crash before
    leaves one missing, and fails the run."""
    import torch.multiprocessing as mp
    assert spawn(2, _crash_while_exiting) == [0, 10]
    assert "then rank 0 died by SIGSEGV while exiting" in caplog.text
    with pytest.raises(mp.ProcessExitedException, match="process 1 terminated with signal SIGSEGV"):
        spawn(2, _crash_before_the_result)


def _losses_around_an_evaluation(rank: int, world: int, parallelism: dict, evaluate: bool) -> list[float]:
    """Four training steps' losses, with an evaluation after the second one (or none)."""
    engine, layout = build(rank, world, parallelism)
    losses = []
    for step in range(4):
        losses.append(engine.train_step(step, my_micro_batches(step, layout, rank)).loss_sum)
        if step == 1 and evaluate:
            engine.evaluate(my_micro_batches(5, layout, rank)[:3])
    return losses


@pytest.mark.parametrize("world,parallelism", [
    (2, {"strategy": "ddp"}), (2, {"strategy": "fsdp"}), (4, {"strategy": "fsdp", "replicate": 2}),
    (4, {"strategy": "fsdp", "tensor": 2}),
    (2, {"strategy": "ddp", "pipeline": 2, "pipeline_schedule": "1f1b"}),
    (2, {"strategy": "ddp", "pipeline": 2, "pipeline_schedule": "interleaved_1f1b"}),
    (4, {"strategy": "ddp", "pipeline": 2, "tensor": 2, "loss_parallel": True})],
    ids=["ddp", "fsdp", "hsdp", "fsdp-x-tp", "pp-1f1b", "pp-interleaved", "pp-x-tp"])
def test_an_evaluation_leaves_the_training_after_it_as_it_was(world, parallelism):
    """Under every strategy, a run that evaluates trains, bit for bit, as one that does not. Under a
    pipeline the evaluation's pass and the training step share each stage's receive buffers: a
    forward-only pass once made the buffers of the micro-batches it ran without gradients, and the
    training schedule, set up before, kept them, so those micro-batches' gradients never reached the
    earlier stages again."""
    plain = spawn(world, _losses_around_an_evaluation, parallelism, False)
    evaluated = spawn(world, _losses_around_an_evaluation, parallelism, True)
    assert evaluated == plain, (parallelism, evaluated, plain)


def _window_totals(rank: int, world: int, parallelism: dict) -> tuple[list[float], int, float]:
    """One training step logged into a worker's window, as the attempt builds it: the window's totals
    over every rank, and the rank's data-parallel share with the mean loss its engine reports for it."""
    from pathlib import Path

    from openclaw import load_config
    from openclaw.engine.state import TrainState
    from openclaw.runtime.log_window import LogWindow
    engine, layout = build(rank, world, parallelism)
    stats = engine.train_step(0, batches := my_micro_batches(0, layout, rank))
    cfg = load_config(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "digits.yaml", {})
    window = LogWindow(cfg, TrainState(), device=torch.device("cpu"), rank=rank, world=world, speaks_for_node=False,
                       flops_per_sample=None, job_start_time=0.0, counts_its_share=layout.counts_its_share(rank))
    window.add(batches, stats, data_s=0.0, compute_s=1.0)
    state = TrainState()
    window.carry(state)
    return state.loss_window, layout.dp_rank(rank), stats.loss_sum / stats.samples


@pytest.mark.parametrize("world,parallelism", [
    (4, {"strategy": "fsdp", "tensor": 2}), (4, {"strategy": "ddp", "pipeline": 2, "tensor": 2}),
    (8, {"strategy": "fsdp", "pipeline": 2, "tensor": 2})], ids=["fsdp-x-tp", "pp-x-tp", "3d"])
def test_a_window_counts_each_sample_of_the_global_batch_once(world, parallelism):
    """A step's samples and loss, summed over the ranks, are the global batch's, however many tensor and
    pipeline peers trained on each share: every peer reports its share's samples, and a sum over all of
    them read 2-4x the samples/s, tokens/s, FLOP/s and MFU of a model-parallel run."""
    results = spawn(world, _window_totals, parallelism)
    (loss_sum, samples), _, _ = results[0]
    assert samples == GLOBAL_BATCH and all(totals == [loss_sum, samples] for totals, _, _ in results)
    share_means = {share: mean for _, share, mean in results}  # equal shares: the batch's mean is theirs
    assert loss_sum / samples == pytest.approx(sum(share_means.values()) / len(share_means), rel=1e-6)


def _fp16_with_an_overflow_on_stage_0(rank: int, world: int, parallelism: dict) -> list[tuple]:
    """Four fp16 steps whose first overflows in the position embedding's gradient alone (the first stage's
    under a pipeline): each step's global grad norm, overflow and this rank's loss scale after it."""
    engine, layout = build(rank, world, parallelism, precision="fp16")
    first = [True]
    pos = getattr(engine.module, "pos", None)
    if pos is not None:
        pos.weight.register_hook(lambda g: g * float("inf") if first[0] else g)
    out = []
    for step in range(4):
        stats = engine.train_step(step, my_micro_batches(step, layout, rank))
        first[0] = False
        out.append((stats.grad_norm, stats.overflow, engine.scaler.get_scale()))
    return out


@pytest.mark.parametrize("world,parallelism", [
    (2, {"strategy": "ddp", "pipeline": 2}), (2, {"strategy": "ddp", "pipeline": 2, "pipeline_schedule": "interleaved_1f1b"}),
    (4, {"strategy": "ddp", "pipeline": 2, "tensor": 2})], ids=["pp", "pp-interleaved", "pp-x-tp"])
def test_fp16_stages_share_one_loss_scale_through_an_overflow_on_one_stage(world, parallelism):
    """fp16 under a pipeline: an overflow in one stage's gradients skips the step and lowers the loss scale
    on every stage, as on one rank, and the steps after it match one rank's. Each stage's scaler once
    checked only its own gradients: the first stage's scale fell while the last's did not, and the first
    stage's gradients unscaled twice too large from then on (the stages that scale no loss had no scale
    at all, and their first step failed)."""
    one = spawn(1, _fp16_with_an_overflow_on_stage_0, {})[0]
    ranks = spawn(world, _fp16_with_an_overflow_on_stage_0, parallelism)
    assert one[0][1] and one[0][2] == one[1][2] == 32768.0  # overflowed: skipped, and the scale halved
    for got in ranks:
        assert [(o, s) for _, o, s in got] == [(o, s) for _, o, s in one]
        # fp16 matmuls split over tensor ranks round apart (4e-4 here); a stage unscaled by half read 2x
        assert rel([n for n, _, _ in one[1:]], [n for n, _, _ in got[1:]]) < 1e-2


def _evaluate_rows(rank: int, world: int, parallelism: dict, rows: int) -> tuple[float, float]:
    """(val loss, rows counted) of the first `rows` rows of a fixed set, shared out over the data-parallel
    ranks as the loop shares them (`eval_positions`), micro-batches of 2, summed over every rank."""
    from openclaw.engine.metrics import allreduce_sum
    from openclaw.runtime.evaluate import eval_positions
    from parallel_harness import global_batch
    engine, layout = build(rank, world, parallelism)
    data = torch.cat([global_batch(s)["x"] for s in range(2)])
    mine = eval_positions(rows, layout.dp_rank(rank), layout.dp)
    sums = engine.evaluate([{"x": data[mine[i:i + 2]]} for i in range(0, len(mine), 2)])
    loss, count = allreduce_sum([sums["loss"], float(sums["count"])], engine.device)
    peers = world // layout.dp  # tensor and pipeline peers report their share's sums alike
    return loss / count, count / peers


@pytest.mark.parametrize("world,parallelism", [(2, {"strategy": "fsdp"}), (4, {"strategy": "fsdp", "tensor": 2}),
                                               (4, {"strategy": "fsdp", "pipeline": 2})],
                         ids=["fsdp", "fsdp-x-tp", "pp-x-fsdp"])
def test_data_parallel_shares_a_micro_batch_apart_evaluate_without_a_hang(world, parallelism):
    """5 rows over 2 data-parallel ranks: shares of 3 and 2 rows, 2 micro-batches (or pipeline passes)
    against 1. FSDP all-gathers the parameters in every forward, so the rank with one more forward once
    waited for a partner that had gone on to the sums' all-reduce: a hang. Every rank now runs as many
    forwards as the rank with the most, the extra ones counted nowhere: the loss is one rank's."""
    (alone,) = spawn(1, _evaluate_rows, {}, 5)
    results = spawn(world, _evaluate_rows, parallelism, 5)
    assert alone[1] == 5 and all(count == 5 for _, count in results)
    assert all(loss == pytest.approx(alone[0], rel=1e-5) for loss, _ in results)


def _one_rank_overflows_its_loss(rank: int, world: int, precision: str, grads: str = "infinite"
                                 ) -> list[tuple[bool, bool]]:
    """Three DDP steps; at the second, rank 1's loss alone is infinite (its fp16 forward overflowed on its
    own samples), its gradients with it, or (`grads: finite`) not: each step's (finite, overflow) on this
    rank."""
    engine, layout = build(rank, world, {"strategy": "ddp"}, precision=precision)
    task, out = engine.fns.task, []
    loss = task.loss

    def infinite(model, batch):
        loss_sum, samples = loss(model, batch)
        if grads == "finite":  # a sum that overflowed after the terms the gradients flow through
            return loss_sum + torch.tensor(float("inf")), samples
        return loss_sum * float("inf"), samples
    for step in range(3):
        task.loss = infinite if step == 1 and rank == 1 else loss
        stats = engine.train_step(step, my_micro_batches(step, layout, rank))
        out.append((stats.finite, stats.overflow))
    return out


@pytest.mark.parametrize("precision,grads", [("fp16", "infinite"), ("fp32", "infinite"), ("fp32", "finite")])
def test_every_rank_calls_a_step_with_one_ranks_non_finite_loss_alike(precision, grads):
    """The ranks must take the same branch after such a step: under fp16 rank 0 once called it an
    overflow (skipped, the scale lowered) while rank 1 took the non-finite loss's policy (a rollback's
    collectives, which rank 0 never entered). With finite gradients everywhere, rank 0 applied the step
    and rank 1 skipped it: the replicas diverged. Now both call it a non-finite loss."""
    ranks = spawn(2, _one_rank_overflows_its_loss, precision, grads)
    assert ranks[0] == ranks[1] == [(True, False), (False, False), (True, False)]


def _fp16_norms(rank: int, world: int, parallelism: dict) -> list[float]:
    """Three fp16 steps' global grad norms of the test gpt under `parallelism`."""
    engine, layout = build(rank, world, parallelism, precision="fp16")
    return [engine.train_step(step, my_micro_batches(step, layout, rank)).grad_norm for step in range(3)]


def test_fp16_pipeline_stages_sharded_by_fsdp_train_as_one_rank():
    """Autocast's cast copies of the weights lived across a whole pipeline schedule, while FSDP freed and
    gathered each stage's weights between micro-batches: a cached copy of a freed weight kept the later
    micro-batches' gradients from it, and every step's grad norm read 0.73x one rank's (fp16, and any
    autocast precision, under pipeline x FSDP). Now the schedule runs without the cache."""
    one = spawn(1, _fp16_norms, {})[0]
    for got in spawn(2, _fp16_norms, {"strategy": "fsdp", "pipeline": 2}):
        assert rel(one, got) < 1e-4, (one, got)


def _replicas_after_dropout(rank: int, world: int) -> float:
    """Three steps of a planned stack with dropout under tensor parallelism, each seeded as the runtime seeds
    it; the largest difference of a replicated parameter between the two tensor-parallel ranks."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from openclaw.engine.state import seed_step
    engine, layout = build(rank, world, {"strategy": "ddp", "tensor": 2}, model_name="user_models:drop_stack")
    for step in range(3):
        seed_step(0, step, layout.dp_rank(rank))  # runtime.attempt: by data-parallel rank
        engine.train_step(step, my_micro_batches(step, layout, rank))
    worst = 0.0
    for p in engine.model.parameters():
        if isinstance(p, DTensor) and any(placement.is_shard() for placement in p.placements):
            continue  # split by the plan: differs by design
        mine = (p.to_local() if isinstance(p, DTensor) else p).detach().clone()
        rank0 = mine.clone()
        dist.broadcast(rank0, src=0)
        worst = max(worst, (mine - rank0).abs().max().item())
    return worst


def test_tensor_parallel_peers_draw_the_same_dropout_and_their_replicated_weights_stay_equal():
    """Seeded by their own ranks, the peers drew different masks on activations that are one model's: the
    embedding, the norms and the row-wise biases (replicated) drifted apart, 1e-2 in three steps, and each
    rank clipped with its own norm."""
    assert spawn(2, _replicas_after_dropout) == [0.0, 0.0]
