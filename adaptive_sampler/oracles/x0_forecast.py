"""Forecasting the denoised prediction (x0) of a skipped step, per image: on stochastic samplers and on flow models.

Forecasts from the last computed x0s, each a fixed linear combination of them (weights that depend only on where the
steps lie, so every image is forecast from its own predictions alone):

* ``reuse``: the last computed x0;
* ``linear``: the line through the last two, in step index (or in sigma, given the run's ``positions``);
* ``quadratic``: the parabola through the last three, in step index (or in sigma, likewise);
* ``spectral``: Forge Neo's Spectrum forecast, ``0.75 * linear + 0.25 * Chebyshev ridge fit`` (degree 6, ridge 0.5,
  the last 8 computed steps, step index mapped to [-1, 1]).

Which is best depends on the image, the sampler, the schedule and the guidance scale: on SD-style stochastic runs
reuse wins at high scales and on Karras schedules, the extrapolations on smooth trajectories; on a flow model's
deterministic runs (nearly straight paths) the quadratic earns its weight and the spectral fit does not (measured,
docs/method-notes.md). :class:`X0Ensemble` mixes a chosen set of them. Every computed step
shows, for free, how far each forecast from the steps before it would have missed it (a-posteriori error, as an
embedded Runge-Kutta pair gives). :class:`X0Ensemble` keeps a decaying mean of each forecast's squared error per
image and mixes the forecasts with weights ``error ** -0.5`` (normalised): a forecast that keeps missing fades out,
and no single lucky step decides alone.

Flow runs extrapolate in sigma (``positions``): x0 along a flow path is a smooth function of sigma, and where a
schedule's steps are uneven in sigma — Karras's on a flow model, whose last steps barely move sigma — a line or
parabola in step index runs off (measured: -5.5 dB at 12 steps against 20.1 dB in sigma; docs/method-notes.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

#: Spectrum's forecast settings (Haoming02/sd-webui-forge-classic, ``extensions-builtin/sd_forge_spectrum``).
SPECTRAL_BLEND, SPECTRAL_DEGREE, SPECTRAL_RIDGE, SPECTRAL_MEMORY = 0.25, 6, 0.5, 8


def linear_weights(times: list[float], at: float) -> torch.Tensor:
    """Weights on the stored values of the line through the last two (the last value alone when there is one)."""
    weights = torch.zeros(len(times), dtype=torch.float64)
    if len(times) == 1:
        weights[-1] = 1.0
        return weights
    k = (at - times[-1]) / (times[-1] - times[-2])
    weights[-1], weights[-2] = 1.0 + k, -k
    return weights


def chebyshev_weights(times: list[int], at: int, steps: int, degree: int = SPECTRAL_DEGREE,
                      ridge: float = SPECTRAL_RIDGE) -> torch.Tensor:
    """Weights on the stored values of a ridge-regularised Chebyshev fit over step index (mapped to [-1, 1] across
    the run's ``steps``), evaluated at step ``at``."""
    def design(indices: list[int]) -> torch.Tensor:
        taus = torch.tensor([i / steps * 2.0 - 1.0 for i in indices], dtype=torch.float64)
        columns = [torch.ones_like(taus), taus]
        for _ in range(2, degree + 1):
            columns.append(2 * taus * columns[-1] - columns[-2])
        return torch.stack(columns[:degree + 1], dim=1)

    fitted = design(times)
    gram = fitted.T @ fitted + ridge * torch.eye(degree + 1, dtype=torch.float64)
    return (design([at]) @ torch.linalg.solve(gram, fitted.T)).squeeze(0)


def quadratic_weights(times: list[float], at: float) -> torch.Tensor:
    """Weights on the stored values of the parabola through the last three (the line through two, or the last value
    alone, when fewer are stored)."""
    if len(times) < 3:
        return linear_weights(times, at)
    weights = torch.zeros(len(times), dtype=torch.float64)
    last = times[-3:]
    for j, tj in enumerate(last):
        weights[len(times) - 3 + j] = math.prod((at - tm) / (tj - tm) for m, tm in enumerate(last) if m != j)
    return weights


def spectral_weights(times: list[int], at: int, steps: int) -> torch.Tensor:
    """Spectrum's forecast as weights on the stored values: ``0.75 * linear + 0.25 * Chebyshev fit``."""
    return ((1 - SPECTRAL_BLEND) * linear_weights(times, at)
            + SPECTRAL_BLEND * chebyshev_weights(times, at, steps))


def combine(weights: torch.Tensor, values: list[torch.Tensor]) -> torch.Tensor:
    """``sum_i weights[i] * values[i]``, elementwise in float32."""
    out = None
    for w, v in zip(weights.tolist(), values):
        term = v * w
        out = term if out is None else out + term
    return out


class X0Ensemble:
    """Per-image mix of x0 forecasts (``forecasts``, a subset of :data:`FORECASTS` that includes ``reuse``; by default
    reuse, linear and spectral), weighted by their a-posteriori errors (see the module docstring). ``steps`` is the
    run's length (the spectral fit's time axis); ``decay`` the weight of the older errors in the running mean;
    ``positions`` (one per step, strictly monotone) where the linear and quadratic forecasts place each step instead
    of its index."""

    FORECASTS = ("reuse", "linear", "quadratic", "spectral")
    STOCHASTIC = ("reuse", "linear", "spectral")

    def __init__(self, steps: int, decay: float = 0.5, memory: int = SPECTRAL_MEMORY,
                 forecasts: tuple[str, ...] = STOCHASTIC, positions: Sequence[float] | None = None) -> None:
        unknown = [name for name in forecasts if name not in self.FORECASTS]
        if unknown or "reuse" not in forecasts:
            raise ValueError(f"forecasts must be a subset of {', '.join(self.FORECASTS)} that includes 'reuse', "
                             f"got {forecasts!r}")
        if positions is not None and len(positions) < steps:
            raise ValueError(f"positions must give each of the {steps} steps a position, got {len(positions)}")
        self.steps, self.decay, self.memory, self.forecasts = steps, decay, memory, tuple(forecasts)
        self.positions = None if positions is None else [float(p) for p in positions[:steps]]
        self.times: list[int] = []
        self.values: list[torch.Tensor] = []
        self.errors: dict[str, torch.Tensor] = {}

    def clear(self) -> None:
        self.times, self.values, self.errors = [], [], {}

    def __bool__(self) -> bool:
        return bool(self.values)

    def _forecasts(self, at: int) -> dict[str, torch.Tensor]:
        last = self.values[-1]
        if len(self.values) < 2:
            return {"reuse": last}
        times, position = self.times, at
        if self.positions is not None:
            times, position = [self.positions[t] for t in self.times], self.positions[at]
        weights = {"linear": lambda: linear_weights(times, position),
                   "quadratic": lambda: quadratic_weights(times, position),
                   "spectral": lambda: spectral_weights(self.times, at, self.steps)}
        return {name: last if name == "reuse" else combine(weights[name](), self.values) for name in self.forecasts}

    def forecast(self, at: int) -> torch.Tensor:
        """The x0 forecast for step ``at``: the error-weighted mix of the forecasts scored so far (reuse before any
        has been)."""
        forecasts = self._forecasts(at)
        scored = [name for name in forecasts if name in self.errors]
        if not scored:
            return forecasts["reuse"]
        errors = torch.stack([self.errors[name] for name in scored])  # [forecasts, batch]
        weights = errors.clamp_min(torch.finfo(errors.dtype).tiny).rsqrt()
        weights = weights / weights.sum(0)
        out = None
        for name, w in zip(scored, weights):
            term = forecasts[name] * w.view(-1, *[1] * (forecasts[name].ndim - 1))
            out = term if out is None else out + term
        return out

    def observe(self, at: int, x0: torch.Tensor) -> None:
        """A computed step's x0: score each forecast the earlier steps would have made for it, then store it."""
        x0 = x0.float()
        if self.values:
            for name, predicted in self._forecasts(at).items():
                error = (predicted - x0).square().flatten(1).mean(1)
                previous = self.errors.get(name)
                self.errors[name] = error if previous is None else self.decay * previous + (1 - self.decay) * error
        self.times = (self.times + [at])[-self.memory:]
        self.values = (self.values + [x0])[-self.memory:]
