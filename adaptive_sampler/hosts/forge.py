"""Forge glue (Forge Neo; lllyasviel's Forge where the same code serves) that needs no Forge import.

Forge kept A1111's UI, scripts API and infotext (:mod:`~adaptive_sampler.hosts.webui_common` serves both) but
rewrote its CFG denoiser onto a ComfyUI-derived backend: once per sampler step, ``CFGDenoiser.forward`` calls
``backend.sampling.sampling_function``, which runs the unet patcher's conditioning modifiers, evaluates the
conditional and unconditional rows (dropping the unconditional ones itself when ``cond_scale`` is 1), combines them
with CFG (or a ``sampler_cfg_function``) and applies the post-CFG functions.

Mechanics. For every sampling pass the extension's ``process_before_every_sampling`` puts one conditioning modifier
on a clone of ``p.sd_model.forge_objects.unet`` (:func:`install`). Per step it asks the oracle and returns what
Forge is to evaluate:

* FULL: unchanged (Forge's own path, every hook);
* COND: ``cond_scale`` 1, Forge's own conditional-only path (as its "skip early CFG" / NGMS), hooks at scale 1;
* LINEAR: no unconditional conditioning, so Forge evaluates the conditional rows only; a ``sampler_cfg_function``
  (wrapping another extension's, if set) combines them with the estimated unconditional prediction at the step's
  own scale, AND-prompt weights included, and the post-CFG hooks see that estimate as the unconditional prediction;
* CACHED: no UNet call (a model-function wrapper that calls nothing, ControlNet left out); the step returns the
  oracle's x0 without the other extensions' CFG hooks, as a CACHED step does in ComfyUI.

A post-CFG function added last records what the step produced. The step bookkeeping is
:class:`~adaptive_sampler.hosts.backend.OracleRun`, shared with the ComfyUI host, and so is the per-image mechanism:
oracles that decide per image (AG, AdaptiveDiffusion) get one copy per image, as in our own loops; a step whose
images decided differently runs each decision group's rows through Forge's own CFG step (``sampling_function_inner``,
hooks included) as they would run alone, and Forge's call for the step then evaluates nothing (as a CACHED step). A flow model (Forge's predictor of the
``const`` kind) is told to the oracle (``RunInfo.flow``). Without an unconditional pass (CFG 1, a hires pass at CFG
1, distilled-CFG models such as Flux) the run is unguided (``RunInfo.guided``): the skipping modes (Forecast,
AdaptiveDiffusion) still skip steps; the guidance modes have nothing to adapt and the pass runs unchanged, with a note
in the infotext.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable

import torch

from .. import oracles as O
from ..oracles import Decision, StepState
from .backend import (GUIDANCE_MODES, HALF_LOG_SNR_SAMPLERS, ONE_CALL_SAMPLERS, OracleRun, cached, classify_function,
                      conditioning_rows, estimate, groups, per_image_blocker)
from .webui_common import ADAPTIVE_SAMPLERS, AdaptiveSettings, PassNFE, conditioning_boundaries

#: The title of Forge Neo's built-in step skipper, which must not run on top of ours.
SPECTRUM_TITLE = "Spectrum Integrated"

#: Forge's sampler functions that call the model once per step: k-diffusion's (its own copy), and its timestep DDIM
#: (noise between steps when eta > 0).
FORGE_ONE_CALL: dict[str, str | None] = {**ONE_CALL_SAMPLERS, "ddim": "eta"}

NO_UNCOND = ("no unconditional prediction (CFG scale 1, or a distilled-CFG model such as Flux): the guidance mode "
             "{mode} has nothing to adapt; ran unchanged")


def function_name(sampler: Any) -> str:
    """The sampler function a Forge sampler object runs (``sample_euler``, ``ddim``, ...)."""
    func = getattr(sampler, "funcname", None)
    return func if isinstance(func, str) else getattr(func, "__name__", type(sampler).__name__)


def is_one_call(sampler: Any) -> bool:
    """Whether the accordion can adapt this Forge sampler (one model call per step)."""
    return function_name(sampler) in FORGE_ONE_CALL


def spectrum_enabled(p: Any) -> bool:
    """Whether Forge Neo's "Spectrum Integrated" is enabled for this request (its first script argument)."""
    runner = getattr(p, "scripts", None)
    for script in getattr(runner, "alwayson_scripts", None) or []:
        if script.title() == SPECTRUM_TITLE:
            args = (getattr(p, "script_args", None) or ())[script.args_from:script.args_to]
            return bool(args and args[0])
    return False


