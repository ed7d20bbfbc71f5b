"""A1111 install hook: runs at every WebUI start, so it only checks. A1111 already provides everything the
extension imports (torch, k-diffusion, numpy, scipy, einops, safetensors, tqdm); install only what is missing."""

import importlib.util

import launch

for module, package in (("scipy", "scipy"), ("einops", "einops"), ("safetensors", "safetensors")):
    if importlib.util.find_spec(module) is None:
        launch.run_pip(f"install {package}", f"{package} for adaptive-sampler")
