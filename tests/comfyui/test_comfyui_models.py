"""Tiny random checkpoints of real architectures in a real ComfyUI, loaded the way users load them (Load Diffusion
Model + Load CLIP / DualCLIPLoader + Load VAE), through the HTTP API.

* **Flux** (dev: guidance embedding, run at cfg 1 with FluxGuidance: one network row per step),
* **SD3** (MMDiT; ComfyUI samples it as a flow model with shift 3),
* **Wan 2.1** T2V (5-D video latents) and two Wan experts switched between two KSamplerAdvanced passes, as Wan 2.2's
  high-noise / low-noise workflow does,
* an **SDXL**-family UNet (ComfyUI detects it as SDXL's Segmind-Vega layout; pooled CLIP-G text and size
  conditioning through CLIPTextEncodeSDXL).

The files are expected under ``$COMFYUI_DIR/models`` with the names in :data:`MODELS`; missing ones are built first
with ComfyUI's own interpreter and model classes (``python tests/hosts/build_models.py comfyui --comfyui-dir
$COMFYUI_DIR``, a few minutes); with ``HOST_SUITE_BUILD=0`` an architecture whose files are absent is skipped, naming
them and that command. The diffusion models are small (hidden size 128, one or two blocks; the SDXL
UNet at width 320) with text inputs of CLIP-L's width, so one random CLIP-L conditions Flux, SD3 and Wan; the text
encoders themselves are full size (ComfyUI builds them from fixed configs). Built with ComfyUI's own model classes,
every weight random, the output layer scaled to a prediction spread of about 1. Results are written to
``tests/comfyui/comfyui_models_results.json``.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from comfyui_client import (COMFYUI_DIR, comfyui_python, comfyui_server, decisions, images, nfe, object_info, ok,
                            promised_nfe, psnr, report, seconds)
from host_suite import builder_command, ensure_built

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set: no real ComfyUI to test against")

HERE = Path(__file__).resolve().parent
STEPS = 20
SAMPLERS = ["euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde"]
NODE_DEFAULTS = dict(mode="forecast", budget=0.0, ag_threshold=0.991, ag_space="x0", ad_threshold=0.01,
                     ad_max_skips=4, ad_warmup=4, min_steps=12)
FRAMES = 9  # pixel frames of the Wan video: 3 latent frames
EXPERT_STEPS = 30  # Wan 2.2's two experts: 15 steps each
FLUX_GUIDANCE = 3.5
MODELS = {
    "flux": dict(unet="random-flux.safetensors", clip=["random-clip-l.safetensors"], vae="random-vae16.safetensors",
                 flow=True, cfg=1.0),
    "sd3": dict(unet="random-sd3.safetensors", clip=["random-clip-l.safetensors"], vae="random-vae16.safetensors",
                flow=True, cfg=5.0),
    "wan": dict(unet="random-wan-high.safetensors", clip=["random-clip-l.safetensors"],
                vae="random-wan21-vae.safetensors", flow=True, cfg=5.0, low="random-wan-low.safetensors"),
    "sdxl": dict(unet="random-sdxl.safetensors", clip=["random-clip-l.safetensors", "random-clip-g.safetensors"],
                 vae="random-vae4.safetensors", flow=False, cfg=5.0),
}
RESULTS: dict = {}


def files(arch):
    spec = MODELS[arch]
    names = [("diffusion_models", spec["unet"]), *[("text_encoders", c) for c in spec["clip"]], ("vae", spec["vae"])]
    if "low" in spec:
        names.append(("diffusion_models", spec["low"]))
    return [Path(COMFYUI_DIR) / "models" / folder / name for folder, name in names]


def build_command():
    return builder_command(comfyui_python(), "comfyui", "--comfyui-dir", COMFYUI_DIR)


@pytest.fixture(scope="module")
def server():
    # built before the server starts: ComfyUI lists its model folders at start
    ensure_built([f for arch in MODELS for f in files(arch)], build_command(), HERE / "comfyui_models_build.log")
    with comfyui_server(HERE / "comfyui_models_server.log") as server:
        yield server
    if RESULTS:
        (HERE / "comfyui_models_results.json").write_text(json.dumps(RESULTS, indent=1))
        print("\nComfyUI results (tiny architectures):", json.dumps(RESULTS, indent=1))


@pytest.fixture(params=list(MODELS))
def arch(request, server):
    missing = [str(f) for f in files(request.param) if not f.exists()]
    if missing:
        pytest.skip(f"{request.param}: {', '.join(missing)} not found; build with: {' '.join(build_command())}")
    return request.param


# -- workflows (API format) ----------------------------------------------------------------------------------------
def loaders(arch):
    spec = MODELS[arch]
    g = {"unet": {"class_type": "UNETLoader", "inputs": {"unet_name": spec["unet"], "weight_dtype": "default"}},
         "vae": {"class_type": "VAELoader", "inputs": {"vae_name": spec["vae"]}}}
    if len(spec["clip"]) == 1:
        g["clip"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": spec["clip"][0], "type": "stable_diffusion"}}
    else:
        g["clip"] = {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": spec["clip"][0],
                                                                "clip_name2": spec["clip"][1], "type": "sdxl"}}
    return g


def prompts(arch, guidance=FLUX_GUIDANCE, size=64):
    """Positive and negative conditioning: CLIPTextEncodeSDXL (pooled CLIP-G text, original / crop / target size) for
    SDXL, CLIPTextEncode otherwise, FluxGuidance on Flux's positive prompt."""
    g = {}
    for name, text in (("pos", "a red apple on a table"), ("neg", "blurry")):
        if arch == "sdxl":
            g[name] = {"class_type": "CLIPTextEncodeSDXL", "inputs": {
                "clip": ["clip", 0], "width": size, "height": size, "crop_w": 0, "crop_h": 0, "target_width": size,
                "target_height": size, "text_g": text, "text_l": text}}
        else:
            g[name] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["clip", 0]}}
    if arch == "flux":
        g["guided"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["pos", 0], "guidance": guidance}}
    return g


