"""Step oracles: per step, decide how the guided prediction is obtained.

A sampling loop asks its oracle, before every step, for a :class:`Decision`:

* ``FULL``   - conditional + unconditional network rows, combined with CFG (2 NFE per sample);
* ``COND``   - conditional rows only, no guidance (1 NFE);
* ``LINEAR`` - conditional rows; the unconditional prediction is estimated from past predictions (1 NFE);
* ``CACHED`` - no network call: the last computed noise prediction *eps* is reused at the new noise level,
  and the sampler still updates the latent (0 NFE).

The oracle then sees what the step produced (:meth:`Oracle.record`). State lives in the oracle object and is
cleared by :meth:`Oracle.reset` at the start of every run, so one object can serve many runs (but not two runs at
the same time: give each thread its own oracle).

The base class enforces the rules every oracle must obey, whatever its policy says:

* a step whose conditioning changed (A1111 prompt editing) is evaluated in full: no cache or regression input is
  ever carried across a conditioning change;
* ``CACHED`` needs a finite cached eps, ``LINEAR`` needs the previous step to have been a finite ``FULL`` step;
  otherwise the step runs ``FULL`` and :attr:`Oracle.overrides` records why.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = [
    "Decision",
    "RunInfo",
    "StepState",
    "StepRecord",
    "RunSummary",
    "Oracle",
    "FullCFG",
    "AdaptiveGuidance",
    "AdaptiveDiffusion",
    "Compose",
    "Schedule",
    "CFGTruncation",
    "LinearAG",
    "PREDICTION_SPACES",
    "DEFAULT_AG_THRESHOLDS",
    "make_oracle",
    "recommended",
    "ORACLE_NAMES",
]


class Decision(enum.Enum):
    """How one sampler step obtains its guided prediction. The value is the one-letter code of :class:`Schedule`."""

    FULL = "F"
    COND = "C"
    LINEAR = "L"
    CACHED = "S"

    @property
    def nfe(self) -> int:
        """Network evaluations per sample (rows of the batch) this decision costs."""
        return _NFE[self]

    @property
    def computes(self) -> bool:
        """Whether the step calls the network at all."""
        return self is not Decision.CACHED


_NFE = {Decision.FULL: 2, Decision.COND: 1, Decision.LINEAR: 1, Decision.CACHED: 0}

#: Prediction spaces in which Adaptive Guidance compares cond and uncond (see :func:`to_space`).
PREDICTION_SPACES = ("x0", "eps", "v")


def to_space(pred_x0: torch.Tensor, x: torch.Tensor, sigma: float, space: str) -> torch.Tensor:
    """Express a denoised (x0) prediction in another parameterisation, in float32.

    k-diffusion scaling: ``x = x0 + sigma * eps``. The v target of a variance-preserving model is
    ``(eps - sigma * x0) / sqrt(1 + sigma**2)``; the positive factor is dropped because only cosines are taken.
    """
    pred = pred_x0.float()
    if space == "x0":
        return pred
    eps = (x.float() - pred) / sigma
    if space == "eps":
        return eps
    return eps - sigma * pred


def per_sample_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each sample's flattened tensor (float32), shape ``[batch]``."""
    return torch.nn.functional.cosine_similarity(a.float().flatten(1), b.float().flatten(1), dim=1, eps=1e-12)


@dataclass(frozen=True)
class RunInfo:
    """What an oracle knows about a run before its first step. ``sigmas`` may be empty when the host does not
    expose its schedule (then ``steps`` must be given)."""

    sampler: str
    sigmas: tuple[float, ...]
    batch_size: int
    steps: int = -1

    def __post_init__(self) -> None:
        if self.steps < 0:
            object.__setattr__(self, "steps", len(self.sigmas) - 1)
        if self.steps < 1:
            raise ValueError(f"a run needs at least 1 step, got {self.steps}")


@dataclass(frozen=True)
class StepState:
    """The oracle's view of the step about to run.

    ``x`` is the latent the network would see, i.e. the latent left by the previous step's update.
    ``conditioning_changed`` is set by callers whose conditioning is scheduled per step (A1111 prompt editing).
    """

    index: int
    total: int
    sigma: float
    x: torch.Tensor
    conditioning_changed: bool = False


@dataclass(frozen=True)
class StepRecord:
    """What a step produced. Predictions are denoised images (x0, k-diffusion convention).

    ``uncond`` is the real unconditional prediction on FULL steps and the estimate on LINEAR steps; ``eps`` is the
    guided noise prediction the sampler used: the one a later CACHED step reuses.
    """

    index: int
    decision: Decision
    sigma: float
    x: torch.Tensor
    denoised: torch.Tensor
    eps: torch.Tensor
    cond: torch.Tensor | None = None
    uncond: torch.Tensor | None = None


