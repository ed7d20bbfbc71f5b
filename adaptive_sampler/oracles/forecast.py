"""Forecast: a fixed NFE budget, with skipped steps that extrapolate the prediction instead of reusing it.

For Euler and DDIM a step that reuses the previous eps is exactly a merged (longer) step, so zero-order skipping
only chooses step sizes, and a uniform schedule at the same NFE ("fewer steps") is hard to beat. A skipped step
whose eps is *extrapolated* from the last computed ones turns the pair of steps into a multistep (Adams-Bashforth
like) update along the probability-flow ODE ``dx/dsigma = eps``: its error shrinks with a higher power of the step.

Stochastic samplers (Euler a, DPM++ SDE, DDIM with eta > 0) add fresh noise after every step, so an extrapolated
*eps* would replay noise the sampler has replaced: there the last computed denoised prediction (x0) is reused, and
the sampler forms eps from the current latent and draws its own noise.

:class:`Forecast` spends ``budget`` of full CFG's NFE: it computes (full CFG) the first ``warmup`` steps, the last
step (on samplers that end at sigma = 0 its prediction *is* the output) and steps spread evenly in between - evenly
in step index for samplers that integrate in sigma (Euler, Euler a, DDIM, LMS), evenly in log sigma for the
DPM-Solver++ family, which integrates in log sigma. See the README's method notes for the measurements.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Sequence

import torch

from .base import Decision, Oracle, RunInfo, StepRecord, StepState, _check_int, _check_real


def integrates_in_log_sigma(sampler: str) -> bool:
    """Whether a sampler (k-diffusion / A1111 / ComfyUI name) is a DPM-Solver++ multistep solver (2M, 3M, their SDE
    variants), which steps in log sigma."""
    name = sampler.lower().replace(" ", "").replace("+", "p").removeprefix("sample_")
    return name.startswith("dpmpp") and ("2m" in name or "3m" in name)


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


def to_space(space: str, denoised: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A denoised prediction at latent ``x`` expressed as the quantity that is extrapolated (``"eps"`` or ``"x0"``)."""
    return denoised if space == "x0" else (x - denoised) / sigma


