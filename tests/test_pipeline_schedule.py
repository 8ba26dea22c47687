"""How many micro-batches a step gives torch's pipeline schedules, checked before any worker starts: the
rule (`ParallelismConfig.schedule_refuses`) against torch's own refusals in a real 2-rank gloo pipeline,
the config's error naming the keys and a count that works, and `auto` micro-batches that only pick
sizes the schedule takes."""
import pytest

from openclaw.config import load_config
from openclaw.engine.memory import choose_micro_batch, micro_batch_sizes
from openclaw.engine.parallel.config import ParallelismConfig
from openclaw.errors import ConfigError, MemoryBudgetError
from parallel_harness import build, my_micro_batches, spawn

MB = 1_000_000
BASE = {"data": {"train": "x"}, "model": {"name": "gpt", "kwargs": {"depth": 4}}, "task": "language_modeling"}


def test_1f1b_needs_one_micro_batch_per_stage_and_interleaved_a_whole_number_of_rounds():
    one_f_one_b = ParallelismConfig(pipeline=4, pipeline_schedule="1f1b")
    assert one_f_one_b.schedule_refuses(3).startswith("1F1B needs at least 4 micro-batches per step")
    assert one_f_one_b.schedule_refuses(4) is None and one_f_one_b.schedule_refuses(7) is None
    interleaved = ParallelismConfig(pipeline=4, pipeline_schedule="interleaved_1f1b")
    # torch's own examples: 4 ranks take 10 micro-batches (2 rounds of 5) and 3 (one round)
    assert interleaved.schedule_refuses(10) is None and interleaved.schedule_refuses(3) is None
    assert "9 is not a whole number of its 2 rounds" in interleaved.schedule_refuses(9)
    assert all(ParallelismConfig(pipeline=4, pipeline_schedule="gpipe").schedule_refuses(n) is None for n in (1, 3, 9))
    assert ParallelismConfig().schedule_refuses(1) is None


def _counts_torch_takes(rank: int, world: int, schedule: str) -> dict[int, str | None]:
    """One step of each count of micro-batches on a 2-stage pipeline: None where torch's schedule ran it,
    else its error."""
    engine, layout = build(rank, world, {"strategy": "ddp", "pipeline": 2, "pipeline_schedule": schedule})
    batches = my_micro_batches(0, layout, rank) + my_micro_batches(1, layout, rank)
    out: dict[int, str | None] = {}
    for n in (1, 2, 3, 5, 6):
        try:
            engine.train_step(n, batches[:n])
            out[n] = None
        except ValueError as e:
            out[n] = str(e)
    return out


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved_1f1b"])
def test_the_rule_refuses_exactly_what_torch_refuses(schedule):
    got = spawn(2, _counts_torch_takes, schedule)[0]
    rule = ParallelismConfig(pipeline=2, pipeline_schedule=schedule)
    assert {n: err is None for n, err in got.items()} == {n: rule.schedule_refuses(n) is None for n in got}, got
    assert any(err is not None for err in got.values())  # each schedule refuses one of these counts


def _evaluation(rank: int, world: int, parallelism: dict) -> dict[str, float]:
    """Two training steps, then the engine's evaluation of three micro-batches (forward only)."""
    engine, layout = build(rank, world, parallelism)
    for step in range(2):
        engine.train_step(step, my_micro_batches(step, layout, rank))
    return engine.evaluate(my_micro_batches(5, layout, rank)[:3])


def test_every_schedule_evaluates_and_agrees_with_one_rank():
    """Evaluation passes as many micro-batches through the stages as a training step does (4 here), on the
    step's own schedule, the last pass padded with rows whose targets are ignored: here a whole
    micro-batch of them, and under loss parallelism a split loss of none. (Each 1F1B run through Ray once
    failed at its final evaluation, which ran one micro-batch, fewer than 1F1B's stages.)"""
    one = spawn(1, _evaluation, {"strategy": "ddp"})[0]
    for parallelism in ({"pipeline_schedule": "1f1b"}, {"pipeline_schedule": "gpipe"},
                        {"pipeline_schedule": "interleaved_1f1b"}, {"tensor": 2, "loss_parallel": True}):
        world = 2 * parallelism.get("tensor", 1)
        got = spawn(world, _evaluation, {"strategy": "ddp", "pipeline": 2, **parallelism})
        assert got[0]["count"] == one["count"] == 6, (parallelism, got)
        assert got[0]["loss"] == pytest.approx(one["loss"], rel=1e-5), (parallelism, got[0], one)


