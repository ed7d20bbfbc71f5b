"""The sampler matrix: the default and the peers users already have, on every sampler the product exposes.

Every cell (sampler variant x schedule x steps x guidance scale) samples the same seeded images, with the same noise
draws, under full CFG and under each method, and reports PSNR / SSIM against the full-CFG image. Each peer (Forge
Neo's Spectrum rule, ComfyUI's LazyCache and EasyCache) runs at its own NFE and is paired with our default at the
same NFE (``Forecast(budget=peer's NFE ratio)``); the default at its own NFE is paired with "fewer steps" (full CFG
with half the steps, or the nearest lower count).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .. import oracles as O
from .experiment import Target, generate_variant, variant_schedules
from .metrics import psnr, ssim
from .peers import OutputChangeCache, SpectrumRule

#: (peer name, factory given the target) - each paired with our default at the peer's NFE.
PEERS: tuple[tuple[str, Callable[[Target], O.Oracle]], ...] = (
    ("Spectrum", lambda target: SpectrumRule()),
    ("LazyCache", lambda target: OutputChangeCache(percent_to_sigma(target))),
    ("EasyCache", lambda target: OutputChangeCache(percent_to_sigma(target), measure="cond")),
)


def percent_to_sigma(target: Target) -> Callable[[float], float]:
    """ComfyUI's ``percent_to_sigma`` for a discrete-schedule denoiser: the sigma of timestep ``(1 - p) * 999``."""
    model = target.model

    def sigma_at(percent: float) -> float:
        if percent <= 0.0:
            return math.inf
        if percent >= 1.0:
            return 0.0
        return float(model.t_to_sigma(torch.tensor((1.0 - percent) * (len(model.sigmas) - 1))))

    return sigma_at


@dataclass
class Pair:
    """One comparison at equal NFE: ``method`` (ours or a peer) against ``baseline`` in one cell."""

    variant: str
    schedule: str
    steps: int
    scale: float
    method: str
    nfe_ratio: float
    psnr: float
    ssim: float
    baseline: str
    baseline_nfe_ratio: float
    baseline_psnr: float
    baseline_ssim: float


def cell(target: Target, variant: str, schedule: str, steps: int, scale: float, labels: Sequence[int],
         seeds: Sequence[int]) -> list[Pair]:
    """The default vs fewer steps, and each peer vs the default at the peer's NFE, in one cell."""
    def run(oracle: O.Oracle, run_steps: int = steps) -> tuple[torch.Tensor, float]:
        images, summary = generate_variant(target, variant, schedule, run_steps, scale, labels, seeds, oracle=oracle)
        return images, summary.nfe / (2 * steps)

    reference, _ = run(O.FullCFG())

    def scores(images: torch.Tensor) -> tuple[float, float]:
        return float(psnr(images, reference).mean()), float(ssim(images, reference).mean())

    pairs = []
    ours, ours_ratio = run(O.recommended())
    fewer = max(1, int(math.floor(ours_ratio * steps + 1e-9)))
    baseline, baseline_ratio = run(O.FullCFG(), fewer)
    pairs.append(Pair(variant, schedule, steps, scale, "default", ours_ratio, *scores(ours),
                      f"fewer steps ({fewer})", baseline_ratio, *scores(baseline)))
    for name, make in PEERS:
        peer, peer_ratio = run(make(target))
        ours, ours_ratio = run(O.Forecast(budget=peer_ratio))
        pairs.append(Pair(variant, schedule, steps, scale, name, peer_ratio, *scores(peer),
                          "default at equal NFE", ours_ratio, *scores(ours)))
    return pairs


def run_matrix(target: Target, variants: Sequence[str], schedules: Sequence[str], steps: Sequence[int],
               scales: Sequence[float], images: int, seed: int = 0, progress: bool = True) -> list[Pair]:
    labels = [j % target.num_classes for j in range(images)]
    seeds = [seed + j for j in range(images)]
    pairs: list[Pair] = []
    grid = [(v, s, n, c) for v, s in variant_schedules(variants, schedules) for n in steps for c in scales]
    for variant, schedule, n, c in tqdm(grid, desc="sampler matrix", disable=not progress):
        pairs += cell(target, variant, schedule, n, c, labels, seeds)
    return pairs


