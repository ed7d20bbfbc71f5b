"""ComfyUI glue: the "Adaptive Sampling" model-patch node, the ``*_adaptive`` KSampler samplers and the per-run report.

Nothing here imports ComfyUI at module level: ComfyUI's modules are imported inside the functions that need them,
so the mechanics are testable with small stand-ins and real k-diffusion (``tests/test_comfyui.py``).

Mechanics. The node clones the MODEL and registers three of ComfyUI's model wrappers (``comfy.patcher_extension``):

* ``OUTER_SAMPLE`` (once per sampling run): identifies the sampler that is about to run, builds a fresh oracle and
  an :class:`AdaptiveRun` for this run only, and puts the run in the run's ``transformer_options``; when the run
  ends it logs a one-line report and keeps it for the "Adaptive Sampling Report" node. Nothing outlives the run but
  the report.
* ``PREDICT_NOISE`` (once per model call of the sampler): the step index is the position of the call's sigma in
  ``transformer_options["sample_sigmas"]``; the oracle's decision becomes the prediction. FULL is ComfyUI's own
  path, untouched (cond + uncond, its CFG function, its pre/post-CFG hooks); COND is ComfyUI's own path at CFG scale
  1 (conditional rows only, exactly what ComfyUI evaluates when the user sets cfg 1); LINEAR evaluates the
  conditional rows with ``calc_cond_batch`` and combines them with the estimated unconditional prediction through
  ComfyUI's ``cfg_function`` (its CFG and post-CFG hooks); CACHED makes no model call (the oracle's x0 forecast).
* ``CALC_COND_BATCH``: observes ComfyUI's conditional and unconditional predictions on computed steps (the
  oracles that test guidance need them); it changes nothing.

Only samplers that evaluate the model exactly once per step, at the step's sigma, are adapted; any other sampler
(heun, dpm_2, dpmpp_sde, uni_pc, ...) and any guider other than ComfyUI's CFGGuider runs unchanged, with one log
line. A call whose sigma is not the next step's stops the adaptation for the rest of the run (full CFG, logged):
never a wrong step count. That bookkeeping (which call is which step, NFE, the oracle's records) is
:class:`~adaptive_sampler.hosts.backend.OracleRun`, shared with the Forge host, whose backend derives from ComfyUI's.

Oracles that decide per image (AG, AdaptiveDiffusion) get one copy per image, as in the library's loops and on
A1111 and Forge (the mechanism is Forge's, in :mod:`~adaptive_sampler.hosts.backend`): a step whose images decided
differently evaluates each decision group through ComfyUI's own path with the group's rows of the latent and of the
conditioning, so an image gets the same decisions and picture alone or in a batch. A batch with a ControlNet
decides as one (its hint is computed for the whole batch), and its report says so.

Each run tells its oracle what ComfyUI's samplers see: a flow model (its ``model_sampling`` is a ``CONST``: SD3, Flux,
Wan, or any model behind a ModelSampling* node) with the sigmas the sampler really calls (its half-log-SNR samplers
offset a first sigma of 1), and whether the run is guided (cfg 1 evaluates one row per step). A latent's first
dimension is the batch whatever its rank: a 5-D video latent is a batch of videos, each forecast on its own.

The module is over 300 lines because it is the whole ComfyUI host (its glue needs no other host).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, fields
from types import SimpleNamespace
from typing import Any, Callable

import torch

from .. import oracles as O
from ..oracles import Decision
from .backend import (GUIDANCE_MODES, HALF_LOG_SNR_SAMPLERS, ONE_CALL_SAMPLERS, OracleRun, cached, classify_function,
                      conditioning_rows, estimate, groups, per_image_blocker)

log = logging.getLogger(__name__)

#: Key of our wrappers and of the patch in ``transformer_options``; key of the per-run object.
KEY = "adaptive_sampler"
RUN_KEY = "adaptive_sampler_run"

MODES = O.HOST_MODES

#: The samplers added to ComfyUI's KSampler list as ``<base>_adaptive``.
ADAPTIVE_SAMPLERS = ("euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde")



def _defaults() -> dict[str, Any]:
    """Widget defaults, taken from the oracles themselves so they cannot drift: ``recommended()`` and the
    published AG / AdaptiveDiffusion settings."""
    rec, ad = O.recommended(), O.AdaptiveDiffusion()
    if not isinstance(rec, O.Forecast):  # the "forecast" mode below builds the recommended oracle
        raise RuntimeError(f"recommended() is {type(rec).__name__}; update the ComfyUI host's default mode")
    return dict(mode="forecast", level=rec.level, budget=rec.budget or 0.0, ag_threshold=O.DEFAULT_AG_THRESHOLDS["x0"], ag_space="x0",
                ad_threshold=ad.threshold, ad_max_skips=ad.max_skips, ad_warmup=ad.warmup)


_DEFAULTS = _defaults()


@dataclass(frozen=True)
class ComfySettings:
    """The node's widgets, validated at construction: a bad value raises ``ValueError`` naming the widget.
    ``level`` is the forecast mode's one knob (quality / balanced / fast); ``budget`` 0 means "set by the level",
    another value overrides it; runs shorter than
    ``min_steps`` are not adapted (full CFG, logged), as on A1111."""

    mode: str = _DEFAULTS["mode"]
    level: str = _DEFAULTS["level"]
    budget: float = _DEFAULTS["budget"]
    ag_threshold: float = _DEFAULTS["ag_threshold"]
    ag_space: str = _DEFAULTS["ag_space"]
    ad_threshold: float = _DEFAULTS["ad_threshold"]
    ad_max_skips: int = _DEFAULTS["ad_max_skips"]
    ad_warmup: int = _DEFAULTS["ad_warmup"]
    min_steps: int = O.SHORT_PASS_MIN_STEPS

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("budget", "ag_threshold", "ad_threshold"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))
        if isinstance(self.min_steps, bool) or not isinstance(self.min_steps, int) or self.min_steps < 1:
            raise ValueError("min_steps: must be an integer >= 1 (runs with fewer steps run unchanged; 1 adapts "
                             f"every run), got {self.min_steps!r}")
        checks: dict[str, Callable[[], object]] = {  # every widget is checked, whatever the mode
            "level": lambda: O.Forecast(level=self.level),
            "budget": lambda: O.Forecast(budget=self.budget or None),
            "ag_space": lambda: O.AdaptiveGuidance(space=self.ag_space) if self.ag_space in O.DEFAULT_AG_THRESHOLDS
            else O.AdaptiveGuidance(0.5, space=self.ag_space),
            "ag_threshold": lambda: O.AdaptiveGuidance(self.ag_threshold, "x0"),
            "ad_threshold": lambda: O.AdaptiveDiffusion(threshold=self.ad_threshold),
            "ad_max_skips": lambda: O.AdaptiveDiffusion(max_skips=self.ad_max_skips),
            "ad_warmup": lambda: O.AdaptiveDiffusion(warmup=self.ad_warmup),
        }
        for name, check in checks.items():
            try:
                check()
            except (TypeError, ValueError) as e:
                raise ValueError(f"{name}: {e}") from None

    def build_oracle(self) -> O.Oracle | None:
        """A fresh oracle for one sampling run (None for mode "off")."""
        return O.mode_oracle(self.mode, level=self.level, budget=self.budget or None, ag_threshold=self.ag_threshold,
                             ag_space=self.ag_space, ad_threshold=self.ad_threshold, max_skips=self.ad_max_skips,
                             warmup=self.ad_warmup)

    def describe(self) -> str:
        used = {"forecast": ("level", "budget") if self.budget else ("level",), "ag": ("ag_threshold", "ag_space"), "linear-ag": ("ag_threshold", "ag_space"),
                "adaptive-diffusion": ("ad_threshold", "ad_max_skips", "ad_warmup"),
                "ag+adaptive-diffusion": ("ag_threshold", "ag_space", "ad_threshold", "ad_max_skips", "ad_warmup"),
                "off": ()}[self.mode]
        return self.mode + "".join(f" {k}={getattr(self, k)}" for k in used)


WIDGETS = tuple(f.name for f in fields(ComfySettings))


def classify_sampler(sampler: Any) -> tuple[str, bool, str | None]:
    """(name, stochastic, why it cannot be adapted or None) for a ComfyUI sampler object (``KSAMPLER``)."""
    function = getattr(sampler, "sampler_function", None)
    if function is None:
        return type(sampler).__name__, False, "is not one of ComfyUI's k-diffusion samplers (KSAMPLER)"
    name = getattr(function, "adaptive_base", None) or getattr(function, "__name__", "?")
    options = dict(getattr(sampler, "extra_options", None) or {})
    stochastic, reason = classify_function(name, eta=float(options.get("eta", 1.0)),
                                           s_noise=float(options.get("s_noise", 1.0)),
                                           s_churn=float(options.get("s_churn", 0.0)))
    if reason is None and options.get("cfg_pp"):
        return name, False, "with cfg_pp needs the unconditional prediction at every step"
    return name, stochastic, reason


def latent_fingerprint(samples: torch.Tensor) -> tuple:
    """Identifies a sampler's output latent (shape and exact sums), to find its run's report later."""
    t = samples.detach().double()
    return tuple(samples.shape), float(t.sum()), float(t.abs().sum())


@dataclass(frozen=True)
class RunReport:
    """What one sampling run did, per image of the batch (``image_nfe``, ``schedules``): images spend differently
    when the oracle decides per image. NFE is network rows per sample (FULL 2, COND/LINEAR 1, CACHED 0)."""

    sampler: str
    mode: str
    steps: int
    batch: int
    stochastic: bool
    flow: bool
    image_nfe: tuple[int, ...]
    nfe_full: int
    schedules: tuple[str, ...]
    note: str
    fingerprint: tuple = ()

    @property
    def nfe(self) -> float:
        """NFE per image (the mean over the batch's images)."""
        return sum(self.image_nfe) / len(self.image_nfe)

    @property
    def alike(self) -> bool:
        """Whether every image of the batch took the same decisions."""
        return len(set(self.schedules)) <= 1 and len(set(self.image_nfe)) <= 1

    @property
    def schedule(self) -> str:
        """The decisions per step (F/C/L/S): one string when the images took the same, else one per image."""
        return self.schedules[0] if self.alike else " ".join(self.schedules)

    @property
    def counts(self) -> dict[str, int]:
        """Steps per decision kind (over the images, when they differ)."""
        letters = "".join(self.schedules[:1] if self.alike else self.schedules)
        return {d.name: letters.count(d.value) for d in Decision if d.value in letters}

    def line(self) -> str:
        share = f"{self.nfe / self.nfe_full:.0%}" if self.nfe_full else ""
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        if self.alike:
            spent = f"NFE {self.image_nfe[0]}/{self.nfe_full} per image" + (f" ({share})" if share else "")
            decided = f"; {counts}; decisions {self.schedule}" if self.schedule else ""
        else:
            spent = f"NFE per image {', '.join(map(str, self.image_nfe))} of {self.nfe_full} (mean {share})"
            decided = f"; decided per image, {counts} over the images; decisions {', '.join(self.schedules)}"
        text = (f"Adaptive Sampling [{self.mode}] {self.sampler}: {self.steps} steps, batch {self.batch}, "
                f"{'stochastic' if self.stochastic else 'deterministic'}{', flow model' if self.flow else ''}, "
                f"{spent}{decided}")
        return text + (f"; {self.note}" if self.note else "")


class AdaptivePatch:
    """What one "Adaptive Sampling" node put on its MODEL: the settings and the reports of recent runs (kept so the
    report node can find the run that produced a latent; bounded, and holding no tensors)."""

    def __init__(self, settings: ComfySettings) -> None:
        self.settings = settings
        self.reports: deque[RunReport] = deque(maxlen=64)

    def find(self, samples: torch.Tensor) -> RunReport | None:
        fp = latent_fingerprint(samples)
        return next((r for r in reversed(self.reports) if r.fingerprint == fp), None)


class AdaptiveRun(OracleRun):
    """One sampling run under one oracle (created per run, dropped when the run ends). ``batch`` counts the samples
    of the latent's first dimension: images, or videos for a 5-D video latent, whose frames are one sample."""

    def __init__(self, settings: ComfySettings, sampler: str, sigmas: torch.Tensor, batch: int, cfg: float,
                 stochastic: bool, reason: str | None = None, cfg1: bool = False, flow: bool = False) -> None:
        steps = sigmas.numel() - 1
        if reason is None and cfg1 and settings.mode in GUIDANCE_MODES:
            reason = "cfg is 1: ComfyUI evaluates no unconditional prediction, so there is no guidance to adapt"
        if reason is None and settings.mode != "off" and steps < settings.min_steps:
            reason = f"is a {steps}-step run, below min_steps ({settings.min_steps})"
        super().__init__(settings.build_oracle() if reason is None else None, sampler, sigmas, batch, stochastic,
                         rows_full=1 if cfg1 else 2, flow=flow)
        self.settings = settings
        self.reason = reason
        #: Why a per-image oracle decides for the whole batch (:meth:`split_images`), for the report.
        self.batch_note: str | None = None
        self.capturing = False
        self.captured: list[torch.Tensor] | None = None

    # -- one model call -----------------------------------------------------------------------------------------
    def predict(self, executor: Any, x: torch.Tensor, timestep: torch.Tensor, model_options: dict, seed: Any) -> torch.Tensor:
        s = float(timestep.reshape(-1)[0])
        i = self.next_step(s)
        if i is None:
            self.unchanged()
            return executor(x, timestep, model_options, seed)
        return self._step(i, s, executor, x, timestep, model_options, seed)

    def _step(self, i: int, s: float, executor: Any, x: torch.Tensor, timestep: torch.Tensor, model_options: dict,
              seed: Any) -> torch.Tensor:
        """One adapted step: each decision group's rows evaluated as those images alone would be (the whole batch in
        one call where its images agree); images whose skipping decision gave a non-finite prediction are computed
        again with full CFG."""
        owners, decisions = self.decide(i, s, x)
        batch = x.shape[0]
        denoised: list[torch.Tensor | None] = [None] * batch
        conds: list[torch.Tensor | None] = [None] * batch
        unconds: list[torch.Tensor | None] = [None] * batch
        wasted, fallback_from = [0] * batch, [None] * batch

        def evaluate(decision: Decision, rows: list[int]) -> None:
            out, cond, uncond = self._group(decision, rows, owners, executor, x, timestep, model_options, seed)
            for k, r in enumerate(rows):
                denoised[r] = out[k:k + 1]
                conds[r] = None if cond is None else cond[k:k + 1]
                unconds[r] = None if uncond is None else uncond[k:k + 1]

        for decision, rows in groups(decisions):
            evaluate(decision, rows)
        bad = [r for r in range(batch) if not torch.isfinite(denoised[r]).all()]
        if bad and not self.per_image:
            bad = list(range(batch))  # one oracle decides for the batch: the batch falls back together
        retry = [r for r in bad if decisions[r] is not Decision.FULL]
        for r in retry:
            wasted[r], fallback_from[r], decisions[r] = self.rows(decisions[r]), decisions[r], Decision.FULL
        if retry:
            evaluate(Decision.FULL, retry)
        result = torch.cat(denoised)
        if not torch.isfinite(result).all():  # ComfyUI's own result: pass it on, but never cache or regress on it
            self.count(decisions, wasted)
            self.stop(f"ComfyUI's full-CFG prediction at step {i} is NaN/inf")
            return result
        if self.settings.mode in GUIDANCE_MODES and any(d is Decision.FULL and u is None
                                                        for d, u in zip(decisions, unconds)):
            self.count(decisions, wasted)
            self.stop("ComfyUI's conditional and unconditional predictions could not be observed "
                      "(a custom sampler_calc_cond_batch_function?), which the guidance test needs")
            return result
        self.record(owners, decisions, result, conds, unconds, wasted, fallback_from)
        return result

    def _group(self, decision: Decision, rows: list[int], owners: list, executor: Any, x: torch.Tensor,
               timestep: torch.Tensor, model_options: dict, seed: Any
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(denoised, cond, uncond) of the batch's rows ``rows`` under ``decision``: the whole batch in one call, or
        a part of it with its own rows of the conditioning, exactly as those images alone would be evaluated."""
        group = [owners[r] for r in rows] if self.per_image else owners
        if len(rows) == x.shape[0]:
            return self._predict(decision, group, executor, x, timestep, model_options, seed)
        at = torch.tensor(rows, device=x.device)
        guider = executor.class_obj
        conds = guider.conds
        guider.conds = {k: conditioning_rows(v, at, x.shape[0]) for k, v in conds.items()}
        try:
            return self._predict(decision, group, executor, x[at], timestep[at], model_options, seed)
        finally:
            guider.conds = conds

    def _predict(self, decision: Decision, owners: list, executor: Any, x: torch.Tensor, timestep: torch.Tensor,
                 model_options: dict, seed: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(denoised, cond, uncond) of rows ``x`` under ``decision``; ``owners`` (the oracles covering the rows, with
        their step states) supply CACHED predictions and LINEAR estimates."""
        if decision is Decision.CACHED:
            return cached(owners).to(x.dtype), None, None
        if decision is Decision.COND:
            return self._cond(executor, x, timestep, model_options, seed)
        if decision is Decision.LINEAR:
            return self._linear(owners, executor, x, timestep, model_options)
        return self._full(executor, x, timestep, model_options, seed)

    def _capture(self, call: Callable[[], Any]) -> tuple[Any, list[torch.Tensor] | None]:
        self.capturing, self.captured = True, None
        try:
            out = call()
        finally:
            self.capturing = False
        captured, self.captured = self.captured, None
        return out, captured

    def _full(self, executor, x, timestep, model_options, seed):
        denoised, captured = self._capture(lambda: executor(x, timestep, model_options, seed))
        if captured is None or len(captured) != 2:
            return denoised, None, None
        return denoised, captured[0], captured[1]

    def _cond(self, executor, x, timestep, model_options, seed):
        """ComfyUI's own path at CFG scale 1: the conditional rows only, its CFG function and hooks at scale 1."""
        guider = executor.class_obj
        options = dict(model_options, disable_cfg1_optimization=False)
        cfg = guider.cfg
        guider.cfg = 1.0
        try:
            denoised, captured = self._capture(lambda: executor(x, timestep, options, seed))
        finally:
            guider.cfg = cfg
        return denoised, None if captured is None else captured[0], None

    def _linear(self, owners, executor, x, timestep, model_options):
        import comfy.samplers as samplers  # ComfyUI's own conditional evaluation and CFG function
        guider = executor.class_obj
        positive, negative = guider.conds.get("positive"), guider.conds.get("negative")
        out, _ = self._capture(lambda: samplers.calc_cond_batch(guider.inner_model, [positive, None], x, timestep,
                                                                model_options))
        cond = out[0]
        if torch.isfinite(cond).all():
            uncond = estimate(owners, cond.float()).to(cond.dtype)
        else:
            uncond = cond * math.nan
        denoised = samplers.cfg_function(guider.inner_model, cond, uncond, guider.cfg, x, timestep,
                                         model_options=model_options, cond=positive, uncond=negative)
        return denoised, cond, uncond

    # -- the end of the run ---------------------------------------------------------------------------------------
    def report(self, output: torch.Tensor | None) -> RunReport:
        notes = []
        if self.reason:
            notes.append(f"{self.sampler} {self.reason}; ran unchanged (full CFG)"
                         if not self.reason.startswith("cfg") else f"{self.reason}; ran unchanged")
        notes += [f"{self.settings.mode} {self.batch_note}"] if self.batch_note else []
        notes.extend(self.notes())
        adapting = self.oracle is not None
        nfe_full = self.nfe_full if adapting else self.nfe[0]
        fp = latent_fingerprint(output) if isinstance(output, torch.Tensor) and not output.is_nested else ()
        return RunReport(sampler=self.sampler, mode=self.settings.describe() if adapting or self.reason else "off",
                         steps=self.steps, batch=self.batch, stochastic=self.stochastic, flow=self.flow,
                         image_nfe=tuple(self.nfe), nfe_full=nfe_full,
                         schedules=tuple("".join(letters) for letters in self.schedules), note="; ".join(notes),
                         fingerprint=fp)


# -- ComfyUI wrappers (plain functions: all state is in the run they find in transformer_options) -------------------
def _is_cfg_guider(guider: Any) -> bool:
    import comfy.samplers as samplers
    return isinstance(guider, samplers.CFGGuider) and type(guider).predict_noise is samplers.CFGGuider.predict_noise


def _copy_options(options: dict) -> dict:
    """ComfyUI's model_options copy semantics: nested dicts copied, lists copied, other values shared."""
    return {k: _copy_options(v) if isinstance(v, dict) else v.copy() if isinstance(v, list) else v
            for k, v in options.items()}


def model_sampling(guider: Any) -> Any:
    """The model's ``model_sampling`` object, found where ComfyUI's own samplers look for it (the guider's
    ModelPatcher, so that a ModelSampling* node's patch counts)."""
    return guider.model_patcher.get_model_object("model_sampling")


def is_flow(sampling: Any) -> bool:
    """Whether ComfyUI samples the model as a flow model: its ``model_sampling`` is a ``CONST`` (SD3, Flux, Wan,
    HunyuanVideo, LTX, or any model behind a ModelSamplingSD3 / Flux / AuraFlow node), as its samplers test."""
    import comfy.model_sampling
    return isinstance(sampling, comfy.model_sampling.CONST)


def run_sigmas(sampler: str, sigmas: torch.Tensor, sampling: Any, flow: bool) -> torch.Tensor:
    """The sigmas the sampler will call the model at: on a flow model ComfyUI's half-log-SNR samplers move a first
    sigma of 1 down by its own ``offset_first_sigma_for_snr``."""
    if not flow or sampler not in HALF_LOG_SNR_SAMPLERS:
        return sigmas
    import comfy.k_diffusion.sampling as k_sampling
    offset = getattr(k_sampling, "offset_first_sigma_for_snr", None)  # absent in ComfyUI before half-log-SNR steps
    return sigmas if offset is None else offset(sigmas, sampling)


def begin_run(settings: ComfySettings, guider: Any, sampler: Any, sigmas: torch.Tensor, batch: int) -> AdaptiveRun:
    name, stochastic, reason = classify_sampler(sampler)
    if reason is None and not _is_cfg_guider(guider):
        reason = f"runs under {type(guider).__name__}, not ComfyUI's CFGGuider"
        name = f"{name} ({type(guider).__name__})"
    cfg = float(getattr(guider, "cfg", 1.0))
    options = getattr(guider, "model_options", None) or {}
    cfg1 = math.isclose(cfg, 1.0) and not options.get("disable_cfg1_optimization", False)
    flow = False
    if reason is None:
        sampling = model_sampling(guider)
        flow = is_flow(sampling)
        sigmas = run_sigmas(name, sigmas, sampling, flow)
    run = AdaptiveRun(settings, name, sigmas, batch, cfg, stochastic, reason, cfg1, flow)
    run.batch_note = run.split_images(per_image_blocker(*(getattr(guider, "conds", None) or {}).values()))
    if run.reason and settings.mode != "off":
        log.info("Adaptive Sampling: %s %s; running it unchanged", name, run.reason)
    return run


def outer_sample_wrapper(executor: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    """OUTER_SAMPLE: one fresh run per sampling call, reported when it ends."""
    guider = executor.class_obj
    patch: AdaptivePatch | None = guider.model_options.get("transformer_options", {}).get(KEY)
    if patch is None:
        return executor(*args, **kwargs)
    names = ("noise", "latent_image", "sampler", "sigmas")
    noise, _, sampler, sigmas = (args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names))
    run = begin_run(patch.settings, guider, sampler, sigmas, noise.shape[0])
    original = guider.model_options
    guider.model_options = _copy_options(original)
    guider.model_options.setdefault("transformer_options", {})[RUN_KEY] = run
    try:
        output = executor(*args, **kwargs)
    finally:
        guider.model_options = original
    report = run.report(output)
    patch.reports.append(report)
    log.info("%s", report.line())
    return output


def predict_noise_wrapper(executor: Any, x: torch.Tensor, timestep: torch.Tensor, model_options: dict | None = None,
                          seed: Any = None) -> torch.Tensor:
    """PREDICT_NOISE: the oracle's decision for this call (pass-through outside an adaptive run)."""
    model_options = {} if model_options is None else model_options
    run: AdaptiveRun | None = model_options.get("transformer_options", {}).get(RUN_KEY)
    if run is None:
        return executor(x, timestep, model_options, seed)
    return run.predict(executor, x, timestep, model_options, seed)


def calc_cond_batch_wrapper(executor: Any, model: Any, conds: list, x_in: torch.Tensor, timestep: torch.Tensor,
                            model_options: dict) -> list[torch.Tensor]:
    """CALC_COND_BATCH: observe the conditional / unconditional predictions of a computed step (unchanged)."""
    out = executor(model, conds, x_in, timestep, model_options)
    run: AdaptiveRun | None = model_options.get("transformer_options", {}).get(RUN_KEY)
    if run is not None and run.capturing:
        run.captured = [o if c is not None else None for o, c in zip(out, conds)] if len(out) == len(conds) else None
    return out


WRAPPERS = (("outer_sample", outer_sample_wrapper), ("predict_noise", predict_noise_wrapper),
            ("calc_cond_batch", calc_cond_batch_wrapper))


def apply_patch(model: Any, settings: ComfySettings) -> Any:
    """A clone of ComfyUI's ``ModelPatcher`` with the adaptive wrappers (replacing those of an earlier node)."""
    patched = model.clone()
    for kind, wrapper in WRAPPERS:
        patched.remove_wrappers_with_key(kind, KEY)
        patched.add_wrapper_with_key(kind, KEY, wrapper)
    patched.model_options.setdefault("transformer_options", {})[KEY] = AdaptivePatch(settings)
    return patched


# -- samplers in the KSampler list ----------------------------------------------------------------------------------
def make_adaptive_sampler(base: str, k_sampling: Any) -> Callable[..., torch.Tensor]:
    """``sample_<base>_adaptive``: ComfyUI's own ``sample_<base>`` loop under the recommended oracle (or under the
    settings of an "Adaptive Sampling" node on the model, whose wrappers then run it)."""
    base_name = f"sample_{base}"

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **kwargs):
        base_fn = getattr(k_sampling, base_name)
        extra_args = {} if extra_args is None else extra_args
        options = extra_args.get("model_options", {})
        if RUN_KEY in options.get("transformer_options", {}):  # an Adaptive Sampling node is already running it
            return base_fn(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **kwargs)
        guider = getattr(model, "inner_model", None)
        sampler = SimpleNamespace(sampler_function=sample, extra_options=kwargs)
        run = begin_run(ComfySettings(), guider, sampler, sigmas, x.shape[0])
        if run.reason:  # not ComfyUI's CFGGuider: the plain loop (begin_run logged why)
            return base_fn(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **kwargs)
        options = _copy_options(options)
        transformer = options.setdefault("transformer_options", {})
        transformer[RUN_KEY] = run
        transformer.setdefault("wrappers", {}).setdefault("calc_cond_batch", {})[KEY] = [calc_cond_batch_wrapper]
        original = guider.model_options
        guider.model_options = _copy_options(original)
        guider.model_options.setdefault("transformer_options", {}).setdefault("wrappers", {}).setdefault(
            "predict_noise", {})[KEY] = [predict_noise_wrapper]
        try:
            out = base_fn(model, x, sigmas, extra_args=dict(extra_args, model_options=options), callback=callback,
                          disable=disable, **kwargs)
        finally:
            guider.model_options = original
        log.info("%s", run.report(None).line())
        return out

    sample.__name__ = sample.__qualname__ = f"sample_{base}_adaptive"
    sample.adaptive_base = base_name
    return sample


def register_samplers(comfy_samplers: Any = None, k_sampling: Any = None) -> list[str]:
    """Add ``<base>_adaptive`` to ComfyUI's sampler list (KSampler, KSamplerSelect) and ``sample_<name>`` to its
    k-diffusion module; idempotent (a reload replaces the functions and never duplicates names)."""
    if comfy_samplers is None:
        import comfy.samplers as comfy_samplers
    if k_sampling is None:
        import comfy.k_diffusion.sampling as k_sampling
    names = []
    for base in ADAPTIVE_SAMPLERS:
        if not hasattr(k_sampling, f"sample_{base}"):
            continue
        name = f"{base}_adaptive"
        setattr(k_sampling, f"sample_{name}", make_adaptive_sampler(base, k_sampling))
        if name not in comfy_samplers.KSampler.SAMPLERS:
            comfy_samplers.KSampler.SAMPLERS.append(name)
        names.append(name)
    return names


# -- nodes ----------------------------------------------------------------------------------------------------------
class AdaptiveSamplingNode:
    """MODEL in, MODEL out: every k-diffusion sampler that calls the model once per step runs under an oracle."""

    DESCRIPTION = ("Fewer network evaluations per image with (almost) the same picture: per step, full CFG, "
                   "conditional only, estimated unconditional, or no model call (a forecast). Works with KSampler "
                   "and SamplerCustom(Advanced); other samplers run unchanged (logged).")
    CATEGORY = "sampling/adaptive"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's name)
        d = _DEFAULTS
        return {"required": {
            "model": ("MODEL",),
            "mode": (list(MODES), {"default": d["mode"],
                                   "tooltip": "forecast = recommended; off = unchanged. AG and AdaptiveDiffusion "
                                              "decide per image (an image gives the same picture alone or in a "
                                              "batch), per batch when a ControlNet is applied"}),
            "budget": ("FLOAT", {"default": d["budget"], "min": 0.0, "max": 1.0, "step": 0.01,
                                 "tooltip": "forecast, for experts: fraction of full CFG's network evaluations to "
                                            "spend instead of the level's; 0 = set by the level"}),
            "ag_threshold": ("FLOAT", {"default": d["ag_threshold"], "min": -1.0, "max": 1.0, "step": 0.001,
                                       "tooltip": "AG modes: switch to conditional-only when cos(cond, uncond) "
                                                  "reaches this (1 disables)"}),
            "ag_space": (list(O.PREDICTION_SPACES), {"default": d["ag_space"]}),
            "ad_threshold": ("FLOAT", {"default": d["ad_threshold"], "min": 0.0, "max": 10.0, "step": 0.001,
                                       "tooltip": "AdaptiveDiffusion modes: skip threshold (0 disables)"}),
            "ad_max_skips": ("INT", {"default": d["ad_max_skips"], "min": 1, "max": 1000}),
            "ad_warmup": ("INT", {"default": d["ad_warmup"], "min": 4, "max": 10000}),
            "min_steps": ("INT", {"default": O.SHORT_PASS_MIN_STEPS, "min": 1, "max": 10000,
                                  "tooltip": "adapt only runs of at least this many steps; shorter ones (img2img, "
                                             "hires and detailer passes) run unchanged; 1 adapts every run"}),
        }, "optional": {  # optional: prompts saved before the knob existed keep working
            "level": (list(O.LEVELS), {"default": d["level"],
                                       "tooltip": "forecast: quality / balanced / fast - the share of network "
                                                  "evaluations kept (on deterministic samplers 50% / 40% / 30%; "
                                                  "stochastic samplers keep more)"}),
        }}

    def patch(self, model, **widgets):
        try:
            settings = ComfySettings(**widgets)
        except ValueError as e:
            raise ValueError(f"Adaptive Sampling: {e}") from None
        return (apply_patch(model, settings),)


class AdaptiveSamplingReport:
    """The report of the run that produced a latent: NFE used / full CFG's and the decision per step."""

    CATEGORY = "sampling/adaptive"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    FUNCTION = "report"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {"model": ("MODEL",), "latent": ("LATENT",)}}

    def report(self, model, latent):
        patch = model.model_options.get("transformer_options", {}).get(KEY)
        if not isinstance(patch, AdaptivePatch):
            raise ValueError("Adaptive Sampling Report: model has no Adaptive Sampling node before it")
        found = patch.find(latent["samples"])
        if found is None:
            raise ValueError("Adaptive Sampling Report: latent was not produced by a sampler using this model "
                             "(connect the sampler's LATENT output and the model it sampled with)")
        text = found.line()
        return {"ui": {"text": [text]}, "result": (text,)}


NODE_CLASS_MAPPINGS = {"AdaptiveSampling": AdaptiveSamplingNode, "AdaptiveSamplingReport": AdaptiveSamplingReport}
NODE_DISPLAY_NAME_MAPPINGS = {"AdaptiveSampling": "Adaptive Sampling",
                              "AdaptiveSamplingReport": "Adaptive Sampling Report"}
