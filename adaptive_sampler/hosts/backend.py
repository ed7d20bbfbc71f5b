"""What the ComfyUI-style backends share: ComfyUI itself and Forge, whose sampling backend was derived from it.

Both call a k-diffusion sampler function that evaluates the model through a CFG step (conditional and unconditional
rows, a CFG function, pre/post-CFG hooks), once per step for the samplers adapted here. The hosts differ in how they
hook that step (ComfyUI: model wrappers around ``predict_noise``; Forge: a conditioning modifier and per-step model
options), not in what a run is: :class:`OracleRun` checks that each model call is the next step of the run, asks the
oracle, counts network rows per image and records what each step produced. The hosts' glue only evaluates a
decision.

Oracles that decide per image (AG, AdaptiveDiffusion) get one copy per image (:meth:`OracleRun.split_images`), as
in the library's loops; a step whose images decided differently is evaluated by decision groups (:func:`groups`),
each group's rows with their own rows of the conditioning (:func:`conditioning_rows`), as those images alone would
be. Not a host module: it imports no host and no host's code.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch

from ..oracles import Decision, Oracle, RunInfo, StepRecord, StepState

log = logging.getLogger(__name__)

#: Modes that need the unconditional prediction (the others only skip whole steps).
GUIDANCE_MODES = ("ag", "linear-ag", "ag+adaptive-diffusion")

#: The one-call samplers (ComfyUI's and Forge Neo's copies) that step in half-log-SNR: on a flow model a schedule
#: starting at sigma 1 or above (log-SNR -inf) makes them call the model first at their own
#: ``offset_first_sigma_for_snr(sigmas, model_sampling)``, which is then the run's first sigma.
HALF_LOG_SNR_SAMPLERS = frozenset({"sample_dpmpp_2m_sde", "sample_dpmpp_2m_sde_gpu", "sample_dpmpp_2m_sde_heun",
                                   "sample_dpmpp_2m_sde_heun_gpu", "sample_dpmpp_3m_sde", "sample_dpmpp_3m_sde_gpu",
                                   "sample_er_sde"})

#: k-diffusion sampler functions (the copies ComfyUI and Forge ship) that call the model exactly once per step, at
#: ``sigmas[i]``, and how they add noise: None (deterministic), "eta" (ancestral / SDE: noise when eta > 0 and
#: s_noise > 0), "s_noise" (noise when s_noise > 0), "always", "churn" (euler: s_churn > 0 moves the call to
#: sigma_hat, which is not supported).
ONE_CALL_SAMPLERS: dict[str, str | None] = {
    "sample_euler": "churn",
    "sample_euler_ancestral": "eta",
    "sample_lms": None,
    "sample_dpmpp_2m": None,
    "sample_dpmpp_2m_sde": "eta",
    "sample_dpmpp_2m_sde_gpu": "eta",
    "sample_dpmpp_2m_sde_heun": "eta",
    "sample_dpmpp_2m_sde_heun_gpu": "eta",
    "sample_dpmpp_3m_sde": "eta",
    "sample_dpmpp_3m_sde_gpu": "eta",
    "sample_ddpm": "always",
    "sample_lcm": "s_noise",
    "sample_ipndm": None,
    "sample_ipndm_v": None,
    "sample_deis": None,
    "sample_res_multistep": None,
    "sample_res_multistep_ancestral": "eta",
    "sample_er_sde": "s_noise",
    "sample_gradient_estimation": None,
}


def classify_function(name: str, eta: float = 1.0, s_noise: float = 1.0, s_churn: float = 0.0,
                      table: dict[str, str | None] = ONE_CALL_SAMPLERS) -> tuple[bool, str | None]:
    """(stochastic, why it cannot be adapted or None) for a sampler function of ``table`` run with these options."""
    if name not in table:
        return False, "does not evaluate the model exactly once per step"
    kind = table[name]
    if kind == "churn" and s_churn > 0:
        return True, "with s_churn > 0 evaluates the model at a raised sigma"
    stochastic = {None: False, "churn": False, "always": True, "s_noise": s_noise > 0,
                  "eta": eta > 0 and s_noise > 0}[kind]
    return stochastic, None


class OracleRun:
    """One sampling run under one oracle (None: the run is not adapted, its calls are only counted).

    ``sigmas`` are the run's sigmas (steps + 1 values): each model call must be at the next one, and a call that is
    not stops the adaptation for the rest of the run (full CFG, noted), never a wrong step count. Without sigmas
    (Forge's timestep DDIM) ``steps`` gives the length and calls are taken in order. ``rows_full`` is what an
    unadapted step costs per image: 2 with an unconditional pass, 1 without (CFG 1, distilled-CFG models); the
    oracle is told the run is unguided then (``RunInfo.guided``). ``flow`` says the model is a flow-matching model
    (``RunInfo.flow``: the oracle plans such runs differently). NFE and decisions are kept per image (``nfe``,
    ``schedules``): after :meth:`split_images` the images of a batch spend differently.
    """

    def __init__(self, oracle: Oracle | None, sampler: str, sigmas: Sequence[float] | torch.Tensor | None,
                 batch: int, stochastic: bool, rows_full: int = 2, steps: int | None = None,
                 flow: bool = False) -> None:
        if rows_full not in (1, 2) or isinstance(rows_full, bool):
            raise ValueError(f"rows_full must be 2 (conditional and unconditional rows) or 1 (one row: CFG 1), "
                             f"got {rows_full!r}")
        if not isinstance(flow, bool):
            raise TypeError(f"flow must be True or False, got {flow!r}")
        if isinstance(sigmas, torch.Tensor):
            sigmas = sigmas.reshape(-1).tolist()
        self.sigmas = None if sigmas is None else [float(s) for s in sigmas]
        if self.sigmas is None and steps is None:
            raise ValueError("OracleRun needs the run's sigmas or its number of steps")
        self.steps = len(self.sigmas) - 1 if self.sigmas is not None else int(steps)
        self.oracle = oracle if self.steps >= 1 else None
        self.sampler = sampler
        self.batch = batch
        self.stochastic = stochastic
        self.rows_full = rows_full
        self.flow = flow
        self.stopped: str | None = None
        self.next_index = 0
        self.per_image = False
        #: Network rows each image of the batch cost so far, and its decision per step (letters).
        self.nfe = [0] * batch
        self.schedules: list[list[str]] = [[] for _ in range(batch)]
        if self.oracle is not None:
            self.oracle.reset(RunInfo(sampler=sampler, sigmas=tuple(self.sigmas or ()), batch_size=batch,
                                      steps=self.steps, stochastic=stochastic, flow=flow,
                                      guided=rows_full == 2))

    @property
    def active(self) -> bool:
        return self.oracle is not None and self.stopped is None

    @property
    def nfe_full(self) -> int:
        """Full CFG's network rows per image for this run."""
        return self.steps * self.rows_full

    def stop(self, reason: str) -> None:
        self.stopped = f"adaptation stopped at step {self.next_index}: {reason}; the rest ran unchanged (full CFG)"
        log.warning("Adaptive sampling: %s", self.stopped)

    def next_step(self, sigma: float) -> int | None:
        """The index of the step a model call at ``sigma`` computes, or None when the call is to run unchanged (the
        run is not adapted, or no longer: a call that is not the next step stops the adaptation)."""
        if not self.active:
            return None
        i = self.next_index
        if i >= self.steps:
            self.stop(f"the sampler called the model again after its {self.steps} steps (sigma {sigma:.4g})")
        elif self.sigmas is not None and not (
                math.isclose(sigma, self.sigmas[i], rel_tol=1e-4, abs_tol=1e-7)
                or (i == 0 and self.sigmas[1] < sigma < self.sigmas[0])):  # flow models offset the first sigma
            self.stop(f"the sampler called the model at sigma {sigma:.4g}, but step {i} is at {self.sigmas[i]:.4g}")
        if not self.active:
            return None
        self.next_index += 1
        return i

    def split_images(self, blocked: str | None = None) -> str | None:
        """Decide per image when the oracle does (AG, AdaptiveDiffusion) and the batch has several images: one copy of
        the oracle per image, so that an image's decisions, and the image, do not depend on its batch. ``blocked``
        says why the host cannot evaluate the images apart; the run then decides per batch, and the note saying so
        is returned."""
        if not (self.active and self.oracle.decides_per_image and self.batch > 1):
            return None
        if blocked is not None:
            return f"decided per batch: {blocked}"
        self.oracle.split_images()
        self.per_image = True
        return None

    def unchanged(self) -> None:
        """Count a model call that ran unchanged (full CFG)."""
        self.count([Decision.FULL] * self.batch, schedule=self.oracle is not None)

    def decide(self, index: int, sigma: float, x: torch.Tensor, conditioning_changed: bool = False
               ) -> tuple[list[tuple[Oracle, StepState]], list[Decision]]:
        """The step's owners - (oracle, state) pairs covering the batch's rows in order: one per image when the run
        decides per image, one for the batch otherwise - and each image's decision."""
        if self.per_image:
            states = [StepState(index=index, total=self.steps, sigma=sigma, x=x[r:r + 1],
                                conditioning_changed=conditioning_changed) for r in range(x.shape[0])]
            return list(zip(self.oracle.images, states)), self.oracle.decide_images(states)
        state = StepState(index=index, total=self.steps, sigma=sigma, x=x, conditioning_changed=conditioning_changed)
        return [(self.oracle, state)], [self.oracle.decide(state)] * x.shape[0]

    def rows(self, decision: Decision) -> int:
        """Network rows per image a step with this decision cost."""
        return self.rows_full if decision is Decision.FULL else decision.nfe

    def count(self, decisions: Sequence[Decision], wasted: Sequence[int] | None = None, schedule: bool = True) -> None:
        """Count a step's rows per image (``wasted``: rows each image evaluated and discarded); a step that is not
        recorded (the run stops after it) is only counted."""
        for k, decision in enumerate(decisions):
            self.nfe[k] += self.rows(decision) + (wasted[k] if wasted else 0)
            if schedule:
                self.schedules[k].append(decision.value)

    def record(self, owners: list[tuple[Oracle, StepState]], decisions: list[Decision], denoised: torch.Tensor,
               conds: list[torch.Tensor | None], unconds: list[torch.Tensor | None], wasted: list[int] | None = None,
               fallback_from: list[Decision | None] | None = None) -> None:
        """Count and record what the step produced: ``denoised`` is the guided x0 batch the sampler got, ``conds`` /
        ``unconds`` each image's conditional / unconditional x0 (None where not evaluated), ``wasted`` and
        ``fallback_from`` each image's discarded rows and the decision they were evaluated for."""
        batch = denoised.shape[0]
        wasted = [0] * batch if wasted is None else wasted
        fallback_from = [None] * batch if fallback_from is None else fallback_from
        self.count(decisions, wasted)
        index, sigma = owners[0][1].index, owners[0][1].sigma
        if self.per_image:
            x = torch.cat([state.x for _, state in owners])
            self.oracle.record_images(
                [StepRecord(index=index, decision=decisions[r], sigma=sigma, x=x[r:r + 1], denoised=denoised[r:r + 1],
                            eps=(x[r:r + 1] - denoised[r:r + 1]) / sigma, cond=conds[r], uncond=unconds[r])
                 for r in range(batch)], wasted, fallback_from)
            return
        x = owners[0][1].x
        both = [None if any(v is None for v in t) else torch.cat(t) for t in (conds, unconds)]
        self.oracle.record(StepRecord(index=index, decision=decisions[0], sigma=sigma, x=x, denoised=denoised,
                                      eps=(x - denoised) / sigma, cond=both[0], uncond=both[1]),
                           wasted_nfe=wasted[0], fallback_from=fallback_from[0])

    def notes(self) -> list[str]:
        """What did not go as configured: a stop, and the oracle's overrides (step: reason; ``image k: reason`` for an
        image's own when the run decides per image)."""
        notes = [self.stopped] if self.stopped else []
        if self.oracle is not None:
            notes.extend(f"step {i}: {why}" for i, why in self.oracle.summary().overrides)
        return notes


def groups(decisions: Sequence[Decision]) -> list[tuple[Decision, list[int]]]:
    """The decisions of a step's images and the rows (images) that took each, in order of first appearance."""
    return [(d, [r for r, e in enumerate(decisions) if e is d]) for d in dict.fromkeys(decisions)]


def cached(owners: list[tuple[Oracle, StepState]]) -> torch.Tensor:
    """The CACHED prediction (float32) of the rows the owners cover (one oracle for the batch, or one per image)."""
    return torch.cat([oracle.cached_denoised(state) for oracle, state in owners])


def estimate(owners: list[tuple[Oracle, StepState]], cond: torch.Tensor) -> torch.Tensor:
    """The LINEAR estimate of the unconditional prediction of the rows the owners cover, from their ``cond`` rows."""
    out, start = [], 0
    for oracle, state in owners:
        rows = state.x.shape[0]
        out.append(oracle.estimate_uncond(state, cond[start:start + rows]))
        start += rows
    return torch.cat(out)


#: Why a batch with a ControlNet decides as one: its hint is computed for the whole batch, so its rows cannot be
#: evaluated apart.
CONTROLNET = "a ControlNet is active (its hint is computed for the whole batch)"


def per_image_blocker(*conds: list[dict] | None) -> str | None:
    """Why the images of a batch conditioned by ``conds`` (lists of cond entries, ComfyUI's and Forge's form) cannot
    be evaluated apart, or None when they can."""
    return CONTROLNET if any("control" in c for entries in conds for c in entries or []) else None


def conditioning_rows(entries: list[dict] | None, at: torch.Tensor, batch: int) -> list[dict] | None:
    """The rows ``at`` of compiled conditioning (ComfyUI's and Forge's: a list of entries whose tensors and ``COND*``
    objects hold one row per image, or one row for every image); what holds no row per image (constants, weights,
    conditioning shared by the batch, which the host repeats to any batch size) is kept."""
    if entries is None:
        return None

    def rows(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value[at] if value.ndim and value.shape[0] == batch else value
        inner = getattr(value, "cond", None)
        if isinstance(inner, torch.Tensor) and inner.ndim and inner.shape[0] == batch and hasattr(value, "_copy_with"):
            return value._copy_with(inner[at])
        return value

    out = []
    for entry in entries:
        entry = {k: rows(v) for k, v in entry.items()}
        if isinstance(entry.get("model_conds"), dict):
            entry["model_conds"] = {k: rows(v) for k, v in entry["model_conds"].items()}
        out.append(entry)
    return out
