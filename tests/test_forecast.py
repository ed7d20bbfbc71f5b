"""Forecast skipping: extrapolated predictions on CACHED steps."""

import math

import pytest
import torch

from adaptive_sampler import oracles as O
from adaptive_sampler.forecast import Forecast, extrapolate
from adaptive_sampler.oracles import Decision

from test_oracles import MAIN_SAMPLERS, run


def test_extrapolation_is_exact_for_polynomials_of_its_order():
    lam = [0.3, 0.7, 1.2]
    base = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    quad = lambda t: base * (1 + 0.5 * t - 0.25 * t * t)  # noqa: E731
    points = [(t, quad(t)) for t in lam]
    assert torch.allclose(extrapolate(points, 1.9), quad(1.9), atol=1e-5)
    line = lambda t: base * (2 - t)  # noqa: E731
    assert torch.allclose(extrapolate([(t, line(t)) for t in lam[:2]], 2.5), line(2.5), atol=1e-5)


@pytest.mark.parametrize("sampler", MAIN_SAMPLERS)
def test_forecast_saves_nfe_and_respects_its_limits(denoiser, sampler):
    oracle = Forecast()
    run(denoiser, sampler, oracle)
    d = oracle.decisions
    assert oracle.summary().nfe < 100
    assert all(x is Decision.FULL for x in d[: oracle.warmup]) and d[-1] is Decision.FULL
    assert all(not (a is Decision.CACHED and b is Decision.CACHED) for a, b in zip(d, d[1:]))  # max_skips=1
    for i, x in enumerate(d):
        if x is Decision.CACHED:
            assert oracle.errors[i] <= oracle.tolerance


def test_a_cached_step_uses_the_extrapolated_prediction(denoiser):
    seen = []

    class Spy(Forecast):
        def _observe(self, record):
            super()._observe(record)
            seen.append(record)

    run(denoiser, "euler", Spy(tolerance=1e9, order=1, warmup=2), steps=12, batch=2)
    skipped = next(r for r in seen if r.decision is Decision.CACHED)
    a, b = [r for r in seen[: skipped.index] if r.decision is Decision.FULL][-2:]
    lam = lambda s: -math.log(s)  # noqa: E731
    w = (lam(skipped.sigma) - lam(a.sigma)) / (lam(b.sigma) - lam(a.sigma))
    expected = a.denoised + w * (b.denoised - a.denoised)
    assert torch.allclose(skipped.denoised, expected, atol=1e-5)
