"""Calibration: record full-CFG trajectories and fit LinearAG's per-step coefficients."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from ..oracles import FullCFG, StepRecord
from ..oracles.linear_ag import LinearAGCoefficients, fit_coefficients
from .experiment import Target, generate, sigmas_for

#: Calibration seeds start here, far from the bench's and the tests' seeds.
CALIBRATION_SEED = 100_000


class _Recorder(FullCFG):
    """Full CFG that keeps each step's cond and uncond eps."""

    def _begin(self, run) -> None:
        self.trajectory: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _observe(self, record: StepRecord) -> None:
        x = record.x.float()
        self.trajectory.append(((x - record.cond.float()) / record.sigma, (x - record.uncond.float()) / record.sigma))


def trajectories(target: Target, sampler: str, steps: int, scales: Sequence[float], samples: int,
                 batch: int = 64, progress: bool = True) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Full-CFG eps trajectories over ``samples`` seeded samples per guidance scale, labels cycling over classes."""
    jobs = [(scale, start) for scale in scales for start in range(0, samples, batch)]
    for scale, start in tqdm(jobs, desc=f"calibrating {sampler}/{steps}", disable=not progress):
        n = min(batch, samples - start)
        seeds = [CALIBRATION_SEED + start + j for j in range(n)]
        labels = [s % target.num_classes for s in seeds]
        recorder = _Recorder()
        generate(target, sampler, steps, scale, labels, seeds, oracle=recorder)
        yield recorder.trajectory


def calibrate_linear_ag(target: Target, sampler: str, steps: int, scales: Sequence[float] = (3.0, 5.0),
                        samples: int = 128, progress: bool = True) -> LinearAGCoefficients:
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not scales:
        raise ValueError("scales must name at least one guidance scale")
    sigmas = sigmas_for(target, sampler, steps)
    return fit_coefficients(trajectories(target, sampler, steps, scales, samples, progress=progress),
                            sampler=sampler, sigmas=sigmas.tolist(), model=target.name, cond_scales=scales)


def shipped_coefficients_path(sampler: str, steps: int) -> Path:
    return Path(str(resources.files("adaptive_sampler") / "data" / f"linear_ag_embedded_{sampler}_{steps}.json"))


def embedded_coefficients(sampler: str, steps: int) -> LinearAGCoefficients:
    """The coefficients shipped for the embedded model, or a clear error naming the command that makes them."""
    path = shipped_coefficients_path(sampler, steps)
    if not path.exists():
        raise ValueError(f"no shipped LinearAG coefficients for the embedded model with {sampler}/{steps} steps; run "
                         f"`python -m adaptive_sampler calibrate-linear-ag --sampler {sampler} --steps {steps}`")
    return LinearAGCoefficients.load(path)
