"""The ComfyUI host's mechanics without ComfyUI: a stand-in with ComfyUI's call structure (tests/comfy_standin.py),
real k-diffusion loops and the real embedded model. The real ComfyUI is exercised by tests/comfyui/."""

import importlib.util
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import comfy_standin as C
from adaptive_sampler import embedded, oracles as O, sampling as S
from adaptive_sampler.flow import FlowDenoiser
from adaptive_sampler.hosts import comfyui as H
from conftest import CountingModel

REPO = Path(__file__).resolve().parent.parent
STEPS = 10
SCALE = 3.0


@pytest.fixture(autouse=True)
def standin():
    sampling = C.install()
    yield sampling
    C.uninstall()


@pytest.fixture
def model(denoiser):
    return CountingModel(denoiser)


def adapting(**widgets):
    """Settings that adapt runs of any length: the stand-in runs are shorter than the default ``min_steps``."""
    return H.ComfySettings(**{"min_steps": 1, **widgets})


def run(model, sampler="euler", settings=None, batch=1, seed=0, steps=STEPS, cfg=SCALE, extra=None, guider_cls=None,
        function=None, labels=None, sampling=None, shape=embedded.IMAGE_SHAPE, sigmas=None, noise=None,
        latent_image=None, patcher=None):
    """One sampling call through the stand-in; returns (output, patched ModelPatcher or None). ``sampling``: the
    model's ComfyUI ``model_sampling`` (default: SD-style); ``shape``: one sample's latent shape; ``patcher``: an
    already patched model (``settings`` is then not used)."""
    if patcher is None:
        patcher = C.ModelPatcher(model, sampling)
        if settings is not None:
            patcher = H.apply_patch(patcher, settings)
    labels = torch.arange(batch) % embedded.NUM_CLASSES if labels is None else labels
    guider = (guider_cls or C.CFGGuider)(patcher, cfg, labels, torch.full_like(labels, embedded.NULL_LABEL))
    if sigmas is None:
        sigmas = model.inner.get_sigmas(steps) if hasattr(model, "inner") else model.get_sigmas(steps)
    if noise is None:
        noise = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed))
    fn = function or getattr(sys.modules["comfy.k_diffusion.sampling"], f"sample_{sampler}")
    torch.manual_seed(seed + 1)  # ancestral / SDE noise
    return guider.sample(noise, C.KSAMPLER(fn, extra or {}), sigmas, seed=seed, latent_image=latent_image), patcher


def last_report(patcher):
    return patcher.model_options["transformer_options"][H.KEY].reports[-1]


def library(model, sampler, oracle, batch=1, seed=0, steps=STEPS, shape=embedded.IMAGE_SHAPE, sigmas=None, x=None,
            **kw):
    """The same run through the library's own loops (adaptive_sampler.sampling); ``x``: the initial latent (default:
    the seed's noise at the first sigma)."""
    sigmas = model.get_sigmas(steps) if sigmas is None else sigmas
    labels = torch.arange(batch) % embedded.NUM_CLASSES
    if x is None:
        x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed)) * sigmas[0]
    torch.manual_seed(seed + 1)
    args = dict(cond=labels, uncond=torch.full_like(labels, embedded.NULL_LABEL), cond_scale=SCALE)
    return getattr(S, f"sample_{sampler}")(model, x, sigmas, extra_args=args, oracle=oracle, disable=True, **kw)


# -- settings ------------------------------------------------------------------------------------------------------
def test_defaults_are_the_recommended_oracle():
    assert repr(H.ComfySettings().build_oracle()) == repr(O.recommended())
    inputs = H.AdaptiveSamplingNode.INPUT_TYPES()
    widgets = {**inputs["required"], **inputs["optional"]}
    assert {name: widgets[name][1]["default"] for name in H.WIDGETS} == \
        {name: getattr(H.ComfySettings(), name) for name in H.WIDGETS}


