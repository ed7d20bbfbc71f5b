"""Image-fidelity and sample-quality metrics for images in [-1, 1], shape ``[N, C, H, W]``.

PSNR and SSIM compare an accelerated image with the full-CFG image of the same seed; the classifier's accuracy and
the Fréchet distance in its feature space measure the samples themselves.
"""

from __future__ import annotations

import numpy as np
import torch

Stats = tuple[np.ndarray, np.ndarray]

#: PSNR of identical images (and of differences below float32 rounding). A cap keeps a mean over images finite when
#: some of them are identical to the reference, as images that an adaptive rule left untouched are; tables show it
#: as "∞".
PSNR_CAP = 99.0


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB, at most :data:`PSNR_CAP` (identical images)."""
    _check_pair(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range ** 2 / mse)).clamp(max=PSNR_CAP).float()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) with a Gaussian window, averaged over channels.

    The window is scikit-image's: sigma 1.5 truncated at 3.5 sigma, i.e. 11 taps, and the SSIM map is averaged only
    where the window fits inside the image (the central 6x6 of a 16x16 image), so border handling never matters. A
    smaller window would weigh the digit's empty border more; keeping 11 gives exactly the numbers of
    ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.
    """
    _check_pair(a, b)
    radius = int(3.5 * sigma + 0.5)
    if min(a.shape[-2:]) < 2 * radius + 1:
        raise ValueError(f"images must be at least {2 * radius + 1}x{2 * radius + 1} for sigma {sigma}, "
                         f"got {tuple(a.shape[-2:])}")
    x, y = a.double(), b.double()
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64, device=x.device) / sigma) ** 2)
    taps = taps / taps.sum()
    channels = x.shape[1]
    rows = taps.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    cols = taps.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)

    def blur(z: torch.Tensor) -> torch.Tensor:
        z = torch.nn.functional.conv2d(z, rows, groups=channels)
        return torch.nn.functional.conv2d(z, cols, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=(2, 3)).mean(dim=1).float()


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"images must be two [N, C, H, W] tensors of the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")


def _classifier(classifier: torch.nn.Module | None) -> torch.nn.Module:
    if classifier is None:
        from ..embedded import load_classifier

        classifier = load_classifier()
    return classifier


@torch.no_grad()
def classifier_accuracy(images: torch.Tensor, labels: torch.Tensor, classifier: torch.nn.Module | None = None) -> float:
    """Fraction of images the (embedded) digits classifier assigns to their conditioning label."""
    logits = _classifier(classifier)(images.float().clamp(-1, 1))
    return float((logits.argmax(1) == labels.to(logits.device)).float().mean())


@torch.no_grad()
def feature_statistics(images: torch.Tensor, classifier: torch.nn.Module | None = None) -> Stats:
    """Mean and covariance (float64) of the classifier's penultimate features, to cache a reference set's."""
    feats = _classifier(classifier).features(images.float().clamp(-1, 1)).double().cpu().numpy()
    return feats.mean(0), np.cov(feats, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(w.clip(min=0))) @ v.T


def frechet_distance(a: torch.Tensor | Stats, b: torch.Tensor | Stats,
                     classifier: torch.nn.Module | None = None) -> float:
    """Fréchet distance between two image sets (or precomputed feature statistics) in the classifier's features:
    ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))``, as FID.

    ``tr(sqrtm(S1 S2))`` is computed as the nuclear norm of ``sqrt(S2) sqrt(S1)`` (the same number: its singular
    values are the square roots of the eigenvalues of ``sqrt(S1) S2 sqrt(S1)``, which is similar to ``S1 S2``). This
    stays exact for the singular covariances of small sample sets and dead ReLU features, where
    ``scipy.linalg.sqrtm`` of the non-symmetric product turns complex or needs a ridge that biases the result.
    """
    (mu1, s1), (mu2, s2) = (x if isinstance(x, tuple) else feature_statistics(x, classifier) for x in (a, b))
    tr_covmean = float(np.linalg.norm(_sqrt_psd(s2) @ _sqrt_psd(s1), ord="nuc"))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
