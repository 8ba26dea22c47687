"""The sample order is pure math: tested at topologies no test cluster could run."""
import numpy as np
import pytest

from openclaw.data.sampler import (Sampler, accumulation_steps, epoch_order, position_of, shard_windows, steps_per_epoch,
                              window_bounds, worker_slice)


def test_epoch_order_is_a_pure_permutation_of_seed_and_epoch():
    a, b = epoch_order(7, 3, 1000), epoch_order(7, 3, 1000)
    assert np.array_equal(a, b) and sorted(a) == list(range(1000))
    assert not np.array_equal(a, epoch_order(7, 4, 1000)) and not np.array_equal(a, epoch_order(8, 3, 1000))


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8, 16, 64])
def test_worker_slices_partition_each_global_batch(world):
    n, g, micro = 10_000, 192 if world != 64 else 128, 2
    assert g % (micro * world) == 0
    samplers = [Sampler(n, g, micro, seed=1, world_size=world, rank=r) for r in range(world)]
    for step in (0, 1, 17, 51):
        parts = [np.concatenate(s.micro_batches(step)) for s in samplers]
        assert np.array_equal(np.concatenate(parts), samplers[0].global_batch(step))
        assert all(len(m) == micro for s in samplers for m in s.micro_batches(step))


def test_every_position_exactly_once_per_epoch():
    n, g = 1000, 64
    s = Sampler(n, g, 16, seed=0)
    spe = steps_per_epoch(n, g)
    seen = np.concatenate([s.global_batch(step) for step in range(spe)])
    assert len(seen) == len(set(seen.tolist())) == spe * g
    assert position_of(spe, n, g).epoch == 1 and position_of(spe, n, g).offset == 0


def test_resizes_3_to_5_to_2_continue_with_exactly_the_next_samples():
    n, g, micro = 6000, 120, 4   # 120 = 4 x {3: 10, 5: 6, 2: 15}
    consumed = []
    schedule = [(3, range(0, 11)), (5, range(11, 29)), (2, range(29, 50))]
    for world, steps in schedule:
        workers = [Sampler(n, g, micro, seed=5, world_size=world, rank=r) for r in range(world)]
        for step in steps:
            consumed.append(np.concatenate([np.concatenate(w.micro_batches(step)) for w in workers]))
    reference = Sampler(n, g, g, seed=5)
    assert all(np.array_equal(c, reference.global_batch(i)) for i, c in enumerate(consumed))
    flat = np.concatenate(consumed)
    assert len(set(flat.tolist())) == len(flat)  # 50 steps < one epoch (6000 // 120): no repeats


def test_accumulation_and_slices():
    assert accumulation_steps(64, 16, 2) == 2 and accumulation_steps(64, 8, 1) == 8
    with pytest.raises(ValueError):
        accumulation_steps(64, 16, 3)
    assert worker_slice(64, 4, 3) == slice(48, 64)
    with pytest.raises(ValueError):
        worker_slice(64, 4, 4)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        steps_per_epoch(10, 64)


def test_batch_plan_keeps_the_global_batch_or_scales_the_lr():
    from openclaw.runtime.policies import batch_plan
    keep = batch_plan("keep_global_batch", "linear", 64, 16, 2, 1)
    assert (keep.global_batch_size, keep.accumulation, keep.lr_factor) == (64, 4, 1.0)
    lin = batch_plan("scale_lr", "linear", 96, 8, 4, 3)   # 24 samples per worker, as at 4 workers
    assert (lin.global_batch_size, lin.accumulation, lin.lr_factor) == (72, 3, 0.75)
    sq = batch_plan("scale_lr", "sqrt", 96, 8, 4, 1)
    assert (sq.global_batch_size, sq.accumulation) == (24, 3) and sq.lr_factor == pytest.approx(0.5)
    assert batch_plan("scale_lr", "sqrt", 96, 8, 4, 4).lr_factor == 1.0


def test_scale_lr_resizes_change_the_batch_but_never_repeat_or_drop_a_sample_in_an_epoch():
    from openclaw.runtime.policies import batch_plan
    n, g, micro, max_w = 1000, 120, 10, 4
    epoch, offset, by_epoch = 0, 0, {}
    for world, steps in [(4, 3), (2, 5), (3, 4), (1, 9), (4, 6)]:   # crosses into epoch 1 and beyond
        plan = batch_plan("scale_lr", "linear", g, micro, max_w, world)
        workers = [Sampler(n, plan.global_batch_size, micro, seed=3, world_size=world, rank=r) for r in range(world)]
        for _ in range(steps):
            taken = []
            for w in workers:
                positions, e, o = w.global_batch_at(epoch, offset)
                taken.append(np.concatenate(w.split(positions)))
            assert len(np.concatenate(taken)) == plan.global_batch_size
            by_epoch.setdefault(e, []).append(np.concatenate(taken))
            epoch, offset = e, o + plan.global_batch_size
    for e, parts in by_epoch.items():
        seen = np.concatenate(parts)
        assert len(set(seen.tolist())) == len(seen)                        # nothing twice in an epoch
        assert np.array_equal(seen, epoch_order(3, e, n)[:len(seen)])      # exactly the next samples
    assert len(by_epoch) >= 2