@pytest.mark.parametrize("widget,value", [
    ("mode", "fast"), ("level", "max"), ("level", 2), ("budget", math.nan), ("budget", -0.1), ("budget", 1.5), ("ag_threshold", math.nan),
    ("ag_threshold", "high"), ("ag_space", "latent"), ("ad_threshold", -0.1), ("ad_max_skips", 0),
    ("ad_warmup", 2), ("ad_warmup", 4.5),
])
def test_a_bad_widget_fails_with_its_name(widget, value):
    with pytest.raises(ValueError, match=rf"^Adaptive Sampling: {widget}\b"):
        H.AdaptiveSamplingNode().patch(C.ModelPatcher(None), **{widget: value})


# -- FULL is ComfyUI's own path ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "lms"])
def test_off_and_never_switching_ag_are_bit_identical_to_the_unpatched_sampler(model, sampler):
    plain, _ = run(model, sampler)
    off, _ = run(model, sampler, adapting(mode="off"))
    full, patched = run(model, sampler, adapting(mode="ag", ag_threshold=1.0))
    assert torch.equal(plain, off) and torch.equal(plain, full)
    report = last_report(patched)
    assert (report.nfe, report.nfe_full, report.schedule) == (2 * STEPS, 2 * STEPS, "F" * STEPS)


# -- decisions become the same predictions as in the library's engine ----------------------------------------------
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde"])
def test_forecast_equals_the_library_loop_and_nfe_is_counted_at_the_model(model, denoiser, sampler):
    out, patched = run(model, sampler, adapting(), batch=2)
    rows = model.rows
    report = last_report(patched)
    assert report.nfe * 2 == rows  # rows per image as the model saw them
    assert report.nfe < report.nfe_full == 2 * STEPS and "S" in report.schedule
    assert report.stochastic == (sampler in ("euler_ancestral", "dpmpp_2m_sde"))
    expected = library(denoiser, sampler, O.recommended(), batch=2)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode,oracle,letter", [
    ("ag", lambda: O.AdaptiveGuidance(0.95), "C"),
    ("linear-ag", lambda: O.LinearAG(threshold=0.95), "L"),
    ("ag+adaptive-diffusion", lambda: O.Compose(O.AdaptiveGuidance(0.95), O.AdaptiveDiffusion(0.2)), "C"),
])
def test_cond_and_linear_steps_equal_the_library_loop(model, denoiser, mode, oracle, letter):
    settings = adapting(mode=mode, ag_threshold=0.95, ad_threshold=0.2)
    out, patched = run(model, "euler", settings, steps=20)
    report = last_report(patched)
    assert letter in report.schedule and report.nfe == model.rows < report.nfe_full
    torch.testing.assert_close(out, library(denoiser, "euler", oracle(), steps=20), rtol=0, atol=1e-5)


# -- batches and runs are independent ---------------------------------------------------------------------------------
def test_a_batch_of_two_equals_two_single_runs(model):
    labels = torch.tensor([3, 7])
    both, patched = run(model, "dpmpp_2m", adapting(), batch=2, labels=labels)
    schedule = last_report(patched).schedule
    for i in range(2):
        g = torch.Generator().manual_seed(0)
        noise = torch.randn((2, *embedded.IMAGE_SHAPE), generator=g)[i:i + 1]
        patcher = H.apply_patch(C.ModelPatcher(model), adapting())
        guider = C.CFGGuider(patcher, SCALE, labels[i:i + 1], torch.full_like(labels[i:i + 1], embedded.NULL_LABEL))
        sampling = sys.modules["comfy.k_diffusion.sampling"]
        one = guider.sample(noise, C.KSAMPLER(sampling.sample_dpmpp_2m), model.inner.get_sigmas(STEPS))
        # batched convolutions on a CPU are not bit-identical to single ones (~1e-5); decisions must be identical
        torch.testing.assert_close(one[0], both[i], rtol=0, atol=1e-4)
        assert last_report(patcher).schedule == schedule


PER_IMAGE_MODES = ["ag", "linear-ag", "adaptive-diffusion", "ag+adaptive-diffusion"]
#: Four images of other prompts and seeds, and thresholds at which they switch and skip at different steps.
LABELS, SEEDS = [3, 8, 1, 6], [10, 11, 12, 13]
PER_IMAGE = dict(ag_threshold=0.97, ad_threshold=0.05)


