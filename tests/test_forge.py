"""The Forge host's mechanics without Forge: a stand-in with the call structure of Forge Neo's backend
(``backend/sampling/sampling_function.py``: conditioning modifiers, ``calc_cond_uncond_batch`` with the
model-function wrapper, the cfg-1 optimization, ``sampler_cfg_function``, post-CFG functions; the unet patcher's
deep-copying ``clone``), real k-diffusion loops and the real embedded model. The real Forge Neo is exercised by
tests/forge/."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import k_diffusion.sampling as K
import pytest
import torch

from adaptive_sampler import embedded, oracles as O, sampling as S
from adaptive_sampler.hosts import forge as F
from adaptive_sampler.hosts import webui_common as W
from conftest import CountingModel

STEPS = 10
#: Steps the default computes on a deterministic sampler (its level's budget).
COMPUTED = int(O.LEVELS[O.DEFAULT_LEVEL][0] * STEPS + 1e-9)
SCALE = 3.0
BATCH = 4


# -- the stand-in ------------------------------------------------------------------------------------------------
class UnetPatcher:
    def __init__(self, model, options=None):
        self.model = model
        self.model_options = options if options is not None else {"transformer_options": {}}

    def clone(self):
        return UnetPatcher(self.model, copy.deepcopy(self.model_options))  # as Forge's ModelPatcher.clone

    def add_conditioning_modifier(self, modifier):
        self.model_options["conditioning_modifiers"] = self.model_options.get("conditioning_modifiers", []) + [modifier]


def calc_cond_uncond_batch(model, cond, uncond, x, timestep, options):
    """Forge's batching of one call (everything fits): entries in reverse order, rows weighted by strength."""
    entries = [(c, 0) for c in cond] + [(u, 1) for u in (uncond or [])]
    entries.reverse()
    marks = [m for _, m in entries]
    x_in = torch.cat([x] * len(entries))
    t_in = torch.cat([timestep] * len(entries))
    c = {"cond": torch.cat([e["label"] for e, _ in entries]), "transformer_options": {"cond_or_uncond": marks}}
    if "model_function_wrapper" in options:
        out = options["model_function_wrapper"](model.apply_model, {"input": x_in, "timestep": t_in, "c": c,
                                                                    "cond_or_uncond": marks})
    else:
        out = model.apply_model(x_in, t_in, **c)
    sums, counts = [torch.zeros_like(x), torch.zeros_like(x)], [torch.ones_like(x) * 1e-37] * 2
    for (entry, mark), rows in zip(entries, out.chunk(len(entries))):
        weight = entry.get("strength", 1.0)
        sums[mark] = sums[mark] + rows * weight
        counts[mark] = counts[mark] + weight
    return sums[0] / counts[0], sums[1] / counts[1]


def sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, options, seed=None):
    edit_strength = sum(item.get("strength", 1) for item in cond)
    uncond_ = None if math.isclose(cond_scale, 1.0) and not options.get("disable_cfg1_optimization", False) else uncond
    for fn in options.get("sampler_pre_cfg_function", []):
        model, cond, uncond_, x, timestep, options = fn(model, cond, uncond_, x, timestep, options)
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, options)
    if "sampler_cfg_function" in options:
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": cond_scale, "timestep": timestep,
                "input": x, "sigma": timestep, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred,
                "model": model, "model_options": options}
        result = x - options["sampler_cfg_function"](args)
    elif not math.isclose(edit_strength, 1.0):
        result = uncond_pred + (cond_pred - uncond_pred) * cond_scale * edit_strength
    else:
        result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in options.get("sampler_post_cfg_function", []):
        result = fn({"denoised": result, "cond": cond, "uncond": uncond, "cond_scale": cond_scale, "model": model,
                     "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": timestep,
                     "model_options": options, "input": x})
    return result


class Model:
    """The unet patcher's model: ``apply_model`` returns x0, as Forge's k-diffusion predictor does; its ``predictor``
    is of Forge's ``const`` kind for a flow model (``backend/modules/k_prediction.py``)."""

    def __init__(self, counting, flow=False):
        self.counting = counting
        self.predictor = SimpleNamespace(prediction_type="const" if flow else "epsilon")
        if flow:
            self.predictor.percent_to_sigma = counting.inner.percent_to_sigma

    def apply_model(self, x, t, cond, transformer_options=None):
        return self.counting(x, t, cond=cond)


