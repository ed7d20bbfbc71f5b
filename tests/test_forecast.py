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
def test_forecast_spends_its_level_budget_and_beats_fewer_steps(denoiser, sampler, steps):
    """The recommended oracle at its default level's NFE is closer to full CFG than full CFG with as many steps as
    it computes."""
    model = CountingModel(denoiser)
    full = run(denoiser, sampler, O.FullCFG(), steps=steps)
    oracle = O.recommended()
    ours = run(denoiser, sampler, oracle, steps=steps, model=model)
    computed = int(O.LEVELS[O.DEFAULT_LEVEL][0] * steps + 1e-9)
    fewer = run(denoiser, sampler, O.FullCFG(), steps=computed)
    assert model.rows == oracle.summary().nfe * 8 == 2 * computed * 8
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


class Probe(Forecast):
    """Records what the oracle extrapolates from, to check the space it works in."""

    def _observe(self, record):
        super()._observe(record)
        self.seen = (record, self._history[-1][1]) if record.decision is not Decision.CACHED else self.seen


@pytest.mark.parametrize("stochastic,space", [(False, "eps"), (True, "x0")])
def test_auto_space_is_eps_on_deterministic_and_x0_on_stochastic_runs(stochastic, space):
    oracle = Probe()
    oracle.seen = None
    sigmas = tuple(float(s) for s in torch.linspace(10, 0.1, 11))
    oracle.reset(O.RunInfo(sampler="euler", sigmas=sigmas, batch_size=1, stochastic=stochastic))
    x, den = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    state = O.StepState(index=0, total=10, sigma=sigmas[0], x=x)
    decision = oracle.decide(state)
    oracle.record(O.StepRecord(index=0, decision=decision, sigma=sigmas[0], x=x, denoised=den,
                               eps=(x - den) / sigmas[0]))
    record, stored = oracle.seen
    expected = record.denoised if space == "x0" else record.eps
    assert torch.allclose(stored, expected)
    assert oracle._history.maxlen == (1 if space == "x0" else 3)  # x0 reused, eps extrapolated by a quadratic


@pytest.mark.parametrize("level", list(O.LEVELS))
def test_a_level_spends_more_on_stochastic_samplers_and_more_again_on_dpmpp_sde_and_says_so(level):
    deterministic, stochastic_budget, sde = O.LEVELS[level]
    assert deterministic < stochastic_budget < sde
    sigmas = tuple(float(s) for s in torch.linspace(10, 0.1, 20)) + (0.0,)
    for sampler, stochastic, budget in (("euler", False, deterministic), ("euler_ancestral", True, stochastic_budget),
                                        ("dpmpp_2m", False, deterministic), ("dpmpp_2m_sde", True, sde),
                                        ("DPM++ 3M SDE", True, sde), ("sample_dpmpp_2m_sde", True, sde),
                                        ("dpmpp_2m_sde", False, deterministic)):
        oracle = Forecast(level=level)
        oracle.reset(O.RunInfo(sampler=sampler, sigmas=sigmas, batch_size=1, stochastic=stochastic))
        assert len(oracle.plan) == int(budget * 20 + 1e-9), sampler
        notes = [why for _, why in oracle.overrides]
        assert (notes == [f"level {level!r} spends {budget} of full CFG's NFE on {sampler} "
                          f"({'a DPM++ SDE sampler' if budget == sde else 'a stochastic sampler'}; {deterministic} on "
                          "deterministic ones)"]) if stochastic else not notes
    explicit = Forecast(budget=0.5, level=level)
    explicit.reset(O.RunInfo(sampler="dpmpp_2m_sde", sigmas=sigmas, batch_size=1, stochastic=True))
    assert len(explicit.plan) == 10 and not explicit.overrides


def test_a_bad_level_is_refused():
    with pytest.raises(ValueError, match="level must be one of quality, balanced, fast, got 'max'"):
        Forecast(level="max")


def test_log_sigma_placement_spreads_computed_steps_evenly_in_log_sigma():
    sigmas = [14.6 * (0.85 ** k) for k in range(20)] + [0.0]  # geometric: log sigma is linear in the index
    import math
    lam_plan = sorted(computed_steps(20, 0.5, 2, sigmas))
    gaps = [b - a for a, b in zip(lam_plan[1:], lam_plan[2:])]  # from the last warm-up step on
    assert len(lam_plan) == 10 and max(gaps) - min(gaps) <= 1  # evenly in log sigma == evenly in index here
    skewed = [14.6 * math.exp(-0.02 * k * k) for k in range(20)] + [0.0]  # log sigma moves fast late
    late = computed_steps(20, 0.5, 2, skewed)
    assert len(late) == 10 and sum(1 for j in late if j >= 10) > sum(1 for j in computed_steps(20, 0.5, 2) if j >= 10)


def test_rho_placement_is_even_on_a_karras_schedule_and_computes_more_late_steps_on_a_uniform_one():
    import k_diffusion as K
    karras = [float(s) for s in K.sampling.get_sigmas_karras(20, 0.03, 14.6)]
    plan = sorted(computed_steps(20, 0.5, 2, karras, placement="rho"))
    gaps = [b - a for a, b in zip(plan[1:], plan[2:])]
    assert len(plan) == 10 and max(gaps) - min(gaps) <= 1  # Karras spaces sigma ** (1 / 7) evenly
    uniform = [float(s) for s in torch.linspace(14.6, 0.03, 20)] + [0.0]  # long relative steps at the end
    late = computed_steps(20, 0.5, 2, uniform, placement="rho")
    assert len(late) == 10 and sum(1 for j in late if j >= 15) > sum(1 for j in computed_steps(20, 0.5, 2) if j >= 15)


@pytest.mark.parametrize("stochastic,sampler,placement", [(False, "euler", "rho"), (False, "dpmpp_2m", "rho"),
                                                          (True, "euler_ancestral", "index"),
                                                          (True, "dpmpp_2m_sde", "log-sigma")])
def test_auto_placement(stochastic, sampler, placement):
    import k_diffusion as K
    sigmas = tuple(float(s) for s in K.sampling.get_sigmas_karras(20, 0.03, 14.6))
    oracle = Forecast(budget=0.4)
    oracle.reset(O.RunInfo(sampler=sampler, sigmas=sigmas, batch_size=1, stochastic=stochastic))
    assert oracle.plan == computed_steps(20, 0.4, 2, () if placement == "index" else sigmas, placement)