def seeded_noise(seeds):
    """Each image's initial noise from its own seed, so that an image can be sampled alone and in a batch."""
    return torch.cat([torch.randn((1, *embedded.IMAGE_SHAPE), generator=torch.Generator().manual_seed(s))
                      for s in seeds])


@pytest.mark.parametrize("mode", PER_IMAGE_MODES)
def test_an_image_gets_the_same_picture_and_decisions_alone_and_in_a_batch(denoiser, mode):
    """AG and AdaptiveDiffusion decide per image in ComfyUI as in the library, A1111 and Forge: image k of a batch of
    four prompts gets the decisions, the NFE and the picture it gets alone, and the model evaluates exactly the rows
    the images' decisions need (steps where the images disagree evaluate each decision group apart)."""
    settings = adapting(mode=mode, **PER_IMAGE)
    counting = CountingModel(denoiser)
    batch, patched = run(counting, "euler", settings, steps=20, labels=torch.tensor(LABELS), noise=seeded_noise(SEEDS))
    report = last_report(patched)
    assert not report.alike and "decided per image" in report.line()  # some step mixed decisions
    assert counting.rows == sum(report.image_nfe) and len(set(report.image_nfe)) > 1
    for k in range(4):
        picture, alone = run(CountingModel(denoiser), "euler", settings, steps=20, labels=torch.tensor(LABELS[k:k + 1]),
                             noise=seeded_noise(SEEDS[k:k + 1]))
        single = last_report(alone)
        assert (report.schedules[k], report.image_nfe[k]) == (single.schedule, single.nfe), k
        torch.testing.assert_close(batch[k:k + 1], picture, rtol=0, atol=1e-4)  # batched convolutions: ~1e-5


def test_a_mixed_step_runs_comfyuis_hooks_once_per_image(model):
    """A step whose images decided differently evaluates each decision group through ComfyUI's own path: a post-CFG
    hook sees every image once per step, at the scale its decision gives (COND: 1)."""
    seen = []

    def their_post(args):
        seen.append((args["denoised"].shape[0], args["cond_scale"]))
        return args["denoised"]

    patcher = H.apply_patch(C.ModelPatcher(model), adapting(mode="ag", ag_threshold=PER_IMAGE["ag_threshold"]))
    patcher.model_options["sampler_post_cfg_function"] = [their_post]
    run(model, "euler", patcher=patcher, steps=20, labels=torch.tensor(LABELS), noise=seeded_noise(SEEDS))
    schedules = last_report(patcher).schedules
    assert sum(rows for rows, _ in seen) == 4 * 20
    for i in range(20):
        step = [d[i] for d in schedules]
        calls = [seen.pop(0) for _ in set(step)]  # one call per decision group
        assert sorted(calls) == sorted((step.count(d), 1.0 if d == "C" else SCALE) for d in set(step)), i
    assert any(len(set(d[i] for d in schedules)) > 1 for i in range(20))  # some step mixed decisions


class NaNWithoutUncond(torch.nn.Module):
    """The embedded denoiser, except that a call with no unconditional row (a conditional-only step) gives NaN for
    the rows of one label."""

    def __init__(self, inner, label):
        super().__init__()
        self.inner, self.label = inner, label

    def forward(self, x, sigma, cond):
        out = self.inner(x, sigma, cond=cond)
        if not (cond == embedded.NULL_LABEL).any():
            out[cond == self.label] = math.nan
        return out

    def get_sigmas(self, n):
        return self.inner.get_sigmas(n)


def test_a_non_finite_prediction_is_computed_again_for_its_image_only(denoiser):
    """An image whose conditional-only prediction is NaN is computed again with full CFG, its discarded row counted
    and noted; the other images of the batch keep the decisions and pictures they get alone."""
    broken = NaNWithoutUncond(denoiser, LABELS[1])
    settings = adapting(mode="ag", ag_threshold=PER_IMAGE["ag_threshold"])
    out, patched = run(CountingModel(broken), "euler", settings, steps=20, labels=torch.tensor(LABELS),
                       noise=seeded_noise(SEEDS))
    report = last_report(patched)
    assert torch.isfinite(out).all() and "stopped" not in report.note
    assert report.schedules[1] == "F" * 20 and report.image_nfe[1] > 2 * 20  # every COND attempt wasted a row
    assert "image 1: COND -> FULL: non-finite prediction" in report.note
    for k in (0, 2, 3):
        picture, alone = run(CountingModel(broken), "euler", settings, steps=20,
                             labels=torch.tensor(LABELS[k:k + 1]), noise=seeded_noise(SEEDS[k:k + 1]))
        assert report.schedules[k] == last_report(alone).schedule and "C" in report.schedules[k], k
        torch.testing.assert_close(out[k:k + 1], picture, rtol=0, atol=1e-4)


