"""The `profile:` config section (foundation: pydantic only): a `torch.profiler` capture of a few steps
on request, logged with an HTML report (see `openclaw.profiling`). Off unless the section is given."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from openclaw.section import Section


class ProfileConfig(Section):
    start_step: int = Field(20, ge=0)
    """The first profiled step, counted as steps done before it (0: the very first step). Start past the
    first steps, which hold start-up (and compilation): the step before this one warms the profiler up."""
    steps: int = Field(5, ge=1)
    """How many steps to profile. Each profiled step is slower (the profiler records every operator), and
    its trace grows with the steps: a few are enough to see the pattern."""
    ranks: Literal["all"] | int | list[int] = "all"
    """Which ranks are profiled: `all`, one rank (`0`) or a list (`[0, 1]`). Their traces and summaries go
    to rank 0 at the end of the profile: choose fewer ranks on large worlds. Ranks past the world size a
    (resized) run has are skipped."""
    memory: bool = True
    """Record allocations (`profile_memory`): the report's memory peak by category. Costs time per op."""

    @field_validator("ranks")
    @classmethod
    def _ranks(cls, v: Literal["all"] | int | list[int]) -> Literal["all"] | int | list[int]:
        picked = [v] if isinstance(v, int) else [] if v == "all" else v
        if v != "all" and (not picked or any(isinstance(r, bool) or r < 0 for r in picked)):
            raise ValueError(f"`profile.ranks` must be `all`, a rank (0, 1, ...) or a non-empty list of ranks, "
                             f"got {v!r}")
        return sorted(set(v)) if isinstance(v, list) else v

    def chosen(self, world: int) -> list[int]:
        """The profiled ranks of a world of `world` ranks."""
        picked = range(world) if self.ranks == "all" else [self.ranks] if isinstance(self.ranks, int) else self.ranks
        return [r for r in picked if r < world]

    def check_fits(self, max_steps: int, max_workers: int) -> None:
        """The profile must end within the run and name ranks the run can have (`Config` calls this)."""
        if self.start_step + self.steps > max_steps:
            raise ValueError(f"`profile.start_step` ({self.start_step}) + `profile.steps` ({self.steps}) must be at "
                             f"most `train.max_steps` ({max_steps}): the profile would end after the run. Lower "
                             f"`profile.start_step` to {max(0, max_steps - self.steps)} or fewer, or profile fewer "
                             f"steps.")
        too_big = [r for r in ([self.ranks] if isinstance(self.ranks, int) else self.ranks) if r >= max_workers] \
            if self.ranks != "all" else []
        if too_big:
            raise ValueError(f"`profile.ranks` names rank {', '.join(map(str, too_big))}, but the run has at most "
                             f"`scaling.max_workers` ({max_workers}) ranks, 0 to {max_workers - 1}")
