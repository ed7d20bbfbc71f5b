"""Hardening: short runs in every mode, a shared oracle detected, inputs checked before they reach torch, and the
odd-but-legal calls hosts make (several AND sub-prompts, CFG 1 or negative, zero steps, > 150 steps, schedules that
do not end at 0, A1111 dropping the unconditional rows itself, chunked calls)."""

import copy
import math
import pickle
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import k_diffusion as K

import adaptive_sampler as A
from adaptive_sampler import embedded, oracles as O
from adaptive_sampler.engine import GuidedDenoiser
from adaptive_sampler.hosts import a1111 as W
from adaptive_sampler.oracles import Decision, RunInfo

from conftest import CountingModel, guided_args, initial_noise, plain_cfg
from test_oracles import run
from test_webui import Entry, StandInCFGDenoiser, current

#: Every registry oracle a user or host builds without a per-run plan (Schedule is an explicit plan of one length).
MODES = {
    "full": O.FullCFG, "ag": O.AdaptiveGuidance, "linear-ag": O.LinearAG, "adaptive-diffusion": O.AdaptiveDiffusion,
    "compose": O.Compose, "cfg-truncation": lambda: O.CFGTruncation(0.5), "forecast": O.Forecast,
}
HOST_MODES = [m for m in W.MODES if m != "off"]


def sigmas_for(denoiser, sampler, steps):
    return A.get_sigmas_ddim(steps, denoiser) if sampler == "ddim" else denoiser.get_sigmas(steps)


# -- short runs: every mode runs every length >= 1 and says what it could not skip ------------------------------
@pytest.mark.parametrize("sampler", sorted(A.SAMPLERS))
@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mode_runs_every_short_length(denoiser, sampler, mode):
    for steps in (1, 2, 3, 4, 5):
        oracle = MODES[mode]()
        out = run(denoiser, sampler, oracle, steps=steps, batch=2)
        summary = oracle.summary()
        length = len(sigmas_for(denoiser, sampler, steps)) - 1  # A1111's DDIM grid has 4 steps for 3
        assert torch.isfinite(out).all() and summary.steps == length
        assert summary.nfe <= summary.nfe_full == 2 * length * summary.images
        assert summary.images == (2 if oracle.decides_per_image else 1)


@pytest.mark.parametrize("factory", [O.AdaptiveDiffusion, O.Compose])
def test_a_run_within_the_warmup_computes_every_step_and_says_so(denoiser, factory):
    for steps in (1, 3, 4):
        oracle = factory()
        out = run(denoiser, "euler", oracle, steps=steps, batch=2)
        assert Decision.CACHED not in oracle.decisions and torch.isfinite(out).all()
        if factory is O.AdaptiveDiffusion:
            assert torch.equal(out, run(denoiser, "euler", O.FullCFG(), steps=steps, batch=2))
        assert (0, f"warm-up (4) covers the whole {steps}-step run: every step computed") in oracle.summary().overrides
    oracle = factory()
    run(denoiser, "euler", oracle, steps=5, batch=2)
    assert not any("warm-up" in reason for _, reason in oracle.summary().overrides)


@pytest.mark.parametrize("sampler", sorted(A.SAMPLERS))
def test_a_zero_step_run_returns_its_input_as_k_diffusion_does(denoiser, sampler):
    x = initial_noise(2, 14.6)
    for sigmas in (torch.tensor([14.6]), torch.tensor([0.0])):
        oracle = O.Forecast()
        out = A.SAMPLERS[sampler](denoiser, x, sigmas, extra_args=guided_args(2), disable=True, oracle=oracle)
        assert torch.equal(out, x)
        assert oracle.summary().steps == 0 and oracle.summary().nfe == 0
    theirs = K.sampling.sample_euler(plain_cfg(denoiser), x, torch.tensor([14.6]), extra_args=guided_args(2),
                                     disable=True)
    assert torch.equal(theirs, x)


