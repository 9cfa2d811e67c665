"""The widths each layer may choose (``ElasticSpace``) and one choice per layer (``Subnet``).

A space is written without reference to a model (fractions or counts); :meth:`ElasticSpace.resolve` turns it
into concrete, sorted choices for one layer. MLP widths are rounded to a granularity that suits the kernels:
64 neurons once a layer has at least 1024 (a Triton tile edge, so a prefix never ends in a mostly-masked tile),
8 for smaller layers (tiny test and demo models; 64 would leave them two or three choices), 1 below 64.
The full width is always a choice, even when it is not a multiple of the granularity (stories260K has 172).
Head counts are whole KV groups under grouped-query attention: the KV heads of a group stay with its query heads.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field


def mlp_granularity(intermediate_size: int) -> int:
    """The neuron granularity used for a layer of ``intermediate_size`` neurons (see the module docstring)."""
    if intermediate_size >= 1024:
        return 64
    if intermediate_size >= 64:
        return 8
    return 1


def _round_to(value: float, step: int, full: int) -> int:
    n = int(math.floor(value / step + 0.5)) * step
    return max(step, min(full, n)) if full >= step else full


def _check_value(name: str, i: int, v) -> None:
    """What can be checked without a model: a fraction in (0, 1] or a positive count."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"space.{name}[{i}] must be a fraction (float in (0, 1]) or a count (int >= 1), "
                        f"got {v!r} ({type(v).__name__})")
    if isinstance(v, float) and not (0.0 < v <= 1.0):  # also rejects nan
        raise ValueError(f"space.{name}[{i}] as a fraction must be in (0, 1], got {v}; write a neuron or head "
                         f"count as an int")
    if isinstance(v, int) and v < 1:
        raise ValueError(f"space.{name}[{i}] as a count must be >= 1, got {v}")


def _resolve_axis(name: str, values, full: int, step: int) -> list[int]:
    """Fractions (floats in (0, 1]) are rounded to ``step``; counts (ints) are taken as they are."""
    if values is None:
        out = set(range(step, full + 1, step))
    else:
        out = set()
        for i, v in enumerate(values):
            _check_value(name, i, v)
            if isinstance(v, float):
                out.add(full if v == 1.0 else _round_to(v * full, step, full))
            else:
                if not 1 <= v <= full:
                    raise ValueError(f"space.{name}[{i}] as a count must be in [1, {full}], got {v}")
                if v % step and v != full:
                    raise ValueError(f"space.{name}[{i}] = {v} must be a multiple of {step} (or the full {full})")
                out.add(v)
    out.add(full)
    return sorted(out)


def _typed(values: tuple | None) -> tuple | None:
    """``values`` as a cache key that tells a count from a fraction (``1 == 1.0`` as tuple elements)."""
    return None if values is None else tuple((type(v).__name__, v) for v in values)


@functools.lru_cache(maxsize=1024)
def _choices(name: str, typed: tuple | None, full: int, step: int) -> tuple[int, ...]:
    """:func:`_resolve_axis`, remembered: subnets are checked and built on every ``set_subnet`` and every request's
    budget, layer by layer, and the answer depends only on these arguments (``typed``: see :func:`_typed`)."""
    return tuple(_resolve_axis(name, None if typed is None else [v for _, v in typed], full, step))


