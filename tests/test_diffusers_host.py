"""The diffusers host on real pipeline classes, built from tiny random components by config (nothing is downloaded;
``prompt_embeds`` stand in for the text encoders): StableDiffusionPipeline, StableDiffusionXLPipeline,
StableDiffusion3Pipeline, FluxPipeline (guidance-distilled, and with true CFG) and WanPipeline (5-D video latents,
Wan 2.2's two experts). Pictures are compared as final latents (``output_type="latent"``)."""

import types

import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers host needs diffusers (pip install -e '.[diffusers]')")
pytest.importorskip("transformers", reason="diffusers' pipeline classes need transformers")

from diffusers import (  # noqa: E402
    DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, HeunDiscreteScheduler,
    KDPM2DiscreteScheduler, LMSDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline,
    StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel, UniPCMultistepScheduler, WanPipeline,
    WanTransformer3DModel,
)

from adaptive_sampler import oracles  # noqa: E402
from adaptive_sampler.hosts import diffusers as adaptive  # noqa: E402

STEPS = 20
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; on a shared machine more threads mostly wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def embeddings(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for shape in shapes]


def build_sd():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 32), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=8, attention_head_dim=8)
    scheduler = EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="trailing", steps_offset=1)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    cond, uncond = embeddings((1, 4, 32), (1, 4, 32))
    return pipe, dict(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=5.0, height=64, width=64)


def build_sdxl():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 32), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=8 * 6 + 32,
                                cross_attention_dim=32, norm_num_groups=8)
    scheduler = EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=scheduler)
    cond, uncond, pooled, negative_pooled = embeddings((1, 4, 32), (1, 4, 32), (1, 32), (1, 32))
    return pipe, dict(prompt_embeds=cond, negative_prompt_embeds=uncond, pooled_prompt_embeds=pooled,
                      negative_pooled_prompt_embeds=negative_pooled, guidance_scale=5.0, height=64, width=64)


def build_sd3():
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                        pooled_projection_dim=32, out_channels=4)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    cond, uncond, pooled, negative_pooled = embeddings((1, 4, 32), (1, 4, 32), (1, 32), (1, 32))
    return pipe, dict(prompt_embeds=cond, negative_prompt_embeds=uncond, pooled_prompt_embeds=pooled,
                      negative_pooled_prompt_embeds=negative_pooled, guidance_scale=5.0, height=64, width=64)


def build_flux(true_cfg: bool):
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=not true_cfg)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=None, text_encoder_2=None,
                        tokenizer=None, tokenizer_2=None, transformer=transformer, vae=None)
    cond, pooled, uncond, negative_pooled = embeddings((1, 4, 32), (1, 32), (1, 4, 32), (1, 32))
    args = dict(prompt_embeds=cond, pooled_prompt_embeds=pooled, height=128, width=128)
    if true_cfg:  # Flux with a negative prompt and true CFG: a "cond" and an "uncond" transformer call per step
        return pipe, dict(args, negative_prompt_embeds=uncond, negative_pooled_prompt_embeds=negative_pooled,
                          true_cfg_scale=4.0)
    return pipe, dict(args, guidance_scale=3.5)  # Flux dev: distilled guidance, one call per step (CFG 1)


def build_wan22():
    def expert(seed):
        torch.manual_seed(seed)
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                     in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                     num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                     rope_max_seq_len=32)

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=expert(0),
                       transformer_2=expert(1), boundary_ratio=0.875)
    cond, uncond = embeddings((1, 4, 32), (1, 4, 32))
    return pipe, dict(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=5.0, guidance_scale_2=4.0,
                      height=16, width=16, num_frames=5)


