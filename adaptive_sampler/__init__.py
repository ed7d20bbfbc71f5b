"""adaptive-sampler: training-free acceleration of classifier-free-guided diffusion sampling.

The runtime (``oracles``, ``engine``, ``sampling``) imports no host and no measuring tool: host glue lives in
``adaptive_sampler.hosts`` (and the A1111 entry point in ``scripts/``), the bench and friends in ``adaptive_sampler.lab``.
"""

from . import oracles  # noqa: F401
from .engine import GuidedDenoiser, NonFiniteError
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