def test_with_a_controlnet_the_batch_decides_as_one_and_says_so(model):
    """A ControlNet computes its hint for the whole batch: its rows cannot be evaluated apart, so AG decides per
    batch there and the report says so (not silently)."""

    class ControlledGuider(C.CFGGuider):
        def __init__(self, *args):
            super().__init__(*args)
            self.conds = {k: [{**c, "control": object()} for c in v] for k, v in self.conds.items()}

    _, patched = run(model, "euler", adapting(mode="ag", **PER_IMAGE), steps=20, labels=torch.tensor(LABELS),
                     noise=seeded_noise(SEEDS), guider_cls=ControlledGuider)
    report = last_report(patched)
    assert report.alike and "ag decided per batch: a ControlNet is active" in report.note


def test_runs_share_no_state(model):
    settings = adapting(mode="ag+adaptive-diffusion", ag_threshold=0.5, ad_threshold=0.2)
    patcher = H.apply_patch(C.ModelPatcher(model), settings)

    def go(steps, seed, batch):
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(batch)
        guider = C.CFGGuider(patcher, SCALE, labels, torch.full_like(labels, embedded.NULL_LABEL))
        return guider.sample(torch.randn((batch, *embedded.IMAGE_SHAPE), generator=g),
                             C.KSAMPLER(sys.modules["comfy.k_diffusion.sampling"].sample_euler),
                             model.inner.get_sigmas(steps))

    first = go(20, 0, 1)
    go(7, 5, 3)  # another queue item in between: other steps, seed, batch
    again = go(20, 0, 1)
    assert torch.equal(first, again)
    reports = patcher.model_options["transformer_options"][H.KEY].reports
    assert [r.steps for r in reports] == [20, 7, 20] and reports[0].schedule == reports[2].schedule


# -- samplers that cannot be adapted run unchanged -------------------------------------------------------------------
def test_a_multi_call_sampler_runs_unchanged_with_one_log_line(model, caplog):
    plain, _ = run(model, "heun")
    calls = model.calls
    with caplog.at_level(logging.INFO, logger=H.log.name):
        out, patched = run(model, "heun", adapting())
    assert torch.equal(out, plain)
    lines = [r.getMessage() for r in caplog.records if "sample_heun" in r.getMessage() and "unchanged" in r.getMessage()]
    assert len(lines) == 2  # the notice when the run starts and the run's report
    report = last_report(patched)
    assert report.nfe == report.nfe_full == 2 * calls and report.schedule == ""


def test_euler_with_churn_is_not_adapted(model):
    plain, _ = run(model, "euler", extra={"s_churn": 1.0})
    out, patched = run(model, "euler", adapting(), extra={"s_churn": 1.0})
    assert torch.equal(out, plain) and "s_churn" in last_report(patched).note


def test_a_call_off_the_schedule_stops_adaptation_instead_of_miscounting(model, caplog):
    def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):  # claims to be euler
        for i in range(len(sigmas) - 1):
            sigma = sigmas[i] if i < 3 else sigmas[i] * 1.05
            d = (x - model(x, sigma * x.new_ones([x.shape[0]]), **extra_args)) / sigma
            x = x + d * (sigmas[i + 1] - sigma)
        return x

    with caplog.at_level(logging.WARNING, logger=H.log.name):
        out, patched = run(model, settings=adapting(), function=sample_euler)
    report = last_report(patched)
    assert "adaptation stopped at step 3" in report.note and any("stopped" in r.getMessage() for r in caplog.records)
    assert report.schedule[3:] == "F" * (STEPS - 3) and len(report.schedule) == STEPS and torch.isfinite(out).all()


