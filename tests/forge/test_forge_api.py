"""Integration suite against a real Forge Neo (Haoming02/sd-webui-forge-classic, branch ``neo``), through its HTTP
API: what tests/webui checks on A1111, plus our default against Forge Neo's built-in Spectrum Integrated, and a flow
model through Forge Neo's own flow backend.

Runs only when ``FORGE_DIR`` points at a Forge Neo checkout. It runs on two tiny random-weight checkpoints in
``models/Stable-diffusion``, built with Forge Neo's own interpreter and backend classes by
``tests/hosts/build_models.py`` when they are missing: ``random-sd15.safetensors`` (SD 1.5, every output layer
random; ``FORGE_CHECKPOINT`` names another) and, for the flow-model cases, ``random-lumina2.safetensors`` (a tiny
Lumina 2; ``FORGE_FLOW_CHECKPOINT`` names another, empty turns those cases off). With ``HOST_SUITE_BUILD=0`` a
missing one is skipped, naming the command that builds it. The server is started headless on 127.0.0.1 on the CPU
with this repository linked as an extension, ``tests/forge/nfe_counter`` (a test-only extension that counts the rows
of every UNet call, so NFE is measured at the model for our samplers and for Spectrum alike) and
``tests/webui/prompt_list`` (a test-only extension giving each image of a batch its own prompt); ``FORGE_PYTHON``
(default ``$FORGE_DIR/venv/bin/python``) and ``FORGE_ARGS`` (extra flags) adjust how. Slow on a CPU: about 12
seconds per 8-step image.
"""

import base64
import io
import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest

from adaptive_sampler import oracles as O
from adaptive_sampler.hosts.webui_common import AdaptiveSettings
from host_suite import (ADAPTIVE, BATCH_PROMPTS, BUILTIN, PROMPT_LIST, SUITE_PROMPTS, adaptive_args, builder_command,
                        call, decode, ensure_built, fields, free_port, img2img as host_img2img, link_to_this_repository,
                        not_finite, prompt_list, psnr_db, running_server, splitting_setting, xyz_args, xyz_axis)

FORGE_DIR = os.environ.get("FORGE_DIR")
pytestmark = pytest.mark.skipif(not FORGE_DIR, reason="FORGE_DIR is not set: no real Forge Neo to test against")

REPO = Path(__file__).resolve().parents[2]
SPECTRUM = "Spectrum Integrated"
ROWS = "Test UNet rows"
# 8 steps keeps the suite fast; passes that short are adapted only with min_steps below the default 12. Clip skip 1
# (Forge's default is 2): the cases were measured so, after the checkpoint they first ran on gave a NaN conditional
# prediction at clip skip 2 for this prompt; the rebuilt one is checked at both (the first case below).
#: The checkpoints' file names in models/Stable-diffusion: SD 1.5 for most cases, a flow model (a random Lumina 2)
#: for the flow cases ("": those cases are off). The random ones are built when missing (:func:`checkpoints`).
SD_CHECKPOINT = os.environ.get("FORGE_CHECKPOINT", "random-sd15.safetensors")
FLOW_CHECKPOINT = os.environ.get("FORGE_FLOW_CHECKPOINT", "random-lumina2.safetensors")
#: Why the flow cases cannot run (None: they can); set by :func:`checkpoints`.
FLOW_MISSING: dict = {}
# The negative-guidance minimum sigma is pinned to its default (off): Forge keeps an overridden value after the
# request that set it, which would drop unconditional rows in every later case.
SETTINGS = {"adaptive_sampler_min_steps": 1, "CLIP_stop_at_last_layers": 1, "s_min_uncond": 0.0,
            "sd_model_checkpoint": SD_CHECKPOINT}
BASE = dict(prompt="a red apple", negative_prompt="blurry", seed=1234, steps=8, width=64, height=64, cfg_scale=5,
            override_settings=SETTINGS)
HIRES = dict(enable_hr=True, hr_scale=1.5, denoising_strength=0.5, hr_upscaler="Latent",
             hr_additional_modules=["Use same choices"])  # Forge's API fails hires without the last one


def forge_python(root):
    return os.environ.get("FORGE_PYTHON", str(root / "venv" / "bin" / "python"))


