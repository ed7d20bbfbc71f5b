"""A1111 WebUI glue that needs no A1111 import: sampler registration and the denoiser mechanics. The settings,
infotext and NFE reporting it shares with the Forge host are in :mod:`~adaptive_sampler.hosts.webui_common`
(re-exported here: the A1111 host's public names).

The extension's ``scripts/adaptive_sampler_webui.py`` passes A1111's classes and modules in; everything here is
testable with real k-diffusion and small stand-ins for A1111's objects.

Mechanics. A1111's ``CFGDenoiser.forward`` stacks, per step, the conditional rows of every image (one per AND
sub-prompt) and then one unconditional row per image, calls ``inner_model`` once and combines the rows. The adaptive
denoiser keeps that stock path - callbacks, masks, previews, prompt editing, ``step`` counting - and wraps
``inner_model`` in a :class:`RowProxy` that, per the oracle's decision, evaluates all rows (FULL), only the
conditional rows (COND; the unconditional rows are filled with each image's first conditional row and combined at
scale 1, exactly A1111's own "skip uncond" path), the conditional rows plus an estimated unconditional row (LINEAR), or
nothing at all (CACHED: every row is the prediction rebuilt from the cached eps).

The module is about 300 lines because it is the whole A1111 host's mechanics: registration and the denoiser belong
together and are tested together.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch

from .. import oracles as O
from ..oracles import Decision, RunInfo, StepRecord, StepState
from .webui_common import (ADAPTIVE_SAMPLERS, DEFAULT_MIN_STEPS, INFOTEXT, MODE_FIELDS, MODES, NFE_FIELD,  # noqa: F401
                           NOTES_FIELD, AdaptiveSettings, conditioning_boundaries, is_forge, report)

#: Built-in samplers the accordion can adapt: one denoiser call per step. Others are left untouched.
SUPPORTED_BUILTINS = {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ 3M SDE", "LMS", "DDIM"}

#: Samplers that add fresh noise after their steps when their eta is above 0 (A1111's default eta is 1 for the
#: ancestral / SDE samplers, 0 for DDIM): a skipped step there reuses or forecasts x0, never eps.
STOCHASTIC_BUILTINS = {"Euler a", "DPM++ 2M SDE", "DPM++ 3M SDE", "DDIM"}


def is_stochastic(sampler_name: str, eta: float | None) -> bool:
    """Whether an A1111 sampler (built-in or ``* Adaptive``) injects noise between steps at this eta."""
    base = next((b for name, _, b in ADAPTIVE_SAMPLERS if name == sampler_name), sampler_name)
    return base in STOCHASTIC_BUILTINS and eta is not None and eta > 0

# -- sampler registration ---------------------------------------------------------------------------------------
def register_samplers(sd_samplers: Any, make_sampler_data: Callable[[str, str, str], Any]) -> list[str]:
    """Add (or replace, on Reload UI) the adaptive samplers in A1111's sampler tables.

    ``make_sampler_data(name, function, base)`` builds the ``SamplerData``. Entries with the same name are removed
    from ``all_samplers`` and ``all_samplers_map`` first, so reloading never duplicates them.
    """
    names = []
    for name, function, base in ADAPTIVE_SAMPLERS:
        if base not in sd_samplers.all_samplers_map:
            continue
        data = make_sampler_data(name, function, base)
        sd_samplers.all_samplers[:] = [s for s in sd_samplers.all_samplers if s.name != name]
        sd_samplers.all_samplers.append(data)
        sd_samplers.all_samplers_map[name] = data
        names.append(name)
    sd_samplers.set_samplers()
    sd_samplers.get_sampler_and_scheduler.cache_clear()
    return names


def with_schedule(func: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap a sampler function so an adaptive denoiser learns the run's length (and sigmas) before its first step.

    ``functools.wraps`` keeps the signature A1111 inspects for optional arguments (eta, noise_sampler, ...).
    """

    @functools.wraps(func)
    def run(model, x, *args, **kwargs):
        schedule = kwargs.get("sigmas", kwargs.get("timesteps", args[0] if args else None))
        if schedule is not None and hasattr(model, "adaptive_steps"):
            model.adaptive_steps = len(schedule) - 1
            model.adaptive_sigmas = schedule if "timesteps" not in kwargs else None
        return func(model, x, *args, **kwargs)

    return run


# -- the denoiser mechanics -------------------------------------------------------------------------------------
def _slice_rows(value: Any, stop: int) -> Any:
    """The first ``stop`` rows of a conditioning structure (tensors, lists of tensors, dicts of them)."""
    if isinstance(value, torch.Tensor):
        return value[:stop]
    if isinstance(value, dict):
        return {k: _slice_rows(v, stop) for k, v in value.items()}
    if isinstance(value, list):
        return [_slice_rows(v, stop) for v in value]
    return value


