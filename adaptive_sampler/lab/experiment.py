"""Running samplers on a class-conditional denoiser with fixed seeds: shared by the demo, bench, calibration and tuning.

Sample ``j``'s initial latent and, on stochastic samplers, every noise draw depend only on its own seed
(:func:`per_image_noise`), so a batch gives the same images as single runs would.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

import k_diffusion as K

from .. import embedded
from ..flow import is_flow_model
from ..oracles import FullCFG, Oracle, RunSummary
from ..sampling import SAMPLERS, get_sigmas_ddim
from ..schedules import SCHEDULE_FAMILIES, schedule_sigmas as schedule_family_sigmas


@dataclass(frozen=True)
class Target:
    """A class-conditional k-diffusion denoiser plus what is needed to sample it."""

    model: Callable[..., torch.Tensor]
    name: str
    image_shape: tuple[int, ...]
    num_classes: int
    null_label: int

    @property
    def flow(self) -> bool:
        """Whether the model is a flow-matching model (sigma_max 1, :mod:`adaptive_sampler.flow`)."""
        return is_flow_model(self.model)


#: The model families the lab measures: SD-style (eps on SD's discrete schedule) and flow matching.
FAMILIES = ("sd", "flow")


def embedded_target(family: str = "sd") -> Target:
    """The shipped model of a family: the digits model (``"sd"``) or the flow digits model (``"flow"``, unshifted;
    its schedules :data:`FLOW_SCHEDULES` shift it)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if family == "flow":
        return Target(embedded.load_flow_denoiser(), "embedded-flow-digits-v1", embedded.IMAGE_SHAPE,
                      embedded.NUM_CLASSES, embedded.NULL_LABEL)
    return Target(embedded.load_denoiser(), "embedded-digits-v1", embedded.IMAGE_SHAPE, embedded.NUM_CLASSES,
                  embedded.NULL_LABEL)


def load_target(spec: str | None) -> Target:
    """``None`` or ``"embedded"`` for the shipped model, or ``module:function`` returning a :class:`Target` or a
    k-diffusion denoiser with attributes ``image_shape``, ``num_classes`` and ``null_label``."""
    if spec in (None, "", "embedded"):
        return embedded_target()
    if ":" not in spec:
        raise ValueError(f"model must be 'embedded' or 'module:function', got {spec!r}")
    module_name, func_name = spec.split(":", 1)
    try:
        factory = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"model {spec!r} could not be loaded: {exc}") from None
    made = factory()
    if isinstance(made, Target):
        return made
    try:
        return Target(made, spec, tuple(made.image_shape), int(made.num_classes), int(made.null_label))
    except AttributeError as exc:
        raise ValueError(f"model {spec!r} must return a Target or a denoiser with image_shape, num_classes and "
                         f"null_label attributes ({exc})") from None


