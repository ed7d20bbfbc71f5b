"""Build the tiny random-weight checkpoints the real-host suites (tests/webui, tests/forge, tests/comfyui) run on.

Run it with the host's own Python: it imports the host's model classes (our code here, the host's classes there),
builds small configurations with a fixed seed, gives every weight a random value (a freshly built latent diffusion
model has zero-initialised output layers, so every sampler would return the same picture and pixel identity would
prove nothing), scales each network's output to a spread of about 1 (a trained model's scale), writes safetensors in
the layout the host's loader detects, and loads each file back through that loader to check it is recognised as the
intended family.

    # ComfyUI: every file tests/comfyui expects (models/checkpoints, diffusion_models, text_encoders, vae)
    $COMFYUI_PYTHON tests/hosts/build_models.py comfyui --comfyui-dir $COMFYUI_DIR

    # the random SD-1.5 checkpoint (the original LDM layout, which every host loads), with one host's classes
    $A1111_PYTHON tests/hosts/build_models.py sd15 --a1111-dir $A1111_DIR \\
        --out $A1111_DIR/models/Stable-diffusion/random-sd15.safetensors
    $FORGE_PYTHON tests/hosts/build_models.py sd15 --forge-dir $FORGE_DIR \\
        --out $FORGE_DIR/models/Stable-diffusion/random-sd15.safetensors
    $COMFYUI_PYTHON tests/hosts/build_models.py sd15 --comfyui-dir $COMFYUI_DIR \\
        --out $COMFYUI_DIR/models/checkpoints/random-sd15.safetensors

    # A1111's flow family: a tiny random SD3 built with A1111's own SD3 classes
    $A1111_PYTHON tests/hosts/build_models.py a1111-sd3 --a1111-dir $A1111_DIR \\
        --out $A1111_DIR/models/Stable-diffusion/random-sd3.safetensors

    # Forge Neo's flow model: a tiny random Lumina 2 built with Forge Neo's own backend classes
    $FORGE_PYTHON tests/hosts/build_models.py forge-lumina2 --forge-dir $FORGE_DIR \\
        --out $FORGE_DIR/models/Stable-diffusion/random-lumina2.safetensors

(``$X_PYTHON``: the host's interpreter, by default ``$X_DIR/venv/bin/python``.) The suites run these themselves when
a file they need is missing (``HOST_SUITE_BUILD=0``: they skip instead, naming the command).

Every file is built from fixed seeds (a Flux file rebuilt with the same host and torch came out byte-identical); an
existing file is kept unless ``--force`` is given. The SD-1.5 checkpoint is checked: its CLIP gives finite, bounded
hidden states (last and penultimate layer: clip skip 1 and 2) for every prompt the suites send, prompt-editing and
AND halves included, and plain full-CFG Euler over 12 steps gives a finite picture for several of them (a random
CLIP whose activations grow layer by layer gives NaN for some prompts and not others: a suite must not depend on one
lucky prompt). ``sd15 --check-only`` checks an existing checkpoint the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable

#: Prompts the SD-1.5 checkpoint must give finite predictions and pictures for: every prompt the A1111 / Forge /
#: ComfyUI suites send (prompt-editing and AND halves separately, as the hosts encode them) and a few more.
SD15_PROMPTS = ["a red apple", "blurry", "a red apple on a table", "a green pear", "a table", "a blue car on a road",
                "a green tree", "a yellow house at night", "a red cat", "a red dog", "a red [cat:dog:0.5]",
                "a wooden table", "a lamp", ""]
#: The prompts also sampled in full (a minute each on a busy CPU): the overflow that gives NaN starts in the text
#: encoder, which every prompt above goes through; these take the UNet and the VAE through whole runs.
SD15_SAMPLED = ["a red cat", "a red dog"]

SEEDS = {"sd15": 15, "flux": 1, "sd3": 3, "wan-high": 21, "wan-low": 22, "sdxl": 10, "clip-l": 100, "clip-g": 101,
         "vae4": 200, "vae16": 201, "wan21-vae": 202, "a1111-sd3": 30, "forge-lumina2": 40}

#: File names under $COMFYUI_DIR/models (tests/comfyui/test_comfyui_models.py's MODELS, and test_comfyui_api.py's
#: checkpoint).
COMFYUI_FILES = {
    "sd15": ("checkpoints", "random-sd15.safetensors"),
    "flux": ("diffusion_models", "random-flux.safetensors"),
    "sd3": ("diffusion_models", "random-sd3.safetensors"),
    "wan-high": ("diffusion_models", "random-wan-high.safetensors"),
    "wan-low": ("diffusion_models", "random-wan-low.safetensors"),
    "sdxl": ("diffusion_models", "random-sdxl.safetensors"),
    "clip-l": ("text_encoders", "random-clip-l.safetensors"),
    "clip-g": ("text_encoders", "random-clip-g.safetensors"),
    "vae4": ("vae", "random-vae4.safetensors"),
    "vae16": ("vae", "random-vae16.safetensors"),
    "wan21-vae": ("vae", "random-wan21-vae.safetensors"),
}


def log(*args):
    print(*args, flush=True)


# -- random weights, independent of any host ------------------------------------------------------------------------
def randomize(module, seed: int) -> None:
    """Give every parameter of ``module`` a random value from ``seed``: matrices and kernels uniform in
    +-1/sqrt(fan_in) (PyTorch's default scale: activations keep their size layer after layer, so nothing overflows
    however many layers or tokens), token / position embeddings normal with std 0.02 / 0.01 (CLIP's), norm weights
    1 + N(0, 0.02), biases N(0, 0.02); zero-initialised output layers included. Hosts build modules with
    uninitialised storage (torch.empty) to load faster, so nothing of the constructor's values is kept."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("bias", "beta") or (p.ndim == 1 and leaf.endswith("_bias")):
                value = torch.randn(p.shape, generator=g) * 0.02
            elif leaf in ("weight", "scale", "gamma") and (p.ndim == 1 or
                                                            (leaf == "gamma" and p.numel() == p.shape[0])):
                value = 1 + torch.randn(p.shape, generator=g) * 0.02
            elif "position_embedding" in name:
                value = torch.randn(p.shape, generator=g) * 0.01
            elif "token_embedding" in name or "embed_tokens" in name:
                value = torch.randn(p.shape, generator=g) * 0.02
            elif "modulation" in leaf or leaf in ("pos_embed", "scale_shift_table", "pad_token", "x_pad_token",
                                                     "cap_pad_token"):
                value = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1])
            else:
                fan_in = max(1, p[0].numel()) if p.ndim >= 2 else p.numel()
                bound = 1 / math.sqrt(fan_in)
                value = (torch.rand(p.shape, generator=g) * 2 - 1) * bound
            p.copy_(value.to(p.dtype))
        for name, b in module.named_buffers():
            if b.is_floating_point() and not torch.isfinite(b).all():
                raise RuntimeError(f"{name}: a non-finite buffer after construction")


