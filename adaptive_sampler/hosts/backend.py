"""What the ComfyUI-style backends share: ComfyUI itself and Forge, whose sampling backend was derived from it.

Both call a k-diffusion sampler function that evaluates the model through a CFG step (conditional and unconditional
rows, a CFG function, pre/post-CFG hooks), once per step for the samplers adapted here. The hosts differ in how they
hook that step (ComfyUI: model wrappers around ``predict_noise``; Forge: a conditioning modifier and per-step model
options), not in what a run is: :class:`OracleRun` checks that each model call is the next step of the run, asks the
oracle, counts network rows per image and records what each step produced. The hosts' glue only evaluates a
decision. Not a host module: it imports no host and no host's code.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

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
    (``RunInfo.flow``: the oracle plans such runs differently).
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
        self.nfe = 0
        self.schedule: list[str] = []
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

    def unchanged(self) -> None:
        """Count a model call that ran unchanged (full CFG)."""
        self.nfe += self.rows_full
        if self.oracle is not None:
            self.schedule.append(Decision.FULL.value)

    def begin(self, index: int, sigma: float, x: torch.Tensor, conditioning_changed: bool = False
              ) -> tuple[StepState, Decision]:
        state = StepState(index=index, total=self.steps, sigma=sigma, x=x, conditioning_changed=conditioning_changed)
        return state, self.oracle.decide(state)

    def rows(self, decision: Decision) -> int:
        """Network rows per image a step with this decision cost."""
        return self.rows_full if decision is Decision.FULL else decision.nfe

    def count(self, decision: Decision, wasted: int = 0) -> None:
        """Count a step that is not recorded (the run stops after it)."""
        self.nfe += wasted + self.rows(decision)
        self.schedule.append(decision.value)

    def finish(self, state: StepState, decision: Decision, denoised: torch.Tensor, cond: torch.Tensor | None,
               uncond: torch.Tensor | None, wasted: int = 0, fallback_from: Decision | None = None) -> None:
        """Count and record what the step produced (``denoised``: the guided x0 the sampler got)."""
        self.count(decision, wasted)
        eps = (state.x - denoised) / state.sigma
        self.oracle.record(StepRecord(index=state.index, decision=decision, sigma=state.sigma, x=state.x,
                                      denoised=denoised, eps=eps, cond=cond, uncond=uncond),
                           wasted_nfe=wasted, fallback_from=fallback_from)

    def notes(self) -> list[str]:
        """What did not go as configured: a stop, and the oracle's overrides (step: reason)."""
        notes = [self.stopped] if self.stopped else []
        if self.oracle is not None:
            notes.extend(f"step {i}: {why}" for i, why in self.oracle.overrides)
        return notes
