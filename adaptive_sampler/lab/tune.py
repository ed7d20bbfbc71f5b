"""Threshold tuning: find an oracle's setting that meets a PSNR or NFE target on calibration seeds.

Each oracle family has one knob mapped to an "aggressiveness" u in [0, 1] (0 = conservative: full quality, full
NFE; 1 = aggressive). Quality falls and savings grow with u, so a coarse grid followed by bisection finds the most
aggressive setting that keeps the mean PSNR against full CFG at or above the target (``target_psnr``), or the most
conservative one whose NFE ratio is at or below the target (``target_nfe``).

``level`` tunes the default's one knob: u maps to its levels (quality, balanced, fast), and the answer is a level.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable

from tqdm.auto import tqdm

from .. import oracles as O
from ..oracles import Forecast
from .experiment import Target, generate
from .metrics import psnr

#: Seeds for tuning, disjoint from the bench's (0..) and LinearAG calibration's (100000..).
TUNE_SEED = 200_000


def _log_interp(lo: float, hi: float, u: float) -> float:
    return math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))


@dataclass(frozen=True)
class Knob:
    """How u in [0, 1] maps to an oracle and its settings."""

    family: str
    make: Callable[[float], O.Oracle]
    describe: Callable[[float], dict]


def _ag_threshold(u: float) -> float:
    return 1 - _log_interp(1e-5, 5e-2, u)  # 0.99999 .. 0.95


def _level(u: float) -> str:
    levels = list(O.LEVELS)  # from the most conservative to the most aggressive
    return levels[min(int(u * len(levels)), len(levels) - 1)]


KNOBS = {
    "level": Knob("level", lambda u: Forecast(level=_level(u)), lambda u: {"level": _level(u)}),
    "ag": Knob("ag", lambda u: O.AdaptiveGuidance(threshold=_ag_threshold(u)),
               lambda u: {"threshold": round(_ag_threshold(u), 6), "space": "x0"}),
    "linear-ag": Knob("linear-ag", lambda u: O.LinearAG(threshold=_ag_threshold(u)),
                      lambda u: {"threshold": round(_ag_threshold(u), 6), "space": "x0", "coefficients": "delta rule"}),
    "adaptive-diffusion": Knob("adaptive-diffusion", lambda u: O.AdaptiveDiffusion(threshold=_log_interp(1e-4, 1.0, u)),
                               lambda u: {"threshold": round(_log_interp(1e-4, 1.0, u), 6), "max_skips": 4, "warmup": 4}),
    "compose": Knob("compose",
                    lambda u: O.Compose(O.AdaptiveGuidance(threshold=_ag_threshold(u)),
                                        O.AdaptiveDiffusion(threshold=_log_interp(1e-4, 1.0, u))),
                    lambda u: {"ag_threshold": round(_ag_threshold(u), 6),
                               "ad_threshold": round(_log_interp(1e-4, 1.0, u), 6)}),
    "forecast": Knob("forecast", lambda u: Forecast(budget=1.0 - 0.8 * u),
                     lambda u: {"budget": round(1.0 - 0.8 * u, 4), "order": 2, "warmup": 2}),
}


def tune(target: Target, oracle: str, sampler: str, steps: int, scale: float, images: int = 32,
         target_psnr: float | None = None, target_nfe: float | None = None, grid: int = 6, refine: int = 5,
         progress: bool = True) -> dict:
    """Search the oracle's knob; returns the chosen settings with their measured NFE ratio and PSNR."""
    if oracle not in KNOBS:
        raise ValueError(f"oracle must be one of {', '.join(KNOBS)}, got {oracle!r}")
    if (target_psnr is None) == (target_nfe is None):
        raise ValueError("give exactly one of target_psnr (dB) and target_nfe (a ratio in (0, 1])")
    if target_psnr is not None and not target_psnr > 0:
        raise ValueError(f"target_psnr must be a positive number of dB, got {target_psnr}")
    if target_nfe is not None and not 0 < target_nfe <= 1:
        raise ValueError(f"target_nfe must be in (0, 1], got {target_nfe}")
    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    knob = KNOBS[oracle]
    seeds = [TUNE_SEED + j for j in range(images)]
    labels = [s % target.num_classes for s in seeds]
    full, full_summary = generate(target, sampler, steps, scale, labels, seeds)
    bar = tqdm(total=grid + refine, desc=f"tune {oracle}", disable=not progress)
    cache: dict[str, tuple[float, float]] = {}  # by setting: several u can give one (the levels)

    def measure(u: float) -> tuple[float, float]:
        key = json.dumps(knob.describe(u), sort_keys=True)
        if key not in cache:
            imgs, summary = generate(target, sampler, steps, scale, labels, seeds, oracle=knob.make(u))
            cache[key] = (summary.nfe_ratio / full_summary.nfe_ratio, float(psnr(imgs, full).mean()))
        bar.update(1)
        return cache[key]

    def ok(u: float) -> bool:
        nfe, quality = measure(u)
        return quality >= target_psnr if target_psnr is not None else nfe <= target_nfe

    # The feasible side: small u for a PSNR target, large u for an NFE target.
    want_large = target_psnr is not None
    us = [k / (grid - 1) for k in range(grid)]
    feasible = [u for u in us if ok(u)]
    if not feasible:
        bar.close()
        best = max(us, key=lambda u: measure(u)[1]) if want_large else min(us, key=lambda u: measure(u)[0])
        return dict(met=False, oracle=oracle, settings=knob.describe(best), nfe_ratio=measure(best)[0],
                    psnr=measure(best)[1], u=best)
    u_ok = max(feasible) if want_large else min(feasible)
    step = 1 / (grid - 1)
    u_bad = u_ok + step if want_large else u_ok - step
    if 0 <= u_bad <= 1:
        for _ in range(refine):
            mid = (u_ok + u_bad) / 2
            if ok(mid):
                u_ok = mid
            else:
                u_bad = mid
    bar.close()
    nfe, quality = measure(u_ok)
    return dict(met=True, oracle=oracle, settings=knob.describe(u_ok), nfe_ratio=nfe, psnr=quality, u=u_ok,
                sampler=sampler, steps=steps, scale=scale, images=images)
