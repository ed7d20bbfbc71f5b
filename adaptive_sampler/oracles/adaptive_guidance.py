"""Adaptive Guidance (Castillo et al. 2023) and the prediction spaces it compares cond and uncond in."""

from __future__ import annotations

import math

import torch

from .base import Decision, Oracle, RunInfo, StepRecord, StepState, _check_real

#: Prediction spaces in which Adaptive Guidance compares cond and uncond (see :func:`to_space`).
PREDICTION_SPACES = ("x0", "eps", "v")


def to_space(pred_x0: torch.Tensor, x: torch.Tensor, sigma: float, space: str) -> torch.Tensor:
    """Express a denoised (x0) prediction in another parameterisation, in float32.

    k-diffusion scaling: ``x = x0 + sigma * eps``. The v target of a variance-preserving model is
    ``(eps - sigma * x0) / sqrt(1 + sigma**2)``; the positive factor is dropped because only cosines are taken.
    """
    pred = pred_x0.float()
    if space == "x0":
        return pred
    eps = (x.float() - pred) / sigma
    if space == "eps":
        return eps
    return eps - sigma * pred


def per_sample_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each sample's flattened tensor (float32), shape ``[batch]``."""
    return torch.nn.functional.cosine_similarity(a.float().flatten(1), b.float().flatten(1), dim=1, eps=1e-12)



#: Default AG thresholds per prediction space, calibrated on the embedded model (see README, "Adaptive Guidance").
#: In x0 space gamma_t starts near 0.88 and rises monotonically, as in the paper's figure, and the published 0.991
#: switches an image 35-55% through the steps; v space behaves like x0 at high noise and like eps at low noise, so its
#: default is slightly lower. eps space has no default: there gamma_t starts above 0.9997 and *falls* along the
#: trajectory (it is not monotone), so any fixed threshold either switches at the first step or never.
DEFAULT_AG_THRESHOLDS = {"x0": 0.991, "v": 0.99}


class AdaptiveGuidance(Oracle):
    """Adaptive Guidance (Castillo et al. 2023): full CFG until the conditional and unconditional predictions agree.

    On every FULL step gamma_t, the cosine similarity of the cond and uncond predictions over each sample's
    flattened tensor, is computed in ``space`` (``"x0"``, ``"eps"`` or ``"v"``). Once gamma_t >= ``threshold`` for
    *every* sample it sees, all later steps are conditional-only (sticky switch; the crossing step itself was
    already computed with full CFG). Our sampling loops give each image its own oracle (:attr:`decides_per_image`),
    so each image switches when it crosses, whatever its batch; the WebUI hosts, which evaluate a batch in one call,
    switch a batch when its last image crosses. ``threshold >= 1`` disables the switch.
    A conditioning change (prompt editing) restarts the test: that step runs full CFG and gamma is measured again.
    """

    name = "ag"
    decides_per_image = True
    adapts_guidance = True

    def __init__(self, threshold: float | None = None, space: str = "x0") -> None:
        super().__init__()
        if space not in PREDICTION_SPACES:
            raise ValueError(f"space must be one of {PREDICTION_SPACES}, got {space!r}")
        self.space = space
        if threshold is None:
            if space not in DEFAULT_AG_THRESHOLDS:
                raise ValueError(f"threshold: there is no calibrated default in {space!r} space (gamma_t starts above "
                                 "0.9997 and is not monotone there); pass threshold= explicitly, e.g. from "
                                 "`python -m adaptive_sampler tune`, or use space='x0'")
            threshold = DEFAULT_AG_THRESHOLDS[space]
        self.threshold = _check_real("threshold", threshold, -1.0, math.inf,
                                     "a finite number >= -1 (cosine similarity; >= 1 disables the switch)")
        self.gammas: list[float | None] = []
        self._switched_at: int | None = None

    def __repr__(self) -> str:
        return f"AdaptiveGuidance(threshold={self.threshold}, space={self.space!r})"

    @property
    def switch_step(self) -> int | None:
        return self._switched_at

    @property
    def switched(self) -> bool:
        return self._switched_at is not None

    def _begin(self, run: RunInfo) -> None:
        self.gammas = []
        self._switched_at = None

    def _conditioning_changed(self, state: StepState) -> None:
        self._switched_at = None

    def _decide(self, state: StepState) -> Decision:
        return Decision.COND if self.switched else Decision.FULL

    def _observe(self, record: StepRecord) -> None:
        gamma = None
        if record.decision is Decision.FULL and record.cond is not None and record.uncond is not None:
            c = to_space(record.cond, record.x, record.sigma, self.space)
            u = to_space(record.uncond, record.x, record.sigma, self.space)
            gamma = float(per_sample_cosine(c, u).min())
            if not self.switched and self.threshold < 1.0 and gamma >= self.threshold:
                self._switched_at = record.index
        self.gammas.extend([None] * (record.index - len(self.gammas)))
        self.gammas.append(gamma)
