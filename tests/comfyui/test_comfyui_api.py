"""Integration suite against a real ComfyUI, through its HTTP API (``/prompt``, ``/history``, ``/view``).

Runs only when ``COMFYUI_DIR`` names a ComfyUI checkout. It runs on ``models/checkpoints/random-sd15.safetensors``,
a random-weight SD-1.5 checkpoint built with ComfyUI's own interpreter and classes when it is missing (``python
tests/hosts/build_models.py sd15 --comfyui-dir $COMFYUI_DIR --out
$COMFYUI_DIR/models/checkpoints/random-sd15.safetensors``: its zero-initialised output layers get random values; the
suite checks that two samplers give different pictures); ``COMFYUI_CKPT`` names another checkpoint there. ComfyUI is
started headless on 127.0.0.1 on the CPU with this repository linked into ``custom_nodes/`` (``comfyui_client.py``:
``COMFYUI_PYTHON``, ``COMFYUI_ARGS``). The same checkpoint behind ComfyUI's ModelSamplingSD3 / ModelSamplingFlux /
ModelSamplingAuraFlow nodes is sampled as a flow model (``CONST``).
Slow on a CPU: seconds to minutes per picture. Results (NFE, PSNR, time per sampler) are printed and written to
``tests/comfyui/comfyui_results.json``.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from comfyui_client import (COMFYUI_DIR, comfyui_python, comfyui_server, decisions, images, nfe, object_info, ok,
                            promised_nfe, psnr, report, seconds, submit)
from host_suite import builder_command, ensure_built

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set: no real ComfyUI to test against")

HERE = Path(__file__).resolve().parent
STEPS = 8
SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde"]
NODE_DEFAULTS = dict(mode="forecast", budget=0.0, ag_threshold=0.991, ag_space="x0", ad_threshold=0.01,
                     ad_max_skips=4, ad_warmup=4, min_steps=12)
DEFAULT_WIDGETS = {**NODE_DEFAULTS, "min_steps": 1}  # the defaults, adapting these short (8-step) runs
RESULTS: dict = {}


#: The checkpoint's file name in models/checkpoints: the random SD 1.5 built by tests/hosts/build_models.py.
CKPT = os.environ.get("COMFYUI_CKPT", "random-sd15.safetensors")


@pytest.fixture(scope="module")
def server():
    path = Path(COMFYUI_DIR) / "models" / "checkpoints" / CKPT
    command = builder_command(comfyui_python(), "sd15", "--comfyui-dir", COMFYUI_DIR, "--out", path)
    if "COMFYUI_CKPT" in os.environ and not path.exists():
        pytest.skip(f"{path} not found")
    reason = ensure_built([path], command, HERE / "comfyui_build.log")
    if reason:
        pytest.skip(reason)
    with comfyui_server(HERE / "comfyui_server.log") as server:
        yield {**server, "ckpt": CKPT}
    if RESULTS:
        (HERE / "comfyui_results.json").write_text(json.dumps(RESULTS, indent=1))
        print("\nComfyUI results:", json.dumps(RESULTS, indent=1))


# -- workflows (API format) ----------------------------------------------------------------------------------------
#: ComfyUI's nodes that make it sample a model as a flow model (``CONST`` model_sampling), as SD3 / Flux / AuraFlow.
MODEL_SAMPLING = {
    "sd3": {"class_type": "ModelSamplingSD3", "inputs": {"shift": 3.0}},
    "flux": {"class_type": "ModelSamplingFlux", "inputs": {"max_shift": 1.15, "base_shift": 0.5, "width": 64,
                                                           "height": 64}},
    "auraflow": {"class_type": "ModelSamplingAuraFlow", "inputs": {"shift": 1.73}},
}


def workflow(server, sampler="euler", widgets=None, seed=1, steps=STEPS, batch=1, pick=None, prefix="adaptive",
             model_sampling=None):
    """Checkpoint -> [ModelSampling* node] -> prompts -> empty latent (optionally one image of a batch) -> [Adaptive
    Sampling] -> KSampler -> VAE decode -> SaveImage (+ the report node when patched). With a model sampling node the
    scheduler is "simple", the one flow models are sampled with."""
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": server["ckpt"]}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red apple on a table", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "ksampler": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "seed": seed, "steps": steps, "cfg": 5.0, "sampler_name": sampler,
            "scheduler": "normal", "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["ksampler", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    }
    if pick is not None:
        g["pick"] = {"class_type": "LatentFromBatch", "inputs": {"samples": ["latent", 0], "batch_index": pick,
                                                                "length": 1}}
        g["ksampler"]["inputs"]["latent_image"] = ["pick", 0]
    model = ["ckpt", 0]
    if model_sampling is not None:
        node = MODEL_SAMPLING[model_sampling]
        g["sampling"] = {"class_type": node["class_type"], "inputs": {"model": model, **node["inputs"]}}
        model = ["sampling", 0]
        g["ksampler"]["inputs"].update(model=model, scheduler="simple")
    if widgets is not None:
        g["adaptive"] = {"class_type": "AdaptiveSampling", "inputs": {"model": model, **widgets}}
        g["ksampler"]["inputs"]["model"] = ["adaptive", 0]
        g["report"] = {"class_type": "AdaptiveSamplingReport", "inputs": {"model": ["adaptive", 0],
                                                                          "latent": ["ksampler", 0]}}
    return g


_CACHE: dict = {}


def generate(server, **kw):
    """(entry, images), run once per distinct workflow in this session (ComfyUI would not re-execute it anyway)."""
    key = json.dumps(kw, sort_keys=True)
    if key not in _CACHE:
        entry = ok(server, workflow(server, **kw))
        _CACHE[key] = entry, images(server, entry)
    return _CACHE[key]


# -- the checks ----------------------------------------------------------------------------------------------------
def test_the_node_and_samplers_load(server):
    info = object_info(server)
    assert {"AdaptiveSampling", "AdaptiveSamplingReport"} <= set(info)
    required = info["AdaptiveSampling"]["input"]["required"]
    assert {k: required[k][1]["default"] for k in NODE_DEFAULTS} == NODE_DEFAULTS
    listed = info["KSampler"]["input"]["required"]["sampler_name"][0]
    assert {"euler_adaptive", "dpmpp_2m_adaptive", "dpmpp_2m_sde_adaptive"} <= set(listed)
    assert "IMPORT FAILED" not in server["log"].read_text()


def test_the_checkpoint_is_not_degenerate(server):
    """A freshly built LDM predicts zero noise: every sampler would give the same picture and the pixel-identity
    checks would prove nothing."""
    _, (euler,) = generate(server, sampler="euler")
    _, (dpm,) = generate(server, sampler="dpmpp_2m")
    assert not np.array_equal(euler, dpm)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m_sde"])
def test_mode_off_is_pixel_identical_to_the_unpatched_ksampler(server, sampler):
    _, (plain,) = generate(server, sampler=sampler)
    entry, (off,) = generate(server, sampler=sampler, widgets={**DEFAULT_WIDGETS, "mode": "off"})
    assert np.array_equal(plain, off)
    assert nfe(report(entry)) == (2 * STEPS, 2 * STEPS)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_the_default_mode_saves_nfe_and_stays_close_to_full_cfg(server, sampler):
    """At 12 steps, the node's default min_steps: shorter passes are not adapted by default (they lose to fewer
    steps), so the picture is held to full CFG's where the default adapts (8-step dpmpp_2m_sde on this checkpoint:
    20.1 dB against another seed's 12.5)."""
    steps = NODE_DEFAULTS["min_steps"]
    full_entry, (full,) = generate(server, sampler=sampler, steps=steps)
    entry, (adaptive,) = generate(server, sampler=sampler, steps=steps, widgets=NODE_DEFAULTS)
    _, (other_seed,) = generate(server, sampler=sampler, steps=steps, seed=2)
    text = report(entry)
    used, total = nfe(text)
    assert used < total == 2 * steps
    assert ("stochastic" in text.split(", ")) == (sampler in ("euler_ancestral", "dpmpp_2m_sde"))
    close, unrelated = psnr(adaptive, full), psnr(other_seed, full)
    RESULTS[sampler] = {"nfe": f"{used}/{total}", "psnr_vs_full_cfg_db": round(close, 2),
                        "psnr_other_seed_db": round(unrelated, 2), "decisions": decisions(text),
                        "seconds_full": seconds(full_entry), "seconds_adaptive": seconds(entry),
                        "time_ratio": round(seconds(entry) / seconds(full_entry), 2)}
    assert close > unrelated + 10, RESULTS[sampler]  # the same picture, not merely a picture
    assert text in server["log"].read_text()  # the console log carries the same report


