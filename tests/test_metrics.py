"""Metrics agree with scikit-image and the standard FID formula, and behave as distances should."""

import numpy as np
import pytest
import scipy.linalg
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from adaptive_sampler import embedded
from adaptive_sampler.lab.metrics import PSNR_CAP, classifier_accuracy, feature_statistics, frechet_distance, psnr, ssim


@pytest.fixture(autouse=True)
def one_thread():
    """As in test_embedded: one intra-op thread is faster for these small batches, and far faster on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pairs():
    images, _ = embedded.load_digits_dataset("test")
    a = images[:12]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(a.shape, generator=g) * torch.linspace(0.02, 0.8, 12)[:, None, None, None]
    return a, (a + noise).clamp(-1, 1)


@pytest.fixture(scope="module")
def classifier():
    return embedded.load_classifier()


def test_psnr_matches_skimage(pairs):
    a, b = pairs
    ours = psnr(a, b)
    for k in range(len(a)):
        ref = peak_signal_noise_ratio(a[k, 0].double().numpy(), b[k, 0].double().numpy(), data_range=2.0)
        assert ours[k].item() == pytest.approx(ref, abs=1e-4)
    assert (psnr(a, a) == PSNR_CAP).all()  # identical images: the cap, so means over images stay finite


def test_ssim_matches_skimage(pairs):
    a, b = pairs
    ours = ssim(a, b)
    for k in range(len(a)):
        ref = structural_similarity(a[k, 0].double().numpy(), b[k, 0].double().numpy(), data_range=2.0,
                                    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert ours[k].item() == pytest.approx(ref, abs=1e-4)
    assert ours.max() - ours.min() > 0.3  # the pairs span similar to dissimilar
    assert torch.allclose(ssim(a, a), torch.ones(len(a)))


def test_ssim_matches_skimage_on_multichannel_images():
    g = torch.Generator().manual_seed(2)
    a = torch.rand((3, 3, 20, 24), generator=g) * 2 - 1
    b = (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    ref = [structural_similarity(a[k].double().numpy(), b[k].double().numpy(), data_range=2.0, channel_axis=0,
                                 gaussian_weights=True, sigma=1.5, use_sample_covariance=False) for k in range(3)]
    assert torch.allclose(ssim(a, b).double(), torch.tensor(ref), atol=1e-4)


def test_ssim_needs_room_for_its_window(pairs):
    a, _ = pairs
    with pytest.raises(ValueError, match="11x11"):
        ssim(a[:, :, :8, :8], a[:, :, :8, :8])


def test_frechet_distance_is_zero_for_a_set_with_itself_and_grows_with_noise(classifier):
    images, _ = embedded.load_digits_dataset("all")
    g = torch.Generator().manual_seed(1)
    assert abs(frechet_distance(images, images, classifier)) < 1e-6
    d = [frechet_distance(images, (images + s * torch.randn(images.shape, generator=g)).clamp(-1, 1), classifier)
         for s in (0.1, 0.3, 0.6)]
    assert 0 < d[0] < d[1] < d[2]
    reference = embedded.reference_statistics()
    assert abs(frechet_distance(images, reference)) < 1e-3


def test_frechet_distance_is_the_fid_formula(classifier):
    """Same number as the textbook ``scipy.linalg.sqrtm`` formula, which needs non-singular covariances and so is
    applied to the features that are alive (dead ReLU units are 0 on every image and add nothing); symmetric; and
    still ~0 for a small set with itself (a singular covariance)."""
    images, _ = embedded.load_digits_dataset("all")
    (mu1, s1), (mu2, s2) = feature_statistics(images[:900], classifier), feature_statistics(images[900:], classifier)
    alive = np.flatnonzero((np.diag(s1) > 0) & (np.diag(s2) > 0))
    assert 0 < len(alive) < len(mu1)
    l1, l2 = s1[np.ix_(alive, alive)], s2[np.ix_(alive, alive)]
    textbook = (((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(scipy.linalg.sqrtm(l1 @ l2).real))
    assert frechet_distance((mu1, s1), (mu2, s2)) == pytest.approx(textbook, rel=1e-6)
    assert frechet_distance((mu2, s2), (mu1, s1)) == pytest.approx(textbook, rel=1e-6)
    assert abs(frechet_distance(images[:20], images[:20], classifier)) < 1e-6


def test_classifier_accuracy_counts_matching_labels(classifier):
    images, labels = embedded.load_digits_dataset("test")
    predicted = classifier(images).argmax(1)
    wrong = (predicted + 1) % 10
    assert classifier_accuracy(images, predicted, classifier) == 1.0
    assert classifier_accuracy(images, wrong, classifier) == 0.0
    assert classifier_accuracy(images, labels) == classifier_accuracy(images, labels, classifier)


def test_mismatched_shapes_are_a_clear_error(pairs):
    a, b = pairs
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, b[:3])
    with pytest.raises(ValueError, match="same shape"):
        ssim(a, b[:3])