#: name -> (builder, the layout the host must find, the arguments that turn guidance off, the denoisers' first
#: layers: every real evaluation passes through them, a CACHED step through none)
PIPELINES = {
    "sd": (build_sd, "batched", dict(guidance_scale=1.0), ("unet.conv_in",)),
    "sdxl": (build_sdxl, "batched", dict(guidance_scale=1.0), ("unet.conv_in",)),
    "sd3": (build_sd3, "batched", dict(guidance_scale=1.0), ("transformer.pos_embed",)),
    "flux": (lambda: build_flux(False), "single", dict(guidance_scale=1.0), ("transformer.x_embedder",)),
    "flux-true-cfg": (lambda: build_flux(True), "split", dict(true_cfg_scale=1.0), ("transformer.x_embedder",)),
    "wan22": (build_wan22, "split", dict(guidance_scale=1.0, guidance_scale_2=1.0),
              ("transformer.patch_embedding", "transformer_2.patch_embedding")),
}


def run(pipe, args, seed=1, steps=STEPS, **overrides):
    pipe.set_progress_bar_config(disable=True)
    out = pipe(**{**args, **overrides}, num_inference_steps=steps, output_type="latent",
               generator=torch.Generator().manual_seed(seed))
    return out.frames if hasattr(out, "frames") else out.images


def psnr(a, b, ref):
    """PSNR of ``a`` against ``b``, on the range of the reference picture ``ref``."""
    return float(10 * torch.log10((ref.max() - ref.min()) ** 2 / ((a - b) ** 2).mean()))


class RowCounter:
    """Counts the rows each named layer evaluates: the real network evaluations."""

    def __init__(self, pipe, layers):
        self.rows = {}
        self.handles = []
        for path in layers:
            self.rows[path] = 0
            module = pipe
            for part in path.split("."):
                module = getattr(module, part)
            self.handles.append(module.register_forward_pre_hook(self._counter(path)))

    def _counter(self, path):
        def count(module, args):
            self.rows[path] += args[0].shape[0]
        return count

    def total(self):
        return sum(self.rows.values())

    def remove(self):
        for handle in self.handles:
            handle.remove()


def attached(pipe):
    """What adaptive sampling could have left on the pipeline: hooks, forward attributes, the scheduler's step."""
    found = []
    for name in adaptive.DENOISERS:
        module = getattr(pipe, name, None)
        if module is None:
            continue
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and adaptive.HOOK_NAME in registry.hooks:
            found.append(f"{name}: hook")
        if "forward" in vars(module):
            found.append(f"{name}: forward attribute")
    if "step" in vars(pipe.scheduler):
        found.append("scheduler: step attribute")
    return found


# -- the math, on real schedulers --------------------------------------------------------------------------------------
SCHEDULER_CASES = [(FlowMatchEulerDiscreteScheduler, dict(shift=3.0))] + [
    (cls, dict(SD_BETAS, prediction_type=prediction, **({"clip_sample": False} if cls is DDIMScheduler else {})))
    for cls in (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, LMSDiscreteScheduler,
                DPMSolverMultistepScheduler, DDIMScheduler, UniPCMultistepScheduler)
    for prediction in ("epsilon", "v_prediction", "sample")
    if not (cls is EulerAncestralDiscreteScheduler and prediction == "sample")  # not implemented by diffusers
] + [(cls, dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0))
     for cls in (DPMSolverMultistepScheduler, UniPCMultistepScheduler)]


def schedulers_own_x0(cls, config, scheduler, position, output, sample):
    """The x0 the scheduler itself derives from a model output at a step."""
    if cls is FlowMatchEulerDiscreteScheduler:  # its step keeps x0 implicit: x = (1 - s) x0 + s noise, v = noise - x0
        return sample - scheduler.sigmas[position] * output
    if cls in (DPMSolverMultistepScheduler, UniPCMultistepScheduler):
        scheduler._step_index = position
        return scheduler.convert_model_output(output, sample=sample)
    fresh = cls(**config)
    fresh.set_timesteps(10)
    if hasattr(fresh, "_step_index"):
        fresh._step_index = position
        fresh.is_scale_input_called = True
    extra = {} if cls is LMSDiscreteScheduler else dict(generator=torch.Generator().manual_seed(0))
    return fresh.step(output, fresh.timesteps[position], sample, **extra).pred_original_sample


