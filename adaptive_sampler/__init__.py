"""adaptive-sampler: training-free acceleration of classifier-free-guided diffusion sampling.

The library has no A1111 dependency; the WebUI glue lives in ``scripts/`` and ``adaptive_sampler.webui``.
"""

from . import oracles  # noqa: F401  (first: linear_ag builds on it)
from .guidance import GuidedDenoiser, NonFiniteError
from .oracles import (AdaptiveDiffusion, AdaptiveGuidance, CFGTruncation, Compose, Decision, FullCFG, LinearAG,
                      Oracle, Schedule, make_oracle)
from .sampling import (SAMPLERS, ddim_timesteps, get_sigmas_ddim, sample_ddim, sample_dpmpp_2m,
                       sample_dpmpp_2m_sde, sample_euler, sample_euler_ancestral)

__version__ = "0.1.0"

__all__ = [
    "AdaptiveDiffusion", "AdaptiveGuidance", "CFGTruncation", "Compose", "Decision", "FullCFG", "GuidedDenoiser",
    "LinearAG", "NonFiniteError", "Oracle", "SAMPLERS", "Schedule", "ddim_timesteps", "get_sigmas_ddim",
    "make_oracle", "sample_ddim", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_euler", "sample_euler_ancestral",
]
