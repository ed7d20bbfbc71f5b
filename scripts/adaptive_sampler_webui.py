"""AUTOMATIC1111 and Forge entry point for adaptive-sampler: registers the adaptive samplers, the "Adaptive sampling"
accordion, its settings, infotext fields and X/Y/Z axes. The UI is the same on both; the mechanics live in
``adaptive_sampler.hosts.a1111`` (A1111's CFG denoiser) and ``adaptive_sampler.hosts.forge`` (Forge's backend)."""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import gradio as gr  # noqa: E402
from modules import (script_callbacks, scripts, sd_samplers, sd_samplers_common, sd_samplers_kdiffusion,  # noqa: E402
                     sd_samplers_timesteps, sd_samplers_timesteps_impl, shared)

from adaptive_sampler.hosts import webui_common as W  # noqa: E402
from adaptive_sampler.oracles import LEVELS  # noqa: E402

SECTION = ("adaptive_sampler", "Adaptive sampling")
OPTION = {name: f"adaptive_sampler_{name}" for name in W.INFOTEXT}
DEFAULTS = W.AdaptiveSettings()
ADAPTIVE_NAMES = {name for name, _, _ in W.ADAPTIVE_SAMPLERS}
FORGE = W.is_forge(shared)

if FORGE:
    from backend.sampling.sampling_function import sampling_function_inner

    from adaptive_sampler.hosts import forge as F
else:
    from adaptive_sampler.hosts import a1111 as A
    DenoiserK = A.adaptive_denoiser_class(sd_samplers_kdiffusion.CFGDenoiserKDiffusion, "x0")
    DenoiserT = A.adaptive_denoiser_class(sd_samplers_timesteps.CFGDenoiserTimesteps, "eps")


def settings_from_opts() -> W.AdaptiveSettings:
    return W.AdaptiveSettings.from_mapping({n: getattr(shared.opts, key, getattr(DEFAULTS, n)) for n, key in OPTION.items()})


def settings_for(p) -> W.AdaptiveSettings:
    """Per-request settings (accordion / alwayson_scripts) over the Settings defaults, then X/Y/Z overrides.

    On A1111 called by the adaptive denoiser at its first step, so an error raised here fails the request (A1111
    and Forge swallow exceptions raised in script hooks, which would silently fall back to the defaults); on Forge
    the pass keeps the error and raises it at its first step."""
    error = getattr(p, "adaptive_error", None)
    if error:
        raise ValueError(error)
    settings = getattr(p, "adaptive_settings", None) or settings_from_opts()
    overrides = getattr(p, "adaptive_overrides", None)
    if overrides:
        settings = settings.with_overrides(overrides)
    p.extra_generation_params.update(settings.infotext())
    return settings


def make_sampler_data(name: str, function: str, base: str):
    """A1111: the built-in sampler with the adaptive CFG denoiser in place of its own."""
    base_data = sd_samplers.all_samplers_map[base]
    if function == "ddim":
        def constructor(model):
            sampler = sd_samplers_timesteps.CompVisSampler(A.with_schedule(sd_samplers_timesteps_impl.ddim), model)
            sampler.model_wrap_cfg = DenoiserT(sampler, settings_for, name, W.report)
            sampler.model_wrap = sampler.model_wrap_cfg.inner_model
            return sampler
    else:
        def constructor(model):
            sampler = sd_samplers_kdiffusion.KDiffusionSampler(function, model)  # by name: keeps s_churn etc.
            sampler.func = A.with_schedule(sampler.func)
            sampler.model_wrap_cfg = DenoiserK(sampler, settings_for, name, W.report)
            sampler.model_wrap = sampler.model_wrap_cfg.inner_model
            return sampler
    return sd_samplers_common.SamplerData(name, constructor, [alias(name)], dict(base_data.options))


def make_forge_sampler_data(name: str, function: str, base: str):
    """Forge: the built-in sampler itself; the script's ``process_before_every_sampling`` adapts its passes."""
    base_data = sd_samplers.all_samplers_map[base]
    if function == "ddim":
        def constructor(model):
            return sd_samplers_timesteps.CompVisSampler(sd_samplers_timesteps_impl.ddim, model)
    else:
        def constructor(model):
            return sd_samplers_kdiffusion.KDiffusionSampler(function, model)
    return sd_samplers_common.SamplerData(name, constructor, [alias(name)], dict(base_data.options))


