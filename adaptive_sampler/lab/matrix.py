"""The sampler matrix: the default and the peers users already have, on every sampler the product exposes.

Every cell (sampler variant x schedule x steps x guidance scale) samples the same seeded images, with the same noise
draws, under full CFG and under each method, and reports PSNR / SSIM against the full-CFG image. The default (and
each other level of its knob) at its own NFE is paired with "fewer steps" (full CFG with as many steps as it
computes) and with Forge Neo's Spectrum rule brought to the same NFE: Spectrum's defaults with its own speed knobs
(warm-up 6, 4 or 2 steps; the smallest cache window that keeps its NFE at or under ours), the best of the three
reported. Each peer (Spectrum, ComfyUI's LazyCache and EasyCache) also runs at its own defaults and is paired with
our default at the peer's NFE (``Forecast(budget=peer's NFE ratio)``).
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
from .experiment import Target, generate_variant, on_schedule, variant_schedules, variants_for
from .metrics import PSNR_CAP, psnr, ssim
from .peers import OutputChangeCache, SpectrumRule, spectrum_plan

#: Spectrum's warm-up settings tried when it is brought to another method's NFE (6 is its default).
SPECTRUM_WARMUPS = (6, 4, 2)
#: The Spectrum pairing's method name.
SPECTRUM_AT_OURS = "Spectrum at the default's NFE"

#: (peer name, factory given the target) - each paired with our default at the peer's NFE.
PEERS: tuple[tuple[str, Callable[[Target], O.Oracle]], ...] = (
    ("Spectrum", lambda target: SpectrumRule()),
    ("LazyCache", lambda target: OutputChangeCache(percent_to_sigma(target))),
    ("EasyCache", lambda target: OutputChangeCache(percent_to_sigma(target), measure="cond")),
)


def percent_to_sigma(target: Target) -> Callable[[float], float]:
    """ComfyUI's ``percent_to_sigma``: the flow model's own (its shifted schedule time), or for a discrete-schedule
    denoiser the sigma of timestep ``(1 - p) * 999``."""
    model = target.model
    if target.flow:
        return model.percent_to_sigma

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
        return images, summary.nfe_ratio

    reference, _ = run(O.FullCFG())

    def scores(images: torch.Tensor) -> tuple[float, float]:
        return float(psnr(images, reference).mean()), float(ssim(images, reference).mean())

    scheduled = on_schedule(target, schedule)  # a flow model's peers see its shifted schedule, as in ComfyUI
    pairs = []
    for level in O.LEVELS:
        ours, ours_ratio = run(O.recommended(level))
        fewer = max(1, int(math.floor(ours_ratio * steps + 1e-9)))
        baseline, baseline_ratio = run(O.FullCFG(), fewer)
        method = "default" if level == O.DEFAULT_LEVEL else f"level {level}"
        pairs.append(Pair(variant, schedule, steps, scale, method, ours_ratio, *scores(ours),
                          f"fewer steps ({fewer})", baseline_ratio, *scores(baseline)))
        if level == O.DEFAULT_LEVEL:
            spectrum = spectrum_at(run, steps, ours_ratio)
            if spectrum is not None:
                setting, images, ratio = max(spectrum, key=lambda found: scores(found[1])[0])
                pairs.append(Pair(variant, schedule, steps, scale, SPECTRUM_AT_OURS, ratio, *scores(images),
                                  f"default ({setting})", ours_ratio, *scores(ours)))
    for name, make in PEERS:
        peer, peer_ratio = run(make(scheduled))
        ours, ours_ratio = run(O.Forecast(budget=peer_ratio))
        pairs.append(Pair(variant, schedule, steps, scale, name, peer_ratio, *scores(peer),
                          "default at equal NFE", ours_ratio, *scores(ours)))
    return pairs


def spectrum_at(run: Callable[..., tuple[torch.Tensor, float]], steps: int, ratio: float
                ) -> list[tuple[str, torch.Tensor, float]] | None:
    """Spectrum with each warm-up of :data:`SPECTRUM_WARMUPS` and the smallest cache window (2-10, its UI range)
    whose measured NFE is at most ``ratio``: (setting, images, NFE ratio) each; None when no setting gets there."""
    found = []
    for warmup in SPECTRUM_WARMUPS:
        for window in range(2, 11):
            if len(spectrum_plan(steps, warmup, window)) > ratio * steps + 1e-9:
                continue
            images, spent = run(SpectrumRule(warmup=warmup, window=window))
            if spent <= ratio + 1e-9:
                found.append((f"Spectrum warm-up {warmup}, window {window}", images, spent))
                break
    return found or None


def run_matrix(target: Target, variants: Sequence[str], schedules: Sequence[str], steps: Sequence[int],
               scales: Sequence[float], images: int, seed: int = 0, progress: bool = True) -> list[Pair]:
    """Every cell of ``variants`` x ``schedules`` x ``steps`` x ``scales`` on ``images`` seeded images."""
    unknown = [v for v in variants if v not in variants_for(target)]
    if unknown:
        raise ValueError(f"{target.name} does not run {', '.join(unknown)} (choose from {', '.join(variants_for(target))}"
                         + ("; on a flow model DDIM with eta 0 is Euler)" if target.flow else ")"))
    for schedule in schedules:
        on_schedule(target, schedule)  # a schedule of the other family fails here, before any cell runs
    labels = [j % target.num_classes for j in range(images)]
    seeds = [seed + j for j in range(images)]
    pairs: list[Pair] = []
    grid = [(v, s, n, c) for v, s in variant_schedules(variants, schedules) for n in steps for c in scales]
    for variant, schedule, n, c in tqdm(grid, desc="sampler matrix", disable=not progress):
        pairs += cell(target, variant, schedule, n, c, labels, seeds)
    return pairs


def _db(value: float) -> str:
    return "∞" if value >= PSNR_CAP else f"{value:.1f}"


def is_ours(method: str) -> bool:
    """Whether a pair's method is ours (paired with fewer steps) rather than a peer (paired with our default)."""
    return method == "default" or method.startswith("level ")


