"""The value ``compactify`` returns: what was replaced, by what, at what cost in accuracy."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["LayerReport", "CompactifyReport", "module_type"]


def module_type(name: str) -> str:
    """The name inside its block: ``"self_attn.q_proj"`` for ``"model.layers.3.self_attn.q_proj"``
    (what follows the first numeric component); the whole name outside any block."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[i + 1 :])
    return name


@dataclass
class LayerReport:
    """One replaced module."""

    name: str
    in_features: int
    out_features: int
    method: str
    chi: int
    bond_dims: list[int]
    params_before: int
    params_after: int
    rel_error: float  # ||W - W_hat||_F / ||W||_F of the weight (bias is copied exactly)
    seconds: float
    #: Relative output error on the calibration activations, ||(W - W_hat) L|| / ||W L||
    #: (C = L L^T), before and after data-aware fitting; None without calibration.
    act_error_start: float | None = None
    act_error: float | None = None

    @property
    def ratio(self) -> float:
        return self.params_after / max(self.params_before, 1)


@dataclass
class CompactifyReport:
    """Rows per replaced module plus totals; ``print(report)`` shows a table."""

    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0
    seconds: float = 0.0
    #: The ``ratio`` budget the chi were chosen under (``None`` when chi was given).
    ratio: float | None = None
    #: Parameters of targeted modules the budget left dense (counted as kept in full).
    dense_target_params: int = 0
    #: How the budget estimated damage: ``"fisher"`` (Gauss-Newton loss increase),
    #: ``"output"`` (relative output error on the calibration data) or ``"weight"`` (relative
    #: weight error); ``None`` when chi was given.
    estimate: str | None = None
    #: Where the library did something weaker than asked, and why (also warned).
    notes: list[str] = field(default_factory=list)

    @property
    def target_params_before(self) -> int:
        return sum(r.params_before for r in self.layers) + self.dense_target_params

    @property
    def target_params_after(self) -> int:
        return sum(r.params_after for r in self.layers) + self.dense_target_params

    @property
    def kept_fraction(self) -> float:
        """Parameters of the targeted modules kept, after / before."""
        return self.target_params_after / max(self.target_params_before, 1)

    @property
    def model_kept_fraction(self) -> float:
        return self.model_params_after / max(self.model_params_before, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [asdict(r) for r in self.layers],
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
            "totals": {
                "modules": len(self.layers),
                "target_params_before": self.target_params_before,
                "target_params_after": self.target_params_after,
                "target_kept_fraction": self.kept_fraction,
                "model_params_before": self.model_params_before,
                "model_params_after": self.model_params_after,
                "model_kept_fraction": self.model_kept_fraction,
                "seconds": self.seconds,
                "ratio": self.ratio,
                "dense_target_params": self.dense_target_params,
                "estimate": self.estimate,
            },
            "choices": self.choices(),
            "notes": list(self.notes),
        }

    def choices(self) -> dict[str, dict[str, int]]:
        """How many modules of each type got each method: ``{"self_attn.q_proj": {"low-rank":
        29, "dense": 1}, ...}``; ``"dense"`` counts targets the budget left dense. The type is
        the name inside its block (what follows the block index, e.g. ``model.layers.3.``)."""
        counts: dict[str, dict[str, int]] = {}
        entries = [(r.name, r.method) for r in self.layers] + [
            (n, "dense") for n, why in self.skipped if why.startswith("left dense")]
        for name, method in entries:
            kind = module_type(name)
            counts.setdefault(kind, {})
            counts[kind][method] = counts[kind].get(method, 0) + 1
        return {k: dict(sorted(v.items())) for k, v in sorted(counts.items())}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **{"indent": 2, **kwargs})

    def summary(self) -> str:
        budget = f" under ratio={self.ratio}" if self.ratio is not None else ""
        return (
            f"{len(self.layers)} modules replaced{budget} in {self.seconds:.1f}s: targeted parameters "
            f"{self.target_params_before:,} -> {self.target_params_after:,} "
            f"({self.kept_fraction:.1%} kept); model {self.model_params_before:,} -> "
            f"{self.model_params_after:,} ({self.model_kept_fraction:.1%})"
        )

    def __str__(self) -> str:
        calibrated = any(r.act_error is not None for r in self.layers)
        header = ("module", "shape", "method", "bond dims", "params", "kept", "rel err") + (
            ("act err (svd -> fit)",) if calibrated else ()
        )
        rows = [
            (
                r.name, f"{r.in_features}->{r.out_features}", r.method,
                "x".join(map(str, r.bond_dims)) or "-",
                f"{r.params_before:,}->{r.params_after:,}", f"{r.ratio:.1%}", f"{r.rel_error:.3g}",
            ) + ((f"{r.act_error_start:.3g} -> {r.act_error:.3g}",) if calibrated else ())
            for r in self.layers
        ]
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row) for row in rows]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)}: " + "; ".join(
                f"{n} ({why})" for n, why in self.skipped[:8]
            ) + (" ..." if len(self.skipped) > 8 else ""))
        lines.append(self.summary())
        if self.ratio is not None:
            lines.append("chosen per module type: " + "; ".join(
                f"{kind} " + ", ".join(f"{n} {m}" for m, n in methods.items())
                for kind, methods in self.choices().items()))
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)
