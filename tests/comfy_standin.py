"""A small stand-in for the parts of ComfyUI the ComfyUI host touches, written from ComfyUI's call structure
(``comfy/samplers.py``, ``comfy/patcher_extension.py``, ``comfy/model_patcher.py``), with real k-diffusion loops.

Call chain, as in ComfyUI: ``CFGGuider.sample`` -> OUTER_SAMPLE wrappers -> ``outer_sample`` -> ``inner_sample``
(per-run ``model_options`` clone with ``transformer_options["sample_sigmas"]``) -> ``KSAMPLER.sample`` -> the
k-diffusion loop -> ``X0Model`` -> ``CFGGuider.__call__`` -> PREDICT_NOISE wrappers -> ``predict_noise`` ->
``sampling_function`` (CALC_COND_BATCH wrappers around ``calc_cond_batch``; cfg 1 skips the uncond unless
``disable_cfg1_optimization``) -> ``cfg_function`` (``sampler_cfg_function``, post-CFG functions).

``install()`` puts the stand-in modules in ``sys.modules`` as ``comfy``, ``comfy.samplers``,
``comfy.patcher_extension`` and ``comfy.k_diffusion.sampling`` (a copy of the real k-diffusion sampling module).
"""

from __future__ import annotations

import math
import sys
import types

import k_diffusion.sampling as k_sampling
import torch


# -- comfy.patcher_extension ---------------------------------------------------------------------------------------
class WrappersMP:
    OUTER_SAMPLE = "outer_sample"
    SAMPLER_SAMPLE = "sampler_sample"
    PREDICT_NOISE = "predict_noise"
    CALC_COND_BATCH = "calc_cond_batch"


def get_all_wrappers(kind, model_options):
    found = []
    for ws in model_options.get("transformer_options", {}).get("wrappers", {}).get(kind, {}).values():
        found.extend(ws)
    return found


class WrapperExecutor:
    def __init__(self, original, class_obj, wrappers, idx=0):
        self.original, self.class_obj, self.wrappers, self.idx = original, class_obj, list(wrappers), idx

    def __call__(self, *args, **kwargs):
        return WrapperExecutor(self.original, self.class_obj, self.wrappers, self.idx + 1).execute(*args, **kwargs)

    def execute(self, *args, **kwargs):
        if self.idx == len(self.wrappers):
            return self.original(*args, **kwargs)
        return self.wrappers[self.idx](self, *args, **kwargs)


def copy_nested(options):
    return {k: copy_nested(v) if isinstance(v, dict) else v.copy() if isinstance(v, list) else v
            for k, v in options.items()}


# -- comfy.model_patcher.ModelPatcher (the parts the node uses) ----------------------------------------------------
class ModelPatcher:
    def __init__(self, model):
        self.model = model
        self.model_options = {"transformer_options": {}}
        self.wrappers = {}

    def clone(self):
        c = ModelPatcher(self.model)
        c.model_options = copy_nested(self.model_options)
        c.wrappers = copy_nested(self.wrappers)
        return c

    def add_wrapper_with_key(self, kind, key, fn):
        self.wrappers.setdefault(kind, {}).setdefault(key, []).append(fn)

    def remove_wrappers_with_key(self, kind, key):
        self.wrappers.get(kind, {}).pop(key, None)


# -- comfy.samplers ------------------------------------------------------------------------------------------------
def _calc_cond_batch(model, conds, x, timestep, model_options):
    """All non-None conds in one batched call (labels for the embedded model); absent conds give zeros."""
    present = [i for i, c in enumerate(conds) if c is not None]
    out = [torch.zeros_like(x) for _ in conds]
    if present:
        n = len(present)
        pred = model(torch.cat([x] * n), torch.cat([timestep] * n), cond=torch.cat([conds[i] for i in present]))
        for i, chunk in zip(present, pred.chunk(n)):
            out[i] = chunk
    return out


def calc_cond_batch(model, conds, x, timestep, model_options):
    return WrapperExecutor(_calc_cond_batch, None, get_all_wrappers(WrappersMP.CALC_COND_BATCH, model_options)
                           ).execute(model, conds, x, timestep, model_options)


def cfg_function(model, cond_pred, uncond_pred, cond_scale, x, timestep, model_options={}, cond=None, uncond=None):
    if "sampler_cfg_function" in model_options:
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": cond_scale, "timestep": timestep,
                "input": x, "sigma": timestep, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred}
        result = x - model_options["sampler_cfg_function"](args)
    else:
        result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        result = fn({"denoised": result, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred,
                     "cond_scale": cond_scale, "sigma": timestep, "input": x})
    return result