def alias(name: str) -> str:
    return name.lower().replace("+", "p").replace(" ", "_")


if FORGE:
    F.register_samplers(sd_samplers, make_forge_sampler_data)
else:
    A.register_samplers(sd_samplers, make_sampler_data)


def on_ui_settings():
    labels = {
        "mode": ("Default mode", gr.Dropdown, {"choices": list(W.MODES)}),
        "ag_threshold": ("AG threshold (cosine of cond/uncond; >= 1 disables)", gr.Number, {}),
        "ag_space": ("AG prediction space", gr.Dropdown, {"choices": ["x0", "v", "eps"]}),
        "ad_threshold": ("AdaptiveDiffusion skip threshold (0 disables)", gr.Number, {}),
        "max_skips": ("AdaptiveDiffusion max skips in a row", gr.Number, {"precision": 0}),
        "warmup": ("AdaptiveDiffusion warm-up steps (>= 4)", gr.Number, {"precision": 0}),
        "budget": ("Forecast NFE budget (fraction of full CFG; 0 = set by the level)", gr.Number, {}),
        "min_steps": ("Adapt only passes of at least this many steps (shorter hires-fix / img2img passes run full "
                      "CFG; 1 adapts every pass)", gr.Number, {"precision": 0}),
        "level": ("Forecast level (quality / balanced / fast: the share of network calls kept)", gr.Dropdown,
                  {"choices": list(LEVELS)}),
    }
    for name, key in OPTION.items():
        label, component, args = labels[name]
        shared.opts.add_option(key, shared.OptionInfo(getattr(DEFAULTS, name), label, component, args,
                                                      section=SECTION, infotext=W.INFOTEXT[name]))


script_callbacks.on_ui_settings(on_ui_settings)


class AdaptiveSamplingScript(scripts.Script):
    """The "Adaptive sampling" accordion; its args are also the API's alwayson_scripts args, in this order:
    enable, mode, ag_threshold, ag_space, ad_threshold, max_skips, warmup, budget, min_steps, level (min_steps and
    level were appended last, so older requests with fewer args keep their meaning and get the defaults)."""

    def title(self):
        return "Adaptive sampling"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        with gr.Accordion("Adaptive sampling", open=False):
            enable = gr.Checkbox(False, label="Enable (applies to built-in Euler, Euler a, DPM++ 2M, DDIM, ...; "
                                               "the * Adaptive samplers use these values when enabled)")
            with gr.Row():
                mode = gr.Dropdown(list(W.MODES), value=DEFAULTS.mode, label="Mode")
                level = gr.Dropdown(list(LEVELS), value=DEFAULTS.level,
                                    label="Level (forecast: quality 2x, balanced 2.5x, fast 3.3x fewer calls on "
                                          "deterministic samplers)")
            if FORGE:
                gr.Markdown("Without an unconditional pass (CFG scale 1; Flux and other distilled-CFG models) only "
                            "Forecast and AdaptiveDiffusion apply: the guidance modes run unchanged and say so in "
                            "the infotext. Not together with Spectrum Integrated (one of the two).")
            with gr.Row():
                ag_threshold = gr.Number(DEFAULTS.ag_threshold, label="AG threshold")
                ag_space = gr.Dropdown(["x0", "v", "eps"], value=DEFAULTS.ag_space, label="AG space")
                budget = gr.Number(DEFAULTS.budget, label="Forecast budget (0 = set by the level)")
            with gr.Row():
                ad_threshold = gr.Number(DEFAULTS.ad_threshold, label="Skip threshold")
                max_skips = gr.Number(DEFAULTS.max_skips, label="Max skips", precision=0)
                warmup = gr.Number(DEFAULTS.warmup, label="Warm-up steps", precision=0)
                min_steps = gr.Number(DEFAULTS.min_steps, label="Min steps per pass (shorter: full CFG)", precision=0)
        controls = [enable, mode, ag_threshold, ag_space, ad_threshold, max_skips, warmup, budget, min_steps, level]
        self.infotext_fields = [(enable, lambda d: W.INFOTEXT["mode"] in d)] + [
            (c, lambda d, n=n: W.infotext_value(d, n)) for c, n in zip(controls[1:], W.INFOTEXT)]
        self.paste_field_names = [W.INFOTEXT[n] for n in W.INFOTEXT]
        return controls

    def setup(self, p, enable=False, *values):
        """Validate the per-request values; a bad one is kept and raised by the denoiser, which fails the request
        with its message (an exception here would only be logged)."""
        p.adaptive_settings = p.adaptive_error = None
        if enable:
            try:
                p.adaptive_settings = W.AdaptiveSettings.from_mapping(dict(zip(W.INFOTEXT, values)))
            except (TypeError, ValueError) as exc:
                p.adaptive_error = f"Adaptive sampling: {exc}"

    def process_before_every_sampling(self, p, *args, **kwargs):
        sampler = getattr(p, "sampler", None)
        if sampler is None:
            return
        name = sampler.config.name if sampler.config is not None else p.sampler_name
        enabled = bool(args and args[0])
        if FORGE:
            forge_before_sampling(p, sampler, name, enabled)
            return
        if not enabled or hasattr(sampler.model_wrap_cfg, "adaptive"):
            return
        if name not in A.SUPPORTED_BUILTINS and not getattr(p, "adaptive_error", None):
            print(f"[adaptive-sampler] {name} is not supported (it calls the model more than once per step); "
                  "sampling it unchanged.")
            return
        if isinstance(sampler, sd_samplers_timesteps.CompVisSampler):
            sampler.func = A.with_schedule(sampler.func)
            sampler.model_wrap_cfg = DenoiserT(sampler, settings_for, name, W.report)
        else:
            sampler.func = A.with_schedule(sampler.func)
            sampler.model_wrap_cfg = DenoiserK(sampler, settings_for, name, W.report)
        sampler.model_wrap = sampler.model_wrap_cfg.inner_model


