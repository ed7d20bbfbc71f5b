"""Metrics agree with scikit-image and behave as distances should."""

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from adaptive_sampler import embedded
from adaptive_sampler.metrics import frechet_distance, psnr, ssim


@pytest.fixture(scope="module")
def pairs():
    images, _ = embedded.load_digits_dataset("test")
    a = images[:12]
    g = torch.Generator().manual_seed(0)
    b = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    return a, b


def test_psnr_matches_skimage(pairs):
    a, b = pairs
    ours = psnr(a, b)
    for k in range(len(a)):
        ref = peak_signal_noise_ratio(a[k, 0].double().numpy(), b[k, 0].double().numpy(), data_range=2.0)
        assert ours[k].item() == pytest.approx(ref, abs=1e-4)
    assert torch.isinf(psnr(a, a)).all()


def test_ssim_matches_skimage(pairs):
    a, b = pairs
    ours = ssim(a, b)
    for k in range(len(a)):
        ref = structural_similarity(a[k, 0].double().numpy(), b[k, 0].double().numpy(), data_range=2.0,
                                    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert ours[k].item() == pytest.approx(ref, abs=1e-4)
    assert torch.allclose(ssim(a, a), torch.ones(len(a)))


def test_frechet_distance_is_zero_for_a_set_with_itself_and_grows_with_noise():
    images, _ = embedded.load_digits_dataset("all")
    g = torch.Generator().manual_seed(1)
    assert abs(frechet_distance(images, images)) < 1e-6
    d = [frechet_distance(images, (images + s * torch.randn(images.shape, generator=g)).clamp(-1, 1))
         for s in (0.1, 0.3, 0.6)]
    assert 0 < d[0] < d[1] < d[2]
    reference = embedded.reference_statistics()
    assert abs(frechet_distance(images, reference)) < 1e-3


def test_mismatched_shapes_are_a_clear_error(pairs):
    a, b = pairs
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, b[:3])
