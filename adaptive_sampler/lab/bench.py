"""The benchmark: NFE, wall-clock and image fidelity of every oracle against full CFG and equal-NFE baselines.

For each sampler x step count x guidance scale it samples the same seeded images (labels cycling over the classes)
with full CFG and with each oracle, and reports per row: NFE counted at the model, NFE and wall-clock ratios to full
CFG (interleaved repetitions, median), PSNR / SSIM against the full-CFG image of the same seed, the classifier's
accuracy and the Fréchet distance to the real data. Every adaptive row gets two equal-NFE baselines: full CFG with
fewer steps ("fewer steps") and CFG truncation at the same NFE.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .. import oracles as O
from .experiment import Target, generate, sigmas_for
from .metrics import PSNR_CAP, classifier_accuracy, frechet_distance, psnr, ssim


class CountingModel(torch.nn.Module):
    """Counts the rows the model is called with: NFE measured at the model, not estimated."""

    def __init__(self, inner: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.inner = inner
        self.rows = 0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.inner(x, sigma, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


@dataclass
class Row:
    sampler: str
    steps: int
    scale: float
    method: str
    kind: str  # "reference", "adaptive", "fewer steps", "truncation"
    baseline_for: str | None
    run_steps: int
    nfe: float
    nfe_ratio: float
    psnr: float
    ssim: float
    accuracy: float
    fd: float
    time_ratio: float | None = None
    schedule: str = ""
    extra: dict = field(default_factory=dict)


def default_oracles(sampler: str, steps: int) -> list[tuple[str, Callable[[], O.Oracle]]]:
    """The methods every cell benchmarks (factories: each run gets a fresh oracle)."""
    from .calibrate import embedded_coefficients

    def linear_ag() -> O.Oracle:
        try:
            return O.LinearAG(embedded_coefficients(sampler, steps))
        except ValueError:
            return O.LinearAG()

    return [
        ("AG", O.AdaptiveGuidance),
        ("LinearAG", linear_ag),
        ("AdaptiveDiffusion", O.AdaptiveDiffusion),
        ("Compose", O.Compose),
        ("CFGTruncation 0.5", lambda: O.CFGTruncation(0.5)),
        ("recommended (Forecast)", O.recommended),
    ]


def truncation_at(nfe: float, steps: int) -> tuple[int, float]:
    """(steps, fraction) of CFG truncation spending at most ``nfe`` per sample: guided steps cost 2, others 1.

    With ``nfe >= steps`` the step count is kept and the guided fraction is ``(nfe - steps) / steps``; below that,
    fewer steps with half of them guided.
    """
    budget = int(math.floor(nfe + 1e-9))
    if budget >= steps:
        return steps, min(1.0, (budget - steps) / steps)
    n = max(1, int(budget // 1.5))
    return n, round(0.5 * n) / n


class Bench:
    """Runs the cells and collects rows; images of one cell are reused for the baselines' metrics."""

    def __init__(self, target: Target, images: int, classifier, reference_features, repeats: int = 3,
                 progress: bool = True) -> None:
        self.target = target
        self.labels = [j % target.num_classes for j in range(images)]
        self.seeds = list(range(images))
        self.classifier = classifier
        self.reference = reference_features
        self.repeats = repeats
        self.progress = progress

    def _run(self, sampler: str, steps: int, scale: float, oracle: O.Oracle) -> tuple[torch.Tensor, float, O.RunSummary]:
        model = CountingModel(self.target.model)
        target = Target(model, self.target.name, self.target.image_shape, self.target.num_classes, self.target.null_label)
        images, summary = generate(target, sampler, steps, scale, self.labels, self.seeds, oracle=oracle)
        return images, model.rows / len(self.seeds), summary

    def _timed(self, sampler: str, steps: int, scale: float, factories: Sequence[Callable[[], O.Oracle]]) -> list[float]:
        """Median wall-clock per method over interleaved repetitions (each repetition runs every method once)."""
        times: list[list[float]] = [[] for _ in factories]
        for _ in range(self.repeats):
            for k, make in enumerate(factories):
                start = time.perf_counter()
                self._run(sampler, steps, scale, make())
                times[k].append(time.perf_counter() - start)
        return [statistics.median(t) for t in times]

    def _row(self, sampler, steps, scale, method, kind, baseline_for, run_steps, images, nfe, full_images,
             full_nfe, summary) -> Row:
        labels = torch.tensor(self.labels)
        return Row(sampler=sampler, steps=steps, scale=scale, method=method, kind=kind, baseline_for=baseline_for,
                   run_steps=run_steps, nfe=nfe, nfe_ratio=nfe / full_nfe,
                   psnr=float(psnr(images, full_images).mean()), ssim=float(ssim(images, full_images).mean()),
                   accuracy=classifier_accuracy(images, labels, self.classifier),
                   fd=frechet_distance(images, self.reference, self.classifier), schedule=summary.schedule)

    def cell(self, sampler: str, steps: int, scale: float,
             methods: Sequence[tuple[str, Callable[[], O.Oracle]]]) -> list[Row]:
        full_images, full_nfe, full_summary = self._run(sampler, steps, scale, O.FullCFG())
        rows = [self._row(sampler, steps, scale, "full CFG", "reference", None, steps, full_images, full_nfe,
                          full_images, full_nfe, full_summary)]
        medians = self._timed(sampler, steps, scale, [O.FullCFG] + [make for _, make in methods])
        rows[0].time_ratio = 1.0
        for (name, make), seconds in zip(methods, medians[1:]):
            images, nfe, summary = self._run(sampler, steps, scale, make())
            row = self._row(sampler, steps, scale, name, "adaptive", None, steps, images, nfe, full_images,
                            full_nfe, summary)
            row.time_ratio = seconds / medians[0]
            rows.append(row)
            fewer = max(1, int(math.floor(nfe / 2 + 1e-9)))
            images_b, nfe_b, summary_b = self._run(sampler, fewer, scale, O.FullCFG())
            rows.append(self._row(sampler, steps, scale, f"fewer steps ({fewer})", "fewer steps", name, fewer,
                                  images_b, nfe_b, full_images, full_nfe, summary_b))
            t_steps, fraction = truncation_at(nfe, steps)
            images_t, nfe_t, summary_t = self._run(sampler, t_steps, scale, O.CFGTruncation(fraction))
            rows.append(self._row(sampler, steps, scale, f"truncation ({t_steps} steps, {fraction:.2f})",
                                  "truncation", name, t_steps, images_t, nfe_t, full_images, full_nfe, summary_t))
        return rows


