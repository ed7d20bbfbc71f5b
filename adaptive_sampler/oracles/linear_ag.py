"""LinearAG: estimate the unconditional prediction from past predictions on every other guided step.

On a LINEAR step k the conditional prediction c_k is computed and the unconditional one is estimated, in eps space,
as the affine combination ``u_k ~ a_k c_k + b_k c_{k-1} + g_k u_{k-1} + h_k`` of this step's conditional prediction
and the previous (FULL) step's two predictions. The per-step coefficients are fitted by ordinary least squares on
full-CFG calibration runs (:func:`fit_coefficients`). Without fitted coefficients the model-free *delta rule*
``u_k = u_{k-1} + c_k - c_{k-1}`` is used (coefficients 1, -1, 1, 0): it assumes the guidance direction changes
little between neighbouring steps.

Coefficients depend on the model, the sampler, the sigma schedule and the negative prompt (unconditional input)
used at calibration: a file is refused for another sampler, step count or schedule.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .adaptive_guidance import AdaptiveGuidance
from .base import Decision, RunInfo, StepRecord, StepState

FORMAT = "adaptive-sampler/linear-ag"
FORMAT_VERSION = 1
REGRESSORS = ("cond", "prev_cond", "prev_uncond", "intercept")
DELTA_RULE = (1.0, -1.0, 1.0, 0.0)


@dataclass(frozen=True)
class LinearAGCoefficients:
    """Per-step least-squares coefficients, with what they were fitted for.

    ``coefficients[k]`` holds ``(a, b, g, h)`` for step k (None for step 0, which has no previous step).
    """

    sampler: str
    steps: int
    sigmas: tuple[float, ...]
    model: str
    coefficients: tuple[tuple[float, float, float, float] | None, ...]
    r2: tuple[float | None, ...] = ()
    cond_scales: tuple[float, ...] = ()
    samples: int = 0

    def __post_init__(self) -> None:
        if len(self.coefficients) != self.steps:
            raise ValueError(f"coefficients: expected {self.steps} entries (one per step), got {len(self.coefficients)}")
        if len(self.sigmas) != self.steps + 1:
            raise ValueError(f"sigmas: expected {self.steps + 1} values, got {len(self.sigmas)}")
        for k, row in enumerate(self.coefficients):
            if row is None:
                continue
            if len(row) != len(REGRESSORS) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in row):
                raise ValueError(f"coefficients[{k}] must be {len(REGRESSORS)} finite numbers {REGRESSORS}, got {row!r}")

    # -- files ---------------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model": self.model,
            "sampler": self.sampler,
            "steps": self.steps,
            "sigmas": list(self.sigmas),
            "space": "eps",
            "regressors": list(REGRESSORS),
            "cond_scales": list(self.cond_scales),
            "samples": self.samples,
            "coefficients": [None if r is None else list(r) for r in self.coefficients],
            "r2": list(self.r2),
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "LinearAGCoefficients":
        """Read a coefficient file written by :meth:`save` (``calibrate-linear-ag``); errors name the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"coefficients: file not found: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"coefficients: {path} is not a LinearAG coefficient file ({exc})") from None
        try:
            return cls.from_json(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"coefficients: {path} is not a valid LinearAG coefficient file: {exc}") from None

    @classmethod
    def from_json(cls, data: dict) -> "LinearAGCoefficients":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"format must be {FORMAT!r}")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported version {data.get('version')!r} (expected {FORMAT_VERSION})")
        if data.get("space") != "eps" or list(data.get("regressors", ())) != list(REGRESSORS):
            raise ValueError(f"space must be 'eps' and regressors {list(REGRESSORS)}")
        rows = tuple(None if r is None else tuple(float(v) for v in r) for r in data["coefficients"])
        return cls(
            sampler=str(data["sampler"]),
            steps=int(data["steps"]),
            sigmas=tuple(float(s) for s in data["sigmas"]),
            model=str(data["model"]),
            coefficients=rows,
            r2=tuple(None if v is None else float(v) for v in data.get("r2", ())),
            cond_scales=tuple(float(s) for s in data.get("cond_scales", ())),
            samples=int(data.get("samples", 0)),
        )

    def check_run(self, run: RunInfo) -> None:
        """Refuse a run these coefficients were not fitted for."""
        if run.sampler != self.sampler:
            raise ValueError(f"coefficients were fitted for sampler {self.sampler!r}, not {run.sampler!r}; "
                             "run calibrate-linear-ag for this sampler")
        if run.steps != self.steps:
            raise ValueError(f"coefficients were fitted for {self.steps} steps, not {run.steps}; "
                             "run calibrate-linear-ag for this step count")
        if run.sigmas and not np.allclose(run.sigmas, self.sigmas, rtol=1e-4, atol=1e-6):
            raise ValueError("coefficients were fitted for another sigma schedule; "
                             "run calibrate-linear-ag with this schedule")


