"""Full CFG: the reference oracle."""

from __future__ import annotations

from .base import Decision, Oracle, StepState

class FullCFG(Oracle):
    """Plain classifier-free guidance on every step: the reference every other oracle is measured against."""

    name = "full"

    def _decide(self, state: StepState) -> Decision:
        return Decision.FULL

    def __repr__(self) -> str:
        return "FullCFG()"
