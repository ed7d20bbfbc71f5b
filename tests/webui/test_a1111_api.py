"""Integration suite against a real AUTOMATIC1111 install (v1.10.1), through its HTTP API.

Runs only when ``A1111_DIR`` points at a WebUI checkout. It runs on two tiny random-weight checkpoints in
``models/Stable-diffusion``, built with A1111's own interpreter and classes by ``tests/hosts/build_models.py`` when
they are missing: ``random-sd15.safetensors`` (SD 1.5, every output layer random; ``A1111_CHECKPOINT`` names another)
and, for the flow-model cases, ``random-sd3.safetensors`` (SD3 with its CLIP-L and CLIP-G; T5 stays off, A1111's
default; ``A1111_FLOW_CHECKPOINT`` names another, empty turns those cases off). With ``HOST_SUITE_BUILD=0`` a missing
one is skipped, naming the command that builds it. The server is started headless on 127.0.0.1 with this
repository linked as an extension, and ``tests/webui/prompt_list`` (a test-only extension giving each image of a
batch its own prompt); ``A1111_PYTHON`` (default ``$A1111_DIR/venv/bin/python``) and ``A1111_ARGS`` (extra
command-line flags) adjust how. Slow on a CPU: tens of seconds per request.
"""

import base64
import io
import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest

from host_suite import (ADAPTIVE, BATCH_PROMPTS, BUILTIN, PROMPT_LIST, SUITE_PROMPTS, adaptive_args, builder_command,
                        call, decode, ensure_built, fields, free_port, img2img as host_img2img, link_to_this_repository,
                        not_finite, prompt_list, psnr_db, running_server, splitting_setting, xyz_args, xyz_axis)

A1111_DIR = os.environ.get("A1111_DIR")
pytestmark = pytest.mark.skipif(not A1111_DIR, reason="A1111_DIR is not set: no real A1111 to test against")

REPO = Path(__file__).resolve().parents[2]
#: The checkpoints' file names in models/Stable-diffusion: SD 1.5 for most cases, SD3 (A1111's flow family) for the
#: flow cases ("": those cases are off). The random ones are built when missing (:func:`checkpoints`).
SD_CHECKPOINT = os.environ.get("A1111_CHECKPOINT", "random-sd15.safetensors")
FLOW_CHECKPOINT = os.environ.get("A1111_FLOW_CHECKPOINT", "random-sd3.safetensors")
#: Why the flow cases cannot run (None: they can); set by :func:`checkpoints`.
FLOW_MISSING: dict = {}
# 8 steps keeps the suite fast; passes that short are adapted only with min_steps below the default 12.
BASE = dict(prompt="a red apple", negative_prompt="blurry", seed=1234, steps=8, width=64, height=64, cfg_scale=5,
            override_settings={"adaptive_sampler_min_steps": 1, "sd_model_checkpoint": SD_CHECKPOINT})


def a1111_python(root):
    return os.environ.get("A1111_PYTHON", str(root / "venv" / "bin" / "python"))


def sd15_command(root):
    """The one command that builds the random SD 1.5 (A1111's interpreter and LDM classes)."""
    return builder_command(a1111_python(root), "sd15", "--a1111-dir", root, "--out",
                           root / "models" / "Stable-diffusion" / SD_CHECKPOINT)


def checkpoints(root):
    """Build the random checkpoints the suite runs on when they are missing (before the server starts: A1111 lists
    its checkpoints at start); skip the suite without the SD 1.5 one, the flow cases without the SD3 one."""
    models = root / "models" / "Stable-diffusion"
    log = REPO / "tests" / "webui" / "a1111_build.log"
    if "A1111_CHECKPOINT" in os.environ:
        if not (models / SD_CHECKPOINT).exists():
            pytest.skip(f"A1111_CHECKPOINT: {models / SD_CHECKPOINT} not found")
    else:
        reason = ensure_built([models / SD_CHECKPOINT], sd15_command(root), log)
        if reason:
            pytest.skip(reason)
    if not FLOW_CHECKPOINT:
        FLOW_MISSING["reason"] = "A1111_FLOW_CHECKPOINT is empty: the flow cases are off"
    elif "A1111_FLOW_CHECKPOINT" in os.environ and not (models / FLOW_CHECKPOINT).exists():
        FLOW_MISSING["reason"] = f"A1111_FLOW_CHECKPOINT: {models / FLOW_CHECKPOINT} not found"
    elif "A1111_FLOW_CHECKPOINT" not in os.environ:
        FLOW_MISSING["reason"] = ensure_built([models / FLOW_CHECKPOINT], builder_command(
            a1111_python(root), "a1111-sd3", "--a1111-dir", root, "--out", models / FLOW_CHECKPOINT),
            REPO / "tests" / "webui" / "a1111_build_sd3.log")