@dataclass(frozen=True)
class RunSummary:
    """Per-run accounting, available after a run and replaced by the next one."""

    steps: int
    nfe: int
    nfe_full: int
    counts: dict[str, int]
    ag_switch_step: int | None
    overrides: tuple[tuple[int, str], ...]
    schedule: str

    @property
    def nfe_ratio(self) -> float:
        return self.nfe / self.nfe_full if self.nfe_full else float("nan")

    def __str__(self) -> str:
        switch = "-" if self.ag_switch_step is None else str(self.ag_switch_step)
        return (
            f"NFE {self.nfe}/{self.nfe_full} ({self.nfe_ratio:.0%}), "
            + ", ".join(f"{k} {v}" for k, v in self.counts.items())
            + f", AG switch step {switch}, overrides {len(self.overrides)}"
        )


def _check_real(name: str, value: object, lo: float, hi: float = math.inf, accepted: str | None = None) -> float:
    accepted = accepted or f"a finite number in [{lo}, {hi}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {accepted}, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or not lo <= v <= hi:
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return v


def _check_int(name: str, value: object, lo: int, accepted: str | None = None) -> int:
    accepted = accepted or f"an integer >= {lo}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {accepted}, got {value!r}")
    if value < lo:
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return value


class Oracle:
    """Base class: bookkeeping, safety rules and the per-run summary. Subclasses implement :meth:`_decide`
    (and optionally :meth:`_begin`, :meth:`_observe`, :meth:`estimate_uncond`)."""

    name = "oracle"

    def __init__(self) -> None:
        self.run: RunInfo | None = None
        self.decisions: list[Decision] = []
        self.overrides: list[tuple[int, str]] = []
        self.nfe = 0
        self._last: StepRecord | None = None
        self._cached_eps: torch.Tensor | None = None
        self._consecutive_cached = 0

    # -- the contract used by sampling loops and the A1111 adapter ------------------------------------------------
    def reset(self, run: RunInfo) -> None:
        """Forget everything about the previous run and prepare for ``run``."""
        self.run = run
        self.decisions = []
        self.overrides = []
        self.nfe = 0
        self._last = None
        self._cached_eps = None
        self._consecutive_cached = 0
        self._begin(run)

    def decide(self, state: StepState) -> Decision:
        """The decision for the step described by ``state``, after the safety rules."""
        if self.run is None:
            raise RuntimeError(f"{type(self).__name__}.reset() must be called before decide()")
        if state.conditioning_changed:
            self._cached_eps = None
            self._last = None
            self._conditioning_changed(state)
        proposed = self._decide(state)
        if not isinstance(proposed, Decision):
            raise TypeError(f"{type(self).__name__}._decide returned {proposed!r}, not a Decision")
        reason = self._inadmissible(proposed, state)
        if reason is None:
            return proposed
        self.overrides.append((state.index, f"{proposed.name} -> FULL: {reason}"))
        return Decision.FULL

    def record(self, record: StepRecord, wasted_nfe: int = 0, fallback_from: Decision | None = None) -> None:
        """Take note of what a step produced. ``wasted_nfe`` counts network rows per sample whose output was
        discarded (a non-finite prediction that forced a full re-evaluation, named by ``fallback_from``)."""
        self.decisions.append(record.decision)
        self.nfe += record.decision.nfe + wasted_nfe
        if fallback_from is not None:
            self.overrides.append((record.index, f"{fallback_from.name} -> FULL: non-finite prediction"))
        if record.decision is Decision.CACHED:
            self._consecutive_cached += 1
        else:
            self._consecutive_cached = 0
            self._cached_eps = record.eps
        self._last = record
        self._observe(record)

    def cached_eps(self, state: StepState) -> torch.Tensor:
        """The noise prediction a CACHED step uses: by default the last computed guided eps (zero-order reuse)."""
        if self._cached_eps is None:
            raise RuntimeError("no cached prediction: the oracle never allows CACHED before a computed step")
        return self._cached_eps

    def estimate_uncond(self, state: StepState, cond: torch.Tensor) -> torch.Tensor:
        """The estimated unconditional x0 for a LINEAR step, given this step's conditional x0."""
        raise NotImplementedError(f"{type(self).__name__} never decides LINEAR")

    def summary(self) -> RunSummary:
        """NFE used, NFE of full CFG, steps per decision kind, AG switch step, overrides."""
        steps = len(self.decisions)
        return RunSummary(
            steps=steps,
            nfe=self.nfe,
            nfe_full=2 * steps,
            counts={d.name: sum(1 for x in self.decisions if x is d) for d in Decision},
            ag_switch_step=self.switch_step,
            overrides=tuple(self.overrides),
            schedule="".join(d.value for d in self.decisions),
        )

    @property
    def switch_step(self) -> int | None:
        """The step at which Adaptive Guidance switched to conditional-only (None if it did not)."""
        return None

    # -- hooks for subclasses ------------------------------------------------------------------------------------
    def _begin(self, run: RunInfo) -> None:
        """Reset subclass state for a new run."""

    def _decide(self, state: StepState) -> Decision:
        raise NotImplementedError

    def _observe(self, record: StepRecord) -> None:
        """Update subclass state from a step's outcome."""

    def _conditioning_changed(self, state: StepState) -> None:
        """Drop subclass state that depends on the previous conditioning."""

    # -- rules ---------------------------------------------------------------------------------------------------
    def _inadmissible(self, decision: Decision, state: StepState) -> str | None:
        if decision is Decision.CACHED:
            if state.conditioning_changed:
                return "conditioning changed"
            if self._cached_eps is None:
                return "no cached prediction"
        elif decision is Decision.LINEAR:
            if state.conditioning_changed:
                return "conditioning changed"
            last = self._last
            if last is None or last.index != state.index - 1 or last.decision is not Decision.FULL:
                return "LINEAR needs a FULL previous step"
        return None


