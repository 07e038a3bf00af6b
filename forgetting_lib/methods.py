"""The finetuning methods by name: one table used by the quickstart, the explorer, the figures and
the parameter files.

A method is a named set of config overrides: a regulariser (`reg.method`, see
`engine/regularisers.py`) with its replay source (`reg.synth`), or LoRA. Wherever a config is
loaded, the pseudo-key `method: <name>` (also `method=<name>` on the command line and in sweep
grids) expands to the method's overrides in place, so later keys refine it:

    python -m forgetting_lib train params/quick/finetune.yaml method=kl_self reg.coeff=10

In a sweep spec, `grid: {method: [standard, kl_self, {ewc: {reg.coeff: 1000.0}}]}` is an axis
over methods (labels = names; a mapping adds overrides to that method).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

REAL, SELF = "real", "self-generated"  # replay sources (reg.synth false / true)


@dataclass(frozen=True)
class Method:
    name: str  # run-folder, sweep-label and table name, e.g. kl_self
    label: str  # human-readable, for plots and tables
    family: str  # the explorer's method choice: none, KL, NTP, replace, LoRA, EWC, L2-SP
    source: str | None  # REAL / SELF for methods that read replay rows, else None
    overrides: Mapping[str, Any] = field(default_factory=dict)  # dotted config keys

    @property
    def reg_method(self) -> str:
        """The regulariser it selects (`reg.method`)."""
        return self.overrides.get("reg.method", "none")


def _replayed(name: str, label: str, family: str, reg_method: str, **extra: Any) -> tuple[Method, Method]:
    """The real-rows and self-generated-rows variants of one replay method."""
    return (
        Method(
            f"{name}_real",
            f"{label}, real rows",
            family,
            REAL,
            {"reg.method": reg_method, "reg.synth": False, **extra},
        ),
        Method(
            f"{name}_self",
            f"{label}, self-generated rows",
            family,
            SELF,
            {"reg.method": reg_method, "reg.synth": True, **extra},
        ),
    )


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("standard", "standard finetuning", "none", None, {"reg.method": "none"}),
        Method("lora_r16", "LoRA, rank 16", "LoRA", None, {"reg.method": "none", "lora.rank": 16}),
        *_replayed("ntp", "NTP replay", "NTP", "ntp_pre"),
        *_replayed("kl", "KL replay", "KL", "kl_pre"),
        *_replayed("replace", "replay at a fixed ratio", "replace", "replace"),
        Method("ewc", "EWC, Fisher on real rows", "EWC", REAL, {"reg.method": "ewc", "reg.synth": False}),
        Method(
            "ewc_self",
            "EWC, Fisher on self-generated rows",
            "EWC",
            SELF,
            {"reg.method": "ewc", "reg.synth": True},
        ),
        Method("l2sp", "L2-SP", "L2-SP", None, {"reg.method": "l2sp"}),
    )
}


def get(name: str) -> Method:
    """The method called `name`; a KeyError lists the valid names."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise KeyError(f"method {name!r} is not a method name; valid: {', '.join(METHODS)}") from None


def families() -> list[str]:
    """The method families in table order (the explorer's dropdown)."""
    return list(dict.fromkeys(m.family for m in METHODS.values()))


def sources(family: str) -> list[str]:
    """The replay sources a family offers ([] when it reads no replay rows)."""
    return [m.source for m in METHODS.values() if m.family == family and m.source is not None]


def find(family: str, source: str | None = None) -> Method:
    """The method of `family` replaying from `source` (ignored by families without a source)."""
    matches = [m for m in METHODS.values() if m.family == family]
    if not matches:
        raise KeyError(f"method family {family!r} does not exist; valid: {', '.join(families())}")
    return next((m for m in matches if m.source == source), matches[0])


def expand(pairs: Iterable[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Dotted overrides with every `("method", name)` pair replaced by that method's overrides."""
    out: list[tuple[str, Any]] = []
    for key, value in pairs:
        out.extend(get(value).overrides.items() if key == "method" else [(key, value)])
    return out


def named(entries: Iterable[str | Mapping[str, Any]] | Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Name -> overrides for a list of method names, each optionally refined: `["standard",
    {"ewc": {"reg.coeff": 1000.0}}]`, or a mapping `{name: overrides}`, where an unknown name needs its
    own overrides (a custom method) and a known one starts from the table's."""
    items = (
        entries.items()
        if isinstance(entries, Mapping)
        else (next(iter(e.items())) if isinstance(e, Mapping) and len(e) == 1 else (e, None) for e in entries)
    )
    out = {}
    for name, extra in items:
        if not isinstance(name, str) or not (name in METHODS or extra):
            raise KeyError(
                f"method {name!r}: not a method name (valid: {', '.join(METHODS)}), and "
                f"no overrides of its own were given"
            )
        base = {"method": name} if name in METHODS else {}
        out[name] = {**base, **dict(extra or {})}
    return out
