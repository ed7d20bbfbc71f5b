"""Integration suite against a real ComfyUI, through its HTTP API (``/prompt``, ``/history``, ``/view``).

Runs only when ``COMFYUI_DIR`` names a ComfyUI checkout with a checkpoint in ``models/checkpoints`` (a random-weight
SD-1.5 checkpoint is enough, provided its zero-initialised output layers were given random values; the suite checks
that two samplers give different pictures). ComfyUI is started headless on 127.0.0.1 on the CPU with this
repository linked into ``custom_nodes/``. ``COMFYUI_PYTHON`` (default ``$COMFYUI_DIR/venv/bin/python``) is its
interpreter, ``COMFYUI_CKPT`` the checkpoint's file name (default: the first ``*.safetensors``), ``COMFYUI_ARGS``
extra flags. Slow on a CPU: seconds to minutes per picture. Results (NFE, PSNR, time per sampler) are printed and
written to ``tests/comfyui/comfyui_results.json``.
"""

import io
import json
import math
import os
import shlex
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from host_suite import free_port, link_to_this_repository, running_server

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set: no real ComfyUI to test against")

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
STEPS = 8
SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde"]
NODE_DEFAULTS = dict(mode="forecast", budget=0.0, ag_threshold=0.991, ag_space="x0", ad_threshold=0.01,
                     ad_max_skips=4, ad_warmup=4, min_steps=12)
DEFAULT_WIDGETS = {**NODE_DEFAULTS, "min_steps": 1}  # the defaults, adapting these short (8-step) runs
RESULTS: dict = {}


@pytest.fixture(scope="module")
def server():
    root = Path(COMFYUI_DIR)
    checkpoints = sorted((root / "models" / "checkpoints").glob("*.safetensors"))
    if not checkpoints:
        pytest.skip("no checkpoint in $COMFYUI_DIR/models/checkpoints")
    ckpt = os.environ.get("COMFYUI_CKPT", checkpoints[0].name)
    link = root / "custom_nodes" / "adaptive-sampler"
    link_to_this_repository(link)
    python = os.environ.get("COMFYUI_PYTHON", str(root / "venv" / "bin" / "python"))
    port = free_port()
    tmp = tempfile.TemporaryDirectory()
    args = ["main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
            "--database-url", f"sqlite:///{tmp.name}/comfyui.db", "--output-directory", f"{tmp.name}/output"]
    args += shlex.split(os.environ.get("COMFYUI_ARGS", ""))
    log_path = HERE / "comfyui_server.log"
    url = f"http://127.0.0.1:{port}"
    with running_server("ComfyUI", [python, *args], root, log_path, url + "/system_stats",
                        env={**os.environ, "HF_HUB_OFFLINE": "1"}, poll_s=2):
        yield {"url": url, "ckpt": ckpt, "log": log_path}
    tmp.cleanup()
    if RESULTS:
        (HERE / "comfyui_results.json").write_text(json.dumps(RESULTS, indent=1))
        print("\nComfyUI results:", json.dumps(RESULTS, indent=1))


# -- HTTP ----------------------------------------------------------------------------------------------------------
def _request(url, data=None):
    req = urllib.request.Request(url, data=None if data is None else json.dumps(data).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return 200, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def submit(server, graph):
    """Queue a graph; returns (history entry, None) or (None, the /prompt validation error body)."""
    code, body = _request(server["url"] + "/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})
    if code != 200:
        return None, json.loads(body)
    pid = json.loads(body)["prompt_id"]
    deadline = time.time() + 3600
    while time.time() < deadline:
        _, raw = _request(f"{server['url']}/history/{pid}")
        entry = json.loads(raw).get(pid)
        if entry and entry["status"].get("completed") is not None and entry["status"]["status_str"] in ("success", "error"):
            return entry, None
        time.sleep(0.5)
    raise AssertionError("prompt did not finish within an hour")


def ok(server, graph):
    entry, error = submit(server, graph)
    assert error is None, error
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    return entry


def images(server, entry, node="save"):
    from PIL import Image
    out = []
    for im in entry["outputs"][node]["images"]:
        q = urllib.parse.urlencode({"filename": im["filename"], "subfolder": im["subfolder"], "type": im["type"]})
        _, raw = _request(f"{server['url']}/view?{q}")
        out.append(np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")))
    return out


def seconds(entry):
    """Execution time of a prompt from ComfyUI's own status timestamps (ms)."""
    stamps = {kind: data["timestamp"] for kind, data in entry["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000


def report(entry, node="report"):
    return entry["outputs"][node]["text"][0]


def nfe(text):
    used, full = text.split("NFE ")[1].split(" ")[0].split("/")
    return int(used), int(full)


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


# -- workflows (API format) ----------------------------------------------------------------------------------------
def workflow(server, sampler="euler", widgets=None, seed=1, steps=STEPS, batch=1, pick=None, prefix="adaptive"):
    """Checkpoint -> prompts -> empty latent (optionally one image of a batch) -> [Adaptive Sampling] -> KSampler
    -> VAE decode -> SaveImage (+ the report node when patched)."""
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
    if widgets is not None:
        g["adaptive"] = {"class_type": "AdaptiveSampling", "inputs": {"model": ["ckpt", 0], **widgets}}
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
    _, raw = _request(server["url"] + "/object_info")
    info = json.loads(raw)
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
    full_entry, (full,) = generate(server, sampler=sampler)
    entry, (adaptive,) = generate(server, sampler=sampler, widgets=DEFAULT_WIDGETS)
    _, (other_seed,) = generate(server, sampler=sampler, seed=2)
    text = report(entry)
    used, total = nfe(text)
    assert used < total == 2 * STEPS
    assert ("stochastic" in text.split(", ")) == (sampler in ("euler_ancestral", "dpmpp_2m_sde"))
    close, unrelated = psnr(adaptive, full), psnr(other_seed, full)
    RESULTS[sampler] = {"nfe": f"{used}/{total}", "psnr_vs_full_cfg_db": round(close, 2),
                        "psnr_other_seed_db": round(unrelated, 2), "decisions": text.split("decisions ")[1].split(";")[0],
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