def test_run_info_names_a_negative_step_count():
    with pytest.raises(ValueError, match="steps must be an integer >= 0, got -1"):
        RunInfo(sampler="euler", sigmas=(), batch_size=1)


# -- one oracle, two runs at once ---------------------------------------------------------------------------------
@pytest.mark.parametrize("factory", [O.AdaptiveGuidance, O.LinearAG, O.AdaptiveDiffusion, O.Compose, O.Forecast])
def test_an_oracle_shared_by_two_threads_fails_the_intruded_run_clearly_and_keeps_the_other_exact(denoiser, factory):
    """Thread A pauses after step 3; thread B resets the same oracle and runs; A's next step raises a RuntimeError
    naming the mistake (it used to die with a ZeroDivisionError deep inside Forecast), and B's run is exact."""
    shared = factory()
    a_paused, b_started = threading.Event(), threading.Event()
    outcome = {}

    def pause_a(event):
        if event["i"] == 3:
            a_paused.set()
            b_started.wait(30)

    def start_b(event):
        if event["i"] == 0:
            b_started.set()

    def thread_a():
        try:
            run(denoiser, "euler", shared, steps=12, batch=2, callback=pause_a)
        except RuntimeError as exc:
            outcome["a"] = exc

    def thread_b():
        a_paused.wait(30)
        outcome["b"] = run(denoiser, "euler", shared, steps=12, batch=2, seed=1, callback=start_b)
        outcome["b_decisions"] = list(shared.decisions)

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "used by two runs at once" in str(outcome["a"]) and "give each concurrent run" in str(outcome["a"])
    fresh = factory()
    assert torch.equal(outcome["b"], run(denoiser, "euler", fresh, steps=12, batch=2, seed=1))
    assert outcome["b_decisions"] == fresh.decisions


def test_an_interleaved_run_in_the_same_thread_is_refused(denoiser):
    oracle = O.AdaptiveDiffusion()
    sigmas = denoiser.get_sigmas(10)
    x = initial_noise(2, sigmas[0])
    first = GuidedDenoiser(denoiser, x, sigmas, guided_args(2), oracle, "euler")
    first(x, sigmas[0] * x.new_ones(2), 0)
    GuidedDenoiser(denoiser, x, sigmas, guided_args(2), oracle, "euler")  # a second run resets the oracle
    with pytest.raises(RuntimeError, match="asked to decide step 1 but its run is at step 0"):
        first(x, sigmas[1] * x.new_ones(2), 1)


def test_copies_of_an_oracle_are_independent_and_exact(denoiser):
    original = O.Compose()
    run(denoiser, "euler", original, steps=12, batch=2)
    copies = [copy.deepcopy(original), pickle.loads(pickle.dumps(original))]
    results = [None, None]

    def work(k):
        results[k] = run(denoiser, "euler", copies[k], steps=12, batch=2, seed=3)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = run(denoiser, "euler", O.Compose(), steps=12, batch=2, seed=3)
    assert torch.equal(results[0], expected) and torch.equal(results[1], expected)


# -- inputs that used to reach torch unchecked --------------------------------------------------------------------
def _nan_at_corner(x):
    x = x.clone()
    x[0, 0, 0, 0] = math.nan
    return x


BAD_INPUTS = [
    (dict(sigmas=lambda s: s.double()), TypeError, r"sigmas are float64 but x is float32.*sigmas.to\(x.dtype\)"),
    (dict(sigmas=lambda s: s.to("meta")), ValueError, r"sigmas are on meta but x is on cpu; pass sigmas.to\(x.device\)"),
    (dict(sigmas=lambda s: s[:0]), ValueError, "sigmas must be a 1-D tensor with at least 1 value"),
    (dict(x=lambda x: x[:0]), ValueError, "x must hold at least one sample, got an empty batch"),
    (dict(x=_nan_at_corner), ValueError, r"x must be finite \(found NaN or inf in the initial latent\)"),
    (dict(extra_args=lambda a: list(a.items())), TypeError, "extra_args must be a dict holding 'cond', 'uncond'"),
]