def test_a_config_whose_schedule_refuses_its_micro_batches_exits_before_any_worker_starts():
    one_batch = {"parallelism.pipeline": 2, "parallelism.pipeline_schedule": "1f1b", "train.global_batch_size": 32,
                 "train.micro_batch_size": 32, "scaling.min_workers": 2, "scaling.max_workers": 2}
    with pytest.raises(ConfigError, match=r"1F1B needs at least 2 micro-batches per step .* not 1 .* Set "
                                          r"`parallelism.microbatches: 2`"):
        load_config(None, one_batch, base=BASE)
    assert load_config(None, {**one_batch, "parallelism.microbatches": 2}, base=BASE).parallelism.microbatches == 2
    load_config(None, {**one_batch, "parallelism.pipeline_schedule": "gpipe"}, base=BASE)
    # 4 workers, 2 data-parallel ranks: a rank's share is 16, one micro-batch of 16
    with pytest.raises(ConfigError, match=r"not 1 \(a data-parallel rank's 16 samples"):
        load_config(None, {**one_batch, "train.micro_batch_size": 16, "scaling.min_workers": 4,
                           "scaling.max_workers": 4}, base=BASE)
    # `auto` micro-batches: some size must give the schedule its count; a share of 1 sample cannot
    auto = {**one_batch, "train.micro_batch_size": "auto"}
    load_config(None, auto, base=BASE)
    with pytest.raises(ConfigError, match=r"not 1 \(a data-parallel rank's 1 samples"):
        load_config(None, {**auto, "train.global_batch_size": 1}, base=BASE)


def test_auto_picks_only_sizes_the_schedule_takes():
    """A share of 32 (and of 16 at twice the workers) into at least 4 micro-batches: sizes up to 4."""
    rule = ParallelismConfig(pipeline=4, pipeline_schedule="1f1b")
    assert micro_batch_sizes(32, [1, 2]) == [1, 2, 4, 8, 16]
    assert micro_batch_sizes(32, [1, 2], rule.count_suits) == [1, 2, 4]
    fixed = ParallelismConfig(pipeline=4, pipeline_schedule="1f1b", microbatches=4)  # the count is the key's
    assert micro_batch_sizes(32, [1, 2], fixed.count_suits) == [1, 2, 4, 8, 16]


def test_auto_aims_at_four_micro_batches_per_stage_where_the_batch_allows():
    """What `auto` may pick (`auto_counts`): 2 stages on a share of 32, at least 8 micro-batches (sizes up to
    4), where the schedule alone would take 16; the interleaved schedule's two stages per rank, 4 (sizes up
    to 8). A share too small for 4 per stage falls back to what the schedule takes."""
    two = ParallelismConfig(pipeline=2, pipeline_schedule="1f1b")
    assert micro_batch_sizes(32, [1], two.auto_counts(32, [1])) == [1, 2, 4]
    interleaved = ParallelismConfig(pipeline=2, pipeline_schedule="interleaved_1f1b")
    assert micro_batch_sizes(32, [1], interleaved.auto_counts(32, [1])) == [1, 2, 4, 8]
    assert micro_batch_sizes(4, [1], two.auto_counts(4, [1])) == [1, 2]  # 4 or 2 micro-batches: both taken
    assert ParallelismConfig().auto_counts(32, [1])(1)  # no pipeline: any count


# ---- the pipeline_bubble advice rule ---------------------------------------------------------------

def _pipelined(**overrides):
    return load_config(None, {"parallelism.pipeline": 2, "parallelism.pipeline_schedule": "1f1b",
                              "train.global_batch_size": 32, "train.micro_batch_size": 16, "scaling.min_workers": 2,
                              "scaling.max_workers": 2, **overrides}, base=BASE)


def test_the_bubble_is_the_schedules_arithmetic():
    from openclaw.advice.layout_rules import bubble
    assert bubble(4, 4) == pytest.approx(3 / 7) and bubble(4, 4, 2) == pytest.approx(3 / 11)
    assert bubble(2, 9) == pytest.approx(0.1) and bubble(1, 1) == 0