@pytest.mark.parametrize("cls,config", SCHEDULER_CASES,
                         ids=[f"{c.__name__}-{k.get('prediction_type', 'flow')}" for c, k in SCHEDULER_CASES])
def test_a_model_output_converts_to_the_schedulers_own_x0_and_back(cls, config):
    scheduler = cls(**config)
    scheduler.set_timesteps(10)
    view, reason = adaptive.view_scheduler(scheduler, {})
    assert reason is None, reason
    param = view.param
    assert param.flow == ("flow" in str(config.get("prediction_type", "flow")))
    g = torch.Generator().manual_seed(0)
    for position in (0, 4, 9):
        sample = torch.randn(2, 4, 8, 8, generator=g)
        if param.scaled_input:  # k-diffusion's latent: x0 + sigma * noise
            sample = sample * (param.sigmas[position] ** 2 + 1) ** 0.5
        output = torch.randn(2, 4, 8, 8, generator=g)
        model_input = param.model_input(position, sample)
        x0 = param.denoised(position, model_input, output)
        own = schedulers_own_x0(cls, config, scheduler, position, output, sample)
        assert torch.allclose(x0, own, rtol=1e-5, atol=1e-5 * float(own.abs().max()))
        assert torch.allclose(param.output(position, model_input, x0), output, atol=1e-3)
        # the oracle's latent is k-diffusion's (SD-style) or the flow latent, x0 + sigma * eps in both conventions'
        # own scaling: the guided eps the oracle records points from x0 to it
        x = param.latent(position, model_input)
        expected = sample if param.flow or param.scaled_input else sample / param.coefficients(position)[0]
        assert torch.allclose(x, expected, rtol=1e-5, atol=1e-5)


def test_schedulers_that_are_not_adapted_say_why():
    for cls in (HeunDiscreteScheduler, KDPM2DiscreteScheduler):
        scheduler = cls(**SD_BETAS)
        scheduler.set_timesteps(10)
        view, reason = adaptive.view_scheduler(scheduler, {})
        assert view is None and cls.__name__ in reason and "once per step" in reason
    euler = FlowMatchEulerDiscreteScheduler(invert_sigmas=True)
    euler.set_timesteps(10)
    assert "invert_sigmas" in adaptive.view_scheduler(euler, {})[1]
    euler = EulerDiscreteScheduler(**SD_BETAS)
    euler.set_timesteps(10)
    assert "s_churn" in adaptive.view_scheduler(euler, {"s_churn": 1.0})[1]


@pytest.mark.parametrize("cls,config,options,stochastic", [
    (EulerAncestralDiscreteScheduler, SD_BETAS, {}, True),
    (DDIMScheduler, SD_BETAS, {"eta": 0.0}, False),
    (DDIMScheduler, SD_BETAS, {"eta": 1.0}, True),
    (DPMSolverMultistepScheduler, SD_BETAS, {}, False),
    (DPMSolverMultistepScheduler, dict(SD_BETAS, algorithm_type="sde-dpmsolver++"), {}, True),
    (FlowMatchEulerDiscreteScheduler, dict(stochastic_sampling=True), {}, True),
])
def test_stochastic_schedulers_are_told_to_the_oracle(cls, config, options, stochastic):
    scheduler = cls(**config)
    scheduler.set_timesteps(10)
    view, _ = adaptive.view_scheduler(scheduler, options)
    assert view.stochastic is stochastic


def test_the_layout_of_a_step_is_read_from_its_calls():
    assert adaptive.classify_layout([(None, 4)], 2) == ("batched", None)
    assert adaptive.classify_layout([("cond", 2)], 2) == ("single", None)
    assert adaptive.classify_layout([("cond", 2), ("uncond", 2)], 2) == ("split", None)
    for calls in ([(None, 6)], [("uncond", 2), ("cond", 2)], [(None, 2), (None, 2)], []):
        layout, reason = adaptive.classify_layout(calls, 2)
        assert layout is None and "batch of 2" in reason