@pytest.fixture(scope="module")
def server():
    root = Path(A1111_DIR)
    checkpoints(root)
    link = root / "extensions" / "adaptive-sampler"
    link.parent.mkdir(exist_ok=True)
    link_to_this_repository(link)
    link_to_this_repository(root / "extensions" / "adaptive-sampler-test-prompt-list", PROMPT_LIST)
    python = a1111_python(root)
    port = free_port()
    args = ["--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--skip-version-check",
            "--use-cpu", "all", "--no-half", "--precision", "full", "--no-download-sd-model",
            "--server-name", "127.0.0.1", "--port", str(port), "--api", "--nowebui"]
    args += shlex.split(os.environ.get("A1111_ARGS", ""))
    url = f"http://127.0.0.1:{port}"
    with running_server("A1111", [python, "launch.py", *args], root, REPO / "tests" / "webui" / "a1111_server.log",
                        url + "/sdapi/v1/samplers"):
        yield url


def txt2img(url, **kw):
    body = call(url, "/sdapi/v1/txt2img", {**BASE, **kw,
                                           "override_settings": {**BASE["override_settings"],
                                                                 **kw.get("override_settings", {})}})
    info = json.loads(body["info"])
    return [decode(b) for b in body["images"]], info["infotexts"]


def test_samplers_are_listed(server):
    names = [s["name"] for s in call(server, "/sdapi/v1/samplers")]
    for name in ADAPTIVE:
        assert name in names


def test_the_checkpoint_gives_a_picture_for_every_prompt_the_suite_sends(server):
    """Random weights can overflow for some prompts and not others (a rebuilt checkpoint once gave NaN for
    ``a red [cat:dog:0.5]`` under plain Euler at 12 steps: the weights, not this extension). Plain A1111 Euler, full
    CFG, 12 steps, on every prompt the suite sends (one batch, each image its own prompt): each picture must be a
    picture, not the black of a NaN latent, so that no case below depends on one lucky prompt."""
    images, infotexts = txt2img(server, sampler_name="Euler", steps=12, batch_size=len(SUITE_PROMPTS),
                                alwayson_scripts=prompt_list(SUITE_PROMPTS))
    assert [t.split("\n")[0] for t in infotexts] == SUITE_PROMPTS
    bad = not_finite(images, SUITE_PROMPTS)
    assert not bad, (f"{SD_CHECKPOINT} gives NaN (a black picture) for {bad}: rebuild it with "
                     f"{' '.join(sd15_command(Path(A1111_DIR)))} --force")


@pytest.mark.parametrize("name", ADAPTIVE)
def test_each_adaptive_sampler_generates_and_saves_nfe(server, name):
    images, infotexts = txt2img(server, sampler_name=name)
    f = fields(infotexts[0])
    assert f["Sampler"] == name  # the API silently falls back on unknown names: check what ran
    used, full = map(int, f["Adaptive NFE"].split("/"))
    assert used < full and f["Adaptive mode"] == "forecast"
    assert images[0].shape == (64, 64, 3)


@pytest.mark.parametrize("scheduler", ["Automatic", "Karras"])
@pytest.mark.parametrize("name", ADAPTIVE)
def test_default_mode_against_the_builtin_sampler_psnr_reported(server, name, scheduler):
    """What a user of each * Adaptive sampler gets by default: NFE and PSNR against the built-in sampler, same seed
    (written to tests/webui/psnr_report.json). Random weights show plumbing, not fidelity: the floor is only "not
    noise"; fidelity is judged on the embedded model (bench-samplers)."""
    ours, info_ours = txt2img(server, sampler_name=name, scheduler=scheduler, steps=12)
    theirs, _ = txt2img(server, sampler_name=BUILTIN[name], scheduler=scheduler, steps=12)
    f = fields(info_ours[0])
    used, full = map(int, f["Adaptive NFE"].split("/"))
    quality = psnr_db(ours[0], theirs[0])
    report = REPO / "tests" / "webui" / "psnr_report.json"
    rows = json.loads(report.read_text()) if report.exists() else {}
    rows[f"{name} / {scheduler}"] = {"nfe": f"{used}/{full}", "psnr_db": quality}
    report.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"{name} ({scheduler}, 12 steps): NFE {used}/{full}, PSNR {quality:.1f} dB against {BUILTIN[name]}")
    assert used < full and quality > 10.0


