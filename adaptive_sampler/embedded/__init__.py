"""The embedded models: two small class-conditional digits UNets, one per model family users run.

* The digits model (``load_denoiser``) is eps-parameterised on Stable Diffusion's discrete schedule and plugs into
  ``k_diffusion.external.DiscreteEpsDDPMDenoiser`` exactly as SD plugs into ``CompVisDenoiser``: the denoiser feeds
  it ``x * c_in`` (the variance-preserving latent) and a fractional timestep.
* The flow digits model (``load_flow_denoiser``) is the same network trained with rectified flow, as SD3, Flux and
  Wan are: velocity prediction, a logit-normal sigma, ``x = (1 - sigma) * x0 + sigma * noise``; it is a
  :class:`~adaptive_sampler.flow.FlowDenoiser` (sigma_max 1, ComfyUI's ``CONST``) with a schedule ``shift``.

Labels 0-9 are digits, label 10 is the null label used for the unconditional prediction. The weights ship in the
package (``weights/``) and are reproduced by ``python -m adaptive_sampler train-model``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch
from k_diffusion.external import DiscreteEpsDDPMDenoiser
from safetensors.torch import load_file

from ..flow import FlowDenoiser
from .classifier import DigitsClassifier
from .data import load_digits_dataset
from .unet import DigitsUNet

NUM_CLASSES = 10
NULL_LABEL = 10
IMAGE_SHAPE = (1, 16, 16)
WEIGHTS_DIR = Path(str(resources.files(__name__) / "weights"))

__all__ = ["NUM_CLASSES", "NULL_LABEL", "IMAGE_SHAPE", "WEIGHTS_DIR", "DigitsUNet", "DigitsClassifier",
           "sd_alphas_cumprod", "load_unet", "load_denoiser", "load_flow_unet", "load_flow_denoiser",
           "load_classifier", "load_digits_dataset", "reference_statistics"]


def sd_alphas_cumprod() -> torch.Tensor:
    """Stable Diffusion 1.x's discrete schedule: scaled-linear betas 0.00085 -> 0.012 over 1000 steps, computed in
    float64 and stored in float32 as CompVis (and so A1111's ``CompVisDenoiser``) does."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0).float()


def _weights(name: str) -> Path:
    path = WEIGHTS_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall the package or run "
                                "`python -m adaptive_sampler train-model`")
    return path


def _load(module: torch.nn.Module, name: str) -> torch.nn.Module:
    module.load_state_dict(load_file(str(_weights(name))))
    return module.eval().requires_grad_(False)


def load_unet() -> DigitsUNet:
    """A fresh copy of the shipped UNet (eval mode, float32)."""
    return _load(DigitsUNet(NUM_CLASSES), "unet.safetensors")


def load_denoiser(device: str | torch.device = "cpu") -> DiscreteEpsDDPMDenoiser:
    """The embedded UNet as a k-diffusion denoiser: ``denoiser(x, sigma, cond=labels)`` returns x0."""
    return DiscreteEpsDDPMDenoiser(load_unet(), sd_alphas_cumprod(), quantize=False).to(device)


def load_flow_unet() -> DigitsUNet:
    """A fresh copy of the shipped flow UNet (velocity prediction, timestep = sigma * 1000; eval mode, float32)."""
    return _load(DigitsUNet(NUM_CLASSES), "flow_unet.safetensors")


def load_flow_denoiser(shift: float = 1.0, device: str | torch.device = "cpu") -> FlowDenoiser:
    """The embedded flow UNet as a k-diffusion denoiser (``denoiser(x, sigma, cond=labels)`` returns x0), its schedule
    shifted by ``shift`` (1: as trained; SD3 samples with 3)."""
    return FlowDenoiser(load_flow_unet(), shift=shift).to(device)


def reference_statistics() -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64 numpy) of the classifier features of all real digits, for Fréchet distances."""
    stats = load_file(str(_weights("digits_reference.safetensors")))
    return stats["mu"].double().numpy(), stats["cov"].double().numpy()


def load_classifier() -> DigitsClassifier:
    """A fresh copy of the shipped digits classifier (eval mode)."""
    return _load(DigitsClassifier(), "classifier.safetensors")
