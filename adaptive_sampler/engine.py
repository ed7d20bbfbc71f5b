"""The step engine: turns an oracle's decision into a guided prediction for one sampler step.

Sampling loops call a :class:`GuidedDenoiser` exactly where k-diffusion's loops call their CFG model. The engine
asks the oracle what to do, calls the network for the rows that decision needs (cond and uncond in one batched
call when both are tensors), combines them, checks the result is finite and reports the outcome to the oracle.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping

import torch
from k_diffusion.utils import append_dims

from .oracles import Decision, FullCFG, Oracle, RunInfo, StepRecord, StepState, make_oracle


class NonFiniteError(FloatingPointError):
    """The model produced NaN/inf under full CFG: there is nothing left to fall back to."""


def _batch_of(value: Any) -> int | None:
    return value.shape[0] if isinstance(value, torch.Tensor) and value.ndim > 0 else None


def validate_sigmas(sigmas: Any) -> torch.Tensor:
    """A 1-D tensor of finite, strictly decreasing, non-negative noise levels. A single value is a zero-step run,
    which returns its input unchanged, as k-diffusion's loops do (a host's img2img pass at strength 0)."""
    _check_sigmas_shape(sigmas)
    if not torch.isfinite(sigmas).all():
        raise ValueError("sigmas must be finite (found NaN or inf)")
    if (sigmas < 0).any():
        raise ValueError("sigmas must be non-negative")
    if not (sigmas[:-1] > sigmas[1:]).all():
        raise ValueError("sigmas must be strictly decreasing (from the highest noise level to the lowest)")
    return sigmas


def _check_sigmas_shape(sigmas: Any) -> None:
    if not isinstance(sigmas, torch.Tensor):
        raise TypeError(f"sigmas must be a 1-D torch.Tensor, got {type(sigmas).__name__}")
    if sigmas.ndim != 1 or sigmas.shape[0] < 1:
        raise ValueError("sigmas must be a 1-D tensor with at least 1 value (the starting noise level), "
                         f"got shape {tuple(sigmas.shape)}")
    if not sigmas.is_floating_point():
        raise TypeError(f"sigmas must be a floating-point tensor, got {sigmas.dtype}")


def validate_run(x: Any, sigmas: Any) -> None:
    """Check a run's latent and schedule before anything reaches torch, where these mistakes surface as
    IndexErrors or dtype errors deep inside the model.

    Sigmas must be on the latent's device and must not be float64 for a latent that is not: the Euler-type updates
    (``to_d`` divides by the sigma broadcast to the latent's shape) turn the latent into float64 after the first
    step, which the model's float32 layers reject, and a CPU schedule meets a GPU latent the same way. The rules hold
    for every sampler, so that a schedule works with all of them or with none. (The float32 sigmas of a float16
    latent promote it to float32, which autocast and mixed-precision models accept, as in k-diffusion.)
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise TypeError("x must be a floating-point tensor of shape [batch, ...]")
    if x.shape[0] == 0:
        raise ValueError(f"x must hold at least one sample, got an empty batch of shape {tuple(x.shape)}")
    _check_sigmas_shape(sigmas)
    if sigmas.device != x.device:
        raise ValueError(f"sigmas are on {sigmas.device} but x is on {x.device}; pass sigmas.to(x.device)")
    if sigmas.dtype == torch.float64 and x.dtype != torch.float64:
        raise TypeError(f"sigmas are float64 but x is {str(x.dtype).removeprefix('torch.')}: the update would turn "
                        "the latent into float64 after the first step; pass sigmas.to(x.dtype)")
    if not torch.isfinite(x).all():
        raise ValueError("x must be finite (found NaN or inf in the initial latent)")
    validate_sigmas(sigmas)


def resolve_oracle(oracle: Oracle | str | None) -> Oracle:
    if oracle is None:
        return FullCFG()
    if isinstance(oracle, str):
        return make_oracle(oracle)
    if not isinstance(oracle, Oracle):
        raise TypeError(f"oracle must be an adaptive_sampler.oracles.Oracle, a name or None, got {type(oracle).__name__}")
    return oracle


class KDiffusionBackend:
    """Predictions from a plain k-diffusion denoiser with ``cond``/``uncond``/``cond_scale`` extra_args.

    A backend is what the engine calls for network predictions. Hosts that do CFG themselves (the A1111 adapter)
    provide their own backend through a model attribute ``adaptive_backend(x, extra_args)``.
    """

    def __init__(self, model: Callable[..., torch.Tensor], x: torch.Tensor, extra_args: Mapping[str, Any] | None,
                 conditioning_changed: Callable[[int], bool] | None = None) -> None:
        if not callable(model):
            raise TypeError(f"model must be a callable k-diffusion denoiser, got {type(model).__name__}")
        if extra_args is not None and not isinstance(extra_args, Mapping):
            raise TypeError(f"extra_args must be a dict holding 'cond', 'uncond' and 'cond_scale', "
                            f"got {type(extra_args).__name__}")
        args = dict(extra_args or {})
        missing = [k for k in ("cond", "uncond", "cond_scale") if k not in args]
        if missing:
            raise ValueError(f"extra_args must hold 'cond', 'uncond' and 'cond_scale' for guided sampling; missing {missing}")
        self.cond, self.uncond = args.pop("cond"), args.pop("uncond")
        scale = args.pop("cond_scale")
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            scale = scale.item()
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
            raise ValueError(f"extra_args['cond_scale'] must be a finite number, got {scale!r}")
        self.cond_scale = float(scale)
        batch = x.shape[0]
        for name, value in (("cond", self.cond), ("uncond", self.uncond)):
            if value is None:
                raise ValueError(f"extra_args[{name!r}] must not be None for guided sampling")
            n = _batch_of(value)
            if n is not None and n != batch:
                raise ValueError(f"extra_args[{name!r}] has batch size {n} but x has {batch}")
        self.rest = args
        self.model = model
        self.batched = isinstance(self.cond, torch.Tensor) and isinstance(self.uncond, torch.Tensor)
        self._conditioning_changed = conditioning_changed

    def full(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional and unconditional denoised predictions, in one batched call when both are tensors."""
        if self.batched:
            out = self.model(torch.cat([x, x]), torch.cat([sigma, sigma]),
                             cond=torch.cat([self.cond, self.uncond]), **self.rest)
            cond, uncond = out.chunk(2)
            return cond, uncond
        return self.conditional(x, sigma), self.model(x, sigma, cond=self.uncond, **self.rest)

    def conditional(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.model(x, sigma, cond=self.cond, **self.rest)

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        return uncond + (cond - uncond) * self.cond_scale

    def skipped(self, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> None:
        """A CACHED step happened (hosts with per-call counters advance them here)."""

    def conditioning_changed(self, index: int) -> bool:
        return bool(self._conditioning_changed(index)) if self._conditioning_changed and index > 0 else False


class GuidedDenoiser:
    """One run's CFG predictions under an oracle.

    ``model`` is any k-diffusion denoiser, called as ``model(x, sigma, cond=..., **rest)`` and returning the
    denoised image. ``extra_args`` holds ``cond``, ``uncond`` and ``cond_scale``; every other key is passed to the
    model unchanged. ``conditioning_changed(i)`` may tell the engine that step i uses new conditioning;
    ``stochastic`` says that the sampler adds fresh noise between steps (see :class:`~.oracles.RunInfo`). A model with
    an ``adaptive_backend(x, extra_args)`` method supplies its own prediction backend instead.
    """

    def __init__(self, model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
                 extra_args: Mapping[str, Any] | None, oracle: Oracle | str | None, sampler: str,
                 conditioning_changed: Callable[[int], bool] | None = None, stochastic: bool = False) -> None:
        validate_run(x, sigmas)
        make_backend = getattr(model, "adaptive_backend", None)
        if make_backend is not None:
            self.backend = make_backend(x, extra_args)
        else:
            self.backend = KDiffusionBackend(model, x, extra_args, conditioning_changed)
        self.oracle = resolve_oracle(oracle)
        self.steps = sigmas.shape[0] - 1
        self.last_decision: Decision | None = None
        self.oracle.reset(RunInfo(sampler=sampler, sigmas=tuple(float(s) for s in sigmas), batch_size=x.shape[0],
                                  stochastic=stochastic))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, index: int) -> torch.Tensor:
        """The guided denoised prediction for step ``index`` at noise level ``sigma`` (shape ``[batch]``)."""
        backend = self.backend
        s = float(sigma.reshape(-1)[0])
        state = StepState(index=index, total=self.steps, sigma=s, x=x,
                          conditioning_changed=backend.conditioning_changed(index))
        decision = self.oracle.decide(state)
        cond = uncond = None
        wasted, fallback_from = 0, None
        if decision is Decision.CACHED:
            denoised = self.oracle.cached_denoised(state).to(x.dtype)
            backend.skipped(x, sigma, denoised)
        elif decision is Decision.COND:
            cond = backend.conditional(x, sigma)
            denoised = cond
        elif decision is Decision.LINEAR:
            cond = backend.conditional(x, sigma)
            uncond = self.oracle.estimate_uncond(state, cond) if torch.isfinite(cond).all() else cond * math.nan
            denoised = backend.combine(cond, uncond)
        else:
            cond, uncond = backend.full(x, sigma)
            denoised = backend.combine(cond, uncond)
        if not torch.isfinite(denoised).all():
            if decision is Decision.FULL:
                raise NonFiniteError(f"the model returned NaN/inf at step {index} (sigma={s:.4g}) under full CFG")
            wasted, fallback_from = decision.nfe, decision
            decision = Decision.FULL
            cond, uncond = backend.full(x, sigma)
            denoised = backend.combine(cond, uncond)
            if not torch.isfinite(denoised).all():
                raise NonFiniteError(f"the model returned NaN/inf at step {index} (sigma={s:.4g}), "
                                     f"also when re-evaluated with full CFG after a non-finite {fallback_from.name} step")
        eps = (x - denoised) / append_dims(sigma, x.ndim)
        self.oracle.record(StepRecord(index=index, decision=decision, sigma=s, x=x, denoised=denoised, eps=eps,
                                      cond=cond, uncond=uncond), wasted_nfe=wasted, fallback_from=fallback_from)
        self.last_decision = decision
        return denoised