def forge_before_sampling(p, sampler, name: str, enabled: bool) -> None:
    """Forge: adapt this pass (a * Adaptive sampler, or a built-in one with the accordion enabled) through a
    conditioning modifier on the pass's unet patcher. Errors are kept for the pass's first step, which fails the
    request with them."""
    if name not in ADAPTIVE_NAMES and not enabled:
        return
    if name not in ADAPTIVE_NAMES and not F.is_one_call(sampler) and not getattr(p, "adaptive_error", None):
        print(f"[adaptive-sampler] {name} is not supported (it calls the model more than once per step); "
              "sampling it unchanged.")
        return
    try:
        settings, error = settings_for(p), None
    except ValueError as exc:
        settings, error = None, str(exc)
    if error is None and settings.mode != "off" and F.spectrum_enabled(p):
        error = (f"Adaptive sampling: {F.SPECTRUM_TITLE} is enabled too; both skip steps and they cannot be "
                 "stacked: disable one of the two")
    F.install(p, F.ForgePass(p, sampler, settings, error, shared.opts, W.report, sampling_function_inner))


def _xyz_axes():
    """Add X/Y/Z plot axes: mode and every threshold (they override the accordion / settings per cell). Run when this
    script loads (the WebUI loads its own scripts, X/Y/Z plot among them, before extensions') and again before the
    UI is built, whichever finds the plot first: with ``--nowebui`` the API takes the plot's axes (and its default
    arguments) once, before the before-UI callbacks run."""
    xyz = next((s.module for s in scripts.scripts_data if s.script_class.__module__ == "xyz_grid.py"), None)
    if xyz is None or any(getattr(o, "label", "").startswith("[Adaptive]") for o in xyz.axis_options):
        return

    def setter(name):
        def apply(p, value, _):
            p.__dict__.setdefault("adaptive_overrides", {})[name] = value
        return apply

    xyz.axis_options.append(xyz.AxisOption("[Adaptive] Mode", str, setter("mode"), choices=lambda: list(W.MODES)))
    for name, kind in (("ag_threshold", float), ("ad_threshold", float), ("budget", float), ("max_skips", int),
                       ("warmup", int), ("min_steps", int)):
        xyz.axis_options.append(xyz.AxisOption(f"[Adaptive] {W.INFOTEXT[name][len('Adaptive '):]}", kind,
                                               setter(name)))
    xyz.axis_options.append(xyz.AxisOption("[Adaptive] AG space", str, setter("ag_space"),
                                           choices=lambda: ["x0", "v", "eps"]))
    xyz.axis_options.append(xyz.AxisOption("[Adaptive] Level", str, setter("level"), choices=lambda: list(LEVELS)))


_xyz_axes()
script_callbacks.on_before_ui(_xyz_axes)