def scale_output(layer, measure: Callable[[], "torch.Tensor"], target: float = 1.0) -> float:
    """Scale ``layer`` (the network's last layer) so that ``measure()`` (a forward pass on noise) has a spread of
    ``target``; returns the spread before."""
    import torch
    with torch.no_grad():
        spread = float(measure().float().std())
        if not math.isfinite(spread) or spread == 0:
            raise RuntimeError(f"the random network's output spread is {spread}")
        layer.weight.mul_(target / spread)
        if getattr(layer, "bias", None) is not None:
            layer.bias.mul_(target / spread)
        after = float(measure().float().std())
    log(f"  output spread {spread:.3g} -> {after:.3g}")
    return spread


def save(state_dict, path: Path, dtype=None, metadata: dict | None = None) -> None:
    import torch
    from safetensors.torch import save_file
    out = {}
    for k, v in state_dict.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        if v.is_floating_point() and not torch.isfinite(v.float()).all():
            raise RuntimeError(f"{k}: non-finite values")
        out[k] = v.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    save_file(out, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    log(f"  wrote {path} ({path.stat().st_size / 2**20:.0f} MiB, {sum(v.numel() for v in out.values()) / 1e6:.1f} M "
        f"values)")


# -- ComfyUI -----------------------------------------------------------------------------------------------------
def import_comfyui(comfyui_dir: str):
    """Import ComfyUI's ``comfy`` package from ``comfyui_dir`` on the CPU, nothing downloaded."""
    root = Path(comfyui_dir).resolve()
    if not (root / "comfy" / "model_detection.py").exists():
        sys.exit(f"{root} is not a ComfyUI checkout (no comfy/model_detection.py)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(root))
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401  (parses --cpu)
    import comfy.model_detection  # noqa: F401
    import comfy.sd  # noqa: F401
    return root


#: Text inputs of CLIP-L's width: one random CLIP-L conditions Flux, SD3 and Wan (their real text encoders, T5-XXL
#: and UMT5-XXL, are billions of weights).
CLIP_L_WIDTH = 768
FLUX = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=CLIP_L_WIDTH, context_in_dim=CLIP_L_WIDTH,
            hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56],
            theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[], yak_mlp=False,
            txt_norm=False)
#: MMDiT's width is 64 x depth: depth 2 gives hidden size 128 (two joint blocks, two heads).
SD3 = dict(in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=CLIP_L_WIDTH,
           context_embedder_config={"target": "torch.nn.Linear",
                                    "params": {"in_features": CLIP_L_WIDTH, "out_features": 128}},
           num_patches=1024, pos_embed_max_size=32, pos_embed_scaling_factor=None, x_block_self_attn_layers=[])
#: Wan 2.1 T2V at width 128 (one head), one block; ``text_dim`` is not in the state dict's shapes, so the file says it
#: in its metadata, which ComfyUI's detection reads.
WAN = dict(image_model="wan2.1", model_type="t2v", dim=128, out_dim=16, num_heads=1, ffn_dim=256, num_layers=1,
           patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6,
           in_dim=16, text_dim=CLIP_L_WIDTH)
WAN_METADATA = {"config": json.dumps({"transformer": {"text_dim": CLIP_L_WIDTH}})}
#: Segmind-Vega's layout (ComfyUI detects it as an SDXL-family model): SDXL's width, 320, fewer transformer blocks.
SDXL = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True, 'legacy': False,
        'num_classes': 'sequential', 'adm_in_channels': 2816, 'in_channels': 4, 'model_channels': 320,
        'num_res_blocks': [2, 2, 2], 'transformer_depth': [0, 0, 1, 1, 2, 2],
        'transformer_depth_output': [0, 0, 0, 1, 1, 1, 2, 2, 2], 'channel_mult': [1, 2, 4],
        'transformer_depth_middle': -1, 'use_linear_in_transformer': True, 'context_dim': 2048,
        'num_head_channels': 64, 'use_temporal_attention': False, 'use_temporal_resblock': False}