class FullCFG(Oracle):
    """Plain classifier-free guidance on every step: the reference every other oracle is measured against."""

    name = "full"

    def _decide(self, state: StepState) -> Decision:
        return Decision.FULL

    def __repr__(self) -> str:
        return "FullCFG()"


#: Default AG thresholds per prediction space, calibrated on the embedded model (see README, "Adaptive Guidance").
#: In x0 space gamma_t starts near 0.88 and rises monotonically, as in the paper's figure, and the published 0.991
#: switches about 60% through the steps; v space behaves like x0 at high noise and like eps at low noise, so its
#: default is slightly lower. eps space has no default: there gamma_t starts above 0.9997 and *falls* along the
#: trajectory (it is not monotone), so any fixed threshold either switches at the first step or never.
DEFAULT_AG_THRESHOLDS = {"x0": 0.991, "v": 0.99}


class AdaptiveGuidance(Oracle):
    """Adaptive Guidance (Castillo et al. 2023): full CFG until the conditional and unconditional predictions agree.

    On every FULL step gamma_t, the cosine similarity of the cond and uncond predictions over each sample's
    flattened tensor, is computed in ``space`` (``"x0"``, ``"eps"`` or ``"v"``). Once gamma_t >= ``threshold`` for
    *every* sample of the batch, all later steps are conditional-only (sticky switch; the crossing step itself was
    already computed with full CFG). A batch switches as one because a step evaluates the whole batch in one call;
    per-sample switching would change other samples' results. ``threshold >= 1`` disables the switch.
    A conditioning change (prompt editing) restarts the test: that step runs full CFG and gamma is measured again.
    """

    name = "ag"

    def __init__(self, threshold: float | None = None, space: str = "x0") -> None:
        super().__init__()
        if space not in PREDICTION_SPACES:
            raise ValueError(f"space must be one of {PREDICTION_SPACES}, got {space!r}")
        self.space = space
        if threshold is None:
            if space not in DEFAULT_AG_THRESHOLDS:
                raise ValueError(f"threshold: there is no calibrated default in {space!r} space (gamma_t starts above "
                                 "0.9997 and is not monotone there); pass threshold= explicitly, e.g. from "
                                 "`python -m adaptive_sampler tune`, or use space='x0'")
            threshold = DEFAULT_AG_THRESHOLDS[space]
        self.threshold = _check_real("threshold", threshold, -1.0, math.inf,
                                     "a finite number >= -1 (cosine similarity; >= 1 disables the switch)")
        self.gammas: list[float | None] = []
        self._switched_at: int | None = None

    def __repr__(self) -> str:
        return f"AdaptiveGuidance(threshold={self.threshold}, space={self.space!r})"

    @property
    def switch_step(self) -> int | None:
        return self._switched_at

    @property
    def switched(self) -> bool:
        return self._switched_at is not None

    def _begin(self, run: RunInfo) -> None:
        self.gammas = []
        self._switched_at = None

    def _conditioning_changed(self, state: StepState) -> None:
        self._switched_at = None

    def _decide(self, state: StepState) -> Decision:
        return Decision.COND if self.switched else Decision.FULL

    def _observe(self, record: StepRecord) -> None:
        gamma = None
        if record.decision is Decision.FULL:
            c = to_space(record.cond, record.x, record.sigma, self.space)
            u = to_space(record.uncond, record.x, record.sigma, self.space)
            gamma = float(per_sample_cosine(c, u).min())
            if not self.switched and self.threshold < 1.0 and gamma >= self.threshold:
                self._switched_at = record.index
        self.gammas.extend([None] * (record.index - len(self.gammas)))
        self.gammas.append(gamma)


