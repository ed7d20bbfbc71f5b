"""The adaptive oracles on the embedded model: NFE savings, faithfulness to the published rules, exact fallbacks."""

import math

import pytest
import torch

import adaptive_sampler as A
from adaptive_sampler import oracles as O
from adaptive_sampler.engine import GuidedDenoiser, NonFiniteError
from adaptive_sampler.oracles.linear_ag import LinearAGCoefficients, fit_coefficients
from adaptive_sampler.oracles import Decision
from adaptive_sampler.lab.search import greedy_skip_path

from conftest import CountingModel, guided_args, initial_noise

MAIN_SAMPLERS = ["euler", "ddim", "dpmpp_2m"]


def run(denoiser, name, oracle, steps=50, batch=8, scale=3.0, seed=0, model=None, **kw):
    sigmas = A.get_sigmas_ddim(steps, denoiser) if name == "ddim" else denoiser.get_sigmas(steps)
    x = initial_noise(batch, sigmas[0], seed=seed)
    torch.manual_seed(seed)
    return A.SAMPLERS[name](model or denoiser, x, sigmas, extra_args=guided_args(batch, scale), disable=True,
                            oracle=oracle, **kw)


def adaptive_oracles():
    return {
        "ag": O.AdaptiveGuidance(),
        "linear-ag": O.LinearAG(),
        "adaptive-diffusion": O.AdaptiveDiffusion(),
        "compose": O.Compose(),
    }


@pytest.mark.parametrize("sampler", MAIN_SAMPLERS)
def test_every_oracle_saves_nfe_at_50_steps(denoiser, sampler):
    for name, oracle in adaptive_oracles().items():
        model = CountingModel(denoiser)
        run(denoiser, sampler, oracle, model=model)
        summary = oracle.summary()
        assert summary.images == 8, name  # each image decides alone: NFE and counts are totals over the batch
        assert model.rows == summary.nfe, name
        assert summary.nfe < summary.nfe_full == 100 * 8, (name, summary)


@pytest.mark.parametrize("sampler", MAIN_SAMPLERS)
def test_compose_uses_fewer_nfe_than_either_part(denoiser, sampler):
    ag, ad, both = O.AdaptiveGuidance(), O.AdaptiveDiffusion(), O.Compose(O.AdaptiveGuidance(), O.AdaptiveDiffusion())
    for oracle in (ag, ad, both):
        run(denoiser, sampler, oracle)
    assert both.summary().nfe < min(ag.summary().nfe, ad.summary().nfe)


@pytest.mark.parametrize("sampler", list(A.SAMPLERS))
def test_disabled_oracles_are_bit_identical_to_full_cfg(denoiser, sampler):
    reference = run(denoiser, sampler, O.FullCFG(), steps=20)
    for oracle in (O.AdaptiveGuidance(threshold=1.0), O.AdaptiveGuidance(threshold=1.0, space="eps"),
                   O.AdaptiveDiffusion(threshold=0.0), O.CFGTruncation(1.0), O.Schedule("F20"),
                   O.Compose(O.AdaptiveGuidance(threshold=1.0), O.AdaptiveDiffusion(threshold=0.0))):
        assert torch.equal(run(denoiser, sampler, oracle, steps=20), reference), oracle
        assert oracle.summary().nfe_ratio == 1.0


def official_adaptive_diffusion(latents_after_step, threshold, max_skips):
    """A straightforward re-computation of the official rule (sparse_pipeline.py) on a recorded trajectory, with the
    consecutive-skip cap applied as stated (at most ``max_skips`` in a row)."""
    decisions, diffs, mask = [], [], []
    prev_latents = []
    for i, latent in enumerate(latents_after_step):
        if len(prev_latents) <= 3:
            decisions.append(True)
            if len(prev_latents) > 1:
                diffs.append((prev_latents[-1] - prev_latents[-2]).abs().mean().item())
        else:
            decisions.append(mask[-1])
        if len(prev_latents) >= 3:
            cur = (latent - prev_latents[-1]).abs().mean().item()
            diffs.append(cur)
            run_of_skips = 0
            for d in reversed(decisions):
                if d:
                    break
                run_of_skips += 1
            if run_of_skips >= max_skips:
                mask.append(True)
            else:
                mask.append(not abs((cur + diffs[-3]) / 2 - diffs[-2]) <= diffs[-2] * threshold)
        prev_latents.append(latent)
    return decisions


