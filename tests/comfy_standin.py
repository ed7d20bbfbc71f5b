"""A small stand-in for the parts of ComfyUI the ComfyUI host touches, written from ComfyUI's call structure
(``comfy/samplers.py``, ``comfy/patcher_extension.py``, ``comfy/model_patcher.py``), with real k-diffusion loops.

Call chain, as in ComfyUI: ``CFGGuider.sample`` -> OUTER_SAMPLE wrappers -> ``outer_sample`` -> ``inner_sample``
(per-run ``model_options`` clone with ``transformer_options["sample_sigmas"]``) -> ``KSAMPLER.sample`` -> the
k-diffusion loop -> ``X0Model`` -> ``CFGGuider.__call__`` -> PREDICT_NOISE wrappers -> ``predict_noise`` ->
``sampling_function`` (CALC_COND_BATCH wrappers around ``calc_cond_batch``; cfg 1 skips the uncond unless
``disable_cfg1_optimization``) -> ``cfg_function`` (``sampler_cfg_function``, post-CFG functions).

The guider holds its conditioning as ComfyUI does once a run has started: per prompt a list of entries whose
``model_conds`` are ``COND*`` objects (here one ``CONDRegular`` of class labels), which ``calc_cond_batch`` brings to
the batch size of the rows it evaluates with ComfyUI's ``repeat_to_batch_size`` (one row for every image repeated,
more rows than the batch cut to the first ones).

The model's ``model_sampling`` (``comfy/model_sampling.py``) scales the noise at the start of a run and the latent
at its end; a ``CONST`` one makes ComfyUI sample the model as a flow model, and the two samplers whose formulas then
change are ComfyUI's (``comfy/k_diffusion/sampling.py``): Euler a takes the rectified-flow ancestral step, DPM++ 2M
SDE steps in half-log-SNR from a first sigma offset below 1.

``install()`` puts the stand-in modules in ``sys.modules`` as ``comfy``, ``comfy.samplers``,
``comfy.patcher_extension``, ``comfy.model_sampling`` and ``comfy.k_diffusion.sampling`` (a copy of the real
k-diffusion sampling module with ComfyUI's flow variants).
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


# -- comfy.model_sampling -------------------------------------------------------------------------------------------
class EPS:
    """SD-style models: the noise is scaled by sigma at the start (as ComfyUI does below the schedule's maximum)."""

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return noise * sigma + latent_image

    def inverse_noise_scaling(self, sigma, latent):
        return latent


class CONST:
    """Flow models: ``x = sigma * noise + (1 - sigma) * latent``."""

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return sigma * noise + (1.0 - sigma) * latent_image

    def inverse_noise_scaling(self, sigma, latent):
        return latent / (1.0 - sigma)


class ModelSamplingDiscrete(EPS):
    pass


class ModelSamplingDiscreteFlow(CONST):
    """A flow model's schedule (what ModelSamplingSD3 / ModelSamplingFlux patch in): ``percent_to_sigma`` of the
    denoiser's shifted schedule."""

    def __init__(self, denoiser):
        self.denoiser = denoiser

    def percent_to_sigma(self, percent):
        return self.denoiser.percent_to_sigma(percent)


# -- comfy.model_patcher.ModelPatcher (the parts the node uses) ----------------------------------------------------
class ModelPatcher:
    def __init__(self, model, model_sampling=None):
        self.model = model
        self.model_sampling = ModelSamplingDiscrete() if model_sampling is None else model_sampling
        self.model_options = {"transformer_options": {}}
        self.wrappers = {}

    def clone(self):
        c = ModelPatcher(self.model, self.model_sampling)
        c.model_options = copy_nested(self.model_options)
        c.wrappers = copy_nested(self.wrappers)
        return c

    def get_model_object(self, name):
        if name != "model_sampling":
            raise KeyError(name)
        return self.model_sampling

    def add_wrapper_with_key(self, kind, key, fn):
        self.wrappers.setdefault(kind, {}).setdefault(key, []).append(fn)

    def remove_wrappers_with_key(self, kind, key):
        self.wrappers.get(kind, {}).pop(key, None)


# -- comfy.utils, comfy.conds ---------------------------------------------------------------------------------------
def repeat_to_batch_size(tensor, batch_size):
    if tensor.shape[0] > batch_size:
        return tensor[:batch_size]
    if tensor.shape[0] < batch_size:
        return tensor.repeat([math.ceil(batch_size / tensor.shape[0])] + [1] * (tensor.ndim - 1))[:batch_size]
    return tensor


class CONDRegular:
    def __init__(self, cond):
        self.cond = cond

    def _copy_with(self, cond):
        return self.__class__(cond)

    def process_cond(self, batch_size, **kwargs):
        return self._copy_with(repeat_to_batch_size(self.cond, batch_size))


def conditioning(labels):
    """A prompt's conditioning as the guider holds it during a run: one entry carrying the labels (one per image of
    the batch, or one for every image)."""
    return [{"model_conds": {"y": CONDRegular(labels)}}]


# -- comfy.samplers ------------------------------------------------------------------------------------------------
def _calc_cond_batch(model, conds, x, timestep, model_options):
    """All non-None conds in one batched call (labels for the embedded model); absent conds give zeros."""
    present = [i for i, c in enumerate(conds) if c is not None]
    out = [torch.zeros_like(x) for _ in conds]
    if present:
        n = len(present)
        labels = [conds[i][0]["model_conds"]["y"].process_cond(batch_size=x.shape[0]).cond for i in present]
        pred = model(torch.cat([x] * n), torch.cat([timestep] * n), cond=torch.cat(labels))
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

    def sample(self, guider, sigmas, extra_args, noise, latent_image):
        sampling = guider.model_patcher.get_model_object("model_sampling")
        x = sampling.noise_scaling(sigmas[0], noise, latent_image)
        out = self.sampler_function(X0Model(guider), x, sigmas, extra_args=extra_args, callback=None, disable=True,
                                    **self.extra_options)
        return sampling.inverse_noise_scaling(sigmas[-1], out)


class CFGGuider:
    def __init__(self, model_patcher, cfg, positive, negative):
        self.model_patcher = model_patcher
        self.model_options = model_patcher.model_options
        self.cfg = cfg
        self.conds = {"positive": conditioning(positive), "negative": conditioning(negative)}
        self.inner_model = model_patcher.model

    def __call__(self, x, timestep, model_options={}, seed=None):
        return WrapperExecutor(self.predict_noise, self, get_all_wrappers(WrappersMP.PREDICT_NOISE, self.model_options)
                               ).execute(x, timestep, model_options, seed)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        return sampling_function(self.inner_model, x, timestep, self.conds.get("negative"), self.conds.get("positive"),
                                 self.cfg, model_options=model_options, seed=seed)

    def inner_sample(self, noise, latent_image, sampler, sigmas, seed):
        extra = copy_nested(self.model_options)
        extra.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
        return sampler.sample(self, sigmas, {"model_options": extra, "seed": seed}, noise, latent_image)

    def outer_sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
                     seed=None, latent_shapes=None):
        return self.inner_sample(noise, latent_image, sampler, sigmas, seed).float()

    def sample(self, noise, sampler, sigmas, seed=None, latent_image=None):
        """``latent_image`` (default zeros): where a pass starts, e.g. a previous pass's output with no noise added."""
        latent_image = torch.zeros_like(noise) if latent_image is None else latent_image
        original = self.model_options
        self.model_options = copy_nested(original)
        wrappers = self.model_options.setdefault("transformer_options", {}).setdefault("wrappers", {})
        for kind, by_key in self.model_patcher.wrappers.items():
            for key, fns in by_key.items():
                wrappers.setdefault(kind, {}).setdefault(key, []).extend(fns)
        try:
            return WrapperExecutor(self.outer_sample, self, get_all_wrappers(WrappersMP.OUTER_SAMPLE, self.model_options)
                                   ).execute(noise, latent_image, sampler, sigmas, None, None, True, seed,
                                             latent_shapes=[noise.shape])
        finally:
            self.model_options = original