class AdaptiveDiffusion(Oracle):
    """AdaptiveDiffusion (Ye et al. 2024): skip the whole network call where the latent trajectory is smooth.

    With ``d_k = mean |x_k - x_{k-1}|`` over the whole batch latent after step k's update, step k+1 is ``CACHED``
    iff ``|(d_k + d_{k-2}) / 2 - d_{k-1}| <= threshold * d_{k-1}`` (the official code's third-order estimator).
    The first ``warmup`` steps always run the network (at least 4: the estimator needs the latents of four
    completed steps, as in the official code), and never more than ``max_skips`` steps in a row are skipped.
    The official code's cap is ``len(mask) > 4 and not any(mask[-C_max:])``, whose hard-coded ``> 4`` lets five
    skips in a row through right after warm-up; here the cap holds everywhere.
    The decision is per batch, as in the official code. A skipped step reuses the last computed eps.
    ``threshold=0`` disables skipping.
    """

    name = "adaptive-diffusion"

    def __init__(self, threshold: float = 0.01, max_skips: int = 4, warmup: int = 4) -> None:
        super().__init__()
        self.threshold = _check_real("threshold", threshold, 0.0, math.inf, "a finite number >= 0")
        self.max_skips = _check_int("max_skips", max_skips, 1, "an integer >= 1 (0 skips: use FullCFG)")
        self.warmup = _check_int("warmup", warmup, 4, "an integer >= 4 (the estimator needs four completed steps)")
        self.estimates: list[float | None] = []
        self._prev_x: torch.Tensor | None = None
        self._diffs: list[float] = []

    def __repr__(self) -> str:
        return f"AdaptiveDiffusion(threshold={self.threshold}, max_skips={self.max_skips}, warmup={self.warmup})"

    def _begin(self, run: RunInfo) -> None:
        if self.warmup >= run.steps:
            raise ValueError(f"warmup must be smaller than the number of steps ({run.steps}), got {self.warmup}")
        self.estimates = []
        self._prev_x = None
        self._diffs = []

    def _conditioning_changed(self, state: StepState) -> None:
        # The latent stays continuous across a prompt change, but its motion does not: restart the estimator.
        self._prev_x = None
        self._diffs = []

    def _decide(self, state: StepState) -> Decision:
        return self._propose(state, self._consecutive_cached)

    def _propose(self, state: StepState, consecutive_cached: int) -> Decision:
        """FULL or CACHED for this step, given how many steps in a row were already skipped."""
        estimate = self._update(state)
        self.estimates.append(estimate)
        if state.index < self.warmup or estimate is None or consecutive_cached >= self.max_skips:
            return Decision.FULL
        return Decision.CACHED if self.threshold > 0 and estimate <= self.threshold else Decision.FULL

    def _update(self, state: StepState) -> float | None:
        """Push the latent left by the previous step; return the relative third-order estimate, if defined."""
        x = state.x.float()
        if state.index > 0:  # index 0 sees the initial noise, which the official code never stores
            if self._prev_x is not None:
                self._diffs = (self._diffs + [float((x - self._prev_x).abs().mean())])[-3:]
            self._prev_x = x
        if len(self._diffs) < 3:
            return None
        d_prev_prev, d_prev, d_cur = self._diffs
        deviation = abs((d_cur + d_prev_prev) / 2 - d_prev)
        if d_prev == 0.0:
            return 0.0 if deviation == 0.0 else math.inf
        return deviation / d_prev


