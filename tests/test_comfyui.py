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
        function=None, labels=None):
    """One sampling call through the stand-in; returns (output, patched ModelPatcher or None)."""
    patcher = C.ModelPatcher(model)
    if settings is not None:
        patcher = H.apply_patch(patcher, settings)
    labels = torch.arange(batch) % embedded.NUM_CLASSES if labels is None else labels
    guider = (guider_cls or C.CFGGuider)(patcher, cfg, labels, torch.full_like(labels, embedded.NULL_LABEL))
    sigmas = model.inner.get_sigmas(steps) if hasattr(model, "inner") else model.get_sigmas(steps)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((batch, *embedded.IMAGE_SHAPE), generator=g)
    fn = function or getattr(sys.modules["comfy.k_diffusion.sampling"], f"sample_{sampler}")
    torch.manual_seed(seed + 1)  # ancestral / SDE noise
    return guider.sample(noise, C.KSAMPLER(fn, extra or {}), sigmas, seed=seed), patcher


def last_report(patcher):
    return patcher.model_options["transformer_options"][H.KEY].reports[-1]


def library(model, sampler, oracle, batch=1, seed=0, steps=STEPS, **kw):
    """The same run through the library's own loops (adaptive_sampler.sampling)."""
    sigmas = model.get_sigmas(steps)
    labels = torch.arange(batch) % embedded.NUM_CLASSES
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *embedded.IMAGE_SHAPE), generator=g) * sigmas[0]
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


def test_the_documented_workflow_uses_the_nodes_widgets():
    graph = json.loads((REPO / "docs" / "comfyui" / "adaptive_sampling_api.json").read_text())
    node = next(n for n in graph.values() if n["class_type"] == "AdaptiveSampling")
    widgets = {k: v for k, v in node["inputs"].items() if k != "model"}
    assert set(widgets) == set(H.WIDGETS) and H.ComfySettings(**widgets) == H.ComfySettings()
    assert {n["class_type"] for n in graph.values()} >= {"KSampler", "AdaptiveSamplingReport"}


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
