"""Robust plans: the default across the budget range and every schedule family the hosts offer.

A plan tuned on one grid must hold off it. Each cell (model, sampler variant, schedule, steps, guidance scale) samples
the same seeded images, with the same noise draws, under full CFG and under ``Forecast(budget=b)`` for every budget
of :data:`BUDGETS`, each paired with full CFG on as many steps as it computed ("fewer steps"), and with Forge Neo's
Spectrum at its defaults against ``Forecast`` at Spectrum's NFE. From that one sweep the report reads: monotonicity
(PSNR against full CFG must not fall by more than :data:`TOLERANCE_DB` from one budget to the next), each level's
wins over fewer steps, and the default against Spectrum.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from .. import oracles as O
from ..oracles.forecast import integrates_in_log_sigma, level_budget
from .experiment import SAMPLER_VARIANTS, Target, generate_variant, variants_for
from .metrics import psnr
from .peers import SpectrumRule
from .plots import schedule_sweep_figure

#: The budget sweep: 25% to 90% of full CFG's NFE in steps of 5%.
BUDGETS = tuple(round(0.25 + 0.05 * k, 2) for k in range(14))
#: How far PSNR may fall from one budget to the next before the plan counts as non-monotone.
TOLERANCE_DB = 0.5
#: How far below Spectrum (at Spectrum's NFE) the default may be.
SPECTRUM_TOLERANCE_DB = 0.5

#: Distinct schedule families per model (the hosts' lists, less near-duplicates: Polyexponential is Exponential at
#: A1111's rho 1; SD's Simple is SGM Uniform within 0.3%; a flow model's SGM Uniform is its own "simple" schedule).
SD_GRID_SCHEDULES = ("default", "karras", "exponential", "sgm_uniform", "ddim_uniform", "beta", "linear_quadratic",
                     "kl_optimal", "align_your_steps")
FLOW_GRID_FAMILIES = (None, "normal", "karras", "exponential", "ddim_uniform", "beta", "linear_quadratic", "kl_optimal")
FLOW_GRID_SHIFTS = (1, 3, 6)


def flow_grid_schedules(shifts: Sequence[float] = FLOW_GRID_SHIFTS,
                        families: Sequence[str | None] = FLOW_GRID_FAMILIES) -> list[str]:
    """Flow schedule names (:func:`~adaptive_sampler.lab.experiment.on_schedule`): each family at each shift."""
    return [f"{family + ' ' if family else ''}shift {shift:g}" for shift in shifts for family in families]


@dataclass
class SweepCell:
    """One cell's sweep: PSNR (dB, mean over the images) against full CFG per budget, and the baselines."""

    model: str
    variant: str
    schedule: str
    steps: int
    scale: float
    budgets: list[float]
    nfe_ratios: list[float]
    psnr: list[float]
    fewer_steps: list[int]
    fewer_psnr: list[float]
    spectrum_ratio: float
    spectrum_psnr: float
    ours_at_spectrum_psnr: float
    levels: dict[str, float] = field(default_factory=dict)

    @property
    def sampler_family(self) -> str:
        sampler, kwargs = SAMPLER_VARIANTS[self.variant]
        stochastic = sampler in ("euler_ancestral", "dpmpp_2m_sde") or kwargs.get("eta", 0) > 0
        if not stochastic:
            return "deterministic"
        return "DPM++ SDE" if integrates_in_log_sigma(sampler) else "stochastic"

    def worst_drop(self) -> float:
        """The largest fall in PSNR from one budget to the next (negative when PSNR rises everywhere)."""
        return max(a - b for a, b in zip(self.psnr, self.psnr[1:]))

    def at(self, budget: float) -> tuple[float, float]:
        """(ours, fewer steps) PSNR at a budget of the sweep."""
        k = min(range(len(self.budgets)), key=lambda j: abs(self.budgets[j] - budget))
        return self.psnr[k], self.fewer_psnr[k]