# -- real pipelines ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PIPELINES)
def test_the_default_spends_less_and_stays_close_to_full_cfg(name):
    build, layout, unguided, layers = PIPELINES[name]
    pipe, args = build()
    full = run(pipe, args)
    other_seed = run(pipe, args, seed=2)
    no_guidance = run(pipe, args, **unguided)
    counter = RowCounter(pipe, layers)
    with adaptive.enabled(pipe) as adapter:
        adapted = run(pipe, args)
    counter.remove()
    report = adapter.report
    assert report.layout == layout and report.steps == STEPS and report.batch == 1
    assert report.nfe == counter.total() < report.nfe_full == STEPS * (1 if layout == "single" else 2)
    assert "S" in report.schedule  # whole steps skipped, also without CFG (Flux dev)
    # the random models are not degenerate: another seed, and the picture without guidance, differ clearly
    assert psnr(other_seed, full, full) < 25
    assert psnr(no_guidance, full, full) < 50
    close = psnr(adapted, full, full)
    assert close > psnr(other_seed, full, full) + 25
    assert close > psnr(no_guidance, full, full) + 6
    assert not attached(pipe)
    assert torch.equal(run(pipe, args), full)  # disabled: plain diffusers, to the bit
    fewer_steps = run(pipe, args, steps=STEPS * report.nfe // report.nfe_full)  # full CFG at the same NFE
    print(f"{name}: NFE {report.nfe}/{report.nfe_full} per image, PSNR {close:.1f} dB against full CFG (other seed "
          f"{psnr(other_seed, full, full):.1f}, no guidance {psnr(no_guidance, full, full):.1f}, fewer steps "
          f"{psnr(fewer_steps, full, full):.1f}); {report.schedule}")


def test_wan22_runs_both_experts_and_computes_the_switch():
    """The switch from the high-noise to the low-noise expert is a conditioning change: that step is computed and no
    forecast crosses it, even under a plan that skips every step it may."""
    pipe, args = build_wan22()
    counter = RowCounter(pipe, PIPELINES["wan22"][3])
    with adaptive.enabled(pipe, oracle=oracles.Schedule(f"F1 S{STEPS - 1}")) as adapter:
        run(pipe, args)
    counter.remove()
    boundary = 0.875 * pipe.scheduler.config.num_train_timesteps
    switch = next(i for i, t in enumerate(pipe.scheduler.timesteps) if t < boundary)
    assert 1 < switch < STEPS - 1
    assert adapter.report.schedule == "F" + "S" * (switch - 1) + "F" + "S" * (STEPS - switch - 1)
    assert any(f"step {switch}:" in note and "conditioning changed" in note for note in adapter.report.notes)
    assert counter.rows == {"transformer.patch_embedding": 2, "transformer_2.patch_embedding": 2}  # cond + uncond


@pytest.mark.parametrize("name", ["sd", "flux-true-cfg"])
def test_full_cfg_through_the_host_is_plain_diffusers(name):
    """Every step computed (the FullCFG oracle): the hook and the scheduler observer change nothing, to the bit."""
    pipe, args = PIPELINES[name][0]()
    plain = run(pipe, args)
    with adaptive.enabled(pipe, oracle="full") as adapter:
        assert torch.equal(run(pipe, args), plain)
    assert adapter.report.nfe == adapter.report.nfe_full
    assert not attached(pipe) and torch.equal(run(pipe, args), plain)


@pytest.mark.parametrize("name", ["sd3", "flux-true-cfg"])
def test_a_bfloat16_pipeline(name):
    """Pipelines usually run in half precision: forecasts are handed back in the denoiser's own dtype."""
    pipe, args = PIPELINES[name][0]()
    pipe.to(torch.bfloat16)
    args = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    full, other_seed = run(pipe, args).float(), run(pipe, args, seed=2).float()
    with adaptive.enabled(pipe) as adapter:
        adapted = run(pipe, args)
    assert adapted.dtype == torch.bfloat16
    assert adapter.report.nfe < adapter.report.nfe_full
    assert psnr(adapted.float(), full, full) > psnr(other_seed, full, full) + 25


SD_SCHEDULERS = {
    "euler-ancestral": (EulerAncestralDiscreteScheduler, {}, {}),
    "lms": (LMSDiscreteScheduler, {}, {}),
    "dpmpp-2m": (DPMSolverMultistepScheduler, {}, {}),
    "dpmpp-2m-sde": (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++"), {}),
    "ddim": (DDIMScheduler, dict(clip_sample=False), {}),  # as SD's own config: a random x0 is far outside [-1, 1]
    "ddim-eta-1": (DDIMScheduler, dict(clip_sample=False), dict(eta=1.0)),
    "unipc": (UniPCMultistepScheduler, {}, {}),
}


@pytest.mark.parametrize("name", SD_SCHEDULERS)
def test_each_adapted_scheduler_on_stable_diffusion(name):
    cls, config, call = SD_SCHEDULERS[name]
    pipe, args = build_sd()
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **config)
    args = dict(args, **call)
    full, other_seed = run(pipe, args), run(pipe, args, seed=2)
    with adaptive.enabled(pipe) as adapter:
        adapted = run(pipe, args)
    report = adapter.report
    stochastic = adaptive.view_scheduler(pipe.scheduler, call)[0].stochastic
    assert report.stochastic is stochastic and not report.flow and report.schedule
    assert report.nfe < report.nfe_full
    close = psnr(adapted, full, full)
    assert close > psnr(other_seed, full, full) + 15
    print(f"sd {name}: NFE {report.nfe}/{report.nfe_full}, PSNR {close:.1f} dB (other seed "
          f"{psnr(other_seed, full, full):.1f})")


def test_a_batch_reports_nfe_per_image():
    pipe, args = build_sd()
    counter = RowCounter(pipe, ("unet.conv_in",))
    with adaptive.enabled(pipe) as adapter:
        run(pipe, args, num_images_per_prompt=3)
    counter.remove()
    assert adapter.report.batch == 3
    assert adapter.report.nfe == counter.total() // 3 < adapter.report.nfe_full


def test_each_call_gets_its_own_report():
    pipe, args = build_sd3()
    with adaptive.enabled(pipe) as adapter:
        run(pipe, args, steps=16)
        first = adaptive.report(pipe)
        run(pipe, args, steps=24)
        assert adaptive.report(pipe) is adapter.report is not first
    assert (first.steps, adapter.report.steps) == (16, 24)
    assert adaptive.report(pipe) is None  # disabled


def test_a_short_call_runs_unchanged():
    pipe, args = build_sd3()
    plain = run(pipe, args, steps=8)
    with adaptive.enabled(pipe) as adapter:
        assert torch.equal(run(pipe, args, steps=8), plain)
    report = adapter.report
    assert report.nfe == report.nfe_full == 16 and not report.schedule
    assert any("below min_steps (12)" in note for note in report.notes)
    with adaptive.enabled(pipe, min_steps=4) as adapter:
        run(pipe, args, steps=8)
    assert adapter.report.nfe < 16


def test_an_unsupported_scheduler_warns_once_and_runs_unchanged():
    pipe, args = build_sd()
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    plain = run(pipe, args, steps=12)
    counter = RowCounter(pipe, ("unet.conv_in",))
    with adaptive.enabled(pipe) as adapter:
        with pytest.warns(UserWarning, match="HeunDiscreteScheduler is not adapted") as caught:
            first = run(pipe, args, steps=12)
            second = run(pipe, args, steps=12)
    counter.remove()
    assert len([w for w in caught if "Adaptive sampling" in str(w.message)]) == 1
    assert torch.equal(first, plain) and torch.equal(second, plain)
    report = adapter.report
    assert not report.schedule and report.nfe == report.nfe_full == counter.total() // 2  # Heun: 2 calls per step
    assert not attached(pipe)


def test_a_pipeline_that_changes_its_cfg_mid_run_stops_the_adaptation():
    """diffusers' documented way to turn CFG off after some steps (a callback that drops the uncond rows): the host
    sees calls unlike the first step's and runs the rest unchanged, with a note, instead of guessing."""
    pipe, args = build_sd()

    def drop_cfg(pipe, i, t, tensors):
        if i == 9:
            pipe._guidance_scale = 0.0
            tensors["prompt_embeds"] = tensors["prompt_embeds"].chunk(2)[-1]
        return tensors

    with adaptive.enabled(pipe) as adapter:
        out = run(pipe, args, callback_on_step_end=drop_cfg, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    assert torch.isfinite(out).all()
    assert any("adaptation stopped at step 10" in note for note in adapter.report.notes)
    assert adapter.report.schedule.endswith("F" * 10)


# -- arguments -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(level="turbo"), ValueError, "level must be one of"),
    (dict(level="fast", oracle="ag"), ValueError, "level or oracle, not both"),
    (dict(oracle=3), TypeError, "oracle must be"),
    (dict(oracle="nonsense"), ValueError, "unknown oracle"),
    (dict(oracle=oracles.Forecast, level=None), TypeError, "oracle must be"),
    (dict(min_steps=0), ValueError, "min_steps"),
    (dict(min_steps=True), ValueError, "min_steps"),
    (dict(min_steps=2.5), ValueError, "min_steps"),
])
def test_bad_arguments_are_refused_and_leave_nothing_attached(kwargs, error, match):
    pipe, args = build_sd3()
    plain = run(pipe, args, steps=12)
    with pytest.raises(error, match=match):
        adaptive.enable(pipe, **kwargs)
    assert not attached(pipe) and adaptive.report(pipe) is None
    assert torch.equal(run(pipe, args, steps=12), plain)


