"""The AdaptiveDiffusion paper's analysis tool: the greedy optimal skip path of one sample."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from ..oracles import Decision, FullCFG, Schedule
from ..sampling import SAMPLERS
from .metrics import psnr


def greedy_skip_path(model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
                     extra_args: Mapping[str, Any], sampler: str = "euler", min_psnr: float = 40.0,
                     warmup: int = 4, data_range: float = 2.0, **sampler_kwargs: Any) -> Schedule:
    """Walk the steps in order and skip (CACHED) each one whose skip keeps the final image within ``min_psnr`` dB of
    the full-CFG output (every image of the batch, if ``x`` holds several); returns the plan as a :class:`Schedule`.

    Every trial reruns the whole sample, so the cost is about ``steps`` sampling runs. The first ``warmup`` steps
    are never skipped (the estimator cannot skip them either), which keeps the two paths comparable.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not min_psnr > 0:
        raise ValueError(f"min_psnr must be a positive number of dB, got {min_psnr!r}")
    steps = len(sigmas) - 1
    if not isinstance(warmup, int) or not 1 <= warmup <= steps:
        raise ValueError(f"warmup must be an integer in [1, {steps}], got {warmup!r}")
    run = SAMPLERS[sampler]

    def final(oracle) -> torch.Tensor:
        torch.manual_seed(0)
        return run(model, x, sigmas, extra_args=dict(extra_args), disable=True, oracle=oracle, **sampler_kwargs)

    reference = final(FullCFG())
    plan = [Decision.FULL] * steps
    for i in range(warmup, steps):
        trial = plan.copy()
        trial[i] = Decision.CACHED
        if float(psnr(final(Schedule(trial)), reference, data_range).min()) >= min_psnr:
            plan = trial
    return Schedule(plan)
