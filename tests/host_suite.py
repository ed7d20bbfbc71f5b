"""Helpers shared by the real-host integration suites (tests/webui, tests/forge, tests/comfyui)."""

import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


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