class Denoiser:
    """Forge's CFGDenoiser.forward, reduced: per step the unet patcher of the moment, Forge's own cond-only steps
    (``drop``: NGMS / skip early CFG), the conditioning modifiers, then the CFG step."""

    def __init__(self, p, cond, uncond, drop=()):
        self.p, self.cond, self.uncond, self.drop = p, cond, uncond, set(drop)
        self.step = 0
        self.inner_model = SimpleNamespace(predictor=p.sd_model.forge_objects.unet.model.predictor)

    def __call__(self, x, sigma, **_):
        unet = self.p.sd_model.forge_objects.unet
        options = unet.model_options
        cond_scale = 1.0 if self.step in self.drop else self.p.cfg_scale
        model, cond, uncond, seed = unet.model, list(self.cond), self.uncond, 0
        for modifier in options.get("conditioning_modifiers", []):
            model, x, sigma, uncond, cond, cond_scale, options, seed = modifier(
                model, x, sigma, uncond, cond, cond_scale, options, seed)
        self.step += 1
        return sampling_function_inner(model, x, sigma, uncond, cond, cond_scale, options)


def labels(batch=BATCH):
    return torch.arange(batch) % embedded.NUM_CLASSES


def make_p(denoiser, function="sample_euler", name="Euler Adaptive", cfg=SCALE, eta=1.0, strengths=(1.0,),
           drop=(), batch=BATCH, s_churn=0.0, classes=None, flow=False):
    model = CountingModel(denoiser)
    p = SimpleNamespace(cfg_scale=cfg, extra_generation_params={}, sampler_name=name, s_noise=1.0, s_churn=s_churn,
                        scripts=None, script_args=(), iteration=0, model=model)
    p.sd_model = SimpleNamespace(forge_objects=SimpleNamespace(unet=UnetPatcher(Model(model, flow))))
    classes = labels(batch) if classes is None else torch.tensor(classes)
    batch = classes.shape[0]
    cond = [{"label": classes, "strength": s} for s in strengths]
    uncond = None if cfg == 1 else [{"label": torch.full((batch,), embedded.NULL_LABEL)}]
    p.sampler = SimpleNamespace(funcname=function, config=SimpleNamespace(name=name), eta=eta,
                                func=getattr(K, function), sampler_extra_args={"cond": None, "uncond": None},
                                model_wrap_cfg=Denoiser(p, cond, uncond, drop))
    return p


def schedule_of(p):
    """Karras sigmas for an SD-style model, the model's own ("simple") schedule for a flow model."""
    if p.sd_model.forge_objects.unet.model.predictor.prediction_type == "const":
        return p.model.inner.get_sigmas(STEPS)
    sigmas = p.model.sigmas
    return K.get_sigmas_karras(STEPS, float(sigmas[0]), float(sigmas[-1]))


def sample(p, seed=0, seeds=None):
    """A pass of the stand-in; ``seeds`` gives each image its own initial noise (as Forge seeds image k of a batch
    by seed + k), so an image can be sampled alone and in a batch."""
    schedule = schedule_of(p)
    batch = p.sampler.model_wrap_cfg.cond[0]["label"].shape[0]
    seeds = [seed] if seeds is None else seeds
    x = torch.cat([torch.randn((batch if len(seeds) == 1 else 1, *embedded.IMAGE_SHAPE),
                               generator=torch.Generator().manual_seed(s)) for s in seeds])
    torch.manual_seed(seed)
    return p.sampler.func(p.sampler.model_wrap_cfg, x * schedule[0], sigmas=schedule, disable=True)


def adapt(p, error=None, **settings):
    forge_pass = F.ForgePass(p, p.sampler, W.AdaptiveSettings(**{"min_steps": 1, **settings}), error, SimpleNamespace(),
                             W.report, sampling_function_inner)
    F.install(p, forge_pass)
    return forge_pass


def nfe(p, index=0):
    """The ``Adaptive NFE`` of an image's infotext (Forge calls a callable value with the image's index)."""
    value = p.extra_generation_params[W.NFE_FIELD]
    used, full = map(int, (value(index=index, p=p) if callable(value) else value).split("/"))
    return used, full


