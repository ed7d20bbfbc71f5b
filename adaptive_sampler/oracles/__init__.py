"""Step oracles and their registry.

The contract (:class:`Decision`, :class:`Oracle`, the step records and the safety rules) is in
:mod:`~adaptive_sampler.oracles.base`; each strategy has a module of its own. Adding an oracle is one new module and
one line in :data:`FACTORIES`.
"""

from __future__ import annotations

from .adaptive_diffusion import AdaptiveDiffusion
from .adaptive_guidance import DEFAULT_AG_THRESHOLDS, PREDICTION_SPACES, AdaptiveGuidance, per_sample_cosine, to_space
from .base import Decision, Oracle, RunInfo, RunSummary, StepRecord, StepState
from .compose import Compose
from .forecast import DEFAULT_LEVEL, LEVELS, Forecast
from .full import FullCFG
from .linear_ag import LinearAG, LinearAGCoefficients, UncondEstimator
from .schedule import CFGTruncation, Schedule

__all__ = [
    "Decision", "RunInfo", "StepState", "StepRecord", "RunSummary", "Oracle", "FullCFG", "AdaptiveGuidance",
    "AdaptiveDiffusion", "Compose", "Schedule", "CFGTruncation", "LinearAG", "LinearAGCoefficients", "Forecast",
    "UncondEstimator", "PREDICTION_SPACES", "DEFAULT_AG_THRESHOLDS", "to_space", "per_sample_cosine", "make_oracle",
    "recommended", "ORACLE_NAMES", "FACTORIES", "HOST_MODES", "mode_oracle", "SHORT_PASS_MIN_STEPS", "LEVELS",
    "DEFAULT_LEVEL",
]

#: Oracle names (as used by the CLI and the A1111 mode strings) and their classes.
FACTORIES: dict[str, type[Oracle]] = {
    "full": FullCFG,
    "ag": AdaptiveGuidance,
    "linear-ag": LinearAG,
    "adaptive-diffusion": AdaptiveDiffusion,
    "compose": Compose,
    "cfg-truncation": CFGTruncation,
    "schedule": Schedule,
    "forecast": Forecast,
}

#: Names accepted by :func:`make_oracle`.
ORACLE_NAMES = tuple(FACTORIES)


def make_oracle(name: str, **params: object) -> Oracle:
    """Build an oracle from its name (as used by the CLI and the A1111 extension)."""
    if name not in FACTORIES:
        raise ValueError(f"unknown oracle {name!r}; choose one of {', '.join(ORACLE_NAMES)}")
    return FACTORIES[name](**params)


def recommended(level: str = DEFAULT_LEVEL) -> Oracle:
    """The oracle we recommend by default (also the hosts' default mode): :class:`Forecast` at a quality level of
    :data:`LEVELS` - by default ``"balanced"``, 40% of full CFG's NFE on deterministic samplers (50% on stochastic
    ones, 60% on DPM++ SDE), which beats fewer steps and Forge Neo's Spectrum rule at equal NFE on the bench (README)."""
    return Forecast(level=level)


#: Hosts adapt only passes of at least this many steps; shorter ones run full CFG. Measured by
#: ``python -m adaptive_sampler.lab.short_passes``: below 12 steps the default loses to plain fewer steps (README).
SHORT_PASS_MIN_STEPS = 12

#: The modes the WebUI hosts (A1111, ComfyUI) offer, each a recipe over the oracles above.
HOST_MODES = ("forecast", "ag", "linear-ag", "adaptive-diffusion", "ag+adaptive-diffusion", "off")


def mode_oracle(mode: str, *, level: str = DEFAULT_LEVEL, budget: float | None = None, ag_threshold: float | None = None, ag_space: str = "x0",
                ad_threshold: float = 0.01, max_skips: int = 4, warmup: int = 4) -> Oracle | None:
    """A fresh oracle for a host mode (None for ``"off"``); each parameter is checked by the oracle that uses it."""
    if mode not in HOST_MODES:
        raise ValueError(f"mode must be one of {', '.join(HOST_MODES)}, got {mode!r}")

    def guidance() -> AdaptiveGuidance:
        return AdaptiveGuidance(ag_threshold, ag_space)

    def skipping() -> AdaptiveDiffusion:
        return AdaptiveDiffusion(ad_threshold, max_skips, warmup)

    return {
        "forecast": lambda: Forecast(budget=budget, level=level),
        "ag": guidance,
        "linear-ag": lambda: LinearAG(threshold=ag_threshold, space=ag_space),
        "adaptive-diffusion": skipping,
        "ag+adaptive-diffusion": lambda: Compose(guidance(), skipping()),
        "off": lambda: None,
    }[mode]()
