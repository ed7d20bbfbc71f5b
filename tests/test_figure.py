"""The demo's figure: per sampler full CFG | the default | fewer steps, every shown image at the zoom asked for, the
two cheap groups' differences to full CFG beneath them; and the demo command that writes one figure per family."""

import math

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image

from adaptive_sampler.__main__ import main
from adaptive_sampler.lab.figure import (DIFFERENCE_COLOURS, HIGHLIGHT, Group, SamplerRow, comparison_figure,
                                         pick_images)

SHAPE = (3, 1, 16, 16)


def rows(count=2, shape=SHAPE):
    """Full CFG mid-grey, the default identical to it (difference: black), fewer steps black (difference: hottest)."""
    full = torch.full(shape, 0.5)
    return [SamplerRow(f"sampler {r}", Group(full, 20, 40), Group(full.clone(), 20, 16, 31.0),
                       Group(torch.full(shape, -1.0), 8, 16, 29.0)) for r in range(count)]


def pixels_of(path, colour):
    return int(np.all(np.asarray(Image.open(path).convert("RGB")) == colour, axis=-1).sum())


def heat(value):
    return tuple(round(c * 255) for c in colormaps[DIFFERENCE_COLOURS](value)[:3])


@pytest.mark.parametrize("zoom", [2, 4])
def test_every_cheap_image_gets_its_difference_tile_at_the_zoom(tmp_path, zoom):
    path = comparison_figure(rows(), tmp_path / "f.png", title="t", note="n", zoom=zoom)
    tile = (16 * zoom) ** 2
    # 2 samplers x 3 images: identical images give black difference tiles, fewer steps' the hottest ones
    assert pixels_of(path, heat(0.0)) == 2 * 3 * tile
    assert pixels_of(path, heat(1.0)) == 2 * 3 * tile
    # full CFG and the default show the mid-grey images (text anti-aliasing may add a few grey pixels)
    assert pixels_of(path, (191, 191, 191)) >= 2 * 2 * 3 * tile


def test_the_figure_grows_by_one_row_per_sampler(tmp_path):
    one, two, three = (Image.open(comparison_figure(rows(n), tmp_path / f"{n}.png", title="t")) for n in (1, 2, 3))
    assert one.width == two.width == three.width
    row = two.height - one.height
    assert three.height - two.height == row and row > 2 * 16 * 4  # an image row and a difference row of 64 pixels


@pytest.mark.parametrize("default_psnr, winner", [(31.0, "default"), (27.0, "fewer"), (29.04, None)])
def test_the_closer_cheap_group_is_highlighted(tmp_path, default_psnr, winner):
    full = torch.full(SHAPE, 0.5)
    row = SamplerRow("s", Group(full, 20, 40), Group(full, 20, 16, default_psnr), Group(-full - 1.5, 8, 16, 29.0))
    image = np.asarray(Image.open(comparison_figure([row], tmp_path / "f.png", title="t")).convert("RGB"))
    green = np.nonzero(np.all(image == HIGHLIGHT, axis=-1))[1]
    fewer_left = np.nonzero(np.all(image == heat(1.0), axis=-1))[1].min()  # only fewer steps' tiles are this hot
    if winner is None:  # 29.0 dB both, as shown
        assert green.size == 0
    elif winner == "default":
        assert green.size and green.max() < fewer_left
    else:
        assert green.size and green.min() >= fewer_left


def test_pick_images_spreads_distinct_labels():
    labels = [c for c in range(10) for _ in range(2)]
    assert [labels[i] for i in pick_images(labels, 4)] == [0, 3, 6, 9]
    assert pick_images(labels, 4) == [0, 6, 12, 18]
    assert pick_images([7, 7, 2], 1) == [2]


@pytest.mark.parametrize("make, message", [
    (lambda p: comparison_figure([], p, title="t"), "rows must not be empty"),
    (lambda p: comparison_figure(rows(), p, title="t", zoom=0), "zoom"),
    (lambda p: comparison_figure(rows(), p, title="t", amplify=math.nan), "amplify"),
    (lambda p: comparison_figure(rows(1) + rows(1, (2, 1, 16, 16)), p, title="t"), "shape"),
    (lambda p: comparison_figure([SamplerRow("s", *(Group(torch.zeros(SHAPE), 4, 8),) * 3)], p, title="t"), "PSNR"),
    (lambda p: pick_images([0, 1], 3), "distinct labels"),
    (lambda p: pick_images([0, 1], 0), "count"),
])
def test_bad_input_is_a_clear_error(tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        make(tmp_path / "f.png")


def test_demo_writes_the_family_figure_and_the_baseline_row(tmp_path, capsys):
    argv = ["demo", "--families", "sd", "--samplers", "euler", "--schedules", "karras", "--oracles", "recommended",
            "--steps", "10", "--per-class", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "recommended" in out and "fewer steps (4)" in out  # 40% of 10 steps computes 4
    assert not (tmp_path / "demo_flow.png").exists() and not (tmp_path / "demo.png").exists()  # the grid: --full
    figure = Image.open(tmp_path / "demo_sd.png")
    assert figure.width > 800 and figure.height > 300  # one sampler row of 64-pixel digits, readable captions


def test_demo_refuses_a_family_without_a_sampler(capsys):
    assert main(["demo", "--families", "flow", "--samplers", "ddim", "--steps", "4", "--per-class", "1"]) == 2
    assert "none of the samplers ddim runs on the flow model" in capsys.readouterr().err


def test_demo_refuses_a_bad_flow_schedule(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--flow-schedules", "karras"])
    assert "shift <positive number>" in capsys.readouterr().err