def _no_model_call(apply_model: Callable[..., torch.Tensor], params: dict) -> torch.Tensor:
    """The model-function wrapper of a step evaluated elsewhere (CACHED, or by decision groups): no UNet call."""
    return torch.zeros_like(params["input"])


def is_flow(model: Any) -> bool:
    """Whether Forge's model is a flow-matching model: its predictor is of the ``const`` kind (Forge's own test in its
    k-diffusion copy; Flux, Chroma, Wan, Qwen-Image, Lumina, Z-Image, ...)."""
    return getattr(getattr(model, "predictor", None), "prediction_type", None) == "const"


class ForgePass:
    """One Forge sampling pass (txt2img, img2img, or a hires-fix pass) under the user's settings.

    Created by the extension before the pass and driven by Forge's calls; the oracle run starts at the first step,
    in the generating thread, when the pass's length, sigmas, model kind (flow or not) and unconditional pass are
    known. ``error`` (a bad value, Spectrum enabled too) is raised at the first step, which fails the request with its
    message (Forge only logs exceptions raised in script hooks). ``report(p, pass)`` writes the infotext's NFE and
    notes after each step. ``evaluate`` is Forge's ``sampling_function_inner``: oracles that decide per image (AG,
    AdaptiveDiffusion) split the batch, and a step whose images decided differently evaluates each decision group's
    rows through it, as the images would be evaluated alone.
    """

    def __init__(self, p: Any, sampler: Any, settings: AdaptiveSettings | None, error: str | None, opts: Any,
                 report: Callable[[Any, PassNFE], None], evaluate: Callable[..., torch.Tensor]) -> None:
        self.p = p
        self.sampler = sampler
        self.settings = settings
        self.error = error
        self.opts = opts
        self._report = report
        self._evaluate = evaluate
        self.run: OracleRun | None = None
        #: The schedule the sampler function was called with, and whether it is DDIM's timesteps (set by the wrapper
        #: :func:`install` puts on the sampler function: the calls that run, which Forge's step counts do not say for
        #: DDIM, one call per interval of its timestep grid).
        self.schedule: tuple[torch.Tensor, bool] | None = None
        self._notes: list[str] = []
        self._boundaries: frozenset[int] = frozenset()
        self._pending: tuple[list[tuple[O.Oracle, StepState]], list[Decision], bool] | None = None
        self._cached: torch.Tensor | None = None
        self._estimate: torch.Tensor | None = None
        self._groups: tuple[torch.Tensor, list, list] | None = None

    @property
    def per_image(self) -> bool:
        """Whether the pass decides per image (see :meth:`OracleRun.split_images`)."""
        return self.run is not None and self.run.per_image

    # -- what the infotext reports --------------------------------------------------------------------------------
    @property
    def notes(self) -> list[str]:
        stopped = [self.run.stopped] if self.run is not None and self.run.stopped else []
        return self._notes + stopped

    def nfe(self) -> list[tuple[int, int]]:
        """(NFE used, NFE of full CFG) of each image so far (calls after a stop count for every image)."""
        if self.run is None or self.settings is None or self.settings.mode == "off":
            return []
        return [(used, self.run.nfe_full) for used in self.run.nfe]

    # -- the conditioning modifier: once per step, before Forge evaluates anything ---------------------------------
    def modify(self, model: Any, x: torch.Tensor, timestep: torch.Tensor, uncond: Any, cond: list, cond_scale: float,
               model_options: dict, seed: Any) -> tuple:
        if self.error:
            raise ValueError(self.error)
        if self.run is None:
            self._begin(model, x, uncond, cond)
        sigma = float(timestep.reshape(-1)[0])
        i = self.run.next_step(sigma)
        if i is None:
            self.run.unchanged()
            self._report(self.p, self)
            return model, x, timestep, uncond, cond, cond_scale, model_options, seed
        owners, decisions = self.run.decide(i, sigma, x, conditioning_changed=i in self._boundaries)
        dropped = uncond is None or (math.isclose(cond_scale, 1.0)
                                     and not model_options.get("disable_cfg1_optimization", False))
        self._pending = (owners, decisions, dropped)
        if len(set(decisions)) > 1:
            self._groups = self._evaluate_groups(owners, decisions, dropped, model, x, timestep, uncond, cond,
                                                 cond_scale, model_options, seed)
            return self._no_evaluation(model, x, timestep, cond, cond_scale, model_options, seed)
        decision = decisions[0]
        options = dict(model_options)  # Forge's dict stays untouched: lists are replaced, never mutated
        post = list(options.get("sampler_post_cfg_function", []))
        if decision is Decision.COND and not dropped:
            cond_scale = 1.0
            options["disable_cfg1_optimization"] = False  # as ComfyUI's host: scale 1 evaluates no uncond rows
        elif decision is Decision.LINEAR and not dropped:
            uncond = None
            options["sampler_cfg_function"] = self._linear_cfg(owners, cond, options.get("sampler_cfg_function"))
        elif decision is Decision.CACHED:
            self._cached = cached(owners).to(x.dtype)
            return self._no_evaluation(model, x, timestep, cond, cond_scale, model_options, seed)
        options["sampler_post_cfg_function"] = post + [self._record]
        return model, x, timestep, uncond, cond, cond_scale, options, seed

    def _no_evaluation(self, model: Any, x: torch.Tensor, timestep: torch.Tensor, cond: list, cond_scale: float,
                       model_options: dict, seed: Any) -> tuple:
        """Forge's call for a step whose prediction is already known (CACHED, or evaluated by decision groups): no
        UNet call (ControlNet left out), none of the other extensions' CFG hooks; :meth:`_record` returns it."""
        options = dict(model_options)
        options["model_function_wrapper"] = _no_model_call
        for key in ("sampler_cfg_function", "sampler_pre_cfg_function"):
            options.pop(key, None)
        options["sampler_post_cfg_function"] = [self._record]
        cond = [{k: v for k, v in c.items() if k != "control"} for c in cond]
        return model, x, timestep, None, cond, cond_scale, options, seed

    def _evaluate_groups(self, owners: list, decisions: list[Decision], dropped: bool, model: Any, x: torch.Tensor,
                         timestep: torch.Tensor, uncond: Any, cond: list, cond_scale: float, model_options: dict,
                         seed: Any) -> tuple[torch.Tensor, list, list]:
        """A step whose images decided differently: each decision group's rows through Forge's own CFG step (its
        hooks included), as those images alone would go; CACHED images from their caches. Returns the denoised
        batch and each image's conditional and unconditional predictions."""
        batch = x.shape[0]
        denoised = torch.empty_like(x)
        conds: list[torch.Tensor | None] = [None] * batch
        unconds: list[torch.Tensor | None] = [None] * batch
        for decision, rows in groups(decisions):
            at = torch.tensor(rows, device=x.device)
            group = [owners[r] for r in rows]
            if decision is Decision.CACHED:
                denoised[at] = cached(group).to(x.dtype)
                continue
            sub_cond, sub_uncond = conditioning_rows(cond, at, batch), conditioning_rows(uncond, at, batch)
            options = dict(model_options)
            scale = cond_scale
            if decision is Decision.COND and not dropped:
                scale = 1.0
                options["disable_cfg1_optimization"] = False
            elif decision is Decision.LINEAR and not dropped:
                sub_uncond = None
                options["sampler_cfg_function"] = self._linear_cfg(group, sub_cond,
                                                                   options.get("sampler_cfg_function"))
            seen: dict = {}
            options["sampler_post_cfg_function"] = list(options.get("sampler_post_cfg_function", [])) + [
                lambda args: seen.update(args) or args["denoised"]]
            self._estimate = None
            denoised[at] = self._evaluate(model, x[at], timestep[at], sub_uncond, sub_cond, scale, options, seed)
            for k, r in enumerate(rows):
                conds[r] = seen["cond_denoised"][k:k + 1]
                if decision is Decision.FULL and not dropped:
                    unconds[r] = seen["uncond_denoised"][k:k + 1]
                elif decision is Decision.LINEAR and not dropped:
                    unconds[r] = self._estimate[k:k + 1]
        return denoised, conds, unconds

    def _begin(self, model: Any, x: torch.Tensor, uncond: Any, cond: list) -> None:
        sampler, p, settings = self.sampler, self.p, self.settings
        name = sampler.config.name if getattr(sampler, "config", None) is not None else p.sampler_name
        function = function_name(sampler)
        if self.schedule is None:
            raise RuntimeError(f"adaptive sampling: {name} called the model outside its sampler function")
        schedule, timesteps = self.schedule
        steps = schedule.numel() - 1
        sigmas = None if timesteps else schedule  # DDIM's timesteps: its calls are taken in order
        stochastic, reason = classify_function(
            function, eta=float(getattr(sampler, "eta", None) or 0.0),
            s_noise=float(getattr(self.opts, "s_noise", getattr(p, "s_noise", 1.0))),
            s_churn=float(getattr(self.opts, "s_churn", getattr(p, "s_churn", 0.0))), table=FORGE_ONE_CALL)
        if reason is not None:
            reason = f"{name} {reason}; ran unchanged"
        elif uncond is None and settings.mode in GUIDANCE_MODES:
            reason = NO_UNCOND.format(mode=settings.mode)
        oracle = settings.build_oracle(steps) if reason is None else None
        self.run = OracleRun(oracle, name, sigmas, x.shape[0], stochastic, rows_full=1 if uncond is None else 2,
                             steps=steps, flow=is_flow(model))
        note = settings.short_pass_note(steps) if reason is None else reason
        self._notes = ([note] if note else []) + [why for _, why in (oracle.overrides if oracle else [])]
        batch_note = self.run.split_images(per_image_blocker(cond))
        self._notes += [f"{settings.mode} {batch_note}"] if batch_note else []
        extra = getattr(sampler, "sampler_extra_args", None) or {}
        self._boundaries = conditioning_boundaries(extra.get("cond"), extra.get("uncond"))

    def _linear_cfg(self, owners: list, cond: list, theirs: Callable[[dict], torch.Tensor] | None
                    ) -> Callable[[dict], torch.Tensor]:
        """A LINEAR step's CFG: the conditional prediction with the estimated unconditional one, at the step's scale."""
        strength = sum(c.get("strength", 1) for c in cond)  # AND sub-prompt weights, as Forge's own CFG uses them

        def cfg(args: dict) -> torch.Tensor:
            x, c = args["input"], args["cond_denoised"]
            u = estimate(owners, c.float()).to(c.dtype)
            args["uncond_denoised"].copy_(u)  # the same tensor the post-CFG hooks are given: they see the estimate
            self._estimate = u
            if theirs is not None:
                return theirs({**args, "uncond": x - u, "uncond_denoised": u})
            scale = args["cond_scale"] * (1.0 if math.isclose(strength, 1.0) else strength)
            return x - (u + (c - u) * scale)

        return cfg

    # -- the last post-CFG function: what the step produced --------------------------------------------------------
    def _record(self, args: dict) -> torch.Tensor:
        owners, decisions, dropped = self._pending
        self._pending = None
        if self._groups is not None:
            denoised, conds, unconds = self._groups
        else:
            denoised = self._cached if decisions[0] is Decision.CACHED else args["denoised"]
            cond_rows = None if decisions[0] is Decision.CACHED else args["cond_denoised"]
            uncond_rows = None
            if decisions[0] is Decision.FULL and not dropped:
                uncond_rows = args["uncond_denoised"]
            elif decisions[0] is Decision.LINEAR and not dropped:
                uncond_rows = self._estimate
            conds = [None if cond_rows is None else cond_rows[r:r + 1] for r in range(denoised.shape[0])]
            unconds = [None if uncond_rows is None else uncond_rows[r:r + 1] for r in range(denoised.shape[0])]
        self._cached = self._estimate = self._groups = None
        index = owners[0][1].index
        if not torch.isfinite(denoised).all():
            raise FloatingPointError(f"adaptive sampling: the prediction at step {index} is NaN/inf "
                                     f"(decisions {''.join(d.value for d in decisions)})")
        taken = [Decision.COND if d in (Decision.FULL, Decision.LINEAR) and u is None and self.run.rows_full == 2
                 else d for d, u in zip(decisions, unconds)]  # Forge evaluated no uncond rows (NGMS): 1 NFE
        self.run.record(owners, taken, denoised, conds, unconds)
        self._report(self.p, self)
        return denoised


