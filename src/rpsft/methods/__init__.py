"""Training-method registry: ``rpsft train --set method=NAME``.

A method says whether it uses the rotation anchor, how it adjusts TRL's ``SFTConfig``, how it wraps the model
(PEFT), and what it exports after training. Each method lives in its own small module and registers itself here
(adding one: docs/architecture.md, "Where to add").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Method:
    name: str
    summary: str
    anchor: str = "off"  # "off": refuses an anchor; "on": needs it; "full": ‖W − W0‖² on every matrix; "optional"
    sft_overrides: dict = field(default_factory=dict)  # SFTConfig fields this method sets (e.g. loss_type)
    prepare_model: Callable[[Any, Any], Any] | None = None  # (model, cfg) -> model, e.g. a PEFT wrap
    trainer_class: Callable[[], type] | None = None  # lazy: returns the trainer class to use
    wrap_anchor: Callable[[Any, Any, Any], Any] | None = None  # (dense anchor, prepared model, cfg) -> anchor
    finalize: Callable[[Any, Any, Any], dict] | None = None  # (trainer, cfg, out_dir) -> extra run info
    extra_memory: str = "none"  # what the method keeps beyond the model + optimizer (docs, bench)
    plain: str = "sft"  # the method this one becomes without its anchor (for the refusal message)
    anchor_hint: str = ""  # where to go instead when the anchor is refused
    anchor_form: str = "block"  # the anchor's regulariser: "block" (Eq. 3) | "complement" (RotationAnchor form=)
    check: Callable[[Any], None] | None = None  # (cfg) -> None: refuses, in one line, settings it cannot honour

    def anchor_enabled(self, requested: bool | None) -> bool:
        if self.anchor in ("on", "full"):
            if requested is False:
                raise ValueError(f"method {self.name!r} is defined by its anchor; anchor.enabled=false makes it "
                                 f"plain {self.plain} — use method={self.plain} instead")
            return True
        if self.anchor == "off":
            if requested:
                raise ValueError(f"method {self.name!r} cannot be combined with the rotation anchor "
                                 f"(anchor.enabled=true); drop the override or pick a method that allows it"
                                 + (f" ({self.anchor_hint})" if self.anchor_hint else ""))
            return False
        return bool(requested)


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    _load_builtin()
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def available() -> list[str]:
    _load_builtin()
    return sorted(REGISTRY)


def _load_builtin() -> None:
    from . import sft, rpsft, l2init, complement  # noqa: F401  (each module registers itself)
    for optional in ("dft", "iw", "lora", "rpsft_lora", "osf"):
        try:
            __import__(f"{__name__}.{optional}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{optional}":
                raise
