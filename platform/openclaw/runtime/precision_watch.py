"""Precision that adapts to the hardware and the run (worker process): fp8 is timed against bf16 once,
fp16's overflowing steps are counted, and so are
bf16's rolled-back non-finite losses; the policies (`runtime.policies.precision_decision`,
`rollback_precision_decision`) say when the run is unstable, and the switch to the safer precision
happens here, at the next checkpoint, so the checkpoint and every later attempt carry it
(`TrainState.precision_switched_to`)."""
from __future__ import annotations

import torch

from openclaw.engine.config import TrainConfig
from openclaw.engine.engine import Engine
from openclaw.engine.metrics import allgather_ints
from openclaw.engine.precision import (PRECISION_ORDER, DeviceFacts, Precision, choose_precision, common_precision,
                                       device_facts)
from openclaw.engine.state import TrainState
from openclaw.runtime.policies import SwitchPrecision, precision_decision, rollback_precision_decision


def agree_on_precision(mine: Precision, facts: DeviceFacts, tf32: bool, device: torch.device, world: int) -> Precision:
    """Collective: the precision every rank trains in (`common_precision` of the ranks' own choices; one
    all-gather). Ranks on different devices may choose differently."""
    names = [PRECISION_ORDER[g[0]] for g in allgather_ints([PRECISION_ORDER.index(mine.name)], device, world)]
    return common_precision(mine, names, facts, tf32)


class PrecisionWatch:
    def __init__(self, engine: Engine, state: TrainState, tracker, cfg: TrainConfig, device: torch.device):
        """After the restore: an earlier attempt's switch is put back in force."""
        self.engine, self.state, self.tracker, self.cfg = engine, state, tracker, cfg
        self.facts = device_facts(device)
        self.pending: SwitchPrecision | None = None
        if state.precision_switched_to and state.precision_switched_to != engine.precision.name:
            engine.set_precision(choose_precision(state.precision_switched_to, self.facts, cfg.tf32))

    def settle_fp8(self, first_step) -> None:
        """fp8, until the run has measured it: timed against bf16 on the first step's micro-batches
        (`Engine.probe_fp8`, which keeps bf16 where fp8 is no faster); a fallback is a switch that every
        later attempt keeps. `first_step()` reads them (this rank's, as the step will)."""
        if self.engine.precision.name != "fp8" or self.state.precision == "fp8":
            return
        timed = self.engine.probe_fp8(first_step())
        if timed is None:
            return
        now = self.engine.precision.name
        self.tracker.event("fp8_probe", step=self.state.step, fp8_s=round(timed[0], 5), bf16_s=round(timed[1], 5),
                           precision=now, layers=len(self.engine.fp8_layers))
        if now != "fp8":
            self.state.precision_switched_to = now

    def announce(self) -> None:
        """Print, log and record the precision when it is new to the run (its first start, or a restart on
        other hardware); the train state keeps it."""
        p = self.engine.precision
        if self.state.precision == p.name:
            return
        self.tracker.progress({"message": f"precision: {p.name} ({p.reason})"})
        self.tracker.params({"resolved/precision": p.name, "resolved/precision_reason": p.reason})
        self.tracker.event("precision", precision=p.name, reason=p.reason, scaler=p.scaler, tf32=p.tf32,
                           step=self.state.step, previous=self.state.precision or None)
        self.state.precision = p.name

    def after_step(self, step: int, overflow: bool) -> None:
        """fp16: count the step and ask the policy whether the run should switch. Every rank decides alike:
        overflows come from the global grad norm, and the scale moves with them."""
        if not self.engine.scaler.is_enabled():
            return
        amp, state = self.cfg.amp, self.state
        state.overflow_steps += overflow
        state.overflow_window = (state.overflow_window + [int(overflow)])[-amp.window_steps:]
        if not amp.switch or self.pending:
            return
        self.pending = precision_decision(
            self.engine.precision.name, state.overflow_window, self.engine.loss_scale() if overflow else None,
            bf16_ok=self.facts.type != "cuda" or self.facts.bf16, window_steps=amp.window_steps,
            max_overflow_frac=amp.max_overflow_frac, min_scale=amp.min_scale)
        self._say_pending(step + 1)

    def restored(self, scaler_state: dict | None) -> None:
        """After a rollback restored an older state: train in the precision it recorded (a switch made
        after that checkpoint is undone, and made again where the replay decides it), with the checkpoint's
        loss scale (`scaler_state`: the engine in another precision could not take it), and drop a switch
        pending from the steps rolled back."""
        self.pending, recorded = None, self.state.precision
        if recorded and recorded != "fp8" and recorded != self.engine.precision.name:  # fp8 is entered at a start only
            self.engine.set_precision(choose_precision(recorded, self.facts, self.cfg.tf32))
            if scaler_state and self.engine.scaler.is_enabled():
                self.engine.scaler.load_state_dict(scaler_state)

    def after_rollback(self, step: int, rollbacks: int) -> None:
        """bf16: a non-finite loss at `step` was rolled back, the run's `rollbacks`-th: ask the policy."""
        if self.cfg.amp.switch and not self.pending:
            self.pending = rollback_precision_decision(self.engine.precision.name, rollbacks,
                                                       self.cfg.amp.bf16_max_rollbacks)
            self._say_pending(step)

    def _say_pending(self, step: int) -> None:
        if self.pending:
            self.tracker.progress({"message": f"{self.engine.precision.name} is unstable at step {step}: "
                                              f"{self.pending.cause}; switching to {self.pending.to} at the next "
                                              "checkpoint"})

    def at_checkpoint(self) -> None:
        """Before a checkpoint is written: carry out a pending switch, so that the checkpoint holds it."""
        if self.pending is None:
            return
        before, cause = self.engine.precision.name, self.pending.cause
        self.engine.set_precision(choose_precision(self.pending.to, self.facts, self.cfg.tf32))
        now = self.engine.precision.name
        self.state.precision = self.state.precision_switched_to = now
        self.tracker.event("precision_switch", step=self.state.step, previous=before, precision=now, cause=cause,
                           overflow_steps=self.state.overflow_steps)
        self.tracker.progress({"message": f"precision: {before} -> {now} from step {self.state.step} ({cause})"})
        self.pending = None