def sweep_cell(target: Target, model: str, variant: str, schedule: str, steps: int, scale: float,
               labels: Sequence[int], seeds: Sequence[int], budgets: Sequence[float] = BUDGETS) -> SweepCell:
    """Full CFG, the budget sweep with its fewer-steps partners, and Spectrum against ours at Spectrum's NFE."""
    def run(oracle: O.Oracle | None, run_steps: int = steps) -> tuple[float, float]:
        images, summary = generate_variant(target, variant, schedule, run_steps, scale, labels, seeds, oracle=oracle)
        return float(psnr(images, reference).clamp(max=100.0).mean()), summary.nfe_ratio

    reference, _ = generate_variant(target, variant, schedule, steps, scale, labels, seeds)
    ratios, ours, fewer, fewer_db = [], [], [], []
    for budget in budgets:
        db, ratio = run(O.Forecast(budget=budget))
        computed = max(1, int(math.floor(ratio * steps + 1e-9)))
        ratios.append(ratio)
        ours.append(db)
        fewer.append(computed)
        fewer_db.append(run(None, computed)[0])
    spectrum_db, spectrum_ratio = run(SpectrumRule())
    ours_at_spectrum, _ = run(O.Forecast(budget=spectrum_ratio))
    sampler, kwargs = SAMPLER_VARIANTS[variant]
    stochastic = sampler in ("euler_ancestral", "dpmpp_2m_sde") or kwargs.get("eta", 0) > 0
    levels = {level: level_budget(level, stochastic, integrates_in_log_sigma(sampler)) for level in O.LEVELS}
    return SweepCell(model, variant, schedule, steps, scale, list(budgets), ratios, ours, fewer, fewer_db,
                     spectrum_ratio, spectrum_db, ours_at_spectrum, levels)


def run_grid(targets: Sequence[tuple[str, Target, Sequence[str], Sequence[float]]], steps: Sequence[int],
             images: int, seed: int = 0, progress: bool = True) -> list[SweepCell]:
    """Every cell of each (model name, target, schedules, scales) x its sampler variants x ``steps``; DDIM keeps its
    own timestep grid, so it runs on the model's own schedule only."""
    grid = []
    for model, target, schedules, scales in targets:
        for variant in variants_for(target):
            own = SAMPLER_VARIANTS[variant][0] == "ddim"
            for schedule in (("default",) if own else schedules):
                grid += [(model, target, variant, schedule, n, c) for n in steps for c in scales]
    cells = []
    for model, target, variant, schedule, n, c in tqdm(grid, desc="schedule grid", disable=not progress):
        labels = [j % target.num_classes for j in range(images)]
        cells.append(sweep_cell(target, model, variant, schedule, n, c, labels, [seed + j for j in range(images)]))
    return cells


def _family(schedule: str) -> str:
    words = schedule.split()
    return "own (simple)" if words[0] == "shift" else words[0] if len(words) == 3 else schedule


def summary(cells: Sequence[SweepCell]) -> str:
    """The goals per model and sampler family: monotone cells, each level's wins over fewer steps, the default
    against Spectrum; then per schedule family; then the worst cells."""
    out = ["| model | samplers | cells | monotone (each budget ≥ the one below − 0.5 dB) | worst drop dB | "
           + " | ".join(f"`{level}` beats fewer steps" for level in O.LEVELS)
           + " | default ≥ Spectrum − 0.5 dB |", "|---|---|---:|---:|---:|" + "---:|" * (len(O.LEVELS) + 1)]
    groups = sorted({(c.model, c.sampler_family) for c in cells})
    for model, family in groups:
        rows = [c for c in cells if (c.model, c.sampler_family) == (model, family)]
        out.append(f"| {model} | {family} | {len(rows)} | " + _goals(rows) + " |")
    out += ["", "Per schedule family (all samplers):", "",
            "| model | schedule family | cells | monotone | worst drop dB | "
            + " | ".join(f"`{level}` wins" for level in O.LEVELS) + " | ≥ Spectrum − 0.5 |",
            "|---|---|---:|---:|---:|" + "---:|" * (len(O.LEVELS) + 1)]
    for model, schedule in sorted({(c.model, _family(c.schedule)) for c in cells}):
        rows = [c for c in cells if (c.model, _family(c.schedule)) == (model, schedule)]
        out.append(f"| {model} | {schedule} | {len(rows)} | " + _goals(rows) + " |")
    return "\n".join(out) + "\n"


def _goals(rows: Sequence[SweepCell]) -> str:
    monotone = sum(c.worst_drop() <= TOLERANCE_DB for c in rows)
    worst = max(c.worst_drop() for c in rows)
    wins = []
    for level in O.LEVELS:
        won = sum(ours > theirs for ours, theirs in (c.at(c.levels[level]) for c in rows))
        wins.append(f"{won}/{len(rows)}")
    spectrum = sum(c.ours_at_spectrum_psnr >= c.spectrum_psnr - SPECTRUM_TOLERANCE_DB for c in rows)
    return f"{monotone}/{len(rows)} | {worst:.1f} | " + " | ".join(wins) + f" | {spectrum}/{len(rows)}"


