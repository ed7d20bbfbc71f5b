"""Shared fixtures: the embedded model (real weights shipped in the package) and a row-counting wrapper."""

import pytest
import torch

from adaptive_sampler import embedded


class CountingModel(torch.nn.Module):
    """Wraps a k-diffusion denoiser and counts the rows (samples) it is called with: the real NFE."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.rows = 0
        self.calls = 0

    def forward(self, x, sigma, **kwargs):
        self.rows += x.shape[0]
        self.calls += 1
        return self.inner(x, sigma, **kwargs)

    @property
    def sigmas(self):
        return self.inner.sigmas

    @property
    def sigma_max(self):  # a flow model (sigma_max 1) stays recognisable through the counter
        return self.inner.sigma_max

    def percent_to_sigma(self, percent):
        return self.inner.percent_to_sigma(percent)


@pytest.fixture(scope="session")
def denoiser():
    torch.set_num_threads(2)
    return embedded.load_denoiser()


@pytest.fixture
def counting(denoiser):
    return CountingModel(denoiser)


def guided_args(batch, scale=3.0, seed=0):
    labels = torch.arange(batch) % embedded.NUM_CLASSES
    return dict(cond=labels, uncond=torch.full_like(labels, embedded.NULL_LABEL), cond_scale=scale)


def initial_noise(batch, sigma0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *embedded.IMAGE_SHAPE), generator=g) * sigma0


def plain_cfg(model):
    """The textbook CFG wrapper k-diffusion users write: one batched call, uncond + (cond - uncond) * scale."""
    def cfg(x, sigma, cond, uncond, cond_scale):
        c, u = model(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond])).chunk(2)
        return u + (c - u) * cond_scale
    return cfg