def rows_reported(p, batch=BATCH):
    """The rows the infotext says the batch evaluated (the images' NFE added up)."""
    return sum(nfe(p, k)[0] for k in range(batch))


def letters(forge_pass):
    """The run's decisions as letters: the batch's, per step (``?`` where images decided differently)."""
    return "".join("?" if d is None else d.value for d in forge_pass.run.oracle.decisions)


def psnr(a, b):
    return float(10 * torch.log10(4.0 / torch.mean((a - b) ** 2)))


# -- tests -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("function", ["sample_euler", "sample_dpmpp_2m_sde"])
@pytest.mark.parametrize("settings", [dict(mode="off"), dict(mode="ag", ag_threshold=1.0)])
def test_disabled_adaptation_is_identical_to_the_builtin_sampler(denoiser, function, settings):
    plain = make_p(denoiser, function)
    reference = sample(plain)
    p = make_p(denoiser, function)
    adapt(p, **settings)
    assert torch.equal(sample(p), reference)
    assert p.model.rows == plain.model.rows == 2 * STEPS * BATCH


@pytest.mark.parametrize("function", ["sample_euler", "sample_euler_ancestral", "sample_dpmpp_2m"])
def test_the_default_mode_is_the_librarys_loop_and_spends_its_level_budget_counted_at_the_model(denoiser, function):
    """Through Forge's hooks the default mode gives the picture our own loop gives with the same oracle (same
    seeds, same noise draws), at its level's budget (more on the stochastic Euler a) counted at the model."""
    p = make_p(denoiser, function)
    forge_pass = adapt(p)
    out = sample(p)
    used, full = nfe(p)
    deterministic, stochastic, _ = O.LEVELS[O.DEFAULT_LEVEL]
    computed = int((stochastic if function == "sample_euler_ancestral" else deterministic) * STEPS + 1e-9)
    assert full == 2 * STEPS and used == 2 * computed and p.model.rows == used * BATCH
    assert letters(forge_pass).count("S") == STEPS - computed
    reference = sample(make_p(denoiser, function))
    schedule = K.get_sigmas_karras(STEPS, float(p.model.sigmas[0]), float(p.model.sigmas[-1]))
    g = torch.Generator().manual_seed(0)
    x = torch.randn((BATCH, *embedded.IMAGE_SHAPE), generator=g) * schedule[0]
    torch.manual_seed(0)
    ours = getattr(S, function)(denoiser, x, schedule, oracle=O.recommended(), disable=True, extra_args=dict(
        cond=labels(), uncond=torch.full((BATCH,), embedded.NULL_LABEL), cond_scale=SCALE))
    assert torch.allclose(out, ours, atol=1e-4)
    print(f"{function}: NFE {used}/{full}, PSNR {psnr(out, reference):.1f} dB against full CFG")


@pytest.mark.parametrize("mode,threshold,letter", [("ag", 0.9, "C"), ("linear-ag", 0.9999, "L"),
                                                    ("adaptive-diffusion", 0.01, "F"),
                                                    ("ag+adaptive-diffusion", 0.9, "C")])
def test_every_mode_counts_rows_exactly(denoiser, mode, threshold, letter):
    p = make_p(denoiser)
    forge_pass = adapt(p, mode=mode, ag_threshold=threshold)
    assert torch.isfinite(sample(p)).all()
    used, full = nfe(p)
    assert p.model.rows == rows_reported(p) and used <= full == 2 * STEPS
    assert letter in letters(forge_pass)