def test_the_ksampler_list_sampler_equals_the_node_in_its_default_mode(server):
    steps = 12  # the listed samplers use the node's defaults, whose min_steps is 12
    _, (node,) = generate(server, sampler="dpmpp_2m", widgets=DEFAULT_WIDGETS, steps=steps)
    _, (listed,) = generate(server, sampler="dpmpp_2m_adaptive", steps=steps)
    assert np.array_equal(node, listed)
    assert "[forecast level=balanced] sample_dpmpp_2m" in server["log"].read_text()


def test_a_batch_of_two_equals_two_single_runs(server):
    entry, batch = generate(server, sampler="dpmpp_2m", widgets=DEFAULT_WIDGETS, batch=2, prefix="batch")
    singles = [generate(server, sampler="dpmpp_2m", widgets=DEFAULT_WIDGETS, batch=2, pick=i, prefix="single")
               for i in range(2)]
    assert len(batch) == 2
    for i, (single_entry, (single,)) in enumerate(singles):
        assert report(single_entry).split("decisions ")[1] == report(entry).split("decisions ")[1]
        if not np.array_equal(single, batch[i]):  # only ComfyUI's own batch arithmetic may differ
            _, plain_batch = generate(server, sampler="dpmpp_2m", batch=2, prefix="batch")
            _, (plain_single,) = generate(server, sampler="dpmpp_2m", batch=2, pick=i, prefix="single")
            assert np.abs(single.astype(int) - batch[i]).max() <= np.abs(plain_single.astype(int) - plain_batch[i]).max()


