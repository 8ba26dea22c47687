"""The policies that return decisions, as pure functions: failure budgets and non-finite losses."""
import numpy as np
import pytest

from openclaw.data.sampler import Sampler
from openclaw.engine.state import TrainState
from openclaw.runtime.policies import (Fail, FailureCounts, GiveUp, Retry, Rollback, Skip, failure_decision,
                                       nonfinite_decision)

LIMITS = {"max_failures": 3, "max_preemptions": -1, "max_same_error": 2}


def _run(events, **limits):
    counts, out = FailureCounts(), []
    for preempted, error in events:
        decision = failure_decision(counts, preempted, error, **{**LIMITS, **limits})
        out.append(decision)
        if isinstance(decision, GiveUp):
            break
        counts = decision.counts
    return out


def test_preemptions_never_spend_the_failure_budget():
    decisions = _run([(True, "WorkerPreempted: SIGTERM")] * 50, max_failures=0)
    assert len(decisions) == 50 and all(isinstance(d, Retry) for d in decisions)
    assert decisions[-1].counts.preemptions == 50 and decisions[-1].counts.failures == 0


def test_a_preemption_budget_when_one_is_set():
    decisions = _run([(True, "SIGTERM")] * 3, max_preemptions=2)
    assert [type(d) for d in decisions] == [Retry, Retry, GiveUp]
    assert "`failure.max_preemptions` (2)" in decisions[-1].message


def test_the_same_error_twice_in_a_row_gives_up_at_once():
    decisions = _run([(False, "ZeroDivisionError: division by zero")] * 5)
    assert [type(d) for d in decisions] == [Retry, GiveUp]
    assert "same error in 2 attempts in a row" in decisions[-1].message and "ZeroDivisionError" in decisions[-1].message


def test_different_errors_spend_max_failures_and_a_preemption_breaks_a_run_of_errors():
    decisions = _run([(False, "a"), (True, "p"), (False, "a"), (False, "b"), (False, "c")])
    assert [type(d) for d in decisions] == [Retry, Retry, Retry, Retry, GiveUp]
    assert "more than `failure.max_failures` (3)" in decisions[-1].message
    assert _run([(False, "x")] * 9, max_failures=-1, max_same_error=0)[-1].counts.failures == 9  # no limit at all


def test_a_config_error_in_a_worker_gives_up_at_once_even_with_no_limits():
    """A ConfigError a worker raises (a model the strategy cannot split) fails every retry alike."""
    decision = failure_decision(FailureCounts(), False, "ConfigError: `parallelism.tensor` (2) needs a model...",
                                max_failures=-1, max_preemptions=-1, max_same_error=0, final=True)
    assert isinstance(decision, GiveUp) and decision.message.startswith("a retry would fail alike")
    assert isinstance(failure_decision(FailureCounts(), False, "ValueError: x", max_failures=-1, max_preemptions=-1,
                                       max_same_error=0, final=False), Retry)


class RestartingState:  # what the controller callbacks read of Ray Train's controller state
    def __init__(self, error):
        self.training_failed_error = error


def test_a_nonfinite_loss_under_fail_ends_the_run_at_once_and_a_spent_preemption_budget_says_so():
    """A NonFiniteLossError (`on_nonfinite_loss: fail`) was retried as any failure: the replay from the
    checkpoint met the same NaN, twice with the defaults, for ever with no limits. And a spent preemption
    budget ended the run with the preemption's own message, which says the run resumes."""
    from ray.train.v2.api.exceptions import WorkerGroupError

    from openclaw.errors import MemoryBudgetError, NonFiniteLossError, WorkerPreempted
    from openclaw.runtime.controller_callbacks import FailureBudget
    for final in (NonFiniteLossError("non-finite loss at global step 7"), MemoryBudgetError("no micro-batch fits")):
        budget = FailureBudget(max_failures=-1, max_preemptions=-1, max_same_error=0)
        with pytest.raises(Exception) as ended:  # at the first failure, with no limits
            budget.after_controller_state_update(None, RestartingState(WorkerGroupError("failed", {0: final})))
        assert ended.value.controller_failure is final
    budget = FailureBudget(max_failures=-1, max_preemptions=1, max_same_error=0)
    preempted = [WorkerGroupError("failed", {0: WorkerPreempted("a training worker got SIGTERM; resuming")})
                 for _ in range(2)]
    budget.after_controller_state_update(None, RestartingState(preempted[0]))
    with pytest.raises(Exception) as ended:
        budget.after_controller_state_update(None, RestartingState(preempted[1]))
    assert "more than `failure.max_preemptions` (1)" in str(ended.value)