def first_call_sigmas(func: Callable[..., Any], model: Any, schedule: torch.Tensor, timesteps: bool) -> torch.Tensor:
    """The sigmas ``func`` calls the model at: Forge Neo's half-log-SNR samplers move a first sigma of 1 or more on a
    flow model down with their own ``offset_first_sigma_for_snr`` (taken from the function's module, so it is the
    very rule it applies; absent in Forge copies without half-log-SNR steps)."""
    offset = getattr(inspect.unwrap(func), "__globals__", {}).get("offset_first_sigma_for_snr")  # under no_grad
    predictor = getattr(getattr(model, "inner_model", None), "predictor", None)
    if timesteps or func.__name__ not in HALF_LOG_SNR_SAMPLERS or offset is None or predictor is None:
        return schedule
    return offset(schedule, predictor)


def install(p: Any, forge_pass: ForgePass) -> None:
    """Adapt the pass: a conditioning modifier on a clone of the pass's unet patcher (the clone replaces it for this
    pass only: Forge restores its own before the next), and a wrapper on the sampler function that tells the pass
    its schedule. The modifier is a plain closure, because Forge deep-copies model options when another extension
    clones the patcher after us, and a function is shared by such copies."""

    def modifier(*args: Any) -> tuple:
        return forge_pass.modify(*args)

    unet = p.sd_model.forge_objects.unet.clone()
    unet.add_conditioning_modifier(modifier)
    p.sd_model.forge_objects.unet = unet
    sampler = forge_pass.sampler
    func = getattr(sampler.func, "__wrapped__", sampler.func) if getattr(sampler.func, "adaptive", False) \
        else sampler.func  # Forge runs process_before_every_sampling twice before a hires pass: wrap once

    @functools.wraps(func)  # keeps the signature Forge inspects for optional arguments
    def run(model: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        schedule = kwargs.get("sigmas", kwargs.get("timesteps", args[0] if args else None))
        timesteps = "timesteps" in kwargs
        forge_pass.schedule = (first_call_sigmas(func, model, torch.as_tensor(schedule).reshape(-1), timesteps),
                               timesteps)
        return func(model, x, *args, **kwargs)

    run.adaptive = True
    sampler.func = run


def register_samplers(sd_samplers: Any, make_sampler_data: Callable[[str, str, str], Any]) -> list[str]:
    """Add the ``* Adaptive`` samplers through Forge's ``sd_samplers.add_sampler`` (which keeps the first entry of a
    name, so reloading never duplicates them); ``make_sampler_data(name, function, base)`` builds each entry."""
    names = []
    for name, function, base in ADAPTIVE_SAMPLERS:
        if base in sd_samplers.all_samplers_map:
            sd_samplers.add_sampler(make_sampler_data(name, function, base))
            names.append(name)
    sd_samplers.get_sampler_and_scheduler.cache_clear()
    return names
