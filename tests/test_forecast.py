"""Forecast: a fixed NFE budget whose skipped steps extrapolate eps."""

import k_diffusion as K
import pytest
import torch

from adaptive_sampler import oracles as O
from adaptive_sampler.oracles.forecast import Forecast, computed_steps, even_plan, extrapolate, placement_positions
from adaptive_sampler.oracles.x0_forecast import X0Ensemble, chebyshev_weights, linear_weights, spectral_weights
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
        if record.decision is not Decision.CACHED:
            stored = self._ensemble.values[-1] if self._ensemble is not None else self._history[-1][1]
            self.seen = (record, stored)


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
    # eps extrapolated by a quadratic; x0 forecast by the per-image ensemble
    assert (oracle._ensemble is not None) == (space == "x0") and oracle._history.maxlen == 3


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


def test_x0_weight_placement_computes_more_of_the_steps_that_give_x0_most_weight():
    sigmas = [float(s) for s in torch.linspace(14.6, 0.03, 20)] + [0.0]  # the last steps cut sigma the most
    positions = placement_positions("x0-weight", sigmas, 20)
    weights = [b - a for a, b in zip(positions, positions[1:])]
    assert weights == pytest.approx([1 - (sigmas[j + 1] / sigmas[j]) ** 2 for j in range(19)])
    plan = computed_steps(20, 0.5, 2, sigmas, placement="x0-weight")
    assert len(plan) == 10 and sum(1 for j in plan if j >= 15) > sum(1 for j in computed_steps(20, 0.5, 2) if j >= 15)


