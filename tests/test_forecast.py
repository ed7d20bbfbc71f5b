"""Forecast: a fixed NFE budget whose skipped steps extrapolate eps."""

import pytest
import torch

from adaptive_sampler import oracles as O
from adaptive_sampler.oracles.forecast import Forecast, computed_steps, extrapolate
from adaptive_sampler.oracles import Decision

from conftest import CountingModel
from test_oracles import MAIN_SAMPLERS, run


def test_extrapolation_is_exact_for_polynomials_of_its_order():
    base = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    quad = lambda t: base * (1 + 0.5 * t - 0.25 * t * t)  # noqa: E731
    assert torch.allclose(extrapolate([(t, quad(t)) for t in (3.0, 2.2, 1.5)], 0.9), quad(0.9), atol=1e-5)
    line = lambda t: base * (2 - t)  # noqa: E731
    assert torch.allclose(extrapolate([(t, line(t)) for t in (3.0, 2.0)], 0.5), line(0.5), atol=1e-5)


@pytest.mark.parametrize("steps,budget,warmup", [(50, 0.5, 2), (20, 0.5, 2), (20, 0.3, 3), (7, 0.6, 1), (10, 1.0, 2),
                                                 (20, 0.1, 2)])
def test_plan_spends_the_budget(steps, budget, warmup):
    plan = computed_steps(steps, budget, warmup)
    assert len(plan) == min(steps, max(int(budget * steps + 1e-9), warmup + 1))
    assert set(range(warmup)) <= plan and steps - 1 in plan


def test_a_run_too_short_for_the_budget_computes_warmup_and_last_step_and_says_so(denoiser):
    oracle = Forecast(budget=0.5, warmup=2)
    run(denoiser, "euler", oracle, steps=4, batch=2)
    assert oracle.summary().schedule == "FFSF"
    assert oracle.summary().overrides == ((0, "budget 0.5 raised to 3/4 computed steps: a 4-step run needs "
                                               "warm-up (2) and the last step"),)
    run(denoiser, "euler", oracle, steps=2, batch=2)
    assert oracle.summary().schedule == "FF"


@pytest.mark.parametrize("sampler", MAIN_SAMPLERS)
@pytest.mark.parametrize("steps", [20, 50])
def test_forecast_spends_half_the_nfe_and_beats_fewer_steps(denoiser, sampler, steps):
    """The recommended oracle at 50% NFE is closer to full CFG than full CFG with half the steps."""
    model = CountingModel(denoiser)
    full = run(denoiser, sampler, O.FullCFG(), steps=steps)
    oracle = O.recommended()
    ours = run(denoiser, sampler, oracle, steps=steps, model=model)
    fewer = run(denoiser, sampler, O.FullCFG(), steps=steps // 2)
    assert model.rows == oracle.summary().nfe * 8 == steps * 8
    assert (ours - full).pow(2).mean() < (fewer - full).pow(2).mean()


def test_a_skipped_step_uses_the_extrapolated_eps(denoiser):
    seen = []

    class Spy(Forecast):
        def _observe(self, record):
            super()._observe(record)
            seen.append(record)

    run(denoiser, "euler", Spy(budget=0.5, order=2, warmup=3), steps=16, batch=2)
    k = next(i for i, r in enumerate(seen) if r.decision is Decision.CACHED and i >= 4)
    points = [(r.sigma, r.eps) for r in seen[:k] if r.decision is Decision.FULL][-3:]
    assert torch.allclose(seen[k].eps, extrapolate(points, seen[k].sigma), atol=1e-4)