def sd15_command(root):
    """The one command that builds the random SD 1.5 (Forge Neo's interpreter and backend classes)."""
    return builder_command(forge_python(root), "sd15", "--forge-dir", root, "--out",
                           root / "models" / "Stable-diffusion" / SD_CHECKPOINT)


def checkpoints(root):
    """Build the random checkpoints the suite runs on when they are missing (before the server starts: Forge lists
    its checkpoints at start); skip the suite without the SD 1.5 one, the flow cases without the flow one."""
    models = root / "models" / "Stable-diffusion"
    if "FORGE_CHECKPOINT" in os.environ:
        if not (models / SD_CHECKPOINT).exists():
            pytest.skip(f"FORGE_CHECKPOINT: {models / SD_CHECKPOINT} not found")
    else:
        reason = ensure_built([models / SD_CHECKPOINT], sd15_command(root),
                              REPO / "tests" / "forge" / "forge_build.log")
        if reason:
            pytest.skip(reason)
    if not FLOW_CHECKPOINT:
        FLOW_MISSING["reason"] = "FORGE_FLOW_CHECKPOINT is empty: the flow cases are off"
    elif "FORGE_FLOW_CHECKPOINT" in os.environ and not (models / FLOW_CHECKPOINT).exists():
        FLOW_MISSING["reason"] = f"FORGE_FLOW_CHECKPOINT: {models / FLOW_CHECKPOINT} not found"
    elif "FORGE_FLOW_CHECKPOINT" not in os.environ:
        FLOW_MISSING["reason"] = ensure_built([models / FLOW_CHECKPOINT], builder_command(
            forge_python(root), "forge-lumina2", "--forge-dir", root, "--out", models / FLOW_CHECKPOINT),
            REPO / "tests" / "forge" / "forge_build_lumina2.log")


@pytest.fixture(scope="module")
def server():
    root = Path(FORGE_DIR)
    checkpoints(root)
    (root / "extensions").mkdir(exist_ok=True)
    link_to_this_repository(root / "extensions" / "adaptive-sampler")
    link_to_this_repository(root / "extensions" / "adaptive-sampler-test-unet-rows",
                            REPO / "tests" / "forge" / "nfe_counter")
    link_to_this_repository(root / "extensions" / "adaptive-sampler-test-prompt-list", PROMPT_LIST)
    python = forge_python(root)
    port = free_port()
    args = ["--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--skip-python-version-check",
            "--skip-version-check", "--cpu", "--server-name", "127.0.0.1", "--port", str(port), "--api", "--nowebui"]
    args += shlex.split(os.environ.get("FORGE_ARGS", ""))
    url = f"http://127.0.0.1:{port}"
    with running_server("Forge", [python, "launch.py", *args], root, REPO / "tests" / "forge" / "forge_server.log",
                        url + "/sdapi/v1/samplers", env={**os.environ, "HF_HUB_OFFLINE": "1"}):
        yield url


def txt2img(url, **kw):
    payload = {**BASE, **kw, "override_settings": {**SETTINGS, **kw.get("override_settings", {})}}
    body = call(url, "/sdapi/v1/txt2img", payload)
    info = json.loads(body["info"])
    return [decode(b) for b in body["images"]], info["infotexts"]


def img2img(url, **kw):
    return host_img2img(url, BASE, **kw)


def nfe(f):
    used, full = map(int, f["Adaptive NFE"].split("/"))
    return used, full


def record(key, row):
    report = REPO / "tests" / "forge" / "forge_results.json"
    rows = json.loads(report.read_text()) if report.exists() else {}
    rows[key] = row
    report.write_text(json.dumps(rows, indent=1) + "\n")


def test_samplers_are_listed(server):
    names = [s["name"] for s in call(server, "/sdapi/v1/samplers")]
    for name in ADAPTIVE:
        assert name in names


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_the_checkpoint_gives_a_picture_for_every_prompt_the_suite_sends(server, clip_skip):
    """Random weights can overflow for some prompts and not others (a rebuilt checkpoint once gave NaN for
    ``a red [cat:dog:0.5]`` under plain Euler at 12 steps, and the first one NaN at clip skip 2 for ``a red apple``:
    the weights, not this extension). Plain Forge Euler, full CFG, 12 steps, on every prompt the suite sends (one
    batch, each image its own prompt), at the suite's clip skip and Forge's default: each picture must be a picture,
    not the black of a NaN latent, so that no case below depends on one lucky prompt."""
    images, infotexts = txt2img(server, sampler_name="Euler", steps=12, batch_size=len(SUITE_PROMPTS),
                                override_settings={"CLIP_stop_at_last_layers": clip_skip},
                                alwayson_scripts=prompt_list(SUITE_PROMPTS))
    assert [t.split("\n")[0] for t in infotexts] == SUITE_PROMPTS
    bad = not_finite(images, SUITE_PROMPTS)
    assert not bad, (f"{SD_CHECKPOINT} gives NaN (a black picture) at clip skip {clip_skip} for {bad}: rebuild it "
                     f"with {' '.join(sd15_command(Path(FORGE_DIR)))} --force")


