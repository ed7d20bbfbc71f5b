"""A1111 WebUI glue that needs no A1111 import: sampler registration and the denoiser mechanics. The settings,
infotext and NFE reporting it shares with the Forge host are in :mod:`~adaptive_sampler.hosts.webui_common`
(re-exported here: the A1111 host's public names).

The extension's ``scripts/adaptive_sampler_webui.py`` passes A1111's classes and modules in; everything here is
testable with real k-diffusion and small stand-ins for A1111's objects.

Mechanics. A1111's ``CFGDenoiser.forward`` stacks, per step, the conditional rows of every image (one per AND
sub-prompt) and then one unconditional row per image, calls ``inner_model`` (once, or in chunks) and combines the
rows. The adaptive denoiser keeps that stock path - callbacks, masks, previews, prompt editing, ``step`` counting -
and wraps ``inner_model`` in a :class:`RowProxy` that evaluates, per image, the rows its decision needs: all of them
(FULL), the conditional rows (COND; the unconditional row is filled with the image's first conditional row and
combined at scale 1, exactly A1111's own "skip uncond" path), the conditional rows plus an estimated unconditional
row (LINEAR), or none (CACHED: every row is the prediction rebuilt from the cache). Oracles that decide per image
(AG, AdaptiveDiffusion) do so here as in our own loops (:class:`StepController`).

The module is about 400 lines because it is the whole A1111 host's mechanics: registration and the denoiser belong
together and are tested together.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch

from .. import oracles as O
from ..flow import is_flow_model
from ..oracles import Decision, RunInfo, StepRecord, StepState
from .webui_common import (ADAPTIVE_SAMPLERS, DEFAULT_MIN_STEPS, INFOTEXT, MODE_FIELDS, MODES, NFE_FIELD,  # noqa: F401
                           NOTES_FIELD, AdaptiveSettings, conditioning_boundaries, infotext_value, is_forge, report)

#: Built-in samplers the accordion can adapt: one denoiser call per step. Others are left untouched.
SUPPORTED_BUILTINS = {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ 3M SDE", "LMS", "DDIM"}

#: Samplers that add fresh noise after their steps when their eta is above 0 (A1111's default eta is 1 for the
#: ancestral / SDE samplers, 0 for DDIM): a skipped step there reuses or forecasts x0, never eps.
STOCHASTIC_BUILTINS = {"Euler a", "DPM++ 2M SDE", "DPM++ 3M SDE", "DDIM"}


#: Why an edit model's pass is not adapted: A1111 evaluates three rows per image there (InstructPix2Pix).
EDIT_MODEL = ("an edit model (InstructPix2Pix) at image CFG scale other than 1 evaluates three rows per image: not "
              "adapted, ran unchanged")


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
def _index_rows(value: Any, index: torch.Tensor, rows: int) -> Any:
    """Rows ``index`` of a conditioning structure of ``rows`` rows (tensors, and lists and dicts of them); a tensor
    of another first dimension is passed whole."""
    if isinstance(value, torch.Tensor):
        return value[index] if value.ndim and value.shape[0] == rows else value
    if isinstance(value, dict):
        return {k: _index_rows(v, index, rows) for k, v in value.items()}
    if isinstance(value, list):
        return [_index_rows(v, index, rows) for v in value]
    return value


class StepController:
    """Runs one oracle for one A1111 sampling pass.

    ``prediction`` is ``"x0"`` for the k-diffusion denoisers (inner model returns denoised images) and ``"eps"``
    for the timesteps (DDIM) denoiser, whose inner model returns eps at integer timesteps; oracles always see
    k-diffusion-scaled latents and x0 predictions. ``flow`` marks a flow-matching model (A1111's SD3).

    An oracle that decides per image (AG, AdaptiveDiffusion; ``Oracle.decides_per_image``) is split into one copy
    per image, as in our own loops, so an image's decisions and picture do not depend on its batch. A step then
    evaluates, for each image, only the rows its decision needs. The rows are known by their position in A1111's
    layout - every image's conditional rows (one per AND sub-prompt), then one unconditional row per image - and
    A1111's calls of a step are consecutive slices of it (one call; chunks with "Batch cond/uncond" off or a
    prompt longer than the negative one; only the conditional rows when A1111 skips the unconditional ones itself).
    A row that is not evaluated is filled so that A1111's own combine gives the image its decision: a COND image's
    unconditional row is its first conditional row (A1111's own cond-only path, combined at scale 1), a LINEAR
    image's is the estimate, every row of a CACHED image is its cached prediction.
    """

    def __init__(self, oracle: O.Oracle | None, sampler: str, prediction: str,
                 alphas_cumprod: torch.Tensor | None = None, flow: bool = False) -> None:
        if prediction not in ("x0", "eps"):
            raise ValueError(f"prediction must be 'x0' or 'eps', got {prediction!r}")
        if prediction == "eps" and alphas_cumprod is None:
            raise ValueError("alphas_cumprod is required for eps (timestep) denoisers")
        self.oracle = oracle
        self.sampler = sampler
        self.prediction = prediction
        self.alphas_cumprod = alphas_cumprod
        self.flow = flow
        self.per_image = False
        #: This step's decision for each image of the batch.
        self.decisions: list[Decision] = []
        self.notes: list[str] = []
        self._boundaries: frozenset[int] = frozenset()
        self._unidentified = False
        self._alpha = 1.0
        self._sigma_k = 1.0
        self._batch = 0
        self._x: torch.Tensor | None = None
        self._states: list[StepState] = []
        self._batch_state: StepState | None = None
        self._firsts: list[int] = []
        self._owner: list[int] = []
        self._n_cond = 0
        self._cursor = 0
        self._rows: dict[int, torch.Tensor] = {}
        self._estimates: dict[int, torch.Tensor] = {}
        self._filled: dict[int, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return self.oracle is not None

    def begin_run(self, steps: int, batch: int, sigmas: torch.Tensor | None, cond: Any, uncond: Any,
                  stochastic: bool = False) -> None:
        self._boundaries = conditioning_boundaries(cond, uncond)
        self._batch = batch
        if self.oracle is not None:
            sig = tuple(float(s) for s in sigmas) if sigmas is not None and self.prediction == "x0" else ()
            self.oracle.reset(RunInfo(sampler=self.sampler, sigmas=sig, batch_size=batch, steps=steps,
                                      stochastic=stochastic, flow=self.flow))
            self.notes += [reason for _, reason in self.oracle.overrides]  # run-level: before any step
            self.per_image = self.oracle.decides_per_image and batch > 1
            if self.per_image:
                self.oracle.split_images()

    # -- scaling between A1111's view and the oracle's (k-diffusion) view ---------------------------------------
    def _sigma(self, sigma: torch.Tensor) -> float:
        if self.prediction == "x0":
            return float(sigma.reshape(-1)[0])
        a = float(self.alphas_cumprod[int(sigma.reshape(-1)[0])])
        self._alpha = a
        return math.sqrt((1 - a) / a)

    def _to_x0(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Inner-model output rows (x0 or eps) as x0 in k-diffusion scaling; ``x`` is A1111's latent."""
        if self.prediction == "x0":
            return out
        a = self._alpha
        return (x - math.sqrt(1 - a) * out) / math.sqrt(a)

    def _from_x0(self, k_x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """An x0 prediction as the inner model's output (x0 or eps); ``k_x`` is the k-diffusion latent."""
        return x0 if self.prediction == "x0" else (k_x - x0) / self._sigma_k

    def _k_latent(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.prediction == "x0" else x / math.sqrt(self._alpha)

    # -- per step -------------------------------------------------------------------------------------------------
    def begin_step(self, index: int, total: int, x: torch.Tensor, sigma: torch.Tensor, repeats: list[int]) -> None:
        """Decide the step for every image (``repeats``: each image's number of conditional rows)."""
        batch = len(repeats)
        self._n_cond = sum(repeats)
        self._firsts = [sum(repeats[:i]) for i in range(batch)]
        self._owner = [i for i, n in enumerate(repeats) for _ in range(n)]
        self._cursor = 0
        self._x = x
        self._unidentified = False
        self._rows, self._estimates, self._filled = {}, {}, {}
        if self.oracle is None:
            self.decisions = [Decision.FULL] * batch
            return
        s = self._sigma_k = self._sigma(sigma)
        k_x = self._k_latent(x)
        changed = index in self._boundaries
        if self.per_image:
            self._states = [StepState(index=index, total=total, sigma=s, x=k_x[i:i + 1], conditioning_changed=changed)
                            for i in range(batch)]
            self.decisions = self.oracle.decide_images(self._states)
        else:
            self._batch_state = StepState(index=index, total=total, sigma=s, x=k_x, conditioning_changed=changed)
            self.decisions = [self.oracle.decide(self._batch_state)] * batch

    def cond_only(self) -> list[bool]:
        """Which images combine at scale 1 this step: those whose decision is COND (A1111's cond-only path)."""
        return [d is Decision.COND for d in self.decisions]

    def _image(self, row: int) -> tuple[int, bool]:
        """(image, whether the row is its unconditional row) of a position in A1111's row layout."""
        return (self._owner[row], False) if row < self._n_cond else (row - self._n_cond, True)

    def _needed(self, row: int) -> bool:
        image, uncond = self._image(row)
        decision = self.decisions[image]
        return decision is Decision.FULL if uncond else decision is not Decision.CACHED

    def _cached(self, image: int) -> torch.Tensor:
        """A CACHED image's x0 (float32), per image or from the batch's oracle."""
        if image not in self._filled:
            if self.per_image:
                self._filled[image] = self.oracle.images[image].cached_denoised(self._states[image])
            else:
                batch = self.oracle.cached_denoised(self._batch_state)
                self._filled.update({i: batch[i:i + 1] for i in range(batch.shape[0])})
        return self._filled[image]

    def _estimate(self, image: int) -> torch.Tensor:
        """A LINEAR image's estimated unconditional x0, from its first conditional row."""
        x = self._x
        if image not in self._estimates:
            if self.per_image:
                cond = self._to_x0(x[image:image + 1], self._rows[self._firsts[image]]).float()
                self._estimates[image] = self.oracle.images[image].estimate_uncond(self._states[image], cond)
            else:
                cond = torch.stack([self._rows[f] for f in self._firsts])
                batch = self.oracle.estimate_uncond(self._batch_state, self._to_x0(x, cond).float())
                self._estimates.update({i: batch[i:i + 1] for i in range(batch.shape[0])})
        return self._estimates[image]

    def _fill(self, row: int, x_row: torch.Tensor) -> torch.Tensor:
        """The output of a row that is not evaluated (``x_row``: the row's input latent)."""
        image, uncond = self._image(row)
        decision = self.decisions[image]
        k_x = self._k_latent(x_row)
        if decision is Decision.CACHED:
            return self._from_x0(k_x, self._cached(image)[0])
        if decision is Decision.COND:
            return self._rows[self._firsts[image]]
        return self._from_x0(k_x, self._estimate(image)[0])

    def rows(self, inner: Callable[..., torch.Tensor], x_in: torch.Tensor, sigma_in: torch.Tensor,
             cond: Any, **kwargs: Any) -> torch.Tensor:
        """The inner model's output rows for this call (called in place of the inner model): the rows the images'
        decisions need are evaluated in one call, the others filled."""
        n = x_in.shape[0]
        start, self._cursor = self._cursor, self._cursor + n
        if self.oracle is None or self._unidentified or start + n > self._n_cond + len(self.decisions):
            self._unidentified = self.oracle is not None  # more rows than A1111's layout: evaluated as asked
            return inner(x_in, sigma_in, cond=cond, **kwargs)
        positions = range(start, start + n)
        need = [self._needed(r) for r in positions]
        if all(need):
            out = inner(x_in, sigma_in, cond=cond, **kwargs)  # the stock call
        else:
            at = [k for k in range(n) if need[k]]
            out = torch.empty_like(x_in)
            if at:
                index = torch.tensor(at, device=x_in.device)
                part = inner(x_in[index], sigma_in[index], cond=_index_rows(cond, index, n), **kwargs)
                out = out.to(part.dtype)
                out[index] = part
        for k, r in enumerate(positions):
            if need[k]:
                self._rows[r] = out[k]
        for k, r in enumerate(positions):
            if not need[k]:
                out[k] = self._fill(r, x_in[k]).to(out.dtype)
        return out

    def end_step(self, index: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        if self.oracle is None:
            return
        s = self._sigma_k
        den = self._to_x0(x, denoised).float()
        k_x = self._k_latent(x).float()
        if not torch.isfinite(den).all():
            raise FloatingPointError(f"adaptive sampling: the prediction at step {index} is NaN/inf "
                                     f"(decisions {''.join(d.value for d in self.decisions)})")
        if self._unidentified:
            self.notes.append(f"step {index}: the denoiser was called with more rows than A1111's layout: "
                              "evaluated as asked (full CFG)")
        batch = len(self.decisions)
        taken, conds, unconds = [], [], []
        for i, decision in enumerate(self.decisions):
            first, u = self._firsts[i], self._n_cond + i
            cond = None if self._unidentified or first not in self._rows else \
                self._to_x0(x[i:i + 1], self._rows[first][None]).float()
            uncond = None
            if self._unidentified:
                decision = Decision.FULL
            elif decision is Decision.FULL:
                uncond = self._to_x0(x[i:i + 1], self._rows[u][None]).float() if u in self._rows else None
                decision = Decision.COND if uncond is None else decision  # A1111 skipped the uncond rows: 1 NFE
            elif decision is Decision.LINEAR:
                uncond = self._estimates.get(i)
                decision = Decision.COND if uncond is None else decision
            taken.append(decision)
            conds.append(cond)
            unconds.append(uncond)
        if self.per_image:
            records = [StepRecord(index=index, decision=taken[i], sigma=s, x=self._states[i].x, denoised=den[i:i + 1],
                                  eps=(k_x[i:i + 1] - den[i:i + 1]) / s, cond=conds[i], uncond=unconds[i])
                       for i in range(batch)]
            self.oracle.record_images(records, [0] * batch, [None] * batch)
        else:
            both = [torch.cat(t) if all(v is not None for v in t) else None for t in (conds, unconds)]
            self.oracle.record(StepRecord(index=index, decision=taken[0], sigma=s, x=self._batch_state.x,
                                          denoised=den, eps=(k_x - den) / s, cond=both[0], uncond=both[1]))
        self.decisions = taken

    def nfe(self) -> list[tuple[int, int]]:
        """(NFE used, NFE of full CFG) of each image so far in this pass (empty when the pass is not adapted)."""
        if self.oracle is None:
            return []
        if self.per_image:
            return [(s.nfe, s.nfe_full) for s in (image.summary() for image in self.oracle.images)]
        summary = self.oracle.summary()
        return [(summary.nfe, summary.nfe_full)] * self._batch


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
    runs a step oracle. ``settings_for(p)`` and ``report(p, controller)`` are supplied by the scripts module."""

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
            """COND images combine at scale 1 (A1111's own cond-only path: their uncond rows are their first cond
            rows); combine works image by image, so a batch mixing decisions takes each image's rows from its own."""
            ones = self.adaptive.cond_only() if self.adaptive is not None else []
            if not any(ones) or cond_scale == 1.0:
                return super().combine_denoised(x_out, conds_list, uncond, cond_scale)
            unit = super().combine_denoised(x_out, conds_list, uncond, 1.0)
            if all(ones):
                return unit
            denoised = super().combine_denoised(x_out, conds_list, uncond, cond_scale)
            pick = torch.tensor(ones, device=denoised.device)
            denoised[pick] = unit[pick]
            return denoised

        def _begin(self, x, cond, uncond) -> None:
            settings = self._settings_for(self.p)
            wrapped = base.inner_model.fget(self)
            alphas = None
            if prediction == "eps":
                alphas = wrapped.inner_model.alphas_cumprod.detach().float().cpu()
            steps = self.adaptive_steps or self.total_steps
            self.adaptive_steps = steps
            edit = getattr(getattr(wrapped, "inner_model", None), "cond_stage_key", None) == "edit" \
                and getattr(self, "image_cfg_scale", None) not in (None, 1.0)
            oracle = None if edit else settings.build_oracle(steps)
            flow = prediction == "x0" and is_flow_model(wrapped)  # A1111's SD3: sigmas in (0, 1]
            self.adaptive = StepController(oracle, self._sampler_name, prediction, alphas, flow=flow)
            note = EDIT_MODEL if edit and settings.mode != "off" else settings.short_pass_note(steps)
            self.adaptive.notes += [note] if note else []
            stochastic = is_stochastic(self._sampler_name, getattr(self.sampler, "eta", None))
            self.adaptive.begin_run(steps, x.shape[0], self.adaptive_sigmas, cond, uncond, stochastic)

    AdaptiveCFGDenoiser.__name__ = AdaptiveCFGDenoiser.__qualname__ = f"Adaptive{base.__name__}"
    return AdaptiveCFGDenoiser