def markdown(rows: Sequence[Row]) -> str:
    """One table per cell; baseline rows follow the adaptive row they match, marked with the verdict."""
    out = []
    cells: dict[tuple, list[Row]] = {}
    for r in rows:
        cells.setdefault((r.sampler, r.steps, r.scale), []).append(r)
    for (sampler, steps, scale), cell in cells.items():
        out.append(f"\n### {sampler}, {steps} steps, scale {scale:g}\n")
        out.append("| method | NFE | NFE ratio | time ratio | PSNR dB | SSIM | accuracy | FD | beats baseline? |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        by_name = {r.method: r for r in cell if r.kind in ("reference", "adaptive")}
        for r in cell:
            verdict = ""
            if r.baseline_for is not None:
                ours = by_name[r.baseline_for]
                verdict = ("tie" if ours.psnr == r.psnr else
                           "adaptive wins" if ours.psnr > r.psnr else "**baseline wins**")
            name = r.method if r.baseline_for is None else f"↳ {r.method}"
            t = "" if r.time_ratio is None else f"{r.time_ratio:.2f}"
            ps = "∞" if r.psnr >= PSNR_CAP else f"{r.psnr:.1f}"
            out.append(f"| {name} | {r.nfe:.1f} | {r.nfe_ratio:.2f} | {t} | {ps} | {r.ssim:.4f} | "
                       f"{r.accuracy:.1%} | {r.fd:.2f} | {verdict} |")
    return "\n".join(out) + "\n"


def verdicts(rows: Sequence[Row]) -> str:
    """One line per adaptive method: NFE ratio and PSNR in every cell next to "fewer steps" at equal NFE."""
    cells = sorted({(r.sampler, r.steps, r.scale) for r in rows})
    methods = list(dict.fromkeys(r.method for r in rows if r.kind == "adaptive"))
    head = "| method | " + " | ".join(f"{s} {n}/{c:g}" for s, n, c in cells) + " | wins |"
    out = ["PSNR (dB) against full CFG, adaptive / fewer steps at equal NFE, and the adaptive method's NFE ratio:\n",
           head, "|---|" + "---:|" * (len(cells) + 1)]
    for m in methods:
        parts, wins = [], 0
        for cell in cells:
            ours = next(r for r in rows if (r.sampler, r.steps, r.scale) == cell and r.method == m)
            base = next(r for r in rows if (r.sampler, r.steps, r.scale) == cell and r.baseline_for == m
                        and r.kind == "fewer steps")
            win = ours.psnr > base.psnr
            wins += win
            mark = "**" if win else ""
            if ours.psnr == base.psnr:
                parts.append(f"tie ({ours.nfe_ratio:.2f})")
            else:
                parts.append(f"{mark}{ours.psnr:.1f}{mark} / {base.psnr:.1f} ({ours.nfe_ratio:.2f})")
        out.append(f"| {m} | " + " | ".join(parts) + f" | {wins}/{len(cells)} |")
    return "\n".join(out) + "\n"


def write_outputs(rows: Sequence[Row], out_dir: Path, name: str = "bench") -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{name}.md", out_dir / f"{name}.json"
    md.write_text("## Adaptive vs fewer steps\n\n" + verdicts(rows) + "\n## Every cell\n" + markdown(rows))
    js.write_text(json.dumps([asdict(r) for r in rows], indent=1, default=float) + "\n")
    return md, js


def sweep_families(sampler: str, steps: int) -> list[tuple[str, float, Callable[[], O.Oracle]]]:
    """(family, setting, factory) for the Pareto plot: each family swept over its main knob."""
    from ..oracles import Forecast

    out: list[tuple[str, float, Callable[[], O.Oracle]]] = []
    for t in (0.95, 0.98, 0.99, 0.995, 0.998, 0.9995):
        out.append(("AG (x0)", t, lambda t=t: O.AdaptiveGuidance(threshold=t)))
        out.append(("LinearAG", t, lambda t=t: O.LinearAG(threshold=t)))
    for d in (0.005, 0.01, 0.02, 0.05, 0.1, 0.3):
        out.append(("AdaptiveDiffusion", d, lambda d=d: O.AdaptiveDiffusion(threshold=d)))
        out.append(("Compose", d, lambda d=d: O.Compose(O.AdaptiveGuidance(), O.AdaptiveDiffusion(threshold=d))))
    for f in (0.0, 0.2, 0.4, 0.6, 0.8):
        out.append(("CFGTruncation", f, lambda f=f: O.CFGTruncation(f)))
    for budget in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        out.append(("Forecast", budget, lambda budget=budget: Forecast(budget=budget)))
    return out


def fewer_steps_counts(steps: int) -> list[int]:
    return sorted({max(2, round(steps * f)) for f in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)})