def test_windowed_order_is_a_permutation_that_stays_within_its_windows():
    rows = [100, 37, 250, 80, 80, 1, 120, 64, 99, 10]  # 10 shards of uneven sizes
    starts = np.concatenate([[0], np.cumsum(rows)])
    n = int(starts[-1])
    order = epoch_order(5, 2, n, rows, window_shards=3)
    assert np.array_equal(np.sort(order), np.arange(n))                       # every sample once
    assert np.array_equal(order, epoch_order(5, 2, n, rows, window_shards=3))  # pure
    assert not np.array_equal(order, epoch_order(5, 3, n, rows, window_shards=3))
    windows = shard_windows(5, 2, len(rows), 3)
    assert [len(w) for w in windows] == [3, 3, 3, 1]
    bounds = window_bounds(rows, windows)
    shard_of = np.searchsorted(starts, order, side="right") - 1
    for k, w in enumerate(windows):  # the samples of window k come only from its shards
        assert set(shard_of[bounds[k]:bounds[k + 1]]) == set(w.tolist())
    # a window covering every shard is the plain whole-dataset permutation
    assert np.array_equal(epoch_order(5, 2, n, rows, window_shards=10), epoch_order(5, 2, n))


def test_windowed_resize_continues_with_exactly_the_next_samples_and_prefetches_the_next_window():
    rows = [64] * 12
    n, G = sum(rows), 96
    seen, epoch, offset = [], 0, 0
    for world, steps in ((3, 2), (2, 2), (4, 3)):  # 3 -> 2 -> 4 workers, resuming from the saved position
        samplers = [Sampler(n, G, 8, 11, world, r, rows, 4) for r in range(world)]  # 96 = 8 x 12
        for _ in range(steps):
            parts = []
            for s in samplers:
                batch, epoch, offset_now = s.global_batch_at(epoch, offset)
                parts.append(np.concatenate(s.split(batch)))
            seen.append(np.concatenate(parts))
            offset = offset_now + G
    seen = np.concatenate(seen)
    assert np.array_equal(seen, epoch_order(11, 0, n, rows, 4)[:len(seen)])
    s = Sampler(n, G, 8, 11, 1, 0, rows, 4)
    windows = shard_windows(11, 0, len(rows), 4)
    assert np.array_equal(s.next_window_shards(0, 0), windows[1])
    assert np.array_equal(s.next_window_shards(0, n - 1), shard_windows(11, 1, len(rows), 4)[0])


