"""Latency lookup tables: per-layer MLP and attention latency at every width, measured on the current device.

A :class:`LatencyTable` holds, for one device, dtype, batch size, sequence length and phase (``prefill``: a
whole sequence at once; ``decode``: one new token per sequence against a KV cache of ``seq_len`` tokens):

- ``mlp[l][j]``: milliseconds of layer ``l``'s MLP block at its ``j``-th width choice (``fm.mlp_choices(l)``);
- ``attn[l][j]``: milliseconds of layer ``l``'s attention block at its ``j``-th head count (``fm.head_choices(l)``);
- ``fixed_ms``: the whole model with every MLP and attention block replaced by a no-op (embeddings, norms,
  residual adds, LM head, the HF plumbing), measured, not fitted.

``predict(subnet) = fixed_ms + sum_l mlp[l][w_l] + attn[l][h_l]``. Each entry is the median of ``repeats`` timed
runs after ``warmup`` runs, timed with CUDA events on a GPU and ``time.perf_counter`` on a CPU. Tables are JSON
with the device, dtype, shapes, library versions and a signature of the model and its space, so a table from
another model or device is refused (:func:`check_table`).

Profile where latency depends on width: on a GPU a realistic shape (``benchmarks/bench_latency_table.py``), on a
CPU enough tokens that the matmuls dominate (a few thousand tokens of a model a few hundred wide). A small model
on a few tokens is launch-bound and its table says nothing about widths.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import statistics
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .measure import (  # noqa: F401  (measure and time_ms re-exported: tables and timing are one public API)
    PHASES,
    _device_and_dtype,
    measure,
    measure_many,
    time_interleaved,
    time_ms,
)
from .model import FlextronModel
from .space import Subnet

TABLE_VERSION = 1


# -- model identity ---------------------------------------------------------------------------------
def space_signature(fm: FlextronModel) -> dict:
    """What a table (or a router) depends on: the architecture, per-layer sizes and the space's choices."""
    c = fm.config
    return {
        "architecture": type(fm.model).__name__,
        "hidden_size": int(getattr(c, "hidden_size", getattr(c, "n_embd", 0))),
        "vocab_size": int(c.vocab_size),
        "num_layers": fm.num_layers,
        "mlp_choices": [fm.mlp_choices(i) for i in range(fm.num_layers)],
        "head_choices": [fm.head_choices(i) for i in range(fm.num_layers)],
        "head_dim": [a.head_dim for a in fm.attention_blocks],
        "kv_groups": [a.group_size for a in fm.attention_blocks],
    }


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.processor() or platform.machine()}:{torch.get_num_threads()}threads"


def _versions() -> dict:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:  # pragma: no cover
        out["triton"] = None
    return out