def test_a_pipeline_idle_a_third_of_its_step_gets_four_micro_batches_per_stage():
    """2 stages, 2 micro-batches of 16 per step (1/3 idle): 8 micro-batches of 4 (1/9 idle), a count the
    schedule takes and the batch divides into. On this machine's 2 gloo stages 8 beat both 2 and 16
    (`python bench/parallel_overhead.py --sides ddp,pp-2mb,pp-8mb,pp-16mb`: 43.1, 37.0, 40.5 samples/s)."""
    from openclaw.advice.layout_rules import rule_pipeline_bubble
    from openclaw.advice.rules import Facts
    from openclaw.advice.step_rules import rule_small_micro_batch
    cfg = _pipelined()
    rec = rule_pipeline_bubble(Facts(cfg, accumulation=2))
    assert rec.key == "parallelism.microbatches" and rec.value == 8 and rec.at_stake == pytest.approx(1 / 3)
    assert "runs 2 micro-batch(es) per step: by its arithmetic each stage idles 33%" in rec.finding
    assert "11% idle: up to 1.3x samples/s, with pipeline micro-batches of 4 sample(s)" in rec.effect
    assert "measured" not in rec.finding  # no wait measured: the arithmetic alone
    measured = rule_pipeline_bubble(Facts(cfg, accumulation=2, comm_frac=0.41))
    assert measured.finding.endswith("; measured, a stage waited 41% of the step (transfers included)")
    assert measured.at_stake == rec.at_stake and measured.value == rec.value
    assert _pipelined(**{"parallelism.microbatches": rec.value}).parallelism.microbatches == 8  # a valid change
    # quiet where its fix is in place, without a pipeline, and where the schedule leaves little idle
    assert rule_pipeline_bubble(Facts(_pipelined(**{"parallelism.microbatches": 8}), accumulation=2)) is None
    assert rule_pipeline_bubble(Facts(_pipelined(**{"parallelism.pipeline_schedule": "interleaved_1f1b"}),
                                      accumulation=2)) is None  # 2 stages per rank: 1/5 idle
    assert rule_pipeline_bubble(Facts(load_config(None, {}, base=BASE), accumulation=2)) is None
    # the small-micro-batch rule, whose larger micro-batches would idle the stages longer, stays out of it
    assert rule_small_micro_batch(Facts(cfg, accumulation=2, micro_batch_s=0.0005)) is None


def test_unequally_busy_stages_get_a_split_that_moves_blocks_off_the_busiest():
    """2 stages of 4 blocks each, measured busy 40% and 90% of the step: a block costs 10% (the first
    stage's), the last stage's head and loss 50%. [7, 1] and [6, 2] both leave the busiest at 70%; [6, 2]
    moves fewer blocks. With 2 data-parallel copies each stage's ranks are the median's."""
    from openclaw.advice.facts import facts_from_metrics
    from openclaw.advice.layout_rules import rule_pipeline_imbalance, stage_busy
    from openclaw.advice.rules import Facts
    cfg = _pipelined()
    rec = rule_pipeline_imbalance(Facts(cfg, rank_busy=(0.40, 0.90), model_blocks=8))
    assert rec.key == "parallelism.pipeline_split" and rec.value == [6, 2]
    assert rec.at_stake == pytest.approx(1 - 0.7 / 0.9)
    assert "busy 40%, 90% of the step with [4, 4] blocks each" in rec.finding
    assert "at most about 70%: up to 1.3x samples/s (estimated" in rec.effect
    assert _pipelined(**{"parallelism.pipeline_split": rec.value}).parallelism.pipeline_split == [6, 2]
    four = _pipelined(**{"scaling.min_workers": 4, "scaling.max_workers": 4, "train.micro_batch_size": 8})
    assert stage_busy(Facts(four, rank_busy=(0.40, 0.44, 0.90, 0.86))) == pytest.approx([0.42, 0.88])
    # from a window's per-rank split (the final metrics): data + compute (net of the wait), the wait measured
    window = {"step": 50, "perf/rank0/data_frac": 0.05, "perf/rank0/compute_frac": 0.35, "perf/rank0/comm_frac": 0.55,
              "perf/rank1/data_frac": 0.0, "perf/rank1/compute_frac": 0.90, "perf/rank1/comm_frac": 0.05}
    assert facts_from_metrics(cfg, window).rank_busy == pytest.approx((0.40, 0.90))
    assert facts_from_metrics(cfg, {**window, "perf/rank1/comm_frac": float("nan")}).rank_busy is None
    # quiet: balanced stages, the split already the model's best, two stages per rank, nothing measured
    assert rule_pipeline_imbalance(Facts(cfg, rank_busy=(0.50, 0.55), model_blocks=8)) is None
    best = _pipelined(**{"parallelism.pipeline_split": [7, 1]})
    assert rule_pipeline_imbalance(Facts(best, rank_busy=(0.35, 0.90), model_blocks=8)) is None
    assert rule_pipeline_imbalance(Facts(cfg, model_blocks=8)) is None