def test_another_guider_runs_unchanged(model):
    class OtherGuider(C.CFGGuider):
        def predict_noise(self, x, timestep, model_options={}, seed=None):
            return super().predict_noise(x, timestep, model_options, seed)

    plain, _ = run(model, "euler", guider_cls=OtherGuider)
    out, patched = run(model, "euler", adapting(), guider_cls=OtherGuider)
    assert torch.equal(out, plain) and "OtherGuider" in last_report(patched).note


def test_cfg_one_forecasts_on_one_row_and_ag_passes_through(model):
    out, patched = run(model, "euler", adapting(), cfg=1.0)
    report = last_report(patched)
    computed = int(O.LEVELS[O.DEFAULT_LEVEL][0] * STEPS + 1e-9)
    assert report.nfe_full == STEPS and report.nfe == model.rows == computed
    plain, _ = run(model, "euler", cfg=1.0)
    out, patched = run(model, "euler", adapting(mode="ag"), cfg=1.0)
    assert torch.equal(out, plain) and "cfg is 1" in last_report(patched).note


# -- KSampler-list samplers -----------------------------------------------------------------------------------------
def test_adaptive_samplers_are_registered_once_and_run_the_recommended_oracle(model, standin, caplog):
    samplers = sys.modules["comfy.samplers"]
    names = H.register_samplers()
    assert H.register_samplers() == names == [f"{b}_adaptive" for b in H.ADAPTIVE_SAMPLERS]
    assert [n for n in samplers.KSampler.SAMPLERS if n.endswith("_adaptive")] == names
    steps = H.ComfySettings().min_steps  # the listed samplers use the node's defaults, min_steps included
    forecast, _ = run(model, "euler", adapting(), steps=steps)
    with caplog.at_level(logging.INFO, logger=H.log.name):
        listed, _ = run(model, "euler_adaptive", steps=steps)
    assert torch.equal(listed, forecast)
    nfe = 2 * int(O.LEVELS[O.DEFAULT_LEVEL][0] * steps + 1e-9)
    assert any(f"NFE {nfe}/{2 * steps}" in r.getMessage() and "sample_euler" in r.getMessage()
               for r in caplog.records)
    plain, _ = run(model, "euler")
    off, patched = run(model, "euler_adaptive", adapting(mode="off"))  # a node on the model decides
    assert torch.equal(off, plain) and last_report(patched).nfe == 2 * STEPS


# -- the report node ------------------------------------------------------------------------------------------------
def test_the_report_node_finds_the_run_that_produced_a_latent(model):
    patcher = H.apply_patch(C.ModelPatcher(model), adapting())
    labels = torch.tensor([1])
    outs = []
    for seed in (0, 1):
        guider = C.CFGGuider(patcher, SCALE, labels, torch.full_like(labels, embedded.NULL_LABEL))
        noise = torch.randn((1, *embedded.IMAGE_SHAPE), generator=torch.Generator().manual_seed(seed))
        steps = 10 + 2 * seed
        outs.append(guider.sample(noise, C.KSAMPLER(sys.modules["comfy.k_diffusion.sampling"].sample_euler),
                                  model.inner.get_sigmas(steps)))
    node = H.AdaptiveSamplingReport()
    first = node.report(patcher, {"samples": outs[0].clone()})
    assert first["result"][0].startswith("Adaptive Sampling [forecast level=balanced] sample_euler: 10 steps")
    assert f"NFE {2 * int(O.LEVELS[O.DEFAULT_LEVEL][0] * 10 + 1e-9)}/20" in first["ui"]["text"][0]
    assert "12 steps" in node.report(patcher, {"samples": outs[1]})["result"][0]
    with pytest.raises(ValueError, match="latent"):
        node.report(patcher, {"samples": outs[0] + 1})
    with pytest.raises(ValueError, match="model"):
        node.report(C.ModelPatcher(model), {"samples": outs[0]})


# -- the custom-node entry point ---------------------------------------------------------------------------------
def test_the_root_init_does_nothing_outside_comfyui():
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('pack', sys.argv[1]); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "print(m.NODE_CLASS_MAPPINGS, 'adaptive_sampler' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(REPO / "__init__.py")], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["{}", "False"]