@pytest.mark.parametrize("sampler", MAIN_SAMPLERS)
@pytest.mark.parametrize("threshold,max_skips", [(0.01, 4), (0.05, 2), (0.2, 6)])
def test_adaptive_diffusion_matches_the_official_rule(denoiser, sampler, threshold, max_skips):
    latents = []
    batch = O.AdaptiveDiffusion(threshold=threshold, max_skips=max_skips)
    final = run(denoiser, sampler, batch, batch=4, callback=lambda e: latents.append(e["x"].clone()))
    # the callback's x at step i is the latent left by step i - 1; append the final one
    after_step = latents[1:] + [final]
    assert batch.summary().counts["CACHED"] > 0
    for row, oracle in enumerate(batch.images):  # the official rule, applied to each image's own latents
        expected = official_adaptive_diffusion([latent[row:row + 1] for latent in after_step], threshold, max_skips)
        assert [d is Decision.FULL for d in oracle.decisions] == expected
        runs, current = [], 0
        for d in oracle.decisions:
            current = current + 1 if d is Decision.CACHED else 0
            runs.append(current)
        assert max(runs) <= max_skips
        assert all(d is Decision.FULL for d in oracle.decisions[:4])
        assert len(oracle.estimates) == 50 and oracle.estimates[3] is None and oracle.estimates[4] is not None


def test_adaptive_guidance_switch_is_sticky_and_the_crossing_step_is_full(denoiser):
    oracle = O.AdaptiveGuidance()
    run(denoiser, "euler", oracle, batch=1)
    k = oracle.switch_step
    assert k is not None and 0 < k < 49
    assert oracle.decisions[: k + 1] == [Decision.FULL] * (k + 1)
    assert oracle.decisions[k + 1:] == [Decision.COND] * (49 - k)
    gammas = oracle.gammas
    assert gammas[k] >= oracle.threshold and all(g < oracle.threshold for g in gammas[:k])
    assert all(g is None for g in gammas[k + 1:])
    assert oracle.summary().ag_switch_step == k


def test_adaptive_guidance_switches_each_image_of_a_batch_where_it_would_switch_alone(denoiser):
    singles, alone = [], []
    sigmas = denoiser.get_sigmas(50)
    labels = torch.tensor([0, 3, 5, 8])

    def sample(x, cond, oracle):
        return A.sample_euler(denoiser, x, sigmas, disable=True, oracle=oracle,
                              extra_args=dict(cond=cond, uncond=torch.full_like(cond, 10), cond_scale=3.0))

    for seed in range(4):
        oracle = O.AdaptiveGuidance()
        alone.append(sample(initial_noise(1, sigmas[0], seed=seed), labels[seed:seed + 1], oracle))
        singles.append(oracle.switch_step)
    assert len(set(singles)) > 1  # the images really switch at different steps
    batch_oracle = O.AdaptiveGuidance()
    together = sample(torch.cat([initial_noise(1, sigmas[0], seed=s) for s in range(4)]), labels, batch_oracle)
    assert [image.switch_step for image in batch_oracle.images] == singles
    assert batch_oracle.summary().ag_switch_step == min(singles)
    assert torch.allclose(together, torch.cat(alone), atol=1e-4)


@pytest.mark.parametrize("space", sorted(O.DEFAULT_AG_THRESHOLDS))
def test_default_thresholds_switch_each_image_mid_run(denoiser, space):
    """Per image the published 0.991 (x0) switches 35-55% through the steps: neither at once nor never."""
    for sampler in MAIN_SAMPLERS:
        oracle = O.AdaptiveGuidance(space=space)
        run(denoiser, sampler, oracle)
        switches = [image.switch_step for image in oracle.images]
        assert all(s is not None and 15 <= s < 30 for s in switches), switches
        assert max(switches) >= 25  # the batch's last image crosses in the second half


def test_eps_space_has_no_blind_default(denoiser):
    with pytest.raises(ValueError, match="no calibrated default in 'eps' space"):
        O.AdaptiveGuidance(space="eps")
    gammas = O.AdaptiveGuidance(threshold=1.0, space="eps")
    run(denoiser, "euler", gammas, batch=1)
    assert gammas.gammas[0] > 0.9997  # why: a published-style threshold would switch at the first step


