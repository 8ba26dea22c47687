"""The policies that return decisions, as pure functions: failure budgets and non-finite losses."""
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
                                max_failures=-1, max_preemptions=-1, max_same_error=0, config_error=True)
    assert isinstance(decision, GiveUp) and decision.message.startswith("the config cannot work")
    assert isinstance(failure_decision(FailureCounts(), False, "ValueError: x", max_failures=-1, max_preemptions=-1,
                                       max_same_error=0, config_error=False), Retry)


def test_nonfinite_policy_decisions():
    assert isinstance(nonfinite_decision("fail", 7, 1e-3), Fail) and "global step 7" in nonfinite_decision(
        "fail", 7, 1e-3).message
    assert nonfinite_decision("skip", 7, 1e-3) == Skip(7) and nonfinite_decision("rollback", 7, 1e-3) == Rollback(7)