class UncondEstimator:
    """Holds the previous FULL step's predictions and evaluates the per-step affine estimate of the uncond eps."""

    def __init__(self, coefficients: LinearAGCoefficients | None) -> None:
        self.coefficients = coefficients
        self._prev: tuple[int, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def delta(cls) -> "UncondEstimator":
        return cls(None)

    def begin(self, run: RunInfo) -> None:
        if self.coefficients is not None:
            self.coefficients.check_run(run)
        self._prev = None

    def forget(self) -> None:
        self._prev = None

    def observe(self, record: StepRecord) -> None:
        if record.decision is Decision.FULL and record.cond is not None and record.uncond is not None:
            x, s = record.x.float(), record.sigma
            self._prev = (record.index, (x - record.cond.float()) / s, (x - record.uncond.float()) / s)
        else:
            self._prev = None

    def row(self, index: int) -> tuple[float, float, float, float]:
        if self.coefficients is None:
            return DELTA_RULE
        row = self.coefficients.coefficients[index]
        return DELTA_RULE if row is None else row

    def estimate(self, state: StepState, cond: torch.Tensor) -> torch.Tensor:
        if self._prev is None or self._prev[0] != state.index - 1:
            raise RuntimeError("LINEAR step without the previous FULL step's predictions")
        _, prev_cond, prev_uncond = self._prev
        a, b, g, h = self.row(state.index)
        x = state.x.float()
        cond_eps = (x - cond.float()) / state.sigma
        uncond_eps = a * cond_eps + b * prev_cond + g * prev_uncond + h
        return (x - state.sigma * uncond_eps).to(cond.dtype)


class LinearAG(AdaptiveGuidance):
    """LinearAG (Castillo et al. 2023): in the guided phase, every other step is LINEAR (1 NFE), then AG's
    conditional-only phase follows once gamma_t >= ``threshold`` on a FULL step.

    ``coefficients`` is a :class:`LinearAGCoefficients`, a path to a file written by ``calibrate-linear-ag``, or
    None for the model-free delta rule. Fitted coefficients assume the unconditional input (negative prompt) used
    at calibration.
    """

    name = "linear-ag"

    def __init__(self, coefficients: LinearAGCoefficients | str | Path | None = None,
                 threshold: float | None = None, space: str = "x0") -> None:
        super().__init__(threshold=threshold, space=space)
        if isinstance(coefficients, (str, Path)):
            coefficients = LinearAGCoefficients.load(coefficients)
        elif coefficients is not None and not isinstance(coefficients, LinearAGCoefficients):
            raise TypeError("coefficients must be a LinearAGCoefficients, a path to a coefficient file, or None "
                            f"for the delta rule; got {type(coefficients).__name__}")
        self.coefficients = coefficients
        self._estimator = UncondEstimator(coefficients)

    def __repr__(self) -> str:
        source = "delta rule" if self.coefficients is None else \
            f"fitted {self.coefficients.sampler}/{self.coefficients.steps}"
        return f"LinearAG({source}, threshold={self.threshold}, space={self.space!r})"

    def _begin(self, run: RunInfo) -> None:
        super()._begin(run)
        self._estimator.begin(run)

    def _conditioning_changed(self, state: StepState) -> None:
        super()._conditioning_changed(state)
        self._estimator.forget()

    def _decide(self, state: StepState) -> Decision:
        if self.switched:
            return Decision.COND
        last = self._last
        if last is not None and last.index == state.index - 1 and last.decision is Decision.FULL:
            return Decision.LINEAR
        return Decision.FULL

    def _observe(self, record: StepRecord) -> None:
        super()._observe(record)
        self._estimator.observe(record)

    def estimate_uncond(self, state: StepState, cond: torch.Tensor) -> torch.Tensor:
        return self._estimator.estimate(state, cond)


def fit_coefficients(trajectories: Iterable[Sequence[tuple[torch.Tensor, torch.Tensor]]], *, sampler: str,
                     sigmas: Sequence[float], model: str, cond_scales: Sequence[float] = ()) -> LinearAGCoefficients:
    """Ordinary least squares, per step, of ``u_k`` on ``(c_k, c_{k-1}, u_{k-1}, 1)`` in eps space.

    ``trajectories`` yields, per calibration batch, the list over steps of ``(cond_eps, uncond_eps)`` recorded from
    full-CFG runs. All elements of all samples of a step are stacked into one regression.
    """
    steps = len(sigmas) - 1
    gram = [np.zeros((4, 4)) for _ in range(steps)]
    rhs = [np.zeros(4) for _ in range(steps)]
    yy = np.zeros(steps)
    ysum = np.zeros(steps)
    count = np.zeros(steps)
    samples = 0
    for traj in trajectories:
        if len(traj) != steps:
            raise ValueError(f"a calibration trajectory has {len(traj)} steps, expected {steps}")
        samples += traj[0][0].shape[0]
        for k in range(1, steps):
            c, u = traj[k]
            cp, up = traj[k - 1]
            cols = [t.double().flatten().numpy() for t in (c, cp, up)]
            design = np.stack(cols + [np.ones_like(cols[0])], axis=1)
            y = u.double().flatten().numpy()
            gram[k] += design.T @ design
            rhs[k] += design.T @ y
            yy[k] += y @ y
            ysum[k] += y.sum()
            count[k] += y.size
    if samples == 0:
        raise ValueError("fit_coefficients needs at least one calibration trajectory")
    rows: list[tuple[float, float, float, float] | None] = [None]
    r2: list[float | None] = [None]
    for k in range(1, steps):
        beta = np.linalg.lstsq(gram[k], rhs[k], rcond=None)[0]
        sse = yy[k] - 2 * beta @ rhs[k] + beta @ gram[k] @ beta
        sst = yy[k] - ysum[k] ** 2 / count[k]
        rows.append(tuple(float(v) for v in beta))
        r2.append(float(1 - sse / sst) if sst > 0 else None)
    return LinearAGCoefficients(sampler=sampler, steps=steps, sigmas=tuple(float(s) for s in sigmas), model=model,
                                coefficients=tuple(rows), r2=tuple(r2),
                                cond_scales=tuple(float(s) for s in cond_scales), samples=samples)
