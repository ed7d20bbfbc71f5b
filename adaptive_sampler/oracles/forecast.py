"""Forecast: a fixed NFE budget, with skipped steps that extrapolate the noise prediction instead of reusing it.

For Euler and DDIM a step that reuses the previous eps is exactly a merged (longer) step, so zero-order skipping
only chooses step sizes, and a uniform schedule at the same NFE ("fewer steps") is hard to beat. A skipped step
whose eps is *extrapolated* from the last computed ones turns the pair of steps into a multistep (Adams-Bashforth
like) update along the probability-flow ODE ``dx/dsigma = eps``: its error shrinks with a higher power of the step.

:class:`Forecast` spends ``budget`` of full CFG's NFE: it computes (full CFG) the first ``warmup`` steps, the last
step (on samplers that end at sigma = 0 its prediction *is* the output) and evenly spaced steps in between, and
forecasts every other step by a polynomial in sigma through the last ``order + 1`` computed guided eps (fewer right
after warm-up). See the README's method notes for the measurements that chose these settings.
"""

from __future__ import annotations

import math
from collections import deque

import torch

from .base import Decision, Oracle, RunInfo, StepRecord, StepState, _check_int, _check_real


def extrapolate(points: list[tuple[float, torch.Tensor]], at: float) -> torch.Tensor:
    """Lagrange polynomial through ``points`` (abscissa, value), evaluated at ``at``, in float32."""
    out = None
    for j, (tj, vj) in enumerate(points):
        w = 1.0
        for m, (tm, _) in enumerate(points):
            if m != j:
                w *= (at - tm) / (tj - tm)
        term = vj.float() * w
        out = term if out is None else out + term
    return out


def computed_steps(steps: int, budget: float, warmup: int) -> frozenset[int]:
    """The steps a budget computes: warm-up, the last step, and the rest evenly spaced among the middle steps.

    A run too short for the budget (fewer than ``warmup + 1`` computed steps) still computes the warm-up and the
    last step: forecasting from nothing would be a guess. :class:`Forecast` reports such runs in its overrides.
    """
    total = max(int(math.floor(budget * steps + 1e-9)), min(steps, warmup + 1))
    if total >= steps:
        return frozenset(range(steps))
    middle = list(range(warmup, steps - 1))
    extra = total - warmup - 1
    chosen = {middle[round((j + 1) * len(middle) / (extra + 1))] for j in range(extra)}
    return frozenset(range(warmup)) | {steps - 1} | chosen


class Forecast(Oracle):
    """Full CFG on a fixed budget of steps; the other steps are CACHED with a forecast eps (no network call).

    ``budget`` is the fraction of full CFG's NFE to spend (1 = plain full CFG); ``order`` 1 (linear) or 2
    (quadratic) extrapolation in sigma; ``warmup`` first steps are always computed. ``space`` is what is
    extrapolated: ``"eps"`` (the guided noise prediction; a multistep update along the ODE), ``"x0"`` (the denoised
    prediction; the sampler forms eps from the current latent, so noise that a stochastic sampler added since the
    last computed step is kept, not replayed) or ``"auto"``: eps on deterministic runs, x0 on stochastic ones (see
    the README's method notes for the measurements). The plan is per batch and fixed at the start of the run.
    """

    name = "forecast"
    SPACES = ("auto", "eps", "x0")

    def __init__(self, budget: float = 0.5, order: int = 2, warmup: int = 2, space: str = "auto") -> None:
        super().__init__()
        self.budget = _check_real("budget", budget, 0.0, 1.0, "a number in (0, 1] (fraction of full CFG's NFE)")
        if self.budget == 0.0:
            raise ValueError("budget must be a number in (0, 1] (fraction of full CFG's NFE), got 0")
        if order not in (1, 2):
            raise ValueError(f"order must be 1 (linear) or 2 (quadratic), got {order!r}")
        if space not in self.SPACES:
            raise ValueError(f"space must be one of {', '.join(self.SPACES)}, got {space!r}")
        self.order = order
        self.space = space
        self.warmup = _check_int("warmup", warmup, 1)
        self.plan: frozenset[int] = frozenset()
        self._space = "eps"
        self._history: deque[tuple[float, torch.Tensor]] = deque(maxlen=order + 1)
        self._forecast: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"Forecast(budget={self.budget}, order={self.order}, warmup={self.warmup}, space={self.space!r})"

    def _begin(self, run: RunInfo) -> None:
        self.plan = computed_steps(run.steps, self.budget, self.warmup)
        if len(self.plan) > self.budget * run.steps + 1e-9:
            self.overrides.append((0, f"budget {self.budget} raised to {len(self.plan)}/{run.steps} computed steps: "
                                      f"a {run.steps}-step run needs warm-up ({self.warmup}) and the last step"))
        self._space = ("x0" if run.stochastic else "eps") if self.space == "auto" else self.space
        self._history.clear()
        self._forecast = None

    def _conditioning_changed(self, state: StepState) -> None:
        self._history.clear()

    def _decide(self, state: StepState) -> Decision:
        self._forecast = None
        if state.index in self.plan:
            return Decision.FULL
        if self._history:
            points = list(self._history)
            self._forecast = points[-1][1] if len(points) == 1 else extrapolate(points, state.sigma)
        return Decision.CACHED

    def cached_denoised(self, state: StepState) -> torch.Tensor:
        """The forecast denoised prediction (zero-order reuse when only one computed step is known)."""
        if self._forecast is None:
            return super().cached_denoised(state)
        if self._space == "x0":
            return self._forecast
        return state.x.float() - state.sigma * self._forecast

    def _observe(self, record: StepRecord) -> None:
        if record.decision is not Decision.CACHED:
            value = record.denoised if self._space == "x0" else record.eps
            self._history.append((record.sigma, value.float()))