class Schedule(Oracle):
    """A fixed per-step plan: a sequence of :class:`Decision` or a compact string.

    The string uses ``F`` (FULL), ``C`` (COND), ``L`` (LINEAR), ``S`` (CACHED, "skip"), each optionally followed by
    a repeat count; whitespace is ignored: ``"F10 C40"`` is ten FULL steps then forty COND steps. LINEAR steps in a
    schedule estimate the unconditional prediction with ``linear`` (a :class:`LinearAG`-style estimator, by default
    the model-free delta rule).
    """

    name = "schedule"
    _TOKEN = re.compile(r"([FCLS])(\d*)")

    def __init__(self, decisions: str | Sequence[Decision], linear: "UncondEstimator | None" = None) -> None:
        super().__init__()
        self.plan = self.parse(decisions)
        self._estimator = linear or UncondEstimator.delta()

    @classmethod
    def parse(cls, decisions: str | Sequence[Decision]) -> tuple[Decision, ...]:
        if isinstance(decisions, str):
            text = "".join(decisions.split()).upper()
            if not text:
                raise ValueError("decisions must be a non-empty schedule string such as 'F10 C40'")
            pos, plan = 0, []
            while pos < len(text):
                m = cls._TOKEN.match(text, pos)
                if m is None:
                    raise ValueError(
                        f"decisions: unexpected {text[pos]!r} at position {pos} of {decisions!r}; "
                        "use F, C, L or S, each optionally followed by a repeat count")
                count = int(m.group(2)) if m.group(2) else 1
                if count < 1:
                    raise ValueError(f"decisions: repeat count must be >= 1 in {decisions!r}")
                plan += [Decision(m.group(1))] * count
                pos = m.end()
            return tuple(plan)
        plan = tuple(decisions)
        if not plan or not all(isinstance(d, Decision) for d in plan):
            raise ValueError("decisions must be a non-empty sequence of Decision or a schedule string")
        return plan

    def __repr__(self) -> str:
        return f"Schedule({''.join(d.value for d in self.plan)!r})"

    def _begin(self, run: RunInfo) -> None:
        if len(self.plan) != run.steps:
            raise ValueError(f"decisions: the schedule has {len(self.plan)} steps but the run has {run.steps}")
        self._estimator.begin(run)

    def _conditioning_changed(self, state: StepState) -> None:
        self._estimator.forget()

    def _decide(self, state: StepState) -> Decision:
        return self.plan[state.index]

    def _observe(self, record: StepRecord) -> None:
        self._estimator.observe(record)

    def estimate_uncond(self, state: StepState, cond: torch.Tensor) -> torch.Tensor:
        return self._estimator.estimate(state, cond)


class CFGTruncation(Schedule):
    """Full CFG for the first ``fraction`` of the steps, conditional-only after (the NGMS / "CFG cutoff" baseline).

    The number of guided steps is ``round(fraction * steps)``.
    """

    name = "cfg-truncation"

    def __init__(self, fraction: float) -> None:
        self.fraction = _check_real("fraction", fraction, 0.0, 1.0)
        Oracle.__init__(self)
        self.plan = ()
        self._estimator = UncondEstimator.delta()

    def __repr__(self) -> str:
        return f"CFGTruncation(fraction={self.fraction})"

    def _begin(self, run: RunInfo) -> None:
        guided = round(self.fraction * run.steps)
        self.plan = (Decision.FULL,) * guided + (Decision.COND,) * (run.steps - guided)
        super()._begin(run)


class Compose(Oracle):
    """Adaptive Guidance (or LinearAG) and AdaptiveDiffusion together.

    ``skipping`` decides which steps are CACHED; ``guidance`` decides FULL / COND / LINEAR for the computed ones.
    After the guidance oracle switches to conditional-only, a CACHED step reuses the conditional eps.
    """

    name = "compose"

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


from .linear_ag import LinearAG, UncondEstimator  # noqa: E402  (LinearAG builds on the classes above)

#: Names accepted by :func:`make_oracle` (and the CLI / A1111 mode strings).
ORACLE_NAMES = ("full", "ag", "linear-ag", "adaptive-diffusion", "compose", "cfg-truncation", "schedule", "forecast")


def make_oracle(name: str, **params: object) -> Oracle:
    """Build an oracle from its name (as used by the CLI and the A1111 extension)."""
    from .forecast import Forecast

    factories = {
        "forecast": Forecast,
        "full": FullCFG,
        "ag": AdaptiveGuidance,
        "linear-ag": LinearAG,
        "adaptive-diffusion": AdaptiveDiffusion,
        "compose": Compose,
        "cfg-truncation": CFGTruncation,
        "schedule": Schedule,
    }
    if name not in factories:
        raise ValueError(f"unknown oracle {name!r}; choose one of {', '.join(ORACLE_NAMES)}")
    return factories[name](**params)


def recommended() -> Oracle:
    """The oracle we recommend by default (also the A1111 default mode): :class:`~adaptive_sampler.forecast.Forecast`
    at half of full CFG's NFE, which beats running half the steps on every cell of the bench (README, method notes)."""
    from .forecast import Forecast

    return Forecast()