def from_space(space: str, value: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The denoised prediction at latent ``x`` that an extrapolated value stands for."""
    return value if space == "x0" else x - sigma * value


def computed_steps(steps: int, budget: float, warmup: int, sigmas: Sequence[float] = ()) -> frozenset[int]:
    """The steps a budget computes: warm-up, the last step, and the rest spread over the middle steps - evenly in
    step index, or, when ``sigmas`` (the run's schedule) is given, evenly in log sigma. In step index the minority is
    spread: the computed steps when the budget is at most half of them, the skipped steps above that (measured: at
    63-70% this keeps every skipped step between two computed ones and gains 1-10 dB over spreading the computed
    steps, README method notes).

    A run too short for the budget (fewer than ``warmup + 1`` computed steps) still computes the warm-up and the
    last step: forecasting from nothing would be a guess. :class:`Forecast` reports such runs in its overrides.
    """
    total = max(int(math.floor(budget * steps + 1e-9)), min(steps, warmup + 1))
    if total >= steps:
        return frozenset(range(steps))
    middle = list(range(warmup, steps - 1))
    extra = total - warmup - 1
    if sigmas:
        lam = [-math.log(s) for s in sigmas[:steps]]
        lo, hi = lam[warmup - 1], lam[steps - 1]
        position = {j: (lam[j] - lo) / (hi - lo) for j in middle}
        chosen: set[int] = set()
        for k in range(1, extra + 1):
            chosen.add(min((j for j in middle if j not in chosen), key=lambda j: abs(position[j] - k / (extra + 1))))
    elif 2 * total <= steps:  # computed steps are the minority: spread them
        chosen = {middle[round((j + 1) * len(middle) / (extra + 1))] for j in range(extra)}
    else:  # skipped steps are the minority: spread those, so that no two are adjacent while the budget allows
        skipped = steps - total
        chosen = set(middle) - {middle[int((k + 0.5) * len(middle) / skipped)] for k in range(skipped)}
    return frozenset(range(warmup)) | {steps - 1} | chosen


class Forecast(Oracle):
    """Full CFG on a fixed budget of steps; the other steps are CACHED with a forecast prediction (no network call).

    ``budget``: the fraction of full CFG's NFE to spend (1 = plain full CFG); ``None`` (the default) spends 0.5, and
    0.6 on the DPM++ SDE samplers, whose images fall to about 20 dB against full CFG at 0.5 (the summary's overrides
    say so). ``warmup``: first steps always computed. ``space``: what is extrapolated in sigma - ``"eps"`` (the
    guided noise prediction: a multistep update along the ODE), ``"x0"`` (the denoised prediction: the sampler forms
    eps from the current latent, so noise a stochastic sampler added since the last computed step is kept, not
    replayed) or ``"auto"``: eps on deterministic runs, x0 on stochastic ones. ``order``: 0 (reuse the last computed
    value), 1 (linear) or 2 (quadratic); ``None``: 2 for eps, 0 for x0. ``placement`` of the computed steps:
    ``"index"`` (spread in step index), ``"log-sigma"`` (evenly in log sigma; needs the run's sigmas) or ``"auto"``:
    log sigma for the DPM-Solver++ family, step index otherwise. Every ``auto`` choice was measured (README, method
    notes). The plan is per batch and fixed at the start of the run.
    """

    name = "forecast"
    SPACES = ("auto", "eps", "x0")
    PLACEMENTS = ("auto", "index", "log-sigma")

    DEFAULT_BUDGET = 0.5
    SDE_BUDGET = 0.6

    def __init__(self, budget: float | None = None, order: int | None = None, warmup: int = 2, space: str = "auto",
                 placement: str = "auto") -> None:
        super().__init__()
        if budget is not None:
            budget = _check_real("budget", budget, 0.0, 1.0, "a number in (0, 1] (fraction of full CFG's NFE)")
            if budget == 0.0:
                raise ValueError("budget must be a number in (0, 1] (fraction of full CFG's NFE), got 0")
        self.budget = budget
        if order not in (None, 0, 1, 2):
            raise ValueError(f"order must be 1 (linear) or 2 (quadratic), 0 (reuse), or None to choose by space; "
                             f"got {order!r}")
        if space not in self.SPACES:
            raise ValueError(f"space must be one of {', '.join(self.SPACES)}, got {space!r}")
        if placement not in self.PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(self.PLACEMENTS)}, got {placement!r}")
        self.order = order
        self.space = space
        self.placement = placement
        self.warmup = _check_int("warmup", warmup, 1)
        self.plan: frozenset[int] = frozenset()
        self._space = "eps"
        self._history: deque[tuple[float, torch.Tensor]] = deque(maxlen=3)
        self._forecast: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (f"Forecast(budget={self.budget}, order={self.order}, warmup={self.warmup}, space={self.space!r}, "
                f"placement={self.placement!r})")

    def _begin(self, run: RunInfo) -> None:
        dpm_solver = integrates_in_log_sigma(run.sampler)
        placement = self.placement
        if placement == "auto":
            placement = "log-sigma" if dpm_solver else "index"
        if placement == "log-sigma" and not (run.sigmas and all(s > 0 for s in run.sigmas[:run.steps])):
            if self.placement == "log-sigma":
                raise ValueError("placement 'log-sigma' needs the run's sigmas (positive up to the last step)")
            placement = "index"
        sigmas = run.sigmas if placement == "log-sigma" else ()
        budget = self.budget
        if budget is None:
            budget = self.DEFAULT_BUDGET
            if run.stochastic and dpm_solver:
                budget = self.SDE_BUDGET
                self.overrides.append((0, f"default budget {self.SDE_BUDGET} on {run.sampler} (a DPM++ SDE sampler "
                                          f"falls to about 20 dB at {self.DEFAULT_BUDGET})"))
        self.plan = computed_steps(run.steps, budget, self.warmup, sigmas)
        if len(self.plan) > budget * run.steps + 1e-9:
            self.overrides.append((0, f"budget {budget} raised to {len(self.plan)}/{run.steps} computed steps: "
                                      f"a {run.steps}-step run needs warm-up ({self.warmup}) and the last step"))
        self._space = ("x0" if run.stochastic else "eps") if self.space == "auto" else self.space
        order = self.order if self.order is not None else (0 if self._space == "x0" else 2)
        self._history = deque(maxlen=order + 1)
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
        return from_space(self._space, self._forecast, state.x.float(), state.sigma)

    def _observe(self, record: StepRecord) -> None:
        if record.decision is not Decision.CACHED:
            self._history.append((record.sigma, to_space(self._space, record.denoised.float(), record.x.float(),
                                                         record.sigma)))