def test_the_checkpoint_is_not_degenerate(server):
    """A freshly built LDM has zero-initialised output layers: every sampler would return the same image and the
    pixel-identity checks below would prove nothing."""
    euler, _ = txt2img(server, sampler_name="Euler")
    dpm, _ = txt2img(server, sampler_name="DPM++ 2M")
    assert not np.array_equal(euler[0], dpm[0])


@pytest.mark.parametrize("name", ADAPTIVE)
def test_each_adaptive_sampler_saves_the_nfe_the_unet_really_ran(server, name):
    images, infotexts = txt2img(server, sampler_name=name)
    f = fields(infotexts[0])
    assert f["Sampler"] == name  # Forge silently corrects unknown names: check what ran
    used, full = nfe(f)
    assert used < full and f["Adaptive mode"] == "forecast"
    assert int(f[ROWS]) == used  # batch 1: rows counted at the UNet = NFE per image
    assert images[0].shape == (64, 64, 3)


@pytest.mark.parametrize("name", ADAPTIVE)
def test_disabled_adaptation_is_pixel_identical_to_the_builtin(server, name):
    ours, info_ours = txt2img(server, sampler_name=name, alwayson_scripts=adaptive_args(mode="ag", ag_threshold=1.0))
    theirs, info_theirs = txt2img(server, sampler_name=BUILTIN[name])
    assert fields(info_theirs[0])["Sampler"] == BUILTIN[name]
    used, full = nfe(fields(info_ours[0]))
    assert used == full == int(fields(info_theirs[0])[ROWS])
    assert np.array_equal(ours[0], theirs[0])


@pytest.mark.parametrize("name", ADAPTIVE)
def test_default_mode_against_the_builtin_sampler_psnr_reported(server, name):
    """What a user of each * Adaptive sampler gets by default at 12 steps: NFE and PSNR against the built-in sampler,
    same seed (written to tests/forge/forge_results.json). Random weights show plumbing, not fidelity: the floor is
    only "not noise"; fidelity is judged on the embedded model (bench-samplers)."""
    ours, info_ours = txt2img(server, sampler_name=name, steps=12)
    theirs, _ = txt2img(server, sampler_name=BUILTIN[name], steps=12)
    used, full = nfe(fields(info_ours[0]))
    quality = psnr_db(ours[0], theirs[0])
    record(f"{name}, 12 steps", {"nfe": f"{used}/{full}", "psnr_db": round(quality, 2)})
    print(f"{name} (12 steps): NFE {used}/{full}, PSNR {quality:.1f} dB against {BUILTIN[name]}")
    assert used < full and quality > 10.0