def test_a_failed_start_is_counted_once_however_often_the_controller_sets_its_state():
    """Ray's controller sets the same state again on every pass while it waits for resources: the progress
    said 'worker group start failed (N so far)' with N climbing every pass."""
    from types import SimpleNamespace

    from openclaw.runtime.controller_callbacks import ReportStartFailures

    class WorkerGroupStartupTimeoutError(Exception):
        pass
    lines: list[str] = []  # the progress queue's actor, as `put_nowait` calls it
    progress = SimpleNamespace(actor=SimpleNamespace(put_nowait=SimpleNamespace(
        remote=lambda line: lines.append(line["message"]))))
    report, state = ReportStartFailures(progress), RestartingState(WorkerGroupStartupTimeoutError("no resources"))
    for _ in range(5):
        report.after_controller_state_update(None, state)
    report.after_controller_state_update(None, RestartingState(WorkerGroupStartupTimeoutError("again")))
    assert len(lines) == 2 and "(2 so far)" in lines[-1], lines


def test_nonfinite_policy_decisions():
    batch = (0, 56, 64)
    assert isinstance(nonfinite_decision("fail", 7, 1e-3, batch), Fail) and "global step 7" in nonfinite_decision(
        "fail", 7, 1e-3, batch).message
    assert nonfinite_decision("skip", 7, 1e-3, batch) == Skip(7, batch)
    assert nonfinite_decision("rollback", 7, 1e-3, batch) == Rollback(7, batch)