def test_the_checkpoint_is_not_degenerate(server):
    """A freshly built LDM has zero-initialised output layers: every sampler would return the same image and the
    pixel-identity checks below would prove nothing."""
    euler, _ = txt2img(server, sampler_name="Euler")
    dpm, _ = txt2img(server, sampler_name="DPM++ 2M")
    assert not np.array_equal(euler[0], dpm[0])


@pytest.mark.parametrize("name", ADAPTIVE)
def test_disabled_adaptation_is_pixel_identical_to_the_builtin(server, name):
    ours, info_ours = txt2img(server, sampler_name=name, alwayson_scripts=adaptive_args(mode="ag", ag_threshold=1.0))
    theirs, info_theirs = txt2img(server, sampler_name=BUILTIN[name])
    assert fields(info_theirs[0])["Sampler"] == BUILTIN[name]
    used, full = map(int, fields(info_ours[0])["Adaptive NFE"].split("/"))
    assert used == full
    assert np.array_equal(ours[0], theirs[0])


def test_override_settings_change_the_recorded_parameters(server):
    _, infotexts = txt2img(server, sampler_name="Euler Adaptive",
                           override_settings={"adaptive_sampler_mode": "ag", "adaptive_sampler_ag_threshold": 0.97})
    f = fields(infotexts[0])
    assert f["Adaptive mode"] == "ag" and float(f["Adaptive AG threshold"]) == 0.97


def test_alwayson_scripts_change_the_recorded_parameters_and_infotext_restores_them(server):
    _, infotexts = txt2img(server, sampler_name="DPM++ 2M Adaptive",
                           alwayson_scripts=adaptive_args(mode="ag+adaptive-diffusion", ad_threshold=0.05, max_skips=2))
    f = fields(infotexts[0])
    assert f["Adaptive mode"] == "ag+adaptive-diffusion" and float(f["Adaptive skip threshold"]) == 0.05
    assert int(f["Adaptive max skips"]) == 2
    _, again = txt2img(server, infotext=infotexts[0])
    g = fields(again[0])
    assert {k: g[k] for k in f if k.startswith("Adaptive ") and k != "Adaptive NFE"} == \
        {k: f[k] for k in f if k.startswith("Adaptive ") and k != "Adaptive NFE"}


def test_the_accordion_adapts_a_builtin_sampler(server):
    _, infotexts = txt2img(server, sampler_name="Euler", alwayson_scripts=adaptive_args(mode="ag", ag_threshold=0.5))
    f = fields(infotexts[0])
    used, full = map(int, f["Adaptive NFE"].split("/"))
    assert f["Sampler"] == "Euler" and used < full


@pytest.mark.parametrize("extra", [
    dict(enable_hr=True, hr_scale=1.5, hr_second_pass_steps=4, denoising_strength=0.5, hr_upscaler="Latent",
         hr_sampler_name="Euler Adaptive"),
    dict(batch_size=2),
    dict(prompt="[a red apple:a green pear:0.5] AND a table"),
])
def test_hires_batch_prompt_editing_and_and_prompts_run(server, extra):
    images, infotexts = txt2img(server, sampler_name="DPM++ 2M Adaptive", **extra)
    assert len(images) >= extra.get("batch_size", 1)
    used, full = map(int, fields(infotexts[0])["Adaptive NFE"].split("/"))
    assert 0 < used < full


def test_img2img_runs_from_a_mid_way_schedule(server):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(buf, format="PNG")
    body = call(server, "/sdapi/v1/img2img", {**BASE, "init_images": [base64.b64encode(buf.getvalue()).decode()],
                                               "denoising_strength": 0.6, "sampler_name": "Euler Adaptive"})
    f = fields(json.loads(body["info"])["infotexts"][0])
    assert f["Sampler"] == "Euler Adaptive" and "Adaptive NFE" in f


@pytest.mark.parametrize("sampler", ["Euler Adaptive", "Euler", "Heun"])
def test_a_bad_parameter_is_an_http_error_with_a_clear_message(server, sampler):
    code, text = call(server, "/sdapi/v1/txt2img",
                      {**BASE, "sampler_name": sampler, "alwayson_scripts": adaptive_args(max_skips=0)},
                      expect_error=True)
    assert code >= 400 and "max_skips must be an integer >= 1" in text


