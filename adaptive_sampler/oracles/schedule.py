"""Fixed plans: an explicit per-step schedule, and CFG truncation (guided steps first, conditional-only after)."""

from __future__ import annotations

import re
from typing import Sequence

import torch

from .base import Decision, Oracle, RunInfo, StepRecord, StepState, _check_real
from .linear_ag import UncondEstimator

class Schedule(Oracle):
    """A fixed per-step plan: a sequence of :class:`Decision` or a compact string.

    The string uses ``F`` (FULL), ``C`` (COND), ``L`` (LINEAR), ``S`` (CACHED, "skip"), each optionally followed by
    a repeat count; whitespace is ignored: ``"F10 C40"`` is ten FULL steps then forty COND steps. LINEAR steps in a
    schedule estimate the unconditional prediction with ``linear`` (a :class:`LinearAG`-style estimator, by default
    the model-free delta rule).
    """

    name = "schedule"
    _TOKEN = re.compile(r"([FCLS])(\d*)")

    def __init__(self, decisions: str | Sequence[Decision], linear: UncondEstimator | None = None) -> None:
        super().__init__()
        self.plan = self.parse(decisions)
        self._estimator = linear or UncondEstimator.delta()

    @classmethod
    def parse(cls, decisions: str | Sequence[Decision]) -> tuple[Decision, ...]:
        if isinstance(decisions, str):
            text = "".join(decisions.split()).upper()
            if not text:
                raise ValueError("decisions must be a non-empty schedule string such as 'F10 C40'")
            pos, plan = 0, []
            while pos < len(text):
                m = cls._TOKEN.match(text, pos)
                if m is None:
                    raise ValueError(
                        f"decisions: unexpected {text[pos]!r} at position {pos} of {decisions!r}; "
                        "use F, C, L or S, each optionally followed by a repeat count")
                count = int(m.group(2)) if m.group(2) else 1
                if count < 1:
                    raise ValueError(f"decisions: repeat count must be >= 1 in {decisions!r}")
                plan += [Decision(m.group(1))] * count
                pos = m.end()
            return tuple(plan)
        plan = tuple(decisions)
        if not plan or not all(isinstance(d, Decision) for d in plan):
            raise ValueError("decisions must be a non-empty sequence of Decision or a schedule string")
        return plan

    def __repr__(self) -> str:
        return f"Schedule({''.join(d.value for d in self.plan)!r})"

    def _begin(self, run: RunInfo) -> None:
        if len(self.plan) != run.steps:
            raise ValueError(f"decisions: the schedule has {len(self.plan)} steps but the run has {run.steps}")
        self._estimator.begin(run)

    def _conditioning_changed(self, state: StepState) -> None:
        self._estimator.forget()

    def _decide(self, state: StepState) -> Decision:
        return self.plan[state.index]

    def _observe(self, record: StepRecord) -> None:
        self._estimator.observe(record)

    def estimate_uncond(self, state: StepState, cond: torch.Tensor) -> torch.Tensor:
        return self._estimator.estimate(state, cond)


class CFGTruncation(Schedule):
    """Full CFG for the first ``fraction`` of the steps, conditional-only after (the NGMS / "CFG cutoff" baseline).

    The number of guided steps is ``round(fraction * steps)``.
    """

    name = "cfg-truncation"
    adapts_guidance = True

    def __init__(self, fraction: float) -> None:
        self.fraction = _check_real("fraction", fraction, 0.0, 1.0)
        Oracle.__init__(self)
        self.plan = ()
        self._estimator = UncondEstimator.delta()

    def __repr__(self) -> str:
        return f"CFGTruncation(fraction={self.fraction})"

    def _begin(self, run: RunInfo) -> None:
        guided = round(self.fraction * run.steps)
        self.plan = (Decision.FULL,) * guided + (Decision.COND,) * (run.steps - guided)
        super()._begin(run)
