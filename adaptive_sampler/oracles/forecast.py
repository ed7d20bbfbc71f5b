"""Forecast: a fixed NFE budget, with skipped steps that extrapolate the prediction instead of reusing it.

For Euler and DDIM a step that reuses the previous eps is exactly a merged (longer) step, so zero-order skipping
only chooses step sizes, and a uniform schedule at the same NFE ("fewer steps") is hard to beat. A skipped step
whose eps is *extrapolated* from the last computed ones turns the pair of steps into a multistep (Adams-Bashforth
like) update along the probability-flow ODE ``dx/dsigma = eps``: its error shrinks with a higher power of the step.

Stochastic samplers (Euler a, DPM++ SDE, DDIM with eta > 0) add fresh noise after every step, so an extrapolated
*eps* would replay noise the sampler has replaced: there the denoised prediction (x0) is forecast, and the sampler
forms eps from the current latent and draws its own noise. Which x0 forecast is best varies with the image, the
sampler, the schedule and the guidance scale (reuse wins at high scales, extrapolation on smooth trajectories), and
every computed step tells, for free, how well each would have done: :class:`X0Ensemble` mixes forecasts per image,
weighted by their observed errors.

Flow-matching models (SD3, Flux, Wan; ``RunInfo.flow``) have nearly straight paths, along which a sampler step with
a frozen x0 is exact: there x0 is forecast on every run (on deterministic runs by a mix of reuse, linear and
quadratic extrapolation).

:class:`Forecast` spends ``budget`` of full CFG's NFE: it computes (full CFG) the first ``warmup`` steps, the last
step (on samplers that end at sigma = 0 its prediction *is* the output) and steps spread evenly in between. On
deterministic runs of SD-style models "evenly" is in ``sigma ** (1 / 7)``, the variable in which Karras et al.'s
schedule spaces its steps to spread the discretisation error: a forecast's error grows with the same step sizes, so
a model's own schedule (uniform in timestep, with long last steps) gets more of its late steps computed and a Karras
schedule gets an even spread. On their stochastic runs the spread is even in the cumulative weight that each step's
update gives its x0 prediction, ``1 - (sigma_next / sigma) ** 2`` for an eta-1 step: a forecast x0 does the more harm
the more of it enters the latent. On flow models the computed steps are as dense as the schedule's steps are long in
sigma, to the power 2/3 (step index on an even schedule; more of a shifted schedule's long late steps). See
docs/method-notes.md for the measurements.

One knob, ``level``, sets the budget for the sampler at hand (:data:`LEVELS`): stochastic samplers need more computed
steps than deterministic ones for the same fidelity, and the DPM++ SDE samplers more again.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Sequence

import numpy as np
import torch

from .base import Decision, Oracle, RunInfo, StepRecord, StepState, _check_int, _check_real
from .x0_forecast import X0Ensemble, combine


def integrates_in_log_sigma(sampler: str) -> bool:
    """Whether a sampler (k-diffusion / A1111 / ComfyUI name) is a DPM-Solver++ multistep solver (2M, 3M, their SDE
    variants), which steps in log sigma."""
    name = sampler.lower().replace(" ", "").replace("+", "p").removeprefix("sample_")
    return name.startswith("dpmpp") and ("2m" in name or "3m" in name)


def extrapolate(points: list[tuple[float, torch.Tensor]], at: float) -> torch.Tensor:
    """Lagrange polynomial through ``points`` (abscissa, value), evaluated at ``at``, in float32."""
    weights = [math.prod((at - tm) / (tj - tm) for m, (tm, _) in enumerate(points) if m != j)
               for j, (tj, _) in enumerate(points)]
    return combine(torch.tensor(weights, dtype=torch.float64), [v.float() for _, v in points])


def to_space(space: str, denoised: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A denoised prediction at latent ``x`` expressed as the quantity that is extrapolated (``"eps"`` or ``"x0"``)."""
    return denoised if space == "x0" else (x - denoised) / sigma


