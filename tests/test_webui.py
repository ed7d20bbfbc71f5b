"""The A1111 glue without A1111: settings, infotext, registration, and the denoiser mechanics on a stand-in of
A1111's CFGDenoiser (same row layout, combine and step counter) driving the real embedded model."""

import math
from types import SimpleNamespace

import pytest
import torch
import k_diffusion as K

from adaptive_sampler import embedded, sampling as S
from adaptive_sampler.hosts import a1111 as W
from adaptive_sampler.oracles import Decision

from conftest import CountingModel, initial_noise


# -- settings and infotext --------------------------------------------------------------------------------------
def test_settings_round_trip_through_infotext():
    s = W.AdaptiveSettings(mode="ag+adaptive-diffusion", ag_threshold=0.995, ad_threshold=0.02, max_skips=3)
    text = s.infotext()
    assert text[W.INFOTEXT["mode"]] == "ag+adaptive-diffusion" and W.INFOTEXT["budget"] not in text
    parsed = W.AdaptiveSettings.from_infotext({k: str(v) for k, v in text.items()})
    assert parsed == s
    assert W.AdaptiveSettings.from_infotext({"Steps": "20"}) is None


def paste(params, ui):
    """The settings the accordion holds after pasting an infotext's fields over ``ui`` (A1111's and Forge's paste:
    each control takes the value its infotext field gives, cast to the control's type, or stays as it was)."""
    values = vars(ui).copy()
    for name in W.INFOTEXT:
        value = W.infotext_value(params, name)
        if value is not None:
            values[name] = type(values[name])(float(value) if isinstance(values[name], int) else value)
    return W.AdaptiveSettings.from_mapping(values)


def test_the_infotext_records_a_budget_only_when_one_was_set():
    """The default run's infotext has no ``Adaptive budget`` (the level decides what is spent; ``Adaptive NFE`` says
    what was); a budget the user set is written, and each pastes back to the settings that made the image, whatever
    the accordion held before."""
    default, expert = W.AdaptiveSettings(), W.AdaptiveSettings(budget=0.3, level="fast")
    assert W.INFOTEXT["budget"] not in default.infotext() and default.infotext()[W.INFOTEXT["level"]] == "balanced"
    assert expert.infotext()[W.INFOTEXT["budget"]] == 0.3
    for settings in (default, expert):
        fields = {k: str(v) for k, v in settings.infotext().items()}  # as A1111 parses them from the text
        for before in (default, expert, W.AdaptiveSettings(mode="ag", budget=0.7)):
            assert paste(fields, before) == settings
            assert W.AdaptiveSettings.from_infotext(fields, base=before) == settings


def test_older_infotexts_with_budget_zero_paste_back_to_the_level_deciding():
    """Images made before the budget was left out say ``Adaptive budget: 0.0``: 0 is "the level decides"."""
    older = {W.INFOTEXT["mode"]: "forecast", W.INFOTEXT["level"]: "quality", W.INFOTEXT["budget"]: "0.0",
             W.INFOTEXT["min_steps"]: "12"}
    settings = W.AdaptiveSettings(level="quality", min_steps=12)
    assert W.AdaptiveSettings.from_infotext(older) == settings == paste(older, W.AdaptiveSettings(budget=0.5))
    assert settings.build_oracle(20).budget is None
    assert W.infotext_value({W.INFOTEXT["mode"]: "ag"}, "budget") is None  # other modes leave the control alone
    assert W.infotext_value({"Steps": "20"}, "budget") is None  # not our infotext


@pytest.mark.parametrize("values,message", [
    (dict(mode="turbo"), "mode must be one of"),
    (dict(ag_threshold=float("nan")), "threshold must be a finite number"),
    (dict(ag_space="logit"), "space must be one of"),
    (dict(ad_threshold=-1), "threshold must be a finite number >= 0"),
    (dict(max_skips=0), "max_skips must be an integer >= 1"),
    (dict(warmup=2), "warmup must be an integer >= 4"),
    (dict(budget=1.5), r"budget must be a number in \(0, 1\]"),
    (dict(max_skips="many"), "max_skips must be a number"),
    (dict(colour=1), "unknown adaptive setting"),
])
def test_bad_settings_name_the_parameter(values, message):
    with pytest.raises(ValueError, match=message):
        W.AdaptiveSettings.from_mapping(values)