@pytest.mark.parametrize("world,micro", [(1, 8), (4, 8), (64, 2), (16, 4)])
def test_micro_batch_starts_name_the_same_micro_batches_at_any_world_size(world, micro):
    """Each rank's micro-batches start where the one-rank run's do (the seeds of their dropout,
    `engine.state.micro_batch_seed`), every one once, in the rank's order."""
    from openclaw.data.sampler import micro_batch_starts
    starts = [micro_batch_starts(128, world, rank, micro) for rank in range(world)]
    assert [s for mine in starts for s in mine] == list(range(0, 128, micro))
    assert all(len(mine) == 128 // world // micro for mine in starts)
    sampler = Sampler(1000, 128, micro, seed=0, world_size=world, rank=world - 1)
    positions = sampler.global_batch(3)
    assert [list(m) for m in sampler.split(positions)] == [list(positions[s:s + micro]) for s in sampler.micro_starts]


def test_a_resume_over_the_same_rows_cut_into_other_shards_is_refused_where_the_order_follows_them():
    """Only the row count was compared: the same 4096 rows prepared again as 16 shards of 256, not 8 of
    512, resumed under a shuffle window and trained on 1280 samples its epoch had already seen."""
    from openclaw.data.sampler import check_same_order, shard_layout
    from openclaw.errors import DataError
    eight, sixteen = [512] * 8, [256] * 16
    saved = {"num_samples": 4096, "shard_layout": shard_layout(eight)}
    check_same_order(saved, 4096, eight, 2, "ckpt")  # the same data
    with pytest.raises(DataError, match="cut into other shards than `data.train` has now \\(16\\)"):
        check_same_order(saved, 4096, sixteen, 2, "ckpt")
    resumed_at = 2048  # the order the saved position meant, and the one it would read now
    before = epoch_order(0, 0, 4096, eight, 2)[:resumed_at]
    after = epoch_order(0, 0, 4096, sixteen, 2)[resumed_at:]
    assert len(set(before) & set(after)) > 1000
    check_same_order(saved, 4096, sixteen, 0, "ckpt")  # without a window the order is the rows' alone
    assert np.array_equal(epoch_order(0, 0, 4096, eight, 0), epoch_order(0, 0, 4096, sixteen, 0))
    check_same_order({"num_samples": 4096}, 4096, sixteen, 2, "ckpt")  # an older checkpoint: not known
    with pytest.raises(DataError, match="trained on 4096 rows but `data.train` now has 4000"):
        check_same_order(saved, 4000, [500] * 8, 2, "ckpt")
    assert shard_layout(eight) != shard_layout([512] * 7 + [511, 1]) and shard_layout(eight) == shard_layout(eight)


def test_a_resume_is_refused_where_the_window_cut_the_order_then_and_cuts_none_now():
    """The layout was compared only where a window cuts the order now: 160 rows trained as 10 shards under
    a window of 8, resumed as 8 shards (no window), were accepted, and the rest of the epoch repeated 45
    samples. An order no window cut is the rows' alone: re-cut, it resumes."""
    from openclaw.data.sampler import check_same_order, order_layout, shard_layout
    from openclaw.errors import DataError
    ten, eight, five = [16] * 10, [20] * 8, [32] * 5
    windowed = {"num_samples": 160, "shard_layout": order_layout(ten, 8)}
    with pytest.raises(DataError, match="cut into other shards than `data.train` has now \\(8\\)"):
        check_same_order(windowed, 160, eight, 8, "ckpt")
    before, after = epoch_order(0, 0, 160, ten, 8)[:80], epoch_order(0, 0, 160, eight, 8)[80:]
    assert len(set(before) & set(after)) > 0  # what the refusal prevents
    whole = {"num_samples": 160, "shard_layout": order_layout(eight, 8)}
    check_same_order(whole, 160, five, 8, "ckpt")  # neither order windowed: the same order
    assert np.array_equal(epoch_order(0, 0, 160, eight, 8), epoch_order(0, 0, 160, five, 8))
    with pytest.raises(DataError, match="cut into other shards"):
        check_same_order(whole, 160, ten, 8, "ckpt")  # windowed now, not then
    older = {"num_samples": 160, "shard_layout": shard_layout(eight)}  # a digest whatever the window
    check_same_order(older, 160, eight, 8, "ckpt")
    check_same_order(older, 160, five, 8, "ckpt")  # re-cut, and no window now: the same order, as before
    with pytest.raises(DataError, match="cut into other shards"):
        check_same_order(older, 160, ten, 8, "ckpt")  # a window cuts it now


def test_each_epoch_cuts_the_shards_into_other_windows_and_the_sampler_follows_it():
    """Two mutants lived: a window order without the epoch in its seed (every epoch the same shards
    together), and a sampler that kept epoch 0's windows (prefetching the wrong shards from epoch 1 on)."""
    first, second = shard_windows(11, 0, 12, 4), shard_windows(11, 1, 12, 4)
    assert [sorted(w.tolist()) for w in first] != [sorted(w.tolist()) for w in second]
    rows = [64] * 12
    sampler = Sampler(sum(rows), 96, 8, 11, 1, 0, rows, 4)
    sampler.windows_at(0, 0)
    assert np.array_equal(sampler.windows_at(1, 0)[0], second[0])


def test_no_two_micro_batches_of_a_run_share_a_seed():
    """`(step * 65537 + start)` gave step 1's first micro-batch the seed of step 0's micro-batch at 65537:
    a global batch above 65,537 samples repeated dropout masks."""
    from openclaw.engine.state import micro_batch_seed
    seeds = {micro_batch_seed(7, step, start) for step in (0, 1, 2, 10**6) for start in (0, 1, 65_537, 2**20, 2**31)}
    assert len(seeds) == 20 and all(0 <= s < 2**63 for s in seeds)


def test_a_pipeline_chunk_draws_from_the_seed_of_the_sample_it_starts_at():
    """A pipeline cuts a rank's micro-batches into its own chunks (`parallelism.microbatches`): each chunk
    is seeded as a micro-batch starting at its first sample would be, cut where `torch.tensor_split` cuts,
    and each stage mixes in its index."""
    import torch

    from openclaw.engine.parallel.pp_stage import chunk_seeds
    from openclaw.engine.state import later_seed, micro_batch_seed, stage_seed
    assert later_seed(micro_batch_seed(3, 5, 40), 7) == micro_batch_seed(3, 5, 47)
    starts = list(range(16, 32, 4))  # a rank's four micro-batches of 4 rows, from sample 16
    seeds = [micro_batch_seed(3, 5, s) for s in starts]
    assert chunk_seeds(seeds, 4, 16, 4) == seeds  # `microbatches: auto`: a chunk per micro-batch
    for chunks in (2, 3, 5):
        cut = [int(c[0]) for c in torch.arange(16).tensor_split(chunks)]
        assert chunk_seeds(seeds, 4, 16, chunks) == [micro_batch_seed(3, 5, 16 + s) for s in cut], chunks
    assert chunk_seeds([], 4, 16, 4) == []
    assert len({stage_seed(s, stage) for s in seeds for stage in range(4)}) == 16
    assert stage_seed(seeds[0], 0) != seeds[0] and stage_seed(seeds[0], 1) != stage_seed(seeds[1], 0)