def from_space(space: str, value: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The denoised prediction at latent ``x`` that an extrapolated value stands for."""
    return value if space == "x0" else x - sigma * value


#: The quality levels of the one knob: level -> NFE budget (fraction of full CFG's) on deterministic samplers, on
#: the other stochastic samplers (Euler a, DDIM eta > 0, ...) and on the DPM++ SDE samplers. Measured by
#: ``python -m adaptive_sampler bench-samplers`` (README, "One knob").
LEVELS: dict[str, tuple[float, float, float]] = {
    "quality": (0.5, 0.6, 0.7),
    "balanced": (0.4, 0.5, 0.6),
    "fast": (0.3, 0.4, 0.5),
}
DEFAULT_LEVEL = "balanced"

#: Where the computed steps are spread: in step index, or evenly in a function of sigma.
PLACEMENT_SCALES = {"log-sigma": lambda s: -math.log(s), "rho": lambda s: -s ** (1 / 7)}
#: The power of the "step-length" placement: computed steps as dense as the schedule's steps are long in sigma, to
#: this power (measured on flow models, method notes; 0 would be step index, 1 evenly in sigma).
STEP_LENGTH_POWER = 2 / 3


def placement_positions(placement: str, sigmas: Sequence[float], steps: int) -> list[float]:
    """Each step's position on the axis along which computed steps are spread evenly: its index (``"index"``), a
    :data:`PLACEMENT_SCALES` function of its sigma, the summed lengths ``|sigma - sigma_next| ** (2 / 3)`` of the
    steps before it (``"step-length"``: on a flow model's schedule, evenly in index when the steps are even in
    sigma, and denser where a shifted schedule takes its long late steps), or (``"x0-weight"``) the summed weight
    ``1 - (sigma_next / sigma) ** 2`` that the steps before it gave their x0 prediction (the weight of an eta-1
    ancestral or SDE step)."""
    if placement == "index":
        return [float(j) for j in range(steps)]
    if placement in ("x0-weight", "step-length"):
        positions, total = [], 0.0
        for j in range(steps):
            positions.append(total)
            if placement == "x0-weight":
                total += 1.0 - (sigmas[j + 1] / sigmas[j]) ** 2
            else:
                total += abs(sigmas[j] - sigmas[j + 1]) ** STEP_LENGTH_POWER
        return positions
    scale = PLACEMENT_SCALES[placement]
    return [scale(s) for s in sigmas[:steps]]


def level_budget(level: str, stochastic: bool, dpm_solver: bool) -> float:
    """The budget a quality level spends on a sampler (see :data:`LEVELS`)."""
    deterministic, other, sde = LEVELS[level]
    return (sde if dpm_solver else other) if stochastic else deterministic


#: How the misses of a stretch's skipped steps add up in the plan's error model (:func:`even_plan`): 0 would spread
#: the computed steps evenly whatever the count of skips between them, 1 would add the misses as if each stood
#: alone; 0.5, between them, kept every budget within 0.4 dB of the one below on the 8 cells of both model families
#: it was chosen on, where 1 fell by 4.3 dB once (method notes, "Robust plans").
SKIPPED_POWER = 0.5


def computed_steps(steps: int, budget: float, warmup: int, sigmas: Sequence[float] = (),
                   placement: str = "log-sigma", carry: int = 0) -> frozenset[int]:
    """The steps a budget computes: warm-up, the last step, and the rest spread as evenly as the schedule's steps
    allow along a :func:`placement_positions` axis (from the last warm-up step to the last step): ``"index"``, or,
    when ``sigmas`` (the run's schedule) is given, ``"step-length"``, ``"log-sigma"``, ``"rho"`` or ``"x0-weight"``
    (without sigmas: ``"index"``).

    One error model decides at every budget: a skipped step's forecast misses by about the length, on that axis, of
    the stretch between the computed steps around it, and the misses of a stretch's skipped steps add up partly
    (their count to :data:`SKIPPED_POWER`), so a plan costs the sum over its stretches of ``count ** SKIPPED_POWER *
    length ** 2``, and the plan minimises it exactly (:func:`even_plan`). Below half the budget this spreads the
    computed steps evenly along the axis; above it, it keeps skips apart (one skip between two computed steps costs
    less than two side by side) where the axis is even, and where a schedule crowds steps that barely move (a Karras
    schedule's tail on a flow model) those stay skipped at every budget. No rule switches at any budget (measured:
    docs/method-notes.md, "Robust plans"). ``carry``: how many steps past a stretch its last forecast still acts -
    1 on multistep solvers (DPM++ 2M / 3M), whose next computed step corrects with the difference to the previous
    prediction, so a forecast before a long step costs that step's length too.

    A run too short for the budget (fewer than ``warmup + 1`` computed steps) still computes the warm-up and the
    last step: forecasting from nothing would be a guess. :class:`Forecast` reports such runs in its overrides.
    """
    placement = placement if sigmas else "index"
    total = max(int(math.floor(budget * steps + 1e-9)), min(steps, warmup + 1))
    if total >= steps:
        return frozenset(range(steps))
    positions = placement_positions(placement, sigmas, steps)
    return frozenset(range(warmup)) | {steps - 1} | even_plan(positions, warmup - 1, total - warmup - 1, carry)


def even_plan(positions: Sequence[float], first: int, extra: int, carry: int = 0) -> set[int]:
    """The ``extra`` steps strictly between step ``first`` and the last step (both computed) that minimise the sum,
    over consecutive computed steps ``a < b``, of ``(b - a - 1) ** SKIPPED_POWER * (positions[b'] - positions[a]) **
    2`` with ``b' = min(b + carry, last)`` (the stretch's length squared, reaching ``carry`` steps past it, times its
    count of skipped steps to :data:`SKIPPED_POWER`): an exact dynamic program over (steps chosen, last chosen step),
    O(extra * steps ** 2) in numpy."""
    last = len(positions) - 1
    if extra <= 0:
        return set()
    p = np.asarray(positions, dtype=np.float64)
    index = np.arange(len(p))
    skipped = (index[None, :] - index[:, None] - 1).clip(min=0)
    reach = p[np.minimum(index + carry, last)]
    gap = np.triu(skipped ** SKIPPED_POWER * (reach[None, :] - p[:, None]) ** 2, k=1)
    gap[np.tril_indices(len(p))] = np.inf
    gap[:first] = np.inf  # nothing is chosen before the warm-up ends
    best, choices = gap[first].copy(), []
    best[last] = np.inf  # the last step closes the plan; it is not one of the extra steps
    for _ in range(extra - 1):
        candidates = best[:, None] + gap
        candidates[:, last] = np.inf
        choice = np.argmin(candidates, axis=0)
        best = candidates[choice, np.arange(len(p))]
        choices.append(choice)
    step = int(np.argmin(best + gap[:, last]))
    chosen = {step}
    for choice in reversed(choices):
        step = int(choice[step])
        chosen.add(step)
    return chosen


class Forecast(Oracle):
    """Full CFG on a fixed budget of steps; the other steps are CACHED with a forecast prediction (no network call).

    ``level``: the one knob - ``"quality"``, ``"balanced"`` (the default) or ``"fast"``; it sets the budget for the
    sampler of the run (:data:`LEVELS`; the summary's overrides name the budget used on stochastic samplers).
    ``budget``: an explicit fraction of full CFG's NFE to spend instead (1 = plain full CFG), for experts and the
    bench. ``warmup``: first steps always computed (None: 1 on deterministic flow runs, 2 otherwise). ``space``: what
    is forecast - ``"eps"`` (the guided noise prediction, extrapolated in sigma: a multistep update along the ODE),
    ``"x0"`` (the denoised prediction: the sampler forms eps from the current latent, so noise a stochastic sampler
    added since the last computed step is kept, not replayed) or ``"auto"``: eps on deterministic runs of SD-style
    models, x0 on stochastic runs and on flow models. ``order``: 0 (reuse the last computed value), 1 (linear) or 2
    (quadratic) Lagrange extrapolation in sigma; ``None``: quadratic for eps, and for x0 the per-image error-weighted
    mix of :class:`~.x0_forecast.X0Ensemble` (reuse, linear and Spectrum's fit on stochastic runs; reuse, linear and
    quadratic on deterministic flow runs). ``placement`` of the computed steps: ``"index"`` (evenly in step index),
    ``"step-length"`` (denser where the schedule's steps are longer in sigma),
    ``"log-sigma"``, ``"rho"`` or ``"x0-weight"`` (evenly in log sigma, in ``sigma ** (1 / 7)`` or in the summed x0
    weight of the steps, see :func:`placement_positions`; these need the run's sigmas) or ``"auto"``: on SD-style
    models rho on deterministic runs and x0-weight on stochastic ones, on flow models step-length; the computed steps
    are spread as evenly along that axis as the schedule allows, by one rule at every budget
    (:func:`computed_steps`). Every ``auto``
    choice was measured (docs/method-notes.md). The plan depends only on the run's sampler, schedule and steps, and
    each image's forecast only on its own predictions: an image is the same whatever batch it is in.
    """

    name = "forecast"
    SPACES = ("auto", "eps", "x0")
    PLACEMENTS = ("auto", "index", "step-length", "log-sigma", "rho", "x0-weight")

    def __init__(self, budget: float | None = None, order: int | None = None, warmup: int | None = None,
                 space: str = "auto", placement: str = "auto", level: str = DEFAULT_LEVEL) -> None:
        super().__init__()
        if level not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
        self.level = level
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
        self.warmup = None if warmup is None else _check_int("warmup", warmup, 1, "an integer >= 1, or None (auto)")
        self.plan: frozenset[int] = frozenset()
        self._space = "eps"
        self._warmup = 2
        self._history: deque[tuple[float, torch.Tensor]] = deque(maxlen=3)
        self._ensemble: X0Ensemble | None = None
        self._forecast: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (f"Forecast(level={self.level!r}, budget={self.budget}, order={self.order}, warmup={self.warmup}, "
                f"space={self.space!r}, placement={self.placement!r})")

    def _begin(self, run: RunInfo) -> None:
        dpm_solver = integrates_in_log_sigma(run.sampler)
        deterministic_flow = run.flow and not run.stochastic
        self._warmup = (1 if deterministic_flow else 2) if self.warmup is None else self.warmup
        placement = self.placement
        if placement == "auto":
            placement = "step-length" if run.flow else "x0-weight" if run.stochastic else "rho"
        if placement != "index" and not (len(run.sigmas) > run.steps and all(s > 0 for s in run.sigmas[:run.steps])):
            if self.placement != "auto":
                raise ValueError(f"placement {placement!r} needs the run's sigmas (positive up to the last step)")
            placement = "index"
        sigmas = run.sigmas if placement != "index" else ()
        budget = self.budget
        if budget is None:
            budget = level_budget(self.level, run.stochastic, dpm_solver)
            if run.stochastic:
                kind = "a DPM++ SDE sampler" if dpm_solver else "a stochastic sampler"
                self.overrides.append((0, f"level {self.level!r} spends {budget} of full CFG's NFE on {run.sampler} "
                                          f"({kind}; {level_budget(self.level, False, False)} on deterministic ones)"))
        self.plan = computed_steps(run.steps, budget, self._warmup, sigmas, placement, carry=int(dpm_solver))
        if len(self.plan) > budget * run.steps + 1e-9:
            self.overrides.append((0, f"budget {budget} raised to {len(self.plan)}/{run.steps} computed steps: "
                                      f"a {run.steps}-step run needs warm-up ({self._warmup}) and the last step"))
        auto_space = "x0" if run.stochastic or run.flow else "eps"
        self._space = auto_space if self.space == "auto" else self.space
        forecasts = ("reuse", "linear", "quadratic") if deterministic_flow else X0Ensemble.STOCHASTIC
        schedule = list(run.sigmas[:run.steps])
        in_sigma = run.flow and len(schedule) == run.steps and all(a > b for a, b in zip(schedule, schedule[1:]))
        positions = schedule if in_sigma else None  # flow runs extrapolate in sigma (x0_forecast), on a strict schedule
        self._ensemble = (X0Ensemble(run.steps, forecasts=forecasts, positions=positions)
                          if self._space == "x0" and self.order is None else None)
        self._history = deque(maxlen=(self.order if self.order is not None else 2) + 1)
        self._forecast = None

    def _conditioning_changed(self, state: StepState) -> None:
        self._history.clear()
        if self._ensemble is not None:
            self._ensemble.clear()

    def _decide(self, state: StepState) -> Decision:
        self._forecast = None
        if state.index in self.plan:
            return Decision.FULL
        if self._ensemble:
            self._forecast = self._ensemble.forecast(state.index)
        elif self._history:
            points = list(self._history)
            self._forecast = points[-1][1] if len(points) == 1 else extrapolate(points, state.sigma)
        return Decision.CACHED

    def cached_denoised(self, state: StepState) -> torch.Tensor:
        """The forecast denoised prediction (zero-order reuse when only one computed step is known)."""
        if self._forecast is None:
            return super().cached_denoised(state)
        return from_space(self._space, self._forecast, state.x.float(), state.sigma)

    def _observe(self, record: StepRecord) -> None:
        if record.decision is Decision.CACHED:
            return
        if self._ensemble is not None:
            self._ensemble.observe(record.index, record.denoised)
        else:
            self._history.append((record.sigma, to_space(self._space, record.denoised.float(), record.x.float(),
                                                         record.sigma)))