def test_a_linear_step_goes_through_their_cfg_function_and_hooks_with_the_estimate(denoiser):
    """LINEAR: conditional rows only; another extension's CFG function and post-CFG hooks get the estimated
    unconditional prediction at the step's own scale."""
    seen = []

    def their_cfg(args):
        seen.append(("cfg", args["cond_scale"], float(args["uncond_denoised"].abs().sum())))
        return args["input"] - (args["uncond_denoised"]
                                + (args["cond_denoised"] - args["uncond_denoised"]) * args["cond_scale"])

    def their_post(args):
        seen.append(("post", args["cond_scale"], float(args["uncond_denoised"].abs().sum())))
        return args["denoised"]

    p = make_p(denoiser)
    p.sd_model.forge_objects.unet.model_options.update(sampler_cfg_function=their_cfg,
                                                       sampler_post_cfg_function=[their_post])
    forge_pass = adapt(p, mode="linear-ag", ag_threshold=0.9999)
    sample(p)
    linear = [i for i, d in enumerate(letters(forge_pass)) if d == "L"]
    assert linear and p.model.rows == rows_reported(p)
    for i in linear:  # FULL and LINEAR steps have an unconditional prediction, estimated or evaluated
        assert seen[2 * i][:2] == ("cfg", SCALE) and seen[2 * i][2] > 0 and seen[2 * i + 1][2] > 0


def test_cached_steps_call_no_model_and_no_other_hook(denoiser):
    calls = []
    p = make_p(denoiser)
    p.sd_model.forge_objects.unet.model_options["sampler_post_cfg_function"] = [
        lambda args: calls.append(1) or args["denoised"]]
    forge_pass = adapt(p)
    sample(p)
    assert len(calls) == letters(forge_pass).count("F") == COMPUTED
    assert p.model.calls == COMPUTED


def test_forge_dropping_the_uncond_itself_is_counted_and_identical_when_disabled(denoiser):
    """Forge's NGMS / skip early CFG set cond_scale 1 on some steps: 1 NFE there, the picture is Forge's."""
    reference = sample(make_p(denoiser, drop={3, 5}))
    p = make_p(denoiser, drop={3, 5})
    forge_pass = adapt(p, mode="ag", ag_threshold=1.0)
    assert torch.equal(sample(p), reference)
    assert nfe(p) == (2 * STEPS - 2, 2 * STEPS) and p.model.rows == (2 * STEPS - 2) * BATCH
    assert letters(forge_pass)[3] == letters(forge_pass)[5] == "C"


def test_cond_steps_evaluate_no_uncond_rows_even_when_an_extension_disabled_forges_cfg1_optimization(denoiser):
    p = make_p(denoiser)
    p.sd_model.forge_objects.unet.model_options["disable_cfg1_optimization"] = True
    forge_pass = adapt(p, mode="ag", ag_threshold=0.9)
    sample(p)
    assert "C" in letters(forge_pass) and p.model.rows == rows_reported(p) < 2 * STEPS * BATCH


def test_without_an_unconditional_pass_only_step_skipping_applies(denoiser):
    """CFG 1 (and distilled-CFG models): uncond is None. Forecast still skips steps at 1 row per step; a guidance
    mode runs unchanged and says why in the infotext."""
    p = make_p(denoiser, cfg=1)
    adapt(p)
    sample(p)
    assert nfe(p) == (COMPUTED, STEPS) and p.model.rows == COMPUTED * BATCH
    reference = sample(make_p(denoiser, cfg=1))
    p = make_p(denoiser, cfg=1)
    adapt(p, mode="ag")
    assert torch.equal(sample(p), reference)
    assert nfe(p) == (STEPS, STEPS) and "no unconditional prediction" in p.extra_generation_params[W.NOTES_FIELD]


def test_and_prompts_keep_their_weights_on_linear_steps(denoiser, monkeypatch):
    """Two sub-prompts weighted 0.6 and 0.8: Forge scales CFG by their sum. With an exact estimate of the
    unconditional prediction, LINEAR steps must then give full CFG's picture, with fewer rows."""
    null = torch.full((BATCH,), embedded.NULL_LABEL)
    monkeypatch.setattr(O.LinearAG, "estimate_uncond", lambda self, state, cond: denoiser(
        state.x, torch.full((state.x.shape[0],), state.sigma), cond=null[:state.x.shape[0]]))
    p = make_p(denoiser, strengths=(0.6, 0.8))
    forge_pass = adapt(p, mode="linear-ag", ag_threshold=1.0)
    out = sample(p)
    reference = sample(make_p(denoiser, strengths=(0.6, 0.8)))
    rows = {"F": 3, "L": 2}  # per image: two conditional rows, and the unconditional one on FULL
    assert set(letters(forge_pass)) == {"F", "L"}
    assert p.model.rows == sum(rows[d] for d in letters(forge_pass)) * BATCH
    assert torch.allclose(out, reference, atol=1e-4)