class StepController:
    """Runs one oracle for one A1111 sampling pass.

    ``prediction`` is ``"x0"`` for the k-diffusion denoisers (inner model returns denoised images) and ``"eps"``
    for the timesteps (DDIM) denoiser, whose inner model returns eps at integer timesteps; oracles always see
    k-diffusion-scaled latents and x0 predictions.
    """

    def __init__(self, oracle: O.Oracle | None, sampler: str, prediction: str,
                 alphas_cumprod: torch.Tensor | None = None) -> None:
        if prediction not in ("x0", "eps"):
            raise ValueError(f"prediction must be 'x0' or 'eps', got {prediction!r}")
        if prediction == "eps" and alphas_cumprod is None:
            raise ValueError("alphas_cumprod is required for eps (timestep) denoisers")
        self.oracle = oracle
        self.sampler = sampler
        self.prediction = prediction
        self.alphas_cumprod = alphas_cumprod
        self.decision = Decision.FULL
        self.layout_mismatch = 0
        self.notes: list[str] = []
        self._boundaries: frozenset[int] = frozenset()
        self._repeats: list[int] = []
        self._state: StepState | None = None
        self._alpha = 1.0
        self._cond_rows: torch.Tensor | None = None
        self._uncond_rows: torch.Tensor | None = None
        self._evaluated = 0

    @property
    def active(self) -> bool:
        return self.oracle is not None

    def begin_run(self, steps: int, batch: int, sigmas: torch.Tensor | None, cond: Any, uncond: Any,
                  stochastic: bool = False) -> None:
        self._boundaries = conditioning_boundaries(cond, uncond)
        if self.oracle is not None:
            sig = tuple(float(s) for s in sigmas) if sigmas is not None and self.prediction == "x0" else ()
            self.oracle.reset(RunInfo(sampler=self.sampler, sigmas=sig, batch_size=batch, steps=steps,
                                      stochastic=stochastic))
            self.notes += [reason for _, reason in self.oracle.overrides]  # run-level: before any step

    # -- scaling between A1111's view and the oracle's (k-diffusion) view ---------------------------------------
    def _sigma(self, sigma: torch.Tensor) -> float:
        if self.prediction == "x0":
            return float(sigma.reshape(-1)[0])
        a = float(self.alphas_cumprod[int(sigma.reshape(-1)[0])])
        self._alpha = a
        return math.sqrt((1 - a) / a)

    def _to_x0(self, x: torch.Tensor, out: torch.Tensor, s: float) -> torch.Tensor:
        """Inner-model output rows (x0 or eps) as x0 in k-diffusion scaling; ``x`` is A1111's latent."""
        if self.prediction == "x0":
            return out
        a = self._alpha
        return (x - math.sqrt(1 - a) * out) / math.sqrt(a)

    def _k_latent(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.prediction == "x0" else x / math.sqrt(self._alpha)

    # -- per step -------------------------------------------------------------------------------------------------
    def begin_step(self, index: int, total: int, x: torch.Tensor, sigma: torch.Tensor, repeats: list[int]) -> Decision:
        self._repeats = repeats
        self._cond_rows = self._uncond_rows = None
        self._evaluated = 0
        if self.oracle is None:
            self.decision = Decision.FULL
            return self.decision
        s = self._sigma(sigma)
        self._state = StepState(index=index, total=total, sigma=s, x=self._k_latent(x),
                                conditioning_changed=index in self._boundaries)
        self.decision = self.oracle.decide(self._state)
        return self.decision

    def rows(self, inner: Callable[..., torch.Tensor], x_in: torch.Tensor, sigma_in: torch.Tensor,
             cond: Any, **kwargs: Any) -> torch.Tensor:
        """The inner model's output rows for this step's decision (called in place of the inner model)."""
        batch = len(self._repeats)
        n_cond = sum(self._repeats)
        firsts = [sum(self._repeats[:i]) for i in range(batch)]
        if self.decision is Decision.FULL or x_in.shape[0] != n_cond + batch:
            if self.decision is not Decision.FULL:  # chunked calls, NGMS or edit models: evaluate as asked
                self.layout_mismatch += 1
                self.decision = Decision.FULL
            out = inner(x_in, sigma_in, cond=cond, **kwargs)
            self._evaluated += out.shape[0]
            if out.shape[0] == n_cond + batch:
                self._cond_rows, self._uncond_rows = out[firsts], out[n_cond:]
            elif out.shape[0] == n_cond:
                self._cond_rows = out[firsts]  # A1111 dropped the uncond rows itself, unless another chunk follows
            return out
        x = x_in[n_cond:]
        if self.decision is Decision.CACHED:
            denoised = self.oracle.cached_denoised(self._state)
            if self.prediction == "x0":
                per_image = denoised.to(x_in.dtype)
            else:
                per_image = ((self._state.x.float() - denoised) / self._state.sigma).to(x_in.dtype)
            expand = torch.cat([per_image[i:i + 1].expand(r, *per_image.shape[1:]) for i, r in enumerate(self._repeats)])
            return torch.cat([expand, per_image])
        cond_out = inner(x_in[:n_cond], sigma_in[:n_cond], cond=_slice_rows(cond, n_cond), **kwargs)
        self._cond_rows = cond_out[firsts]
        if self.decision is Decision.COND:
            return torch.cat([cond_out, self._cond_rows])
        s = self._state.sigma
        cond_x0 = self._to_x0(x, self._cond_rows, s)
        uncond_x0 = self.oracle.estimate_uncond(self._state, cond_x0)
        if self.prediction == "x0":
            self._uncond_rows = uncond_x0.to(cond_out.dtype)
        else:
            self._uncond_rows = ((self._k_latent(x) - uncond_x0) / s).to(cond_out.dtype)
        return torch.cat([cond_out, self._uncond_rows])

    def end_step(self, index: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        if self.oracle is None:
            return
        state = self._state
        s = state.sigma
        den = self._to_x0(x, denoised, s).float()
        if not torch.isfinite(den).all():
            raise FloatingPointError(f"adaptive sampling: the prediction at step {index} is NaN/inf "
                                     f"(decision {self.decision.name})")
        if self.decision is Decision.FULL and self._uncond_rows is None:
            if self._evaluated == sum(self._repeats):
                self.decision = Decision.COND  # A1111 skipped the uncond rows (NGMS, "skip early CFG"): 1 NFE
            else:
                self._cond_rows = None  # chunked calls or an edit model: the rows are not identified
        k_x = state.x.float()
        cond = None if self._cond_rows is None else self._to_x0(x, self._cond_rows, s).float()
        uncond = None if self._uncond_rows is None else self._to_x0(x, self._uncond_rows, s).float()
        self.oracle.record(StepRecord(index=index, decision=self.decision, sigma=s, x=state.x, denoised=den,
                                      eps=(k_x - den) / s, cond=cond, uncond=uncond))

    def nfe(self) -> tuple[int, int]:
        """(NFE used, NFE of full CFG) per image so far in this pass."""
        if self.oracle is None:
            return 0, 0
        summary = self.oracle.summary()
        return summary.nfe, summary.nfe_full


class RowProxy:
    """Stands in for A1111's inner model during one forward call; everything else is delegated to it."""

    def __init__(self, inner: Any, controller: StepController) -> None:
        self._inner = inner
        self._controller = controller

    def __call__(self, x_in: torch.Tensor, sigma_in: torch.Tensor, cond: Any = None, **kwargs: Any) -> torch.Tensor:
        return self._controller.rows(self._inner, x_in, sigma_in, cond, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def adaptive_denoiser_class(base: type, prediction: str) -> type:
    """A subclass of A1111's ``CFGDenoiserKDiffusion`` (prediction "x0") or ``CFGDenoiserTimesteps`` ("eps") that
    runs a step oracle. ``settings_for(p)`` and ``report(p, used, full)`` are supplied by the scripts module."""

    class AdaptiveCFGDenoiser(base):
        adaptive_prediction = prediction

        def __init__(self, sampler, settings_for: Callable[[Any], AdaptiveSettings], sampler_name: str,
                     report: Callable[[Any, "StepController"], None]) -> None:
            super().__init__(sampler)
            self._settings_for = settings_for
            self._sampler_name = sampler_name
            self._report = report
            self.adaptive: StepController | None = None
            self.adaptive_steps: int | None = None
            self.adaptive_sigmas: torch.Tensor | None = None

        @property
        def inner_model(self):
            inner = base.inner_model.fget(self)
            return inner if self.adaptive is None else RowProxy(inner, self.adaptive)

        def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
            if self.step == 0 or self.adaptive is None:
                self._begin(x, cond, uncond)
            ctl = self.adaptive
            repeats = [len(per_image) for per_image in cond.batch]
            index = self.step
            ctl.begin_step(index, self.adaptive_steps, x, sigma, repeats)
            denoised = super().forward(x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)
            ctl.end_step(index, x, denoised)
            self._report(self.p, ctl)
            return denoised

        def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
            if self.adaptive is not None and self.adaptive.decision is Decision.COND:
                cond_scale = 1.0  # A1111's own cond-only path: the fake uncond rows are the first cond rows
            return super().combine_denoised(x_out, conds_list, uncond, cond_scale)

        def _begin(self, x, cond, uncond) -> None:
            settings = self._settings_for(self.p)
            alphas = None
            if prediction == "eps":
                alphas = base.inner_model.fget(self).inner_model.alphas_cumprod.detach().float().cpu()
            steps = self.adaptive_steps or self.total_steps
            self.adaptive_steps = steps
            self.adaptive = StepController(settings.build_oracle(steps), self._sampler_name, prediction, alphas)
            note = settings.short_pass_note(steps)
            self.adaptive.notes += [note] if note else []
            stochastic = is_stochastic(self._sampler_name, getattr(self.sampler, "eta", None))
            self.adaptive.begin_run(steps, x.shape[0], self.adaptive_sigmas, cond, uncond, stochastic)

    AdaptiveCFGDenoiser.__name__ = AdaptiveCFGDenoiser.__qualname__ = f"Adaptive{base.__name__}"
    return AdaptiveCFGDenoiser