def empty_latent(arch, batch):
    if arch == "wan":
        return {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": FRAMES,
                                                                    "batch_size": batch}}
    kind = "EmptyLatentImage" if arch == "sdxl" else "EmptySD3LatentImage"
    return {"class_type": kind, "inputs": {"width": 64, "height": 64, "batch_size": batch}}


def adaptive(g, model, widgets, name=""):
    """An Adaptive Sampling node on ``model`` and its report node on the sampler ``"ksampler" + name``."""
    g["adaptive" + name] = {"class_type": "AdaptiveSampling", "inputs": {"model": model, **widgets}}
    g["report" + name] = {"class_type": "AdaptiveSamplingReport", "inputs": {"model": ["adaptive" + name, 0],
                                                                            "latent": ["ksampler" + name, 0]}}
    return ["adaptive" + name, 0]


def workflow(arch, sampler="euler", widgets=None, seed=1, steps=STEPS, batch=1, pick=None, guidance=FLUX_GUIDANCE,
             size=64, prefix="adaptive"):
    """Loaders -> prompts -> empty latent (optionally one sample of a batch) -> [Adaptive Sampling] -> KSampler ->
    VAE decode -> SaveImage (every frame of a video) (+ the report node when patched)."""
    spec = MODELS[arch]
    g = {**loaders(arch), **prompts(arch, guidance, size), "latent": empty_latent(arch, batch)}
    latent = ["latent", 0]
    if pick is not None:
        g["pick"] = {"class_type": "LatentFromBatch", "inputs": {"samples": latent, "batch_index": pick, "length": 1}}
        latent = ["pick", 0]
    model = ["unet", 0] if widgets is None else adaptive(g, ["unet", 0], widgets)
    g["ksampler"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": seed, "steps": steps, "cfg": spec["cfg"], "sampler_name": sampler,
        "scheduler": "simple" if spec["flow"] else "normal", "positive": ["guided" if arch == "flux" else "pos", 0],
        "negative": ["neg", 0], "latent_image": latent, "denoise": 1.0}}
    g["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["ksampler", 0], "vae": ["vae", 0]}}
    g["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}}
    return g


def two_experts(sampler="euler", widgets=None, high_widgets=None, seed=1, steps=STEPS):
    """Wan 2.2's workflow on two Wan experts: KSamplerAdvanced steps 0 to steps/2 on the high-noise model (noise
    added, leftover noise returned), then the rest on the low-noise model (no noise added). ``widgets`` puts an
    Adaptive Sampling node on each model (``high_widgets`` another one on the first)."""
    g = {**loaders("wan"), **prompts("wan"), "latent": empty_latent("wan", 1)}
    g["unet_low"] = {"class_type": "UNETLoader", "inputs": {"unet_name": MODELS["wan"]["low"],
                                                            "weight_dtype": "default"}}
    half = steps // 2
    passes = (("_high", ["unet", 0], "enable", 0, half, "enable", ["latent", 0]),
              ("_low", ["unet_low", 0], "disable", half, 10000, "disable", ["ksampler_high", 0]))
    for name, model, add_noise, start, end, leftover, latent in passes:
        chosen = high_widgets if name == "_high" and high_widgets is not None else widgets
        if chosen is not None:
            model = adaptive(g, model, chosen, name)
        g["ksampler" + name] = {"class_type": "KSamplerAdvanced", "inputs": {
            "model": model, "add_noise": add_noise, "noise_seed": seed, "steps": steps, "cfg": MODELS["wan"]["cfg"],
            "sampler_name": sampler, "scheduler": "simple", "positive": ["pos", 0], "negative": ["neg", 0],
            "latent_image": latent, "start_at_step": start, "end_at_step": end,
            "return_with_leftover_noise": leftover}}
    g["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["ksampler_low", 0], "vae": ["vae", 0]}}
    g["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "experts"}}
    return g


_CACHE: dict = {}


def generate(server, build, **kw):
    """(entry, frames as one array), run once per distinct workflow in this session."""
    key = json.dumps([build.__name__, kw], sort_keys=True)
    if key not in _CACHE:
        entry = ok(server, build(**kw))
        _CACHE[key] = entry, np.stack(images(server, entry))
    return _CACHE[key]


def frames(picture, pick):
    """The frames of batch element ``pick`` of a saved batch (a video saves all its frames; SaveImage saves a batch
    in order)."""
    per = len(picture) // 2
    return picture[pick * per:(pick + 1) * per]


# -- the core checks on every architecture --------------------------------------------------------------------------
def test_the_checkpoint_is_not_degenerate(server, arch):
    _, euler = generate(server, workflow, arch=arch, sampler="euler")
    _, dpm = generate(server, workflow, arch=arch, sampler="dpmpp_2m")
    assert not np.array_equal(euler, dpm)
    assert len(euler) == (FRAMES if arch == "wan" else 1)


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde"])
def test_mode_off_is_pixel_identical(server, arch, sampler):
    _, plain = generate(server, workflow, arch=arch, sampler=sampler)
    entry, off = generate(server, workflow, arch=arch, sampler=sampler, widgets={**NODE_DEFAULTS, "mode": "off"})
    assert np.array_equal(plain, off)
    rows = 1 if MODELS[arch]["cfg"] == 1.0 else 2
    assert nfe(report(entry)) == (rows * STEPS, rows * STEPS)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_the_default_mode_saves_what_the_level_promises_and_stays_close(server, arch, sampler):
    spec = MODELS[arch]
    full_entry, full = generate(server, workflow, arch=arch, sampler=sampler)
    entry, adapted = generate(server, workflow, arch=arch, sampler=sampler, widgets=NODE_DEFAULTS)
    _, other_seed = generate(server, workflow, arch=arch, sampler=sampler, seed=2)
    text = report(entry)
    used, total = nfe(text)
    rows = 1 if spec["cfg"] == 1.0 else 2  # cfg 1: one network row per step
    stochastic = "stochastic" in text.split(", ")
    assert stochastic == (sampler != "dpmpp_2m") and (", flow model, " in text) == spec["flow"], text
    assert total == rows * STEPS and used <= promised_nfe(sampler, stochastic, STEPS, rows) and \
        "adaptation stopped" not in text, text
    close, unrelated = psnr(adapted, full), psnr(other_seed, full)
    RESULTS.setdefault(arch, {})[sampler] = {
        "nfe": f"{used}/{total}", "psnr_vs_full_cfg_db": round(close, 2), "psnr_other_seed_db": round(unrelated, 2),
        "decisions": decisions(text), "seconds_full": seconds(full_entry), "seconds_adaptive": seconds(entry)}
    assert close > unrelated + 10, RESULTS[arch][sampler]
    assert text in server["log"].read_text()


def test_the_listed_adaptive_sampler_equals_the_node(server, arch):
    _, node = generate(server, workflow, arch=arch, sampler="dpmpp_2m_sde", widgets=NODE_DEFAULTS)
    _, listed = generate(server, workflow, arch=arch, sampler="dpmpp_2m_sde_adaptive")
    assert np.array_equal(node, listed)


# -- what must pass through untouched ---------------------------------------------------------------------------------
def test_flux_guidance_reaches_the_model_on_one_row_per_step(server):
    """Flux dev's guidance embedding (FluxGuidance) is conditioning the node leaves alone: at cfg 1 a computed step
    is ComfyUI's own single-row call, with the guidance, and the run counts one row per step."""
    if not all(f.exists() for f in files("flux")):
        pytest.skip("no Flux checkpoint")
    entries = {}
    for guidance in (FLUX_GUIDANCE, 1.5):
        entries[guidance] = generate(server, workflow, arch="flux", sampler="dpmpp_2m", widgets=NODE_DEFAULTS,
                                     guidance=guidance)
        used, total = nfe(report(entries[guidance][0]))
        assert total == STEPS and used <= promised_nfe("dpmpp_2m", False, STEPS, rows=1)
    assert not np.array_equal(entries[FLUX_GUIDANCE][1], entries[1.5][1])


def test_sdxl_size_conditioning_reaches_the_model(server):
    """SDXL's extra conditioning (pooled CLIP-G text and the size embeddings of CLIPTextEncodeSDXL) is ComfyUI's own
    on every computed step: another target size gives another adapted picture, and mode off is pixel-identical
    (above)."""
    if not all(f.exists() for f in files("sdxl")):
        pytest.skip("no SDXL checkpoint")
    _, small = generate(server, workflow, arch="sdxl", sampler="dpmpp_2m", widgets=NODE_DEFAULTS)
    _, large = generate(server, workflow, arch="sdxl", sampler="dpmpp_2m", widgets=NODE_DEFAULTS, size=1024)
    assert not np.array_equal(small, large)


# -- video latents ------------------------------------------------------------------------------------------------
def test_a_batch_of_two_videos_equals_two_single_videos(server):
    """A batch of two Wan videos (5-D latent) is two samples, each forecast on its own: each video equals itself
    sampled alone (LatentFromBatch, same seed), with the same decisions. (A deterministic sampler: ComfyUI's
    ancestral noise for a batch is not each video's noise alone, so only the stand-in suite, which can give each
    video its own noise, checks the per-video x0 forecast of the stochastic samplers this way.)"""
    if not all(f.exists() for f in files("wan")):
        pytest.skip("no Wan checkpoint")
    run = dict(arch="wan", sampler="dpmpp_2m", widgets=NODE_DEFAULTS, batch=2)
    entry, both = generate(server, workflow, **run, prefix="batch")
    assert len(both) == 2 * FRAMES and ", batch 2, " in report(entry)
    for i in range(2):
        single_entry, single = generate(server, workflow, **run, pick=i, prefix="single")
        assert decisions(report(single_entry)) == decisions(report(entry))
        if not np.array_equal(single, frames(both, i)):  # only ComfyUI's own batch arithmetic may differ
            _, plain_both = generate(server, workflow, **{**run, "widgets": None}, prefix="batch")
            _, plain_single = generate(server, workflow, **{**run, "widgets": None}, pick=i, prefix="single")
            assert np.abs(single.astype(int) - frames(both, i)).max() <= \
                np.abs(plain_single.astype(int) - frames(plain_both, i)).max()


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m"])
def test_a_model_switch_between_passes_starts_a_fresh_run(server, sampler):
    """Wan 2.2's two experts: each KSamplerAdvanced pass is a run of its own (15 of 30 steps each: passes of at least
    the node's default min_steps, 12, are adapted). The low-noise pass computes its first step and decides the same
    whether the high-noise pass was adapted or not: nothing of the first model's run carries over. Mode off is
    pixel-identical and the adapted video stays close to the full-CFG one."""
    if not all(f.exists() for f in files("wan")):
        pytest.skip("no Wan checkpoint")
    widgets, steps = NODE_DEFAULTS, EXPERT_STEPS
    _, plain = generate(server, two_experts, sampler=sampler, steps=steps)
    off_entry, off = generate(server, two_experts, sampler=sampler, steps=steps, widgets={**widgets, "mode": "off"})
    assert np.array_equal(plain, off)
    entry, adapted = generate(server, two_experts, sampler=sampler, steps=steps, widgets=widgets)
    high_off_entry, _ = generate(server, two_experts, sampler=sampler, steps=steps, widgets=widgets,
                                 high_widgets={**widgets, "mode": "off"})
    _, other_seed = generate(server, two_experts, sampler=sampler, steps=steps, seed=2)
    half = steps // 2
    for name in ("_high", "_low"):
        text = report(entry, "report" + name)
        used, total = nfe(text)
        stochastic = "stochastic" in text.split(", ")
        assert f": {half} steps, " in text and ", flow model, " in text and "adaptation stopped" not in text, text
        assert total == 2 * half and used <= promised_nfe(sampler, stochastic, half) and \
            decisions(text).startswith("F"), text  # a fresh run computes its first step: no forecast from before
    assert decisions(report(high_off_entry, "report_low")) == decisions(report(entry, "report_low"))
    assert nfe(report(high_off_entry, "report_high")) == (2 * half, 2 * half)
    close, unrelated = psnr(adapted, plain), psnr(other_seed, plain)
    RESULTS.setdefault("wan two experts", {})[sampler] = {
        "decisions": [decisions(report(entry, "report" + n)) for n in ("_high", "_low")],
        "psnr_vs_full_cfg_db": round(close, 2), "psnr_other_seed_db": round(unrelated, 2)}
    assert close > unrelated + 10, RESULTS["wan two experts"][sampler]


# -- the documented workflows ---------------------------------------------------------------------------------------
WORKFLOWS = sorted((HERE.parents[1] / "docs" / "comfyui").glob("*_api.json"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_the_documented_workflows_match_comfyuis_nodes(server, path):
    """Every node of docs/comfyui/*_api.json exists in this ComfyUI with the inputs the file gives it: all required
    ones, no unknown ones, and choices from ComfyUI's own lists (model file names excepted: they are the user's)."""
    info = object_info(server)
    for key, node in json.loads(path.read_text()).items():
        assert node["class_type"] in info, (key, node["class_type"])
        declared = info[node["class_type"]]["input"]
        required, optional = declared.get("required", {}), declared.get("optional", {})
        given = node["inputs"]
        assert set(required) <= set(given) and set(given) <= set(required) | set(optional), (key, sorted(given))
        for name, value in given.items():
            spec = {**required, **optional}[name]
            choices = spec[0] if isinstance(spec[0], list) else spec[1].get("options") if spec[0] == "COMBO" else None
            if choices is not None and not str(value).endswith(".safetensors"):
                assert value in choices, (key, name, value)
