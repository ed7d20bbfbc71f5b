"""Integration suite against a real Forge Neo (Haoming02/sd-webui-forge-classic, branch ``neo``), through its HTTP
API: what tests/webui checks on A1111, plus our default against Forge Neo's built-in Spectrum Integrated.

Runs only when ``FORGE_DIR`` points at a Forge Neo checkout with a checkpoint in ``models/Stable-diffusion`` (the
random-weight SD-1.5 checkpoint of the A1111 suite is enough). The server is started headless on 127.0.0.1 on the
CPU with this repository linked as an extension, and ``tests/forge/nfe_counter`` (a test-only extension that counts
the rows of every UNet call, so NFE is measured at the model for our samplers and for Spectrum alike);
``FORGE_PYTHON`` (default ``$FORGE_DIR/venv/bin/python``) and ``FORGE_ARGS`` (extra flags) adjust how. Slow on a
CPU: about 12 seconds per 8-step image.
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
from adaptive_sampler.oracles.forecast import computed_steps
from host_suite import (ADAPTIVE, BUILTIN, adaptive_args, call, decode, fields, free_port, img2img as host_img2img,
                        link_to_this_repository, psnr_db, running_server)

FORGE_DIR = os.environ.get("FORGE_DIR")
pytestmark = pytest.mark.skipif(not FORGE_DIR, reason="FORGE_DIR is not set: no real Forge Neo to test against")

REPO = Path(__file__).resolve().parents[2]
SPECTRUM = "Spectrum Integrated"
ROWS = "Test UNet rows"
# 8 steps keeps the suite fast; passes that short are adapted only with min_steps below the default 12. Forge's
# default clip skip is 2, and on the random checkpoint the penultimate CLIP layer gives a NaN conditional prediction
# for this prompt (the built-in samplers turn it into a NaN image; ours refuse it, naming the step): clip skip 1.
SETTINGS = {"adaptive_sampler_min_steps": 1, "CLIP_stop_at_last_layers": 1}
BASE = dict(prompt="a red apple", negative_prompt="blurry", seed=1234, steps=8, width=64, height=64, cfg_scale=5,
            override_settings=SETTINGS)
HIRES = dict(enable_hr=True, hr_scale=1.5, denoising_strength=0.5, hr_upscaler="Latent",
             hr_additional_modules=["Use same choices"])  # Forge's API fails hires without the last one


@pytest.fixture(scope="module")
def server():
    root = Path(FORGE_DIR)
    if not any((root / "models" / "Stable-diffusion").glob("*.safetensors")):
        pytest.skip("no checkpoint in $FORGE_DIR/models/Stable-diffusion")
    (root / "extensions").mkdir(exist_ok=True)
    link_to_this_repository(root / "extensions" / "adaptive-sampler")
    link_to_this_repository(root / "extensions" / "adaptive-sampler-test-unet-rows",
                            REPO / "tests" / "forge" / "nfe_counter")
    python = os.environ.get("FORGE_PYTHON", str(root / "venv" / "bin" / "python"))
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
    computed = len(computed_steps(8, O.LEVELS[O.DEFAULT_LEVEL][0], O.Forecast().warmup))  # the default's plan
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