def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None):
    if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False):
        uncond_ = None
    else:
        uncond_ = uncond
    out = calc_cond_batch(model, [cond, uncond_], x, timestep, model_options)
    return cfg_function(model, out[0], out[1], cond_scale, x, timestep, model_options=model_options, cond=cond,
                        uncond=uncond_)


class X0Model:
    """ComfyUI's KSamplerX0Inpaint without masks: what the k-diffusion loop calls."""

    def __init__(self, guider):
        self.inner_model = guider

    def __call__(self, x, sigma, model_options={}, seed=None):
        return self.inner_model(x, sigma, model_options=model_options, seed=seed)


class KSAMPLER:
    def __init__(self, sampler_function, extra_options={}):
        self.sampler_function = sampler_function
        self.extra_options = extra_options

    def sample(self, guider, sigmas, extra_args, noise):
        return self.sampler_function(X0Model(guider), noise * sigmas[0], sigmas, extra_args=extra_args,
                                     callback=None, disable=True, **self.extra_options)


class CFGGuider:
    def __init__(self, model_patcher, cfg, positive, negative):
        self.model_patcher = model_patcher
        self.model_options = model_patcher.model_options
        self.cfg = cfg
        self.conds = {"positive": positive, "negative": negative}
        self.inner_model = model_patcher.model

    def __call__(self, x, timestep, model_options={}, seed=None):
        return WrapperExecutor(self.predict_noise, self, get_all_wrappers(WrappersMP.PREDICT_NOISE, self.model_options)
                               ).execute(x, timestep, model_options, seed)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        return sampling_function(self.inner_model, x, timestep, self.conds.get("negative"), self.conds.get("positive"),
                                 self.cfg, model_options=model_options, seed=seed)

    def inner_sample(self, noise, sampler, sigmas, seed):
        extra = copy_nested(self.model_options)
        extra.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
        return sampler.sample(self, sigmas, {"model_options": extra, "seed": seed}, noise)

    def outer_sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
                     seed=None, latent_shapes=None):
        return self.inner_sample(noise, sampler, sigmas, seed).float()

    def sample(self, noise, sampler, sigmas, seed=None):
        original = self.model_options
        self.model_options = copy_nested(original)
        wrappers = self.model_options.setdefault("transformer_options", {}).setdefault("wrappers", {})
        for kind, by_key in self.model_patcher.wrappers.items():
            for key, fns in by_key.items():
                wrappers.setdefault(kind, {}).setdefault(key, []).extend(fns)
        try:
            return WrapperExecutor(self.outer_sample, self, get_all_wrappers(WrappersMP.OUTER_SAMPLE, self.model_options)
                                   ).execute(noise, torch.zeros_like(noise), sampler, sigmas, None, None, True, seed,
                                             latent_shapes=[noise.shape])
        finally:
            self.model_options = original


class KSampler:
    SAMPLERS = ["euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "lms"]


SAMPLER_NAMES = KSampler.SAMPLERS


def install():
    """Put the stand-in modules in ``sys.modules``; returns the fake ``comfy.k_diffusion.sampling`` module."""
    comfy = types.ModuleType("comfy")
    samplers = types.ModuleType("comfy.samplers")
    for name in ("calc_cond_batch", "cfg_function", "sampling_function", "CFGGuider", "KSAMPLER"):
        setattr(samplers, name, globals()[name])
    samplers.KSampler = type("KSampler", (), {"SAMPLERS": list(KSampler.SAMPLERS)})  # fresh list per install
    samplers.SAMPLER_NAMES = samplers.KSampler.SAMPLERS
    patcher_extension = types.ModuleType("comfy.patcher_extension")
    patcher_extension.WrappersMP = WrappersMP
    kd = types.ModuleType("comfy.k_diffusion")
    sampling = types.ModuleType("comfy.k_diffusion.sampling")
    sampling.__dict__.update({k: v for k, v in vars(k_sampling).items() if not k.startswith("__")})
    comfy.samplers, comfy.patcher_extension, comfy.k_diffusion, kd.sampling = samplers, patcher_extension, kd, sampling
    sys.modules.update({"comfy": comfy, "comfy.samplers": samplers, "comfy.patcher_extension": patcher_extension,
                        "comfy.k_diffusion": kd, "comfy.k_diffusion.sampling": sampling})
    return sampling


def uninstall():
    for name in ("comfy", "comfy.samplers", "comfy.patcher_extension", "comfy.k_diffusion",
                 "comfy.k_diffusion.sampling"):
        sys.modules.pop(name, None)