# -- the table --------------------------------------------------------------------------------------
@dataclass
class LatencyTable:
    """Per-layer latencies (ms) at each width choice, plus the fixed cost; see the module docstring."""

    meta: dict
    mlp: list[list[float]]
    attn: list[list[float]]
    fixed_ms: float
    extra: dict = field(default_factory=dict)  # measured whole-model latencies and the like, for the record

    @property
    def signature(self) -> dict:
        return self.meta["model"]

    @property
    def mlp_choices(self) -> list[list[int]]:
        return self.signature["mlp_choices"]

    @property
    def head_choices(self) -> list[list[int]]:
        return self.signature["head_choices"]

    @property
    def num_layers(self) -> int:
        return self.signature["num_layers"]

    def full_ms(self) -> float:
        """Predicted latency of the full model (the denominator of every latency fraction)."""
        return self.fixed_ms + sum(m[-1] for m in self.mlp) + sum(a[-1] for a in self.attn)

    def min_ms(self) -> float:
        """Predicted latency of the cheapest subnet of the space (per layer the cheapest entries)."""
        return self.fixed_ms + sum(min(m) for m in self.mlp) + sum(min(a) for a in self.attn)

    def _index(self, axis: str, layer: int, value: int) -> int:
        choices = (self.mlp_choices if axis == "mlp" else self.head_choices)[layer]
        if value not in choices:
            name = "mlp" if axis == "mlp" else "heads"
            raise ValueError(f"subnet.{name}[{layer}] = {value} is not in the table's choices {choices}")
        return choices.index(value)

    def predict(self, subnet: Subnet) -> float:
        """Predicted latency (ms) of ``subnet``: fixed cost plus each layer's table entries."""
        if not isinstance(subnet, Subnet):
            raise TypeError(f"subnet must be a Subnet, got {type(subnet).__name__}")
        n = self.num_layers
        if len(subnet.mlp) != n or len(subnet.heads) != n:
            raise ValueError(f"subnet must have {n} layers (the table's), got {len(subnet.mlp)}/{len(subnet.heads)}")
        total = self.fixed_ms
        for i in range(n):
            total += self.mlp[i][self._index("mlp", i, subnet.mlp[i])]
            total += self.attn[i][self._index("attn", i, subnet.heads[i])]
        return total

    def predict_fraction(self, subnet: Subnet) -> float:
        """``predict(subnet) / full_ms()``: the latency fraction a budget target is compared with."""
        return self.predict(subnet) / self.full_ms()

    def predict_mixture(self, mlp_fractions: Sequence[Sequence[float]],
                        head_fractions: Sequence[Sequence[float]]) -> float:
        """Predicted latency (ms) of input-adaptive routing: per layer, the share of tokens at each MLP width
        and of sequences at each head count (rows summing to 1).

        Assumes each token costs its own width (the grouped ``nested_mlp`` launches on a GPU), so a layer costs
        the share-weighted mean of its entries. Differentiable when given tensors (see :meth:`expected_ms`).
        """
        return float(self.expected_ms(mlp_fractions, head_fractions))

    def tensors(self, device=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The entries as float32 tensors (one per layer and axis), for differentiable expected latency."""
        return ([torch.tensor(m, dtype=torch.float32, device=device) for m in self.mlp],
                [torch.tensor(a, dtype=torch.float32, device=device) for a in self.attn])

    def expected_ms(self, mlp_probs, head_probs):
        """``fixed + sum_l <p_l, mlp_l> + <q_l, attn_l>``; ``p_l``/``q_l`` probability vectors (or tensors
        ``[..., n_choices]``, giving ``[...]``): the router's expected latency, differentiable in the probabilities."""
        if isinstance(mlp_probs[0], torch.Tensor):
            dev = mlp_probs[0].device
            mt, at = self.tensors(dev)
            total = torch.zeros((), device=dev) + self.fixed_ms
            for i in range(self.num_layers):
                total = total + (mlp_probs[i] * mt[i]).sum(-1) + (head_probs[i] * at[i]).sum(-1)
            return total
        total = self.fixed_ms
        for i in range(self.num_layers):
            total += float(np.dot(mlp_probs[i], self.mlp[i])) + float(np.dot(head_probs[i], self.attn[i]))
        return total

    # -- persistence --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": "flextron-latency-table", "version": TABLE_VERSION, "meta": self.meta,
                "fixed_ms": self.fixed_ms, "mlp": self.mlp, "attn": self.attn, "extra": self.extra}

    @classmethod
    def from_dict(cls, d: dict) -> LatencyTable:
        if d.get("format") != "flextron-latency-table" or d.get("version") != TABLE_VERSION:
            raise ValueError(f"table must be a flextron latency table v{TABLE_VERSION}, "
                             f"got format {d.get('format')!r} v{d.get('version')}")
        return cls(meta=d["meta"], mlp=d["mlp"], attn=d["attn"], fixed_ms=float(d["fixed_ms"]),
                   extra=d.get("extra", {}))

    def save(self, path) -> None:
        """Write JSON atomically (a temporary sibling renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path) -> LatencyTable:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def describe(self) -> str:
        m = self.meta
        return (f"{m['phase']} table, batch {m['batch_size']} x seq {m['seq_len']}, {m['dtype']} on {m['device_name']}"
                f" (full {self.full_ms():.2f} ms, fixed {self.fixed_ms:.2f} ms)")


def check_table(table: LatencyTable, fm: FlextronModel, *, device: torch.device | str | None = None,
                check_device: bool = True) -> None:
    """Raise ``ValueError`` unless ``table`` was profiled for ``fm`` (same architecture, sizes and space) and, with
    ``check_device``, on the kind of device ``fm`` runs on (``device``: defaults to the model's)."""
    if not isinstance(table, LatencyTable):
        raise TypeError(f"table must be a LatencyTable, got {type(table).__name__}")
    sig = space_signature(fm)
    for key, want in sig.items():
        got = table.signature.get(key)
        if got != want:
            raise ValueError(f"table was profiled for another model or space: its {key} is {_short(got)}, "
                             f"the model's is {_short(want)}")
    if not check_device:
        return
    device = torch.device(device) if device is not None else next(fm.model.parameters()).device
    if table.meta["device_type"] != device.type or (
            device.type == "cuda" and table.meta["device_name"] != torch.cuda.get_device_name(device)):
        here = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        raise ValueError(f"table was profiled on another device: {table.meta['device_name']!r} "
                         f"({table.meta['device_type']}), the model runs on {here!r} ({device.type})")


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 80 else s[:77] + "..."


# -- timing -----------------------------------------------------------------------------------------
class _PastCache:
    """A stand-in KV cache holding ``seq_len`` past tokens for the kept KV heads: ``update`` returns past + new,
    as a DynamicCache does, without growing, so a decode step can be timed again and again."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v

    def update(self, k, v, layer_idx, *args, **kwargs):
        return torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.k.shape[2]


def _position_embeddings(fm: FlextronModel, x: torch.Tensor, start: int):
    if fm.family == "gpt2":
        return None
    pos = torch.arange(start, start + x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
    return fm.model.model.rotary_emb(x, position_ids=pos)


@contextmanager
def _blocks_skipped(fm: FlextronModel):
    """Every MLP and attention block returns zeros (what remains is the fixed cost)."""
    blocks = fm.mlp_blocks + fm.attention_blocks
    n = fm.num_layers
    for i, b in enumerate(blocks):
        if i < n:
            b.forward = lambda x, *a, **k: torch.zeros_like(x)
        else:
            b.forward = lambda hidden_states, *a, **k: (torch.zeros_like(hidden_states), None)
    try:
        yield
    finally:
        for b in blocks:
            del b.forward


def profile(fm: FlextronModel, *, batch_size: int, seq_len: int, phase: str = "prefill", warmup: int = 3,
            repeats: int = 10, seed: int = 0, graphs: bool = False) -> LatencyTable:
    """Measure ``fm``'s latency table on the device and dtype it is on (see the module docstring).

    ``phase="prefill"``: ``batch_size`` sequences of ``seq_len`` tokens; ``"decode"``: ``batch_size`` sequences
    of one new token each, attending to ``seq_len`` cached tokens. Blocks are timed one at a time on random hidden
    states of the right shape (position embeddings and a KV cache of the kept heads included), interleaved in
    rounds (:func:`time_interleaved`); the fixed cost is the whole model with every block a no-op.
    ``graphs=True`` (CUDA): every entry is timed as a CUDA-graph replay, the device time a served, graph-captured
    decode step sees; eager timings of a large model's decode step are dominated by Python's launch cost, which
    does not shrink with width. :func:`validate` then measures the whole model the same way.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len), ("repeats", repeats)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    device, dtype = _device_and_dtype(fm)
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = space_signature(fm)["hidden_size"]
    q_len = seq_len if phase == "prefill" else 1
    start = 0 if phase == "prefill" else seq_len
    x = torch.randn(batch_size, q_len, hidden, generator=g).to(device=device, dtype=dtype)
    pe = _position_embeddings(fm, x, start)
    previous = fm.subnet
    was_training = fm.training
    fm.eval()
    n = fm.num_layers
    fns, index = [], []  # index[k] = ("mlp" | "attn" | "fixed", layer, choice index)
    caches: dict = {}
    for i, (m, a) in enumerate(zip(fm.mlp_blocks, fm.attention_blocks)):
        for j, w in enumerate(fm.mlp_choices(i)):
            def run_mlp(m=m, w=w):
                m.width, m.token_widths = w, None
                m(x)
            fns.append(run_mlp)
            index.append(("mlp", i, j))
        for j, h in enumerate(fm.head_choices(i)):
            cache = None
            if phase == "decode":  # the kept KV heads' cache, shared by layers of one shape
                kv = h // a.group_size
                key = (kv, a.head_dim)
                if key not in caches:
                    shape = (batch_size, kv, seq_len, a.head_dim)
                    caches[key] = _PastCache(torch.randn(shape, generator=g).to(device, dtype),
                                             torch.randn(shape, generator=g).to(device, dtype))
                cache = caches[key]

            def run_attn(a=a, h=h, c=cache):
                a.heads, a.head_budgets = h, None
                a(x, position_embeddings=pe, attention_mask=None, past_key_values=c)
            fns.append(run_attn)
            index.append(("attn", i, j))
    ids = torch.randint(0, fm.config.vocab_size, (batch_size, q_len), generator=g).to(device)
    try:
        with torch.inference_mode():
            times = time_interleaved(fns, warmup=warmup, repeats=repeats, device=device, graphs=graphs)
            for m, a in zip(fm.mlp_blocks, fm.attention_blocks):
                m.width, a.heads = m.full_width, a.num_heads
            with _blocks_skipped(fm):
                fixed_times = time_interleaved([lambda: fm(input_ids=ids, use_cache=False)], warmup=warmup,
                                               repeats=repeats, device=device, graphs=graphs)[0]
    finally:
        fm.set_subnet(previous)
        fm.train(was_training)
    mlp_ms = [[0.0] * len(fm.mlp_choices(i)) for i in range(n)]
    attn_ms = [[0.0] * len(fm.head_choices(i)) for i in range(n)]
    mlp_min = [row[:] for row in mlp_ms]
    attn_min = [row[:] for row in attn_ms]
    for (kind, i, j), t in zip(index, times):
        (mlp_ms if kind == "mlp" else attn_ms)[i][j] = statistics.median(t)
        (mlp_min if kind == "mlp" else attn_min)[i][j] = min(t)
    fixed = statistics.median(fixed_times)
    meta = {
        "phase": phase, "batch_size": batch_size, "seq_len": seq_len, "dtype": str(dtype).replace("torch.", ""),
        "device_type": device.type, "device_name": device_name(device), "warmup": warmup, "repeats": repeats,
        "statistic": "median", "clock": "cuda_events" if device.type == "cuda" else "perf_counter",
        "timing": "cuda_graph" if graphs and device.type == "cuda" else "eager",
        "versions": _versions(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": space_signature(fm),
    }
    # The per-entry minimum, kept for the record: on a loaded machine it is the less noisy statistic.
    extra = {"min": {"mlp": mlp_min, "attn": attn_min, "fixed_ms": min(fixed_times)}}
    return LatencyTable(meta=meta, mlp=mlp_ms, attn=attn_ms, fixed_ms=fixed, extra=extra)


# -- whole-model measurement and validation ---------------------------------------------------------
def random_subnets(fm: FlextronModel, n: int, seed: int = 0) -> list[Subnet]:
    """``n`` random heterogeneous subnets (each layer's width and head count drawn uniformly from the space)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        out.append(Subnet(mlp=[int(rng.choice(fm.mlp_choices(i))) for i in range(fm.num_layers)],
                          heads=[int(rng.choice(fm.head_choices(i))) for i in range(fm.num_layers)]))
    return out


def validate(fm: FlextronModel, table: LatencyTable, subnets: Sequence[Subnet] | int = 20, *, warmup: int = 2,
             repeats: int = 7, seed: int = 0) -> dict:
    """Predicted vs measured whole-model latency over ``subnets`` (or that many random ones), all timed
    interleaved with the full model (measured first and again last).

    Returns ``{"rows": [{"subnet", "predicted_ms", "measured_ms", "rel_error", "fraction_error", ...}],
    "median_abs_rel_error", "max_abs_rel_error", "median_abs_fraction_error", "max_abs_fraction_error",
    "noise_floor_full_vs_full", ...}``: ``rel_error = predicted / measured - 1`` (ms, medians against medians);
    ``fraction_error`` compares latency as a fraction of the full model's (what a budget target is), predicted
    against measured in the same rounds, so a machine-wide slowdown cancels; the per-entry minima give ``*_min``.
    Row 0 is the full model.
    """
    check_table(table, fm)
    if isinstance(subnets, int):
        subnets = random_subnets(fm, subnets, seed)
    # The full model twice, first and last: the fraction denominator, and the noise floor (two measurements of
    # one thing) that any table error should be read against.
    subnets = [fm.full_subnet()] + list(subnets) + [fm.full_subnet()]
    m = table.meta
    meas = measure_many(fm, subnets, batch_size=m["batch_size"], seq_len=m["seq_len"], phase=m["phase"],
                        warmup=warmup, repeats=repeats, seed=seed, group=len(subnets),
                        graphs=m.get("timing") == "cuda_graph")
    tmin = None
    if "min" in table.extra:
        e = table.extra["min"]
        tmin = LatencyTable(meta=table.meta, mlp=e["mlp"], attn=e["attn"], fixed_ms=e["fixed_ms"])
    full_meas = meas[0]["median_ms"]
    noise = meas[-1]["median_ms"] / full_meas - 1
    subnets, meas = subnets[:-1], meas[:-1]
    rows = []
    for s, mm in zip(subnets, meas):
        pred = table.predict(s)
        row = {"subnet": s.to_dict(), "predicted_ms": pred, "measured_ms": mm["median_ms"],
               "rel_error": pred / mm["median_ms"] - 1, "predicted_fraction": pred / table.full_ms(),
               "measured_fraction": mm["median_ms"] / full_meas, "measured_min_ms": mm["min_ms"]}
        row["fraction_error"] = row["predicted_fraction"] / row["measured_fraction"] - 1
        if tmin is not None:
            row["predicted_min_ms"] = tmin.predict(s)
            row["rel_error_min"] = row["predicted_min_ms"] / mm["min_ms"] - 1
        rows.append(row)
    errs = [abs(r["rel_error"]) for r in rows]
    ferrs = [abs(r["fraction_error"]) for r in rows[1:]]
    out = {"rows": rows, "median_abs_rel_error": statistics.median(errs), "max_abs_rel_error": max(errs),
           "median_abs_fraction_error": statistics.median(ferrs), "max_abs_fraction_error": max(ferrs),
           "noise_floor_full_vs_full": noise, "full_predicted_ms": table.full_ms(), "table": table.describe()}
    if tmin is not None:
        e = [abs(r["rel_error_min"]) for r in rows]
        out.update(median_abs_rel_error_min=statistics.median(e), max_abs_rel_error_min=max(e))
    return out


def geometric_mean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))