SD15 = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True, 'legacy': False,
        'adm_in_channels': None, 'in_channels': 4, 'model_channels': 320, 'num_res_blocks': [2, 2, 2, 2],
        'transformer_depth': [1, 1, 1, 1, 1, 1, 0, 0], 'channel_mult': [1, 2, 4, 4], 'transformer_depth_middle': 1,
        'use_linear_in_transformer': False, 'context_dim': 768, 'num_heads': 8,
        'transformer_depth_output': [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], 'use_temporal_attention': False,
        'use_temporal_resblock': False}
#: The family ComfyUI's detection must give each diffusion model.
EXPECTED_FAMILY = {"flux": "Flux", "sd3": "SD3", "wan-high": "WAN21_T2V", "wan-low": "WAN21_T2V",
                   "sdxl": "Segmind_Vega", "sd15": "SD15"}


def comfy_diffusion_model(config: dict, family: str):
    """ComfyUI's own diffusion model for ``config``, through its supported-model class (as its loader builds it)."""
    import comfy.model_detection
    model_config = comfy.model_detection.model_config_from_unet_config(dict(config))
    if model_config is None or type(model_config).__name__ != family:
        raise RuntimeError(f"ComfyUI matches {config} to {type(model_config).__name__}, not {family}")
    model_config.set_inference_dtype(__import__("torch").float32, None)
    return model_config.get_model({}).diffusion_model


def comfy_forward(name: str, dm):
    """A forward pass of diffusion model ``dm`` on noise at mid-schedule, with random conditioning of the widths
    the model takes."""
    import torch
    g = torch.Generator().manual_seed(0)
    if name == "flux":
        return lambda: dm(torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.5]),
                          torch.randn(1, 77, CLIP_L_WIDTH, generator=g), y=torch.randn(1, CLIP_L_WIDTH, generator=g),
                          guidance=torch.tensor([3.5]))
    if name == "sd3":
        return lambda: dm(torch.randn(1, 16, 8, 8, generator=g), torch.tensor([500.0]),
                          context=torch.randn(1, 77, CLIP_L_WIDTH, generator=g),
                          y=torch.randn(1, CLIP_L_WIDTH, generator=g))
    if name.startswith("wan"):
        return lambda: dm(torch.randn(1, 16, 3, 8, 8, generator=g), torch.tensor([500.0]),
                          torch.randn(1, 77, CLIP_L_WIDTH, generator=g))
    if name == "sdxl":
        return lambda: dm(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0]),
                          context=torch.randn(1, 77, 2048, generator=g), y=torch.randn(1, 2816, generator=g))
    if name == "sd15":
        return lambda: dm(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0]),
                          context=torch.randn(1, 77, 768, generator=g))
    raise KeyError(name)


OUTPUT_LAYER = {"flux": "final_layer.linear", "sd3": "final_layer.linear", "wan-high": "head.head",
                "wan-low": "head.head", "sdxl": "out.2", "sd15": "out.2"}


def build_comfy_diffusion_model(name: str):
    import torch
    config = {"flux": FLUX, "sd3": SD3, "wan-high": WAN, "wan-low": WAN, "sdxl": SDXL, "sd15": SD15}[name]
    dm = comfy_diffusion_model(config, EXPECTED_FAMILY[name])
    randomize(dm, SEEDS[name])
    dm.eval()
    scale_output(dm.get_submodule(OUTPUT_LAYER[name]), comfy_forward(name, dm))
    return dm


def check_comfy_diffusion_model(name: str, path: Path, expected_sd) -> None:
    """Load ``path`` with ComfyUI's Load Diffusion Model code: the family it detects, and every tensor in place."""
    import torch
    import comfy.sd
    patcher = comfy.sd.load_diffusion_model(str(path))
    family = type(patcher.model.model_config).__name__
    if family != EXPECTED_FAMILY[name]:
        raise RuntimeError(f"{path}: ComfyUI detects {family}, not {EXPECTED_FAMILY[name]}")
    loaded = patcher.model.diffusion_model.state_dict()
    for k, v in expected_sd.items():
        if k not in loaded or not torch.equal(loaded[k].float(), v.float()):
            raise RuntimeError(f"{path}: {k} did not load as written")
    log(f"  ComfyUI loads it as {family}")


def vae_module(name: str):
    """The VAE ComfyUI builds for each layout (comfy/sd.py's VAE): SD's 4-channel AutoencoderKL (quant convs),
    Flux / SD3's 16-channel one (no quant convs), Wan 2.1's video VAE."""
    import comfy.ldm.models.autoencoder as ae
    import comfy.ldm.wan.vae
    dd = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
          'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}
    if name == "vae4":
        return ae.AutoencoderKL(ddconfig=dd, embed_dim=4), "decoder.conv_out"
    if name == "vae16":
        dd = {**dd, "z_channels": 16}
        return ae.AutoencodingEngine(
            regularizer_config={'target': "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={'target': "comfy.ldm.modules.diffusionmodules.model.Encoder", 'params': dd},
            decoder_config={'target': "comfy.ldm.modules.diffusionmodules.model.Decoder", 'params': dd}), \
            "decoder.conv_out"
    if name == "wan21-vae":
        return comfy.ldm.wan.vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                        temperal_downsample=[False, True, True], dropout=0.0), "decoder.head.2"
    raise KeyError(name)


