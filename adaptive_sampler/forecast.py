"""Forecast skipping: CACHED steps that extrapolate the prediction instead of reusing it.

For Euler and DDIM a step that reuses the previous eps is exactly a merged (longer) step, so zero-order skipping
is step-size selection and cannot beat a well-chosen fixed schedule. A skipped step whose denoised prediction is
*extrapolated* from the last computed ones (a polynomial in lambda = -log sigma, the variable in which
DPM-Solver++ models x0) is a multistep-like update instead: its error shrinks with the square (order 1) or cube
(order 2) of the step, where reuse's error shrinks only linearly.

:class:`Forecast` decides which steps to skip with an embedded error estimate: the difference between the order-p
and order-(p-1) extrapolations, relative to the prediction's size, must stay below ``tolerance``. It never
skips more than ``max_skips`` steps in a row, never the first ``warmup`` steps and never the last step (whose
prediction is the output on samplers that end at sigma = 0).
"""

from __future__ import annotations

import math
from collections import deque

import torch

from .oracles import Decision, Oracle, RunInfo, StepRecord, StepState, _check_int, _check_real


def extrapolate(points: list[tuple[float, torch.Tensor]], at: float) -> torch.Tensor:
    """Lagrange polynomial through ``points`` (lambda, value), evaluated at ``at``, in float32."""
    out = None
    for j, (lj, vj) in enumerate(points):
        w = 1.0
        for m, (lm, _) in enumerate(points):
            if m != j:
                w *= (at - lm) / (lj - lm)
        term = vj.float() * w
        out = term if out is None else out + term
    return out


def _lam(sigma: float) -> float:
    return -math.log(sigma)


class Forecast(Oracle):
    """Full CFG on computed steps; CACHED steps forecast the guided x0 by extrapolation in lambda = -log sigma.

    ``order`` 1 (linear, two past predictions) or 2 (quadratic, three). A step is skipped when the embedded error
    estimate ``rms(f_p - f_{p-1}) / rms(f_p)`` is at most ``tolerance`` and fewer than ``max_skips`` steps in a row
    were skipped. Decisions are per batch.
    """

    name = "forecast"

    def __init__(self, tolerance: float = 0.05, order: int = 2, max_skips: int = 1, warmup: int = 3) -> None:
        super().__init__()
        self.tolerance = _check_real("tolerance", tolerance, 0.0, math.inf, "a finite number >= 0 (0 disables)")
        if order not in (1, 2):
            raise ValueError(f"order must be 1 (linear) or 2 (quadratic), got {order!r}")
        self.order = order
        self.max_skips = _check_int("max_skips", max_skips, 1)
        self.warmup = _check_int("warmup", warmup, order + 1,
                                 f"an integer >= {order + 1} (order {order} needs {order + 1} computed steps)")
        self.errors: list[float | None] = []
        self._history: deque[tuple[float, torch.Tensor]] = deque(maxlen=order + 1)
        self._pending: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (f"Forecast(tolerance={self.tolerance}, order={self.order}, max_skips={self.max_skips}, "
                f"warmup={self.warmup})")

    def _begin(self, run: RunInfo) -> None:
        self.errors = []
        self._history.clear()
        self._pending = None

    def _conditioning_changed(self, state: StepState) -> None:
        self._history.clear()

    def _decide(self, state: StepState) -> Decision:
        self._pending = None
        error = None
        if (state.index >= self.warmup and len(self._history) == self.order + 1 and state.index < state.total - 1
                and state.sigma > 0):
            at = _lam(state.sigma)
            points = list(self._history)
            high = extrapolate(points, at)
            low = extrapolate(points[1:], at)
            error = float((high - low).pow(2).mean().sqrt() / high.pow(2).mean().sqrt().clamp_min(1e-12))
            if self.tolerance > 0 and error <= self.tolerance and self._consecutive_cached < self.max_skips:
                self._pending = high
        self.errors.append(error)
        return Decision.CACHED if self._pending is not None else Decision.FULL

    def cached_eps(self, state: StepState) -> torch.Tensor:
        if self._pending is None:
            return super().cached_eps(state)
        return (state.x.float() - self._pending) / state.sigma

    def _observe(self, record: StepRecord) -> None:
        if record.decision is not Decision.CACHED:
            self._history.append((_lam(record.sigma), record.denoised.float()))
