"""Helpers shared by the real-host integration suites (tests/webui, tests/forge, tests/comfyui)."""

import base64
import io
import json
import os
import shlex
import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
#: Builds the suites' tiny random-weight checkpoints, run with a host's own Python against its own model classes.
BUILDER = REPO / "tests" / "hosts" / "build_models.py"

#: The A1111-family extension (A1111, Forge Neo): its samplers, their built-in counterparts, its accordion's title.
ADAPTIVE = ["Euler Adaptive", "Euler a Adaptive", "DPM++ 2M Adaptive", "DPM++ 2M SDE Adaptive", "DDIM Adaptive"]
BUILTIN = {"Euler Adaptive": "Euler", "Euler a Adaptive": "Euler a", "DPM++ 2M Adaptive": "DPM++ 2M",
           "DPM++ 2M SDE Adaptive": "DPM++ 2M SDE", "DDIM Adaptive": "DDIM"}
SCRIPT = "adaptive sampling"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def link_to_this_repository(link: Path, target: Path = REPO) -> None:
    """Make ``link`` point at this repository (or ``target`` inside it): a link left by an earlier run of another
    checkout would silently test that checkout's code. A real folder there is not ours to replace."""
    if link.is_symlink() and link.resolve() != target.resolve():
        link.unlink()
    if not link.exists():
        link.symlink_to(target, target_is_directory=True)
    if link.resolve() != target.resolve():
        pytest.fail(f"{link} is not a link to {target}; move it away and rerun")


@contextmanager
def running_server(name: str, command: Sequence[str], cwd: Path, log_path: Path, ready_url: str,
                   env: Mapping[str, str] | None = None, poll_s: float = 3.0) -> Iterator[None]:
    """Start a host with its output in ``log_path``, wait (up to 10 minutes) until ``ready_url`` answers, and stop
    it afterwards; a host that exits or never answers fails the suite, naming its log."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(list(command), cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                env=None if env is None else dict(env))
        try:
            deadline = time.time() + 600
            while time.time() < deadline:
                if proc.poll() is not None:
                    pytest.fail(f"{name} exited with {proc.returncode}; see {log_path}")
                try:
                    urllib.request.urlopen(ready_url, timeout=5)
                    break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    time.sleep(poll_s)
            else:
                pytest.fail(f"{name} did not answer within 10 minutes; see {log_path}")
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def builder_command(python, command: str, *args) -> list[str]:
    """The command line that builds a suite's random checkpoints (``tests/hosts/build_models.py``) with ``python``,
    the host's own interpreter."""
    return [str(python), str(BUILDER), command, *map(str, args)]


def ensure_built(paths: Sequence[Path], command: Sequence[str], log_path: Path) -> str | None:
    """Build the missing ones of ``paths`` (a suite's random checkpoints) by running ``command`` (see
    :func:`builder_command`), its output in ``log_path``. Returns None when they are all there, or the reason they
    are not (naming the command) when it cannot run: ``HOST_SUITE_BUILD=0`` or no host interpreter; the caller skips
    with it. A build that fails fails the suite, naming its log."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    if not missing:
        return None
    shown = shlex.join(command)
    if os.environ.get("HOST_SUITE_BUILD", "1") == "0" or not Path(command[0]).exists():
        return f"{', '.join(missing)} not found; build with: {shown}"
    print(f"\nbuilding {', '.join(missing)}: {shown} (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        rc = subprocess.run(list(command), cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    still = [p for p in missing if not Path(p).exists()]
    if rc != 0 or still:
        pytest.fail(f"{shown} failed (exit {rc}); see {log_path}")
    return None


# -- the A1111-family HTTP API (A1111 and Forge) ----------------------------------------------------------------------
def call(url, path, payload=None, expect_error=False):
    """POST (or GET without ``payload``) a JSON API call; with ``expect_error`` returns (status, body) of the HTTP
    error it must produce."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=1800) as r:
            body = json.loads(r.read())
            assert not expect_error, f"expected an HTTP error, got {body.get('info', body)}"
            return body
    except urllib.error.HTTPError as e:
        if expect_error:
            return e.code, e.read().decode()
        raise AssertionError(f"HTTP {e.code}: {e.read().decode()[:2000]}") from None