def build_comfy_vae(name: str, seed_name: str | None = None):
    """A random VAE whose decoder maps a unit-spread latent to pixels of spread about 0.5 (not saturated at
    +-1: pictures that differ, differ in their 8-bit pixels)."""
    import torch
    import comfy.sd
    module, out_layer = vae_module(name)
    randomize(module, SEEDS[seed_name or name])
    module.eval()
    vae = None

    def measure():
        nonlocal vae
        vae = comfy.sd.VAE(sd=module.state_dict())
        channels = vae.latent_channels
        g = torch.Generator().manual_seed(0)
        shape = (1, channels, 3, 8, 8) if name == "wan21-vae" else (1, channels, 8, 8)
        return vae.first_stage_model.decode(torch.randn(*shape, generator=g))

    scale_output(module.get_submodule(out_layer), measure, target=0.5)
    return module


def build_comfy_clip(kind: str):
    """ComfyUI's CLIP-L (SD 1.5's text encoder, 123 M weights) or CLIP-G (SDXL's, 695 M), full size from its fixed
    configs; the ``transformer`` state dict is the layout Load CLIP detects (``text_model.*``,
    ``text_projection.weight``)."""
    import comfy.sd1_clip
    import comfy.sdxl_clip
    clip = comfy.sd1_clip.SDClipModel(device="cpu") if kind == "clip-l" else comfy.sdxl_clip.SDXLClipG(device="cpu")
    randomize(clip.transformer, SEEDS[kind])
    return clip.transformer


def check_comfy_clip_finite(paths: list[Path], clip_type: str, prompts=SD15_PROMPTS) -> None:
    """Load text encoders with ComfyUI's Load CLIP code and encode ``prompts``: finite and bounded."""
    import torch
    import comfy.sd
    # as Load CLIP / DualCLIPLoader map their type (sdxl: STABLE_DIFFUSION with two files)
    kind = getattr(comfy.sd.CLIPType, clip_type.upper(), comfy.sd.CLIPType.STABLE_DIFFUSION)
    clip = comfy.sd.load_clip([str(p) for p in paths], clip_type=kind)
    worst = 0.0
    for prompt in prompts:
        cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
        if not (torch.isfinite(cond).all() and torch.isfinite(pooled).all()):
            raise RuntimeError(f"{paths}: a non-finite encoding of {prompt!r}")
        worst = max(worst, float(cond.abs().max()))
    if worst > 1e3:
        raise RuntimeError(f"{paths}: encodings reach {worst:.3g}")
    log(f"  ComfyUI loads {', '.join(p.name for p in paths)} as {clip_type}; {len(prompts)} prompts encode finite "
        f"(max |x| {worst:.3g})")


def sd15_checkpoint(clip_transformer, unet, vae) -> dict:
    """SD 1.5's original (LDM) checkpoint layout, which A1111, Forge and ComfyUI all load: ``model.diffusion_model``,
    ``cond_stage_model.transformer.text_model``, ``first_stage_model``."""
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    sd.update({f"cond_stage_model.transformer.{k}": v for k, v in clip_transformer.state_dict().items()
               if k.startswith("text_model.")})
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    return sd


def check_sd15(path: Path, prompts=SD15_PROMPTS, sampled=SD15_SAMPLED, steps: int = 12, cfg: float = 5.0) -> None:
    """Load the checkpoint with ComfyUI's Load Checkpoint code (it must detect SD 1.5); for each of ``prompts`` the
    CLIP's last and penultimate layers are finite and bounded, and for each of ``sampled`` ComfyUI's plain Euler with
    full CFG over ``steps`` steps at 64x64 gives a finite latent and picture."""
    import torch
    import comfy.sample
    import comfy.sd
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3]
    family = type(model.model.model_config).__name__
    if family != "SD15":
        raise RuntimeError(f"{path}: ComfyUI detects {family}, not SD15")
    negative = clip.encode_from_tokens_scheduled(clip.tokenize("blurry"))
    latent = torch.zeros(1, 4, 8, 8)
    for layer in (-1, -2):
        c = clip.clone()
        c.clip_layer(layer)
        for prompt in prompts:
            out = c.encode_from_tokens(c.tokenize(prompt))
            if not torch.isfinite(out).all() or float(out.abs().max()) > 1e3:
                raise RuntimeError(f"{path}: CLIP layer {layer} gives {float(out.abs().max())} for {prompt!r}")
    for i, prompt in enumerate(sampled):
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        noise = comfy.sample.prepare_noise(latent, 1234 + i)
        samples = comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                                      disable_pbar=True, seed=1234 + i)
        image = vae.decode(samples)
        if not (torch.isfinite(samples).all() and torch.isfinite(image).all()):
            raise RuntimeError(f"{path}: Euler, {steps} steps, CFG {cfg}: a non-finite picture for {prompt!r}")
        log(f"  {prompt!r}: finite picture, mean {float(image.mean()):.3f}, spread {float(image.std()):.3f}")
    log(f"  ComfyUI loads it as SD15; {len(prompts)} prompts encode finite (clip skip 1 and 2), {len(sampled)} give "
        f"finite pictures (Euler, {steps} steps, CFG {cfg})")


def build_sd15(out: Path, force: bool) -> None:
    import torch
    if out.exists() and not force:
        log(f"{out} exists (--force rebuilds it)")
        return
    log(f"SD 1.5 -> {out}")
    clip = build_comfy_clip("clip-l")
    unet = build_comfy_diffusion_model("sd15")
    vae = build_comfy_vae("vae4", "sd15")
    save(sd15_checkpoint(clip, unet, vae), out, dtype=torch.float16)
    check_sd15(out)


