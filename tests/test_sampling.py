"""Exactness of the oracle-driven loops against k-diffusion and diffusers, and NFE accounting."""

import pytest
import torch
import k_diffusion as K

import adaptive_sampler as A
from adaptive_sampler.oracles import Decision

from conftest import CountingModel, guided_args, initial_noise, plain_cfg

K_SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde"]


@pytest.mark.parametrize("name", K_SAMPLERS)
@pytest.mark.parametrize("steps,scale", [(12, 3.0), (25, 5.0)])
def test_full_cfg_equals_k_diffusion(denoiser, name, steps, scale):
    sigmas = denoiser.get_sigmas(steps)
    x = initial_noise(6, sigmas[0], seed=steps)
    args = guided_args(6, scale)
    torch.manual_seed(123)
    reference = getattr(K.sampling, f"sample_{name}")(plain_cfg(denoiser), x, sigmas, extra_args=args, disable=True)
    torch.manual_seed(123)
    ours = A.SAMPLERS[name](denoiser, x, sigmas, extra_args=args, disable=True, oracle=A.FullCFG())
    assert (ours - reference).abs().max().item() <= 1e-5


def test_full_cfg_equals_k_diffusion_with_karras_schedule_and_churn(denoiser):
    sigmas = K.sampling.get_sigmas_karras(15, denoiser.sigma_min.item(), denoiser.sigma_max.item())
    x = initial_noise(4, sigmas[0])
    args = guided_args(4, 4.0)
    torch.manual_seed(7)
    reference = K.sampling.sample_euler(plain_cfg(denoiser), x, sigmas, extra_args=args, disable=True, s_churn=1.0)
    torch.manual_seed(7)
    ours = A.sample_euler(denoiser, x, sigmas, extra_args=args, disable=True, s_churn=1.0)
    assert (ours - reference).abs().max().item() <= 1e-5


