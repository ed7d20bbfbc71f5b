"""The host-independent parts of tests/hosts/build_models.py and of the suites' build-when-missing step: these run
everywhere (no host needed); the builders themselves run with a host's own Python (see docs/hosts/*.md)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import build_models as B
from host_suite import BATCH_PROMPTS, BUILDER, SUITE_PROMPTS, builder_command, ensure_built


def zero_initialised():
    """A network as latent diffusion models are built: its output layer zero-initialised."""
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.LayerNorm(32), torch.nn.SiLU(), torch.nn.Linear(32, 4))
    torch.nn.init.zeros_(net[3].weight)
    torch.nn.init.zeros_(net[3].bias)
    return net


def test_randomize_gives_every_weight_a_value_from_its_seed():
    net = zero_initialised()
    B.randomize(net, 7)
    assert net[3].weight.abs().min() > 0 and net[3].weight.abs().max() <= 1 / 32 ** 0.5
    assert net[0].weight.abs().max() <= 1 / 8 ** 0.5
    assert (net[1].weight - 1).abs().max() < 0.2 and net[1].bias.abs().max() < 0.2  # norms stay norms
    again, other = zero_initialised(), zero_initialised()
    B.randomize(again, 7)
    B.randomize(other, 8)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(net[3].weight, other[3].weight)


def test_scale_output_sets_the_prediction_spread():
    net = zero_initialised()
    B.randomize(net, 1)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    B.scale_output(net[3], lambda: net(x))
    with torch.no_grad():
        assert float(net(x).std()) == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(RuntimeError, match="spread"):
        B.scale_output(net[3], lambda: torch.zeros(4))


def test_the_sd_schedule_runs_from_sd_15s_largest_sigma_to_zero():
    timesteps, sigmas = B.sd_sigmas(12)
    assert timesteps[0] == 999 and timesteps[-1] == 0 and len(sigmas) == 13 and sigmas[-1] == 0
    assert sigmas[0] == pytest.approx(14.6, abs=0.05) and bool((sigmas[:-1] > sigmas[1:]).all())


def test_the_prompt_check_names_a_prompt_that_overflows():
    def eps(x, t, context):
        return x * 0.1 + context.mean()

    def encode(prompt, layer):
        value = float("inf") if (prompt == "a red dog" and layer == -2) else 0.5
        return torch.full((1, 77, 768), value)

    B.check_sd15_prompts(lambda p, layer: torch.full((1, 77, 768), 0.5), eps, lambda z: z.clamp(-1, 1), steps=3)
    with pytest.raises(RuntimeError, match="CLIP layer -2 gives inf for 'a red dog'"):
        B.check_sd15_prompts(encode, eps, lambda z: z, steps=3)
    with pytest.raises(RuntimeError, match="non-finite picture for 'a red cat'"):
        B.check_sd15_prompts(lambda p, layer: torch.full((1, 77, 768), 0.5), eps, lambda z: z * float("nan"), steps=3)


def texts_encoded(prompt):
    """The texts a WebUI encodes for a prompt: each AND part (its weight removed) and each side of a
    ``[from:to:when]`` edit."""
    out = []
    for part in prompt.split(" AND "):
        part = re.sub(r":[0-9.]+$", "", part.strip())
        edit = re.search(r"\[([^:\]]*):([^:\]]*):[0-9.]+\]", part)
        out += [part[:edit.start()] + side + part[edit.end():] for side in edit.groups()] if edit else [part]
    return out


def test_the_builder_checks_every_text_the_suites_send():
    """The SD-1.5 builder's prompt list covers every text the A1111-family suites encode (and ComfyUI's)."""
    sent = {t for p in [*SUITE_PROMPTS, *BATCH_PROMPTS, "blurry", "a red apple on a table"] for t in texts_encoded(p)}
    assert sent <= set(B.SD15_PROMPTS), sorted(sent - set(B.SD15_PROMPTS))
    assert texts_encoded("[a red apple:a green pear:0.5] AND a table") == ["a red apple", "a green pear", "a table"]
    assert {"a red cat", "a red dog"} <= set(B.SD15_SAMPLED)


def test_the_builder_explains_itself_without_a_host():
    out = subprocess.run([sys.executable, str(BUILDER), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "comfyui" in out.stdout and "forge-lumina2" in out.stdout
    out = subprocess.run([sys.executable, str(BUILDER), "sd15", "--out", "x.safetensors"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "--comfyui-dir" in out.stderr  # one host's classes must be named


def test_a_missing_checkpoint_is_built_or_skipped_naming_the_command(tmp_path, monkeypatch):
    target = tmp_path / "random.safetensors"
    write = [sys.executable, "-c", f"open({str(target)!r}, 'w').write('x')"]
    monkeypatch.setenv("HOST_SUITE_BUILD", "0")
    reason = ensure_built([target], write, tmp_path / "build.log")
    assert str(target) in reason and "build with: " + sys.executable in reason and not target.exists()
    monkeypatch.delenv("HOST_SUITE_BUILD")
    assert ensure_built([target], [str(tmp_path / "no-such-python"), "x"], tmp_path / "build.log").endswith(" x")
    assert ensure_built([target], write, tmp_path / "build.log") is None and target.exists()
    assert ensure_built([target], [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "build.log") is None
    target.unlink()
    with pytest.raises(pytest.fail.Exception, match="exit 3"):
        ensure_built([target], [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "build.log")
    assert builder_command("/venv/bin/python", "sd15", "--out", target)[:3] == ["/venv/bin/python", str(BUILDER),
                                                                                 "sd15"]
    assert os.path.basename(str(BUILDER)) == "build_models.py"