def test_an_unsupported_sampler_runs_unchanged_with_its_log_line(server):
    _, (plain,) = generate(server, sampler="heun", steps=4)
    entry, (patched,) = generate(server, sampler="heun", steps=4, widgets=DEFAULT_WIDGETS)
    assert np.array_equal(plain, patched)
    text = report(entry)
    assert "sample_heun does not evaluate the model exactly once per step" in text
    assert "sample_heun does not evaluate the model exactly once per step; running it unchanged" in \
        server["log"].read_text()
    used, total = nfe(text)
    assert used == total == 2 * (2 * 4 - 1)  # heun: two calls per step but the last, counted, not adapted


def test_a_run_shorter_than_min_steps_runs_unchanged_with_its_log_line(server):
    _, (plain,) = generate(server, sampler="euler")
    entry, (short,) = generate(server, sampler="euler", widgets={**DEFAULT_WIDGETS, "min_steps": 12})
    assert np.array_equal(plain, short)
    assert nfe(report(entry)) == (2 * STEPS, 2 * STEPS)
    assert "below min_steps (12)" in server["log"].read_text()


@pytest.mark.parametrize("widget,value,expect", [
    ("mode", "fastest", "mode"),
    ("min_steps", 0, "min_steps"),
    ("budget", 1.5, "budget"),
    ("budget", float("nan"), "Adaptive Sampling: budget"),
])
def test_a_bad_widget_value_fails_the_prompt_naming_it(server, widget, value, expect):
    graph = workflow(server, widgets={**DEFAULT_WIDGETS, widget: value}, seed=99)
    entry, error = submit(server, graph)
    if error is not None:  # refused by ComfyUI's own validation of the widget
        assert expect in json.dumps(error)
    else:  # accepted by ComfyUI, refused by the node
        assert entry["status"]["status_str"] == "error"
        messages = json.dumps(entry["status"]["messages"])
        assert expect in messages and "execution_error" in messages