def decode(b64):
    """A base64 PNG from the API as an RGB array."""
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def fields(infotext):
    """The ``key: value`` fields of an infotext's last line."""
    last = infotext.strip().split("\n")[-1]
    out = {}
    for part in last.split(", "):
        if ": " in part:
            k, v = part.split(": ", 1)
            out[k.strip()] = v.strip().strip('"')
    return out


def adaptive_args(enable=True, mode="forecast", ag_threshold=0.991, ag_space="x0", ad_threshold=0.01, max_skips=4,
                  warmup=4, budget=0.0, min_steps=1):
    """The accordion's ``alwayson_scripts`` entry (its args in API order)."""
    return {SCRIPT: {"args": [enable, mode, ag_threshold, ag_space, ad_threshold, max_skips, warmup, budget,
                              min_steps]}}


def img2img(url, base, **kw):
    """An img2img request from a mid-grey 64x64 image with ``base``'s settings and Euler Adaptive; its fields."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(buf, format="PNG")
    body = call(url, "/sdapi/v1/img2img", {**base, "init_images": [base64.b64encode(buf.getvalue()).decode()],
                                           "sampler_name": "Euler Adaptive", **kw})
    return fields(json.loads(body["info"])["infotexts"][0])


def psnr_db(a, b):
    """PSNR of two 8-bit images in dB (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


# -- test-only extensions and scripts the A1111-family suites use ---------------------------------------------------
#: The test-only extension that gives each image of a batch its own prompt (linked into extensions/ by the suites).
PROMPT_LIST = REPO / "tests" / "webui" / "prompt_list"
#: Prompts for the "alone vs in a batch" cases.
BATCH_PROMPTS = ["a red apple", "a blue car on a road", "a green tree", "a yellow house at night"]
#: Every prompt the A1111-family suites send, and the one a rebuilt checkpoint once turned into NaN under plain Euler
#: (random weights, not our extension): the checkpoint must give a finite picture for each before any case counts.
SUITE_PROMPTS = ["a red apple", "[a red apple:a green pear:0.5] AND a table",
                 "a red apple AND a wooden table:0.6 AND a lamp:0.8", *BATCH_PROMPTS[1:], "a red [cat:dog:0.5]"]


#: Settings tried in turn, per mode, until the images of a batch of BATCH_PROMPTS spend different NFE, which the
#: per-image cases need in order to mean anything; which threshold splits them depends on the random checkpoint.
SPLITTING = {"ag": [dict(ag_threshold=t) for t in (0.995, 0.99, 0.998, 0.98, 0.999, 0.97, 0.95)],
             "adaptive-diffusion": [dict(ad_threshold=t) for t in (0.15, 0.1, 0.2, 0.05, 0.3, 0.02)]}


def splitting_setting(run, mode):
    """The first setting of ``SPLITTING[mode]`` under which ``run(setting)`` (the batch of BATCH_PROMPTS:
    ``(images, infotexts, [(used, full) per image])``) gives images that spend different NFE: ``(setting, that
    run's result)``; fails listing what each setting spent when none does."""
    tried = []
    for setting in SPLITTING[mode]:
        result = run(setting)
        if len(set(result[2])) > 1:
            return setting, result
        tried.append((setting, result[2]))
    pytest.fail(f"{mode}: no setting makes the batch's images decide differently: {tried}")


def not_finite(images, prompts):
    """The prompts whose picture is black or flat: what A1111 and Forge make of a NaN latent."""
    return [p for image, p in zip(images, prompts) if image.max() == 0 or image.std() == 0]


def prompt_list(prompts):
    """The ``alwayson_scripts`` entry giving each image of the request its own prompt."""
    return {"test prompt list": {"args": [json.dumps(list(prompts))]}}


def xyz_axis(url, label):
    """The index the X/Y/Z plot's txt2img type dropdowns give an axis (the API takes indexes)."""
    info = call(url, "/sdapi/v1/script-info")
    xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    return xyz["args"][0]["choices"].index(label)


def xyz_args(x_type, x_values, y_type, y_values, forge=False):
    """The X/Y/Z plot's ``script_args`` for two dropdown axes (values as lists), the cells' images included; Forge's
    script has a row count before the margin."""
    args = [x_type, "", list(x_values), y_type, "", list(y_values), 0, "", [], True, True, False, False, False, False,
            False]
    return args + ([0] if forge else []) + [0, False]
