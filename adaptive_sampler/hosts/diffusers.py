"""diffusers glue: adaptive sampling for a diffusers pipeline, on its denoiser's forward.

::

    from adaptive_sampler.hosts import diffusers as adaptive
    adaptive.enable(pipe)                  # Forecast at level "balanced"; adaptive.disable(pipe) undoes it
    image = pipe(prompt).images[0]         # adaptive.report(pipe): what the call spent, NFE per image

Mechanics. :func:`enable` registers a diffusers ``ModelHook`` on each denoiser of the pipeline (``unet``,
``transformer`` and Wan 2.2's ``transformer_2``); the hooks share one :class:`Adapter`. The hook is stateful only so
that diffusers' ``cache_context`` tells it which call of a two-call pipeline (Flux with ``true_cfg_scale``, Wan,
Qwen-Image) is the conditional one. A run starts at the first denoiser call after the scheduler got new timesteps,
and its first step runs unchanged: it shows how the pipeline runs CFG (:func:`classify_layout`: one batched call of
``[uncond, cond]`` rows, a ``"cond"`` and an ``"uncond"`` call, or one call without CFG) and, at
``scheduler.step``, the batch and the step's options (DDIM's ``eta``). For the length of a run the adapter observes
the scheduler's ``step`` (an instance attribute, removed when the run ends): the model output the scheduler gets is
the guided prediction whatever the pipeline's CFG rule is (guidance rescale, Qwen-Image's norm, Wan 2.2's second
guidance scale), so the host never needs the guidance scale. Per later step the oracle's decision becomes:

* FULL: the call(s) unchanged;
* COND: the conditional rows only (the batched call's cond half, or the ``"cond"`` call), returned for the
  unconditional rows too, so that the pipeline's CFG gives the conditional prediction;
* LINEAR: the conditional rows computed, the oracle's estimate returned as the unconditional rows;
* CACHED: no call; the oracle's forecast x0, turned into the model's output (eps, v or flow velocity) with the
  step's sigma (:class:`Parameterization`), returned for every row.

Schedulers that call the model once per step at the step's own sigma are adapted (:data:`SCHEDULERS`); any other
(Heun, KDPM2, DPM-Solver single-step, ...) runs unchanged with one warning. A switch of denoiser within a run (Wan
2.2's experts) counts as a conditioning change: that step is computed and no forecast crosses it. The per-step
bookkeeping (which call is which step, NFE per image, the oracle's records) is the run's own: the step's index
comes from the scheduler's steps, not from the calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from .. import oracles as O
from ..oracles import Decision, RunInfo, StepRecord, StepState

try:
    from diffusers.hooks import HookRegistry, ModelHook
    from diffusers.hooks.hooks import BaseState, CacheContext, StateManager  # CacheContext: diffusers >= 0.41
except ImportError as error:  # the host is optional: the rest of the package needs no diffusers
    raise ImportError("adaptive_sampler.hosts.diffusers needs diffusers >= 0.41 (and transformers for its "
                      "pipelines): pip install 'adaptive-sampler[diffusers]'") from error

__all__ = ["enable", "disable", "enabled", "report", "Adapter", "RunReport", "Parameterization", "SCHEDULERS",
           "DENOISERS", "view_scheduler", "classify_layout"]

log = logging.getLogger(__name__)

#: The name of our hook in a denoiser's diffusers hook registry.
HOOK_NAME = "adaptive_sampler"

#: The pipeline attributes that hold a denoiser (Wan 2.2 has two experts).
DENOISERS = ("unet", "transformer", "transformer_2")

#: Schedulers that call the model once per step, at the step's own sigma, and the k-diffusion sampler name the
#: oracle is told (Forecast plans DPM-Solver++ and stochastic runs differently).
SCHEDULERS: dict[str, str] = {
    "FlowMatchEulerDiscreteScheduler": "euler",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "LMSDiscreteScheduler": "lms",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "DDIMScheduler": "ddim",
    "UniPCMultistepScheduler": "uni_pc",
}

#: Schedulers whose latent is k-diffusion's ``x0 + sigma * noise``: the model sees it divided by
#: ``sqrt(sigma ** 2 + 1)`` (their ``scale_model_input``). The others step the model's own input.
SCALED_INPUT = frozenset({"EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler"})

#: The model output conventions (``prediction_type``) the conversions know, by their diffusers names.
PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v_prediction", "sample": "sample",
               "original_sample": "sample", "flow_prediction": "flow"}

BATCHED, SPLIT, SINGLE = "batched", "split", "single"
#: How each layout is named in reports.
LAYOUT_NAMES = {BATCHED: "CFG in one batched call", SPLIT: "CFG in a cond and an uncond call", SINGLE: "no CFG"}


# -- the math: a scheduler's model calls in the oracle's k-diffusion terms -----------------------------------------
@dataclass(frozen=True)
class Parameterization:
    """How a scheduler's model calls relate to the oracle's view of the run, so that a forecast x0 can be handed
    to the scheduler as the model output it expects.

    ``sigmas`` are the schedule's noise levels per position of ``scheduler.timesteps`` and the final one:
    k-diffusion's ``sqrt((1 - alpha_bar) / alpha_bar)`` for SD-style models, the flow sigma for flow-matching models
    (``flow``: ``x = (1 - sigma) * x0 + sigma * noise``). The model's input is ``alpha * x0 + sigma_t * noise``
    (:meth:`coefficients`), and the oracle's latent is k-diffusion's: that input divided by alpha (SD-style), or the
    input itself (flow, ComfyUI's ``CONST``). ``scaled_input``: the scheduler's latent is k-diffusion's and the model
    sees it scaled (Euler-type schedulers). ``prediction`` is the model's output convention: ``epsilon``,
    ``v_prediction``, ``sample`` (x0) or ``flow`` (velocity ``noise - x0``).
    """

    sigmas: tuple[float, ...]
    flow: bool
    prediction: str
    scaled_input: bool = False

    def coefficients(self, position: int) -> tuple[float, float]:
        """(alpha, sigma_t) of the model's input at this position: ``input = alpha * x0 + sigma_t * noise``."""
        s = self.sigmas[position]
        if self.flow:
            return 1.0 - s, s
        alpha = 1.0 / math.sqrt(1.0 + s * s)
        return alpha, s * alpha

    def model_input(self, position: int, sample: torch.Tensor) -> torch.Tensor:
        """What the model sees of the scheduler's latent ``sample``."""
        return sample * self.coefficients(position)[0] if self.scaled_input else sample

    def latent(self, position: int, model_input: torch.Tensor) -> torch.Tensor:
        """The oracle's latent (k-diffusion's, or the flow latent) for a model input, in float32."""
        return model_input.float() if self.flow else model_input.float() / self.coefficients(position)[0]

    def denoised(self, position: int, model_input: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The x0 prediction a model output stands for, in float32."""
        alpha, sigma = self.coefficients(position)
        m, out = model_input.float(), output.float()
        if self.prediction == "epsilon":
            return (m - sigma * out) / alpha
        if self.prediction == "v_prediction":
            return (alpha * m - sigma * out) / (alpha * alpha + sigma * sigma)
        if self.prediction == "flow":
            return m - sigma * out
        return out

    def output(self, position: int, model_input: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        """The model output that stands for the x0 prediction ``denoised`` (inverse of :meth:`denoised`), in
        float32."""
        alpha, sigma = self.coefficients(position)
        m, x0 = model_input.float(), denoised.float()
        if self.prediction == "epsilon":
            return (m - alpha * x0) / sigma
        if self.prediction == "v_prediction":
            return alpha * (m - alpha * x0) / sigma - sigma * x0
        if self.prediction == "flow":
            return (m - x0) / sigma
        return x0


@dataclass(frozen=True)
class SchedulerView:
    """What the oracle is told about a scheduler's run, and how its model calls convert."""

    sampler: str
    stochastic: bool
    param: Parameterization


def _ddim_sigmas(scheduler: Any) -> list[float]:
    """DDIM's noise levels: one per timestep, and the one its last step goes to (``final_alpha_cumprod`` below
    timestep 0)."""
    alphas = scheduler.alphas_cumprod.double()
    timesteps = [int(t) for t in scheduler.timesteps]
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    last = timesteps[-1] - stride
    bars = [float(alphas[t]) for t in timesteps]
    bars.append(float(alphas[last]) if last >= 0 else float(scheduler.final_alpha_cumprod))
    return [math.sqrt(max(1.0 - a, 0.0) / a) if a > 0 else math.inf for a in bars]


def view_scheduler(scheduler: Any, step_options: Mapping[str, Any]) -> tuple[SchedulerView | None, str | None]:
    """(the view of this scheduler's current schedule, None), or (None, why it is not adapted). ``step_options``
    are the keyword arguments the pipeline passes to ``scheduler.step`` (DDIM's ``eta``, ...)."""
    name = type(scheduler).__name__
    if name not in SCHEDULERS:
        return None, (f"{name} is not adapted (adapted: schedulers that call the model once per step at the step's "
                      f"own sigma, {', '.join(SCHEDULERS)})")
    config = scheduler.config
    flow = name == "FlowMatchEulerDiscreteScheduler" or bool(config.get("use_flow_sigmas", False))
    prediction = "flow" if name == "FlowMatchEulerDiscreteScheduler" else PREDICTIONS.get(
        config.get("prediction_type", "epsilon"))
    if prediction is None:
        return None, f"{name} with prediction_type {config.get('prediction_type')!r} is not adapted"
    if config.get("invert_sigmas", False):
        return None, f"{name} with invert_sigmas (Mochi) is not adapted"
    if step_options.get("per_token_timesteps") is not None:
        return None, "per-token timesteps are not adapted"
    if float(step_options.get("s_churn", 0.0) or 0.0) > 0:
        return None, f"{name} with s_churn > 0 calls the model at a raised sigma: not adapted"
    timesteps = getattr(scheduler, "timesteps", None)
    if name == "DDIMScheduler":
        sigmas = _ddim_sigmas(scheduler)
    else:
        sigmas = [float(s) for s in scheduler.sigmas]
    if timesteps is None or len(sigmas) != len(timesteps) + 1:
        return None, f"{name}'s sigmas do not match its timesteps (one per step and the final one)"
    if not all(math.isfinite(s) and s >= 0 for s in sigmas) or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        return None, f"{name}'s schedule is not finite and strictly decreasing (zero terminal SNR?): not adapted"
    if flow and sigmas[0] > 1.0:
        return None, f"{name}'s flow schedule starts above sigma 1: not adapted"
    stochastic = {"EulerAncestralDiscreteScheduler": True,
                  "DDIMScheduler": float(step_options.get("eta", 0.0) or 0.0) > 0,
                  "DPMSolverMultistepScheduler": str(config.get("algorithm_type", "")).startswith("sde"),
                  "FlowMatchEulerDiscreteScheduler": bool(config.get("stochastic_sampling", False))}.get(name, False)
    sampler = SCHEDULERS[name]
    if name == "FlowMatchEulerDiscreteScheduler" and stochastic:
        sampler = "euler_ancestral"
    if name == "DPMSolverMultistepScheduler" and stochastic:
        sampler = "dpmpp_2m_sde"
    return SchedulerView(sampler, stochastic, Parameterization(tuple(sigmas), flow, prediction,
                                                               name in SCALED_INPUT)), None


def classify_layout(calls: Sequence[tuple[str | None, int]], batch: int) -> tuple[str | None, str | None]:
    """(layout, None) or (None, why it is not adapted) from what one step's denoiser calls were: (cache context
    name, rows) per call, for a latent batch of ``batch``. diffusers puts the unconditional rows first in a batched
    CFG call (``[negative, positive]``) and names the calls of two-call pipelines ``"cond"`` and ``"uncond"``."""
    rows = [r for _, r in calls]
    contexts = [c for c, _ in calls]
    if rows == [2 * batch]:
        return BATCHED, None
    if rows == [batch] and contexts[0] in (None, "cond"):
        return SINGLE, None
    if rows == [batch, batch] and contexts == ["cond", "uncond"]:
        return SPLIT, None
    seen = ", ".join(f"{r} rows" + (f" ({c})" if c else "") for c, r in calls) or "no call"
    return None, (f"the pipeline called the denoiser with {seen} in one step for a batch of {batch}: not one batched "
                  "call of [uncond, cond] rows, a 'cond' and an 'uncond' call, or one call without CFG")


# -- what a run reports ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunReport:
    """What one pipeline call did. NFE is per image: network rows per sample (FULL 2 with CFG, 1 without; COND and
    LINEAR 1; CACHED 0)."""

    scheduler: str
    steps: int
    batch: int
    layout: str
    flow: bool
    stochastic: bool
    nfe: int
    nfe_full: int
    schedule: str
    notes: tuple[str, ...] = ()

    def line(self) -> str:
        ratio = f" ({self.nfe / self.nfe_full:.0%})" if self.nfe_full else ""
        kind = ("stochastic" if self.stochastic else "deterministic") + (", flow model" if self.flow else "")
        text = (f"Adaptive sampling {self.scheduler}: {self.steps} steps, batch {self.batch}, {kind}, "
                f"{LAYOUT_NAMES.get(self.layout, self.layout)}, NFE {self.nfe}/{self.nfe_full} per image{ratio}")
        text += f"; decisions {self.schedule}" if self.schedule else ""
        return text + "".join(f"; {note}" for note in self.notes)


# -- the hook on a denoiser's forward -------------------------------------------------------------------------------
def _latent_name(module: torch.nn.Module) -> str:
    """The name of the denoiser's first forward argument, its latent (``sample`` / ``hidden_states``)."""
    params = [p for p in inspect.signature(type(module).forward).parameters.values() if p.name != "self"]
    if not params or params[0].kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        raise TypeError(f"{type(module).__name__}.forward takes no latent as its first argument")
    return params[0].name


class _AdaptiveHook(ModelHook):
    """Sits on one denoiser's forward and hands every call to the pipeline's :class:`Adapter`. Stateful so that
    ``cache_context`` reaches it (the call's name); its state is the adapter's current run."""

    _is_stateful = True

    def __init__(self, adapter: "Adapter", latent_name: str) -> None:
        super().__init__()
        self.adapter = adapter
        self.latent_name = latent_name
        self.context = StateManager(BaseState)

    def context_name(self) -> str | None:
        try:
            context: CacheContext = self.context.context
        except ValueError:  # no cache_context around this call
            return None
        return context.name

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.adapter.call(module, self, args, kwargs)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        """Called by diffusers at the end of a pipeline call (``maybe_free_model_hooks``): the run is over."""
        self.adapter.end_of_call()
        return module


def _output_tensor(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def _output_like(template: Any, tensor: torch.Tensor) -> Any:
    """``tensor`` in the structure the denoiser returned (a tensor, a tuple, or a diffusers output dataclass)."""
    if isinstance(template, torch.Tensor):
        return tensor
    if isinstance(template, tuple):
        return (tensor, *template[1:])
    return dataclasses.replace(template, **{dataclasses.fields(template)[0].name: tensor})


def _rows(value: Any, rows: slice, batch: int) -> Any:
    """The rows ``rows`` of every tensor argument of a call of ``batch`` rows (nested in dicts, lists and tuples);
    what holds no row per sample is passed whole."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.ndim and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _rows(v, rows, batch) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_rows(v, rows, batch) for v in value)
    return value


@dataclass
class _Call:
    """One denoiser call of the probe step (the run's first, unchanged)."""

    module: torch.nn.Module
    context: str | None
    latent: torch.Tensor
    output: Any


@dataclass
class _Step:
    """The step in progress: its state and decision, the model input its outputs convert with, and what its calls
    produced (x0 predictions) for the record."""

    state: StepState
    decision: Decision
    module: torch.nn.Module
    model_input: torch.Tensor
    fallback_from: Decision | None = None
    cond: torch.Tensor | None = None
    uncond: torch.Tensor | None = None
    returned: torch.Tensor | None = None  # a two-call step: what the "uncond" call returns (COND, CACHED)


class _Run:
    """One pipeline call's denoising loop under the adapter's oracle: which call is which step, the decisions, NFE
    per image and the oracle's records. A run that is not adapted (``reason``) is only counted."""

    def __init__(self, adapter: "Adapter", scheduler: Any, reason: str | None) -> None:
        self.adapter = adapter
        self.scheduler = scheduler
        self.timesteps = getattr(scheduler, "timesteps", None)
        self.reason = reason
        self.calls: list[_Call] = []
        self.probing = True
        self.done = False
        self.index = 0  # scheduler steps taken
        self.start = 0  # the schedule position of the run's first step (img2img starts late)
        self.steps = 0 if self.timesteps is None else len(self.timesteps)
        self.batch = 0
        self.model_rows = 0
        self.view: SchedulerView | None = None
        self.layout: str | None = None
        self.oracle: O.Oracle | None = None
        self.stopped: str | None = None
        self.nfe = 0
        self.schedule: list[str] = []
        self.pending: _Step | None = None
        self.module: torch.nn.Module | None = None
        self.template: Any = None
        self._restore_step: Callable[[], None] | None = None

    @property
    def active(self) -> bool:
        return self.oracle is not None and self.stopped is None

    @property
    def rows_full(self) -> int:
        return 1 if self.layout == SINGLE else 2

    # -- the scheduler's step, observed for the length of the run ---------------------------------------------------
    def observe_scheduler(self) -> None:
        """Put an observer on the scheduler's ``step`` (an instance attribute, until :meth:`release_scheduler`):
        it sees the guided model output the scheduler gets, which ends a step, and then calls the real step."""
        scheduler = self.scheduler
        own = vars(scheduler).get("step")
        original = scheduler.step
        signature = inspect.signature(original)
        named = [p.name for p in signature.parameters.values()][:3]  # model_output, timestep, sample

        def step(*args: Any, **kwargs: Any) -> Any:
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:  # a wrong call: diffusers says what is wrong
                return original(*args, **kwargs)
            options: dict[str, Any] = {}
            for name, value in bound.arguments.items():
                kind = signature.parameters[name].kind
                if kind is inspect.Parameter.VAR_KEYWORD:
                    options.update(value)
                elif kind is not inspect.Parameter.VAR_POSITIONAL and name not in named:
                    options[name] = value
            output, timestep, sample = (bound.arguments.get(name) for name in named)
            self.stepped(output, timestep, sample, options)
            return original(*args, **kwargs)

        def restore() -> None:
            if vars(scheduler).get("step") is step:
                if own is None:
                    del scheduler.step
                else:
                    scheduler.step = own

        scheduler.step = step
        self._restore_step = restore

    def release_scheduler(self) -> None:
        if self._restore_step is not None:
            self._restore_step()
            self._restore_step = None

    # -- bookkeeping -------------------------------------------------------------------------------------------------
    def stop(self, reason: str) -> None:
        """Run the rest of the call unchanged (full CFG), never a wrong step."""
        self.stopped = f"adaptation stopped at step {self.index}: {reason}; the rest ran unchanged (full CFG)"
        log.warning("Adaptive sampling: %s", self.stopped)

    def count(self, decision: Decision) -> None:
        self.nfe += self.rows_full if decision is Decision.FULL else decision.nfe
        self.schedule.append(decision.value)

    def record(self, step: _Step, model_output: torch.Tensor) -> None:
        """Count the step and tell the oracle what it produced: the guided x0 is what the scheduler got."""
        denoised = self._x0(step, model_output)
        self.count(step.decision)
        if not torch.isfinite(denoised).all():
            self.stop(f"the guided prediction at step {step.state.index} is NaN/inf")
            return
        state = step.state
        self.oracle.record(StepRecord(index=state.index, decision=step.decision, sigma=state.sigma, x=state.x,
                                      denoised=denoised, eps=(state.x - denoised) / state.sigma, cond=step.cond,
                                      uncond=step.uncond), fallback_from=step.fallback_from)
        self.module = step.module

    # -- denoiser calls ----------------------------------------------------------------------------------------------
    def call(self, module: torch.nn.Module, hook: _AdaptiveHook, forward: Callable[..., Any], args: tuple,
             kwargs: dict) -> Any:
        latent = args[0] if args else kwargs[hook.latent_name]
        self.model_rows += latent.shape[0]
        if self.probing:
            out = forward(*args, **kwargs)
            self.calls.append(_Call(module, hook.context_name(), latent, out))
            return out
        if not self.active:
            return forward(*args, **kwargs)
        context = hook.context_name()
        if self.pending is None:
            return self._first_call(module, context, latent, forward, args, kwargs)
        if self.layout == SPLIT and context == "uncond" and module is self.pending.module:
            return self._uncond_call(forward, args, kwargs)
        self.stop(f"the pipeline made another denoiser call in step {self.pending.state.index} "
                  f"({LAYOUT_NAMES[self.layout]} expected)")
        return forward(*args, **kwargs)

    def _first_call(self, module: torch.nn.Module, context: str | None, latent: torch.Tensor,
                    forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        rows = latent.shape[0]
        expected_rows, contexts = {BATCHED: (2 * self.batch, (None, "cond", "uncond")),
                                   SINGLE: (self.batch, (None, "cond")), SPLIT: (self.batch, ("cond",))}[self.layout]
        if rows != expected_rows or context not in contexts:
            self.stop(f"the pipeline called the denoiser with {rows} rows" + (f" ({context})" if context else "")
                      + f", not as in its first step ({LAYOUT_NAMES[self.layout]})")
            return forward(*args, **kwargs)
        position = self.start + self.index
        sigma = self.view.param.sigmas[position]
        model_input = latent[self.batch:] if self.layout == BATCHED else latent
        x, changed = self.view.param.latent(position, model_input), module is not self.module
        state = StepState(index=self.index, total=self.steps, sigma=sigma, x=x, conditioning_changed=changed)
        step = self.pending = _Step(state, self.oracle.decide(state), module, model_input)
        if step.decision is Decision.CACHED:
            forecast = self._forecast(step)
            if forecast is not None:
                return _output_like(self.template, torch.cat([forecast, forecast]) if self.layout == BATCHED
                                    else forecast)
            step.decision, step.fallback_from = Decision.FULL, Decision.CACHED
        if self.layout == SINGLE or step.decision is Decision.FULL:
            out = forward(*args, **kwargs)
            tensor = _output_tensor(out)
            if self.layout == BATCHED:
                step.uncond = self._x0(step, tensor[:self.batch])
                tensor = tensor[self.batch:]
            step.cond = self._x0(step, tensor)
            return out
        if self.layout == SPLIT:  # COND or LINEAR: the "cond" call as asked; the "uncond" call is ours
            out = forward(*args, **kwargs)
            step.cond = self._x0(step, _output_tensor(out))
            if step.decision is Decision.COND:
                step.returned = _output_tensor(out)
            return out
        half = slice(self.batch, 2 * self.batch)  # batched CFG: evaluate the conditional half only
        out = forward(*_rows(list(args), half, rows), **_rows(kwargs, half, rows))
        cond = _output_tensor(out)
        step.cond = self._x0(step, cond)
        if step.decision is Decision.COND:
            return _output_like(out, torch.cat([cond, cond]))
        uncond = self._estimate(step)
        if uncond is None:
            first = slice(0, self.batch)
            uncond = _output_tensor(forward(*_rows(list(args), first, rows), **_rows(kwargs, first, rows)))
            step.uncond = self._x0(step, uncond)
        return _output_like(out, torch.cat([uncond, cond]))

    def _uncond_call(self, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        step = self.pending
        if step.decision is Decision.LINEAR:
            step.returned = self._estimate(step)
        if step.returned is None:  # FULL, or a LINEAR step whose estimate was not finite
            out = forward(*args, **kwargs)
            step.uncond = self._x0(step, _output_tensor(out))
            return out
        return _output_like(self.template, step.returned)

    # -- predictions -------------------------------------------------------------------------------------------------
    def _x0(self, step: _Step, output: torch.Tensor) -> torch.Tensor:
        return self.view.param.denoised(self.start + step.state.index, step.model_input, output)

    def _to_output(self, step: _Step, denoised: torch.Tensor) -> torch.Tensor:
        out = self.view.param.output(self.start + step.state.index, step.model_input, denoised)
        return out.to(_output_tensor(self.template).dtype)

    def _forecast(self, step: _Step) -> torch.Tensor | None:
        """The CACHED step's model output from the oracle's forecast x0 (None if it is not finite: the step is
        then computed)."""
        denoised = self.oracle.cached_denoised(step.state)
        if not torch.isfinite(denoised).all():
            return None
        step.returned = self._to_output(step, denoised)
        return step.returned

    def _estimate(self, step: _Step) -> torch.Tensor | None:
        """The LINEAR step's unconditional model output from the oracle's estimate (None if the estimate is not
        finite: the unconditional rows are then computed and the step is FULL, at no extra cost)."""
        uncond = self.oracle.estimate_uncond(step.state, step.cond) if torch.isfinite(step.cond).all() else None
        if uncond is None or not torch.isfinite(uncond).all():
            step.decision, step.fallback_from = Decision.FULL, Decision.LINEAR
            return None
        step.uncond = uncond
        return self._to_output(step, uncond)

    # -- scheduler steps ---------------------------------------------------------------------------------------------
    def stepped(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
                options: Mapping[str, Any]) -> None:
        """A ``scheduler.step`` call: the step's guided model output, the latent, and the step's options."""
        position = self._position(timestep)
        if self.probing:
            self._begin(position, model_output, sample, options)
        elif self.oracle is not None:
            step, self.pending = self.pending, None
            if self.active and position != self.start + self.index:
                self.stop(f"the scheduler stepped at timestep {float(torch.as_tensor(timestep).reshape(-1)[0]):.4g}, "
                          f"not at step {self.index}'s")
            if step is not None and self.active:
                self.record(step, model_output)
            else:
                self.count(Decision.FULL if step is None else step.decision)
        self.index += 1
        if self.index >= self.steps:
            self.finish()

    def _position(self, timestep: Any) -> int | None:
        """The position of ``timestep`` in the schedule, at or after the step expected next."""
        if self.timesteps is None:
            return None
        t = torch.as_tensor(timestep).reshape(-1)[0].to(self.timesteps.device, self.timesteps.dtype)
        expected = 0 if self.probing else self.start + self.index
        found = [p for p in (self.timesteps == t).nonzero().flatten().tolist() if p >= expected]
        return found[0] if found else None

    def _begin(self, position: int | None, model_output: torch.Tensor, sample: torch.Tensor,
               options: Mapping[str, Any]) -> None:
        """The end of the probe step: what the run is, the oracle's reset, and step 0 recorded."""
        self.probing = False
        self.batch = sample.shape[0]
        calls, self.calls = self.calls, []
        reason = self.reason
        if reason is None and position is None:
            reason = "the scheduler stepped at a timestep outside its schedule"
        if reason is None:
            self.start = position
            self.steps = len(self.timesteps) - position
            self.view, reason = view_scheduler(self.scheduler, options)
        if reason is None:
            self.layout, reason = classify_layout([(c.context, c.latent.shape[0]) for c in calls], self.batch)
        if reason is None and model_output.shape != sample.shape:
            reason = (f"the model's output {tuple(model_output.shape)} is not shaped like its latent "
                      f"{tuple(sample.shape)} (a learned variance?)")
        if reason is None and getattr(self.adapter.pipe, "denoising_end", None) is not None:
            reason = "denoising_end stops the loop before the schedule ends"
        if reason is None and not torch.isfinite(model_output).all():
            reason = "the model's prediction at the first step is NaN/inf"
        if reason is not None:
            self.reason = reason
            self.adapter.warn(reason)
            return
        if self.steps < self.adapter.min_steps:
            self.reason = f"a {self.steps}-step call, below min_steps ({self.adapter.min_steps})"
            log.info("Adaptive sampling: %s, runs unchanged", self.reason)
            return
        param = self.view.param
        self.oracle = self.adapter.oracle
        self.oracle.reset(RunInfo(sampler=self.view.sampler, sigmas=param.sigmas[self.start:], batch_size=self.batch,
                                  stochastic=self.view.stochastic, flow=param.flow, guided=self.layout != SINGLE))
        first = calls[0]
        self.module, self.template = first.module, first.output
        model_input = first.latent[self.batch:] if self.layout == BATCHED else first.latent
        state = StepState(index=0, total=self.steps, sigma=param.sigmas[self.start],
                          x=param.latent(self.start, model_input))
        decision = self.oracle.decide(state)
        if decision is not Decision.FULL:
            self.oracle.overrides.append((0, f"{decision.name} -> FULL: the first step runs unchanged (it shows how "
                                             "the pipeline runs CFG)"))
        step = _Step(state, Decision.FULL, first.module, model_input)
        tensor = _output_tensor(first.output)
        if self.layout == BATCHED:
            step.uncond, step.cond = self._x0(step, tensor[:self.batch]), self._x0(step, tensor[self.batch:])
        else:
            step.cond = self._x0(step, tensor)
            if self.layout == SPLIT:
                step.uncond = self._x0(step, _output_tensor(calls[1].output))
        self.record(step, model_output)

    # -- the end -------------------------------------------------------------------------------------------------------
    def finish(self) -> None:
        """The run is over (its last step, the end of the pipeline call, or the next run's start): report it."""
        if self.done:
            return
        self.done = True
        self.release_scheduler()
        notes = []
        if self.index < self.steps:
            notes.append(f"the pipeline call ended after {self.index} of {self.steps} steps")
        if self.reason:
            notes.append(f"ran unchanged: {self.reason}")
        if self.stopped:
            notes.append(self.stopped)
        if self.oracle is not None:
            notes.extend(f"step {i}: {why}" for i, why in self.oracle.overrides)
            nfe, nfe_full, schedule = self.nfe, self.rows_full * self.steps, "".join(self.schedule)
        else:
            nfe = nfe_full = self.model_rows // self.batch if self.batch else 0
            schedule = ""
        view = self.view
        report = RunReport(scheduler=type(self.scheduler).__name__, steps=self.steps, batch=self.batch,
                           layout=self.layout or "-", flow=bool(view and view.param.flow),
                           stochastic=bool(view and view.stochastic), nfe=nfe, nfe_full=nfe_full, schedule=schedule,
                           notes=tuple(notes))
        self.adapter.report = report
        log.info("%s", report.line())


# -- the adapter: one per enabled pipeline --------------------------------------------------------------------------
class Adapter:
    """Adaptive sampling on one pipeline: its oracle, its hooks, the current run and the last call's report.

    ``report`` is the :class:`RunReport` of the last pipeline call (None before the first)."""

    def __init__(self, pipe: Any, oracle: O.Oracle, min_steps: int) -> None:
        self.pipe = pipe
        self.oracle = oracle
        self.min_steps = min_steps
        self.report: RunReport | None = None
        self.run: _Run | None = None
        self._warned: set[str] = set()
        self._attached: list[tuple[torch.nn.Module, bool, bool]] = []

    def call(self, module: torch.nn.Module, hook: _AdaptiveHook, args: tuple, kwargs: dict) -> Any:
        forward = hook.fn_ref.original_forward
        run = self._run_for(self.pipe.scheduler)
        if run is None:
            return forward(*args, **kwargs)
        return run.call(module, hook, forward, args, kwargs)

    def _run_for(self, scheduler: Any) -> _Run | None:
        """The run this denoiser call belongs to: a new one once the scheduler has new timesteps (None after the
        last step of a run, before the next ``set_timesteps``)."""
        run = self.run
        if run is not None and run.scheduler is scheduler and run.timesteps is getattr(scheduler, "timesteps", None):
            return None if run.done else run
        if run is not None:
            run.finish()  # a run cut short (an exception, or a pipeline that does not end its calls' runs)
        reason = None if type(scheduler).__name__ in SCHEDULERS else view_scheduler(scheduler, {})[1]
        self.run = _Run(self, scheduler, reason)
        self.run.observe_scheduler()
        return self.run

    def end_of_call(self) -> None:
        if self.run is not None:
            self.run.finish()

    def warn(self, reason: str) -> None:
        """Say once per adapter and reason why a run is not adapted."""
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"Adaptive sampling: {reason}; the pipeline runs unchanged", UserWarning, stacklevel=2)

    # -- attaching ---------------------------------------------------------------------------------------------------
    def attach(self, denoisers: Sequence[torch.nn.Module]) -> None:
        """Hook every denoiser, or none (a failure detaches what was attached)."""
        try:
            for module in denoisers:
                hook = _AdaptiveHook(self, _latent_name(module))
                self._attached.append((module, hasattr(module, "_diffusers_hook"), "forward" in vars(module)))
                HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        """Remove the hooks and the scheduler observer, leaving the modules as they were."""
        if self.run is not None:
            self.run.release_scheduler()
            self.run = None
        for module, had_registry, had_forward in reversed(self._attached):
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None:
                continue
            registry.remove_hook(HOOK_NAME, recurse=False)
            if not registry.hooks:
                forward = vars(module).get("forward")
                if not had_forward and getattr(forward, "__func__", None) is type(module).forward:
                    del module.forward
                if not had_registry:
                    del module._diffusers_hook
        self._attached = []


# -- the public calls -----------------------------------------------------------------------------------------------
def _denoisers(pipe: Any) -> list[torch.nn.Module]:
    if not hasattr(pipe, "scheduler"):
        raise TypeError(f"pipe must be a diffusers pipeline with a scheduler, got {type(pipe).__name__}")
    found = [getattr(pipe, name, None) for name in DENOISERS]
    found = [m for m in found if isinstance(m, torch.nn.Module)]
    if not found:
        raise TypeError(f"{type(pipe).__name__} has no denoiser to adapt (a torch module in "
                        f"{' / '.join(DENOISERS)})")
    return found


def _adapter(pipe: Any) -> Adapter | None:
    for module in _denoisers(pipe):
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook(HOOK_NAME) if isinstance(registry, HookRegistry) else None
        if hook is not None:
            return hook.adapter
    return None


def _resolve_oracle(level: str | None, oracle: O.Oracle | str | None) -> O.Oracle:
    if level is not None and oracle is not None:
        raise ValueError("pass level or oracle, not both: level sets the default oracle's budget "
                         "(oracles.Forecast(level=...) for a Forecast of your own)")
    if oracle is None:
        level = O.DEFAULT_LEVEL if level is None else level
        if level not in O.LEVELS:
            raise ValueError(f"level must be one of {', '.join(O.LEVELS)}, got {level!r}")
        return O.recommended(level)
    if isinstance(oracle, str):
        return O.make_oracle(oracle)
    if not isinstance(oracle, O.Oracle):
        raise TypeError(f"oracle must be an adaptive_sampler.oracles.Oracle or one of the names "
                        f"{', '.join(O.ORACLE_NAMES)}, got {type(oracle).__name__}")
    return oracle


def enable(pipe: Any, level: str | None = None, *, oracle: O.Oracle | str | None = None,
           min_steps: int = O.SHORT_PASS_MIN_STEPS) -> Adapter:
    """Turn adaptive sampling on for ``pipe`` until :func:`disable`: every later call samples under the oracle.

    ``level``: the default oracle's one knob (``quality``, ``balanced``, ``fast``: Forecast); ``oracle``: another
    oracle, or its name (``adaptive_sampler.oracles.make_oracle``), instead. Calls of fewer than ``min_steps``
    steps run unchanged (below 12 steps fewer steps beat the forecast). Returns the pipeline's :class:`Adapter`,
    whose ``report`` describes the last call. Everything is checked before anything is attached."""
    denoisers = _denoisers(pipe)
    resolved = _resolve_oracle(level, oracle)
    if isinstance(min_steps, bool) or not isinstance(min_steps, int) or min_steps < 1:
        raise ValueError(f"min_steps must be an integer >= 1 (1 adapts every call), got {min_steps!r}")
    if _adapter(pipe) is not None:
        raise RuntimeError(f"adaptive sampling is already enabled on this {type(pipe).__name__}; "
                           "call disable(pipe) first")
    adapter = Adapter(pipe, resolved, min_steps)
    adapter.attach(denoisers)
    return adapter


def disable(pipe: Any) -> None:
    """Turn adaptive sampling off for ``pipe``: its denoisers and scheduler are left as they were before
    :func:`enable` (a pipeline that was never enabled is left alone)."""
    adapter = _adapter(pipe)
    if adapter is not None:
        adapter.detach()


@contextlib.contextmanager
def enabled(pipe: Any, level: str | None = None, *, oracle: O.Oracle | str | None = None,
            min_steps: int = O.SHORT_PASS_MIN_STEPS) -> Iterator[Adapter]:
    """:func:`enable` for the ``with`` block, then :func:`disable` (also when the block raises)."""
    adapter = enable(pipe, level, oracle=oracle, min_steps=min_steps)
    try:
        yield adapter
    finally:
        disable(pipe)


def report(pipe: Any) -> RunReport | None:
    """The report of the pipeline's last call under adaptive sampling (None if it is not enabled or has not run)."""
    adapter = _adapter(pipe)
    return None if adapter is None else adapter.report