def test_an_error_fails_the_first_step_with_its_message(denoiser):
    p = make_p(denoiser)
    adapt(p, error="Adaptive sampling: max_skips must be an integer >= 1, got 0")
    with pytest.raises(ValueError, match="max_skips must be an integer >= 1"):
        sample(p)
    assert p.model.rows == 0


def test_spectrum_integrated_is_detected_from_its_script_args():
    spectrum = SimpleNamespace(title=lambda: F.SPECTRUM_TITLE, args_from=3, args_to=11)
    other = SimpleNamespace(title=lambda: "Adaptive sampling", args_from=1, args_to=3)
    p = SimpleNamespace(scripts=SimpleNamespace(alwayson_scripts=[other, spectrum]),
                        script_args=(None, True, "forecast", True, 0.25, 6))
    assert F.spectrum_enabled(p)
    p.script_args = (None, True, "forecast", False, 0.25, 6)
    assert not F.spectrum_enabled(p)
    assert not F.spectrum_enabled(SimpleNamespace(scripts=None, script_args=()))


def test_a_clone_made_after_ours_runs_the_same_pass(denoiser):
    """Forge deep-copies model options when another extension clones the patcher after us (Spectrum does): the
    modifier must still drive and report the pass the extension created."""
    p = make_p(denoiser)
    forge_pass = adapt(p)
    p.sd_model.forge_objects.unet = p.sd_model.forge_objects.unet.clone()
    sample(p)
    assert forge_pass.run is not None and nfe(p) == (2 * COMPUTED, 2 * STEPS)


def test_installing_twice_before_a_pass_wraps_the_sampler_function_once(denoiser):
    """Forge calls process_before_every_sampling twice before a hires pass; the second pass object drives it."""
    p = make_p(denoiser)
    original = p.sd_model.forge_objects.unet
    adapt(p)
    p.sd_model.forge_objects.unet = original  # Forge restores its own patcher between the two calls
    second = adapt(p)
    assert p.sampler.func.__wrapped__ is K.sample_euler
    sample(p)
    assert second.run is not None and nfe(p) == (2 * COMPUTED, 2 * STEPS)


def test_ddim_timesteps_give_the_calls_it_really_makes(denoiser):
    """Forge's timestep DDIM calls the model len(timesteps) - 1 times: that is the pass's length."""
    p = make_p(denoiser, function="sample_euler", name="DDIM Adaptive", eta=0.0)
    sigmas = K.get_sigmas_karras(STEPS, float(p.model.sigmas[0]), float(p.model.sigmas[-1]))

    def ddim(model, x, timesteps, extra_args=None, callback=None, disable=None, eta=0.0):
        return K.sample_euler(model, x, sigmas[-len(timesteps):], disable=True)

    p.sampler.funcname = ddim
    p.sampler.func = ddim
    forge_pass = adapt(p)
    x = torch.randn((BATCH, *embedded.IMAGE_SHAPE)) * sigmas[0]
    p.sampler.func(p.sampler.model_wrap_cfg, x, timesteps=torch.arange(STEPS + 1))
    assert forge_pass.run.sigmas is None and forge_pass.run.steps == STEPS
    assert nfe(p) == (2 * COMPUTED, 2 * STEPS) and p.model.calls == COMPUTED


def test_samplers_that_cannot_be_adapted(denoiser):
    """The accordion leaves multi-call samplers alone; euler with s_churn > 0 (a call at a raised sigma) runs
    unchanged and says why."""
    assert not F.is_one_call(SimpleNamespace(funcname="sample_heun"))
    assert F.is_one_call(SimpleNamespace(funcname="sample_dpmpp_2m"))
    reference = sample(make_p(denoiser))
    p = make_p(denoiser, s_churn=1.0)
    adapt(p)
    assert torch.equal(sample(p), reference)
    assert nfe(p) == (2 * STEPS, 2 * STEPS) and "s_churn > 0" in p.extra_generation_params[W.NOTES_FIELD]