def test_what_is_not_a_pipeline_is_refused():
    with pytest.raises(TypeError, match="diffusers pipeline with a scheduler"):
        adaptive.enable(object())
    with pytest.raises(TypeError, match="has no denoiser"):
        adaptive.enable(types.SimpleNamespace(scheduler=EulerDiscreteScheduler(), unet=None))
    with pytest.raises(TypeError, match="diffusers pipeline"):
        adaptive.disable("pipe")


def test_a_denoiser_that_cannot_be_hooked_leaves_the_others_untouched():
    class Opaque(torch.nn.Module):
        def forward(self, *inputs):
            return inputs[0]

    pipe, _ = build_sd()
    unet = pipe.unet
    stand_in = types.SimpleNamespace(scheduler=pipe.scheduler, unet=unet, transformer=Opaque())
    with pytest.raises(TypeError, match="first argument"):
        adaptive.enable(stand_in)
    assert not hasattr(unet, "_diffusers_hook") and "forward" not in vars(unet)


def test_enabling_twice_is_refused_and_disable_is_idempotent():
    pipe, args = build_sd3()
    adapter = adaptive.enable(pipe, "quality")
    with pytest.raises(RuntimeError, match="already enabled"):
        adaptive.enable(pipe)
    assert adaptive.report(pipe) is None
    run(pipe, args)
    assert adaptive.report(pipe) is adapter.report and adapter.report.nfe < adapter.report.nfe_full
    adaptive.disable(pipe)
    adaptive.disable(pipe)
    assert not attached(pipe)


def test_a_call_that_fails_leaves_the_next_one_adapted():
    pipe, args = build_sd3()

    def fail(pipe, i, t, tensors):
        if i == 5:
            raise KeyboardInterrupt
        return tensors

    with adaptive.enabled(pipe) as adapter:
        with pytest.raises(KeyboardInterrupt):
            run(pipe, args, callback_on_step_end=fail)
        run(pipe, args)
    assert adapter.report.steps == STEPS and adapter.report.nfe < adapter.report.nfe_full
    assert not attached(pipe)