# -- comfy.k_diffusion.sampling: ComfyUI's flow variants of the two samplers whose formulas change ---------------------
def _sampling_of(model):
    return model.inner_model.model_patcher.get_model_object("model_sampling")


def offset_first_sigma_for_snr(sigmas, model_sampling, percent_offset=1e-4):
    if len(sigmas) <= 1 or not isinstance(model_sampling, CONST) or sigmas[0] < 1:
        return sigmas
    sigmas = sigmas.clone()
    sigmas[0] = model_sampling.percent_to_sigma(percent_offset)
    return sigmas


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None):
    """k-diffusion's Euler a, or on a flow model ComfyUI's ``sample_euler_ancestral_RF``."""
    if not isinstance(_sampling_of(model), CONST):
        return k_sampling.sample_euler_ancestral(model, x, sigmas, extra_args, callback, disable, eta, s_noise,
                                                 noise_sampler)
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = k_sampling.default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            downstep_ratio = 1 + (sigmas[i + 1] / sigmas[i] - 1) * eta
            sigma_down = sigmas[i + 1] * downstep_ratio
            alpha_ip1, alpha_down = 1 - sigmas[i + 1], 1 - sigma_down
            renoise_coeff = (sigmas[i + 1] ** 2 - sigma_down ** 2 * alpha_ip1 ** 2 / alpha_down ** 2) ** 0.5
            sigma_down_i_ratio = sigma_down / sigmas[i]
            x = sigma_down_i_ratio * x + (1 - sigma_down_i_ratio) * denoised
            if eta > 0:
                x = (alpha_ip1 / alpha_down) * x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * renoise_coeff
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, solver_type='midpoint'):
    """ComfyUI's DPM++ 2M SDE: half-log-SNR steps (``log((1 - sigma) / sigma)`` on a flow model, ``-log sigma``
    otherwise) from a first sigma offset below 1 on a flow model; Brownian noise spanning the schedule as given."""
    extra_args = {} if extra_args is None else extra_args
    sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
    noise_sampler = k_sampling.BrownianTreeNoiseSampler(x, sigma_min, sigma_max) if noise_sampler is None \
        else noise_sampler
    sampling = _sampling_of(model)
    flow = isinstance(sampling, CONST)
    lambda_fn = (lambda s: s.logit().neg()) if flow else (lambda s: s.log().neg())
    sigmas = offset_first_sigma_for_snr(sigmas, sampling)
    s_in = x.new_ones([x.shape[0]])
    old_denoised, h, h_last = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = lambda_fn(sigmas[i]), lambda_fn(sigmas[i + 1])
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp() if flow else 1.0
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == 'heun':
                    x = x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta > 0 and s_noise > 0:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() \
                    * s_noise
        old_denoised = denoised
        h_last = h
    return x


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
    model_sampling = types.ModuleType("comfy.model_sampling")
    for name in ("EPS", "CONST", "ModelSamplingDiscrete", "ModelSamplingDiscreteFlow"):
        setattr(model_sampling, name, globals()[name])
    kd = types.ModuleType("comfy.k_diffusion")
    sampling = types.ModuleType("comfy.k_diffusion.sampling")
    sampling.__dict__.update({k: v for k, v in vars(k_sampling).items() if not k.startswith("__")})
    for name in ("offset_first_sigma_for_snr", "sample_euler_ancestral", "sample_dpmpp_2m_sde"):
        setattr(sampling, name, globals()[name])
    comfy.samplers, comfy.patcher_extension, comfy.k_diffusion, kd.sampling = samplers, patcher_extension, kd, sampling
    comfy.model_sampling = model_sampling
    sys.modules.update({"comfy": comfy, "comfy.samplers": samplers, "comfy.patcher_extension": patcher_extension,
                        "comfy.model_sampling": model_sampling, "comfy.k_diffusion": kd,
                        "comfy.k_diffusion.sampling": sampling})
    return sampling


def uninstall():
    for name in ("comfy", "comfy.samplers", "comfy.patcher_extension", "comfy.model_sampling", "comfy.k_diffusion",
                 "comfy.k_diffusion.sampling"):
        sys.modules.pop(name, None)
