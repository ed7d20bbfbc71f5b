"""adaptive-sampler: training-free acceleration of classifier-free-guided diffusion sampling.

The runtime (``oracles``, ``engine``, ``sampling``) imports no host and no measuring tool: host glue lives in
``adaptive_sampler.hosts`` (and the A1111 entry point in ``scripts/``), the bench and friends in ``adaptive_sampler.lab``.
"""

import importlib

from . import oracles  # noqa: F401
from .oracles import (AdaptiveDiffusion, AdaptiveGuidance, CFGTruncation, Compose, Decision, FullCFG, LinearAG,
                      Oracle, Schedule, make_oracle)

__version__ = "0.1.0"

# The engine and the sampling loops need the k-diffusion package; they load on first use, so hosts that bring their
# own loops (ComfyUI ships its own k-diffusion copy) can import the oracles without it.
_LAZY = {"GuidedDenoiser": "engine", "NonFiniteError": "engine", "SAMPLERS": "sampling", "ddim_timesteps": "sampling",
         "get_sigmas_ddim": "sampling", "sample_ddim": "sampling", "sample_dpmpp_2m": "sampling",
         "sample_dpmpp_2m_sde": "sampling", "sample_euler": "sampling", "sample_euler_ancestral": "sampling"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "AdaptiveDiffusion", "AdaptiveGuidance", "CFGTruncation", "Compose", "Decision", "FullCFG", "GuidedDenoiser",
    "LinearAG", "NonFiniteError", "Oracle", "SAMPLERS", "Schedule", "ddim_timesteps", "get_sigmas_ddim",
    "make_oracle", "sample_ddim", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_euler", "sample_euler_ancestral",
]
