"""The commands users run: each writes its outputs and fails clearly on bad input."""

import json
import re

import pytest

from adaptive_sampler.__main__ import main
from adaptive_sampler.oracles.linear_ag import LinearAGCoefficients


SMALL_DEMO = ["--samplers", "euler", "ddim", "--steps", "10", "--per-class", "1"]


def table_rows(out):
    """(sampler, schedule, oracle) of every row the demo printed (its fixed-width columns; the oracle without the
    parenthesised detail, e.g. fewer steps' count)."""
    return {(line[6:22].strip(), line[23:31].strip(), re.sub(r" \(.*\)$", "", line[32:56].strip()))
            for line in out.splitlines() if re.match(r"^ +[57] ", line)}


def test_demo_writes_the_figures_from_their_own_runs_only(tmp_path, capsys):
    """The main command runs what the figures show: each sampler on each model's first schedule, full CFG, the
    default and fewer steps; the grid of every row is left to --full."""
    assert main(["demo", "--out", str(tmp_path), *SMALL_DEMO]) == 0
    assert (tmp_path / "demo_sd.png").stat().st_size > 1000 and (tmp_path / "demo_flow.png").stat().st_size > 1000
    assert not (tmp_path / "demo.png").exists()
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert {(s, schedule) for s, schedule, _ in rows} == {("euler", "default"), ("ddim", "default"), ("euler", "shift 1")}
    assert {oracle for _, _, oracle in rows} == {"full CFG", "recommended", "fewer steps"} and "--full" in out


def test_demo_full_runs_every_schedule_and_oracle_and_writes_the_grid(tmp_path, capsys):
    assert main(["demo", "--full", "--families", "sd", "--out", str(tmp_path), *SMALL_DEMO]) == 0
    assert (tmp_path / "demo.png").stat().st_size > 1000 and (tmp_path / "demo_sd.png").exists()
    rows = table_rows(capsys.readouterr().out)
    assert {schedule for _, schedule, _ in rows} == {"default", "karras"}
    assert {o for _, _, o in rows} == {"full CFG", "recommended", "fewer steps", "AG", "LinearAG", "AdaptiveDiffusion",
                                       "AG + AdaptiveDiffusion"}


def test_bench_samplers_quick_writes_a_table_per_model_family(tmp_path, capsys):
    assert main(["bench-samplers", "--quick", "--out", str(tmp_path)]) == 0
    for stem, schedule in (("samplers", "karras"), ("samplers_flow", "shift 3")):
        pairs = json.loads((tmp_path / f"{stem}.json").read_text())
        assert {p["variant"] for p in pairs} == {"euler_ancestral", "dpmpp_2m"}
        assert {p["schedule"] for p in pairs} == {schedule}
        assert {"default", "Spectrum", "LazyCache", "EasyCache"} <= {p["method"] for p in pairs}
        assert "the default (level balanced) / fewer steps" in (tmp_path / f"{stem}.md").read_text()
    assert "embedded-flow-digits-v1 (flow)" in capsys.readouterr().out
    assert main(["bench-samplers", "--families", "flow", "--samplers", "ddim", "--out", str(tmp_path)]) == 2
    assert "none of the samplers ddim runs on the flow model" in capsys.readouterr().err


def test_bench_quick_writes_tables_and_plots(tmp_path, capsys):
    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())
    methods = {r["method"] for r in rows}
    assert {"full CFG", "AG", "LinearAG", "AdaptiveDiffusion", "Compose", "recommended (Forecast)"} <= methods
    assert any(r["kind"] == "fewer steps" for r in rows) and any(r["kind"] == "truncation" for r in rows)
    full = next(r for r in rows if r["method"] == "full CFG")
    assert full["nfe"] == 2 * full["run_steps"]
    for name in ("bench.md", "pareto.png", "run_euler_10.png"):
        assert (tmp_path / name).stat().st_size > 500
    assert "loop overhead" in capsys.readouterr().out


def test_calibrate_linear_ag_writes_a_coefficient_file(tmp_path):
    path = tmp_path / "c.json"
    assert main(["calibrate-linear-ag", "--sampler", "euler", "--steps", "8", "--samples", "8",
                 "--output", str(path)]) == 0
    coef = LinearAGCoefficients.load(path)
    assert coef.sampler == "euler" and coef.steps == 8 and coef.samples == 16
    assert coef.coefficients[0] is None and all(len(r) == 4 for r in coef.coefficients[1:])


def test_tune_meets_a_reachable_target(tmp_path, capsys):
    code = main(["tune", "--oracle", "adaptive-diffusion", "--target-psnr", "30", "--steps", "20", "--images", "4",
                 "--out", str(tmp_path)])
    result = json.loads((tmp_path / "tune_adaptive-diffusion.json").read_text())
    assert code == 0 and result["met"] and result["psnr"] >= 30
    assert "settings" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["demo", "--steps", "-3"],
    ["demo", "--scales", "nan"],
    ["bench", "--samplers", "heun"],
    ["tune", "--target-psnr", "30", "--target-nfe", "0.5"],
])
def test_bad_arguments_exit_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["tune", "--target-nfe", "0.5", "--model", "no_such_module:f"]) == 2
    assert "could not be loaded" in capsys.readouterr().err


def test_tune_picks_the_most_aggressive_level_meeting_the_target(tmp_path):
    args = ["--steps", "20", "--images", "4", "--out", str(tmp_path)]
    assert main(["tune", "--target-nfe", "0.45", *args]) == 0  # the default oracle is the level knob
    result = json.loads((tmp_path / "tune_level.json").read_text())
    assert result["settings"] == {"level": "balanced"} and result["nfe_ratio"] <= 0.45
    assert main(["tune", "--target-psnr", "1", *args]) == 0
    assert json.loads((tmp_path / "tune_level.json").read_text())["settings"] == {"level": "fast"}
