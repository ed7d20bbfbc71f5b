"""What the A1111-family hosts share (AUTOMATIC1111 and Forge, whose UI, scripts API and infotext are A1111's):
the user's settings and their validation, the infotext fields, per-image NFE reporting, prompt-schedule boundaries.

Not a host module: it imports no host, and nothing from A1111 or Forge (tested with stand-ins and real k-diffusion).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping, Protocol

from .. import oracles as O
from ..oracles import Forecast

#: Mode ids (API / settings / infotext) and their labels in the UI.
MODES = {
    "forecast": "Forecast (recommended)",
    "ag": "AG",
    "linear-ag": "LinearAG",
    "adaptive-diffusion": "AdaptiveDiffusion",
    "ag+adaptive-diffusion": "AG + AdaptiveDiffusion",
    "off": "Off",
}

#: Adaptive samplers: (name, k-diffusion function name or "ddim", the built-in sampler they extend).
ADAPTIVE_SAMPLERS = (
    ("Euler Adaptive", "sample_euler", "Euler"),
    ("Euler a Adaptive", "sample_euler_ancestral", "Euler a"),
    ("DPM++ 2M Adaptive", "sample_dpmpp_2m", "DPM++ 2M"),
    ("DPM++ 2M SDE Adaptive", "sample_dpmpp_2m_sde", "DPM++ 2M SDE"),
    ("DDIM Adaptive", "ddim", "DDIM"),
)

INFOTEXT = {
    "mode": "Adaptive mode",
    "ag_threshold": "Adaptive AG threshold",
    "ag_space": "Adaptive AG space",
    "ad_threshold": "Adaptive skip threshold",
    "max_skips": "Adaptive max skips",
    "warmup": "Adaptive warmup",
    "budget": "Adaptive budget",
    "min_steps": "Adaptive min steps",
    "level": "Adaptive level",
}
NFE_FIELD = "Adaptive NFE"
#: Why a pass was not adapted as configured (too short for the mode, or below ``min_steps``); not a setting.
NOTES_FIELD = "Adaptive notes"

#: Which settings each mode uses (the others are not written to the infotext).
MODE_FIELDS = {
    "forecast": ("level", "budget", "min_steps"),
    "ag": ("ag_threshold", "ag_space", "min_steps"),
    "linear-ag": ("ag_threshold", "ag_space", "min_steps"),
    "adaptive-diffusion": ("ad_threshold", "max_skips", "warmup", "min_steps"),
    "ag+adaptive-diffusion": ("ag_threshold", "ag_space", "ad_threshold", "max_skips", "warmup", "min_steps"),
    "off": (),
}

#: Passes shorter than this run full CFG by default (``min_steps``). On img2img-like passes of the embedded model
#: the default mode (Forecast) beats full CFG on fewer steps at the same NFE in 26 of the 30 measured passes of 12
#: steps or more, in 2 of 6 of 10-11 steps and in 4 of 24 below 10 (README, "Short passes").
DEFAULT_MIN_STEPS = O.SHORT_PASS_MIN_STEPS


@dataclass(frozen=True)
class AdaptiveSettings:
    """What the user chose, validated at construction (errors name the parameter and its accepted range).

    ``min_steps``: a pass with fewer steps (a short hires-fix, img2img, refiner or inpaint pass) runs full CFG and
    its infotext says so; 1 adapts every pass. Modes still run passes too short for what they skip (they compute
    those steps and note it), so no pass length ever fails a generation.
    """

    mode: str = "forecast"
    ag_threshold: float = O.DEFAULT_AG_THRESHOLDS["x0"]
    ag_space: str = "x0"
    ad_threshold: float = 0.01
    max_skips: int = 4
    warmup: int = 4
    #: Forecast's NFE budget; 0 = set by ``level``.
    budget: float = 0.0
    min_steps: int = DEFAULT_MIN_STEPS
    #: The one knob of the default mode: "quality", "balanced" or "fast" (``oracles.LEVELS``).
    level: str = O.DEFAULT_LEVEL

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("ag_threshold", "ad_threshold", "budget"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))
        for name in ("max_skips", "warmup", "min_steps"):
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer():
                object.__setattr__(self, name, int(value))
        if isinstance(self.min_steps, bool) or not isinstance(self.min_steps, int) or self.min_steps < 1:
            raise ValueError("min_steps must be an integer >= 1 (passes with fewer steps run full CFG; 1 adapts "
                             f"every pass), got {self.min_steps!r}")
        self.build_oracle()  # every parameter is checked by the oracle that uses it
        if self.mode not in ("ag", "linear-ag", "ag+adaptive-diffusion"):
            O.AdaptiveGuidance(self.ag_threshold, self.ag_space)
        if self.mode not in ("adaptive-diffusion", "ag+adaptive-diffusion"):
            O.AdaptiveDiffusion(self.ad_threshold, self.max_skips, self.warmup)
        if self.mode != "forecast":
            Forecast(budget=self.budget or None, level=self.level)

    def build_oracle(self, steps: int | None = None) -> O.Oracle | None:
        """A fresh oracle for one pass of ``steps`` steps (None for mode "off"): full CFG below ``min_steps``."""
        if self.short_pass_note(steps) is not None:
            return O.FullCFG()
        return O.mode_oracle(self.mode, level=self.level, budget=self.budget or None, ag_threshold=self.ag_threshold,
                             ag_space=self.ag_space, ad_threshold=self.ad_threshold, max_skips=self.max_skips,
                             warmup=self.warmup)

    def short_pass_note(self, steps: int | None) -> str | None:
        """Why a pass of ``steps`` steps is not adapted (None when it is, or when the length is unknown)."""
        if self.mode == "off" or steps is None or steps >= self.min_steps:
            return None
        return f"{steps}-step pass below min steps ({self.min_steps}): full CFG"

    def infotext(self) -> dict[str, Any]:
        """The infotext fields of these settings: the mode and the parameters it uses, with ``Adaptive budget`` only
        when a budget was set (0 means the level decides, and ``Adaptive NFE`` says what was spent)."""
        out = {INFOTEXT["mode"]: self.mode}
        out.update({INFOTEXT[name]: getattr(self, name) for name in MODE_FIELDS[self.mode]
                    if not (name == "budget" and self.budget == 0.0)})
        return out

    @classmethod
    def from_infotext(cls, params: Mapping[str, Any], base: "AdaptiveSettings | None" = None) -> "AdaptiveSettings | None":
        """Settings recorded in an image's infotext (None when it has none), missing fields taken from ``base``."""
        if INFOTEXT["mode"] not in params:
            return None
        values = asdict(base or cls())
        for name in INFOTEXT:
            value = infotext_value(params, name)
            if value is not None:
                values[name] = _cast(name, value)
        return cls(**values)

    def with_overrides(self, overrides: Mapping[str, Any]) -> "AdaptiveSettings":
        """These settings with some replaced (X/Y/Z plot cells give their values as strings or numbers)."""
        return replace(self, **{k: _cast(k, v) for k, v in overrides.items()})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "AdaptiveSettings":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown adaptive setting(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: _cast(k, v) for k, v in values.items()})


