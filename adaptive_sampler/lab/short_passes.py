"""What short, img2img-like passes get from each adaptive mode (the evidence for the A1111 ``min_steps`` default).

An A1111 img2img pass at denoising strength ``s`` of ``N`` steps runs the last ``int(s * N) + 1`` steps of the
``N``-step schedule, starting from the init image noised to that schedule's sigma (hires fix, refiner and inpaint
passes are the same kind of pass). Here the init images are full-CFG samples of the embedded model; each mode's pass
is compared with the full-CFG pass from the same noised start (PSNR, dB) and with full CFG on fewer steps at the
same NFE (the pass's schedule subsampled, same start and end), which is what a mode must beat to be worth running.

Run: ``python -m adaptive_sampler.lab.short_passes`` (under two minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
from typing import Sequence

import torch

from ..oracles import FullCFG, make_oracle
from ..sampling import SAMPLERS
from .experiment import embedded_target, generate
from .metrics import psnr

#: The A1111 modes and the oracles (registry names, default settings) they build.
MODES = {"forecast": "forecast", "ag": "ag", "linear-ag": "linear-ag", "adaptive-diffusion": "adaptive-diffusion",
         "ag+adaptive-diffusion": "compose"}


def pass_sigmas(full: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of an ``N``-step schedule that A1111's img2img runs at ``strength`` (``int(strength * N) + 1`` steps)."""
    steps = len(full) - 1
    t_enc = int(min(strength, 0.999) * steps)
    return full[steps - t_enc - 1:]


def fewer_steps(sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` steps over the same noise range: the schedule subsampled evenly, first and last sigma kept."""
    index = torch.linspace(0, len(sigmas) - 1, steps + 1).round().long()
    return sigmas[index]


def measure(sampler: str, base_steps: int, strength: float, seeds: Sequence[int], scale: float) -> list[dict]:
    """One img2img-like pass per mode, against full CFG from the same start and against fewer steps."""
    target = embedded_target()
    labels = [s % target.num_classes for s in seeds]
    init, _ = generate(target, "euler", 20, scale, labels, seeds)
    sigmas = pass_sigmas(target.model.get_sigmas(base_steps), strength)
    steps = len(sigmas) - 1
    noise = torch.stack([torch.randn(target.image_shape, generator=torch.Generator().manual_seed(10_000 + s))
                         for s in seeds])
    start = init + noise * sigmas[0]
    cond = torch.as_tensor(labels)
    extra = dict(cond=cond, uncond=torch.full_like(cond, target.null_label), cond_scale=scale)

    def run(oracle, schedule):
        torch.manual_seed(seeds[0])
        out = SAMPLERS[sampler](target.model, start.clone(), schedule, extra_args=extra, disable=True, oracle=oracle)
        return out, oracle.summary()

    reference, _ = run(FullCFG(), sigmas)
    rows = []
    for mode, oracle_name in MODES.items():
        out, summary = run(make_oracle(oracle_name), sigmas)
        # full CFG spends 2 NFE per step: the same or the next lower NFE per image
        baseline_steps = max(1, int(summary.nfe_per_image // 2))
        baseline, _ = run(FullCFG(), fewer_steps(sigmas, baseline_steps))
        rows.append(dict(sampler=sampler, base_steps=base_steps, strength=strength, steps=steps, mode=mode,
                         nfe=summary.nfe_per_image, nfe_full=summary.nfe_full // summary.images,
                         psnr=float(psnr(out, reference).mean()),
                         baseline_steps=baseline_steps,
                         baseline_psnr=float(psnr(baseline, reference).mean())))
    return rows


#: Pass lengths (steps) grouped for the summary.
BUCKETS = ((1, 5), (6, 9), (10, 11), (12, 15), (16, 1000))


def summarize(rows: list[dict]) -> list[str]:
    """Per mode and pass length: cells where the mode beats fewer steps at the same NFE, mean PSNRs, NFE ratio."""
    lines = ["| mode | pass steps | cells | beats fewer steps | PSNR dB | fewer steps PSNR dB | NFE ratio |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for mode in MODES:
        for lo, hi in BUCKETS:
            cell = [r for r in rows if r["mode"] == mode and lo <= r["steps"] <= hi]
            if not cell:
                continue
            wins = sum(r["psnr"] > r["baseline_psnr"] for r in cell)
            span = f"{lo}–{hi}" if hi < 1000 else f">= {lo}"
            lines.append(f"| {mode} | {span} | {len(cell)} | {wins} | "
                         f"{sum(r['psnr'] for r in cell) / len(cell):.1f} | "
                         f"{sum(r['baseline_psnr'] for r in cell) / len(cell):.1f} | "
                         f"{sum(r['nfe'] for r in cell) / sum(r['nfe_full'] for r in cell):.2f} |")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samplers", nargs="+", default=["euler", "dpmpp_2m", "euler_ancestral"])
    parser.add_argument("--base-steps", nargs="+", type=int, default=[10, 20, 22, 30, 40])
    parser.add_argument("--strengths", nargs="+", type=float, default=[0.3, 0.4, 0.5, 0.6])
    parser.add_argument("--seeds", type=int, default=32)
    parser.add_argument("--scale", type=float, default=3.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    print("| sampler | N × strength | pass steps | mode | NFE | PSNR dB | fewer steps (same NFE) PSNR dB |")
    print("|---|---|---:|---|---:|---:|---:|")
    rows = []
    for sampler in args.samplers:
        for base in args.base_steps:
            for strength in args.strengths:
                for r in measure(sampler, base, strength, list(range(args.seeds)), args.scale):
                    rows.append(r)
                    print(f"| {r['sampler']} | {r['base_steps']} × {r['strength']} | {r['steps']} | {r['mode']} | "
                          f"{r['nfe']:.4g}/{r['nfe_full']} | {r['psnr']:.1f} | "
                          f"{r['baseline_psnr']:.1f} ({r['baseline_steps']} steps) |", flush=True)
    print()
    print("\n".join(summarize(rows)))


if __name__ == "__main__":
    main()
