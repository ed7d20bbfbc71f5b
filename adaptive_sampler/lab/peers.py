"""The step skippers users already have, re-implemented as oracles for the bench (not user-facing modes).

* :class:`SpectrumRule` - Forge Neo's built-in "Spectrum Integrated" (``extensions-builtin/sd_forge_spectrum`` of
  Haoming02/sd-webui-forge-classic) with its UI defaults: ``warmup_steps`` 6, cache window 2 (alternate compute /
  forecast), window growth 0, the steps from ``stop_caching_step`` 0.9 on computed; a skipped step's denoised output
  is ``(1 - w) * linear extrapolation + w * Chebyshev ridge fit`` (w 0.25, degree 6, ridge 0.5, the last 8 computed
  outputs), over the step index: :func:`~adaptive_sampler.oracles.x0_forecast.spectral_weights`. Forge forecasts
  each CFG branch's denoised output and then combines them; both forecasts are linear in the stored outputs, so
  forecasting the guided output is the same.
* :class:`OutputChangeCache` - ComfyUI core's ``LazyCache`` (``comfy_extras/nodes_easycache.py``; guided output,
  ``PREDICT_NOISE`` level) and ``EasyCache`` (the same rule measured on the first conditional branch): skip while the
  accumulated estimate ``k * |x - x_prev| / |out_prev|`` stays under ``reuse_threshold`` (k = the last observed
  output/input change ratio), inside the ``start_percent`` .. ``end_percent`` window of the schedule; a skipped step
  outputs ``x + (out_prev - x_prev)``. Defaults as in core: threshold 0.2, window 0.15-0.95, input subsampled 8x.
"""

from __future__ import annotations

import math

import torch

from ..oracles.base import Decision, Oracle, RunInfo, StepRecord, StepState
from ..oracles.x0_forecast import SPECTRAL_MEMORY, combine, spectral_weights

__all__ = ["SpectrumRule", "OutputChangeCache", "spectrum_plan"]


def spectrum_plan(steps: int, warmup: int = 6, window: int = 2, stop: float = 0.9) -> frozenset[int]:
    """Steps Spectrum computes (window growth 0): warm-up, then one in ``window``, then everything from ``stop``."""
    computed, cached = set(), 0
    for cnt in range(steps):
        if cnt < warmup or cnt >= int(steps * stop) or (cached + 1) % window == 0:
            computed.add(cnt)
            cached = 0
        else:
            cached += 1
    return frozenset(computed)


class SpectrumRule(Oracle):
    """Forge Neo's Spectrum Integrated with its default settings (see the module docstring)."""

    name = "spectrum"

    def __init__(self, warmup: int = 6, window: int = 2, stop: float = 0.9) -> None:
        super().__init__()
        self.warmup, self.window, self.stop = warmup, window, stop
        self.plan: frozenset[int] = frozenset()
        self._buffer: list[tuple[int, torch.Tensor]] = []

    def __repr__(self) -> str:
        return f"SpectrumRule(warmup={self.warmup}, window={self.window}, stop={self.stop})"

    def _begin(self, run: RunInfo) -> None:
        self.plan = spectrum_plan(run.steps, self.warmup, self.window, self.stop)
        self._buffer = []

    def _conditioning_changed(self, state: StepState) -> None:
        self._buffer = []

    def _decide(self, state: StepState) -> Decision:
        return Decision.FULL if state.index in self.plan or not self._buffer else Decision.CACHED

    def _observe(self, record: StepRecord) -> None:
        if record.decision is not Decision.CACHED:
            self._buffer = (self._buffer + [(record.index, record.denoised.float())])[-SPECTRAL_MEMORY:]

    def cached_denoised(self, state: StepState) -> torch.Tensor:
        times = [t for t, _ in self._buffer]
        return combine(spectral_weights(times, state.index, self.run.steps), [v for _, v in self._buffer])


class OutputChangeCache(Oracle):
    """ComfyUI's LazyCache (``measure="guided"``) or EasyCache (``measure="cond"``) rule (see the module docstring).

    ``sigma_at(percent)`` maps a schedule percentage to sigma as ComfyUI's ``percent_to_sigma`` does for the model;
    the bench passes the embedded model's discrete schedule.
    """

    name = "output-change-cache"

    def __init__(self, sigma_at, measure: str = "guided", reuse_threshold: float = 0.2, start: float = 0.15,
                 end: float = 0.95, subsample: int = 8) -> None:
        super().__init__()
        if measure not in ("guided", "cond"):
            raise ValueError(f"measure must be 'guided' (LazyCache) or 'cond' (EasyCache), got {measure!r}")
        self.sigma_at, self.measure, self.threshold = sigma_at, measure, reuse_threshold
        self.start, self.end, self.subsample = start, end, subsample
        self._start_sigma = self._end_sigma = 0.0
        self._reset_state()

    def __repr__(self) -> str:
        kind = "LazyCache" if self.measure == "guided" else "EasyCache"
        return f"{kind}(reuse_threshold={self.threshold}, start={self.start}, end={self.end})"

    def _reset_state(self) -> None:
        self._x_prev: torch.Tensor | None = None
        self._out_prev: torch.Tensor | None = None
        self._out_norm: float | None = None
        self._rate: float | None = None
        self._input_change: float | None = None
        self._accumulated = 0.0
        self._diff: torch.Tensor | None = None

    def _begin(self, run: RunInfo) -> None:
        self._start_sigma, self._end_sigma = self.sigma_at(self.start), self.sigma_at(self.end)
        self._reset_state()

    def _conditioning_changed(self, state: StepState) -> None:
        self._reset_state()

    def _sub(self, t: torch.Tensor) -> torch.Tensor:
        return t[..., ::self.subsample, ::self.subsample].float()

    def _decide(self, state: StepState) -> Decision:
        self._input_change = None
        if state.sigma <= self._end_sigma or state.sigma > self._start_sigma or self._x_prev is None:
            return Decision.FULL
        self._input_change = float((self._sub(state.x) - self._x_prev).abs().mean())
        if self._out_norm is not None and self._rate is not None:
            self._accumulated += self._rate * self._input_change / self._out_norm
            if self._accumulated < self.threshold:
                return Decision.CACHED
            self._accumulated = 0.0
        return Decision.FULL

    def cached_denoised(self, state: StepState) -> torch.Tensor:
        return state.x.float() + self._diff

    def _observe(self, record: StepRecord) -> None:
        if record.decision is Decision.CACHED:
            return
        if record.sigma <= self._end_sigma:  # past the window: ComfyUI returns before touching its cache
            return
        out = record.denoised if self.measure == "guided" or record.cond is None else record.cond
        sub = self._sub(out)
        if self._out_prev is not None and self._input_change:
            output_change = float((sub - self._out_prev).abs().mean())
            self._rate = output_change / self._input_change
        self._diff = (record.denoised - record.x).float()
        self._x_prev, self._out_prev = self._sub(record.x), sub
        self._out_norm = float(out.float().abs().mean()) or math.inf
