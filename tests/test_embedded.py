"""The embedded model plugs into k-diffusion as SD does, ships its weights, and CFG on it is real."""

import pytest
import torch
import k_diffusion as K

from adaptive_sampler import embedded
from adaptive_sampler.embedded.train import train_model
from adaptive_sampler.experiment import embedded_target, generate
from adaptive_sampler.metrics import classifier_accuracy


def test_schedule_is_stable_diffusions(denoiser):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    assert isinstance(denoiser, K.external.DiscreteEpsDDPMDenoiser)
    # float32 alphas_cumprod (as SD stores them) limit the agreement near t = 0
    assert torch.allclose(denoiser.sigmas.double(), ((1 - alphas) / alphas).sqrt(), rtol=2e-4)
    assert denoiser.sigma_max.item() == pytest.approx(14.6146, abs=1e-3)
    assert denoiser.sigma_min.item() == pytest.approx(0.02916, abs=1e-4)


def test_weights_ship_in_the_package_and_are_small():
    for name in ("unet.safetensors", "classifier.safetensors", "digits_reference.safetensors"):
        path = embedded.WEIGHTS_DIR / name
        assert path.exists() and path.stat().st_size < 4_000_000


def test_the_unet_predicts_eps_on_the_vp_scaled_input(denoiser):
    """x = x0 + sigma * eps; the denoiser must recover a real digit from a lightly noised one."""
    images, labels = embedded.load_digits_dataset("test")
    x0, y = images[:32], labels[:32]
    sigma = torch.full((32,), 0.3)
    noised = x0 + sigma[:, None, None, None] * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    denoised = denoiser(noised, sigma, cond=y)
    assert (denoised - x0).pow(2).mean() < 0.25 * (noised - x0).pow(2).mean()


def test_classifier_is_accurate_on_held_out_digits():
    images, labels = embedded.load_digits_dataset("test")
    assert classifier_accuracy(images, labels) >= 0.95


def test_guidance_is_real_and_guided_samples_are_recognisable():
    target = embedded_target()
    labels = [j % 10 for j in range(100)]
    seeds = list(range(100))
    acc = {}
    for scale in (1.0, 3.0):
        images, _ = generate(target, "euler", 50, scale, labels, seeds)
        acc[scale] = classifier_accuracy(images, torch.tensor(labels))
    assert acc[3.0] >= 0.9
    assert acc[3.0] > acc[1.0]


def test_training_is_seeded_and_learns(tmp_path):
    torch.set_num_threads(1)
    a = train_model(tmp_path / "a.safetensors", seed=3, iterations=40, batch_size=16, progress=False)
    b = train_model(tmp_path / "b.safetensors", seed=3, iterations=40, batch_size=16, progress=False)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert a["final_loss"] == b["final_loss"] < 1.0