@pytest.mark.parametrize("sampler", sorted(A.SAMPLERS))
@pytest.mark.parametrize("change,error,message", BAD_INPUTS)
def test_bad_inputs_are_named_before_they_reach_torch(denoiser, sampler, change, error, message):
    values = dict(x=initial_noise(2, 14.6), sigmas=sigmas_for(denoiser, sampler, 6), extra_args=guided_args(2))
    for name, fix in change.items():
        values[name] = fix(values[name])
    with pytest.raises(error, match=message):
        A.SAMPLERS[sampler](denoiser, values["x"], values["sigmas"], extra_args=values["extra_args"], disable=True,
                            oracle=O.Forecast())


def test_cond_scale_may_be_any_real_number_type(denoiser):
    reference = run(denoiser, "euler", O.FullCFG(), steps=8, batch=2)
    sigmas = denoiser.get_sigmas(8)
    for scale in (np.float32(3.0), np.int64(3), torch.tensor(3.0)):
        torch.manual_seed(0)
        out = A.sample_euler(denoiser, initial_noise(2, sigmas[0]), sigmas, disable=True,
                             extra_args=dict(guided_args(2), cond_scale=scale))
        assert torch.equal(out, reference)


# -- odd but legal: CFG 1, 0 and negative; long runs; schedules that do not end at 0 -------------------------------
@pytest.mark.parametrize("scale", [1.0, 0.0, -1.5])
def test_unusual_guidance_scales_run_in_every_mode_and_full_cfg_stays_exact(denoiser, scale):
    sigmas = denoiser.get_sigmas(12)
    x = initial_noise(2, sigmas[0])
    theirs = K.sampling.sample_euler(plain_cfg(denoiser), x, sigmas, extra_args=guided_args(2, scale), disable=True)
    assert (A.sample_euler(denoiser, x, sigmas, extra_args=guided_args(2, scale), disable=True) - theirs).abs().max() < 1e-5
    for mode, factory in MODES.items():
        for sampler in ("euler", "dpmpp_2m"):
            assert torch.isfinite(run(denoiser, sampler, factory(), steps=12, batch=2, scale=scale)).all(), mode


def test_runs_longer_than_150_steps_work_in_every_mode(denoiser):
    for mode in ("ag", "linear-ag", "adaptive-diffusion", "compose", "forecast"):
        oracle = MODES[mode]()
        out = run(denoiser, "euler", oracle, steps=160, batch=1)
        summary = oracle.summary()
        assert torch.isfinite(out).all() and summary.steps == 160 and summary.nfe < summary.nfe_full, mode


@pytest.mark.parametrize("sampler", sorted(A.SAMPLERS))
def test_a_schedule_that_does_not_end_at_zero_works_in_every_mode(denoiser, sampler):
    sigmas = K.sampling.get_sigmas_karras(12, 0.1, 14.6)[:-1]  # ends at 0.1
    x = initial_noise(2, sigmas[0])
    for mode, factory in MODES.items():
        torch.manual_seed(0)
        out = A.SAMPLERS[sampler](denoiser, x, sigmas, extra_args=guided_args(2), disable=True, oracle=factory())
        assert torch.isfinite(out).all(), mode
    if sampler != "ddim":
        torch.manual_seed(0)
        ours = A.SAMPLERS[sampler](denoiser, x, sigmas, extra_args=guided_args(2), disable=True)
        torch.manual_seed(0)
        theirs = getattr(K.sampling, f"sample_{sampler}")(plain_cfg(denoiser), x, sigmas, extra_args=guided_args(2),
                                                         disable=True)
        assert (ours - theirs).abs().max() < 1e-5


