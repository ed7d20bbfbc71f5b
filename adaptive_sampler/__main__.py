"""Command line: ``python -m adaptive_sampler {demo,train-model,calibrate-linear-ag,bench,tune}``."""

from __future__ import annotations

import argparse
import sys
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


def demo_oracles(sampler: str, steps: int) -> list[tuple[str, "object"]]:
    """The oracles the demo shows for one sampler: full CFG first, then each adaptive method."""
    from . import oracles as O
    from .calibrate import embedded_coefficients

    rows = [("full CFG", O.FullCFG()), ("AG", O.AdaptiveGuidance()), ("AdaptiveDiffusion", O.AdaptiveDiffusion()),
            ("AG + AdaptiveDiffusion", O.Compose())]
    try:
        rows.insert(2, ("LinearAG", O.LinearAG(embedded_coefficients(sampler, steps))))
    except ValueError:
        rows.insert(2, ("LinearAG (delta rule)", O.LinearAG()))
    rows.append(("recommended", O.recommended()))
    return rows


def cmd_demo(args: argparse.Namespace) -> int:
    from .embedded import load_classifier
    from .experiment import embedded_target, generate
    from .images import save_grid
    from .metrics import classifier_accuracy

    torch.set_num_threads(args.threads)
    target = embedded_target()
    classifier = load_classifier()
    labels = [c for c in range(target.num_classes) for _ in range(args.per_class)]
    seeds = [args.seed + j for j in range(len(labels))]
    plans = [(s, name, oracle) for s in args.samplers for name, oracle in demo_oracles(s, args.steps)]
    rows = []
    print(f"embedded model, {args.steps} steps, guidance scale {args.scale}, {len(labels)} images per row")
    print(f"{'sampler':<16} {'oracle':<24} {'NFE/image':>10} {'of full':>8} {'accuracy':>9}")
    for sampler, name, oracle in tqdm(plans, desc="demo", leave=False):
        images, summary = generate(target, sampler, args.steps, args.scale, labels, seeds, oracle=oracle)
        acc = classifier_accuracy(images, torch.tensor(labels), classifier)
        tqdm.write(f"{sampler:<16} {name:<24} {summary.nfe:>10} {summary.nfe_ratio:>8.0%} {acc:>9.1%}")
        rows.append((f"{sampler} | {name} | NFE {summary.nfe}/{summary.nfe_full}", images))
    path = save_grid(rows, Path(args.out) / "demo.png")
    print(f"wrote {path}")
    return 0


def cmd_train_model(argv: Sequence[str]) -> int:
    from .embedded import train

    return train.main(list(argv))


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate_linear_ag, shipped_coefficients_path
    from .experiment import load_target

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


def build_parser() -> argparse.ArgumentParser:
    from .sampling import SAMPLERS

    parser = argparse.ArgumentParser(prog="python -m adaptive_sampler", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="sample a grid on the embedded model with every sampler and oracle")
    demo.add_argument("--out", default="out", help="output folder (default: out/)")
    demo.add_argument("--steps", type=_positive_int, default=50)
    demo.add_argument("--scale", type=_scale, default=3.0, help="guidance scale (default 3)")
    demo.add_argument("--samplers", nargs="+", choices=list(SAMPLERS), default=list(SAMPLERS))
    demo.add_argument("--per-class", type=_positive_int, default=2, help="images per digit class and row")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=_positive_int, default=2)

    sub.add_parser("train-model", add_help=False,
                   help="retrain the embedded model and classifier (see train-model --help)")

    cal = sub.add_parser("calibrate-linear-ag", help="fit LinearAG coefficients for a sampler and step count")
    cal.add_argument("--sampler", choices=list(SAMPLERS), required=True)
    cal.add_argument("--steps", type=_positive_int, required=True)
    cal.add_argument("--scales", type=_scale, nargs="+", default=[3.0, 5.0])
    cal.add_argument("--samples", type=_positive_int, default=128, help="calibration samples per scale")
    cal.add_argument("--model", default="embedded", help="'embedded' or module:function returning a denoiser")
    cal.add_argument("--output", help="JSON file (default: the package's shipped file for the embedded model)")
    cal.add_argument("--threads", type=_positive_int, default=2)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train-model":
        return cmd_train_model(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return {"demo": cmd_demo, "calibrate-linear-ag": cmd_calibrate}[args.command](args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