def test_registration_goes_through_add_sampler_once():
    names = {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE", "DDIM"}
    added = []

    class Samplers:
        all_samplers_map = {n: None for n in names}

        @staticmethod
        def add_sampler(data):
            if data not in added:
                added.append(data)

        get_sampler_and_scheduler = SimpleNamespace(cache_clear=lambda: None)

    make = lambda name, function, base: (name, function, base)  # noqa: E731
    assert F.register_samplers(Samplers, make) == [n for n, _, _ in W.ADAPTIVE_SAMPLERS]
    F.register_samplers(Samplers, make)
    assert added == list(W.ADAPTIVE_SAMPLERS)


# -- per-image decisions ------------------------------------------------------------------------------------------
def image_decisions(forge_pass, image):
    oracle = forge_pass.run.oracle
    return oracle.images[image].decisions if oracle.images else oracle.decisions


@pytest.mark.parametrize("mode", ["ag", "linear-ag", "adaptive-diffusion", "ag+adaptive-diffusion"])
def test_an_image_gets_the_same_picture_and_decisions_alone_and_in_a_batch(denoiser, mode):
    """AG and AdaptiveDiffusion decide per image in Forge as in our loops: image k of a batch of four prompts gets
    the decisions, the picture and the infotext NFE it gets alone; the images' decision groups run through Forge's
    own CFG step, and the model evaluates exactly the rows the images' decisions need."""
    classes, seeds = [3, 8, 1, 6], [10, 11, 12, 13]
    # thresholds at which the images switch and skip at different steps
    settings = dict(mode=mode, ag_threshold=0.97, ad_threshold=0.1)
    p = make_p(denoiser, classes=classes)
    forge_pass = adapt(p, **settings)
    batch = sample(p, seeds=seeds)
    assert forge_pass.per_image and None in forge_pass.run.oracle.decisions  # some step mixed decisions
    assert p.model.rows == sum(nfe(p, k)[0] for k in range(4))
    for k in range(4):
        alone = make_p(denoiser, classes=[classes[k]])
        alone_pass = adapt(alone, **settings)
        picture = sample(alone, seeds=[seeds[k]])
        assert image_decisions(forge_pass, k) == alone_pass.run.oracle.decisions, k
        assert torch.allclose(batch[k:k + 1], picture, atol=1e-5), k
        assert nfe(p, k) == nfe(alone), k
    assert len({nfe(p, k) for k in range(4)}) > 1  # the images spent differently, each reported


def test_a_mixed_step_runs_other_extensions_hooks_once_per_image(denoiser):
    """A step whose images decided differently runs the decision groups through Forge's CFG step: another
    extension's post-CFG hook sees every computed image once, at the scale its decision gives (COND: 1)."""
    seen = []

    def their_post(args):
        seen.append((args["denoised"].shape[0], args["cond_scale"]))
        return args["denoised"]

    p = make_p(denoiser, classes=[3, 8, 1, 6])
    p.sd_model.forge_objects.unet.model_options["sampler_post_cfg_function"] = [their_post]
    forge_pass = adapt(p, mode="ag", ag_threshold=0.97)
    sample(p, seeds=[10, 11, 12, 13])
    assert sum(rows for rows, _ in seen) == 4 * STEPS
    for i, batch_decision in enumerate(forge_pass.run.oracle.decisions):
        if batch_decision is None:  # images disagree: one hook call per decision group
            scales = sorted(scale for _, scale in seen[:2])
            assert scales == [1.0, SCALE], i
            seen = seen[2:]
        else:
            assert seen[0] == (4, 1.0 if batch_decision is O.Decision.COND else SCALE), i
            seen = seen[1:]


def test_with_a_controlnet_the_batch_decides_as_one_and_says_so(denoiser):
    """A ControlNet computes its hint for the whole batch: rows cannot be split there, so AG decides per batch and
    the infotext notes it (not silently)."""
    p = make_p(denoiser, classes=[3, 8, 1, 6])
    p.sampler.model_wrap_cfg.cond = [{**c, "control": None} for c in p.sampler.model_wrap_cfg.cond]
    forge_pass = adapt(p, mode="ag", ag_threshold=0.97)
    sample(p, seeds=[10, 11, 12, 13])
    assert not forge_pass.per_image and None not in forge_pass.run.oracle.decisions
    assert "decided per batch: a ControlNet is active" in p.extra_generation_params[W.NOTES_FIELD]


# -- flow models (Flux, Chroma, Wan, Qwen-Image, Lumina, Z-Image, ...) ----------------------------------------------
@pytest.fixture(scope="module")
def flow_denoiser():
    return embedded.load_flow_denoiser(shift=3.0)


@pytest.mark.parametrize("cfg", [SCALE, 1.0])
@pytest.mark.parametrize("mode", ["forecast", "adaptive-diffusion"])
def test_a_flow_model_is_told_to_the_oracle_and_skips_as_in_our_loop(flow_denoiser, mode, cfg):
    """Forge's flow models (predictor of the ``const`` kind) run as flow runs, guided with CFG and unguided at CFG 1
    (one row per step): through Forge's hooks the skipping modes give the picture and NFE our own loop gives on the
    same flow model with the same oracle."""
    p = make_p(flow_denoiser, cfg=cfg, flow=True)
    forge_pass = adapt(p, mode=mode)
    out = sample(p)
    run = forge_pass.run.oracle.run
    assert run.flow and run.guided is (cfg != 1.0)
    schedule = schedule_of(p)
    x = torch.randn((BATCH, *embedded.IMAGE_SHAPE), generator=torch.Generator().manual_seed(0)) * schedule[0]
    torch.manual_seed(0)
    oracle = W.AdaptiveSettings(mode=mode, min_steps=1).build_oracle(STEPS)
    extra = dict(cond=labels(), uncond=None if cfg == 1 else torch.full((BATCH,), embedded.NULL_LABEL), cond_scale=cfg)
    ours = S.sample_euler(flow_denoiser, x, schedule, oracle=oracle, disable=True, extra_args=extra)
    assert torch.allclose(out, ours, atol=1e-4)
    summary = oracle.summary()  # per image when our loop split the oracle, else one image's
    used = [nfe(p, k)[0] for k in range(BATCH)]
    assert sum(used) == p.model.rows == (summary.nfe if oracle.images else summary.nfe * BATCH)
    assert nfe(p)[1] == STEPS * (2 if run.guided else 1)
    assert mode != "forecast" or sum(used) < BATCH * nfe(p)[1]


def offset_first_sigma_for_snr(sigmas, model_sampling, percent_offset=1e-4):
    """Forge Neo's (``modules_forge/packages/k_diffusion/sampling.py``)."""
    if len(sigmas) > 1 and model_sampling.prediction_type == "const" and sigmas[0] >= 1:
        sigmas = sigmas.clone()
        sigmas[0] = model_sampling.percent_to_sigma(percent_offset)
    return sigmas


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, **_):
    """Forge Neo's DPM++ 2M SDE as the host sees it on a flow model: its first model call at its module's offset
    first sigma (``model.inner_model.predictor``, as Forge's), then one call per step (Euler steps stand in for its
    half-log-SNR update, which the host does not see)."""
    sigmas = offset_first_sigma_for_snr(sigmas, model.inner_model.predictor)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **(extra_args or {}))
        x = denoised + (x - denoised) * (sigmas[i + 1] / sigmas[i])
    return x


def test_a_half_log_snr_sampler_on_a_flow_model_starts_at_its_offset_first_sigma(flow_denoiser):
    """Forge Neo's DPM++ 2M / 3M SDE and ER SDE call a flow model first at their offset first sigma (below 1): the
    run takes that call as its first step and adapts to the end (found on a real Forge Neo with a Lumina 2 model,
    where the schedule starts above 1)."""
    p = make_p(flow_denoiser, function="sample_dpmpp_2m_sde", name="DPM++ 2M SDE Adaptive", flow=True)
    p.sampler.func = sample_dpmpp_2m_sde
    forge_pass = adapt(p)
    schedule = schedule_of(p)
    assert float(schedule[0]) == 1.0
    sample(p)
    assert forge_pass.run.active and forge_pass.run.sigmas[0] < 1.0 and forge_pass.run.sigmas[1] == schedule[1]
    assert not any("adaptation stopped" in n for n in forge_pass.notes)
    used, full = nfe(p)
    assert used < full and sum(nfe(p, k)[0] for k in range(BATCH)) == p.model.rows
