"""The step engine: turns an oracle's decision into a guided prediction for one sampler step.

Sampling loops call a :class:`GuidedDenoiser` exactly where k-diffusion's loops call their CFG model. The engine
asks the oracle what to do, calls the network for the rows that decision needs (cond and uncond in one batched
call when both are tensors), combines them, checks the result is finite and reports the outcome to the oracle.
"""

from __future__ import annotations

import copy
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

    A ``cond_scale`` of 1 makes the run unguided, as ComfyUI's CFG-1 optimisation does: CFG at scale 1 *is* the
    conditional prediction, so a step evaluates the conditional rows only (one network row per sample; ``uncond``
    may be None) - the way guidance-distilled models (Flux dev, Z-Image Turbo) are run.

    A backend is what the engine calls for network predictions. A model that does CFG itself can provide its own
    backend through a model attribute ``adaptive_backend(x, extra_args)`` (its runs then decide per batch: rows are
    only split for this backend).
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
        self.guided = self.cond_scale != 1.0
        batch = x.shape[0]
        for name, value in (("cond", self.cond), ("uncond", self.uncond)):
            if value is None and (name == "cond" or self.guided):
                raise ValueError(f"extra_args[{name!r}] must not be None for guided sampling"
                                 + (" (it may be None at cond_scale 1, which evaluates the conditional rows only)"
                                    if name == "uncond" else ""))
            n = _batch_of(value)
            if n is not None and n != batch:
                raise ValueError(f"extra_args[{name!r}] has batch size {n} but x has {batch}")
        self.rest = args
        self.model = model
        self.batched = isinstance(self.cond, torch.Tensor) and (isinstance(self.uncond, torch.Tensor)
                                                                or not self.guided)
        self._conditioning_changed = conditioning_changed

    def full(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Conditional and unconditional denoised predictions, in one batched call when both are tensors (the
        conditional one alone, and None, on an unguided run)."""
        if not self.guided:
            return self.conditional(x, sigma), None
        if self.batched:
            out = self.model(torch.cat([x, x]), torch.cat([sigma, sigma]),
                             cond=torch.cat([self.cond, self.uncond]), **self.rest)
            cond, uncond = out.chunk(2)
            return cond, uncond
        return self.conditional(x, sigma), self.model(x, sigma, cond=self.uncond, **self.rest)

    def conditional(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.model(x, sigma, cond=self.cond, **self.rest)

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
        return cond if uncond is None else uncond + (cond - uncond) * self.cond_scale

    def skipped(self, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> None:
        """A CACHED step happened (hosts with per-call counters advance them here)."""

    def conditioning_changed(self, index: int) -> bool:
        return bool(self._conditioning_changed(index)) if self._conditioning_changed and index > 0 else False

    def rows(self, index: torch.Tensor, batch: int) -> "KDiffusionBackend":
        """This backend for the rows ``index`` of a batch of ``batch``: cond, uncond and every other batched
        argument sliced (those of another first dimension are passed whole)."""
        sub = copy.copy(self)
        sub.cond = self.cond[index]
        sub.uncond = self.uncond[index] if isinstance(self.uncond, torch.Tensor) else self.uncond
        sub.rest = {k: v[index] if _batch_of(v) == batch else v for k, v in self.rest.items()}
        return sub


class GuidedDenoiser:
    """One run's CFG predictions under an oracle.

    ``model`` is any k-diffusion denoiser, called as ``model(x, sigma, cond=..., **rest)`` and returning the
    denoised image. ``extra_args`` holds ``cond``, ``uncond`` and ``cond_scale``; every other key is passed to the
    model unchanged. ``conditioning_changed(i)`` may tell the engine that step i uses new conditioning;
    ``stochastic`` says that the sampler adds fresh noise between steps and ``flow`` that the model follows the
    flow-matching convention (see :class:`~.oracles.RunInfo`). A model with an ``adaptive_backend(x, extra_args)``
    method supplies its own prediction backend instead.
    """

    def __init__(self, model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
                 extra_args: Mapping[str, Any] | None, oracle: Oracle | str | None, sampler: str,
                 conditioning_changed: Callable[[int], bool] | None = None, stochastic: bool = False,
                 flow: bool = False) -> None:
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
                                  stochastic=stochastic, flow=flow, guided=getattr(self.backend, "guided", True)))
        self.per_image = False
        if self.oracle.decides_per_image and x.shape[0] > 1:
            if isinstance(self.backend, KDiffusionBackend) and self.backend.batched:
                self.oracle.split_images()
                self.per_image = True
            else:
                self.oracle.overrides.append((0, "decided per batch: per-image decisions need cond and uncond as "
                                                 "batched tensors (rows evaluated apart)"))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, index: int) -> torch.Tensor:
        """The guided denoised prediction for step ``index`` at noise level ``sigma`` (shape ``[batch]``)."""
        s = float(sigma.reshape(-1)[0])
        changed = self.backend.conditioning_changed(index)
        if self.per_image:
            return self._per_image(x, sigma, index, s, changed)
        state = StepState(index=index, total=self.steps, sigma=s, x=x, conditioning_changed=changed)
        decision = self.oracle.decide(state)
        denoised, cond, uncond = self._predict(decision, self.backend, x, sigma, [(self.oracle, state)])
        wasted, fallback_from = 0, None
        if not torch.isfinite(denoised).all():
            self._refuse_non_finite(decision, index, s)
            wasted, fallback_from, decision = decision.nfe, decision, Decision.FULL
            denoised, cond, uncond = self._predict(decision, self.backend, x, sigma, [])
            if not torch.isfinite(denoised).all():
                self._refuse_non_finite(decision, index, s, fallback_from)
        self.oracle.record(self._step_record(index, decision, s, x, sigma, denoised, cond, uncond), wasted_nfe=wasted,
                           fallback_from=fallback_from)
        self.last_decision = decision
        return denoised

    def _per_image(self, x: torch.Tensor, sigma: torch.Tensor, index: int, s: float, changed: bool) -> torch.Tensor:
        """One step with a decision per image: the rows that share a decision are evaluated together, the others
        not at all, and each image's oracle sees only its own row."""
        states = [StepState(index=index, total=self.steps, sigma=s, x=x[r:r + 1], conditioning_changed=changed)
                  for r in range(x.shape[0])]
        decisions = self.oracle.decide_images(states)
        images = self.oracle.images
        denoised = torch.empty_like(x)
        cond: list[torch.Tensor | None] = [None] * x.shape[0]
        uncond: list[torch.Tensor | None] = [None] * x.shape[0]
        wasted: list[int] = [0] * x.shape[0]
        fallback_from: list[Decision | None] = [None] * x.shape[0]

        def evaluate(decision: Decision, rows: list[int]) -> None:
            owners = [(images[r], states[r]) for r in rows]
            if len(rows) == x.shape[0]:  # the whole batch decided alike: one call, as per batch
                out, c, u = self._predict(decision, self.backend, x, sigma, owners)
                denoised[:] = out
            else:
                at = torch.tensor(rows, device=x.device)
                out, c, u = self._predict(decision, self.backend.rows(at, x.shape[0]), x[at], sigma[at], owners)
                denoised[at] = out
            for k, r in enumerate(rows):
                cond[r] = None if c is None else c[k:k + 1]
                uncond[r] = None if u is None else u[k:k + 1]

        for decision in dict.fromkeys(decisions):
            evaluate(decision, [r for r, d in enumerate(decisions) if d is decision])
        finite = torch.isfinite(denoised.flatten(1)).all(1).tolist()
        retry = [r for r in range(x.shape[0]) if not finite[r]]
        for r in retry:
            self._refuse_non_finite(decisions[r], index, s)
            wasted[r], fallback_from[r], decisions[r] = decisions[r].nfe, decisions[r], Decision.FULL
        if retry:
            evaluate(Decision.FULL, retry)
            if not torch.isfinite(denoised[retry]).all():
                self._refuse_non_finite(Decision.FULL, index, s, next(fallback_from[r] for r in retry))
        self.oracle.record_images(
            [self._step_record(index, decisions[r], s, x[r:r + 1], sigma[r:r + 1], denoised[r:r + 1], cond[r],
                               uncond[r]) for r in range(x.shape[0])], wasted, fallback_from)
        self.last_decision = self.oracle.decisions[-1]  # the batch's decision, None where its images differed
        return denoised

    def _predict(self, decision: Decision, backend: Any, x: torch.Tensor, sigma: torch.Tensor,
                 owners: list[tuple[Oracle, StepState]]
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(denoised, cond, uncond) of rows ``x`` under ``decision``. ``owners`` are the oracles (with their step
        states) that cover the rows in order - one for the whole batch, or one per image - and supply CACHED
        predictions and LINEAR estimates."""
        if decision is Decision.CACHED:
            denoised = torch.cat([oracle.cached_denoised(state) for oracle, state in owners]).to(x.dtype)
            backend.skipped(x, sigma, denoised)
            return denoised, None, None
        if decision is Decision.COND:
            cond = backend.conditional(x, sigma)
            return cond, cond, None
        if decision is Decision.LINEAR:
            cond = backend.conditional(x, sigma)
            if not torch.isfinite(cond).all():
                return cond * math.nan, cond, None
            estimates, start = [], 0
            for oracle, state in owners:
                rows = state.x.shape[0]
                estimates.append(oracle.estimate_uncond(state, cond[start:start + rows]))
                start += rows
            uncond = torch.cat(estimates)
            return backend.combine(cond, uncond), cond, uncond
        cond, uncond = backend.full(x, sigma)
        return backend.combine(cond, uncond), cond, uncond

    @staticmethod
    def _refuse_non_finite(decision: Decision, index: int, s: float, fallback_from: Decision | None = None) -> None:
        """A non-finite FULL prediction ends the run: there is nothing left to fall back to."""
        if decision is not Decision.FULL:
            return
        if fallback_from is None:
            raise NonFiniteError(f"the model returned NaN/inf at step {index} (sigma={s:.4g}) under full CFG")
        raise NonFiniteError(f"the model returned NaN/inf at step {index} (sigma={s:.4g}), also when re-evaluated "
                             f"with full CFG after a non-finite {fallback_from.name} step")

    @staticmethod
    def _step_record(index: int, decision: Decision, s: float, x: torch.Tensor, sigma: torch.Tensor,
                     denoised: torch.Tensor, cond: torch.Tensor | None, uncond: torch.Tensor | None) -> StepRecord:
        eps = (x - denoised) / append_dims(sigma, x.ndim)
        return StepRecord(index=index, decision=decision, sigma=s, x=x, denoised=denoised, eps=eps, cond=cond,
                          uncond=uncond)