def levels_table(cells: Sequence[SweepCell], model: str) -> str:
    """The one knob over every schedule family of one model: per level and sampler family, the budget, the mean
    PSNR against full CFG and the cells where it beats fewer steps at equal NFE."""
    families = [f for f in ("deterministic", "stochastic", "DPM++ SDE") if any(c.sampler_family == f for c in cells)]
    out = ["| level | " + " | ".join(families) + " |", "|---|" + "---|" * len(families)]
    for level in O.LEVELS:
        row = []
        for family in families:
            rows = [c for c in cells if c.model == model and c.sampler_family == family]
            if not rows:
                row.append("–")
                continue
            pairs = [c.at(c.levels[level]) for c in rows]
            mean = sum(ours for ours, _ in pairs) / len(pairs)
            wins = sum(ours > fewer for ours, fewer in pairs)
            row.append(f"{rows[0].levels[level]:.0%} · {mean:.1f} dB · {wins}/{len(rows)}")
        name = f"**`{level}`**" if level == O.DEFAULT_LEVEL else f"`{level}`"
        out.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(out) + "\n"


def worst_cells(cells: Sequence[SweepCell], count: int = 15) -> str:
    """The cells with the largest drop, the largest losses to fewer steps at the default and to Spectrum."""
    def label(c: SweepCell) -> str:
        return f"{c.model} {c.variant} {c.schedule} {c.steps} steps scale {c.scale:g}"

    out = ["| cell | worst drop dB (budgets) |", "|---|---|"]
    for c in sorted(cells, key=lambda c: -c.worst_drop())[:count]:
        k = max(range(len(c.psnr) - 1), key=lambda j: c.psnr[j] - c.psnr[j + 1])
        out.append(f"| {label(c)} | {c.worst_drop():.1f} ({c.budgets[k]:.2f} → {c.budgets[k + 1]:.2f}: "
                   f"{c.psnr[k]:.1f} → {c.psnr[k + 1]:.1f}) |")
    out += ["", "| cell | the default / fewer steps dB (NFE ratio) |", "|---|---|"]
    default = O.DEFAULT_LEVEL
    losses = sorted(cells, key=lambda c: c.at(c.levels[default])[0] - c.at(c.levels[default])[1])[:count]
    for c in losses:
        ours, theirs = c.at(c.levels[default])
        out.append(f"| {label(c)} | {ours:.1f} / {theirs:.1f} ({c.levels[default]:.2f}) |")
    out += ["", "| cell | ours / Spectrum dB at Spectrum's NFE (ratio) |", "|---|---|"]
    for c in sorted(cells, key=lambda c: c.ours_at_spectrum_psnr - c.spectrum_psnr)[:count]:
        out.append(f"| {label(c)} | {c.ours_at_spectrum_psnr:.1f} / {c.spectrum_psnr:.1f} ({c.spectrum_ratio:.2f}) |")
    return "\n".join(out) + "\n"


def write(cells: Sequence[SweepCell], out_dir: Path, command: str) -> tuple[Path, Path, Path]:
    """``schedules.md``, ``schedules.json`` and the figure ``schedules.png`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js, png = out_dir / "schedules.md", out_dir / "schedules.json", out_dir / "schedules.png"
    md.write_text("## The default across budgets and schedule families\n\n"
                  f"Made by `{command}`. PSNR (dB) against the full-CFG image with the same seeds and noise draws; "
                  "`Forecast(budget=b)` for b = 25%, 30%, …, 90% of full CFG's NFE, each against full CFG on as many "
                  "steps as it computed; Spectrum at its defaults against `Forecast` at Spectrum's NFE. A level "
                  "spends its budget for the sampler family (deterministic / stochastic / DPM++ SDE: "
                  + ", ".join(f"`{level}` {'/'.join(f'{b:.0%}' for b in O.LEVELS[level])}" for level in O.LEVELS)
                  + ").\n\n" + summary(cells)
                  + "".join(f"\nThe levels on the {model} model over every schedule family (budget · mean PSNR · cells "
                            f"above fewer steps):\n\n" + levels_table(cells, model)
                            for model in sorted({c.model for c in cells}))
                  + "\n### The worst cells\n\n" + worst_cells(cells)
                  + "\n![PSNR against NFE per schedule family](schedules.png)\n")
    js.write_text(json.dumps([asdict(c) for c in cells], indent=0) + "\n")
    groups: dict[str, dict[str, list[SweepCell]]] = {}
    for c in cells:
        groups.setdefault(c.model, {}).setdefault(_family(c.schedule), []).append(c)
    schedule_sweep_figure(groups, png)
    return md, js, png


def load(path: Path) -> list[SweepCell]:
    """The cells of a ``schedules.json``."""
    return [SweepCell(**row) for row in json.loads(Path(path).read_text())]