def _walk(state: TrainState, sampler: Sampler, until: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The loop's walk over the data from `state` to step `until`: (batches trained, batches skipped)."""
    trained, skipped = [], []
    while state.step < until:
        positions, epoch, offset = sampler.global_batch_at(state.epoch, state.offset)
        skip = state.skips(state.step, epoch, offset, offset + len(positions))
        (skipped if skip else trained).append(positions)
        state.advance(epoch, offset, len(positions))
    return trained, skipped


def test_a_skipped_batch_stays_skipped_when_a_resize_changes_the_batch_each_step_reads():
    """Under `elastic.on_resize: scale_lr` the global batch follows the world size, so a global step reads
    other samples after a resize. A skipped batch was kept as its step number: a restart at half the world
    that resumed before it skipped the batch its step number now reads (innocent samples), and trained on
    the samples that made the loss non-finite (another rollback). The samples are kept, and every batch
    that holds one of them is skipped."""
    rows = 96
    big = Sampler(rows, 16, 4, seed=3)
    state = TrainState()
    _walk(state, big, until=2)
    checkpoint = state.state_dict()  # saved at step 2, before the bad batch
    positions, epoch, offset = big.global_batch_at(state.epoch, state.offset)
    bad = set(positions.tolist())
    state.load_state_dict(state.with_skipped(2, (epoch, offset, offset + len(positions))))
    assert state.skips(2, epoch, offset, offset + 16)

    # a node is lost: the run resumes from step 2's checkpoint at half the world, half the global batch
    resumed = TrainState()
    resumed.load_state_dict({**checkpoint, **state.with_skipped(2, (epoch, offset, offset + 16))})
    trained, skipped = _walk(resumed, Sampler(rows, 8, 4, seed=3), until=5)
    assert not bad & set(np.concatenate(trained).tolist())  # no bad sample trained on
    assert set(np.concatenate(skipped).tolist()) == bad  # and nothing else left out
    assert len(trained) == 1 and resumed.samples_seen == checkpoint["samples_seen"] + 3 * 8


def test_a_checkpoint_from_before_skipped_batches_were_kept_matches_its_skipped_steps_by_step():
    state = TrainState()
    state.load_state_dict({"skipped_steps": [4]})
    assert state.skips(4, 0, 32, 40) and not state.skips(5, 0, 40, 48)
    state.load_state_dict(state.with_skipped(9, (0, 72, 80)))
    assert state.skips(4, 0, 32, 40) and state.skips(9, 0, 72, 80) and state.skipped_steps == [4, 9]


def test_the_same_error_is_its_root_cause_with_its_numbers_left_out():
    """The first worker's message named the failure: an OOM named its free memory, so `max_same_error` never
    fired; while three lost nodes in a row (one fixed 'a training worker died') ended a run whose
    `max_failures` was unlimited. A worker that died (killed, its node lost) is the cluster's doing: the
    rank 0 collective that failed on it is not the cause, and it is bounded by `max_failures` alone."""
    from ray.exceptions import ActorDiedError, RayActorError
    from ray.train.v2.api.exceptions import WorkerGroupError
    from openclaw.runtime.controller_callbacks import FailureBudget

    class RestartingState:  # what the callback reads of Ray Train's controller state
        def __init__(self, error):
            self.training_failed_error = error

    def attempts(per_attempt, **limits) -> int:
        budget = FailureBudget(**{"max_failures": -1, "max_preemptions": -1, "max_same_error": 3, **limits})
        for n, failures in enumerate(per_attempt, 1):
            try:
                budget.after_controller_state_update(None, RestartingState(WorkerGroupError("failed", failures)))
            except Exception:
                return n
        return 0
    peer_died = [{0: RuntimeError(f"[gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.7]:{port}"),
                  1: ActorDiedError()} for port in (41233, 52871, 39110, 60021)]
    assert attempts(peer_died) == 0 and attempts(peer_died, max_failures=2) == 3
    oom = [{0: RuntimeError(f"CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.11 GiB "
                            f"of which {free} GiB is free.")} for free in ("1.23", "1.19", "1.31", "1.25")]
    assert attempts(oom) == 3
    node = RayActorError(error_msg="The actor died unexpectedly before finishing this task.\\nThe actor is dead "
                                   "because its node has died. Node Id: 3f2a")
    assert attempts([{1: node}] * 4) == 0  # a lost node, again and again: the budget is max_failures (-1)
    assert attempts([{1: node}] * 4, max_failures=2) == 3

    # Ray Train's own, for a worker process found dead (matched by name: it is in a private module)
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
    killed = [{0: WorkerHealthCheckFailedError(f"A worker health check failed. Worker {i:032x} is dead.",
                                               failure=RuntimeError("the worker process exited"))}
              for i in range(4)]
    assert attempts(killed, max_failures=3) == 4  # three SIGKILLs survived, as max_failures says


def test_no_failure_budget_gives_up_at_the_first_and_one_same_error_counts_only_an_error():
    """`failure.max_failures: 0` (fail fast) must give up at the first failure, and a failure with no
    error to compare (a lost node) must not count as the same error (`max_same_error: 1` ended the run)."""
    given_up = failure_decision(FailureCounts(), False, "boom", max_failures=0, max_preemptions=-1, max_same_error=0)
    assert isinstance(given_up, GiveUp) and "`failure.max_failures` (0)" in given_up.message
    lost_node = failure_decision(FailureCounts(), False, "node died", key=None, max_failures=-1, max_preemptions=-1,
                                 max_same_error=1)
    assert isinstance(lost_node, Retry) and lost_node.counts.same_error == 0