@pytest.mark.parametrize("name", ["Euler Adaptive", "DPM++ 2M Adaptive"])
def test_our_default_against_spectrum_integrated_on_the_same_request(server, name):
    """Forge Neo's built-in step skipper with its defaults against our default, 20 steps, and our default's Forecast
    at Spectrum's NFE: NFE counted at the UNet and PSNR against the built-in sampler (reported and written to
    tests/forge/forge_results.json)."""
    builtin, info_b = txt2img(server, sampler_name=BUILTIN[name], steps=20)
    ours, info_o = txt2img(server, sampler_name=name, steps=20)
    spectrum, info_s = txt2img(server, sampler_name=BUILTIN[name], steps=20,
                               alwayson_scripts={SPECTRUM: {"args": [True]}})
    fb, fo, fs = fields(info_b[0]), fields(info_o[0]), fields(info_s[0])
    assert "spec_w" in fs and "Adaptive mode" not in fs  # Spectrum ran, and only Spectrum
    full, rows_ours, rows_spectrum = int(fb[ROWS]), int(fo[ROWS]), int(fs[ROWS])
    assert full == 40 and rows_ours == nfe(fo)[0] and rows_ours < full and rows_spectrum < full
    budget = rows_spectrum / full  # our default at Spectrum's NFE too: the comparison at equal cost
    matched, info_m = txt2img(server, sampler_name=name, steps=20,
                              override_settings={"adaptive_sampler_budget": budget})
    rows_matched = int(fields(info_m[0])[ROWS])
    assert rows_matched == rows_spectrum
    row = {"builtin_nfe": full, "ours_nfe": rows_ours, "spectrum_nfe": rows_spectrum,
           "ours_psnr_db": round(psnr_db(ours[0], builtin[0]), 2),
           "spectrum_psnr_db": round(psnr_db(spectrum[0], builtin[0]), 2),
           "ours_at_spectrum_nfe_psnr_db": round(psnr_db(matched[0], builtin[0]), 2)}
    record(f"{BUILTIN[name]}, 20 steps: default vs Spectrum", row)
    print(f"{BUILTIN[name]} 20 steps: ours NFE {rows_ours}/{full}, PSNR {row['ours_psnr_db']} dB; "
          f"Spectrum NFE {rows_spectrum}/{full}, PSNR {row['spectrum_psnr_db']} dB; ours at Spectrum's NFE "
          f"{row['ours_at_spectrum_nfe_psnr_db']} dB (against the built-in sampler)")
    assert row["ours_psnr_db"] > 10.0 and row["spectrum_psnr_db"] > 10.0


def test_enabling_spectrum_too_is_refused_with_a_clear_message(server):
    for extra in (dict(sampler_name="Euler Adaptive", alwayson_scripts={SPECTRUM: {"args": [True]}}),
                  dict(sampler_name="Euler", alwayson_scripts={**adaptive_args(), SPECTRUM: {"args": [True]}})):
        code, text = call(server, "/sdapi/v1/txt2img", {**BASE, **extra}, expect_error=True)
        assert code >= 400 and "Spectrum Integrated is enabled too" in text and "one of the two" in text


def test_override_settings_change_the_recorded_parameters(server):
    _, infotexts = txt2img(server, sampler_name="Euler Adaptive",
                           override_settings={"adaptive_sampler_mode": "ag", "adaptive_sampler_ag_threshold": 0.97})
    f = fields(infotexts[0])
    assert f["Adaptive mode"] == "ag" and float(f["Adaptive AG threshold"]) == 0.97


def test_alwayson_scripts_change_the_recorded_parameters_and_forge_parses_them_back(server):
    """Forge Neo's own infotext parser (PNG info, "Read generation parameters") gives back the settings. (Its API's
    ``infotext`` request field fails on every infotext at the tested commit, ours or not: ``isinstance() argument 2
    cannot be a parameterized generic``; so the suite reads the parameters through /sdapi/v1/png-info.)"""
    from PIL import Image, PngImagePlugin
    sent = dict(mode="ag+adaptive-diffusion", ad_threshold=0.05, max_skips=2)
    _, infotexts = txt2img(server, sampler_name="DPM++ 2M Adaptive", alwayson_scripts=adaptive_args(**sent))
    f = fields(infotexts[0])
    assert f["Adaptive mode"] == "ag+adaptive-diffusion" and float(f["Adaptive skip threshold"]) == 0.05
    assert int(f["Adaptive max skips"]) == 2
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", infotexts[0])
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG", pnginfo=meta)
    parsed = call(server, "/sdapi/v1/png-info", {"image": base64.b64encode(buf.getvalue()).decode()})["parameters"]
    assert AdaptiveSettings.from_infotext(parsed) == AdaptiveSettings(**sent, min_steps=1)


@pytest.mark.parametrize("mode,threshold", [("ag", 0.5), ("linear-ag", 0.9999)])
def test_the_accordion_adapts_a_builtin_sampler(server, mode, threshold):
    _, infotexts = txt2img(server, sampler_name="Euler", alwayson_scripts=adaptive_args(mode=mode,
                                                                                        ag_threshold=threshold))
    f = fields(infotexts[0])
    used, full = nfe(f)
    assert f["Sampler"] == "Euler" and used < full and int(f[ROWS]) == used