# -- the A1111 host: stand-ins of A1111's CFGDenoiser variants ----------------------------------------------------
def host_conds(prompts):
    """A1111-shaped conditioning: per image, a list of (label, weight) AND sub-prompts."""
    batch = [[SimpleNamespace(schedules=[Entry(end_at_step=10 ** 6, cond=torch.tensor(label))], weight=weight)
              for label, weight in image] for image in prompts]
    uncond = [[Entry(end_at_step=10 ** 6, cond=torch.tensor(embedded.NULL_LABEL))] for _ in prompts]
    return SimpleNamespace(batch=batch), uncond


def host_run(model, settings, sigmas, prompts, scale=3.0, s_min_uncond=0.0, chunk=None, sampler=K.sampling.sample_euler,
             p=None):
    """One pass through the adaptive denoiser (``settings`` None: A1111's stock denoiser); returns (image, denoiser)."""
    stand_in = type("Host", (StandInCFGDenoiser,), dict(model=model, chunk=chunk))
    if settings is None:
        denoiser = stand_in(None)
    else:
        denoiser = W.adaptive_denoiser_class(stand_in, "x0")(sampler=None, settings_for=lambda p: settings,
                                                             sampler_name="Euler Adaptive", report=W.report)
    denoiser.total_steps = len(sigmas) - 1
    denoiser.p = p or denoiser.p
    cond, uncond = host_conds(prompts)
    x = initial_noise(len(prompts), sigmas[0])
    torch.manual_seed(0)
    out = W.with_schedule(sampler)(denoiser, x, sigmas=sigmas, disable=True,
                                   extra_args=dict(cond=cond, uncond=uncond, cond_scale=scale,
                                                   s_min_uncond=s_min_uncond, image_cond=None))
    return out, denoiser


ONE_EACH = [[(2, 1.0)], [(7, 1.0)]]


def image_decisions(denoiser, image):
    """The decisions an image of a host run got: its own oracle's when the run decided per image."""
    oracle = denoiser.adaptive.oracle
    return oracle.images[image].decisions if oracle.images else oracle.decisions


@pytest.mark.parametrize("mode", HOST_MODES)
def test_a_short_pass_never_fails_a_generation(denoiser, mode):
    """img2img / hires-fix passes of 1 to 4 steps: below min_steps they run full CFG and the infotext says so; with
    min_steps=1 every mode adapts them, computing what it cannot skip."""
    tail = denoiser.get_sigmas(20)
    for steps in (1, 2, 3, 4):
        sigmas = tail[-steps - 1:]
        out, d = host_run(denoiser, W.AdaptiveSettings(mode=mode), sigmas, ONE_EACH)
        params = d.p.extra_generation_params
        assert torch.isfinite(out).all() and params[W.NFE_FIELD] == f"{2 * steps}/{2 * steps}"
        assert params[W.NOTES_FIELD] == f"{steps}-step pass below min steps ({W.DEFAULT_MIN_STEPS}): full CFG"
        out, d = host_run(denoiser, W.AdaptiveSettings(mode=mode, min_steps=1), sigmas, ONE_EACH)
        assert torch.isfinite(out).all() and d.adaptive.oracle.summary().steps == steps
        if mode in ("adaptive-diffusion", "ag+adaptive-diffusion"):
            assert d.p.extra_generation_params[W.NOTES_FIELD] == \
                f"warm-up (4) covers the whole {steps}-step run: every step computed"


def test_hires_fix_sums_both_passes_and_keeps_the_short_passs_note(denoiser):
    settings = W.AdaptiveSettings(mode="forecast")
    _, first = host_run(denoiser, settings, denoiser.get_sigmas(20), ONE_EACH)
    _, second = host_run(denoiser, settings, denoiser.get_sigmas(20)[-5:], ONE_EACH, p=first.p)
    used, full = first.adaptive.nfe()[0]  # forecast decides per batch: every image spends the same
    assert first.p.extra_generation_params[W.NFE_FIELD] == f"{used + 8}/{full + 8}"
    assert first.p.extra_generation_params[W.NOTES_FIELD] == \
        f"4-step pass below min steps ({W.DEFAULT_MIN_STEPS}): full CFG"