def sweep(bench: Bench, sampler: str, steps: int, scale: float, progress: bool = True) -> list[dict]:
    """Pareto points: every family's sweep and plain full CFG at fewer steps, PSNR against full CFG."""
    full_images, full_nfe, _ = bench._run(sampler, steps, scale, O.FullCFG())
    jobs = [(f, v, steps, make) for f, v, make in sweep_families(sampler, steps)]
    jobs += [("fewer steps", n, n, O.FullCFG) for n in fewer_steps_counts(steps)]
    points = []
    for family, value, run_steps, make in tqdm(jobs, desc=f"sweep {sampler}/{steps}", leave=False,
                                              disable=not progress):
        images, nfe, _ = bench._run(sampler, run_steps, scale, make())
        points.append(dict(sampler=sampler, steps=steps, scale=scale, family=family, setting=value,
                           nfe_ratio=nfe / full_nfe, psnr=float(psnr(images, full_images).mean())))
    return points


def loop_overhead(target: Target, sampler: str = "euler", steps: int = 50, images: int = 64,
                  repeats: int = 5) -> float:
    """Wall-clock of full CFG through our loop over k-diffusion's own loop with a plain CFG wrapper, same model
    (median of interleaved repetitions)."""
    import k_diffusion as K

    from .experiment import initial_latents
    from ..sampling import SAMPLERS

    model = target.model
    sigmas = sigmas_for(target, sampler, steps)
    labels = torch.tensor([j % target.num_classes for j in range(images)])
    args = dict(cond=labels, uncond=torch.full_like(labels, target.null_label), cond_scale=3.0)
    x = initial_latents(target, list(range(images)), sigmas[0], sampler)

    def cfg(x, sigma, cond, uncond, cond_scale):
        c, u = model(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond])).chunk(2)
        return u + (c - u) * cond_scale

    theirs = getattr(K.sampling, f"sample_{sampler}")
    ours_t, theirs_t = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        theirs(cfg, x, sigmas, extra_args=args, disable=True)
        theirs_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        SAMPLERS[sampler](model, x, sigmas, extra_args=args, disable=True, oracle=O.FullCFG())
        ours_t.append(time.perf_counter() - start)
    return statistics.median(ours_t) / statistics.median(theirs_t)


def run_plots(bench: Bench, sampler: str, steps: int, scale: float, out_dir: Path, min_psnr: float = 40.0) -> dict:
    """Per-run anatomy of image 0: decisions, gamma_t, the estimator and the greedy path; returns path agreement."""
    from .experiment import initial_latents
    from .plots import run_plot
    from .search import greedy_skip_path

    target = bench.target
    label, seed = bench.labels[0], bench.seeds[0]
    ag, ad = O.AdaptiveGuidance(), O.AdaptiveDiffusion()
    compose = O.Compose(ag, ad)
    generate(target, sampler, steps, scale, [label], [seed], oracle=compose)
    sigmas = sigmas_for(target, sampler, steps)
    x = initial_latents(target, [seed], sigmas[0], sampler)
    cond = torch.tensor([label])
    args = dict(cond=cond, uncond=torch.full_like(cond, target.null_label), cond_scale=scale)
    greedy = greedy_skip_path(target.model, x, sigmas, args, sampler=sampler, min_psnr=min_psnr).plan
    ad_alone = O.AdaptiveDiffusion()
    generate(target, sampler, steps, scale, [label], [seed], oracle=ad_alone)
    est = [d is O.Decision.CACHED for d in ad_alone.decisions]
    gre = [d is O.Decision.CACHED for d in greedy]
    path = run_plot(compose.decisions, ag.gammas, ag.threshold, ad_alone.estimates, ad.threshold, greedy,
                    out_dir / f"run_{sampler}_{steps}.png",
                    title=f"{sampler}, {steps} steps, scale {scale:g}, digit {label}: AG + AdaptiveDiffusion")
    return dict(plot=str(path), estimator_skips=sum(est), greedy_skips=sum(gre),
                agreement=sum(a == b for a, b in zip(est, gre)) / len(est), greedy_min_psnr=min_psnr)
