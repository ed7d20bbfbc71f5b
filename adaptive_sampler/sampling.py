"""k-diffusion sampling loops driven by a step oracle.

Each sampler has k-diffusion's signature plus ``oracle``; its body is k-diffusion's loop with the CFG model call
replaced by a :class:`~adaptive_sampler.engine.GuidedDenoiser` call. With :class:`~adaptive_sampler.oracles.FullCFG`
(the default) every sampler gives k-diffusion's result on a plain CFG wrapper of the same model.

``model`` is a k-diffusion denoiser (``model(x, sigma, cond=...)`` returns the denoised image); ``extra_args`` holds
``cond``, ``uncond`` and ``cond_scale``, and any other key is passed to the model unchanged (``cond_scale`` 1 evaluates
the conditional rows only). ``flow`` says whether the model is a flow-matching model (ComfyUI's ``CONST``:
``x = (1 - sigma) * x0 + sigma * noise``, see :mod:`adaptive_sampler.flow`); None (the default) recognises one by
its ``sigma_max`` of 1. On a flow model Euler a takes ComfyUI's rectified-flow ancestral step and DPM++ 2M SDE steps
in half-log-SNR from a first sigma offset below 1, as ComfyUI's samplers do; Euler and DPM++ 2M keep k-diffusion's
formulas (as ComfyUI does) and DDIM refuses (on a flow model DDIM with eta 0 *is* Euler). Random numbers come
from ``k_diffusion.sampling.torch`` (which A1111 redirects to its per-image seeded generator) or ``noise_sampler``.
The callback receives k-diffusion's dict plus ``'decision'`` (None on a step where the images of a batch decided
differently: oracles that decide per image, see :attr:`~adaptive_sampler.oracles.Oracle.decides_per_image`); the
oracle's ``summary()`` describes the finished run.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from k_diffusion import sampling as ksampling
from k_diffusion.sampling import BrownianTreeNoiseSampler, default_noise_sampler, get_ancestral_step, to_d
from tqdm.auto import trange

from .engine import GuidedDenoiser, validate_sigmas
from .flow import FIRST_SIGMA_OFFSET, half_log_snr, resolve_flow
from .oracles import Oracle

__all__ = [
    "sample_euler",
    "sample_euler_ancestral",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_ddim",
    "ddim_timesteps",
    "get_sigmas_ddim",
    "SAMPLERS",
]

Callback = Callable[[dict], Any] | None


def _event(x, i, sigma, sigma_hat, denoised, guided: GuidedDenoiser) -> dict:
    return {"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised,
            "decision": guided.last_decision}


def _check_real(name: str, value: Any, lo: float = 0.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value == value or value < lo:
        raise ValueError(f"{name} must be a number >= {lo}, got {value!r}")


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback: Callback = None, disable=None,
                 oracle: Oracle | str | None = None, s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1.,
                 flow: bool | None = None):
    """Euler steps (Karras et al. 2022, Algorithm 2) under a step oracle (the same formulas on a flow model)."""
    for name, value in (("s_churn", s_churn), ("s_noise", s_noise)):
        _check_real(name, value)
    guided = GuidedDenoiser(model, x, sigmas, extra_args, oracle, "euler", stochastic=s_churn > 0 and s_noise > 0,
                            flow=resolve_flow(model, flow, sigmas))
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.
        eps = ksampling.torch.randn_like(x) * s_noise
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        denoised = guided(x, sigma_hat * s_in, i)
        d = to_d(x, sigma_hat, denoised)
        if callback is not None:
            callback(_event(x, i, sigmas[i], sigma_hat, denoised, guided))
        dt = sigmas[i + 1] - sigma_hat
        x = x + d * dt
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback: Callback = None, disable=None,
                           oracle: Oracle | str | None = None, eta=1., s_noise=1., noise_sampler=None,
                           flow: bool | None = None):
    """Ancestral sampling with Euler steps under a step oracle; on a flow model ComfyUI's rectified-flow ancestral
    step (``sample_euler_ancestral_RF``: a step down to ``sigma_down``, rescaled to the flow's signal level and
    renoised to ``sigma_next``).

    The run is marked stochastic (when eta and s_noise are > 0): a CACHED step then gets a denoised (x0) forecast and
    this loop forms eps from the current latent, which holds noise that no computed step has seen.
    """
    _check_real("eta", eta)
    _check_real("s_noise", s_noise)
    flow = resolve_flow(model, flow, sigmas)
    if flow and eta > 1:
        raise ValueError(f"eta must be in [0, 1] for the rectified-flow ancestral step, got {eta!r}")
    guided = GuidedDenoiser(model, x, sigmas, extra_args, oracle, "euler_ancestral", stochastic=eta > 0 and s_noise > 0,
                            flow=flow)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = guided(x, sigmas[i] * s_in, i)
        if callback is not None:
            callback(_event(x, i, sigmas[i], sigmas[i], denoised, guided))
        if flow:
            x = _rf_ancestral_step(x, denoised, sigmas[i], sigmas[i + 1], eta, s_noise, noise_sampler)
            continue
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        d = to_d(x, sigmas[i], denoised)
        dt = sigma_down - sigmas[i]
        x = x + d * dt
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def _rf_ancestral_step(x, denoised, sigma, sigma_next, eta, s_noise, noise_sampler):
    """ComfyUI's rectified-flow ancestral step: ``sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)``,
    an Euler step there, then the latent rescaled from ``1 - sigma_down`` to ``1 - sigma_next`` of signal and renoised
    up to ``sigma_next``."""
    if sigma_next == 0:
        return denoised
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
    renoise = (sigma_next ** 2 - sigma_down ** 2 * alpha_next ** 2 / alpha_down ** 2) ** 0.5
    ratio = sigma_down / sigma
    x = ratio * x + (1 - ratio) * denoised
    if eta > 0:
        x = (alpha_next / alpha_down) * x + noise_sampler(sigma, sigma_next) * s_noise * renoise
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback: Callback = None, disable=None,
                    oracle: Oracle | str | None = None, flow: bool | None = None):
    """DPM-Solver++(2M) under a step oracle (k-diffusion's formulas on a flow model too, as ComfyUI keeps them). A
    CACHED step's prediction enters the multistep history like any other."""
    guided = GuidedDenoiser(model, x, sigmas, extra_args, oracle, "dpmpp_2m", flow=resolve_flow(model, flow, sigmas))
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731  (as in k-diffusion)
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    old_denoised = None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = guided(x, sigmas[i] * s_in, i)
        if callback is not None:
            callback(_event(x, i, sigmas[i], sigmas[i], denoised, guided))
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback: Callback = None, disable=None,
                        oracle: Oracle | str | None = None, eta=1., s_noise=1., noise_sampler=None,
                        solver_type='midpoint', flow: bool | None = None):
    """DPM-Solver++(2M) SDE under a step oracle (Brownian-tree noise by default, as in k-diffusion).

    On a flow model the steps are taken in half-log-SNR ``log((1 - sigma) / sigma)`` with the signal level
    ``1 - sigma`` (ComfyUI's formulas for ``CONST`` models), and a run that starts at sigma 1 (log-SNR -inf) starts
    its first step at the sigma of the schedule's first 0.01% instead (``model.percent_to_sigma(1e-4)``, ComfyUI's
    ``offset_first_sigma_for_snr``): the model is called there. The default noise sampler spans the schedule as given.
    """
    if solver_type not in {'heun', 'midpoint'}:
        raise ValueError(f"solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    _check_real("eta", eta)
    _check_real("s_noise", s_noise)
    flow = resolve_flow(model, flow, sigmas)
    given, sigmas = sigmas, offset_first_sigma(model, sigmas) if flow else sigmas
    guided = GuidedDenoiser(model, x, sigmas, extra_args, oracle, "dpmpp_2m_sde", stochastic=eta > 0 and s_noise > 0,
                            flow=flow)
    if guided.steps == 0:
        return x  # nothing to do, as in k-diffusion, whose noise sampler cannot be built for a lone sigma of 0
    if noise_sampler is None:  # spanning the schedule as given, before any offset (as in ComfyUI)
        noise_sampler = BrownianTreeNoiseSampler(x, given[given > 0].min(), given.max())
    lambda_fn = half_log_snr if flow else (lambda sigma: sigma.log().neg())
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    h_last = h = None  # h stays None on a 1-step run ending at 0 (k-diffusion's loop raises UnboundLocalError there)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = guided(x, sigmas[i] * s_in, i)
        if callback is not None:
            callback(_event(x, i, sigmas[i], sigmas[i], denoised, guided))
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = lambda_fn(sigmas[i]), lambda_fn(sigmas[i + 1])
            h = lambda_t - lambda_s
            eta_h = eta * h
            alpha_t = sigmas[i + 1] * lambda_t.exp() if flow else 1.0
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + alpha_t * (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == 'heun':
                    x = x + alpha_t * ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (
                        denoised - old_denoised)
                else:
                    x = x + 0.5 * alpha_t * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * s_noise
        old_denoised = denoised
        h_last = h
    return x


def offset_first_sigma(model: Any, sigmas: torch.Tensor) -> torch.Tensor:
    """A flow schedule that starts at sigma 1 (log-SNR -inf) starting at ``model.percent_to_sigma(1e-4)`` instead, as
    ComfyUI's ``offset_first_sigma_for_snr`` does for its half-log-SNR samplers; other schedules unchanged."""
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or len(sigmas) <= 1 or float(sigmas[0]) < 1.0:
        return sigmas  # (a malformed schedule is refused by the engine with a clear message)
    percent_to_sigma = getattr(model, "percent_to_sigma", None)
    if percent_to_sigma is None:
        raise ValueError("a flow schedule that starts at sigma 1 has log-SNR -inf there: the DPM++ SDE step starts at "
                         "model.percent_to_sigma(1e-4) instead (ComfyUI's offset), which this model does not have; "
                         "give it one (adaptive_sampler.flow.FlowDenoiser does) or start the schedule below 1")
    sigmas = sigmas.clone()
    sigmas[0] = float(percent_to_sigma(FIRST_SIGMA_OFFSET))
    return sigmas


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback: Callback = None, disable=None,
                oracle: Oracle | str | None = None, eta=0., noise_sampler=None, flow: bool | None = None):
    """DDIM (Song et al. 2021) in k-diffusion's scaling, under a step oracle (SD-style models only: on a flow model,
    ``flow`` True or a ``sigma_max`` of 1, it raises ``ValueError``).

    With ``x = x_vp / sqrt(alpha_bar)`` and ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``, the DDIM update
    ``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s_t^2) eps + s_t z`` becomes
    ``x_next = x0 + sigma_down * eps + sigma_up * z``, where (sigma_down, sigma_up) is k-diffusion's ancestral split
    of sigma_next scaled by ``eta`` (0 = deterministic DDIM, 1 = DDPM-like). Use :func:`get_sigmas_ddim` for the
    DDIM timestep grid; the result is the latent at ``sigmas[-1]`` in k-diffusion scaling (multiply by
    ``1 / sqrt(1 + sigmas[-1]**2)`` for the variance-preserving latent).
    """
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise ValueError(f"eta must be a number in [0, 1] (0 = deterministic DDIM), got {eta!r}")
    if resolve_flow(model, flow, sigmas):
        raise ValueError("DDIM works on a discrete VP schedule (SD-style models); this is a flow model (sigma_max 1). "
                         "On a flow model DDIM with eta 0 is exactly Euler: use sample_euler (or sample_euler_ancestral "
                         "for a stochastic sampler), or pass flow=False if the model is not a flow model")
    guided = GuidedDenoiser(model, x, sigmas, extra_args, oracle, "ddim", stochastic=eta > 0)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = guided(x, sigmas[i] * s_in, i)
        if callback is not None:
            callback(_event(x, i, sigmas[i], sigmas[i], denoised, guided))
        eps = to_d(x, sigmas[i], denoised)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        x = denoised + eps * sigma_down
        if eta and sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


def ddim_timesteps(n: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """A1111's DDIM timestep grid, ascending: ``range(0, T, T // n) + 1`` clipped to ``[0, T - 1]``.

    For the usual step counts (divisors of T) it has ``n`` entries and equals diffusers' ``"leading"`` spacing with
    ``steps_offset=1``; otherwise it has ``len(range(0, T, T // n))`` entries, as in A1111.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= num_train_timesteps:
        raise ValueError(f"n (steps) must be an integer in [1, {num_train_timesteps}], got {n!r}")
    return (torch.arange(0, num_train_timesteps, num_train_timesteps // n) + 1).clamp(0, num_train_timesteps - 1)


def get_sigmas_ddim(n: int, model: Any, append_final: bool = True) -> torch.Tensor:
    """Sigmas of the DDIM grid for a discrete-schedule denoiser (anything with a ``sigmas`` buffer indexed by
    timestep, e.g. ``k_diffusion.external.DiscreteEpsDDPMDenoiser`` / ``CompVisDenoiser``), highest first.

    ``append_final=True`` ends at the sigma of timestep 0, as diffusers' ``DDIMScheduler`` with
    ``set_alpha_to_one=False`` does (n steps). ``append_final=False`` ends at the grid's lowest timestep, as A1111's
    built-in DDIM loop does (one step fewer).
    """
    table = getattr(model, "sigmas", None)
    if not isinstance(table, torch.Tensor) or table.ndim != 1:
        raise TypeError("model must be a discrete-schedule denoiser with a 1-D `sigmas` buffer (one per timestep)")
    steps = ddim_timesteps(n, table.shape[0]).to(table.device)
    sigmas = table[steps].flip(0)
    if append_final:
        sigmas = torch.cat([sigmas, table[:1]])
    return validate_sigmas(sigmas.float())


#: The samplers by name, as used by the CLI, the bench and LinearAG coefficient files.
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "ddim": sample_ddim,
}