@pytest.mark.parametrize("extra", [
    dict(HIRES, hr_second_pass_steps=4, hr_sampler_name="Euler Adaptive"),
    dict(batch_size=2),
    dict(prompt="[a red apple:a green pear:0.5] AND a table"),
])
def test_hires_batch_prompt_editing_and_and_prompts_run(server, extra):
    images, infotexts = txt2img(server, sampler_name="DPM++ 2M Adaptive", **extra)
    assert len(images) >= extra.get("batch_size", 1)
    used, full = nfe(fields(infotexts[0]))
    assert 0 < used < full


def test_the_hires_pass_uses_its_own_cfg(server):
    """Hires CFG 1: the second pass has no unconditional prediction (1 row per step), the first pass has two."""
    _, infotexts = txt2img(server, sampler_name="Euler Adaptive", **HIRES, hr_second_pass_steps=4, hr_cfg=1.0,
                           hr_sampler_name="Euler Adaptive")
    f = fields(infotexts[0])
    assert nfe(f)[1] == 2 * 8 + 4 and int(f[ROWS]) == nfe(f)[0]


def test_img2img_runs_from_a_mid_way_schedule(server):
    f = img2img(server, denoising_strength=0.6)
    assert f["Sampler"] == "Euler Adaptive" and int(f[ROWS]) == nfe(f)[0] < nfe(f)[1]


@pytest.mark.parametrize("sampler", ["Euler Adaptive", "Euler", "Heun"])
def test_a_bad_parameter_is_an_http_error_with_a_clear_message(server, sampler):
    code, text = call(server, "/sdapi/v1/txt2img",
                      {**BASE, "sampler_name": sampler, "alwayson_scripts": adaptive_args(max_skips=0)},
                      expect_error=True)
    assert code >= 400 and "max_skips must be an integer >= 1" in text


def test_a_short_img2img_pass_below_min_steps_runs_full_cfg_and_says_so(server):
    f = img2img(server, denoising_strength=0.3, alwayson_scripts=adaptive_args(min_steps=12))
    used, full = nfe(f)
    assert used == full and "below min steps (12)" in f["Adaptive notes"]


def test_cfg_1_skips_steps_but_has_no_guidance_to_adapt(server):
    """CFG 1 (as distilled-CFG models): no unconditional pass. Forecast still skips steps at 1 row each; a guidance
    mode runs unchanged and says so in the infotext."""
    _, infotexts = txt2img(server, sampler_name="Euler Adaptive", cfg_scale=1)
    f = fields(infotexts[0])
    default = AdaptiveSettings(min_steps=1).build_oracle(8)  # the default's plan for an 8-step unguided Euler run
    default.reset(O.RunInfo(sampler="euler", sigmas=(), batch_size=1, steps=8, guided=False))
    computed = len(default.plan)
    assert nfe(f) == (computed, 8) and int(f[ROWS]) == computed < 8
    _, infotexts = txt2img(server, sampler_name="Euler Adaptive", cfg_scale=1, alwayson_scripts=adaptive_args(mode="ag"))
    f = fields(infotexts[0])
    assert nfe(f) == (8, 8) and "no unconditional prediction" in f["Adaptive notes"]


def test_negative_guidance_minimum_sigma_is_forges_own_with_adaptation_disabled(server):
    """Forge drops the unconditional rows itself on odd low-noise steps; the adaptive sampler must follow."""
    ngms = {"s_min_uncond": 100.0}
    ours, info_ours = txt2img(server, sampler_name="Euler Adaptive", override_settings=ngms,
                              alwayson_scripts=adaptive_args(mode="ag", ag_threshold=1.0))
    theirs, info_theirs = txt2img(server, sampler_name="Euler", override_settings=ngms)
    assert np.array_equal(ours[0], theirs[0])
    f = fields(info_ours[0])
    assert nfe(f)[0] == int(f[ROWS]) == int(fields(info_theirs[0])[ROWS]) < nfe(f)[1]


