"""The sample order is pure math: tested at topologies no test cluster could run."""
import numpy as np
import pytest

from openclaw.sampler import Sampler, accumulation_steps, epoch_order, position_of, steps_per_epoch, worker_slice


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
    from openclaw.sampler import batch_plan
    keep = batch_plan("keep_global_batch", "linear", 64, 16, 2, 1)
    assert (keep.global_batch_size, keep.accumulation, keep.lr_factor) == (64, 4, 1.0)
    lin = batch_plan("scale_lr", "linear", 96, 8, 4, 3)   # 24 samples per worker, as at 4 workers
    assert (lin.global_batch_size, lin.accumulation, lin.lr_factor) == (72, 3, 0.75)
    sq = batch_plan("scale_lr", "sqrt", 96, 8, 4, 1)
    assert (sq.global_batch_size, sq.accumulation) == (24, 3) and sq.lr_factor == pytest.approx(0.5)
    assert batch_plan("scale_lr", "sqrt", 96, 8, 4, 4).lr_factor == 1.0


def test_scale_lr_resizes_change_the_batch_but_never_repeat_or_drop_a_sample_in_an_epoch():
    from openclaw.sampler import batch_plan
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