def test_linear_ag_alternates_then_switches(denoiser):
    oracle = O.LinearAG()
    run(denoiser, "euler", oracle, batch=1)
    k = oracle.switch_step
    assert k is not None
    guided = oracle.decisions[: k + 1]
    assert guided[0] is Decision.FULL
    assert all(a is not b for a, b in zip(guided, guided[1:]))  # F L F L ...
    assert set(guided) == {Decision.FULL, Decision.LINEAR}
    assert guided[-1] is Decision.FULL  # gamma is measured on FULL steps only
    assert set(oracle.decisions[k + 1:]) == {Decision.COND}


def test_linear_ag_delta_rule_estimate(denoiser):
    """With the delta rule the uncond eps of a LINEAR step is u_{k-1} + c_k - c_{k-1}."""
    seen = []

    class Spy(O.LinearAG):
        def _observe(self, record):
            super()._observe(record)
            seen.append(record)

    run(denoiser, "dpmpp_2m", Spy(threshold=1.0), steps=10, batch=1)
    full, linear = seen[2], seen[3]
    assert (full.decision, linear.decision) == (Decision.FULL, Decision.LINEAR)
    eps = lambda r, p: (r.x - p) / r.sigma  # noqa: E731
    expected = eps(full, full.uncond) + eps(linear, linear.cond) - eps(full, full.cond)
    assert torch.allclose(eps(linear, linear.uncond), expected, atol=1e-4)


def test_fit_coefficients_recovers_a_known_affine_rule():
    g = torch.Generator().manual_seed(0)
    steps, truth = 6, (0.6, -0.3, 0.7, 0.05)
    trajs = []
    for _ in range(3):
        traj = [(torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g))]
        for _ in range(1, steps):
            c = torch.randn(4, 1, 8, 8, generator=g)
            cp, up = traj[-1]
            traj.append((c, truth[0] * c + truth[1] * cp + truth[2] * up + truth[3]))
        trajs.append(traj)
    coef = fit_coefficients(trajs, sampler="euler", sigmas=list(range(steps, -1, -1)), model="synthetic")
    assert coef.coefficients[0] is None
    for row in coef.coefficients[1:]:
        assert row == pytest.approx(truth, abs=1e-6)
    assert all(r == pytest.approx(1.0) for r in coef.r2[1:])


def test_linear_ag_coefficients_round_trip_and_are_refused_elsewhere(denoiser, tmp_path):
    sigmas = denoiser.get_sigmas(10)
    rows = (None,) + ((1.0, -1.0, 1.0, 0.0),) * 9
    coef = LinearAGCoefficients(sampler="euler", steps=10, sigmas=tuple(sigmas.tolist()), model="embedded",
                                coefficients=rows)
    path = tmp_path / "c.json"
    coef.save(path)
    loaded = LinearAGCoefficients.load(path)
    assert loaded == coef
    # fitted-file LinearAG with the delta rule coefficients equals the model-free LinearAG
    a = run(denoiser, "euler", O.LinearAG(path, threshold=1.0), steps=10, batch=2)
    b = run(denoiser, "euler", O.LinearAG(None, threshold=1.0), steps=10, batch=2)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="sampler 'euler', not 'dpmpp_2m'"):
        run(denoiser, "dpmpp_2m", O.LinearAG(path), steps=10, batch=2)
    with pytest.raises(ValueError, match="fitted for 10 steps, not 12"):
        run(denoiser, "euler", O.LinearAG(path), steps=12, batch=2)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a LinearAG coefficient file"):
        O.LinearAG(path)


def test_conditioning_change_forces_a_full_step_and_no_stale_cache(denoiser):
    sigmas = denoiser.get_sigmas(20)
    x = initial_noise(2, sigmas[0])
    oracle = O.Compose(O.AdaptiveGuidance(threshold=0.5), O.AdaptiveDiffusion(threshold=1.0))
    guided = GuidedDenoiser(denoiser, x, sigmas, guided_args(2), oracle, "euler",
                            conditioning_changed=lambda i: i == 10)
    s_in = x.new_ones([2])
    for i in range(20):
        denoised = guided(x, sigmas[i] * s_in, i)
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    for image in oracle.images:
        assert image.decisions[10] is Decision.FULL
        assert Decision.CACHED in image.decisions[:10] and Decision.COND in image.decisions[:10]