# -- per-image decisions (issue 21) and the X/Y/Z plot axes ------------------------------------------------------
@pytest.mark.parametrize("mode", ["ag", "adaptive-diffusion"], ids=["ag", "ad"])
def test_an_image_is_the_same_alone_and_in_a_batch_of_four_with_other_prompts(server, mode):
    """AG and AdaptiveDiffusion decide per image: image k of a batch of four prompts (seed + k, as Forge seeds a
    batch) spends the NFE it spends alone and gives its picture (up to the UNet's own batch-size rounding); the UNet
    ran exactly the rows the images' infotexts add up to. The batch's images must decide differently for
    this to mean anything: the first threshold of ``SPLITTING`` that makes them do so on the random checkpoint is
    used (AG 0.995 and AdaptiveDiffusion 0.15 first)."""
    seed = 1000

    def batch(setting):
        scripts = {**adaptive_args(mode=mode, **setting), **prompt_list(BATCH_PROMPTS)}
        images, infotexts = txt2img(server, sampler_name="Euler Adaptive", steps=12, seed=seed, batch_size=4,
                                    alwayson_scripts=scripts)
        assert [t.split("\n")[0] for t in infotexts] == BATCH_PROMPTS
        return images, infotexts, [nfe(fields(t)) for t in infotexts]

    setting, (images, infotexts, spent) = splitting_setting(batch, mode)
    args = adaptive_args(mode=mode, **setting)
    print(f"{mode}: {setting} splits the batch: {spent}")
    assert int(fields(infotexts[0])[ROWS]) == sum(used for used, _ in spent)
    for k in (1, 3):
        alone, info = txt2img(server, prompt=BATCH_PROMPTS[k], sampler_name="Euler Adaptive", steps=12, seed=seed + k,
                              alwayson_scripts=args)
        quality = psnr_db(alone[0], images[k])
        record(f"{mode}: image {k} alone vs in a batch of 4", {"nfe_alone": "%d/%d" % nfe(fields(info[0])),
                                                                 "nfe_in_batch": "%d/%d" % spent[k],
                                                                 "psnr_db": round(min(quality, 99.0), 2)})
        print(f"{mode}: image {k} alone NFE {nfe(fields(info[0]))}, in the batch {spent[k]}, PSNR {quality:.1f} dB")
        assert nfe(fields(info[0])) == spent[k] and quality > 40.0


def test_the_xyz_plot_axes_set_the_mode_and_the_level(server):
    """X/Y/Z plot: "[Adaptive] Mode" x "[Adaptive] Level"; each cell's infotext records its mode and level, and the
    default mode spends more at level quality than at fast (counted at the UNet too)."""
    args = xyz_args(xyz_axis(server, "[Adaptive] Mode"), ["forecast", "ag"], xyz_axis(server, "[Adaptive] Level"),
                    ["quality", "fast"], forge=True)
    body = call(server, "/sdapi/v1/txt2img", {**BASE, "steps": 12, "sampler_name": "Euler Adaptive",
                                               "script_name": "x/y/z plot", "script_args": args})
    cells = [fields(t) for t in json.loads(body["info"])["infotexts"][1:]]  # [0]: the grid
    assert len(cells) == 4 and sorted(f["Adaptive mode"] for f in cells) == ["ag", "ag", "forecast", "forecast"]
    forecast = {f["Adaptive level"]: nfe(f) for f in cells if f["Adaptive mode"] == "forecast"}
    assert forecast["quality"][0] > forecast["fast"][0] and forecast["fast"][1] == 24


# -- flow models (issue 21): Forge Neo's own flow backend ---------------------------------------------------------
@pytest.fixture
def flow(server):
    if FLOW_MISSING.get("reason"):
        pytest.skip(FLOW_MISSING["reason"])


flow_model = pytest.mark.usefixtures("flow")
#: The Simple schedule, as flow models are run in Forge Neo: the Automatic one (the model's own sigmas) of the random
#: Lumina 2 starts above sigma 1 (at 1.399), where Forge's own Euler a and DPM++ 2M SDE give NaN.
FLOW = dict(steps=12, cfg_scale=4, scheduler="simple", override_settings={"sd_model_checkpoint": FLOW_CHECKPOINT})


def flow_txt2img(url, **kw):
    """A request on the flow checkpoint; Forge silently keeps the loaded model for an unknown checkpoint name, so
    the infotext's model is checked."""
    images, infotexts = txt2img(url, **{**FLOW, **kw})
    assert fields(infotexts[0])["Model"] == Path(FLOW_CHECKPOINT).stem
    return images, infotexts