def sigmas_for(target: Target, sampler: str, steps: int) -> torch.Tensor:
    """The schedule each sampler is benchmarked on: the DDIM grid for DDIM, the model's own schedule otherwise
    (k-diffusion ``get_sigmas``: uniform in timestep, A1111's "Automatic"; a flow model's "simple" schedule)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if sampler == "ddim":
        if target.flow:
            raise ValueError(f"{target.name} is a flow model: DDIM is for SD-style models (on a flow model DDIM with "
                             "eta 0 is Euler); choose one of " + ", ".join(variants_for(target)))
        return get_sigmas_ddim(steps, target.model)
    return target.model.get_sigmas(steps)


#: The sampler variants the demo, the bench's sampler matrix and the PSNR-floor test cover: every sampler the
#: product exposes, DDIM with eta 0 and 1. Name -> (sampler, keyword arguments).
SAMPLER_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("euler", {}),
    "euler_ancestral": ("euler_ancestral", {}),
    "dpmpp_2m": ("dpmpp_2m", {}),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", {}),
    "ddim": ("ddim", {}),
    "ddim_eta1": ("ddim", {"eta": 1.0}),
}

#: Noise schedules of the SD-style model: its own (uniform in timestep, A1111's "Automatic") and Karras et al.'s
#: (rho 7).
SCHEDULES = ("default", "karras")
#: Schedules of a flow model: its own ("simple", evenly in schedule time) shifted as SD3's ``shift`` does (ComfyUI's
#: ModelSamplingSD3 node); "shift 1" is unshifted. Any ``"shift <number>"`` is accepted.
FLOW_SCHEDULES = ("shift 1", "shift 3")
#: Every schedule family the hosts offer (:mod:`adaptive_sampler.schedules`), by model family: the SD-style model
#: takes a family's name (``"default"`` is its own schedule, A1111's Automatic), a flow model ``"<family> shift <n>"``
#: (Align Your Steps is an SD schedule).
SD_SCHEDULES = ("default", *SCHEDULE_FAMILIES)
FLOW_SCHEDULE_FAMILIES = tuple(name for name in SCHEDULE_FAMILIES if name != "align_your_steps")


def variants_for(target: Target) -> list[str]:
    """The sampler variants that run on a target: all of :data:`SAMPLER_VARIANTS`, without DDIM on a flow model."""
    return [v for v in SAMPLER_VARIANTS if not (target.flow and SAMPLER_VARIANTS[v][0] == "ddim")]


def schedules_for(target: Target) -> tuple[str, ...]:
    """The schedules the lab measures on a target by default: :data:`FLOW_SCHEDULES` or :data:`SCHEDULES`."""
    return FLOW_SCHEDULES if target.flow else SCHEDULES


def flow_shift(schedule: str) -> float:
    """The shift of a flow schedule name ``"shift <number>"`` or ``"<family> shift <number>"``."""
    return _flow_schedule(schedule)[1]


def _flow_schedule(schedule: str) -> tuple[str | None, float]:
    """(schedule family or None for the model's own, shift) of a flow schedule name."""
    words = schedule.split()
    family = words[0] if len(words) == 3 else None
    try:
        name, value = words[-2:]
        shift = float(value)
    except ValueError:
        name, shift = "", math.nan
    if (name != "shift" or not math.isfinite(shift) or shift <= 0 or len(words) not in (2, 3)
            or (family is not None and family not in FLOW_SCHEDULE_FAMILIES)):
        raise ValueError(f"a flow model's schedule is 'shift <positive number>' (its own, e.g. "
                         f"{', '.join(FLOW_SCHEDULES)}) or '<family> shift <number>' with a family of "
                         f"{', '.join(FLOW_SCHEDULE_FAMILIES)}; got {schedule!r}")
    return family, shift


def on_schedule(target: Target, schedule: str) -> Target:
    """The target whose model samples on ``schedule``: for a flow model the network with its schedule shifted
    (sigmas, ``percent_to_sigma`` and the DPM++ SDE offset follow the shift, as in ComfyUI); otherwise ``target``."""
    if not target.flow:
        if schedule not in SD_SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SD_SCHEDULES)}, got {schedule!r}")
        return target
    shift = flow_shift(schedule)
    return dataclasses.replace(target, model=target.model.with_shift(shift))


def schedule_sigmas(target: Target, sampler: str, steps: int, schedule: str) -> torch.Tensor | None:
    """The sigmas of ``schedule`` for ``sampler`` (None: the sampler's default grid, see :func:`sigmas_for`): a
    family of :mod:`adaptive_sampler.schedules` on the model (a flow model's shifted as :func:`on_schedule` says).
    DDIM keeps its own timestep grid whatever the schedule, as in A1111."""
    target = on_schedule(target, schedule)
    family = _flow_schedule(schedule)[0] if target.flow else (None if schedule == "default" else schedule)
    if family is None or sampler == "ddim":
        return None
    return schedule_family_sigmas(target.model, family, steps)


def variant_schedules(variants: Sequence[str], schedules: Sequence[str]) -> list[tuple[str, str]]:
    """(sampler variant, schedule) pairs; DDIM keeps its own timestep grid, so it gets one schedule ("default")."""
    cells = []
    for variant in variants:
        if SAMPLER_VARIANTS[variant][0] == "ddim":
            cells.append((variant, "default"))
        else:
            cells += [(variant, schedule) for schedule in schedules]
    return cells