def build_comfyui(root: Path, only: list[str], force: bool) -> None:
    import torch
    models = root / "models"

    def target(name):
        folder, file = COMFYUI_FILES[name]
        return models / folder / file

    wanted = [n for n in COMFYUI_FILES if not only or n in only]
    for name in wanted:
        path = target(name)
        if path.exists() and not force:
            log(f"{path} exists (--force rebuilds it)")
            continue
        log(f"{name} -> {path}")
        if name == "sd15":
            build_sd15(path, force=True)
        elif name in EXPECTED_FAMILY:
            dm = build_comfy_diffusion_model(name)
            sd = dm.state_dict()
            dtype = torch.float16 if name == "sdxl" else None
            save(sd, path, dtype=dtype, metadata=WAN_METADATA if name.startswith("wan") else None)
            check_comfy_diffusion_model(name, path, {k: v.to(dtype) if dtype else v for k, v in sd.items()})
        elif name in ("clip-l", "clip-g"):
            save(build_comfy_clip(name).state_dict(), path, dtype=torch.float16)
        else:
            module = build_comfy_vae(name)
            save(module.state_dict(), path)
            vae = __import__("comfy.sd").sd.VAE(sd=__import__("comfy.utils").utils.load_torch_file(str(path)))
            log(f"  ComfyUI loads it as a VAE with {vae.latent_channels} latent channels")
    if not only or {"clip-l", "clip-g"} & set(only):
        if target("clip-l").exists():
            check_comfy_clip_finite([target("clip-l")], "stable_diffusion")
        if target("clip-l").exists() and target("clip-g").exists():
            check_comfy_clip_finite([target("clip-l"), target("clip-g")], "sdxl", prompts=["a red apple on a table",
                                                                                          "blurry"])


# -- a sampler of our own for the hosts whose sampling stack needs a running host ----------------------------------
def sd_sigmas(steps: int):
    """SD 1.5's discrete schedule (scaled-linear betas 0.00085..0.012 over 1000 steps) at ``steps`` evenly spaced
    timesteps from 999 down, and sigma 0 at the end: (timesteps, sigmas)."""
    import torch
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    all_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    timesteps = torch.linspace(999, 0, steps, dtype=torch.float64).round().long()
    return timesteps, torch.cat([all_sigmas[timesteps], torch.zeros(1, dtype=torch.float64)]).float()


def check_sd15_prompts(encode, eps, decode, prompts=SD15_PROMPTS, sampled=SD15_SAMPLED, steps: int = 12,
                       cfg: float = 5.0) -> None:
    """For each of ``prompts``, ``encode(prompt, layer)`` (CLIP's last layer, -1, and the penultimate one, -2: clip skip
    2) is finite and bounded; for each of ``sampled``, Euler with full CFG over ``steps`` steps at 64x64
    (``eps(x, t, context)``: the UNet's noise prediction; ``decode(latent)``: the VAE) gives a finite latent and
    picture."""
    import torch
    timesteps, sigmas = sd_sigmas(steps)
    negative = encode("blurry", -1)
    for layer in (-1, -2):
        for prompt in prompts:
            out = encode(prompt, layer)
            if not torch.isfinite(out).all() or float(out.abs().max()) > 1e3:
                raise RuntimeError(f"CLIP layer {layer} gives {float(out.abs().max())} for {prompt!r}")
    for i, prompt in enumerate(sampled):
        positive = encode(prompt, -1)
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1234 + i)) * sigmas[0]
        for k in range(steps):
            s = sigmas[k]
            xin = torch.cat([x, x]) / (s ** 2 + 1) ** 0.5
            e_pos, e_neg = eps(xin, timesteps[k].repeat(2), torch.cat([positive, negative])).float().chunk(2)
            x = x + (e_neg + cfg * (e_pos - e_neg)) * (sigmas[k + 1] - s)
        image = decode(x / 0.18215)
        if not (torch.isfinite(x).all() and torch.isfinite(image).all()):
            raise RuntimeError(f"Euler, {steps} steps, CFG {cfg}: a non-finite picture for {prompt!r}")
    log(f"  {len(prompts)} prompts encode finite (clip skip 1 and 2); {len(sampled)} give finite pictures "
        f"(Euler, {steps} steps, CFG {cfg})")


#: openai/clip-vit-large-patch14's text model (SD 1.5's text encoder), as transformers configures it.
CLIP_L_HF = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)


def clip_tokens(prompt: str):
    """CLIP ViT-L/14's token ids for ``prompt`` (start, text, end, padded with the end token to 77, as A1111 pads),
    from the BPE tokenizer shipped in the ``clip`` package (no download)."""
    import torch
    from clip.simple_tokenizer import SimpleTokenizer
    tok = SimpleTokenizer()
    ids = [49406] + tok.encode(prompt)[:75] + [49407]
    return torch.tensor([ids + [49407] * (77 - len(ids))])


def hf_clip_encoder(clip):
    """``encode(prompt, layer)`` for a transformers CLIPTextModel, clip skip as A1111 applies it (the final layer
    norm on the penultimate layer)."""
    def encode(prompt, layer):
        out = clip(input_ids=clip_tokens(prompt), output_hidden_states=layer != -1)
        if layer == -1:
            return out.last_hidden_state
        return getattr(clip, "text_model", clip).final_layer_norm(out.hidden_states[layer])
    return encode