def _title(method: str) -> str:
    if method == "default":
        return f"the default (level {O.DEFAULT_LEVEL}) / fewer steps"
    if is_ours(method):
        return f"{method} / fewer steps"
    if method == SPECTRUM_AT_OURS:
        return "the default / Spectrum, at the default's NFE (Spectrum's best warm-up)"
    return f"the default / {method}, at {method}'s NFE"


def _methods(pairs: Sequence[Pair]) -> list[str]:
    """The methods in reading order: the default, Spectrum at its NFE, the peers at theirs, the other levels."""
    order = {"default": 0, SPECTRUM_AT_OURS: 1}
    return sorted(dict.fromkeys(p.method for p in pairs), key=lambda m: order.get(m, 3 if is_ours(m) else 2))


def _sides(p: Pair) -> tuple[float, float]:
    """(ours, theirs) PSNR of a pair."""
    return (p.psnr, p.baseline_psnr) if is_ours(p.method) else (p.baseline_psnr, p.psnr)


def markdown(pairs: Sequence[Pair]) -> str:
    """One table per method: a row per cell, PSNR of the method and its equal-NFE partner, and who wins."""
    out = []
    for method in _methods(pairs):
        rows = [p for p in pairs if p.method == method]
        out.append(f"\n### {_title(method)}\n")
        if is_ours(method):
            out.append("| sampler | schedule | steps | scale | NFE ratio | PSNR dB | SSIM | fewer steps | PSNR dB | "
                       "verdict |")
        else:
            out.append(f"| sampler | schedule | steps | scale | NFE ratio | {method} PSNR dB | SSIM | default NFE "
                       "ratio | default PSNR dB | verdict |")
        out.append("|---|---|---:|---:|---:|---:|---:|---|---:|---|")
        wins = 0
        for p in rows:
            ours, theirs = _sides(p)
            wins += ours > theirs
            name = ("default" if method == "default" else method) if is_ours(method) else "default"
            other = "fewer steps" if is_ours(method) else method
            verdict = "tie" if abs(ours - theirs) < 0.05 else (f"**{name} wins**" if ours > theirs else f"{other} wins")
            partner = p.baseline if is_ours(method) else f"{p.baseline_nfe_ratio:.2f} ({p.baseline})"
            out.append(f"| {p.variant} | {p.schedule} | {p.steps} | {p.scale:g} | {p.nfe_ratio:.2f} | {_db(p.psnr)} | "
                       f"{p.ssim:.3f} | {partner} | {_db(p.baseline_psnr)} | {verdict} |")
        out.append(f"\nOurs wins {wins} of {len(rows)} cells.")
    return "\n".join(out) + "\n"


