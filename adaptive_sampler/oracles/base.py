"""The step-oracle contract: per step, decide how the guided prediction is obtained.

This module holds the contract only (decisions, step records, the base class and its safety rules); the strategies
live one per module beside it and :mod:`adaptive_sampler.oracles` is their registry.

A sampling loop asks its oracle, before every step, for a :class:`Decision`:

* ``FULL``   - conditional + unconditional network rows, combined with CFG (2 NFE per sample);
* ``COND``   - conditional rows only, no guidance (1 NFE);
* ``LINEAR`` - conditional rows; the unconditional prediction is estimated from past predictions (1 NFE);
* ``CACHED`` - no network call: the oracle supplies the denoised prediction (:meth:`Oracle.cached_denoised`), and
  the sampler still updates the latent and draws its own noise (0 NFE).

The oracle then sees what the step produced (:meth:`Oracle.record`). State lives in the oracle object and is
cleared by :meth:`Oracle.reset` at the start of every run, so one object can serve many runs, one at a time: a run
whose oracle was reset by another run (another thread, or an interleaved run in the same thread) gets a
``RuntimeError`` naming the mistake at its next step, and the run that reset it is unaffected.

The base class enforces the rules every oracle must obey, whatever its policy says:

* a step whose conditioning changed (A1111 prompt editing) is evaluated in full: no cache or regression input is
  ever carried across a conditioning change;
* ``CACHED`` needs a finite computed step before it, ``LINEAR`` needs the previous step to have been a finite ``FULL`` step;
  otherwise the step runs ``FULL`` and :attr:`Oracle.overrides` records why.
"""


from __future__ import annotations

import copy
import dataclasses
import enum
import math
import threading
from dataclasses import dataclass

import torch

__all__ = ["Decision", "RunInfo", "StepState", "StepRecord", "RunSummary", "Oracle"]


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


