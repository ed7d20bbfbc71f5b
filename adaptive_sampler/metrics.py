"""Image-fidelity and sample-quality metrics for images in [-1, 1], shape ``[N, C, H, W]``.

PSNR and SSIM compare an accelerated image with the full-CFG image of the same seed; the classifier's accuracy and
the Fréchet distance in its feature space measure the samples themselves.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.ndimage
import torch

Stats = tuple[np.ndarray, np.ndarray]


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB (inf for identical images)."""
    _check_pair(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range ** 2 / mse)).float()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM with a Gaussian window (sigma 1.5, truncated at 3.5 sigma, reflected borders, border-cropped
    mean): the same numbers as ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)``, averaged over channels."""
    _check_pair(a, b)
    x, y = a.double().cpu().numpy(), b.double().cpu().numpy()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    pad = int(3.5 * sigma + 0.5)

    def blur(z: np.ndarray) -> np.ndarray:
        return scipy.ndimage.gaussian_filter(z, sigma=(0, 0, sigma, sigma), mode="reflect", truncate=3.5)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    s = s[..., pad:s.shape[-2] - pad, pad:s.shape[-1] - pad]
    return torch.from_numpy(s.mean(axis=(1, 2, 3))).float()


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"images must be two [N, C, H, W] tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _classifier(classifier):
    if classifier is None:
        from .embedded import load_classifier

        classifier = load_classifier()
    return classifier


@torch.no_grad()
def classifier_accuracy(images: torch.Tensor, labels: torch.Tensor, classifier=None) -> float:
    """Fraction of images the (embedded) digits classifier assigns to their conditioning label."""
    logits = _classifier(classifier)(images.float().clamp(-1, 1))
    return float((logits.argmax(1) == labels.to(logits.device)).float().mean())


@torch.no_grad()
def feature_statistics(images: torch.Tensor, classifier=None) -> Stats:
    """Mean and covariance of the classifier's penultimate features."""
    feats = _classifier(classifier).features(images.float().clamp(-1, 1)).double().cpu().numpy()
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(a: torch.Tensor | Stats, b: torch.Tensor | Stats, classifier=None) -> float:
    """Fréchet distance between two image sets (or precomputed feature statistics) in the classifier's features."""
    (mu1, s1), (mu2, s2) = (x if isinstance(x, tuple) else feature_statistics(x, classifier) for x in (a, b))
    # Fewer samples than feature dimensions make the covariances singular; a tiny ridge keeps sqrtm well posed.
    ridge = 1e-6 * np.eye(s1.shape[0])
    covmean = scipy.linalg.sqrtm((s1 + ridge) @ (s2 + ridge))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