def test_interleaved_ranks_unequally_busy_get_a_split_over_their_two_stages_each():
    """Interleaved 1F1B on 2 ranks: 4 stages of 2 blocks, rank 0 running stages 0 and 2, rank 1 stages 1
    and 3 (the last). Measured busy 40% and 90%: a block costs 10% (rank 0's 4 blocks), the last stage's
    head and loss 50%. Rank 1 needs a block in each of its stages, so the best is 6 and 2 blocks by rank,
    busiest 70%: [3, 1, 3, 1]. At 4 ranks (8 stages of 2 blocks, 16 blocks), the last rank is left 2."""
    from openclaw.advice.layout_rules import rule_pipeline_imbalance
    from openclaw.advice.rules import Facts
    interleaved = _pipelined(**{"parallelism.pipeline_schedule": "interleaved_1f1b"})
    rec = rule_pipeline_imbalance(Facts(interleaved, rank_busy=(0.40, 0.90), model_blocks=8))
    assert rec.key == "parallelism.pipeline_split" and rec.value == [3, 1, 3, 1]
    assert rec.at_stake == pytest.approx(1 - 0.7 / 0.9)
    assert "ranks are busy 40%, 90% of the step, each running 2 of the stages of [2, 2, 2, 2] blocks" in rec.finding
    assert "ranks busy at most about 70%: up to 1.3x samples/s (estimated" in rec.effect
    assert _pipelined(**{"parallelism.pipeline_schedule": "interleaved_1f1b",
                         "parallelism.pipeline_split": rec.value}).parallelism.pipeline_split == [3, 1, 3, 1]
    four = _pipelined(**{"parallelism.pipeline": 4, "parallelism.pipeline_schedule": "interleaved_1f1b",
                         "scaling.min_workers": 4, "scaling.max_workers": 4, "train.micro_batch_size": 8})
    # 4 blocks a rank, 5% each; the last rank's head and loss 40%: 2 blocks there (50%), 14 over the others
    rec = rule_pipeline_imbalance(Facts(four, rank_busy=(0.20, 0.20, 0.20, 0.60), model_blocks=16))
    assert rec.value == [3, 3, 2, 1, 2, 2, 2, 1] and sum(rec.value) == 16
    assert [sum(rec.value[r::4]) for r in range(4)] == [5, 5, 4, 2]
    assert rec.at_stake == pytest.approx(1 - 0.50 / 0.60)
    # quiet: balanced ranks; the split already the model's best
    assert rule_pipeline_imbalance(Facts(interleaved, rank_busy=(0.50, 0.55), model_blocks=8)) is None
    best = _pipelined(**{"parallelism.pipeline_schedule": "interleaved_1f1b", "parallelism.pipeline_split": [3, 1, 3, 1]})
    assert rule_pipeline_imbalance(Facts(best, rank_busy=(0.60, 0.70), model_blocks=8)) is None


# ---- the activations a schedule keeps in flight ------------------------------------------------------

def _peak_forwards_in_flight(ops) -> int:
    """The most forwards whose backward has not yet run, along one rank's list of torch's actions."""
    from torch.distributed.pipelining.schedules import _ComputationType
    held = peak = 0
    for op in ops:
        if op is not None and op.computation_type == _ComputationType.FORWARD:
            held += 1
        elif op is not None and op.computation_type == _ComputationType.FULL_BACKWARD:
            held -= 1
        peak = max(peak, held)
    return peak


