"""Flow-matching (rectified-flow) models as k-diffusion denoisers, ComfyUI's ``CONST`` convention.

SD3/3.5, Flux, Chroma, Wan, Qwen-Image, Z-Image and their kin are trained on ``x = (1 - sigma) * x0 + sigma * noise``
with sigma in (0, 1] and predict a velocity ``v = noise - x0``; the denoised image is ``x - sigma * v``. As a
k-diffusion denoiser (``model(x, sigma, **kwargs) -> denoised``) such a model is recognised by its ``sigma_max`` of 1.
Its schedules are "shifted": ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)`` (SD3's shift; Flux's
resolution-dependent ``mu`` is the same map with ``shift = exp(mu)``).

Samplers treat such a model differently where ComfyUI does (:mod:`adaptive_sampler.sampling`): Euler a takes the
rectified-flow ancestral step and the DPM++ SDE samplers step in half-log-SNR ``log((1 - sigma) / sigma)``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["time_snr_shift", "FlowDenoiser", "is_flow_model", "resolve_flow", "half_log_snr", "FIRST_SIGMA_OFFSET"]

#: ComfyUI's ``offset_first_sigma_for_snr``: a flow run that starts at sigma 1 (log-SNR -inf) starts its half-log-SNR
#: samplers at the sigma of this schedule percentage instead.
FIRST_SIGMA_OFFSET = 1e-4


def time_snr_shift(shift: float, t: torch.Tensor | float) -> torch.Tensor | float:
    """SD3's schedule shift (ComfyUI's ``time_snr_shift``): ``shift * t / (1 + (shift - 1) * t)``."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def half_log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """``log(alpha / sigma) = log((1 - sigma) / sigma)`` of a flow model's sigma (ComfyUI's ``sigma_to_half_log_snr``
    for ``CONST``)."""
    return sigma.logit().neg()


class FlowDenoiser(nn.Module):
    """A velocity-prediction network as a k-diffusion denoiser: ``denoiser(x, sigma, **kwargs)`` returns
    ``x - sigma * v`` with ``v = inner(x, sigma * multiplier, **kwargs)``, as ComfyUI's ``ModelSamplingDiscreteFlow``
    feeds the network (timestep = sigma * 1000) and ``CONST`` forms the denoised image.

    ``shift`` shifts the model's schedule (:func:`time_snr_shift`): ``sigmas`` (ascending, one per training timestep,
    as ComfyUI keeps them), :meth:`get_sigmas` (the "simple" schedule: ``n`` steps evenly in timestep from sigma 1,
    then 0) and :meth:`percent_to_sigma`.
    """

    def __init__(self, inner: Callable[..., torch.Tensor], shift: float = 1.0, timesteps: int = 1000,
                 multiplier: float = 1000.0) -> None:
        super().__init__()
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
            raise ValueError(f"shift must be a positive number (1 = unshifted; SD3 uses 3), got {shift!r}")
        self.inner_model = inner
        self.shift = float(shift)
        self.multiplier = float(multiplier)
        self.register_buffer("sigmas", self.sigma(torch.arange(1, timesteps + 1, dtype=torch.float32) / timesteps))

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The sigma of schedule time ``t`` in [0, 1] (shifted)."""
        return time_snr_shift(self.shift, t)

    def percent_to_sigma(self, percent: float) -> float:
        """ComfyUI's ``percent_to_sigma``: the sigma at ``percent`` of the way through the schedule."""
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return float(time_snr_shift(self.shift, 1.0 - percent))

    def get_sigmas(self, n: int) -> torch.Tensor:
        """``n`` steps evenly spaced in schedule time from sigma 1, shifted, then 0 (ComfyUI's "simple" schedule for
        step counts that divide 1000)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n (steps) must be a positive integer, got {n!r}")
        t = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
        return self.sigma(t).float().to(self.sigmas.device)

    def with_shift(self, shift: float) -> "FlowDenoiser":
        """The same network on a schedule shifted by ``shift`` (as ComfyUI's ``ModelSamplingSD3`` node does)."""
        return FlowDenoiser(self.inner_model, shift, len(self.sigmas), self.multiplier).to(self.sigmas.device)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        s = sigma.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        velocity = self.inner_model(x, sigma * self.multiplier, **kwargs)
        return x - s * velocity


def is_flow_model(model: Any) -> bool:
    """Whether a k-diffusion-style denoiser follows the flow convention: its ``sigma_max`` is 1."""
    sigma_max = getattr(model, "sigma_max", None)
    if sigma_max is None:
        return False
    try:
        return math.isclose(float(sigma_max), 1.0, rel_tol=0.0, abs_tol=1e-6)
    except (TypeError, ValueError):
        return False


def resolve_flow(model: Any, flow: bool | None, sigmas: torch.Tensor) -> bool:
    """The run's convention: ``flow`` if given (True / False), else :func:`is_flow_model`. A flow run's sigmas must lie
    in [0, 1]."""
    if flow is not None and not isinstance(flow, bool):
        raise TypeError(f"flow must be True, False or None (recognise the model by its sigma_max), got {flow!r}")
    flow = is_flow_model(model) if flow is None else flow
    if flow and isinstance(sigmas, torch.Tensor) and sigmas.numel() and float(sigmas.max()) > 1.0:
        raise ValueError(f"a flow model's sigmas lie in [0, 1] (x = (1 - sigma) * x0 + sigma * noise), got a "
                         f"schedule starting at {float(sigmas.max()):.4g}; pass flow=False for a model of another kind")
    return flow