# -- hardening (issue 15): no pass length, AND prompt, guidance scale or A1111 uncond skip fails a request --------
MODES = ["forecast", "ag", "linear-ag", "adaptive-diffusion", "ag+adaptive-diffusion"]


def img2img(url, **kw):
    return host_img2img(url, BASE, **kw)


@pytest.mark.parametrize("mode", MODES)
def test_a_short_img2img_pass_runs_in_every_mode(server, mode):
    """Strength 0.3 of 8 steps runs 3 steps: below min_steps it is full CFG and says so; with min_steps 1 the mode
    adapts it, computing what it cannot skip."""
    f = img2img(server, denoising_strength=0.3, alwayson_scripts=adaptive_args(mode=mode, min_steps=12))
    used, full = map(int, f["Adaptive NFE"].split("/"))
    assert used == full and "below min steps (12)" in f["Adaptive notes"]
    f = img2img(server, denoising_strength=0.3, alwayson_scripts=adaptive_args(mode=mode))
    assert int(f["Adaptive min steps"]) == 1 and "Adaptive NFE" in f
    if "adaptive-diffusion" in mode:
        assert "every step computed" in f["Adaptive notes"]


@pytest.mark.parametrize("strength", [0.0, 0.05])
def test_img2img_at_zero_or_tiny_strength_runs(server, strength):
    f = img2img(server, denoising_strength=strength, alwayson_scripts=adaptive_args(mode="adaptive-diffusion"))
    assert f["Sampler"] == "Euler Adaptive"


def test_hires_fix_with_a_short_second_pass_runs(server):
    images, infotexts = txt2img(server, sampler_name="Euler Adaptive", enable_hr=True, hr_scale=1.5,
                                hr_second_pass_steps=3, denoising_strength=0.5, hr_upscaler="Latent",
                                hr_sampler_name="DPM++ 2M Adaptive", alwayson_scripts=adaptive_args(
                                    mode="ag+adaptive-diffusion"))
    f = fields(infotexts[0])
    assert len(images) == 1 and "every step computed" in f["Adaptive notes"]


@pytest.mark.parametrize("mode", MODES)
def test_and_sub_prompts_in_a_batch_of_one(server, mode):
    images, infotexts = txt2img(server, sampler_name="DPM++ 2M Adaptive", batch_size=1,
                                prompt="a red apple AND a wooden table:0.6 AND a lamp:0.8",
                                alwayson_scripts=adaptive_args(mode=mode))
    used, full = map(int, fields(infotexts[0])["Adaptive NFE"].split("/"))
    assert len(images) == 1 and 0 < used <= full


@pytest.mark.parametrize("cfg_scale", [1, -2])
def test_cfg_1_and_negative_cfg_run(server, cfg_scale):
    images, _ = txt2img(server, sampler_name="Euler Adaptive", cfg_scale=cfg_scale,
                        alwayson_scripts=adaptive_args(mode="ag+adaptive-diffusion"))
    assert len(images) == 1


def test_negative_guidance_minimum_sigma_is_a1111s_own_with_adaptation_disabled(server):
    """A1111 drops the unconditional rows itself on odd low-noise steps; the adaptive sampler must follow."""
    ngms = {"s_min_uncond": 100.0}
    ours, _ = txt2img(server, sampler_name="Euler Adaptive", override_settings=ngms,
                         alwayson_scripts=adaptive_args(mode="ag", ag_threshold=1.0))
    theirs, _ = txt2img(server, sampler_name="Euler", override_settings=ngms)
    assert np.array_equal(ours[0], theirs[0])
    for mode in MODES:
        images, _ = txt2img(server, sampler_name="Euler Adaptive", override_settings=ngms,
                            alwayson_scripts=adaptive_args(mode=mode))
        assert len(images) == 1


# -- per-image decisions (issue 21) and the X/Y/Z plot axes ------------------------------------------------------
def nfe(f):
    used, full = map(int, f["Adaptive NFE"].split("/"))
    return used, full


