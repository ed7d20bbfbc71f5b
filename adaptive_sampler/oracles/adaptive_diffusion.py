"""AdaptiveDiffusion (Ye et al. 2024): skip the network call where the latent trajectory is smooth."""

from __future__ import annotations

import math

import torch

from .base import Decision, Oracle, RunInfo, StepState, _check_int, _check_real

class AdaptiveDiffusion(Oracle):
    """AdaptiveDiffusion (Ye et al. 2024): skip the whole network call where the latent trajectory is smooth.

    With ``d_k = mean |x_k - x_{k-1}|`` over the latent it sees after step k's update, step k+1 is ``CACHED``
    iff ``|(d_k + d_{k-2}) / 2 - d_{k-1}| <= threshold * d_{k-1}`` (the official code's third-order estimator).
    The first ``warmup`` steps always run the network (at least 4: the estimator needs the latents of four
    completed steps, as in the official code), and never more than ``max_skips`` steps in a row are skipped.
    The official code's cap is ``len(mask) > 4 and not any(mask[-C_max:])``, whose hard-coded ``> 4`` lets five
    skips in a row through right after warm-up; here the cap holds everywhere.
    The official code decides per batch; our sampling loops give each image its own oracle (:attr:`decides_per_image`),
    so an image skips where its own trajectory is smooth, whatever its batch (the WebUI hosts still decide per batch).
    A skipped step reuses the last computed eps (x0 on stochastic samplers).
    ``threshold=0`` disables skipping. A run no longer than the warm-up (a short hires-fix or img2img pass) computes
    every step and says so in :attr:`overrides`: a pass's length is never an error.
    """

    name = "adaptive-diffusion"
    decides_per_image = True

    def __init__(self, threshold: float = 0.01, max_skips: int = 4, warmup: int = 4) -> None:
        super().__init__()
        self.threshold = _check_real("threshold", threshold, 0.0, math.inf, "a finite number >= 0")
        self.max_skips = _check_int("max_skips", max_skips, 1, "an integer >= 1 (0 skips: use FullCFG)")
        self.warmup = _check_int("warmup", warmup, 4, "an integer >= 4 (the estimator needs four completed steps)")
        self.estimates: list[float | None] = []
        self._prev_x: torch.Tensor | None = None
        self._diffs: list[float] = []

    def __repr__(self) -> str:
        return f"AdaptiveDiffusion(threshold={self.threshold}, max_skips={self.max_skips}, warmup={self.warmup})"

    def _begin(self, run: RunInfo) -> None:
        if 0 < run.steps <= self.warmup:
            self.overrides.append((0, f"warm-up ({self.warmup}) covers the whole {run.steps}-step run: "
                                      "every step computed"))
        self.estimates = []
        self._prev_x = None
        self._diffs = []

    def _conditioning_changed(self, state: StepState) -> None:
        # The latent stays continuous across a prompt change, but its motion does not: restart the estimator.
        self._prev_x = None
        self._diffs = []

    def _decide(self, state: StepState) -> Decision:
        return self._propose(state, self._consecutive_cached)

    def _propose(self, state: StepState, consecutive_cached: int) -> Decision:
        """FULL or CACHED for this step, given how many steps in a row were already skipped."""
        estimate = self._update(state)
        self.estimates.append(estimate)
        if state.index < self.warmup or estimate is None or consecutive_cached >= self.max_skips:
            return Decision.FULL
        return Decision.CACHED if self.threshold > 0 and estimate <= self.threshold else Decision.FULL

    def _update(self, state: StepState) -> float | None:
        """Push the latent left by the previous step; return the relative third-order estimate, if defined."""
        x = state.x.float()
        if state.index > 0:  # index 0 sees the initial noise, which the official code never stores
            if self._prev_x is not None:
                self._diffs = (self._diffs + [float((x - self._prev_x).abs().mean())])[-3:]
            self._prev_x = x
        if len(self._diffs) < 3:
            return None
        d_prev_prev, d_prev, d_cur = self._diffs
        deviation = abs((d_cur + d_prev_prev) / 2 - d_prev)
        if d_prev == 0.0:
            return 0.0 if deviation == 0.0 else math.inf
        return deviation / d_prev