# -- registration -----------------------------------------------------------------------------------------------
def fake_sd_samplers():
    base = [SimpleNamespace(name=n, options={}) for n in ("DPM++ 2M", "Euler", "Euler a", "DPM++ 2M SDE", "DDIM")]
    calls = SimpleNamespace(set_samplers=0, cache_clear=0)
    lookup = SimpleNamespace(cache_clear=lambda: setattr(calls, "cache_clear", calls.cache_clear + 1))
    module = SimpleNamespace(all_samplers=list(base), all_samplers_map={s.name: s for s in base},
                             set_samplers=lambda: setattr(calls, "set_samplers", calls.set_samplers + 1),
                             get_sampler_and_scheduler=lookup)
    return module, calls


def test_registration_adds_every_sampler_once_and_replaces_on_reload():
    module, calls = fake_sd_samplers()
    make = lambda name, function, base: SimpleNamespace(name=name, function=function, base=base)  # noqa: E731
    names = W.register_samplers(module, make)
    assert names == ["Euler Adaptive", "Euler a Adaptive", "DPM++ 2M Adaptive", "DPM++ 2M SDE Adaptive", "DDIM Adaptive"]
    first = module.all_samplers_map["Euler Adaptive"]
    W.register_samplers(module, make)  # Reload UI re-imports the script
    assert [s.name for s in module.all_samplers].count("Euler Adaptive") == 1
    assert module.all_samplers_map["Euler Adaptive"] is not first
    assert calls.set_samplers == 2 and calls.cache_clear == 2


def test_sampler_names_do_not_end_in_a_scheduler_word():
    scheduler_words = {"karras", "exponential", "uniform", "simple", "normal", "ddim", "beta", "automatic",
                       "sgm uniform", "kl optimal", "align your steps", "polyexponential"}
    for name, _, _ in W.ADAPTIVE_SAMPLERS:
        assert not any(name.lower().endswith(" " + w) for w in scheduler_words), name


# -- the denoiser mechanics on a stand-in of A1111's CFGDenoiser -------------------------------------------------
Entry = SimpleNamespace


def conds(labels, switch_at=None, to=None):
    """A1111-shaped prompt schedules: one sub-prompt per image, optionally switching label at step ``switch_at``."""
    batch = []
    for label in labels:
        schedules = [Entry(end_at_step=10 ** 6, cond=torch.tensor(label))]
        if switch_at is not None:
            schedules = [Entry(end_at_step=switch_at - 1, cond=torch.tensor(label)),
                         Entry(end_at_step=10 ** 6, cond=torch.tensor(to))]
        batch.append([SimpleNamespace(schedules=schedules, weight=1.0)])
    uncond = [[Entry(end_at_step=10 ** 6, cond=torch.tensor(embedded.NULL_LABEL))] for _ in labels]
    return SimpleNamespace(batch=batch), uncond


def current(schedules, step):
    return next(e.cond for e in schedules if step <= e.end_at_step)