# -- flow sampling: the checkpoint behind ModelSamplingSD3 / Flux / AuraFlow (ComfyUI's CONST) -------------------------
FLOW_STEPS = 20
FLOW_SAMPLERS = ["euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde"]


@pytest.mark.parametrize("model_sampling", list(MODEL_SAMPLING))
@pytest.mark.parametrize("sampler", FLOW_SAMPLERS)
def test_a_flow_model_saves_what_the_level_promises_and_stays_close_to_full_cfg(server, sampler, model_sampling):
    """ComfyUI samples the checkpoint as a flow model (flow noise scaling, the RF ancestral step, half-log-SNR DPM++
    SDE steps from an offset first sigma): the node's default mode saves the NFE its level promises on the sampler,
    never stops adapting (no call off the schedule: the offset first sigma is the run's), logs its line, and keeps
    the picture as close to full CFG as on the SD runs."""
    run = dict(sampler=sampler, steps=FLOW_STEPS, model_sampling=model_sampling)
    full_entry, (full,) = generate(server, **run)
    entry, (adaptive,) = generate(server, **run, widgets=NODE_DEFAULTS)
    _, (other_seed,) = generate(server, **run, seed=2)
    text = report(entry)
    used, total = nfe(text)
    stochastic = "stochastic" in text.split(", ")
    assert ", flow model, " in text and "adaptation stopped" not in text, text
    assert stochastic == (sampler != "dpmpp_2m")
    assert used <= promised_nfe(sampler, stochastic, FLOW_STEPS) and total == 2 * FLOW_STEPS, text
    close, unrelated = psnr(adaptive, full), psnr(other_seed, full)
    RESULTS.setdefault("flow", {})[f"{model_sampling} {sampler}"] = {
        "nfe": f"{used}/{total}", "psnr_vs_full_cfg_db": round(close, 2), "psnr_other_seed_db": round(unrelated, 2),
        "decisions": decisions(text), "seconds_full": seconds(full_entry), "seconds_adaptive": seconds(entry)}
    assert close > unrelated + 10, RESULTS["flow"][f"{model_sampling} {sampler}"]
    assert text in server["log"].read_text()


@pytest.mark.parametrize("model_sampling", list(MODEL_SAMPLING))
@pytest.mark.parametrize("sampler", FLOW_SAMPLERS)
def test_mode_off_is_pixel_identical_on_a_flow_model(server, sampler, model_sampling):
    run = dict(sampler=sampler, steps=FLOW_STEPS, model_sampling=model_sampling)
    _, (plain,) = generate(server, **run)
    entry, (off,) = generate(server, **run, widgets={**NODE_DEFAULTS, "mode": "off"})
    assert np.array_equal(plain, off)
    assert nfe(report(entry)) == (2 * FLOW_STEPS, 2 * FLOW_STEPS)


@pytest.mark.parametrize("model_sampling", list(MODEL_SAMPLING))
@pytest.mark.parametrize("sampler", FLOW_SAMPLERS)
def test_the_listed_adaptive_sampler_equals_the_node_on_a_flow_model(server, sampler, model_sampling):
    """``<sampler>_adaptive`` without a node: the same picture as the node's default mode, and its own log line (the
    node's report, word for word, once more in the console)."""
    run = dict(steps=FLOW_STEPS, model_sampling=model_sampling)
    node_entry, (node,) = generate(server, sampler=sampler, widgets=NODE_DEFAULTS, **run)
    line = report(node_entry)
    before = server["log"].read_text().count(line)
    _, (listed,) = generate(server, sampler=f"{sampler}_adaptive", **run)
    assert np.array_equal(node, listed)
    assert server["log"].read_text().count(line) == before + 1, line