class FaultyModel(torch.nn.Module):
    """Returns NaN on chosen calls: a model that misbehaves on some step."""

    def __init__(self, inner, bad_calls):
        super().__init__()
        self.inner, self.bad_calls, self.calls = inner, set(bad_calls), 0

    def forward(self, x, sigma, **kw):
        out = self.inner(x, sigma, **kw)
        self.calls += 1
        return out * math.nan if self.calls in self.bad_calls else out

    @property
    def sigmas(self):
        return self.inner.sigmas


def test_non_finite_cond_prediction_falls_back_to_full_and_is_never_cached(denoiser):
    reference_oracle = O.CFGTruncation(0.5)
    reference = run(denoiser, "euler", reference_oracle, steps=10, batch=2)
    oracle = O.CFGTruncation(0.5)
    out = run(denoiser, "euler", oracle, steps=10, batch=2, model=FaultyModel(denoiser, {7}))
    assert torch.isfinite(out).all()
    assert oracle.decisions[6] is Decision.FULL  # the 7th call was step 6, planned COND
    assert oracle.summary().overrides == ((6, "COND -> FULL: non-finite prediction"),)
    assert oracle.summary().nfe == reference_oracle.summary().nfe + 2  # the wasted COND row plus the extra uncond
    assert not torch.equal(out, reference)  # step 6 ran guided instead of cond-only


def test_non_finite_full_prediction_is_a_clear_error(denoiser):
    with pytest.raises(NonFiniteError, match="step 3"):
        run(denoiser, "euler", O.FullCFG(), steps=10, batch=2, model=FaultyModel(denoiser, {4}))


def test_schedule_strings():
    assert O.Schedule.parse("F2 C L S3") == (Decision.FULL,) * 2 + (Decision.COND, Decision.LINEAR) + (Decision.CACHED,) * 3
    for bad in ("", "F2 X", "F0"):
        with pytest.raises(ValueError, match="decisions"):
            O.Schedule(bad)


def test_cfg_truncation(denoiser):
    oracle = O.CFGTruncation(0.3)
    run(denoiser, "euler", oracle, steps=20, batch=2)
    assert oracle.summary().schedule == "F" * 6 + "C" * 14


def test_summary_resets_between_runs(denoiser):
    oracle = O.Compose()
    run(denoiser, "euler", oracle, steps=50, batch=2)
    first = oracle.summary()
    run(denoiser, "euler", oracle, steps=12, batch=2)
    assert oracle.summary().steps == 12 and first.steps == 50


def test_greedy_skip_path_stays_within_tolerance(denoiser):
    sigmas = denoiser.get_sigmas(20)
    x = initial_noise(1, sigmas[0], seed=3)
    args = guided_args(1)
    plan = greedy_skip_path(denoiser, x, sigmas, args, sampler="euler", min_psnr=35.0)
    assert plan.plan.count(Decision.CACHED) > 0
    full = A.sample_euler(denoiser, x, sigmas, extra_args=args, disable=True)
    skipped = A.sample_euler(denoiser, x, sigmas, extra_args=args, disable=True, oracle=plan)
    mse = (full - skipped).pow(2).mean().item()
    assert 10 * math.log10(4 / mse) >= 35.0


def test_host_modes_build_their_oracles_and_refuse_unknown_modes():
    kinds = {mode: type(O.mode_oracle(mode, ag_threshold=0.99)).__name__ for mode in O.HOST_MODES}
    assert kinds == {"forecast": "Forecast", "ag": "AdaptiveGuidance", "linear-ag": "LinearAG",
                     "adaptive-diffusion": "AdaptiveDiffusion", "ag+adaptive-diffusion": "Compose",
                     "off": "NoneType"}
    with pytest.raises(ValueError, match="mode must be one of"):
        O.mode_oracle("fast")


def test_an_oracle_that_decides_per_image_says_so_when_the_conditioning_cannot_be_split(denoiser):
    """cond / uncond that are not batched tensors cannot be evaluated row by row: the batch decides as one, noted."""
    def model(x, sigma, cond):
        return denoiser(x, sigma, cond=torch.as_tensor(cond))

    sigmas = denoiser.get_sigmas(10)
    oracle = O.AdaptiveGuidance()
    A.sample_euler(model, initial_noise(2, sigmas[0]), sigmas, disable=True, oracle=oracle,
                   extra_args=dict(cond=[1, 2], uncond=[10, 10], cond_scale=3.0))
    summary = oracle.summary()
    assert summary.images == 1 and not oracle.images
    assert any("decided per batch" in why for _, why in summary.overrides)