def hf_clip_checkpoint_keys(clip) -> dict:
    """A transformers CLIPTextModel's tensors under SD 1.5's ``cond_stage_model.transformer.text_model.`` (a
    transformers 5.x model has no ``text_model`` level: the layout stays that of the original checkpoint)."""
    return {f"cond_stage_model.transformer.{k if k.startswith('text_model.') else 'text_model.' + k}": v
            for k, v in clip.state_dict().items()}


# -- A1111 (v1.10): SD 1.5 from its LDM config, SD3 with its own classes ----------------------------------------
def import_a1111(a1111_dir: str) -> Path:
    root = Path(a1111_dir).resolve()
    if not (root / "modules" / "models" / "sd3" / "sd3_impls.py").exists():
        sys.exit(f"{root} is not an A1111 v1.10 checkout (no modules/models/sd3/sd3_impls.py)")
    ldm = root / "repositories" / "stable-diffusion-stability-ai"
    if not (ldm / "ldm").exists():
        sys.exit(f"{ldm} is missing: A1111 clones it on its first start (or see docs/hosts/a1111.md)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path[:0] = [str(root), str(ldm)]
    return root


def finish_sd15(unet, vae, clip, out: Path) -> dict:
    """Randomise an SD 1.5's UNet, VAE and CLIP-L built with a host's classes, scale their outputs, check the prompts
    the suites send give finite pictures, and save the checkpoint in the original layout; returns its state dict."""
    randomize(clip, SEEDS["clip-l"])
    randomize(unet, SEEDS["sd15"])
    randomize(vae, SEEDS["vae4"])
    g = torch.Generator().manual_seed(0)
    scale_output(unet.out[2], lambda: unet(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]),
                                           context=torch.randn(1, 77, 768, generator=g)))
    scale_output(vae.decoder.conv_out, lambda: vae.decode(torch.randn(1, 4, 8, 8, generator=g)), target=0.5)
    check_sd15_prompts(hf_clip_encoder(clip), lambda x, t, c: unet(x, t, context=c), vae.decode)
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    sd.update(hf_clip_checkpoint_keys(clip))
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    save(sd, out, dtype=torch.float16)
    return sd


def build_a1111_sd15(a1111_dir: str, out: Path, force: bool) -> None:
    """SD 1.5 from A1111's own LDM config (configs/v1-inference.yaml: its UNet and VAE from the
    stable-diffusion-stability-ai repository A1111 runs) and the CLIP-L text model its FrozenCLIPEmbedder wraps
    (transformers' CLIPTextModel, built from its config: nothing downloaded)."""
    import torch
    if out.exists() and not force:
        log(f"{out} exists (--force rebuilds it)")
        return
    root = import_a1111(a1111_dir)
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf
    from transformers import CLIPTextConfig, CLIPTextModel
    log(f"SD 1.5 (A1111's LDM classes) -> {out}")
    params = OmegaConf.load(root / "configs" / "v1-inference.yaml").model.params
    unet = instantiate_from_config(params.unet_config).eval()
    vae = instantiate_from_config(params.first_stage_config).eval()
    clip = CLIPTextModel(CLIPTextConfig(**CLIP_L_HF)).eval()
    finish_sd15(unet, vae, clip, out)