def infotext_value(params: Mapping[str, Any], name: str) -> Any:
    """The value of setting ``name`` that an infotext's fields (``params``) record, or None when they record none.
    A Forecast infotext without ``Adaptive budget`` records budget 0: the level decided (older images wrote
    ``Adaptive budget: 0.0``, which reads the same). Pasting an image into the UI and :meth:`AdaptiveSettings.
    from_infotext` both read settings through this, so a budget left in the UI never outlives a paste."""
    key = INFOTEXT[name]
    if key in params:
        return params[key]
    if name == "budget" and params.get(INFOTEXT["mode"]) == "forecast":
        return 0.0
    return None


def _cast(name: str, value: Any) -> Any:
    kind = {f.name: f.type for f in fields(AdaptiveSettings)}[name]
    if kind == "str":
        return str(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if kind == "int":
        if not number.is_integer():
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return int(number)
    return number


class PassNFE(Protocol):
    """One sampling pass as :func:`report` sees it (A1111's step controller, the Forge host's pass)."""

    notes: list[str]

    def nfe(self) -> list[tuple[int, int]]:
        """(NFE used, NFE of full CFG) of each image of the batch so far in this pass (empty: not adapted)."""


class PerImageNFE:
    """An ``Adaptive NFE`` value that differs between the images of a batch (oracles that decide per image): A1111
    and Forge call a callable infotext value with the image's ``index`` (its position in the batch, or in the whole
    job: both give the same image here)."""

    def __init__(self, values: list[str]) -> None:
        self.values = values

    def __call__(self, index: int = 0, **_: Any) -> str:
        return self.values[index % len(self.values)]

    def __repr__(self) -> str:
        return f"PerImageNFE({self.values!r})"


def report(p: Any, controller: PassNFE) -> None:
    """Write ``Adaptive NFE`` (used/full of each image, summed over the passes of a generation: hires fix has two)
    and ``Adaptive notes`` (passes not adapted as configured, e.g. too short) into ``p.extra_generation_params``.
    The NFE is one string when every image of the batch spent the same, else a :class:`PerImageNFE`.

    Passes are keyed by their controller object (an ``id()`` could be reused by a later pass once the first pass's
    sampler is freed) and start afresh with each batch-count iteration (``p.iteration``), which reuses ``p``."""
    iteration = getattr(p, "iteration", None)
    if "adaptive_passes" not in p.__dict__ or p.__dict__.get("adaptive_iteration") != iteration:
        p.adaptive_passes, p.adaptive_iteration = {}, iteration
    passes = p.adaptive_passes
    passes[controller] = controller.nfe()
    images = max((len(pairs) for pairs in passes.values()), default=0)
    totals = [(sum(pairs[k][0] for pairs in passes.values() if k < len(pairs)),
               sum(pairs[k][1] for pairs in passes.values() if k < len(pairs))) for k in range(images)]
    values = [f"{used}/{full}" for used, full in totals if full]
    if values:
        p.extra_generation_params[NFE_FIELD] = values[0] if len(set(values)) == 1 else PerImageNFE(values)
    notes = [note for ctl in passes for note in ctl.notes]
    if notes:
        p.extra_generation_params[NOTES_FIELD] = "; ".join(notes)
    else:
        p.extra_generation_params.pop(NOTES_FIELD, None)


def conditioning_boundaries(cond: Any, uncond: Any) -> frozenset[int]:
    """Steps at which A1111's prompt schedules ([a:b:0.5], [a|b]) switch to new conditioning."""
    steps = set()
    for per_image in getattr(cond, "batch", []) or []:
        for composable in per_image:
            for entry in composable.schedules[:-1]:
                steps.add(entry.end_at_step + 1)
    for per_image in uncond or []:
        for entry in per_image[:-1]:
            steps.add(entry.end_at_step + 1)
    return frozenset(steps)


def is_forge(modules: Any) -> bool:
    """Whether the WebUI is Forge (Forge Neo or lllyasviel's), whose sampling backend is ComfyUI-derived: it rewrote
    A1111's CFGDenoiser.forward, so the A1111 mechanics would not run there and the Forge host's do."""
    try:
        import modules_forge  # noqa: F401
        return True
    except ImportError:
        return hasattr(getattr(modules, "sd_model", None), "forge_objects")


