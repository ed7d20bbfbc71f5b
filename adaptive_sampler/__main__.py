"""Command line: ``python -m adaptive_sampler {demo,bench,bench-samplers,tune,calibrate-linear-ag,train-model}``."""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _scale(text: str) -> float:
    value = float(text)
    if not value == value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _flow_schedule(text: str) -> str:
    from .lab.experiment import flow_shift

    try:
        flow_shift(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


DEMO_ORACLES = ("full", "ag", "linear-ag", "adaptive-diffusion", "compose", "recommended")


def demo_oracle(name: str, sampler: str, steps: int, schedule: str = "default") -> tuple[str, "object"]:
    """(row label, fresh oracle) for one of :data:`DEMO_ORACLES`; LinearAG uses the shipped coefficients when
    there are some for this sampler, step count and schedule, the model-free delta rule otherwise."""
    from . import oracles as O
    from .lab.calibrate import embedded_coefficients

    if name == "linear-ag":
        if schedule != "default":
            return "LinearAG (delta rule)", O.LinearAG()
        try:
            return "LinearAG", O.LinearAG(embedded_coefficients(sampler, steps))
        except ValueError:
            return "LinearAG (delta rule)", O.LinearAG()
    labels = {"full": "full CFG", "ag": "AG", "adaptive-diffusion": "AdaptiveDiffusion",
              "compose": "AG + AdaptiveDiffusion", "recommended": "recommended"}
    return labels[name], (O.recommended() if name == "recommended" else O.make_oracle(name))


class _DemoRuns:
    """The demo's runs on one model, each computed once: the table, the grid and the figure share them."""

    def __init__(self, target, labels: list[int], seeds: list[int], steps: int) -> None:
        self.target, self.labels, self.seeds, self.steps = target, labels, seeds, steps
        self._done: dict[tuple, tuple[str, torch.Tensor, object]] = {}

    def run(self, variant: str, schedule: str, scale: float, oracle_name: str, steps: int | None = None
            ) -> tuple[str, torch.Tensor, "object"]:
        """(row label, images, run summary) of one oracle of :data:`DEMO_ORACLES` in one cell."""
        from .lab.experiment import SAMPLER_VARIANTS, generate_variant

        steps = self.steps if steps is None else steps
        key = (variant, schedule, scale, oracle_name, steps)
        if key not in self._done:
            name, oracle = demo_oracle(oracle_name, SAMPLER_VARIANTS[variant][0], steps, schedule)
            images, summary = generate_variant(self.target, variant, schedule, steps, scale, self.labels, self.seeds,
                                               oracle=oracle)
            self._done[key] = (name, images, summary)
        return self._done[key]

    def fewer_steps(self, variant: str, schedule: str, scale: float) -> tuple[int, torch.Tensor, "object"]:
        """Full CFG on as many steps as the default computes (the baseline at equal NFE): (steps, images, summary)."""
        ratio = self.run(variant, schedule, scale, "recommended")[2].nfe_ratio
        steps = max(1, int(math.floor(ratio * self.steps + 1e-9)))
        return steps, *self.run(variant, schedule, scale, "full", steps)[1:]

    def psnr(self, variant: str, schedule: str, scale: float, images: torch.Tensor) -> float:
        """Mean PSNR of ``images`` against full CFG in the same cell."""
        from .lab.metrics import psnr

        return float(psnr(images, self.run(variant, schedule, scale, "full")[1]).mean())


#: The figure's title per model family.
DEMO_FAMILY_TITLES = {"sd": "SD-style digits model", "flow": "Flow-matching digits model"}
#: Images per group in the demo's figure.
DEMO_FIGURE_IMAGES = 4


def demo_family(family: str, args: argparse.Namespace, classifier) -> tuple[list[tuple[str, torch.Tensor]], Path]:
    """Print one model family's table and write its figure; returns the family's rows of the grid and the figure."""
    from .lab.experiment import embedded_target, variant_schedules, variants_for
    from .lab.metrics import PSNR_CAP, classifier_accuracy

    target = embedded_target(family)
    variants = [v for v in args.samplers if v in variants_for(target)]
    if not variants:
        raise ValueError(f"none of the samplers {', '.join(args.samplers)} runs on the {family} model (DDIM is for "
                         f"SD-style models); add one of {', '.join(variants_for(target))} or leave out {family} "
                         "from --families")
    schedules = args.flow_schedules if target.flow else args.schedules
    labels = [c for c in range(target.num_classes) for _ in range(args.per_class)]
    runs = _DemoRuns(target, labels, [args.seed + j for j in range(len(labels))], args.steps)
    cells = variant_schedules(variants, schedules)
    print(f"\n{target.name} ({family}), {args.steps} steps, {len(labels)} images per row; PSNR against full CFG with "
          "the same seeds and noise draws")
    print(f"{'scale':>5} {'sampler':<16} {'schedule':<8} {'oracle':<24} {'NFE/image':>10} {'of full':>8} "
          f"{'PSNR dB':>8} {'accuracy':>9}")
    rows = []

    def show(scale: float, variant: str, schedule: str, name: str, images: torch.Tensor, summary) -> None:
        quality = runs.psnr(variant, schedule, scale, images)
        full_nfe = runs.run(variant, schedule, scale, "full")[2].nfe_per_image  # fewer steps: of the full run's
        acc = classifier_accuracy(images, torch.tensor(labels), classifier)
        shown = "inf" if quality >= PSNR_CAP else f"{quality:.1f}"
        tqdm.write(f"{scale:>5g} {variant:<16} {schedule:<8} {name:<24} {summary.nfe_per_image:>10.4g} "
                   f"{summary.nfe_per_image / full_nfe:>8.0%} {shown:>8} {acc:>9.1%}")
        rows.append((f"{family} | scale {scale:g} | {variant} {schedule} | {name} | "
                     f"NFE {summary.nfe_per_image:.4g}/{full_nfe:.4g} per image | {shown} dB", images))

    scales = args.flow_scales if target.flow else args.scales
    plans = [(scale, variant, schedule, o) for scale in scales for variant, schedule in cells for o in args.oracles]
    for scale, variant, schedule, oracle_name in tqdm(plans, desc=f"demo {family}", leave=False):
        show(scale, variant, schedule, *runs.run(variant, schedule, scale, oracle_name))
        if oracle_name == "recommended":
            steps, images, summary = runs.fewer_steps(variant, schedule, scale)
            show(scale, variant, schedule, f"fewer steps ({steps})", images, summary)
    return rows, demo_figure(family, runs, cells, scales[0], args)


def demo_figure(family: str, runs: _DemoRuns, cells: list[tuple[str, str]], scale: float,
                args: argparse.Namespace) -> Path:
    """The family's figure at ``scale`` (the first): per sampler (on its first schedule) full CFG, the default and
    fewer steps at the default's NFE (runs that the table did not need are computed here)."""
    from .lab.figure import SAMPLER_TITLES, Group, SamplerRow, comparison_figure, pick_images

    schedule = cells[0][1]
    first = {}
    for variant, cell_schedule in cells:
        first.setdefault(variant, cell_schedule)
    shown = pick_images(runs.labels, min(DEMO_FIGURE_IMAGES, len(set(runs.labels))))
    rows = []
    for variant, cell_schedule in first.items():
        _, full, full_summary = runs.run(variant, cell_schedule, scale, "full")
        _, default, default_summary = runs.run(variant, cell_schedule, scale, "recommended")
        fewer_steps, fewer, fewer_summary = runs.fewer_steps(variant, cell_schedule, scale)
        title = SAMPLER_TITLES[variant] + ("" if cell_schedule == schedule else f" ({cell_schedule} schedule)")
        rows.append(SamplerRow(
            title, Group(full[shown], args.steps, full_summary.nfe_per_image),
            Group(default[shown], args.steps, default_summary.nfe_per_image,
                  runs.psnr(variant, cell_schedule, scale, default)),
            Group(fewer[shown], fewer_steps, fewer_summary.nfe_per_image,
                  runs.psnr(variant, cell_schedule, scale, fewer))))
    note = (f"NFE: network evaluations per image. PSNR: against full CFG with the same seeds and noise draws, the mean "
            f"over the {len(runs.labels)} images of each run ({len(shown)} shown). The default is Forecast at level "
            "balanced; fewer steps is full CFG on as many steps as the default computes. Green: the closer of the "
            "two. Difference: |image − full CFG|, amplified (black: identical).")
    return comparison_figure(rows, Path(args.out) / f"demo_{family}.png", note=note,
                             title=f"{DEMO_FAMILY_TITLES[family]}: {args.steps} steps, scale {scale:g}, "
                                   f"schedule {schedule}")


#: The oracles the demo runs without ``--full``: what its figures show (fewer steps follows the default's row).
DEMO_FIGURE_ORACLES = ("full", "recommended")


def demo_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the demo's unset schedules and oracles: with ``--full`` every schedule and oracle, without it the
    figures' own runs (each family's first schedule, full CFG and the default), which a new user sees in seconds
    rather than minutes. Values given on the command line are kept either way."""
    from .lab.experiment import FLOW_SCHEDULES, SCHEDULES

    if args.schedules is None:
        args.schedules = list(SCHEDULES) if args.full else [SCHEDULES[0]]
    if args.flow_schedules is None:
        args.flow_schedules = list(FLOW_SCHEDULES) if args.full else [FLOW_SCHEDULES[0]]
    if args.oracles is None:
        args.oracles = list(DEMO_ORACLES) if args.full else list(DEMO_FIGURE_ORACLES)
    return args


def cmd_demo(args: argparse.Namespace) -> int:
    from .embedded import load_classifier
    from .lab.images import save_grid

    torch.set_num_threads(args.threads)
    args = demo_defaults(args)
    classifier = load_classifier()
    grid, figures = [], []
    for family in args.families:
        rows, figure = demo_family(family, args, classifier)
        grid += rows
        figures.append(figure)
    written = f"wrote {', '.join(str(f) for f in figures)} (full CFG | the default | fewer steps, per sampler)"
    if args.full:
        path = save_grid(grid, Path(args.out) / "demo.png", label_width=480)
        print(f"{written} and {path} (every row of the tables)")
    else:
        print(f"{written}; --full adds every schedule and oracle and demo.png (every row of the tables)")
    return 0


def cmd_train_model(argv: Sequence[str]) -> int:
    from .embedded import train

    return train.main(list(argv))


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .lab.calibrate import calibrate_linear_ag, shipped_coefficients_path
    from .lab.experiment import load_target

    torch.set_num_threads(args.threads)
    target = load_target(args.model)
    coefficients = calibrate_linear_ag(target, args.sampler, args.steps, args.scales, args.samples)
    out = Path(args.output) if args.output else shipped_coefficients_path(args.sampler, args.steps)
    out.parent.mkdir(parents=True, exist_ok=True)
    coefficients.save(out)
    fitted = [r for r in coefficients.r2 if r is not None]
    print(f"fitted {len(fitted)} steps for {target.name} {args.sampler}/{args.steps} on {coefficients.samples} "
          f"samples; median R^2 {sorted(fitted)[len(fitted) // 2]:.6f}; wrote {out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from .lab import bench as B
    from .embedded import load_classifier, reference_statistics
    from .lab.experiment import embedded_target
    from .lab.plots import pareto_plot

    torch.set_num_threads(args.threads)
    if args.quick:
        args.samplers, args.steps, args.scales, args.images, args.repeats = ["euler"], [10], [3.0], 16, 1
    out = Path(args.out)
    target = embedded_target()
    bench = B.Bench(target, args.images, load_classifier(), reference_statistics(), repeats=args.repeats)
    overhead = B.loop_overhead(target, images=args.images, steps=max(args.steps), repeats=max(3, args.repeats))
    print(f"loop overhead: full CFG through our Euler loop / k-diffusion's own loop = {overhead:.3f} (wall-clock)")
    rows = []
    cells = [(s, n, c) for s in args.samplers for n in args.steps for c in args.scales]
    for sampler, steps, scale in tqdm(cells, desc="bench cells"):
        rows += bench.cell(sampler, steps, scale, B.default_oracles(sampler, steps))
    md, js = B.write_outputs(rows, out)
    print(B.markdown(rows))
    print(B.verdicts(rows))
    extra = {"loop_overhead": overhead}
    if not args.no_sweep:
        points = []
        for sampler in args.samplers:
            points += B.sweep(bench, sampler, max(args.steps), args.scales[0])
        png = pareto_plot(points, out / "pareto.png", title=f"{max(args.steps)} steps, scale {args.scales[0]:g}")
        (out / "pareto.json").write_text(json.dumps(points, indent=1) + "\n")
        extra["pareto"] = str(png)
        extra["run_plot"] = B.run_plots(bench, args.samplers[0], max(args.steps), args.scales[0], out)
        print(f"estimator vs greedy path ({args.samplers[0]}, {max(args.steps)} steps, image 0): "
              f"{extra['run_plot']['estimator_skips']} vs {extra['run_plot']['greedy_skips']} skips, "
              f"{extra['run_plot']['agreement']:.0%} of steps agree")
    (out / "bench_extra.json").write_text(json.dumps(extra, indent=1) + "\n")
    print(f"wrote {md}, {js}" + ("" if args.no_sweep else f", {extra['pareto']}, {extra['run_plot']['plot']}"))
    return 0


def cmd_bench_samplers(args: argparse.Namespace) -> int:
    from .lab import matrix
    from .lab.experiment import embedded_target, variants_for

    torch.set_num_threads(args.threads)
    if args.quick:
        args.samplers, args.schedules, args.flow_schedules, args.steps, args.scales, args.images = (
            ["euler_ancestral", "dpmpp_2m"], ["karras"], ["shift 3"], [10], [5.0], 8)
    for family in args.families:
        target = embedded_target(family)
        variants = [v for v in args.samplers if v in variants_for(target)]
        if not variants:
            raise ValueError(f"none of the samplers {', '.join(args.samplers)} runs on the {family} model (DDIM is "
                             f"for SD-style models); add one of {', '.join(variants_for(target))}")
        schedules = args.flow_schedules if target.flow else args.schedules
        scales = args.flow_scales if target.flow else args.scales
        pairs = matrix.run_matrix(target, variants, schedules, args.steps, scales, args.images)
        md, js = matrix.write(pairs, Path(args.out), target)
        print(f"\n{target.name} ({family}):")
        print(matrix.summary(pairs))
        print(f"wrote {md}, {js}")
    return 0


def cmd_bench_schedules(args: argparse.Namespace) -> int:
    from .lab import schedule_grid as G
    from .lab.experiment import embedded_target

    torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.images, args.sd_schedules = [10], 4, ["karras"]
        args.flow_families, args.flow_shifts = ["karras"], [3.0]
    targets = []
    if "sd" in args.families:
        targets.append(("sd", embedded_target("sd"), args.sd_schedules, args.scales))
    if "flow" in args.families:
        families = [None if family == "simple" else family for family in args.flow_families]
        targets.append(("flow", embedded_target("flow"), G.flow_grid_schedules(args.flow_shifts, families),
                        args.flow_scales))
    cells = G.run_grid(targets, args.steps, args.images)
    command = "python -m adaptive_sampler bench-schedules " + " ".join(sys.argv[2:])
    md, js, png = G.write(cells, Path(args.out), command.strip())
    print(G.summary(cells))
    print(f"wrote {md}, {js}, {png}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    import json

    from .lab.experiment import load_target
    from .lab.tune import tune

    torch.set_num_threads(args.threads)
    target = load_target(args.model)
    result = tune(target, args.oracle, args.sampler, args.steps, args.scale, images=args.images,
                  target_psnr=args.target_psnr, target_nfe=args.target_nfe)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"tune_{args.oracle}.json").write_text(json.dumps(result, indent=1) + "\n")
    verdict = "met" if result["met"] else "NOT met (closest setting shown)"
    print(f"{args.oracle} on {target.name}, {args.sampler}/{args.steps} steps, scale {args.scale:g}: target {verdict}")
    print(f"  settings: {json.dumps(result['settings'])}")
    print(f"  NFE ratio {result['nfe_ratio']:.3f}, PSNR vs full CFG {result['psnr']:.2f} dB on {args.images} images")
    return 0 if result["met"] else 1


def _text(*paragraphs: str) -> str:
    """Help paragraphs wrapped for the terminal (the help formatter keeps the breaks between them)."""
    return "\n\n".join(textwrap.fill(p, 100, break_on_hyphens=False) for p in paragraphs)


def _command(sub, name: str, summary: str, *details: str, **kwargs) -> argparse.ArgumentParser:
    """A command whose line in the main help is ``summary`` and whose own help adds ``details``."""
    return sub.add_parser(name, help=summary, description=_text(summary[0].upper() + summary[1:] + ".", *details),
                          formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from .lab.experiment import (FAMILIES, FLOW_SCHEDULE_FAMILIES, FLOW_SCHEDULES, SAMPLER_VARIANTS, SCHEDULES,
                                 SD_SCHEDULES)
    from .sampling import SAMPLERS

    parser = argparse.ArgumentParser(
        prog="python -m adaptive_sampler", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_text(
            "adaptive-sampler: training-free acceleration of classifier-free-guided diffusion sampling. These "
            "commands measure it on the embedded digits models that ship with the package (nothing is downloaded).",
            "Each command writes into --out (default out/) and shows a progress bar; the times are on 2 CPU cores. "
            "'python -m adaptive_sampler <command> --help' tells more."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")

    demo = _command(
        sub, "demo", "the main job: per sampler, full CFG, the default and fewer steps at the same NFE on both "
        "embedded models; about a minute on 2 shared cores; writes demo_sd.png, demo_flow.png (--full: every "
        "sampler x schedule x oracle and demo.png, about 4 minutes)",
        "Samples the SD-style digits model at A1111's defaults (20 steps, scale 7) and the flow-matching one at 20 "
        "steps, scale 5, with the same seeds and noise draws as full CFG, and prints per row the NFE per image, the "
        "PSNR against full CFG and the digits classifier's accuracy; after the default's row comes full CFG on as "
        "many steps as the default computes (the honest baseline at the same NFE). Without --full it runs every "
        "sampler on each model's first schedule (SD-style: its own; flow: shift 1) with full CFG and the default: "
        "the figures' runs. --full runs every schedule and every oracle (AG, LinearAG, AdaptiveDiffusion, their "
        "composition); --schedules, --flow-schedules and --oracles choose them in either case.",
        "Writes into --out (default out/): demo_sd.png and demo_flow.png, one figure per model family (per sampler: "
        "full CFG | the default | fewer steps at the same NFE, with NFE, PSNR and the difference to full CFG "
        "amplified; at the first scale and schedule); with --full also demo.png (every row of the tables).",
        "Measured on 2 CPU cores shared with other jobs: 45 seconds with the defaults at load average 1.5 (2 minutes "
        "at 5); 4 minutes with --full at load average 2 (about 16 at 6).")
    demo.add_argument("--out", default="out", help="output folder (default: out/)")
    demo.add_argument("--steps", type=_positive_int, default=20, help="steps (default 20, A1111's default)")
    demo.add_argument("--scales", type=_scale, nargs="+", default=[7.0],
                      help="guidance scales on the SD-style model (default 7, A1111's)")
    demo.add_argument("--flow-scales", type=_scale, nargs="+", default=[5.0],
                      help="guidance scales on the flow model (default 5: flow models run lower CFG than SD)")
    demo.add_argument("--samplers", nargs="+", choices=list(SAMPLER_VARIANTS), default=list(SAMPLER_VARIANTS),
                      help="sampler variants (ddim_eta1: DDIM with eta 1)")
    demo.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES),
                      help="model families: sd (the SD-style model), flow (the flow-matching model); default both")
    demo.add_argument("--full", action="store_true",
                      help="every schedule and oracle (about 4 minutes), and demo.png with every row of the tables")
    demo.add_argument("--schedules", nargs="+", choices=list(SCHEDULES),
                      help="schedules of the SD-style model (default: default; with --full: default karras; DDIM "
                           "keeps its own timestep grid)")
    demo.add_argument("--flow-schedules", nargs="+", type=_flow_schedule,
                      help="schedules of the flow model, 'shift <number>' (default: 'shift 1'; with --full: "
                           "'shift 1' 'shift 3')")
    demo.add_argument("--oracles", nargs="+", choices=DEMO_ORACLES,
                      help="oracles, one row each (default: full recommended; with --full: all; the figures always "
                           "show the default)")
    demo.add_argument("--per-class", type=_positive_int, default=2, help="images per digit class and row (default 2)")
    demo.add_argument("--seed", type=int, default=0, help="the first image's seed (default 0)")
    demo.add_argument("--threads", type=_positive_int, default=2, help="torch threads (default 2)")

    sub.add_parser("train-model", add_help=False,
                   help="retrain the embedded models and the classifier with a fixed seed; about 20 minutes on 2 "
                        "cores; writes the package's weights (train-model --help tells more)")

    cal = _command(
        sub, "calibrate-linear-ag", "fit LinearAG's per-step coefficients for a sampler and step count; about 5 "
        "minutes for Euler, 50 steps on 2 busy cores; writes one JSON file",
        "Runs full CFG on --samples images per scale and fits, per step, LinearAG's least-squares coefficients that "
        "estimate the unconditional prediction from this step's and the previous step's conditional predictions "
        "and the previous unconditional one. The JSON "
        "file holds the sampler, steps, sigmas and model they were fitted for; LinearAG refuses it for another.",
        "Writes --output (default: the package's shipped file for the embedded model, "
        "adaptive_sampler/data/linear_ag_embedded_<sampler>_<steps>.json). About 5 minutes for --sampler euler "
        "--steps 50 with the defaults (128 samples x 2 scales) on 2 CPU cores shared with other jobs (load average 8).")
    cal.add_argument("--sampler", choices=list(SAMPLERS), required=True)
    cal.add_argument("--steps", type=_positive_int, required=True)
    cal.add_argument("--scales", type=_scale, nargs="+", default=[3.0, 5.0])
    cal.add_argument("--samples", type=_positive_int, default=128, help="calibration samples per scale")
    cal.add_argument("--model", default="embedded", help="'embedded' or module:function returning a denoiser")
    cal.add_argument("--output", help="JSON file (default: the package's shipped file for the embedded model)")
    cal.add_argument("--threads", type=_positive_int, default=2)

    bench = _command(
        sub, "bench", "NFE, wall-clock and fidelity of every oracle against fewer steps and CFG truncation at equal "
        "NFE; about 4 minutes on 2 cores; writes bench.md, bench.json and plots",
        "Euler, DDIM and DPM++ 2M x 20/50 steps x scales 3/5 x every oracle on 64 seeded images of the SD-style "
        "model, each adaptive row followed by its equal-NFE baselines, then threshold sweeps (the Pareto plot) and "
        "the per-run anatomy of one image.",
        "Writes into --out (default out/): bench.md, bench.json, bench_extra.json, pareto.png, pareto.json and "
        "run_<sampler>_<steps>.png (the committed run is in docs/bench/). About 4 minutes on 2 cores; --quick is "
        "a smoke run of under a minute.")
    bench.add_argument("--quick", action="store_true", help="a smoke run of under a minute")
    bench.add_argument("--out", default="out", help="output folder (default: out/)")
    bench.add_argument("--samplers", nargs="+", choices=list(SAMPLERS), default=["euler", "ddim", "dpmpp_2m"])
    bench.add_argument("--steps", type=_positive_int, nargs="+", default=[20, 50])
    bench.add_argument("--scales", type=_scale, nargs="+", default=[3.0, 5.0])
    bench.add_argument("--images", type=_positive_int, default=64)
    bench.add_argument("--repeats", type=_positive_int, default=3, help="interleaved timing repetitions")
    bench.add_argument("--no-sweep", action="store_true", help="skip the threshold sweeps and plots")
    bench.add_argument("--threads", type=_positive_int, default=2)

    matrix = _command(
        sub, "bench-samplers", "the default against fewer steps and against Spectrum, LazyCache and EasyCache at "
        "equal NFE on every sampler and schedule of both model families; about 20 minutes on 2 idle cores; writes "
        "samplers.md / .json and samplers_flow.md / .json",
        "Every sampler variant x schedule x 20/30 steps x scale on 64 seeded images, the same seeds and noise draws "
        "for full CFG and every method: each level of the default against full CFG on as many steps, Forge Neo's "
        "Spectrum brought to the default's NFE, and each peer at its own defaults against the default at the peer's "
        "NFE. The SD-style model runs its own and the Karras schedule at scales 3 and 7, the flow model its schedule "
        "at shift 1 and 3 and scales 1 (unguided: one network row per step), 3 and 5.",
        "Writes into --out (default out/): samplers.md / samplers.json (SD-style model) and samplers_flow.md / "
        "samplers_flow.json (flow model); the committed runs are in docs/bench/. About 10 minutes per family on 2 "
        "idle cores; --quick is a smoke run of a few seconds.")
    matrix.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    matrix.add_argument("--out", default="out", help="output folder (default: out/)")
    matrix.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES),
                        help="model families: sd (the SD-style model), flow (the flow-matching model); default both")
    matrix.add_argument("--samplers", nargs="+", choices=list(SAMPLER_VARIANTS), default=list(SAMPLER_VARIANTS),
                        help="sampler variants (DDIM runs on the SD-style model only)")
    matrix.add_argument("--schedules", nargs="+", choices=list(SCHEDULES), default=list(SCHEDULES),
                        help="schedules of the SD-style model (DDIM keeps its own timestep grid)")
    matrix.add_argument("--flow-schedules", nargs="+", type=_flow_schedule, default=list(FLOW_SCHEDULES),
                        help="schedules of the flow model, 'shift <number>' (default: 'shift 1' 'shift 3')")
    matrix.add_argument("--steps", type=_positive_int, nargs="+", default=[20, 30])
    matrix.add_argument("--scales", type=_scale, nargs="+", default=[3.0, 7.0],
                        help="guidance scales on the SD-style model (default 3 7)")
    matrix.add_argument("--flow-scales", type=_scale, nargs="+", default=[1.0, 3.0, 5.0],
                        help="guidance scales on the flow model (default 1 3 5: flow models run lower CFG, and scale 1 "
                             "is the guidance-distilled use, one network row per step)")
    matrix.add_argument("--images", type=_positive_int, default=64)
    matrix.add_argument("--threads", type=_positive_int, default=2)

    from .lab.schedule_grid import FLOW_GRID_FAMILIES, FLOW_GRID_SHIFTS, SD_GRID_SCHEDULES

    grid = _command(
        sub, "bench-schedules", "the default over budgets 25-90%% and every schedule family the hosts offer, against "
        "fewer steps and Spectrum; about 45 minutes on 2 idle cores; writes schedules.md / .json / .png",
        "Every sampler variant x schedule family x steps x scale of both model families (the flow model at shifts "
        "1, 3 and 6), on --images seeded images: Forecast at each budget from 25%% to 90%% of full CFG's NFE against "
        "full CFG on as many steps, and Spectrum at its defaults against Forecast at Spectrum's NFE. The report "
        "reads monotonicity (a higher budget never more than 0.5 dB worse), each level's wins and the worst cells.",
        "Writes into --out (default out/): schedules.md, schedules.json and schedules.png (the committed run is in "
        "docs/bench/). --quick is a smoke run of a few seconds.")
    grid.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    grid.add_argument("--out", default="out", help="output folder (default: out/)")
    grid.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    grid.add_argument("--sd-schedules", nargs="+", choices=list(SD_SCHEDULES), default=list(SD_GRID_SCHEDULES),
                      help="schedule families of the SD-style model ('default' is its own)")
    grid.add_argument("--flow-families", nargs="+", choices=["simple", *FLOW_SCHEDULE_FAMILIES],
                      default=["simple" if f is None else f for f in FLOW_GRID_FAMILIES],
                      help="schedule families of the flow model ('simple' is its own)")
    grid.add_argument("--flow-shifts", type=_scale, nargs="+", default=list(FLOW_GRID_SHIFTS))
    grid.add_argument("--steps", type=_positive_int, nargs="+", default=[20, 30])
    grid.add_argument("--scales", type=_scale, nargs="+", default=[3.0, 7.0])
    grid.add_argument("--flow-scales", type=_scale, nargs="+", default=[3.0, 5.0])
    grid.add_argument("--images", type=_positive_int, default=8)
    grid.add_argument("--threads", type=_positive_int, default=1)

    from .lab.tune import KNOBS

    tune = _command(
        sub, "tune", "search one oracle's knob for the most aggressive setting that meets a PSNR or NFE target; "
        "about 3 minutes on 2 busy cores; writes tune_<oracle>.json",
        "Samples --images calibration images under full CFG and under a grid of settings of the knob (the default "
        "mode's level, or another oracle's thresholds), bisects between the most aggressive setting that meets the "
        "target and the next one, and prints the setting with its NFE ratio and PSNR; the exit status is 1 when no setting meets the target. --model takes any "
        "k-diffusion denoiser (module:function).",
        "Writes --out/tune_<oracle>.json (default out/). About 3 minutes with the defaults (Euler, 50 steps, 32 "
        "images) on 2 CPU cores shared with other jobs (load average 7).")
    goal = tune.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-psnr", type=_scale, help="minimum mean PSNR against full CFG, dB")
    goal.add_argument("--target-nfe", type=_scale, help="maximum NFE ratio to full CFG, in (0, 1]")
    tune.add_argument("--oracle", choices=list(KNOBS), default="level",
                      help="level (default): the default mode's one knob; the others: their thresholds or budget")
    tune.add_argument("--sampler", choices=list(SAMPLERS), default="euler")
    tune.add_argument("--steps", type=_positive_int, default=50)
    tune.add_argument("--scale", type=_scale, default=3.0)
    tune.add_argument("--images", type=_positive_int, default=32, help="calibration images")
    tune.add_argument("--model", default="embedded", help="'embedded' or module:function returning a denoiser")
    tune.add_argument("--out", default="out", help="output folder (default: out/)")
    tune.add_argument("--threads", type=_positive_int, default=2)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train-model":
        return cmd_train_model(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        commands = {"demo": cmd_demo, "calibrate-linear-ag": cmd_calibrate, "bench": cmd_bench,
                    "bench-samplers": cmd_bench_samplers, "bench-schedules": cmd_bench_schedules, "tune": cmd_tune}
        return commands[args.command](args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