@pytest.mark.parametrize("warmup", [1, 2, 3])
def test_above_half_an_even_placement_isolates_every_skipped_step(warmup):
    """One rule at every budget: where the axis is even, a skip never sits beside another while the budget allows."""
    for steps in range(4, 41):
        for total in range(max(steps // 2 + 1, warmup + 1), steps):
            plan = computed_steps(steps, total / steps, warmup)
            assert len(plan) == total and set(range(warmup)) | {steps - 1} <= plan
            if 2 * (steps - total) <= steps - warmup:
                assert not any(j not in plan and j + 1 not in plan for j in range(steps - 1))


def test_the_plan_is_the_exact_minimum_of_its_error_model():
    """Brute force over every choice of computed steps on small runs: the dynamic program finds the least cost (each
    skipped step: the squared length of its stretch), on uneven axes too."""
    import itertools
    import random
    rng = random.Random(0)
    for _ in range(60):
        steps, warmup = rng.randint(3, 11), rng.randint(1, 2)
        positions = sorted(rng.random() * 5 for _ in range(steps))
        middle = range(warmup, steps - 1)
        for extra in range(0, len(middle) + 1):
            def cost(chosen):
                plan = sorted({warmup - 1, steps - 1, *chosen})
                return sum((b - a - 1) ** 0.5 * (positions[b] - positions[a]) ** 2 for a, b in zip(plan, plan[1:]))
            best = min(cost(c) for c in itertools.combinations(middle, extra))
            found = even_plan(positions, warmup - 1, extra)
            assert len(found) == extra and found <= set(middle) and cost(found) == pytest.approx(best)


def test_a_multistep_solver_computes_a_step_whose_forecast_would_act_over_a_long_next_step():
    """DPM++ 2M corrects a computed step with the previous prediction: on SD's own schedule (long last steps) the
    plan computes the third-to-last step there, which a one-step solver may skip."""
    from adaptive_sampler.lab.experiment import embedded_target
    sigmas = embedded_target("sd").model.get_sigmas(20).tolist()  # ... 0.47, 0.36, 0.23, 0.03, 0
    one_step = computed_steps(20, 0.4, 2, sigmas, "rho")
    multistep = computed_steps(20, 0.4, 2, sigmas, "rho", carry=1)
    assert len(multistep) == len(one_step) == 8
    assert 17 in multistep and 17 not in one_step


def test_a_karras_flow_schedule_keeps_its_crowded_tail_skipped_at_every_budget():
    """The break this rule fixes: on a flow model's Karras schedule the last steps barely move sigma; a rule that
    switched to spreading skips in step index above half the budget skipped the long early steps instead."""
    import k_diffusion as K
    sigmas = [float(s) for s in K.sampling.get_sigmas_karras(20, 0.001, 1.0)]
    previous = None
    for total in range(3, 20):
        plan = computed_steps(20, total / 20, 1, sigmas, "step-length")
        first_skip = min(j for j in range(20) if j not in plan)
        assert previous is None or first_skip >= previous  # computed steps fill the schedule from its long steps
        previous = first_skip


@pytest.mark.parametrize("stochastic,sampler,placement", [(False, "euler", "rho"), (False, "dpmpp_2m", "rho"),
                                                          (True, "euler_ancestral", "x0-weight"),
                                                          (True, "dpmpp_2m_sde", "x0-weight")])
def test_auto_placement(stochastic, sampler, placement):
    import k_diffusion as K
    sigmas = tuple(float(s) for s in K.sampling.get_sigmas_karras(20, 0.03, 14.6))
    oracle = Forecast(budget=0.4)
    oracle.reset(O.RunInfo(sampler=sampler, sigmas=sigmas, batch_size=1, stochastic=stochastic))
    carry = int(sampler.startswith("dpmpp"))  # multistep solvers: a forecast acts one step further
    assert oracle.plan == computed_steps(20, 0.4, 2, () if placement == "index" else sigmas, placement, carry)


# -- flow models -------------------------------------------------------------------------------------------------------
def _flow_sigmas(steps, shift):
    from adaptive_sampler.flow import time_snr_shift
    return tuple(float(time_snr_shift(shift, 1 - j / steps)) for j in range(steps + 1))


@pytest.mark.parametrize("sampler,stochastic", [("euler", False), ("dpmpp_2m", False), ("euler_ancestral", True),
                                                ("dpmpp_2m_sde", True)])
def test_auto_choices_on_flow_runs(sampler, stochastic):
    """Flow runs forecast x0 and place computed steps by step length; deterministic ones mix reuse, linear and
    quadratic forecasts after a one-step warm-up, stochastic ones keep Spectrum's fit and a two-step warm-up."""
    sigmas = _flow_sigmas(20, 3.0)
    oracle = Forecast()
    oracle.reset(O.RunInfo(sampler=sampler, sigmas=sigmas, batch_size=1, stochastic=stochastic, flow=True))
    budget = O.LEVELS[O.DEFAULT_LEVEL][0 if not stochastic else 2 if "sde" in sampler else 1]
    warmup = 2 if stochastic else 1
    assert oracle._space == "x0" and oracle._ensemble is not None
    assert oracle._ensemble.forecasts == (("reuse", "linear", "spectral") if stochastic
                                          else ("reuse", "linear", "quadratic"))
    assert oracle.plan == computed_steps(20, budget, warmup, sigmas, "step-length", int(sampler.startswith("dpmpp")))


def test_step_length_placement_is_step_index_on_an_even_schedule_and_computes_more_late_steps_on_a_shifted_one():
    even, shifted = _flow_sigmas(20, 1.0), _flow_sigmas(20, 3.0)
    on_even = sorted(computed_steps(20, 0.4, 1, even, "step-length"))
    gaps = [b - a for a, b in zip(on_even, on_even[1:])]
    assert len(on_even) == 8 and max(gaps) - min(gaps) <= 1  # evenly in step index
    late = computed_steps(20, 0.4, 1, shifted, "step-length")
    assert len(late) == 8 and sum(1 for j in late if j >= 10) > sum(1 for j in computed_steps(20, 0.4, 1) if j >= 10)
    positions = placement_positions("step-length", shifted, 20)
    lengths = [b - a for a, b in zip(positions, positions[1:])]
    assert lengths == pytest.approx([abs(shifted[j] - shifted[j + 1]) ** (2 / 3) for j in range(19)])


def test_index_placement_spreads_computed_steps_evenly_from_the_warm_up_to_the_last_step():
    plan = sorted(computed_steps(20, 0.4, 1))
    gaps = [b - a for a, b in zip(plan, plan[1:])]
    assert len(plan) == 8 and plan[0] == 0 and plan[-1] == 19 and max(gaps) - min(gaps) <= 1


def test_the_quadratic_forecast_is_exact_for_a_parabola_in_step_index():
    from adaptive_sampler.oracles.x0_forecast import quadratic_weights
    times = [0, 3, 5, 8]
    index = torch.tensor(times, dtype=torch.float64)
    parabola = lambda t: 2 - 0.3 * t + 0.05 * t * t  # noqa: E731
    for at in (9, 10, 12):
        assert float(quadratic_weights(times, at) @ parabola(index)) == pytest.approx(parabola(at))
    assert torch.equal(quadratic_weights([0, 3], 4), linear_weights([0, 3], 4))
    with pytest.raises(ValueError, match="forecasts must be a subset"):
        X0Ensemble(10, forecasts=("linear", "quadratic"))


NOT_MET_SDE = pytest.mark.xfail(
    strict=False, reason="not met (docs/method-notes.md, 'Robust plans'): DPM++ 2M SDE loses to fewer steps by about "
    "1.5 dB here (28.2-28.7 against 29.6-29.7 dB)")


@pytest.mark.parametrize("variant", ["euler", "dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde"])
@pytest.mark.parametrize("schedule", ["shift 1", "shift 3"])
def test_on_the_flow_model_the_default_beats_fewer_steps_at_its_nfe(variant, schedule, request):
    """Held-out seeds: the default at its level's NFE is closer to full CFG than full CFG with as many steps as it
    computes (same seeds and noise draws), on every flow sampler, at 24 steps and scale 4."""
    from adaptive_sampler.lab.experiment import embedded_target, generate_variant
    from adaptive_sampler.lab.metrics import psnr
    if variant == "dpmpp_2m_sde":
        request.applymarker(NOT_MET_SDE)
    target = embedded_target("flow")
    labels, seeds = list(range(10)), [9000 + j for j in range(10)]
    full, _ = generate_variant(target, variant, schedule, 24, 4.0, labels, seeds)
    ours, summary = generate_variant(target, variant, schedule, 24, 4.0, labels, seeds, oracle=O.recommended())
    computed = round(summary.nfe_ratio * 24)
    fewer, _ = generate_variant(target, variant, schedule, computed, 4.0, labels, seeds)
    ours_db, fewer_db = float(psnr(ours, full).mean()), float(psnr(fewer, full).mean())
    assert summary.nfe_ratio <= 0.6 and ours_db >= 20.0 and ours_db > fewer_db, (ours_db, fewer_db)


def test_flow_runs_extrapolate_x0_in_sigma():
    """A flow run's linear and quadratic x0 forecasts are exact for a parabola in sigma, whatever the spacing of its
    steps in sigma; SD-style runs keep step index."""
    sigmas = _flow_sigmas(12, 1.0)
    karras = tuple(float(s) for s in K.sampling.get_sigmas_karras(12, 0.002, 1.0))
    for schedule in (sigmas, karras):
        oracle = Forecast()
        oracle.reset(O.RunInfo(sampler="euler", sigmas=schedule, batch_size=1, flow=True))
        ensemble, parabola = oracle._ensemble, (lambda s: 2 - 3 * s + 1.5 * s * s)  # noqa: E731
        for at in (0, 1, 3):
            ensemble.values.append(torch.full((1, 2), parabola(schedule[at])))
            ensemble.times.append(at)
        forecasts = ensemble._forecasts(10)
        assert float(forecasts["quadratic"][0, 0]) == pytest.approx(parabola(schedule[10]))
    oracle = Forecast()
    oracle.reset(O.RunInfo(sampler="euler_ancestral", sigmas=karras, batch_size=1, stochastic=True))
    assert oracle._ensemble.positions is None


@pytest.mark.parametrize("variant", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("steps", [12, 20])
def test_on_a_flow_model_sampled_on_a_karras_schedule_the_default_beats_fewer_steps(variant, steps):
    """Karras's schedule on a flow model (A1111's default for DPM++ 2M on SD3; a scheduler choice in ComfyUI) crowds
    the last steps near sigma 0: forecasts in step index ran off there (-5.5 dB at 12 steps); in sigma the default
    stays above full CFG on as many Karras steps as it computes (12 steps, Euler / DPM++ 2M: 19.0 / 17.8 dB against
    12.7 / 15.0 for fewer steps; the one-rule plan gave up 1.6 dB on DPM++ 2M there for monotone budgets, method
    notes)."""
    from adaptive_sampler.lab.experiment import embedded_target, generate
    from adaptive_sampler.lab.metrics import psnr
    target = embedded_target("flow")
    model = target.model
    karras = lambda n: K.sampling.get_sigmas_karras(n, float(model.sigma_min), float(model.sigma_max))  # noqa: E731
    labels, seeds = list(range(10)), [9000 + j for j in range(10)]
    full, _ = generate(target, variant, steps, 5.0, labels, seeds, sigmas=karras(steps))
    ours, summary = generate(target, variant, steps, 5.0, labels, seeds, sigmas=karras(steps), oracle=O.recommended())
    computed = round(summary.nfe_ratio * steps)
    fewer, _ = generate(target, variant, computed, 5.0, labels, seeds, sigmas=karras(computed))
    ours_db, fewer_db = float(psnr(ours, full).mean()), float(psnr(fewer, full).mean())
    assert ours_db >= 17.0 and ours_db > fewer_db + 2.0, (ours_db, fewer_db)