@dataclass(frozen=True)
class RunInfo:
    """What an oracle knows about a run before its first step. ``sigmas`` may be empty when the host does not
    expose its schedule (then ``steps`` must be given). A run of 0 steps (a single sigma) is legal: k-diffusion's
    loops return their input unchanged, and so do ours. ``stochastic`` is true when the sampler adds fresh noise to
    the latent after its steps (Euler a, DPM++ SDE, DDIM with eta > 0, churn): a skipped step must then not reuse a
    noise prediction (eps) computed before that noise arrived. ``flow`` is true for a flow-matching model
    (``x = (1 - sigma) * x0 + sigma * noise``, sigma <= 1, ComfyUI's ``CONST``: SD3, Flux, Wan, ...), whose
    trajectories and schedules differ from the SD-style ones. ``guided`` is false when a step evaluates a single
    network row (CFG scale 1, guidance-distilled models such as Flux dev): a FULL step then costs one row, as a COND
    step does, and there is no guidance to adapt."""

    sampler: str
    sigmas: tuple[float, ...]
    batch_size: int
    steps: int = -1
    stochastic: bool = False
    flow: bool = False
    guided: bool = True

    @property
    def rows_full(self) -> int:
        """Network rows per sample of an unadapted (FULL) step: 2 with guidance, 1 without."""
        return 2 if self.guided else 1

    def rows(self, decision: "Decision") -> int:
        """Network rows per sample a step with this decision costs in this run."""
        return self.rows_full if decision is Decision.FULL else decision.nfe

    def __post_init__(self) -> None:
        if self.steps < 0:
            object.__setattr__(self, "steps", len(self.sigmas) - 1)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {self.steps!r}")


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
    guided noise prediction the sampler used, ``(x - denoised) / sigma``. A host that cannot tell the rows of a
    call apart (A1111 edit models) records a FULL step without ``cond``/``uncond``.
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
    """Per-run accounting, available after a run and replaced by the next one.

    A run that decided per batch counts per sample: ``nfe`` of ``nfe_full`` (2 per step, 1 on an unguided run), one
    ``schedule`` string.
    A run that decided per image (:meth:`Oracle.split_images`) adds up its ``images``: NFE and counts are totals over
    the images, ``schedule`` holds one string per image (space-separated) and ``ag_switch_step`` is the earliest
    switch. ``nfe_ratio`` means the same either way.
    """

    steps: int
    nfe: int
    nfe_full: int
    counts: dict[str, int]
    ag_switch_step: int | None
    overrides: tuple[tuple[int, str], ...]
    schedule: str
    images: int = 1

    @property
    def nfe_ratio(self) -> float:
        return self.nfe / self.nfe_full if self.nfe_full else float("nan")

    @property
    def nfe_per_image(self) -> float:
        """Network evaluations per image (the mean over the images of a run decided per image)."""
        return self.nfe / self.images

    def __str__(self) -> str:
        switch = "-" if self.ag_switch_step is None else str(self.ag_switch_step)
        per_image = f", decided per image over {self.images} images" if self.images > 1 else ""
        return (
            f"NFE {self.nfe}/{self.nfe_full} ({self.nfe_ratio:.0%}{per_image}), "
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
    (and optionally :meth:`_begin`, :meth:`_observe`, :meth:`estimate_uncond`).

    One run at a time: :meth:`reset` makes the calling thread the run's owner, and :meth:`decide` /
    :meth:`record` refuse any other thread, or a step out of order, under a lock, so the misused run fails with a
    clear error before it can touch the state of the run that reset the oracle."""

    name = "oracle"
    #: Whether the oracle's decisions depend on the predictions of the images in the batch (Adaptive Guidance's
    #: cosine, AdaptiveDiffusion's latent differences). The engine then runs one copy per image
    #: (:meth:`split_images`), so that an image's decisions, and the image, do not depend on its batch.
    decides_per_image = False
    #: Whether the oracle adapts guidance (needs the unconditional prediction): on an unguided run (CFG scale 1) it
    #: runs every step FULL, which costs one row there, and says so in its overrides.
    adapts_guidance = False

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._owner: int | None = None
        self.run: RunInfo | None = None
        self.decisions: list[Decision] = []
        self.overrides: list[tuple[int, str]] = []
        self.nfe = 0
        self._last: StepRecord | None = None
        self._last_computed: StepRecord | None = None
        self._consecutive_cached = 0
        self._images: list[Oracle] = []

    # -- the contract used by sampling loops and the A1111 adapter ------------------------------------------------
    def reset(self, run: RunInfo) -> None:
        """Forget everything about the previous run and prepare for ``run`` (run by the calling thread)."""
        with self._guard:
            self._owner = threading.get_ident()
            self.run = run
            self.decisions = []
            self.overrides = []
            self.nfe = 0
            self._last = None
            self._last_computed = None
            self._consecutive_cached = 0
            self._images = []
            self._begin(run)
            if self.adapts_guidance and not run.guided:
                self.overrides.append((0, "no guidance to adapt (CFG scale 1: one network row per step): every step "
                                          "runs as asked; Forecast and AdaptiveDiffusion skip whole steps there"))

    def split_images(self) -> None:
        """Decide per image from here on: one fresh copy of this (just reset) oracle per image of the run, each reset
        for a batch of one. The engine then calls :meth:`decide_images` / :meth:`record_images` instead of
        :meth:`decide` / :meth:`record`; :attr:`decisions` holds the batch's decision where its images agreed (None
        where they did not) and :meth:`summary` adds the images' summaries up."""
        if self.run is None:
            raise RuntimeError(f"{type(self).__name__}.reset() must be called before split_images()")
        self._images = []
        images = [copy.deepcopy(self) for _ in range(self.run.batch_size)]
        for image in images:
            image.reset(dataclasses.replace(self.run, batch_size=1))
        self._images = images

    @property
    def images(self) -> tuple["Oracle", ...]:
        """The per-image oracles of a run split by :meth:`split_images` (empty for a run decided per batch)."""
        return tuple(self._images)

    def decide_images(self, states: list[StepState]) -> list[Decision]:
        """Each image's decision for the step, from its own oracle and its own row (``states``, in batch order)."""
        with self._guard:
            self._check_turn("decide", states[0].index, len(self.decisions))
            images = list(self._images)
        return [image.decide(state) for image, state in zip(images, states)]

    def record_images(self, records: list[StepRecord], wasted_nfe: list[int],
                      fallback_from: list[Decision | None]) -> None:
        """Each image's step outcome, in batch order (see :meth:`record`)."""
        with self._guard:
            self._check_turn("record", records[0].index, len(self.decisions))
            first = records[0].decision
            self.decisions.append(first if all(r.decision is first for r in records) else None)
            images = list(self._images)
        for image, record, wasted, fallback in zip(images, records, wasted_nfe, fallback_from):
            image.record(record, wasted, fallback)

    def decide(self, state: StepState) -> Decision:
        """The decision for the step described by ``state``, after the safety rules."""
        with self._guard:
            self._check_turn("decide", state.index, len(self.decisions))
            return self._decide_safely(state)

    def _check_turn(self, action: str, index: int, expected: int) -> None:
        """Refuse a call from a run that does not own this oracle (the misuse that corrupts two runs at once)."""
        if self.run is None:
            raise RuntimeError(f"{type(self).__name__}.reset() must be called before {action}()")
        if self._owner != threading.get_ident():
            raise RuntimeError(
                f"{self!r} is used by two runs at once: another thread reset it for its own run while this thread's "
                f"run was at step {index}. An oracle holds one run's state; give each concurrent run (thread) its "
                "own oracle, e.g. a fresh one or copy.deepcopy(oracle)")
        if index != expected:
            raise RuntimeError(
                f"{self!r} was asked to {action} step {index} but its run is at step {expected}: it was reset by "
                "another run in between (or the steps came out of order). One oracle serves one run at a time; give "
                "each run its own oracle")

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_guard"]  # copies (copy.deepcopy, pickle) get a lock of their own
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._guard = threading.Lock()

    def _decide_safely(self, state: StepState) -> Decision:
        if state.conditioning_changed:
            self._last_computed = None
            self._last = None
            self._conditioning_changed(state)
        if self.adapts_guidance and not self.run.guided:
            return Decision.FULL
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
        with self._guard:
            self._check_turn("record", record.index, len(self.decisions))
            self._record(record, wasted_nfe, fallback_from)

    def _record(self, record: StepRecord, wasted_nfe: int, fallback_from: Decision | None) -> None:
        self.decisions.append(record.decision)
        self.nfe += self.run.rows(record.decision) + wasted_nfe
        if fallback_from is not None:
            self.overrides.append((record.index, f"{fallback_from.name} -> FULL: non-finite prediction"))
        if record.decision is Decision.CACHED:
            self._consecutive_cached += 1
        else:
            self._consecutive_cached = 0
            self._last_computed = record
        self._last = record
        self._observe(record)

    def cached_denoised(self, state: StepState) -> torch.Tensor:
        """The denoised (x0) prediction a CACHED step uses, in float32; the sampler forms its own eps from it and the
        current latent. By default the last computed step is reused (zero order): on deterministic samplers its eps
        (so the skipped step is a merged, longer step along the same direction), on stochastic ones its denoised
        image (reusing eps there would replay noise that the sampler has since replaced with fresh noise)."""
        last = self._last_computed
        if last is None:
            raise RuntimeError("no cached prediction: the oracle never allows CACHED before a computed step")
        if self.run is not None and self.run.stochastic:
            return last.denoised.float()
        return state.x.float() - state.sigma * last.eps.float()

    def estimate_uncond(self, state: StepState, cond: torch.Tensor) -> torch.Tensor:
        """The estimated unconditional x0 for a LINEAR step, given this step's conditional x0."""
        raise NotImplementedError(f"{type(self).__name__} never decides LINEAR")

    def summary(self) -> RunSummary:
        """NFE used, NFE of full CFG, steps per decision kind, AG switch step, overrides (see :class:`RunSummary`)."""
        if self._images:
            parts = [image.summary() for image in self._images]
            switches = [p.ag_switch_step for p in parts if p.ag_switch_step is not None]
            return RunSummary(
                steps=parts[0].steps,
                nfe=sum(p.nfe for p in parts),
                nfe_full=sum(p.nfe_full for p in parts),
                counts={d.name: sum(p.counts[d.name] for p in parts) for d in Decision},
                ag_switch_step=min(switches) if switches else None,
                overrides=tuple(self.overrides) + tuple((i, f"image {k}: {why}") for k, p in enumerate(parts)
                                                        for i, why in p.overrides),
                schedule=" ".join(p.schedule for p in parts),
                images=len(parts),
            )
        steps = len(self.decisions)
        return RunSummary(
            steps=steps,
            nfe=self.nfe,
            nfe_full=(self.run.rows_full if self.run is not None else 2) * steps,
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
            if self._last_computed is None:
                return "no cached prediction"
        elif decision is Decision.LINEAR:
            if state.conditioning_changed:
                return "conditioning changed"
            last = self._last
            if last is None or last.index != state.index - 1 or last.decision is not Decision.FULL \
                    or last.cond is None or last.uncond is None:
                return "LINEAR needs a FULL previous step"
        return None