def build_a1111_sd3(a1111_dir: str, out: Path, force: bool) -> None:
    """A tiny random SD3 built with A1111's own SD3 code (modules/models/sd3): the MMDiT its BaseModel builds from
    the checkpoint's shapes, at width 64 (one joint block), its CLIP-L and CLIP-G at their fixed sizes (A1111's
    configs), its VAE; no T5 (A1111's default: T5's share of the context is zeros)."""
    import torch
    if out.exists() and not force:
        log(f"{out} exists (--force rebuilds it)")
        return
    root = import_a1111(a1111_dir)
    os.chdir(root)
    sys.argv = [sys.argv[0]]
    from modules import initialize
    initialize.imports()  # A1111's own import order (its modules import each other circularly)
    from modules.models.sd3 import other_impls, sd3_cond, sd3_impls
    log(f"SD3 (A1111's classes) -> {out}")
    # BaseModel reads its configuration from these shapes (depth = width / 64; pos_embed 32 x 32 patches;
    # pooled CLIP-L + CLIP-G, 2048; context CLIP-L + CLIP-G padded to T5's 4096).
    width = 64
    shapes = {"x_embedder.proj.weight": (width, 16, 2, 2), "pos_embed": (1, 1024, width),
              "y_embedder.mlp.0.weight": (width, 2048), "context_embedder.weight": (width, 4096)}
    base = sd3_impls.BaseModel(shift=3.0, device="cpu", dtype=torch.float32, prefix="model.diffusion_model.",
                               state_dict={f"model.diffusion_model.{k}": torch.empty(v) for k, v in shapes.items()})
    mmdit = base.diffusion_model.eval()
    randomize(mmdit, SEEDS["a1111-sd3"])
    g = torch.Generator().manual_seed(0)
    scale_output(mmdit.final_layer.linear,
                 lambda: mmdit(torch.randn(1, 16, 8, 8, generator=g), torch.tensor([500.0]),
                               context=torch.randn(1, 154, 4096, generator=g), y=torch.randn(1, 2048, generator=g)))
    clip_l = other_impls.SDClipModel(layer="hidden", layer_idx=-2, device="cpu", dtype=torch.float32,
                                     layer_norm_hidden_state=False, return_projected_pooled=False,
                                     textmodel_json_config=sd3_cond.CLIPL_CONFIG)
    clip_g = other_impls.SDXLClipG(sd3_cond.CLIPG_CONFIG, device="cpu", dtype=torch.float32)
    randomize(clip_l, SEEDS["clip-l"])
    randomize(clip_g, SEEDS["clip-g"])
    vae = sd3_impls.SDVAE(device="cpu", dtype=torch.float32).eval()
    randomize(vae, SEEDS["vae16"])
    scale_output(vae.decoder.conv_out, lambda: vae.decode(torch.randn(1, 16, 8, 8, generator=g)), target=0.5)
    sd = {f"model.diffusion_model.{k}": v for k, v in mmdit.state_dict().items()}
    sd.update({f"text_encoders.clip_l.{k}": v for k, v in clip_l.state_dict().items()})
    sd.update({f"text_encoders.clip_g.{k}": v for k, v in clip_g.state_dict().items()})
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    save(sd, out, dtype=torch.float16)
    # A1111's SD3 model rebuilds its MMDiT from the file's shapes: every tensor must load into it.
    from safetensors.torch import load_file
    written = load_file(str(out))
    again = sd3_impls.BaseModel(shift=3.0, device="cpu", dtype=torch.float32, prefix="model.diffusion_model.",
                                state_dict=written)
    missing, unexpected = again.load_state_dict({k[len("model."):]: v for k, v in written.items()
                                                 if k.startswith("model.")}, strict=False)
    missing = [k for k in missing if not k.startswith("model_sampling.")]  # its schedule, computed, not stored
    if missing or unexpected:
        raise RuntimeError(f"A1111's SD3 model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    log(f"  A1111's SD3 BaseModel rebuilds it at depth {again.depth} and loads every tensor")


# -- Forge Neo: Lumina 2 with its own backend classes -----------------------------------------------------------
def import_forge(forge_dir: str) -> Path:
    root = Path(forge_dir).resolve()
    if not (root / "backend" / "loader.py").exists():
        sys.exit(f"{root} is not a Forge Neo checkout (no backend/loader.py)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path[:0] = [str(root), str(root / "modules_forge" / "packages")]
    os.chdir(root)
    sys.argv = [sys.argv[0], "--cpu"]
    return root


def build_forge_sd15(forge_dir: str, out: Path, force: bool) -> None:
    """SD 1.5 with Forge Neo's own backend classes, in the LDM layout its loader reads (and A1111's and ComfyUI's):
    its UNet (LDM keys) from the SD 1.5 configuration its detection gives, its VAE from the runwayml config it ships,
    the transformers CLIPTextModel it loads SD 1.5's text encoder into (the config it ships); checked by Forge Neo's
    own model detection."""
    import inspect
    import torch
    if out.exists() and not force:
        log(f"{out} exists (--force rebuilds it)")
        return
    root = import_forge(forge_dir)
    import huggingface_guess
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel
    repo = root / "backend" / "huggingface" / "runwayml" / "stable-diffusion-v1-5"
    log(f"SD 1.5 (Forge Neo's classes) -> {out}")
    accepted = inspect.signature(IntegratedUNet2DConditionModel.__init__).parameters
    unet = IntegratedUNet2DConditionModel(**{k: v for k, v in {**SD15, "num_head_channels": -1}.items()
                                             if k in accepted}).eval()
    vae = IntegratedAutoencoderKL.from_config(IntegratedAutoencoderKL.load_config(str(repo / "vae"))).eval()
    clip = CLIPTextModel(CLIPTextConfig.from_pretrained(str(repo / "text_encoder"))).eval()
    sd = finish_sd15(unet, vae, clip, out)
    guess = huggingface_guess.guess(dict(sd))
    if type(guess).__name__ != "SD15":
        raise RuntimeError(f"Forge Neo's detection takes {out} for {type(guess).__name__}, not SD15")
    log("  Forge Neo's detection takes it for SD15")


def build_forge_lumina2(forge_dir: str, out: Path, force: bool) -> None:
    """A tiny random Lumina 2 in the single-file layout Forge Neo's loader splits (``model.diffusion_model.``,
    ``text_encoders.gemma2_2b.transformer.``, ``vae.``), built with Forge Neo's own backend classes: its NextDiT at
    the width its detection reads as original Lumina 2 (2304: 24 heads, 8 key/value heads) with one layer (and its
    two refiner layers of each kind), its Gemma-2-2B text encoder at its fixed size stored in float8 (2.6 B weights:
    a byte each), its Flux-style VAE from the Neta-Lumina config it ships; then Forge Neo's own model detection
    must take it for Lumina 2."""
    import torch
    if out.exists() and not force:
        log(f"{out} exists (--force rebuilds it)")
        return
    root = import_forge(forge_dir)
    import huggingface_guess
    from backend.nn.llm.llama import Gemma2_2B
    from backend.nn.lumina import NextDiT
    from backend.nn.vae import IntegratedAutoencoderKL
    from backend.operations import using_forge_operations
    try:  # as Forge's loader (transformers 4.x; a 5.x moved it: building is then only slower)
        from transformers.modeling_utils import no_init_weights
    except ImportError:
        from contextlib import nullcontext as no_init_weights
    repo = root / "backend" / "huggingface" / "neta-art" / "Neta-Lumina"
    log(f"Lumina 2 (Forge Neo's classes) -> {out}")
    width = 2304
    dit = NextDiT(patch_size=2, in_channels=16, dim=width, n_layers=1, n_heads=24, n_kv_heads=8, qk_norm=True,
                  cap_feat_dim=width, axes_dims=[32, 32, 32], axes_lens=[300, 512, 512], rope_theta=10000.0,
                  ffn_dim_multiplier=4.0).eval()
    randomize(dit, SEEDS["forge-lumina2"])
    g = torch.Generator().manual_seed(0)
    scale_output(dit.final_layer.linear,
                 lambda: dit(torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.5]),
                             torch.randn(1, 16, width, generator=g)))
    vae = IntegratedAutoencoderKL.from_config(IntegratedAutoencoderKL.load_config(str(repo / "vae"))).eval()
    randomize(vae, SEEDS["vae16"])
    scale_output(vae.decoder.conv_out, lambda: vae.decode(torch.randn(1, 16, 8, 8, generator=g)), target=0.5)
    sd = {f"model.diffusion_model.{k}": v.to(torch.bfloat16) for k, v in dit.state_dict().items()}
    sd.update({f"vae.{k}": v for k, v in vae.state_dict().items()})
    del dit, vae
    # Gemma-2-2B, as Forge's loader builds it (its operations, float8 storage: fp32 would take 10 GB), randomised
    # tensor by tensor. Its RMSNorm scales by (1 + weight): norm weights around 0.
    with no_init_weights(), using_forge_operations(device=torch.device("cpu"), dtype=torch.float8_e4m3fn,
                                                   manual_cast_enabled=True):
        gemma = Gemma2_2B({})
    # Forge's Linear holds no weight until one is loaded (its shape is its in/out features; Gemma has no biases).
    shapes = {name: tuple(p.shape) for name, p in gemma.named_parameters()}
    shapes.update({f"{name}.weight": (m.out_features, m.in_features) for name, m in gemma.named_modules()
                   if getattr(m, "weight", 0) is None and hasattr(m, "in_features")})
    gen = torch.Generator().manual_seed(SEEDS["forge-lumina2"] + 1)
    for name, shape in shapes.items():
        if len(shape) == 1 or "embed_tokens" in name:
            value = torch.randn(shape, generator=gen) * 0.02
        else:
            bound = 1 / math.sqrt(shape[1])
            value = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        sd[f"text_encoders.gemma2_2b.transformer.{name}"] = value.to(torch.float8_e4m3fn)
        del value
    del gemma
    if len(shapes) < 26 * 11:
        raise RuntimeError(f"Gemma-2-2B: only {len(shapes)} tensors")
    save(sd, out)
    guess = huggingface_guess.guess({k: v for k, v in sd.items()})
    if type(guess).__name__ != "Lumina2":
        raise RuntimeError(f"Forge Neo's detection takes {out} for {type(guess).__name__}, not Lumina2")
    log(f"  Forge Neo's detection takes it for Lumina2 ({guess.unet_config})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("comfyui", help="every file tests/comfyui expects, under $COMFYUI_DIR/models")
    p.add_argument("--comfyui-dir", default=os.environ.get("COMFYUI_DIR"), required="COMFYUI_DIR" not in os.environ)
    p.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(COMFYUI_FILES)}")
    p.add_argument("--force", action="store_true", help="rebuild files that exist")
    p = sub.add_parser("sd15", help="the random SD-1.5 checkpoint, with ComfyUI's, A1111's or Forge Neo's classes "
                                    "(the same LDM layout: every host loads it)")
    host = p.add_mutually_exclusive_group(required=True)
    host.add_argument("--comfyui-dir", help="build with this ComfyUI's classes (run with its Python)")
    host.add_argument("--a1111-dir", help="build with this A1111's LDM classes (run with its Python)")
    host.add_argument("--forge-dir", help="build with this Forge Neo's backend classes (run with its Python)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--force", action="store_true")
    p.add_argument("--check-only", action="store_true",
                   help="only check an existing checkpoint's prompts (with ComfyUI: --comfyui-dir)")
    p = sub.add_parser("a1111-sd3", help="a tiny random SD3 with A1111's own classes")
    p.add_argument("--a1111-dir", default=os.environ.get("A1111_DIR"), required="A1111_DIR" not in os.environ)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--force", action="store_true")
    p = sub.add_parser("forge-lumina2", help="a tiny random Lumina 2 with Forge Neo's own classes")
    p.add_argument("--forge-dir", default=os.environ.get("FORGE_DIR"), required="FORGE_DIR" not in os.environ)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    import torch
    torch.set_grad_enabled(False)
    if args.command == "comfyui":
        root = import_comfyui(args.comfyui_dir)
        build_comfyui(root, [s for s in args.only.split(",") if s], args.force)
    elif args.command == "sd15":
        out = args.out.resolve()
        if args.check_only and not args.comfyui_dir:
            sys.exit("--check-only loads the checkpoint with ComfyUI's loader: give --comfyui-dir")
        if args.a1111_dir:
            build_a1111_sd15(args.a1111_dir, out, args.force)
        elif args.forge_dir:
            build_forge_sd15(args.forge_dir, out, args.force)
        else:
            import_comfyui(args.comfyui_dir)
            if args.check_only:
                check_sd15(out)
            else:
                build_sd15(out, args.force)
    elif args.command == "a1111-sd3":
        build_a1111_sd3(args.a1111_dir, args.out.resolve(), args.force)
    elif args.command == "forge-lumina2":
        build_forge_lumina2(args.forge_dir, args.out.resolve(), args.force)


if __name__ == "__main__":
    main()
