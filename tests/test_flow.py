"""Flow-matching models: our loops against ComfyUI's flow samplers, re-implemented here from ComfyUI's formulas
(``comfy/k_diffusion/sampling.py`` of v0.33.0: ``sample_euler_ancestral_RF``, ``sample_dpmpp_2m_sde`` with the
``CONST`` half-log-SNR and ``offset_first_sigma_for_snr``), and the flow conventions (recognition, CFG 1, errors)."""

import math

import k_diffusion as K
import pytest
import torch

import adaptive_sampler as A
from adaptive_sampler import embedded
from adaptive_sampler import oracles as O
from adaptive_sampler.flow import FlowDenoiser, is_flow_model, time_snr_shift
from adaptive_sampler.lab.experiment import PerImageGaussian

from conftest import CountingModel, guided_args, plain_cfg


@pytest.fixture(scope="module", params=[1.0, 3.0], ids=["shift1", "shift3"])
def flow_model(request):
    torch.set_num_threads(2)
    return embedded.load_flow_denoiser(shift=request.param)


def noise(batch, seed=0):
    return torch.randn((batch, *embedded.IMAGE_SHAPE), generator=torch.Generator().manual_seed(seed))


# -- ComfyUI's flow samplers, written from its formulas (the reference) ---------------------------------------------
def comfy_euler_ancestral_rf(model, x, sigmas, extra_args, eta=1.0, s_noise=1.0, noise_sampler=None):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            downstep_ratio = 1 + (sigmas[i + 1] / sigmas[i] - 1) * eta
            sigma_down = sigmas[i + 1] * downstep_ratio
            alpha_ip1 = 1 - sigmas[i + 1]
            alpha_down = 1 - sigma_down
            renoise_coeff = (sigmas[i + 1] ** 2 - sigma_down ** 2 * alpha_ip1 ** 2 / alpha_down ** 2) ** 0.5
            sigma_down_i_ratio = sigma_down / sigmas[i]
            x = sigma_down_i_ratio * x + (1 - sigma_down_i_ratio) * denoised
            if eta > 0:
                x = (alpha_ip1 / alpha_down) * x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * renoise_coeff
    return x


def comfy_dpmpp_2m_sde_const(model, x, sigmas, extra_args, percent_to_sigma, eta=1.0, s_noise=1.0,
                             noise_sampler=None, solver_type="midpoint"):
    sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
    if noise_sampler is None:
        noise_sampler = K.sampling.BrownianTreeNoiseSampler(x, sigma_min, sigma_max)
    if sigmas[0] >= 1:  # offset_first_sigma_for_snr
        sigmas = sigmas.clone()
        sigmas[0] = percent_to_sigma(1e-4)
    lambda_fn = lambda sigma: sigma.logit().neg()  # noqa: E731  sigma_to_half_log_snr for CONST
    s_in = x.new_ones([x.shape[0]])
    old_denoised, h, h_last = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = lambda_fn(sigmas[i]), lambda_fn(sigmas[i + 1])
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta > 0 and s_noise > 0:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() \
                    * s_noise
        old_denoised = denoised
        h_last = h
    return x


# -- the loops equal ComfyUI's flow samplers with full CFG -----------------------------------------------------------
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_euler_ancestral_takes_comfyuis_rectified_flow_step(flow_model, eta):
    sigmas = flow_model.get_sigmas(12)
    x = noise(3) * sigmas[0]
    seeds = [11, 12, 13]
    ours = A.sample_euler_ancestral(flow_model, x, sigmas, extra_args=guided_args(3, 4.0), disable=True, eta=eta,
                                    noise_sampler=PerImageGaussian(x, seeds))
    theirs = comfy_euler_ancestral_rf(plain_cfg(flow_model), x, sigmas, guided_args(3, 4.0), eta=eta,
                                      noise_sampler=PerImageGaussian(x, seeds))
    assert (ours - theirs).abs().max() < 1e-5
    # ... and not k-diffusion's VE ancestral step, which gives another picture on a flow model
    torch.manual_seed(0)
    ve = K.sampling.sample_euler_ancestral(plain_cfg(flow_model), x, sigmas, extra_args=guided_args(3, 4.0),
                                           disable=True, eta=eta, noise_sampler=PerImageGaussian(x, seeds))
    assert (ours - ve).abs().max() > 0.1


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_dpmpp_2m_sde_takes_comfyuis_half_log_snr_step_from_the_offset_first_sigma(flow_model, solver_type):
    sigmas = flow_model.get_sigmas(12)
    x = noise(3) * sigmas[0]
    counting = CountingModel(flow_model)
    called = []
    counting.register_forward_pre_hook(lambda module, args: called.append(float(args[1].reshape(-1)[0])))
    tree = dict(x=x, sigma_min=sigmas[-2], sigma_max=sigmas[0], seed=[1, 2, 3])
    ours = A.sample_dpmpp_2m_sde(counting, x, sigmas, extra_args=guided_args(3, 4.0), disable=True,
                                 solver_type=solver_type, noise_sampler=K.sampling.BrownianTreeNoiseSampler(**tree))
    theirs = comfy_dpmpp_2m_sde_const(plain_cfg(flow_model), x, sigmas, guided_args(3, 4.0), flow_model.percent_to_sigma,
                                      solver_type=solver_type, noise_sampler=K.sampling.BrownianTreeNoiseSampler(**tree))
    assert (ours - theirs).abs().max() < 1e-5
    assert called[0] == pytest.approx(float(time_snr_shift(flow_model.shift, 1 - 1e-4)), abs=1e-7)
    assert called[0] < 1.0 and called[1:] == pytest.approx([float(s) for s in sigmas[1:-1]])