def test_the_root_init_exports_the_nodes_inside_comfyui():
    spec = importlib.util.spec_from_file_location("adaptive_sampler_pack", REPO / "__init__.py")
    pack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack)
    assert set(pack.NODE_CLASS_MAPPINGS) == {"AdaptiveSampling", "AdaptiveSamplingReport"}
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["AdaptiveSampling"] == "Adaptive Sampling"
    assert "euler_adaptive" in sys.modules["comfy.samplers"].KSampler.SAMPLERS


WORKFLOWS = sorted((REPO / "docs" / "comfyui").glob("*_api.json"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_the_documented_workflows_use_the_nodes_widgets(path):
    """Every Adaptive Sampling node of a documented workflow sets every widget to a valid value, and a report node
    reads each one's run (the real suite checks the node and input names against ComfyUI's /object_info)."""
    graph = json.loads(path.read_text())
    nodes = [n for n in graph.values() if n["class_type"] == "AdaptiveSampling"]
    reports = [n for n in graph.values() if n["class_type"] == "AdaptiveSamplingReport"]
    assert nodes and len(reports) == len(nodes)
    for node in nodes:
        widgets = {k: v for k, v in node["inputs"].items() if k != "model"}
        assert set(widgets) == set(H.WIDGETS)
        H.ComfySettings(**widgets)
    if path.name == "adaptive_sampling_api.json":  # the README's workflow: the defaults
        assert H.ComfySettings(**widgets) == H.ComfySettings() and graph["ksampler"]["class_type"] == "KSampler"


def test_runs_shorter_than_min_steps_run_unchanged_and_say_so(model, caplog):
    plain, _ = run(model, "euler")
    with caplog.at_level(logging.INFO, logger=H.log.name):
        out, patched = run(model, "euler", H.ComfySettings())  # 10 steps < the default min_steps
    assert torch.equal(out, plain) and last_report(patched).nfe == 2 * STEPS
    assert f"below min_steps ({H.ComfySettings().min_steps})" in last_report(patched).note
    assert any("below min_steps" in r.getMessage() for r in caplog.records)
    adapted, patched = run(model, "euler", H.ComfySettings(min_steps=STEPS))
    assert last_report(patched).nfe < 2 * STEPS


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_a_bad_min_steps_is_refused_naming_it(value):
    with pytest.raises(ValueError, match="min_steps"):
        H.ComfySettings(min_steps=value)


# -- flow models: what ComfyUI samples as CONST (SD3, Flux, Wan, HunyuanVideo, LTX, any model behind ModelSamplingSD3 /
# ModelSamplingFlux / ModelSamplingAuraFlow) -------------------------------------------------------------------------
FLOW_SHIFT = 3.0  # SD3's, and ModelSamplingSD3's default


@pytest.fixture(scope="module")
def flow_denoiser():
    """The digits UNet read as a velocity model on SD3's shifted schedule: a flow model for the mechanics (its
    predictions are not a trained flow model's, which these tests do not need)."""
    return FlowDenoiser(embedded.load_unet(), shift=FLOW_SHIFT)


@pytest.fixture
def flow_model(flow_denoiser):
    return CountingModel(flow_denoiser)


def flow_sampling(model):
    return C.ModelSamplingDiscreteFlow(model.inner if hasattr(model, "inner") else model)


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde"])
def test_comfyuis_flow_samplers_equal_the_library_loops(flow_model, flow_denoiser, sampler):
    """The stand-in's flow formulas (ComfyUI's RF ancestral step, half-log-SNR DPM++ 2M SDE from an offset first
    sigma) and the library's flow loops are the same sampler: the comparisons below compare like with like."""
    plain, _ = run(flow_model, sampler, batch=2, sampling=flow_sampling(flow_model))
    torch.testing.assert_close(plain, library(flow_denoiser, sampler, O.FullCFG(), batch=2), rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde"])
def test_a_flow_model_is_adapted_as_one_and_equals_the_library_loop(flow_model, flow_denoiser, sampler):
    out, patched = run(flow_model, sampler, adapting(), batch=2, sampling=flow_sampling(flow_model))
    report = last_report(patched)
    assert report.flow and ", flow model, " in report.line() and "stopped" not in report.note
    assert report.nfe * 2 == flow_model.rows and report.nfe < report.nfe_full == 2 * STEPS
    expected = library(flow_denoiser, sampler, O.recommended(), batch=2)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde"])
def test_mode_off_is_bit_identical_on_a_flow_model(flow_model, sampler):
    plain, _ = run(flow_model, sampler, sampling=flow_sampling(flow_model))
    off, patched = run(flow_model, sampler, adapting(mode="off"), sampling=flow_sampling(flow_model))
    assert torch.equal(plain, off) and last_report(patched).nfe == 2 * STEPS


@pytest.mark.parametrize("sampler,offset", [("euler", False), ("dpmpp_2m_sde", True), ("dpmpp_3m_sde", True)])
@pytest.mark.parametrize("cfg", [SCALE, 1.0])
def test_the_oracle_is_told_flow_guidance_and_the_sigmas_the_sampler_calls(flow_model, flow_denoiser, sampler, offset,
                                                                            cfg):
    sampling = sys.modules["comfy.k_diffusion.sampling"]
    sigmas = flow_denoiser.get_sigmas(STEPS)
    labels = torch.tensor([1])
    patchers = ((C.ModelPatcher(flow_model, flow_sampling(flow_model)), True), (C.ModelPatcher(flow_model), False))
    for patcher, flow in patchers:
        guider = C.CFGGuider(patcher, cfg, labels, torch.full_like(labels, embedded.NULL_LABEL))
        run_ = H.begin_run(adapting(), guider, C.KSAMPLER(getattr(sampling, f"sample_{sampler}")), sigmas, 1)
        info = run_.oracle.run
        assert (info.flow, info.guided, run_.rows_full) == (flow, cfg != 1.0, 2 if cfg != 1.0 else 1)
        first = flow_denoiser.percent_to_sigma(1e-4) if offset and flow else 1.0
        assert info.sigmas[0] == pytest.approx(first, rel=1e-6) and info.sigmas[1:] == tuple(sigmas[1:].tolist())


def test_cfg_one_on_a_flow_model_forecasts_on_one_row(flow_model):
    """Guidance-distilled flow models (Flux dev, Wan with a distill LoRA) run at cfg 1: one row per step."""
    out, patched = run(flow_model, "euler", adapting(), cfg=1.0, sampling=flow_sampling(flow_model))
    report = last_report(patched)
    computed = int(O.LEVELS[O.DEFAULT_LEVEL][0] * STEPS + 1e-9)
    assert report.flow and report.nfe_full == STEPS and report.nfe == flow_model.rows == computed


# -- video latents (batch, channels, frames, height, width) ---------------------------------------------------------
FRAMES = 3
VIDEO_SHAPE = (embedded.IMAGE_SHAPE[0], FRAMES, *embedded.IMAGE_SHAPE[1:])


class FrameModel(torch.nn.Module):
    """A video denoiser on 5-D latents: a frame model applied to every frame of every video (one network row per
    video, as a video model counts)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, sigma, cond):
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        out = self.inner(frames, sigma.repeat_interleave(t), cond=cond.repeat_interleave(t))
        return out.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)

    def get_sigmas(self, n):
        return self.inner.get_sigmas(n)

    def percent_to_sigma(self, percent):
        return self.inner.percent_to_sigma(percent)

    @property
    def sigma_max(self):
        return self.inner.sigma_max


class PerVideoNoise:
    """An ancestral noise sampler whose noise for each video comes from that video's own seed, so that a video gets
    the same noise alone as in a batch."""

    def __init__(self, seeds):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, sigma, sigma_next):
        return torch.stack([torch.randn(VIDEO_SHAPE, generator=g) for g in self.generators])


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m"])
def test_a_batch_of_videos_is_forecast_per_video(flow_denoiser, sampler):
    """A batch of two videos gives each video what it gets alone, with the same decisions: the forecast works per
    video (on Euler a, each video's x0 forecast weights come from its own errors: pooled over the batch they would
    move these videos by 5e-4 to 3e-3 at this length and scale), and the frames of a video are one sample, not a
    batch."""
    video = CountingModel(FrameModel(flow_denoiser))
    noise = torch.randn((2, *VIDEO_SHAPE), generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([2, 7])

    def go(rows):
        extra = {"noise_sampler": PerVideoNoise([10 + r for r in rows])} if sampler == "euler_ancestral" else None
        return run(video, sampler, adapting(), batch=len(rows), sampling=flow_sampling(video), noise=noise[rows],
                   labels=labels[rows], extra=extra, steps=2 * STEPS, cfg=8.0)

    both, patched = go([0, 1])
    report = last_report(patched)
    assert report.batch == 2 and report.flow and report.nfe * 2 == video.rows and "S" in report.schedule
    for i in range(2):
        one, single = go([i])
        torch.testing.assert_close(one[0], both[i], rtol=0, atol=1e-4)
        assert last_report(single).schedule == report.schedule and last_report(single).batch == 1


def test_a_video_run_equals_the_library_loop(flow_denoiser):
    video = FrameModel(flow_denoiser)
    out, patched = run(CountingModel(video), "euler_ancestral", adapting(), batch=2, sampling=flow_sampling(video),
                       shape=VIDEO_SHAPE)
    assert out.shape == (2, *VIDEO_SHAPE) and last_report(patched).batch == 2
    expected = library(video, "euler_ancestral", O.recommended(), batch=2, shape=VIDEO_SHAPE)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


# -- a change of model between two sampling passes (Wan 2.2's high-noise and low-noise experts) -----------------------
def expert(seed):
    """Another model of the same architecture: the digits UNet with its weights perturbed by a seeded 5%."""
    unet = embedded.load_unet()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.mul_(1 + 0.05 * torch.randn(p.shape, generator=g))
    return FlowDenoiser(unet, shift=FLOW_SHIFT)


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral"])
def test_a_model_switch_between_passes_starts_a_fresh_run(sampler):
    """As in ComfyUI's Wan 2.2 workflow: KSamplerAdvanced steps 0-10 of 20 on the high-noise model (leftover noise
    returned), then steps 10-20 on the low-noise model from that latent with no noise added. Each pass is a run of
    its own: its plan is a fresh oracle's on its own sigmas and nothing of the first model's predictions is
    forecast into the second pass, which equals the library loop on the second model alone."""
    high, low = expert(1), expert(2)
    sigmas = high.get_sigmas(2 * STEPS)
    first_sigmas, second_sigmas = sigmas[:STEPS + 1], sigmas[STEPS:]
    settings = adapting()
    models = [CountingModel(high), CountingModel(low)]
    patchers = [H.apply_patch(C.ModelPatcher(m, flow_sampling(m)), settings) for m in models]
    noise = torch.randn((1, *embedded.IMAGE_SHAPE), generator=torch.Generator().manual_seed(3))
    first, _ = run(models[0], sampler, patcher=patchers[0], sigmas=first_sigmas, noise=noise)
    leftover = first * (1 - first_sigmas[-1])  # what the sampler returned before ComfyUI's inverse noise scaling
    second, _ = run(models[1], sampler, patcher=patchers[1], sigmas=second_sigmas, noise=torch.zeros_like(noise),
                    latent_image=first, seed=1)
    reports = [last_report(p) for p in patchers]
    for report, pass_sigmas in zip(reports, (first_sigmas, second_sigmas)):
        plan = O.recommended()
        plan.reset(O.RunInfo(sampler=f"sample_{sampler}", sigmas=tuple(pass_sigmas.tolist()), batch_size=1,
                             stochastic=report.stochastic, flow=True))
        assert report.steps == STEPS and report.flow and "stopped" not in report.note
        assert report.schedule == "".join("F" if i in plan.plan else "S" for i in range(STEPS))
    torch.testing.assert_close(first, library(high, sampler, O.recommended(), sigmas=first_sigmas, x=noise) /
                               (1 - first_sigmas[-1]), rtol=0, atol=1e-5)
    torch.testing.assert_close(second, library(low, sampler, O.recommended(), sigmas=second_sigmas, x=leftover, seed=1),
                               rtol=0, atol=1e-5)
