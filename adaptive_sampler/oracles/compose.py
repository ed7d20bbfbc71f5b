"""Composition: a guidance oracle (AG / LinearAG) decides computed steps, AdaptiveDiffusion decides skips."""

from __future__ import annotations

import torch

from .adaptive_diffusion import AdaptiveDiffusion
from .adaptive_guidance import AdaptiveGuidance
from .base import Decision, Oracle, RunInfo, StepRecord, StepState
from .full import FullCFG
from .linear_ag import LinearAG
from .schedule import CFGTruncation

class Compose(Oracle):
    """Adaptive Guidance (or LinearAG) and AdaptiveDiffusion together.

    ``skipping`` decides which steps are CACHED; ``guidance`` decides FULL / COND / LINEAR for the computed ones.
    After the guidance oracle switches to conditional-only, a CACHED step reuses the conditional eps.
    """

    name = "compose"
    decides_per_image = True

    def __init__(self, guidance: Oracle | None = None, skipping: AdaptiveDiffusion | None = None) -> None:
        super().__init__()
        guidance = AdaptiveGuidance() if guidance is None else guidance
        skipping = AdaptiveDiffusion() if skipping is None else skipping
        if not isinstance(guidance, (AdaptiveGuidance, LinearAG, FullCFG, CFGTruncation)):
            raise TypeError(f"guidance must be AdaptiveGuidance, LinearAG, CFGTruncation or FullCFG, got {guidance!r}")
        if not isinstance(skipping, AdaptiveDiffusion):
            raise TypeError(f"skipping must be an AdaptiveDiffusion oracle, got {skipping!r}")
        self.guidance = guidance
        self.skipping = skipping

    def __repr__(self) -> str:
        return f"Compose(guidance={self.guidance!r}, skipping={self.skipping!r})"

    @property
    def switch_step(self) -> int | None:
        return self.guidance.switch_step

    def _begin(self, run: RunInfo) -> None:
        self.guidance.reset(run)
        self.skipping.reset(run)
        self.overrides.extend(self.guidance.overrides + self.skipping.overrides)  # run-level notes (short runs)

    def _conditioning_changed(self, state: StepState) -> None:
        self.guidance._conditioning_changed(state)
        self.skipping._conditioning_changed(state)

    def _decide(self, state: StepState) -> Decision:
        if self.skipping._propose(state, self._consecutive_cached) is Decision.CACHED:
            return Decision.CACHED
        return self.guidance._decide(state)

    def _observe(self, record: StepRecord) -> None:
        self.guidance._last = record  # LinearAG alternates on the step that really ran, cached or not
        if record.decision is not Decision.CACHED:
            self.guidance._observe(record)

    def estimate_uncond(self, state: StepState, cond: torch.Tensor) -> torch.Tensor:
        return self.guidance.estimate_uncond(state, cond)
