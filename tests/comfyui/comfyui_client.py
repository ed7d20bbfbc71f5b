"""What the real-ComfyUI suites share: a headless server with this repository in ``custom_nodes/``, and its HTTP API
(``/prompt``, ``/history``, ``/view``, ``/object_info``).

The server runs on 127.0.0.1 on the CPU with ``HF_HUB_OFFLINE=1``: nothing is downloaded. ``COMFYUI_DIR`` names the
ComfyUI checkout, ``COMFYUI_PYTHON`` (default ``$COMFYUI_DIR/venv/bin/python``) its interpreter and ``COMFYUI_ARGS``
extra flags. The random checkpoints the suites run on are built with that interpreter by
``tests/hosts/build_models.py`` when they are missing (``HOST_SUITE_BUILD=0``: skip, naming the command).
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
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from host_suite import free_port, link_to_this_repository, running_server

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")


def comfyui_python() -> str:
    """ComfyUI's interpreter: ``COMFYUI_PYTHON``, default ``$COMFYUI_DIR/venv/bin/python``."""
    return os.environ.get("COMFYUI_PYTHON", str(Path(COMFYUI_DIR) / "venv" / "bin" / "python"))


@contextmanager
def comfyui_server(log_path: Path) -> Iterator[dict]:
    """A running ComfyUI with this repository linked into ``custom_nodes/``: ``{"url", "log", "root"}``."""
    root = Path(COMFYUI_DIR)
    link_to_this_repository(root / "custom_nodes" / "adaptive-sampler")
    python = comfyui_python()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        args = ["main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
                "--database-url", f"sqlite:///{tmp}/comfyui.db", "--output-directory", f"{tmp}/output"]
        args += shlex.split(os.environ.get("COMFYUI_ARGS", ""))
        url = f"http://127.0.0.1:{port}"
        with running_server("ComfyUI", [python, *args], root, log_path, url + "/system_stats",
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, poll_s=2):
            yield {"url": url, "log": log_path, "root": root}


def request(url, data=None):
    req = urllib.request.Request(url, data=None if data is None else json.dumps(data).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return 200, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def object_info(server) -> dict:
    _, raw = request(server["url"] + "/object_info")
    return json.loads(raw)


def submit(server, graph):
    """Queue a graph; returns (history entry, None) or (None, the /prompt validation error body)."""
    code, body = request(server["url"] + "/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})
    if code != 200:
        return None, json.loads(body)
    pid = json.loads(body)["prompt_id"]
    deadline = time.time() + 3600
    while time.time() < deadline:
        _, raw = request(f"{server['url']}/history/{pid}")
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
    """The saved images of a node (8-bit RGB arrays; every frame of a video saved as images)."""
    from PIL import Image
    out = []
    for im in entry["outputs"][node]["images"]:
        q = urllib.parse.urlencode({"filename": im["filename"], "subfolder": im["subfolder"], "type": im["type"]})
        _, raw = request(f"{server['url']}/view?{q}")
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


def decisions(text):
    return text.split("decisions ")[1].split(";")[0]


def psnr(a, b):
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def promised_nfe(sampler: str, stochastic: bool, steps: int, rows: int = 2) -> int:
    """The NFE per image the default level promises on a sampler: its share of full CFG's steps (LEVELS: on
    deterministic samplers, other stochastic ones, DPM++ SDE), read from the library."""
    from adaptive_sampler import oracles as O
    from adaptive_sampler.oracles.forecast import integrates_in_log_sigma, level_budget
    budget = level_budget(O.DEFAULT_LEVEL, stochastic, integrates_in_log_sigma(sampler))
    return rows * int(math.floor(budget * steps + 1e-9))