def generate_variant(target: Target, variant: str, schedule: str, steps: int, scale: float, labels: Sequence[int],
                     seeds: Sequence[int], oracle: Oracle | None = None) -> tuple[torch.Tensor, RunSummary]:
    """:func:`generate` for a name of :data:`SAMPLER_VARIANTS` on a schedule of :data:`SCHEDULES`."""
    if variant not in SAMPLER_VARIANTS:
        raise ValueError(f"unknown sampler variant {variant!r}; choose one of {', '.join(SAMPLER_VARIANTS)}")
    sampler, kwargs = SAMPLER_VARIANTS[variant]
    return generate(on_schedule(target, schedule), sampler, steps, scale, labels, seeds, oracle=oracle,
                    sigmas=schedule_sigmas(target, sampler, steps, schedule), **kwargs)


def initial_latents(target: Target, seeds: Sequence[int], sigma0: torch.Tensor, sampler: str) -> torch.Tensor:
    """Seeded noise at the first noise level. DDIM starts from unit-variance VP noise, as diffusers and A1111 do."""
    noise = torch.stack([torch.randn(target.image_shape, generator=torch.Generator().manual_seed(int(s)))
                         for s in seeds])
    scale = (1 + sigma0 ** 2) ** 0.5 if sampler == "ddim" else sigma0
    return noise * scale


class PerImageGaussian:
    """Fresh unit Gaussian noise per call, each row from its own image's generator (as A1111 seeds its per-image
    noise for Euler a and DDIM): an image's draws do not depend on the batch it is in. The generators are seeded
    apart from the initial latents' (``seed + NOISE_SEED_OFFSET``) so the first draw is not the starting noise."""

    NOISE_SEED_OFFSET = 1 << 40

    def __init__(self, x: torch.Tensor, seeds: Sequence[int]) -> None:
        self.shape, self.dtype, self.device = x.shape[1:], x.dtype, x.device
        self.generators = [torch.Generator().manual_seed(int(s) + self.NOISE_SEED_OFFSET) for s in seeds]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(self.device, self.dtype)


def per_image_noise(sampler: str, x: torch.Tensor, sigmas: torch.Tensor, seeds: Sequence[int]) -> Callable:
    """Noise draws that depend only on each image's seed: k-diffusion's Brownian-tree noise sampler with one tree
    per seed for the DPM++ SDE samplers (their default noise, so a run with fewer steps follows the same noise path),
    :class:`PerImageGaussian` for the others."""
    if sampler.startswith("dpmpp") and "sde" in sampler:
        positive = sigmas[sigmas > 0]
        return K.sampling.BrownianTreeNoiseSampler(x, positive.min(), positive.max(), seed=[int(s) for s in seeds])
    return PerImageGaussian(x, seeds)


def generate(target: Target, sampler: str, steps: int, scale: float, labels: Sequence[int], seeds: Sequence[int],
             oracle: Oracle | None = None, sigmas: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, RunSummary]:
    """Sample one image per (label, seed); returns images in data space and the oracle's run summary."""
    if len(labels) != len(seeds):
        raise ValueError(f"labels and seeds must have the same length, got {len(labels)} and {len(seeds)}")
    sigmas = sigmas_for(target, sampler, steps) if sigmas is None else sigmas
    x = initial_latents(target, seeds, sigmas[0], sampler)
    cond = torch.as_tensor(list(labels), dtype=torch.long)
    extra_args = dict(cond=cond, uncond=torch.full_like(cond, target.null_label), cond_scale=float(scale))
    oracle = oracle if oracle is not None else FullCFG()
    if "noise_sampler" in inspect.signature(SAMPLERS[sampler]).parameters and "noise_sampler" not in kwargs:
        kwargs["noise_sampler"] = per_image_noise(sampler, x, sigmas, seeds)
    out = SAMPLERS[sampler](target.model, x, sigmas, extra_args=extra_args, disable=True, oracle=oracle, **kwargs)
    if sampler == "ddim":
        out = out / (1 + sigmas[-1] ** 2) ** 0.5
    return out, oracle.summary()
