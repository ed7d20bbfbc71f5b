"""scikit-learn's bundled digits (no download), upsampled to 16x16 and scaled to [-1, 1]."""

from __future__ import annotations

import torch

#: The last images (in the file's order) are held out for the classifier's accuracy check.
HELD_OUT = 297


def load_digits_dataset(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 1, 16, 16]`` in [-1, 1] and labels ``[N]`` for ``split`` in ``train``, ``test``, ``all``."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data comes from scikit-learn: pip install scikit-learn") from exc
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False) * 2 - 1
    y = torch.tensor(digits.target, dtype=torch.long)
    if split == "train":
        return x[:-HELD_OUT], y[:-HELD_OUT]
    if split == "test":
        return x[-HELD_OUT:], y[-HELD_OUT:]
    return x, y