def test_each_batch_count_iteration_reports_its_own_passes(denoiser):
    """A1111 reuses ``p`` for every batch-count iteration: NFE and notes must not carry over."""
    settings = W.AdaptiveSettings(mode="forecast")
    _, first = host_run(denoiser, settings, denoiser.get_sigmas(20)[-5:], ONE_EACH)
    assert W.NOTES_FIELD in first.p.extra_generation_params
    first.p.iteration = 1
    _, second = host_run(denoiser, settings, denoiser.get_sigmas(20), ONE_EACH, p=first.p)
    used, full = second.adaptive.nfe()[0]
    assert first.p.extra_generation_params[W.NFE_FIELD] == f"{used}/{full}" and full == 40
    assert W.NOTES_FIELD not in first.p.extra_generation_params


@pytest.mark.parametrize("prompts", [[[(1, 1.0), (7, 0.5), (3, 0.8)]], [[(2, 1.0), (5, 0.7)], [(9, 1.0)]]],
                         ids=["batch 1, three AND sub-prompts", "batch 2, two and one sub-prompts"])
def test_and_sub_prompts_in_every_mode(denoiser, prompts):
    sigmas = denoiser.get_sigmas(20)
    stock, _ = host_run(denoiser, None, sigmas, prompts)
    off, _ = host_run(denoiser, W.AdaptiveSettings(mode="off"), sigmas, prompts)
    assert torch.equal(off, stock)
    for mode in HOST_MODES:
        counting = CountingModel(denoiser)
        out, d = host_run(counting, W.AdaptiveSettings(mode=mode), sigmas, prompts)
        rows = 0
        for image, sub_prompts in enumerate(prompts):  # per image: its sub-prompts' rows, and one uncond row if FULL
            per_step = {Decision.FULL: len(sub_prompts) + 1, Decision.COND: len(sub_prompts),
                        Decision.LINEAR: len(sub_prompts), Decision.CACHED: 0}
            rows += sum(per_step[x] for x in image_decisions(d, image))
        assert counting.rows == rows, mode
        mse = (out - stock).pow(2).mean().item()
        assert mse == 0 or 10 * math.log10(4 / mse) > 20, mode


@pytest.mark.parametrize("mode", HOST_MODES)
def test_a1111_dropping_the_uncond_rows_itself_is_recorded_as_a_cond_step(denoiser, mode):
    """A1111's "Negative Guidance minimum sigma" skips the unconditional rows on odd low-noise steps: every mode
    runs (AG and LinearAG used to fail on the missing rows), such steps count 1 NFE, and with adaptation disabled
    the picture is A1111's own."""
    sigmas = denoiser.get_sigmas(20)
    stock, _ = host_run(denoiser, None, sigmas, ONE_EACH, s_min_uncond=2.0)
    disabled, d = host_run(denoiser, W.AdaptiveSettings(mode="ag", ag_threshold=1.0), sigmas, ONE_EACH, s_min_uncond=2.0)
    assert torch.equal(disabled, stock)
    low = [i for i in range(20) if i % 2 == 1 and sigmas[i] < 2.0]
    assert all(d.adaptive.oracle.decisions[i] is Decision.COND for i in low) and low
    counting = CountingModel(denoiser)
    out, d = host_run(counting, W.AdaptiveSettings(mode=mode, min_steps=1), sigmas, ONE_EACH, s_min_uncond=2.0)
    assert torch.isfinite(out).all() and counting.rows == sum(used for used, _ in d.adaptive.nfe())


