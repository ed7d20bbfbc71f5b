"""The noise schedules the hosts offer, for any model that keeps its discrete sigmas (k-diffusion's
``DiscreteSchedule`` denoisers, :class:`~adaptive_sampler.flow.FlowDenoiser`).

A plan is judged off the grid it was tuned on, so the lab measures every schedule family a user can pick: A1111 /
Forge Neo's Automatic (= Uniform, the model's own), Karras, Exponential, Polyexponential, SGM Uniform, KL Optimal,
Align Your Steps, Simple, Normal, DDIM and Beta, and ComfyUI's normal, karras, exponential, sgm_uniform, simple,
ddim_uniform, beta, linear_quadratic and kl_optimal. Karras, exponential and polyexponential are k-diffusion's; the
others follow ComfyUI's ``comfy/samplers.py`` and A1111's ``modules/sd_schedulers.py`` formulas, on the model's
timestep <-> sigma map (a flow model's timestep is ``sigma * 1000`` before its shift, as in ComfyUI).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import scipy.stats
import torch

import k_diffusion as K

from .flow import is_flow_model

#: Align Your Steps' published 10-step sigmas for SD 1.5 (A1111 ``sd_schedulers.py``), log-linearly interpolated to
#: other step counts as A1111 does.
AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)


def _timestep(model: Any, sigma: float) -> float:
    if is_flow_model(model):
        return sigma * len(model.sigmas)
    return float(model.sigma_to_t(torch.tensor(sigma)))


def _sigma(model: Any, timestep: float) -> float:
    if is_flow_model(model):
        return float(model.sigma(torch.tensor(timestep / len(model.sigmas), dtype=torch.float64)))
    return float(model.t_to_sigma(torch.tensor(float(timestep))))


def _bounds(model: Any) -> tuple[float, float]:
    return float(model.sigma_min), float(model.sigma_max)


def normal(model: Any, steps: int, sgm: bool = False) -> torch.Tensor:
    """Evenly in timestep from sigma_max to sigma_min, then 0 (ComfyUI ``normal``; A1111's Uniform / Automatic on an
    SD model); ``sgm``: ``steps + 1`` points with the last dropped (``sgm_uniform``)."""
    start, end = _timestep(model, _bounds(model)[1]), _timestep(model, _bounds(model)[0])
    timesteps = np.linspace(start, end, steps + 1)[:-1] if sgm else np.linspace(start, end, steps)
    return torch.tensor([_sigma(model, t) for t in timesteps] + [0.0])


def simple(model: Any, steps: int) -> torch.Tensor:
    """Every ``len(sigmas) / steps``-th of the model's discrete sigmas from the top (ComfyUI ``simple``)."""
    sigmas, stride = model.sigmas, len(model.sigmas) / steps
    return torch.tensor([float(sigmas[-(1 + int(j * stride))]) for j in range(steps)] + [0.0])


def ddim_uniform(model: Any, steps: int) -> torch.Tensor:
    """Every ``len(sigmas) // steps``-th discrete sigma from the second one up, reversed (ComfyUI ``ddim_uniform``)."""
    sigmas, stride = model.sigmas, max(len(model.sigmas) // steps, 1)
    return torch.tensor([float(sigmas[j]) for j in range(1, len(sigmas), stride)][::-1] + [0.0])


def beta(model: Any, steps: int, alpha: float = 0.6, beta_: float = 0.6) -> torch.Tensor:
    """Timesteps at the quantiles of a Beta(0.6, 0.6) distribution (ComfyUI / A1111 ``beta``). Rounding can repeat a
    timestep, which is then taken once: such a schedule has fewer than ``steps`` steps, as in the hosts."""
    last = len(model.sigmas) - 1
    timesteps = np.rint(scipy.stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), alpha, beta_) * last)
    out: list[float] = []
    for j, t in enumerate(timesteps):
        if j == 0 or t != timesteps[j - 1]:
            out.append(float(model.sigmas[int(t)]))
    return torch.tensor(out + [0.0])


def linear_quadratic(model: Any, steps: int, threshold: float = 0.025) -> torch.Tensor:
    """Linear in sigma for the first half of the steps down to ``1 - threshold``, then quadratic (ComfyUI
    ``linear_quadratic``, made for flow models), times sigma_max."""
    if steps == 1:
        schedule = [1.0, 0.0]
    else:
        linear_steps = steps // 2
        linear = [j * threshold / linear_steps for j in range(linear_steps)]
        diff = linear_steps - threshold * steps
        quadratic_steps = steps - linear_steps
        quad_coef = diff / (linear_steps * quadratic_steps ** 2)
        lin_coef = threshold / linear_steps - 2 * diff / quadratic_steps ** 2
        const = quad_coef * linear_steps ** 2
        quadratic = [quad_coef * j ** 2 + lin_coef * j + const for j in range(linear_steps, steps)]
        schedule = [1.0 - s for s in linear + quadratic + [1.0]]
    return torch.tensor(schedule) * _bounds(model)[1]


def kl_optimal(model: Any, steps: int) -> torch.Tensor:
    """Evenly in arctan(sigma) (Teng et al.'s KL-optimal schedule; ComfyUI / A1111 ``kl_optimal``)."""
    sigma_min, sigma_max = _bounds(model)
    ramp = torch.arange(steps, dtype=torch.float64) / max(steps - 1, 1)
    sigmas = torch.tan(ramp * math.atan(sigma_min) + (1 - ramp) * math.atan(sigma_max))
    return torch.cat([sigmas.float(), torch.zeros(1)])


def align_your_steps(model: Any, steps: int) -> torch.Tensor:
    """Align Your Steps' SD 1.5 sigmas, log-linearly interpolated to ``steps`` (A1111 ``Align Your Steps``). Only for
    SD-style models: its sigmas are an SD model's."""
    if is_flow_model(model):
        raise ValueError("Align Your Steps is an SD-style schedule (sigmas up to 14.6): not for a flow model")
    known = np.log(np.array(AYS_SD15)[::-1])
    xs = np.linspace(0, 1, len(known))
    interpolated = np.exp(np.interp(np.linspace(0, 1, steps), xs, known))[::-1]
    return torch.tensor(list(interpolated) + [0.0], dtype=torch.float32)


#: Schedule family -> ``(model, steps) -> sigmas`` (descending, ending at 0).
SCHEDULE_FAMILIES: dict[str, Callable[[Any, int], torch.Tensor]] = {
    "normal": normal,
    "karras": lambda model, steps: K.sampling.get_sigmas_karras(steps, *_bounds(model)),
    "exponential": lambda model, steps: K.sampling.get_sigmas_exponential(steps, *_bounds(model)),
    "polyexponential": lambda model, steps: K.sampling.get_sigmas_polyexponential(steps, *_bounds(model)),
    "sgm_uniform": lambda model, steps: normal(model, steps, sgm=True),
    "simple": simple,
    "ddim_uniform": ddim_uniform,
    "beta": beta,
    "linear_quadratic": linear_quadratic,
    "kl_optimal": kl_optimal,
    "align_your_steps": align_your_steps,
}


def schedule_sigmas(model: Any, family: str, steps: int) -> torch.Tensor:
    """The sigmas of schedule ``family`` (a key of :data:`SCHEDULE_FAMILIES`) for ``steps`` steps on ``model``."""
    if family not in SCHEDULE_FAMILIES:
        raise ValueError(f"schedule family must be one of {', '.join(SCHEDULE_FAMILIES)}, got {family!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return SCHEDULE_FAMILIES[family](model, steps).float()