#: The sampler families a level budgets differently (:data:`~adaptive_sampler.oracles.LEVELS`), by variant.
LEVEL_FAMILIES = {"deterministic": ("euler", "dpmpp_2m", "ddim"), "Euler a, DDIM eta 1": ("euler_ancestral", "ddim_eta1"),
                  "DPM++ 2M SDE": ("dpmpp_2m_sde",)}


def levels(pairs: Sequence[Pair]) -> str:
    """The one knob: per level and sampler family, the NFE ratio, the PSNR range and mean against full CFG, and the
    cells where the level beats fewer steps at equal NFE (``scales``: the guidance scales counted; all by default)."""
    out = ["\n**The one knob** (each level over every cell of this table; NFE ratio of full CFG's, PSNR dB against "
           "full CFG, cells where it beats fewer steps at equal NFE):\n",
           "| level | samplers | NFE ratio | PSNR range | mean PSNR | beats fewer steps |", "|---|---|---:|---:|---:|---:|"]
    for level in O.LEVELS:
        method = "default" if level == O.DEFAULT_LEVEL else f"level {level}"
        for family, variants in LEVEL_FAMILIES.items():
            rows = [p for p in pairs if p.method == method and p.variant in variants]
            if not rows:
                continue
            ratios = sorted({round(p.nfe_ratio, 2) for p in rows})
            ratio = f"{ratios[0]:.2f}" if len(ratios) == 1 else f"{ratios[0]:.2f}–{ratios[-1]:.2f}"
            values = [p.psnr for p in rows]
            wins = sum(p.psnr > p.baseline_psnr for p in rows)
            name = f"**{level}** (default)" if level == O.DEFAULT_LEVEL else level
            out.append(f"| {name} | {family} | {ratio} | {min(values):.1f}–{max(values):.1f} | "
                       f"{sum(values) / len(values):.1f} | {wins}/{len(rows)} |")
    return "\n".join(out) + "\n"


def summary(pairs: Sequence[Pair]) -> str:
    """Compact tables, one row per sampler and schedule, one column per steps/scale: ours against fewer steps (each
    level), then against each peer ("ours / theirs (NFE ratio)", bold where ours wins, "-" where the peer cannot get
    down to our NFE)."""
    out = []
    columns = sorted({(p.steps, p.scale) for p in pairs})
    for method in _methods(pairs):
        rows = [p for p in pairs if p.method == method]
        out.append(f"\n**PSNR dB, {_title(method)}:**\n")
        out.append("| sampler | schedule | " + " | ".join(f"{n} steps, scale {c:g}" for n, c in columns) + " | wins |")
        out.append("|---|---|" + "---:|" * (len(columns) + 1))
        for key in dict.fromkeys((p.variant, p.schedule) for p in pairs):
            cells, wins, count = [], 0, 0
            for n, c in columns:
                p = next((q for q in rows if (q.variant, q.schedule, q.steps, q.scale) == (*key, n, c)), None)
                if p is None:
                    cells.append("-")
                    continue
                ours, theirs = _sides(p)
                wins, count = wins + (ours > theirs), count + 1
                mark = "**" if ours > theirs else ""
                cells.append(f"{mark}{_db(ours)}{mark} / {_db(theirs)} ({p.nfe_ratio:.2f})")
            out.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + f" | {wins}/{count} |")
    return "\n".join(out) + "\n"


def write(pairs: Sequence[Pair], out_dir: Path, target: Target) -> tuple[Path, Path]:
    """``samplers.md`` / ``samplers.json`` for the SD-style model, ``samplers_flow.*`` for a flow model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "samplers_flow" if target.flow else "samplers"
    md, js = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    family = "flow-matching model" if target.flow else "SD-style model"
    md.write_text(f"## Every sampler on the {family} ({target.name}): the default, fewer steps and the peers at "
                  "equal NFE\n\nPSNR against the full-CFG image with the same seeds and noise draws.\n" + summary(pairs)
                  + levels(pairs) + "\n## Every cell\n\n" + markdown(pairs))
    js.write_text(json.dumps([asdict(p) for p in pairs], indent=1, default=float) + "\n")
    return md, js