def _torch_order(schedule: str, stages: int, n: int, rank: int):
    """One rank's actions in torch's 1F1B or interleaved 1F1B (two stages per rank) over `n` micro-batches:
    its own order-building methods, on an instance given only what they read."""
    from torch.distributed.pipelining.schedules import Schedule1F1B, ScheduleInterleaved1F1B
    if schedule == "1f1b":
        one = object.__new__(Schedule1F1B)
        one._num_stages, one._n_microbatches = stages, n
        return one._get_pipeline_order()[rank]
    interleaved = object.__new__(ScheduleInterleaved1F1B)
    interleaved.pp_group_size, interleaved.n_local_stages, interleaved._n_microbatches = stages, 2, n
    interleaved.number_of_rounds = max(1, n // stages)
    interleaved.microbatches_per_round = n // interleaved.number_of_rounds
    return interleaved._calculate_single_rank_operations(rank)


def test_the_activations_held_in_flight_follow_each_schedule_on_every_rank_up_to_8_stages():
    """GPipe holds every micro-batch's forward on each stage; 1F1B and interleaved 1F1B what torch's own
    action order for each rank keeps (checked for every rank of 2 to 8 stages and every count each takes
    up to 48). The busiest rank's share of one micro-batch's activations: its forwards in flight, each
    1 / (stages x stages per rank) of the layers; the first rank's where the stages are even."""
    for stages in range(2, 9):
        for n in range(1, 49):
            gpipe = ParallelismConfig(pipeline=stages, pipeline_schedule="gpipe")
            assert gpipe.held_fraction(n) == n / stages
            for name in ("1f1b", "interleaved_1f1b"):
                cfg = ParallelismConfig(pipeline=stages, pipeline_schedule=name)
                if cfg.schedule_refuses(n) is None:
                    peaks = [_peak_forwards_in_flight(_torch_order(name, stages, n, r)) for r in range(stages)]
                    assert [cfg.in_flight(n, r) for r in range(stages)] == peaks, (name, stages, n)
                    assert cfg.held_fraction(n) == peaks[0] / (stages * cfg.stages_per_rank)
    assert ParallelismConfig(pipeline=4).held_fraction(4) == 1.0 and ParallelismConfig().held_fraction(7) == 1.0


def test_the_busiest_rank_is_the_one_whose_stages_hold_the_most_in_flight():
    """Pure: each rank's forwards in flight times the largest share of its stages. GPipe keeps all `n`
    on every rank, so the heaviest stage decides: a last stage with large logits (half the activations
    on 2 of 4 stages) holds twice an even quarter. 1F1B keeps fewer on later ranks: 4 stages, 8
    micro-batches, the last holding 40%, keeps 1 of them (0.4) while the first keeps 4 x 20% (0.8).
    Interleaved: a rank's two stages, the larger counted for each of its forwards."""
    from openclaw.engine.parallel.layout_checks import stage_activation_shares
    heavy_last = [0.2, 0.2, 0.2, 0.4]
    gpipe = ParallelismConfig(pipeline=4, pipeline_schedule="gpipe")
    assert gpipe.held_fraction(8, heavy_last) == pytest.approx(8 * 0.4) and gpipe.held_fraction(8) == 8 / 4
    assert ParallelismConfig(pipeline=4).held_fraction(8, heavy_last) == pytest.approx(4 * 0.2)
    assert ParallelismConfig(pipeline=4).held_fraction(8, [0.1, 0.1, 0.1, 0.7]) == pytest.approx(0.7)
    interleaved = ParallelismConfig(pipeline=2, pipeline_schedule="interleaved_1f1b")
    # rank 0 holds stages 0 and 2 (5 forwards in flight at n=4), rank 1 stages 1 and 3 (3)
    assert [interleaved.in_flight(4, r) for r in (0, 1)] == [5, 3]
    assert interleaved.held_fraction(4, [0.1, 0.2, 0.3, 0.4]) == pytest.approx(max(5 * 0.3, 3 * 0.4))
    # the shares: blocks by stage (even, or `pipeline_split`), the first stage's ends, all the rest on the
    # last, and each stage's output it keeps for its backward (the next stage's first block's input)
    assert stage_activation_shares([10] * 4, 0, 0, 2) == [0.5, 0.5]
    assert stage_activation_shares([10] * 4, 4, 36, 2) == pytest.approx([24 / 80, 56 / 80])
    assert stage_activation_shares([10] * 4, 0, 0, 2, [3, 1]) == [0.75, 0.25]
    assert stage_activation_shares([10] * 4, 0, 0, 2, None, [1, 2, 5, 7]) == pytest.approx([25 / 45, 20 / 45])
    assert stage_activation_shares([0] * 4, 0, 0, 2) is None


def test_auto_micro_batches_count_what_the_schedule_keeps_not_one_micro_batch():
    """A 64-sample share on 2 stages, fp32 state of 100 MB and 3 MB of whole-model activations per sample,
    a budget for 19 samples' worth. One micro-batch's worth alone would allow 16, but GPipe keeps all of a
    step's forwards, 32 samples' worth at any size: no size fits, and the error says so. 1F1B keeps 2 of 2
    stages' halves in flight: 16. Interleaved keeps 5 forwards of quarter models, 20 samples' worth at 16
    (4 micro-batches): 8."""
    fixed, per, budget = 100 * MB, 3 * MB, 100 * MB + 19 * 3 * MB

    def choose(schedule: str):
        cfg = ParallelismConfig(pipeline=2, pipeline_schedule=schedule)
        return choose_micro_batch(budget, fixed, per, 64, [1], count_suits=cfg.count_suits,
                                  activation_samples=cfg.activation_samples(64))
    assert choose_micro_batch(budget, fixed, per, 64, [1]).size == 16
    assert choose("1f1b").size == 16
    interleaved = choose("interleaved_1f1b")
    assert interleaved.size == 8 and interleaved.estimate_bytes == fixed + 10 * per
    with pytest.raises(MemoryBudgetError, match="even a micro-batch of 1 needs an estimated 0.196 GB"):
        choose("gpipe")
    # A fixed count of pipeline micro-batches: the step's share runs in those, whatever the size.
    fixed_count = ParallelismConfig(pipeline=2, pipeline_schedule="gpipe", microbatches=4).activation_samples(64)
    assert {fixed_count(m) for m in (1, 8, 64)} == {32.0}


def test_the_probe_estimates_a_pipeline_by_its_schedule_and_each_stages_share(text_dir):
    """The probe on the text gpt, 2 stages, one data-parallel rank, a 256-token vocabulary on a 32-wide
    model: the last stage holds the logits and the loss's log-probabilities (64 x 256 fp32 each per
    sample), more than half the activations. GPipe keeps the step's 8 micro-batches on both ranks, so the
    last's share of each decides (an even half under-counted it); 1F1B keeps 2 on the first rank and 1
    on the last, the larger of 2 x its share and 1 x the last's."""
    import torch

    from openclaw.data.sources import resolve
    from openclaw.data.stream import ShardedData, shard_specs
    from openclaw.engine.precision import choose_precision, device_facts
    from openclaw.engine.tasks import build_task
    from openclaw.runtime.micro_batch_probe import _ProbeStep, probe
    src = resolve(str(text_dir / "train"), "data.train")
    data = ShardedData(src.spec, shard_specs(src.shards), "x", None)
    fp32 = choose_precision("fp32", device_facts(torch.device("cpu")))
    got, shares = {}, {}
    for schedule in ("1f1b", "gpipe"):
        cfg = load_config(None, {**BASE, "data": {"train": str(text_dir / "train"), "features": "x", "label": None},
                                 "model": {"name": "gpt", "kwargs": {"vocab_size": 256, "block_size": 64, "dim": 32,
                                                                     "depth": 2, "heads": 2}},
                                 "parallelism": {"pipeline": 2, "pipeline_schedule": schedule},
                                 "scaling": {"min_workers": 2, "max_workers": 2}, "train.global_batch_size": 32,
                                 "train.micro_batch_size": "auto", "train.memory_budget_gb": 4.0})
        counts = cfg.parallelism.auto_counts(32, [1])
        got[schedule], _, _, _ = probe(cfg, torch.device("cpu"), data, fp32, [1], counts, 1)
        shares[schedule] = _ProbeStep(cfg, build_task(cfg.task), data, torch.device("cpu"), fp32,
                                      fake=True).stage_shares(4)
    one, all_of_it = got["1f1b"], got["gpipe"]
    assert one.size == 4 and all_of_it.size == 4  # 8 micro-batches per step: 4 per stage
    per = one.activation_bytes_per_sample
    assert per == all_of_it.activation_bytes_per_sample > 0
    first, last = shares["gpipe"]
    assert shares["1f1b"] == shares["gpipe"] and first + last == pytest.approx(1)
    assert last * per >= 2 * 64 * 256 * 4 and last > 0.5 > first
    assert one.estimate_bytes - one.fixed_bytes == pytest.approx(4 * max(2 * first, last) * per, abs=1)
    assert all_of_it.estimate_bytes - all_of_it.fixed_bytes == pytest.approx(32 * last * per, abs=1)
    assert all_of_it.estimate_bytes - all_of_it.fixed_bytes > 32 / 2 * per  # what an even half counted