@flow_model
@pytest.mark.parametrize("cfg", [4, 1])
def test_a_flow_model_runs_the_default_with_cfg_and_at_cfg_1(server, cfg):
    """The default mode on a flow model, guided (two rows per step) and at CFG 1 (one row per step: an unguided run),
    saves NFE counted at the UNet; PSNR against the built-in sampler is reported."""
    ours, info_ours = flow_txt2img(server, sampler_name="Euler Adaptive", cfg_scale=cfg)
    theirs, info_theirs = flow_txt2img(server, sampler_name="Euler", cfg_scale=cfg)
    f = fields(info_ours[0])
    used, full = nfe(f)
    assert full == 12 * (2 if cfg != 1 else 1) == int(fields(info_theirs[0])[ROWS])
    assert int(f[ROWS]) == used < full and "Adaptive notes" not in f
    quality = psnr_db(ours[0], theirs[0])
    record(f"flow ({Path(FLOW_CHECKPOINT).stem}), Euler Adaptive, 12 steps, CFG {cfg}",
           {"nfe": f"{used}/{full}", "psnr_db": round(quality, 2)})
    print(f"flow, CFG {cfg}: NFE {used}/{full}, PSNR {quality:.1f} dB against Euler")
    assert quality > 10.0


@flow_model
def test_a_flow_model_with_adaptation_disabled_is_pixel_identical(server):
    ours, info_ours = flow_txt2img(server, sampler_name="Euler Adaptive",
                                   alwayson_scripts=adaptive_args(mode="ag", ag_threshold=1.0))
    theirs, _ = flow_txt2img(server, sampler_name="Euler")
    assert nfe(fields(info_ours[0])) == (24, 24) and np.array_equal(ours[0], theirs[0])


@flow_model
@pytest.mark.parametrize("name", ["Euler a Adaptive", "DPM++ 2M SDE Adaptive", "DPM++ 2M Adaptive"])
def test_a_flow_model_on_forges_flow_samplers(server, name):
    """Forge's flow variants (Euler a's rectified-flow step; DPM++ 2M SDE in half-log-SNR from an offset first sigma)
    are followed step by step: adapted to the end (no note of a stop), NFE counted at the UNet."""
    ours, info_ours = flow_txt2img(server, sampler_name=name)
    theirs, _ = flow_txt2img(server, sampler_name=BUILTIN[name])
    f = fields(info_ours[0])
    used, full = nfe(f)
    assert int(f[ROWS]) == used < full == 24 and "adaptation stopped" not in f.get("Adaptive notes", "")
    assert theirs[0].max() > 0 and ours[0].max() > 0  # not a NaN (black) picture
    quality = psnr_db(ours[0], theirs[0])
    record(f"flow ({Path(FLOW_CHECKPOINT).stem}), {name}, 12 steps, CFG 4",
           {"nfe": f"{used}/{full}", "psnr_db": round(quality, 2)})
    print(f"flow, {name}: NFE {used}/{full}, PSNR {quality:.1f} dB against {BUILTIN[name]}")


@flow_model
def test_a_nan_prediction_is_a_clear_error_where_forge_returns_a_black_picture(server):
    """Euler a on the Automatic schedule, which starts the random Lumina 2 above sigma 1 (above): Forge's own
    rectified-flow step turns that into a NaN prediction at the second step and returns a black picture; Euler a
    Adaptive refuses the run with an HTTP error naming the step instead."""
    automatic = {**FLOW, "scheduler": "automatic"}
    theirs, _ = flow_txt2img(server, **{**automatic, "sampler_name": "Euler a"})
    assert theirs[0].max() == 0
    status, body = call(server, "/sdapi/v1/txt2img", {**BASE, **automatic, "sampler_name": "Euler a Adaptive",
                                                       "override_settings": {**SETTINGS, **FLOW["override_settings"]}},
                        expect_error=True)
    assert status == 500 and "the prediction at step 1 is NaN/inf" in body


@flow_model
def test_a_flow_model_at_cfg_1_has_no_guidance_to_adapt(server):
    _, infotexts = flow_txt2img(server, sampler_name="Euler Adaptive", cfg_scale=1,
                                alwayson_scripts=adaptive_args(mode="ag"))
    f = fields(infotexts[0])
    assert nfe(f) == (12, 12) and "no unconditional prediction" in f["Adaptive notes"]