@pytest.mark.parametrize("mode", HOST_MODES)
def test_chunked_calls_are_adapted_as_one_call(denoiser, mode):
    """With "Batch cond/uncond" off the rows arrive in chunks; each chunk is a slice of A1111's row layout, so the
    controller knows every row: the picture, the decisions and the rows evaluated are those of one call."""
    sigmas = denoiser.get_sigmas(12)
    settings = W.AdaptiveSettings(mode=mode, min_steps=1)
    whole, d_whole = host_run(denoiser, settings, sigmas, ONE_EACH)
    counting = CountingModel(denoiser)
    chunked, d = host_run(counting, settings, sigmas, ONE_EACH, chunk=2)
    assert torch.allclose(chunked, whole, atol=1e-5)
    assert [image_decisions(d, i) for i in range(2)] == [image_decisions(d_whole, i) for i in range(2)]
    assert counting.rows == sum(used for used, _ in d.adaptive.nfe())
    stock, _ = host_run(denoiser, None, sigmas, ONE_EACH, chunk=2)
    off, _ = host_run(denoiser, W.AdaptiveSettings(mode="off"), sigmas, ONE_EACH, chunk=2)
    assert torch.equal(off, stock)


@pytest.mark.parametrize("scale", [1.0, -2.0])
@pytest.mark.parametrize("mode", HOST_MODES)
def test_host_runs_at_cfg_1_and_negative_cfg(denoiser, mode, scale):
    out, _ = host_run(denoiser, W.AdaptiveSettings(mode=mode), denoiser.get_sigmas(20), ONE_EACH, scale=scale)
    assert torch.isfinite(out).all()


# -- the min_steps setting ----------------------------------------------------------------------------------------
def test_min_steps_is_a_validated_setting_recorded_in_the_infotext_and_appended_last():
    assert list(W.INFOTEXT)[-2:] == ["min_steps", "level"]  # the accordion / API args keep their order; new ones last
    s = W.AdaptiveSettings(mode="adaptive-diffusion", min_steps=10)
    text = s.infotext()
    assert text[W.INFOTEXT["min_steps"]] == 10
    assert W.AdaptiveSettings.from_infotext({k: str(v) for k, v in text.items()}) == s
    older = {W.INFOTEXT["mode"]: "forecast", W.INFOTEXT["budget"]: "0.5"}  # an image from before the setting
    assert W.AdaptiveSettings.from_infotext(older).min_steps == W.DEFAULT_MIN_STEPS
    assert W.INFOTEXT["min_steps"] not in W.AdaptiveSettings(mode="off").infotext()
    for bad in (0, -3, 2.5, "few"):
        with pytest.raises(ValueError, match="min_steps must be"):
            W.AdaptiveSettings.from_mapping(dict(min_steps=bad))
    assert isinstance(W.AdaptiveSettings(min_steps=8).build_oracle(7), O.FullCFG)
    assert isinstance(W.AdaptiveSettings(min_steps=8).build_oracle(8), O.Forecast)


def test_level_is_the_forecast_knob_recorded_in_the_infotext_and_appended_last():
    assert list(W.INFOTEXT)[-1] == "level"
    s = W.AdaptiveSettings(level="fast")
    text = s.infotext()
    assert text[W.INFOTEXT["level"]] == "fast"
    assert W.AdaptiveSettings.from_infotext({k: str(v) for k, v in text.items()}) == s
    older = {W.INFOTEXT["mode"]: "forecast", W.INFOTEXT["budget"]: "0.5"}  # an image from before the knob
    assert W.AdaptiveSettings.from_infotext(older).level == O.DEFAULT_LEVEL
    assert repr(s.build_oracle(20)) == repr(O.recommended("fast"))
    with pytest.raises(ValueError, match="level must be one of quality, balanced, fast, got 'max'"):
        W.AdaptiveSettings.from_mapping(dict(level="max"))
    with pytest.raises(ValueError, match="level must be one of"):
        W.AdaptiveSettings(mode="ag", level="max")  # checked whatever the mode