def diffusers_ddim(denoiser, x_vp, steps, args, eta=0.0, noises=None):
    """Reference: diffusers' DDIMScheduler with Stable Diffusion 1.5's config, CFG in eps space."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1,
                          set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon")
    sched.set_timesteps(steps)
    unet = denoiser.inner_model
    cond, uncond, scale = args["cond"], args["uncond"], args["cond_scale"]
    for k, t in enumerate(sched.timesteps):
        tt = torch.full((x_vp.shape[0],), float(t))
        e_c, e_u = unet(torch.cat([x_vp, x_vp]), torch.cat([tt, tt]), torch.cat([cond, uncond])).chunk(2)
        eps = e_u + (e_c - e_u) * scale
        extra = {} if noises is None else {"variance_noise": noises[k]}
        x_vp = sched.step(eps, t, x_vp, eta=eta, **extra).prev_sample
    return x_vp, sched.timesteps


@pytest.mark.parametrize("steps", [10, 20, 50])
def test_ddim_equals_diffusers(denoiser, steps):
    sigmas = A.get_sigmas_ddim(steps, denoiser)
    assert len(sigmas) == steps + 1
    z = initial_noise(5, 1.0, seed=steps)
    args = guided_args(5, 3.0)
    reference, timesteps = diffusers_ddim(denoiser, z, steps, args)
    assert torch.equal(timesteps.flip(0), A.ddim_timesteps(steps))
    ours = A.sample_ddim(denoiser, z * (1 + sigmas[0] ** 2) ** 0.5, sigmas, extra_args=args, disable=True)
    ours_vp = ours / (1 + sigmas[-1] ** 2) ** 0.5
    assert (ours_vp - reference).abs().max().item() <= 1e-4


def test_ddim_with_eta_equals_diffusers_given_the_same_noise(denoiser):
    steps, eta = 20, 0.7
    sigmas = A.get_sigmas_ddim(steps, denoiser)
    z = initial_noise(3, 1.0, seed=5)
    args = guided_args(3, 3.0)
    g = torch.Generator().manual_seed(11)
    noises = [torch.randn(z.shape, generator=g) for _ in range(steps)]
    reference, _ = diffusers_ddim(denoiser, z, steps, args, eta=eta, noises=noises)
    it = iter(noises)
    # diffusers adds std_dev_t * z in the VP scale; in k-diffusion scale that is sigma_up * z.
    ours = A.sample_ddim(denoiser, z * (1 + sigmas[0] ** 2) ** 0.5, sigmas, extra_args=args, disable=True, eta=eta,
                         noise_sampler=lambda s, s_next: next(it))
    assert (ours / (1 + sigmas[-1] ** 2) ** 0.5 - reference).abs().max().item() <= 1e-4


def test_ddim_timesteps_match_a1111_grid():
    assert A.ddim_timesteps(20).tolist() == [t + 1 for t in range(0, 1000, 50)]
    assert len(A.ddim_timesteps(30)) == len(range(0, 1000, 1000 // 30))
    with pytest.raises(ValueError, match="steps"):
        A.ddim_timesteps(-3)


@pytest.mark.parametrize("name", list(A.SAMPLERS))
def test_nfe_accounting_counts_model_rows(denoiser, name):
    model = CountingModel(denoiser)
    sigmas = A.get_sigmas_ddim(20, denoiser) if name == "ddim" else denoiser.get_sigmas(20)
    batch = 4
    oracle = A.Schedule("F4 C3 F L F L S2 F S C5")
    A.SAMPLERS[name](model, initial_noise(batch, sigmas[0]), sigmas, extra_args=guided_args(batch), disable=True,
                     oracle=oracle)
    summary = oracle.summary()
    assert model.rows == summary.nfe * batch
    assert summary.nfe == 4 * 2 + 3 + 2 + 1 + 2 + 1 + 2 + 5
    assert summary.nfe_full == 40
    assert summary.counts == {"FULL": 7, "COND": 8, "LINEAR": 2, "CACHED": 3}
    assert summary.overrides == ()
    # FULL steps are one batched call of 2 * batch rows
    assert model.calls == 20 - 3


def test_cond_and_uncond_are_one_batched_call(denoiser):
    model = CountingModel(denoiser)
    sigmas = denoiser.get_sigmas(5)
    A.sample_euler(model, initial_noise(3, sigmas[0]), sigmas, extra_args=guided_args(3), disable=True)
    assert model.calls == 5 and model.rows == 30


def test_other_extra_args_are_passed_unchanged(denoiser):
    seen = []

    def model(x, sigma, cond, marker):
        seen.append(marker)
        return denoiser(x, sigma, cond=cond)

    sigmas = denoiser.get_sigmas(3)
    A.sample_dpmpp_2m(model, initial_noise(2, sigmas[0]), sigmas, extra_args={**guided_args(2), "marker": "m"},
                      disable=True)
    assert seen == ["m"] * 3


def test_callback_sees_every_step_with_its_decision(denoiser):
    events = []
    sigmas = denoiser.get_sigmas(8)
    A.sample_euler(denoiser, initial_noise(2, sigmas[0]), sigmas, extra_args=guided_args(2), disable=True,
                   oracle=A.Schedule("F4 S C3"), callback=events.append)
    assert [e["i"] for e in events] == list(range(8))
    assert [e["decision"] for e in events] == [Decision.FULL] * 4 + [Decision.CACHED] + [Decision.COND] * 3


def test_cached_step_reuses_eps_and_updates_latent(denoiser):
    """For Euler a CACHED step reuses the last eps: two Euler steps with one eps are one merged Euler step."""
    sigmas = denoiser.get_sigmas(6)
    x = initial_noise(2, sigmas[0])
    args = guided_args(2)
    skipped = A.sample_euler(denoiser, x, sigmas, extra_args=args, disable=True, oracle=A.Schedule("F4 S F"))
    merged_sigmas = torch.cat([sigmas[:4], sigmas[5:]])
    merged = A.sample_euler(denoiser, x, merged_sigmas, extra_args=args, disable=True)
    assert (skipped - merged).abs().max().item() <= 1e-5


@pytest.mark.parametrize("bad,match", [
    (dict(extra_args={"cond": torch.arange(2), "uncond": torch.full((3,), 10), "cond_scale": 3.0}), "uncond"),
    (dict(extra_args={"cond": torch.arange(2), "uncond": torch.full((2,), 10), "cond_scale": float("nan")}), "cond_scale"),
    (dict(extra_args={"cond": torch.arange(2), "uncond": torch.full((2,), 10)}), "cond_scale"),
    (dict(sigmas=torch.tensor([1.0, 2.0, 0.0])), "sigmas"),
    (dict(sigmas=torch.tensor([3.0, float("nan"), 0.0])), "sigmas"),
    (dict(oracle="no-such-oracle"), "oracle"),
    (dict(oracle=42), "oracle"),
])
def test_bad_input_is_a_clear_error(denoiser, bad, match):
    kwargs = dict(sigmas=denoiser.get_sigmas(4), extra_args=guided_args(2), oracle=None)
    kwargs.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        A.sample_euler(denoiser, initial_noise(2, 10.0), kwargs.pop("sigmas"), disable=True, **kwargs)


def test_negative_steps_is_a_clear_error(denoiser):
    with pytest.raises(ValueError, match="steps"):
        A.get_sigmas_ddim(-1, denoiser)
