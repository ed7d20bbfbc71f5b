"""PNG plots for the bench: the NFE-vs-PSNR Pareto front and a per-run anatomy of one image's decisions."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from ..oracles import Decision  # noqa: E402

DECISION_COLOURS = {Decision.FULL: "#1f77b4", Decision.COND: "#ff7f0e", Decision.LINEAR: "#2ca02c",
                    Decision.CACHED: "#d3d3d3"}


def pareto_plot(points: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """One panel per sampler; one line per method family through its sweep, NFE ratio vs PSNR against full CFG."""
    samplers = sorted({p["sampler"] for p in points})
    fig, axes = plt.subplots(1, len(samplers), figsize=(5.2 * len(samplers), 4.2), squeeze=False)
    for ax, sampler in zip(axes[0], samplers):
        families = sorted({p["family"] for p in points if p["sampler"] == sampler},
                          key=lambda f: (f != "fewer steps", f))
        for family in families:
            pts = sorted((p["nfe_ratio"], p["psnr"]) for p in points
                         if p["sampler"] == sampler and p["family"] == family)
            xs, ys = zip(*pts)
            style = dict(color="black", linestyle="--", marker="s") if family == "fewer steps" else dict(marker="o")
            ax.plot(xs, ys, label=family, **style)
        ax.set_title(f"{sampler} {title}".strip())
        ax.set_xlabel("NFE / NFE of full CFG")
        ax.set_ylabel("PSNR vs full CFG (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_plot(decisions: Sequence[Decision], gammas: Sequence[float | None], ag_threshold: float,
             estimates: Sequence[float | None], ad_threshold: float, greedy: Sequence[Decision],
             path: str | Path, title: str = "") -> Path:
    """Timeline of decisions, gamma_t with the AG threshold, the AdaptiveDiffusion estimator with its threshold,
    and the greedy optimal skip path beside the estimator's path."""
    steps = range(len(decisions))
    order = list(DECISION_COLOURS)
    cmap = ListedColormap([DECISION_COLOURS[d] for d in order])
    fig, axes = plt.subplots(4, 1, figsize=(10, 8), sharex=True,
                             gridspec_kw={"height_ratios": [0.6, 1.4, 1.4, 0.9]})
    axes[0].imshow([[order.index(d) for d in decisions]], aspect="auto", cmap=cmap, vmin=0, vmax=len(order) - 1,
                   extent=(-0.5, len(decisions) - 0.5, 0, 1))
    axes[0].set_yticks([])
    axes[0].set_title(title + "  (" + ", ".join(f"{d.name}" for d in order) + " = " +
                      ", ".join(DECISION_COLOURS[d] for d in order) + ")", fontsize=8)
    g = [(i, v) for i, v in zip(steps, gammas) if v is not None]
    if g:
        axes[1].plot(*zip(*g), marker=".", label="gamma_t (cos cond/uncond)")
    axes[1].axhline(ag_threshold, color="red", linestyle="--", label=f"AG threshold {ag_threshold}")
    axes[1].legend(fontsize=7)
    axes[1].set_ylabel("gamma_t")
    e = [(i, v) for i, v in zip(steps, estimates) if v is not None]
    if e:
        axes[2].semilogy(*zip(*e), marker=".", label="3rd-order estimate / d_{k-1}")
    axes[2].axhline(ad_threshold, color="red", linestyle="--", label=f"delta {ad_threshold}")
    axes[2].legend(fontsize=7)
    axes[2].set_ylabel("estimator")
    est_skips = [i for i, d in zip(steps, decisions) if d is Decision.CACHED]
    greedy_skips = [i for i, d in enumerate(greedy) if d is Decision.CACHED]
    axes[3].scatter(est_skips, [1] * len(est_skips), marker="|", s=200, label="estimator skips")
    axes[3].scatter(greedy_skips, [0] * len(greedy_skips), marker="|", s=200, color="green", label="greedy skips")
    axes[3].set_yticks([0, 1], ["greedy", "estimator"])
    axes[3].set_ylim(-0.5, 1.5)
    axes[3].set_xlabel("step")
    return _save(fig, path)


def schedule_sweep_figure(groups: dict[str, dict[str, Sequence]], path: str | Path) -> Path:
    """One row per model, one panel per schedule family (``groups``: model -> family -> its sweep cells): mean PSNR
    against full CFG over the family's cells against the NFE ratio, for the default's budget sweep, fewer steps at
    the same NFE and Spectrum (with ours at its NFE)."""
    models = sorted(groups)
    families = {m: sorted(groups[m]) for m in models}
    columns = max(len(f) for f in families.values())
    fig, axes = plt.subplots(len(models), columns, figsize=(2.9 * columns, 2.8 * len(models)), squeeze=False,
                             sharey="row")
    for row, model in enumerate(models):
        for col in range(columns):
            ax = axes[row][col]
            if col >= len(families[model]):
                ax.axis("off")
                continue
            family = families[model][col]
            group = groups[model][family]

            def mean(values):
                return sum(values) / len(values)

            budgets = group[0].budgets
            ours = [mean([c.psnr[k] for c in group]) for k in range(len(budgets))]
            ratios = [mean([c.nfe_ratios[k] for c in group]) for k in range(len(budgets))]
            fewer = [mean([c.fewer_psnr[k] for c in group]) for k in range(len(budgets))]
            ax.plot(ratios, ours, "o-", ms=3, color="#1f77b4", label="default (budget sweep)")
            ax.plot(ratios, fewer, "s--", ms=3, color="#7f7f7f", label="fewer steps")
            ax.plot([mean([c.spectrum_ratio for c in group])], [mean([c.spectrum_psnr for c in group])], "^",
                    color="#d62728", label="Spectrum (its defaults)")
            ax.plot([mean([c.spectrum_ratio for c in group])], [mean([c.ours_at_spectrum_psnr for c in group])], "*",
                    ms=9, color="#1f77b4", label="default at Spectrum's NFE")
            ax.set_title(f"{model}: {family} ({len(group)} cells)", fontsize=8)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            if col == 0:
                ax.set_ylabel("PSNR vs full CFG (dB)", fontsize=8)
            if row == len(models) - 1:
                ax.set_xlabel("NFE / full CFG's", fontsize=8)
    axes[0][0].legend(fontsize=6, loc="lower right")
    return _save(fig, path)
