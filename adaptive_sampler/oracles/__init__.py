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
from .forecast import Forecast
from .full import FullCFG
from .linear_ag import LinearAG, LinearAGCoefficients, UncondEstimator
from .schedule import CFGTruncation, Schedule

__all__ = [
    "Decision", "RunInfo", "StepState", "StepRecord", "RunSummary", "Oracle", "FullCFG", "AdaptiveGuidance",
    "AdaptiveDiffusion", "Compose", "Schedule", "CFGTruncation", "LinearAG", "LinearAGCoefficients", "Forecast",
    "UncondEstimator", "PREDICTION_SPACES", "DEFAULT_AG_THRESHOLDS", "to_space", "per_sample_cosine", "make_oracle",
    "recommended", "ORACLE_NAMES", "FACTORIES",
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


def recommended() -> Oracle:
    """The oracle we recommend by default (also the A1111 default mode): :class:`Forecast` at half of full CFG's
    NFE, which beats running half the steps on every cell of the bench (README, method notes)."""
    return Forecast()