class StandInCFGDenoiser(torch.nn.Module):
    """A1111's CFGDenoiser row layout and arithmetic: cond rows per image, then one uncond row per image, one
    inner-model call, ``uncond + sum_j w_j * scale * (cond_j - uncond)``, ``step += 1``. Two of its variants:
    ``chunk`` rows per inner-model call ("Batch cond/uncond" off evaluates one batch-sized chunk at a time), and with
    ``s_min_uncond`` > 0 ("Negative Guidance minimum sigma") odd steps below it drop the unconditional rows, put
    each image's first conditional row in their place and combine at scale 1, as A1111 does."""

    model = None
    chunk = None

    def __init__(self, sampler):
        super().__init__()
        self.sampler, self.step, self.total_steps = sampler, 0, None
        self.p = SimpleNamespace(extra_generation_params={})

    @property
    def inner_model(self):
        return type(self).model

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        denoised_uncond = x_out[-uncond.shape[0]:]
        denoised = torch.clone(denoised_uncond)
        for i, c in enumerate(conds_list):
            for index, weight in c:
                denoised[i] += (x_out[index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        rows, conds_list = [], []
        for per_image in cond.batch:
            conds_list.append([(len(rows) + j, c.weight) for j, c in enumerate(per_image)])
            rows += [current(c.schedules, self.step) for c in per_image]
        u = torch.stack([current(per_image, self.step) for per_image in uncond])
        repeats = [len(per_image) for per_image in cond.batch]
        skip = self.step % 2 == 1 and s_min_uncond > 0 and float(sigma[0]) < s_min_uncond
        x_in = torch.cat([x[i:i + 1].expand(n, *x.shape[1:]) for i, n in enumerate(repeats)] + ([] if skip else [x]))
        sigma_in = torch.cat([sigma[i:i + 1].expand(n) for i, n in enumerate(repeats)] + ([] if skip else [sigma]))
        cond_in = torch.stack(rows) if skip else torch.cat([torch.stack(rows), u])
        size = self.chunk or x_in.shape[0]
        x_out = torch.cat([self.inner_model(x_in[a:a + size], sigma_in[a:a + size], cond=cond_in[a:a + size])
                           for a in range(0, x_in.shape[0], size)])
        if skip:
            x_out = torch.cat([x_out, x_out[[c[0][0] for c in conds_list]]])
        denoised = self.combine_denoised(x_out, conds_list, u, 1.0 if skip else cond_scale)
        self.step += 1
        return denoised


def make(settings, counting, steps):
    StandInCFGDenoiser.model = counting
    cls = W.adaptive_denoiser_class(StandInCFGDenoiser, "x0")
    denoiser = cls(sampler=None, settings_for=lambda p: settings, sampler_name="Euler Adaptive", report=W.report)
    denoiser.total_steps = steps
    return denoiser


def infotext_nfe(p, index):
    """The ``Adaptive NFE`` an image's infotext gets (A1111 calls a callable value with the image's index)."""
    value = p.extra_generation_params[W.NFE_FIELD]
    return value(index=index, p=p) if callable(value) else value


def sample(denoiser, labels, steps=20, scale=3.0, sampler=K.sampling.sample_euler, seeds=None, sigmas=None,
           **conds_kw):
    """A pass of the stand-in; ``seeds`` gives each image its own initial noise (A1111 seeds image k of a batch by
    seed + k), so an image can be sampled alone and in a batch."""
    sigmas = embedded.load_denoiser().get_sigmas(steps) if sigmas is None else sigmas
    cond, uncond = conds(labels, **conds_kw)
    x = initial_noise(len(labels), sigmas[0]) if seeds is None else \
        torch.cat([initial_noise(1, sigmas[0], seed=seed) for seed in seeds])
    torch.manual_seed(0)
    run = W.with_schedule(sampler)
    return run(denoiser, x, sigmas=sigmas, disable=True,
               extra_args=dict(cond=cond, uncond=uncond, cond_scale=scale, s_min_uncond=0.0, image_cond=None))


@pytest.mark.parametrize("sampler", [K.sampling.sample_euler, K.sampling.sample_dpmpp_2m, K.sampling.sample_euler_ancestral])
def test_disabled_adaptation_is_identical_to_the_stock_denoiser(denoiser, sampler):
    labels = [1, 7, 3]
    StandInCFGDenoiser.model = denoiser
    stock = sample(StandInCFGDenoiser(None), labels, sampler=sampler)
    for settings in (W.AdaptiveSettings(mode="off"), W.AdaptiveSettings(mode="ag", ag_threshold=1.0),
                     W.AdaptiveSettings(mode="adaptive-diffusion", ad_threshold=0.0)):
        assert torch.equal(sample(make(settings, denoiser, 20), labels, sampler=sampler), stock)


@pytest.mark.parametrize("mode", ["ag", "linear-ag", "adaptive-diffusion", "ag+adaptive-diffusion", "forecast"])
def test_each_mode_evaluates_fewer_rows_and_advances_step_every_call(denoiser, mode):
    labels = [2, 5]
    counting = CountingModel(denoiser)
    d = make(W.AdaptiveSettings(mode=mode), counting, 50)
    out = sample(d, labels, steps=50)
    per_image = d.adaptive.nfe()
    assert d.step == 50  # one advance per sampler step, also on CACHED steps
    assert counting.rows == sum(used for used, _ in per_image) < 100 * len(labels)
    assert [infotext_nfe(d.p, i) for i in range(len(labels))] == [f"{used}/100" for used, _ in per_image]
    StandInCFGDenoiser.model = denoiser
    full = sample(StandInCFGDenoiser(None), labels, steps=50)
    assert 10 * math.log10(4 / (out - full).pow(2).mean().item()) > 25  # same picture, within fidelity bounds


def image_decisions(d, image):
    oracle = d.adaptive.oracle
    return oracle.images[image].decisions if oracle.images else oracle.decisions


@pytest.mark.parametrize("mode", ["ag", "linear-ag", "adaptive-diffusion", "ag+adaptive-diffusion"])
def test_an_image_gets_the_same_picture_and_decisions_alone_and_in_a_batch(denoiser, mode):
    """AG and AdaptiveDiffusion decide per image in A1111 as in our loops: image k of a batch of four prompts gets
    the decisions, the picture and the infotext NFE it gets alone, and the batch evaluates only the rows its images'
    decisions need (steps where the images disagree included)."""
    labels, seeds = [3, 8, 1, 6], [10, 11, 12, 13]
    # thresholds at which the images switch and skip at different steps
    settings = W.AdaptiveSettings(mode=mode, ag_threshold=0.97, ad_threshold=0.03, min_steps=1)
    counting = CountingModel(denoiser)
    d = make(settings, counting, 20)
    batch = sample(d, labels, seeds=seeds)
    assert None in d.adaptive.oracle.decisions  # some step mixed decisions: the per-image path was exercised
    assert counting.rows == sum(used for used, _ in d.adaptive.nfe())
    for k in range(4):
        alone = make(settings, denoiser, 20)
        picture = sample(alone, [labels[k]], seeds=[seeds[k]])
        assert image_decisions(d, k) == alone.adaptive.oracle.decisions, k
        assert torch.allclose(batch[k:k + 1], picture, atol=1e-5), k
        assert infotext_nfe(d.p, k) == infotext_nfe(alone.p, 0), k
    assert len({infotext_nfe(d.p, k) for k in range(4)}) > 1  # the images spent differently, each reported


def test_cond_only_is_a1111s_own_cond_only_path(denoiser):
    """COND steps evaluate only the conditional rows and give exactly the conditional prediction."""
    counting = CountingModel(denoiser)
    d = make(W.AdaptiveSettings(mode="ag", ag_threshold=-1.0, min_steps=1), counting, 10)  # switches after step 0
    sample(d, [4, 9], steps=10)
    assert d.adaptive.oracle.decisions == [Decision.FULL] + [Decision.COND] * 9
    assert counting.rows == 4 + 9 * 2


def test_prompt_editing_forces_a_full_step_at_the_switch(denoiser):
    d = make(W.AdaptiveSettings(mode="ag+adaptive-diffusion", ag_threshold=0.5, ad_threshold=1.0), denoiser, 20)
    sample(d, [3, 3], steps=20, switch_at=10, to=8)
    decisions = d.adaptive.oracle.decisions
    assert decisions[10] is Decision.FULL
    assert Decision.CACHED in decisions[:10] and Decision.COND in decisions[:10]


def test_default_forecast_budget_is_automatic():
    settings = W.AdaptiveSettings()
    assert settings.budget == 0.0 and settings.build_oracle().budget is None
    assert W.AdaptiveSettings(budget=0.4).build_oracle().budget == 0.4
    with pytest.raises(ValueError, match=r"budget must be a number in \(0, 1\]"):
        W.AdaptiveSettings(budget=-0.1)


@pytest.mark.parametrize("name,eta,stochastic", [
    ("Euler a", 1.0, True), ("Euler a Adaptive", 1.0, True), ("Euler a", 0.0, False), ("DPM++ 2M SDE", 1.0, True),
    ("DPM++ 2M SDE Adaptive", 0.5, True), ("DPM++ 3M SDE", 1.0, True), ("DDIM", 0.0, False),
    ("DDIM Adaptive", 0.3, True), ("Euler", 1.0, False), ("DPM++ 2M Adaptive", 1.0, False), ("LMS", None, False),
    ("Euler a", None, False)])
def test_runs_are_marked_stochastic_when_the_sampler_adds_noise_at_its_eta(name, eta, stochastic):
    assert W.is_stochastic(name, eta) is stochastic


def test_a_flow_model_is_told_to_the_oracle():
    """A1111 1.10 runs SD3, a flow model (its denoiser's sigmas end at 1): the run is a flow run, and the default
    mode gives the picture our own loop gives on the same flow model with the same oracle."""
    flow = embedded.load_flow_denoiser(shift=3.0)
    settings = W.AdaptiveSettings(min_steps=1)
    sigmas = flow.get_sigmas(12)
    d = make(settings, flow, 12)
    out = sample(d, [3, 5], steps=12, sigmas=sigmas)
    assert d.adaptive.oracle.run.flow
    x = initial_noise(2, sigmas[0])
    torch.manual_seed(0)
    ours = S.sample_euler(flow, x, sigmas, oracle=settings.build_oracle(12), disable=True,
                          extra_args=dict(cond=torch.tensor([3, 5]), uncond=torch.full((2,), embedded.NULL_LABEL),
                                          cond_scale=3.0))
    assert torch.allclose(out, ours, atol=1e-4)