@dataclass(frozen=True)
class ElasticSpace:
    """The widths every layer may choose.

    Args:
        mlp: MLP widths as fractions of each layer's neurons (floats in (0, 1], rounded to the granularity)
            or counts (ints, multiples of the granularity). ``None``: every multiple of the granularity.
        heads: query-head counts as fractions or counts; under GQA they are rounded to whole KV groups.
            ``None``: every whole number of KV groups.
        mlp_granularity: neurons per step; ``None`` picks :func:`mlp_granularity` per layer.

    The full width of each axis is always included.
    """

    mlp: tuple | None = None
    heads: tuple | None = None
    mlp_granularity: int | None = None

    def __post_init__(self) -> None:
        for name in ("mlp", "heads"):
            v = getattr(self, name)
            if v is not None:
                if isinstance(v, (int, float, str)) or not isinstance(v, Sequence):
                    raise TypeError(f"space.{name} must be a sequence of fractions or counts (e.g. [0.25, 0.5, 1.0]) "
                                    f"or None, got {v!r}")
                if not v:
                    raise ValueError(f"space.{name} must not be empty (None allows every width)")
                for i, x in enumerate(v):
                    _check_value(name, i, x)
                object.__setattr__(self, name, tuple(v))
        g = self.mlp_granularity
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            raise ValueError(f"space.mlp_granularity must be a positive int or None, got {g!r}")

    def mlp_step(self, intermediate_size: int) -> int:
        return self.mlp_granularity or mlp_granularity(intermediate_size)

    def mlp_choices(self, intermediate_size: int) -> list[int]:
        return list(_choices("mlp", _typed(self.mlp), intermediate_size, self.mlp_step(intermediate_size)))

    def head_choices(self, num_heads: int, group_size: int) -> list[int]:
        return list(_choices("heads", _typed(self.heads), num_heads, group_size))

    def to_dict(self) -> dict:
        return {"mlp": None if self.mlp is None else list(self.mlp),
                "heads": None if self.heads is None else list(self.heads),
                "mlp_granularity": self.mlp_granularity}

    @classmethod
    def from_dict(cls, d: dict) -> ElasticSpace:
        return cls(mlp=d.get("mlp"), heads=d.get("heads"), mlp_granularity=d.get("mlp_granularity"))


@dataclass(frozen=True, repr=False)
class Subnet:
    """One choice per layer: ``mlp[i]`` neurons and ``heads[i]`` query heads of layer ``i``, as counts.

    ``full_mlp``/``full_heads`` (optional, set by the model's methods) are each layer's full sizes; they only serve
    the repr, which then shows every count with its fraction, and never take part in equality.
    """

    mlp: tuple = field(default_factory=tuple)
    heads: tuple = field(default_factory=tuple)
    full_mlp: tuple | None = field(default=None, compare=False)
    full_heads: tuple | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in ("mlp", "heads"):
            v = getattr(self, name)
            if not isinstance(v, Sequence) or isinstance(v, str):
                raise TypeError(f"subnet.{name} must be a sequence of ints (one per layer), got {type(v).__name__}")
            for i, x in enumerate(v):
                if isinstance(x, bool) or not isinstance(x, int):
                    raise TypeError(f"subnet.{name}[{i}] must be an int, got {type(x).__name__}")
            object.__setattr__(self, name, tuple(int(x) for x in v))
        for name in ("full_mlp", "full_heads"):
            v = getattr(self, name)
            if v is not None:
                v = tuple(int(x) for x in v)
                if len(v) != len(getattr(self, name[5:])):
                    raise ValueError(f"subnet.{name} must have one entry per layer ({len(getattr(self, name[5:]))}), "
                                     f"got {len(v)}")
                object.__setattr__(self, name, v)

    def with_full(self, full_mlp, full_heads) -> Subnet:
        """The same choices, knowing each layer's full sizes (for the repr)."""
        return Subnet(self.mlp, self.heads, tuple(full_mlp), tuple(full_heads))

    def __repr__(self) -> str:
        def axis(counts: tuple, full: tuple | None) -> str:
            if full is None:
                cells = [str(c) for c in counts]
            else:
                cells = [f"{c}/{f} ({c / f:.0%})" for c, f in zip(counts, full)]
            if len(set(cells)) == 1 and len(cells) > 1:
                return f"[{cells[0]}] * {len(cells)}"
            if len(cells) > 8:
                cells = cells[:4] + ["..."] + cells[-2:]
            return "[" + ", ".join(cells) + "]"

        return f"Subnet(mlp={axis(self.mlp, self.full_mlp)}, heads={axis(self.heads, self.full_heads)})"

    @property
    def is_uniform(self) -> bool:
        return len(set(self.mlp)) <= 1 and len(set(self.heads)) <= 1

    def to_dict(self) -> dict:
        return {"mlp": list(self.mlp), "heads": list(self.heads)}

    @classmethod
    def from_dict(cls, d: dict) -> Subnet:
        return cls(mlp=d["mlp"], heads=d["heads"])


def nearest(choices: list[int], target: float) -> int:
    """The choice closest to ``target`` (ties go to the larger one, the safer side for quality)."""
    return min(choices, key=lambda c: (abs(c - target), -c))