def _db(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.1f}"


def markdown(pairs: Sequence[Pair]) -> str:
    """One table per method: a row per cell, PSNR of the method and its equal-NFE partner, and who wins."""
    out = []
    for method in dict.fromkeys(p.method for p in pairs):
        rows = [p for p in pairs if p.method == method]
        if method == "default":
            out.append("### The default (recommended) against fewer steps at equal NFE\n")
            out.append("| sampler | schedule | steps | scale | NFE ratio | PSNR dB | SSIM | fewer steps | PSNR dB | "
                       "verdict |")
        else:
            out.append(f"\n### {method} against the default at {method}'s NFE\n")
            out.append(f"| sampler | schedule | steps | scale | NFE ratio | {method} PSNR dB | SSIM | default NFE "
                       "ratio | default PSNR dB | verdict |")
        out.append("|---|---|---:|---:|---:|---:|---:|---|---:|---|")
        wins = 0
        for p in rows:
            ours_wins = p.psnr > p.baseline_psnr if method == "default" else p.baseline_psnr > p.psnr
            wins += ours_wins
            tie = abs(p.psnr - p.baseline_psnr) < 0.05
            verdict = "tie" if tie else ("**default wins**" if ours_wins else f"{'fewer steps' if method == 'default' else method} wins")
            partner = p.baseline if method == "default" else f"{p.baseline_nfe_ratio:.2f}"
            out.append(f"| {p.variant} | {p.schedule} | {p.steps} | {p.scale:g} | {p.nfe_ratio:.2f} | {_db(p.psnr)} | "
                       f"{p.ssim:.3f} | {partner} | {_db(p.baseline_psnr)} | {verdict} |")
        out.append(f"\nThe default wins {wins} of {len(rows)} cells.")
    return "\n".join(out) + "\n"


def summary(pairs: Sequence[Pair]) -> str:
    """Compact tables, one row per sampler and schedule, one column per steps/scale: the default against fewer steps,
    then against each peer at the peer's NFE ("ours / theirs (NFE ratio)", bold where the default wins)."""
    out = []
    columns = sorted({(p.steps, p.scale) for p in pairs})
    for method in dict.fromkeys(p.method for p in pairs):
        rows = [p for p in pairs if p.method == method]
        title = "the default / fewer steps" if method == "default" else f"the default / {method}, at {method}'s NFE"
        out.append(f"\n**PSNR dB, {title}:**\n")
        out.append("| sampler | schedule | " + " | ".join(f"{n} steps, scale {c:g}" for n, c in columns) + " | wins |")
        out.append("|---|---|" + "---:|" * (len(columns) + 1))
        for key in dict.fromkeys((p.variant, p.schedule) for p in rows):
            cells, wins = [], 0
            for n, c in columns:
                p = next(q for q in rows if (q.variant, q.schedule, q.steps, q.scale) == (*key, n, c))
                ours, theirs = (p.psnr, p.baseline_psnr) if method == "default" else (p.baseline_psnr, p.psnr)
                win = ours > theirs
                wins += win
                mark = "**" if win else ""
                cells.append(f"{mark}{_db(ours)}{mark} / {_db(theirs)} ({p.nfe_ratio:.2f})")
            out.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + f" | {wins}/{len(columns)} |")
    return "\n".join(out) + "\n"


def write(pairs: Sequence[Pair], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "samplers.md", out_dir / "samplers.json"
    md.write_text("## Every sampler: the default, fewer steps and the peers at equal NFE\n\n"
                  "PSNR against the full-CFG image with the same seeds and noise draws.\n" + summary(pairs)
                  + "\n## Every cell\n\n" + markdown(pairs))
    js.write_text(json.dumps([asdict(p) for p in pairs], indent=1, default=float) + "\n")
    return md, js