@pytest.mark.parametrize("mode", ["ag", "adaptive-diffusion"], ids=["ag", "ad"])
def test_an_image_is_the_same_alone_and_in_a_batch_of_four_with_other_prompts(server, mode):
    """AG and AdaptiveDiffusion decide per image: image k of a batch of four prompts (seed + k, as A1111 seeds a
    batch) spends the NFE it spends alone and gives its picture (up to the UNet's own batch-size rounding, which
    keeps the built-in samplers above 80 dB between the two). The batch's images must decide differently for
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
    for k in (1, 3):
        alone, info = txt2img(server, prompt=BATCH_PROMPTS[k], sampler_name="Euler Adaptive", steps=12, seed=seed + k,
                              alwayson_scripts=args)
        quality = psnr_db(alone[0], images[k])
        print(f"{mode}: image {k} alone NFE {nfe(fields(info[0]))}, in the batch {spent[k]}, PSNR {quality:.1f} dB")
        assert nfe(fields(info[0])) == spent[k] and quality > 40.0


def test_the_xyz_plot_axes_set_the_mode_and_the_level(server):
    """X/Y/Z plot: "[Adaptive] Mode" x "[Adaptive] Level"; each cell's infotext records its mode and level, and the
    default mode spends more at level quality than at fast."""
    args = xyz_args(xyz_axis(server, "[Adaptive] Mode"), ["forecast", "ag"], xyz_axis(server, "[Adaptive] Level"),
                    ["quality", "fast"])
    body = call(server, "/sdapi/v1/txt2img", {**BASE, "steps": 12, "sampler_name": "Euler Adaptive",
                                               "script_name": "x/y/z plot", "script_args": args})
    cells = [fields(t) for t in json.loads(body["info"])["infotexts"][1:]]  # [0]: the grid
    assert len(cells) == 4 and sorted(f["Adaptive mode"] for f in cells) == ["ag", "ag", "forecast", "forecast"]
    forecast = {f["Adaptive level"]: nfe(f) for f in cells if f["Adaptive mode"] == "forecast"}
    assert forecast["quality"][0] > forecast["fast"][0] and forecast["fast"][1] == 24


# -- a flow model (issue 21): A1111 v1.10's SD3 ---------------------------------------------------------------------
@pytest.fixture
def sd3(server):
    if FLOW_MISSING.get("reason"):
        pytest.skip(FLOW_MISSING["reason"])


flow_model = pytest.mark.usefixtures("sd3")


def flow_txt2img(url, **kw):
    """A request on the SD3 checkpoint; A1111 silently keeps the loaded model for an unknown checkpoint name, so the
    infotext's model is checked. Live previews are off: their "Approx NN" decoder for SD3 is downloaded on first
    use (SD 1.5's ships with A1111)."""
    images, infotexts = txt2img(url, steps=12, override_settings={"sd_model_checkpoint": FLOW_CHECKPOINT,
                                                                  "live_previews_enable": False}, **kw)
    assert fields(infotexts[0])["Model"] == Path(FLOW_CHECKPOINT).stem
    return images, infotexts


@flow_model
@pytest.mark.parametrize("name", ["Euler Adaptive", "Euler a Adaptive", "DPM++ 2M Adaptive", "DPM++ 2M SDE Adaptive"])
def test_a_flow_model_runs_the_default(server, name):
    """SD3 (sigmas in (0, 1]: a flow run for the oracle): each sampler's default saves NFE, adapted to its last step,
    and its picture is closer to the built-in sampler's than another seed's; PSNR reported
    (tests/webui/psnr_report.json)."""
    ours, info_ours = flow_txt2img(server, sampler_name=name)
    theirs, _ = flow_txt2img(server, sampler_name=BUILTIN[name])
    other_seed, _ = flow_txt2img(server, sampler_name=BUILTIN[name], seed=BASE["seed"] + 1)
    f = fields(info_ours[0])
    used, full = nfe(f)
    quality, unrelated = psnr_db(ours[0], theirs[0]), psnr_db(other_seed[0], theirs[0])
    report = REPO / "tests" / "webui" / "psnr_report.json"
    rows = json.loads(report.read_text()) if report.exists() else {}
    rows[f"SD3 ({Path(FLOW_CHECKPOINT).stem}), {name}, 12 steps"] = {"nfe": f"{used}/{full}", "psnr_db": quality,
                                                                    "psnr_other_seed_db": unrelated}
    report.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"SD3, {name}: NFE {used}/{full}, PSNR {quality:.1f} dB against {BUILTIN[name]} (another seed: "
          f"{unrelated:.1f} dB)")
    assert used < full == 24 and "adaptation stopped" not in f.get("Adaptive notes", "") and quality > unrelated


@flow_model
def test_a_flow_model_with_adaptation_disabled_is_pixel_identical(server):
    ours, info_ours = flow_txt2img(server, sampler_name="Euler Adaptive",
                                   alwayson_scripts=adaptive_args(mode="ag", ag_threshold=1.0))
    theirs, _ = flow_txt2img(server, sampler_name="Euler")
    assert nfe(fields(info_ours[0])) == (24, 24) and np.array_equal(ours[0], theirs[0])