def test_dpmpp_2m_sde_default_noise_sampler_spans_the_schedule_as_given(flow_model):
    sigmas = flow_model.get_sigmas(10)
    x = noise(2) * sigmas[0]
    torch.manual_seed(5)
    ours = A.sample_dpmpp_2m_sde(flow_model, x, sigmas, extra_args=guided_args(2, 3.0), disable=True)
    torch.manual_seed(5)
    theirs = comfy_dpmpp_2m_sde_const(plain_cfg(flow_model), x, sigmas, guided_args(2, 3.0),
                                      flow_model.percent_to_sigma)
    assert (ours - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_euler_and_dpmpp_2m_keep_k_diffusions_formulas_on_a_flow_model(flow_model, sampler):
    sigmas = flow_model.get_sigmas(12)
    x = noise(2) * sigmas[0]
    ours = A.SAMPLERS[sampler](flow_model, x, sigmas, extra_args=guided_args(2, 4.0), disable=True)
    theirs = getattr(K.sampling, f"sample_{sampler}")(plain_cfg(flow_model), x, sigmas, extra_args=guided_args(2, 4.0),
                                                       disable=True)
    assert (ours - theirs).abs().max() < 1e-5


def test_euler_on_a_flow_model_is_the_flow_euler_step(flow_model):
    """x_next = x + (sigma_next - sigma) * v with v = (x - denoised) / sigma: the ODE a flow model was trained on."""
    sigmas = flow_model.get_sigmas(6)
    x = noise(2) * sigmas[0]
    cfg = plain_cfg(flow_model)
    expected = x
    for i in range(6):
        denoised = cfg(expected, sigmas[i] * torch.ones(2), **guided_args(2, 4.0))
        expected = expected + (sigmas[i + 1] - sigmas[i]) * (expected - denoised) / sigmas[i]
    ours = A.sample_euler(flow_model, x, sigmas, extra_args=guided_args(2, 4.0), disable=True)
    assert (ours - expected).abs().max() < 1e-5


# -- the run knows it is a flow run ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde"])
def test_the_oracle_learns_that_the_run_is_a_flow_run(flow_model, denoiser, sampler):
    for model, flow in ((flow_model, True), (denoiser, False)):
        oracle = O.FullCFG()
        sigmas = model.get_sigmas(4)
        A.SAMPLERS[sampler](model, noise(1) * sigmas[0], sigmas, extra_args=guided_args(1), disable=True,
                            oracle=oracle)
        assert oracle.run.flow is flow


def test_flow_is_recognised_by_sigma_max_and_can_be_said_explicitly(flow_model, denoiser):
    assert is_flow_model(flow_model) and not is_flow_model(denoiser) and not is_flow_model(lambda x, s: x)
    sigmas = flow_model.get_sigmas(6)
    x = noise(2) * sigmas[0]
    bare = lambda x, s, cond: flow_model(x, s, cond=cond)  # noqa: E731  no sigma_max: not recognised, so say it
    ours = A.sample_euler_ancestral(bare, x, sigmas, extra_args=guided_args(2, 3.0), disable=True, flow=True,
                                    noise_sampler=PerImageGaussian(x, [1, 2]))
    recognised = A.sample_euler_ancestral(flow_model, x, sigmas, extra_args=guided_args(2, 3.0), disable=True,
                                          noise_sampler=PerImageGaussian(x, [1, 2]))
    assert (ours - recognised).abs().max() < 1e-6
    oracle = O.FullCFG()
    A.sample_euler(flow_model, x, sigmas, extra_args=guided_args(2, 3.0), disable=True, oracle=oracle, flow=False)
    assert oracle.run.flow is False


def test_flow_mistakes_get_clear_errors(flow_model, denoiser):
    sigmas = flow_model.get_sigmas(6)
    x = noise(1)
    with pytest.raises(ValueError, match="DDIM works on a discrete VP schedule.*use sample_euler"):
        A.sample_ddim(flow_model, x, sigmas, extra_args=guided_args(1), disable=True)
    sd_sigmas = denoiser.get_sigmas(6)
    with pytest.raises(ValueError, match=r"sigmas lie in \[0, 1\]"):
        A.sample_euler(denoiser, x * sd_sigmas[0], sd_sigmas, extra_args=guided_args(1), disable=True, flow=True)
    with pytest.raises(TypeError, match="flow must be True, False or None"):
        A.sample_euler(flow_model, x, sigmas, extra_args=guided_args(1), disable=True, flow="yes")
    with pytest.raises(ValueError, match="eta must be in \\[0, 1\\]"):
        A.sample_euler_ancestral(flow_model, x, sigmas, extra_args=guided_args(1), disable=True, eta=1.5)
    bare = lambda x, s, cond: flow_model(x, s, cond=cond)  # noqa: E731  no percent_to_sigma for the SDE offset
    with pytest.raises(ValueError, match="percent_to_sigma"):
        A.sample_dpmpp_2m_sde(bare, x, sigmas, extra_args=guided_args(1), disable=True, flow=True)
    with pytest.raises(ValueError, match="shift must be a positive number"):
        FlowDenoiser(embedded.load_flow_unet(), shift=0)


def test_flow_schedule_is_comfyuis_simple_schedule_shifted(flow_model):
    steps = 20
    table = flow_model.sigmas  # ascending, one per training timestep, as ComfyUI's ModelSamplingDiscreteFlow
    ss = len(table) / steps
    comfy_simple = torch.tensor([float(table[-(1 + int(x * ss))]) for x in range(steps)] + [0.0])
    assert (flow_model.get_sigmas(steps) - comfy_simple).abs().max() < 1e-6
    assert float(flow_model.sigma_max) == 1.0
    assert flow_model.percent_to_sigma(0.25) == pytest.approx(float(time_snr_shift(flow_model.shift, 0.75)))


# -- CFG 1: one network row per step ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde"])
def test_cfg_1_evaluates_one_row_per_step_and_gives_the_conditional_picture(flow_model, sampler):
    sigmas = flow_model.get_sigmas(8)
    x = noise(2) * sigmas[0]
    labels = torch.tensor([3, 7])
    counting = CountingModel(flow_model)
    torch.manual_seed(0)
    ours = A.SAMPLERS[sampler](counting, x, sigmas, extra_args=dict(cond=labels, uncond=None, cond_scale=1.0),
                               disable=True)
    assert counting.rows == 2 * 8
    torch.manual_seed(0)
    cond_only = A.SAMPLERS[sampler](flow_model, x, sigmas, disable=True, oracle=O.FullCFG(),
                                    extra_args=dict(cond=labels, uncond=labels, cond_scale=1.0))
    assert torch.equal(ours, cond_only)
    forecast = O.recommended()
    counting.rows = 0
    torch.manual_seed(0)
    A.SAMPLERS[sampler](counting, x, sigmas, extra_args=dict(cond=labels, uncond=None, cond_scale=1.0), disable=True,
                        oracle=forecast)
    summary = forecast.summary()
    assert summary.nfe_full == 8 and summary.nfe == counting.rows // 2 < 8
    assert not forecast.run.guided


def test_cfg_1_guidance_oracles_run_every_step_and_say_why(flow_model):
    sigmas = flow_model.get_sigmas(8)
    x = noise(2) * sigmas[0]
    for oracle in (O.AdaptiveGuidance(), O.LinearAG(), O.CFGTruncation(0.5)):
        A.sample_euler(flow_model, x, sigmas, extra_args=dict(cond=torch.tensor([1, 2]), uncond=None, cond_scale=1.0),
                       disable=True, oracle=oracle)
        summary = oracle.summary()
        assert summary.nfe == summary.nfe_full and summary.nfe_per_image == 8
        assert summary.counts["FULL"] == 8 * summary.images
        assert any("no guidance to adapt" in why for _, why in summary.overrides), type(oracle).__name__
    with pytest.raises(ValueError, match="uncond.*may be None at cond_scale 1"):
        A.sample_euler(flow_model, x, sigmas, extra_args=dict(cond=torch.tensor([1, 2]), uncond=None, cond_scale=3.0),
                       disable=True)


def test_the_flow_model_is_a_real_guided_model(flow_model):
    """CFG changes the picture and the classifier reads the asked digit: the flow model is trained, not random."""
    sigmas = flow_model.get_sigmas(20)
    labels = torch.arange(20) % 10
    x = torch.stack([noise(1, seed=100 + j)[0] for j in range(20)]) * sigmas[0]
    args = dict(cond=labels, uncond=torch.full_like(labels, embedded.NULL_LABEL))
    guided = A.sample_euler(flow_model, x, sigmas, extra_args=dict(args, cond_scale=3.0), disable=True)
    unguided = A.sample_euler(flow_model, x, sigmas, extra_args=dict(args, cond_scale=1.0), disable=True)
    classifier = embedded.load_classifier()
    with torch.no_grad():
        accuracy = (classifier(guided).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.9 and (guided - unguided).abs().mean() > 0.01
    assert math.isfinite(float(guided.abs().max())) and float(guided.abs().max()) < 2.0
