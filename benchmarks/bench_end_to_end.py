"""End-to-end prefill and greedy generation of whole Llama-shaped models: the dense HF model, the FlextronModel at
full width and at sub-networks, the plain models those sub-networks export to, per-token MLP widths and
per-request budgets.

GPU only (on a machine without CUDA it answers ``--help`` and stops). Models: ``llama2-7b`` (hidden 4096, MLP 11008,
32 layers, 32 heads, 32 KV heads, vocab 32000), ``llama3-8b`` (MLP 14336, 8 KV heads, vocab 128256, RoPE theta 5e5)
and ``llama-1b`` (hidden 2048, MLP 8192, 16 layers, 32 heads, 8 KV heads, vocab 128256, tied embeddings), with random
bf16 weights (built on the meta device, materialised on the GPU, normal(0, 0.02) drawn there; norms at 1). Space:
MLP widths and heads at 25/50/75/100%. One model is resident at a time: the HF model is timed first, then made elastic
in place (``FlextronModel.from_hf``), so every provider runs the same weights; an exported model lives only for its
own rows.

Providers:

- ``hf``: the plain ``LlamaForCausalLM``; ``fm-full``: the FlextronModel at full width;
- ``fm-75``/``fm-50``/``fm-25``: ``fm.set_subnet(fm.uniform_subnet(f, f))``;
- ``ext-75``/``ext-50``/``ext-25``: ``fm.extract(subnet)``, the dense plain HF model of that subnet. A head count
  that does not divide the hidden size (24 of 32 heads with hidden 4096) is refused by transformers' config
  validation, where ``extract`` returns a slim FlextronModel; here the plain model is built anyway with the
  counts set after the config's construction (the row's ``export`` says which);
- ``fm-adaptive``, recorded as ``fm-random-widths``: a router needs training on real text, which random weights do
  not have, so every token of every call gets a random MLP width drawn uniformly from its layer's choices
  (through ``ElasticMLP``'s per-token ``widths``, the grouped ``nested_mlp`` kernel), full heads;
- ``fm-budgets``: 16 sequences with ``budgets=[0.25] * 4 + [0.5] * 4 + [0.75] * 4 + [1.0] * 4``, against the same
  16 sequences at full width and the four groups of 4 run one after another, each at its uniform subnet. Decode:
  ``fm.generate(ids, budgets=...)`` (eager and static-compile), and in graph mode one decode step captured inside
  the budgets (the per-sequence head and width tensors are made once, outside the capture); prefill: one forward
  of the 16 prompts (``--prompt-len`` tokens each), ``fm(ids, budgets=...)`` eager, and in graph mode the forward
  captured inside the budgets; timed again with every prompt in one batch (``one_batch_ms``: the runs of equal
  budgets off, as ``FLEXTRON_BUDGET_RUNS=0`` does), so the row holds its own A/B of the per-run path. Eager and
  graph decode are timed again under the other decode policy (``policies_ms_per_step``: ``kernels``, the grouped
  kernels, and ``masked``, the dense ops at the widest budget with the rest zeroed; ``FLEXTRON_BUDGET_DECODE``).

Phases and modes:

- ``prefill``: one forward of ``--prefill`` batches (default 4x1024 and 1x4096 tokens), ``use_cache=False`` and
  ``logits_to_keep=1`` (the logits ``generate``'s prefill computes); ``eager`` and ``graph`` (the forward captured in
  a CUDA graph; the inputs carry no padding, so the model's causal mask is ``None`` during capture as it is outside,
  where transformers would otherwise materialise it).
- ``decode``: greedy ``generate`` of ``--new-tokens`` (128, ``min_new_tokens`` = ``max_new_tokens``) after a
  ``--prompt-len`` (512) prompt at ``--batches`` (1, 16, 64). ``eager``: ``model.generate(...)`` with the default
  dynamic cache. ``static-compile``: ``generate(..., cache_implementation="static")``, for which transformers
  compiles the decode step itself (``torch.compile(model.__call__)`` with the generation config's ``compile_config``,
  default ``CompileConfig()``: inductor, ``mode="reduce-overhead"``); Dynamo is reset before each row, the first
  call (compile) is the row's warm-up, and the row records whether a graph was compiled, graph breaks, and any
  compile during the timed calls. ``graph``: a ``StaticCache`` prefilled with the prompt, then one decode step
  (forward on a fixed ``[B, 1]`` input buffer, greedy argmax written back into it, the cache position advanced
  on the device) captured with ``torch.cuda.graph`` and replayed ``--new-tokens`` times. With a static cache,
  transformers passes a mask over the whole buffer to every decode step, so attention runs SDPA there in every
  provider (flextron's decode kernel takes no mask).

Timing: CUDA events around whole ``generate`` calls, split at the end of the prompt's forward (a forward hook that
records an event), so ``ms_per_step`` = decode time / (new tokens - 1) and the prompt's prefill is reported apart;
one full-length warm-up call per row (the compiling call under ``static-compile``; the allocator's blocks for every
cache size otherwise), then the median of ``--repeats`` calls. Peak memory: ``torch.cuda.max_memory_allocated``
over the row (weights included), reset per row.

Ratios and targets (``met`` per row; recomputed over every row of the file after each row): ``fm-full`` <= 1.05x
``hf``'s time and ``fm-X`` <= 1.05x ``ext-X``'s, in every phase and mode; decode at ``fm-50`` >= 1.5x faster than
``fm-full`` under ``static-compile`` and ``graph``; per-request budgets >= 1.3x faster than the 16 at full width and
faster than the groups in sequence; eager host overhead per layer, (``fm-full`` - ``hf``) ms per step at batch 1
over the layers, <= 20 µs.

Results: ``<out>/end_to_end_<GPU>.json`` (``end_to_end_quick_<GPU>.json`` with ``--quick``), written after every
row (temporary file, then rename). ``--merge`` updates the rows of an existing file by (shape, provider, phase, mode,
batch) instead of rewriting it, so a sweep can be split over several commands; ``--time-limit`` stops starting rows
after that many seconds and prints the rows it skipped. Each row records the seconds it took (warm-up and compile
included), and the run ends with that estimate per row.

Rows of one provider are timed one after another, so a host or GPU that drifts over the run (clocks, other work)
moves one side of a ratio and not the other. ``--paired`` adds, per eager decode batch, rows ``pair-full`` (fm-full
against the plain HF model exported at full width) and ``pair-X`` (fm-X against ext-X) whose ``generate`` calls
alternate A B A B... after one warm-up each; their ratio is a target of its own (``<= 1.05``, "interleaved").
The eager ``fm-budgets`` decode row interleaves all of its calls the same way (the budgets under each decode
policy, full width, the four groups: one call each per round, the order reversed every other round).

Every ``static-compile`` row compiles (tens of seconds for a 7B model; the ``fm-budgets`` row six times), so the
whole default sweep takes over half an hour: split it by ``--modes`` and ``--providers`` into commands that each
``--merge`` into the same file.

    python benchmarks/bench_end_to_end.py --out benchmarks/results                      # everything, llama2-7b
    python benchmarks/bench_end_to_end.py --modes eager,graph --providers hf,fm-full,fm-75,ext-75,fm-50 \
        --merge --time-limit 420                                                         # one part of it
    python benchmarks/bench_end_to_end.py --quick                                       # llama-1b, short
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import json
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

BENCH = "end_to_end"
WIDTHS = (0.25, 0.5, 0.75, 1.0)
TOLERANCE = 1.05  # fm-full vs hf and fm-X vs ext-X: time ratio at most this
SPEEDUP_50 = 1.5  # decode at fm-50 vs fm-full under static-compile and graph
BUDGETS_VS_FULL = 1.3
HOST_US_PER_LAYER = 20.0
BUDGETS = (0.25,) * 4 + (0.5,) * 4 + (0.75,) * 4 + (1.0,) * 4

SHAPES: dict[str, dict] = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True),
}
# Execution order: each sub-network next to its export; per-request budgets last.
PROVIDERS = ("hf", "fm-full", "fm-75", "ext-75", "fm-50", "ext-50", "fm-25", "ext-25", "fm-random-widths",
             "fm-budgets")
ALIASES = {"fm-adaptive": "fm-random-widths"}
PHASES = ("prefill", "decode")
MODES = ("eager", "static-compile", "graph")
PHASE_MODES = {"prefill": ("eager", "graph"), "decode": MODES}
BUDGET_MODES = {"decode": ("eager", "static-compile", "graph"), "prefill": ("eager", "graph")}
DEFAULTS = dict(shapes="llama2-7b", batches="1,16,64", prefill="4x1024,1x4096", prompt_len=512, new_tokens=128)
QUICK = dict(shapes="llama-1b", batches="1,16", prefill="2x512", prompt_len=128, new_tokens=32)


# -- shapes ------------------------------------------------------------------------------------------
def llama_config(shape: str | dict, max_positions: int = 8192):
    """The ``LlamaConfig`` of a named shape (or of a dict of config values), bf16, SDPA attention."""
    from transformers import LlamaConfig

    values = SHAPES[shape] if isinstance(shape, str) else shape
    cfg = LlamaConfig(max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2, **values)
    cfg._attn_implementation = "sdpa"
    return cfg


def build_model(shape: str | dict, device, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A ``LlamaForCausalLM`` of ``shape`` in eval mode: built on the meta device, then (unless ``device`` is meta)
    materialised on ``device`` with ``to_empty`` and drawn there (normal(0, 0.02) matrices, norms at 1; no host-side
    initialisation of the full model)."""
    from transformers import LlamaForCausalLM

    cfg = llama_config(shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.to(dtype)
    device = torch.device(device)
    if device.type == "meta":
        return model.eval()
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.fill_(1.0)
        _restore_buffers(model, device)
    if cfg.tie_word_embeddings:  # to_empty gives each module its own new parameter: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def _restore_buffers(model: torch.nn.Module, device) -> None:
    """Rotary frequencies are computed at construction, so ``to_empty`` leaves them uninitialised: recompute them
    (a vector per module) with a fresh module on the CPU, in float32 as construction makes them."""
    for name, module in model.named_modules():
        if not module._buffers:
            continue
        if not hasattr(module, "inv_freq"):
            raise RuntimeError(f"build_model: no initialiser for the buffers of {name or 'the model'} "
                               f"({sorted(module._buffers)})")
        with torch.device("cpu"):
            fresh = type(module)(config=module.config)
        for key in list(module._buffers):
            module._buffers[key] = fresh._buffers[key].to(device)


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters, tied ones counted once (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


def make_space():
    from flextron import ElasticSpace

    return ElasticSpace(mlp=WIDTHS, heads=WIDTHS)


# -- what runs ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowSpec:
    shape: str
    provider: str
    phase: str
    mode: str
    batch: int
    seq_len: int  # prefill: tokens per sequence; decode: the prompt length

    @property
    def key(self) -> tuple:
        return (self.shape, self.provider, self.phase, self.mode, self.batch)


def row_key(row: dict) -> tuple:
    """The identity of a results row: (shape, provider, phase, mode, batch)."""
    return (row["shape"], row["provider"], row["phase"], row["mode"], int(row["batch"]))


def key_str(key: tuple) -> str:
    return f"{key[0]} {key[1]} {key[2]} {key[3]} b{key[4]}"


def parse_list(text: str, allowed: tuple | None = None, name: str = "value") -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if allowed is not None:
        bad = [s for s in items if s not in allowed]
        if bad:
            raise ValueError(f"--{name}: unknown {bad}; choose from {', '.join(allowed)}")
    if not items:
        raise ValueError(f"--{name}: empty")
    return items


def parse_providers(text: str) -> list[str]:
    names = [ALIASES.get(s, s) for s in parse_list(text, PROVIDERS + tuple(ALIASES), "providers")]
    return [p for p in PROVIDERS if p in names]


def parse_prefill(text: str) -> list[tuple[int, int]]:
    """``"4x1024,1x4096"`` -> ``[(4, 1024), (1, 4096)]``."""
    out = []
    for item in parse_list(text, None, "prefill"):
        try:
            b, s = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"--prefill: {item!r} is not BATCHxTOKENS") from None
        if b < 1 or s < 1:
            raise ValueError(f"--prefill: {item!r} must be positive")
        out.append((b, s))
    return out


def plan(shapes: list[str], providers: list[str], phases: list[str], modes: list[str], batches: list[int],
         prefill: list[tuple[int, int]], prompt_len: int) -> list[RowSpec]:
    """Every row to run, in execution order: per shape, provider by provider (``PROVIDERS`` order), prefill then
    decode, mode by mode. Prefill has no ``static-compile``; ``fm-budgets`` runs 16 sequences of ``prompt_len``
    tokens in every mode of each phase."""
    rows = []
    for shape in shapes:
        for p in (p for p in PROVIDERS if p in providers):
            for phase in (ph for ph in PHASES if ph in phases):
                for mode in (m for m in MODES if m in modes):
                    if p == "fm-budgets":
                        if mode in BUDGET_MODES[phase]:
                            rows.append(RowSpec(shape, p, phase, mode, len(BUDGETS), prompt_len))
                        continue
                    if mode not in PHASE_MODES[phase]:
                        continue
                    if phase == "prefill":
                        rows += [RowSpec(shape, p, phase, mode, b, s) for b, s in prefill]
                    else:
                        rows += [RowSpec(shape, p, phase, mode, b, prompt_len) for b in batches]
    return rows


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with every row of the same key replaced by ``new``'s (in place in the order), new keys appended."""
    fresh = {row_key(r): r for r in new}
    out, seen = [], set()
    for r in old:
        k = row_key(r)
        out.append(fresh.get(k, r))
        seen.add(k)
    out += [r for r in new if row_key(r) not in seen]
    return out


def pair_specs(specs: list[RowSpec]) -> list[tuple[str, RowSpec]]:
    """The interleaved comparisons ``--paired`` adds for one shape: ``("full", fm-full's spec)`` where ``hf`` is
    asked too, ``("X", fm-X's spec)`` where ``ext-X`` is; eager decode only (where host time decides)."""
    have = {(s.provider, s.phase, s.mode, s.batch) for s in specs}
    out = []
    for s in specs:
        if s.phase != "decode" or s.mode != "eager":
            continue
        if s.provider == "fm-full" and ("hf", "decode", "eager", s.batch) in have:
            out.append(("full", s))
        elif s.provider[:3] == "fm-" and s.provider[3:].isdigit() and (
                f"ext-{s.provider[3:]}", "decode", "eager", s.batch) in have:
            out.append((s.provider[3:], s))
    return out


# -- ratios and targets ------------------------------------------------------------------------------
DERIVED = ("ratios", "targets")


def _target(name: str, value: float | None, goal: str, met: bool | None) -> dict:
    return {"name": name, "value": value, "goal": goal, "met": met}


def evaluate(rows: list[dict], layers: dict[str, int] | None = None) -> tuple[list[dict], dict]:
    """Ratios and targets of every row against the rows it is compared with (same shape, phase, mode and batch),
    recomputed from scratch; returns ``(rows, summary)``. A row without a time (an error) gets none.

    - ``fm-full``: ``vs_hf`` = its time / ``hf``'s, target <= 1.05; at eager decode batch 1 also the host
      overhead per layer, ``(fm-full - hf)`` ms per step / layers in µs, target <= 20 (``layers``: shape -> layers).
    - ``fm-X``: ``vs_ext`` = its time / ``ext-X``'s, target <= 1.05; ``speedup_vs_full`` = ``fm-full``'s time /
      its own, target >= 1.5 for ``fm-50`` decode under ``static-compile`` and ``graph``.
    - ``fm-random-widths``: ``speedup_vs_full`` (no target).
    - ``fm-budgets``: ``speedup_vs_full`` >= 1.3 and ``speedup_vs_groups`` > 1 (measured in the row itself).
    """
    layers = layers or {}
    index = {row_key(r): r for r in rows if r.get("ms")}
    out, summary_targets, host = [], [], {}
    for r in rows:
        r = {k: v for k, v in r.items() if k not in DERIVED}
        ratios, targets = {}, []
        ms = r.get("ms")
        shape, p, phase, mode, batch = row_key(r)

        def other(provider: str, shape=shape, phase=phase, mode=mode, batch=batch) -> float | None:
            o = index.get((shape, provider, phase, mode, batch))
            return o["ms"] if o else None

        if ms:
            if p == "fm-full":
                hf = other("hf")
                if hf:
                    ratios["vs_hf"] = ms / hf
                    targets.append(_target("fm-full time / hf", ms / hf, f"<= {TOLERANCE}", ms / hf <= TOLERANCE))
                    if phase == "decode" and mode == "eager" and batch == 1 and shape in layers:
                        us = (ms - hf) * 1e3 / layers[shape]
                        ratios["host_overhead_us_per_layer"] = us
                        host[shape] = us
                        targets.append(_target("host overhead per layer (µs)", us, f"<= {HOST_US_PER_LAYER:g}",
                                               us <= HOST_US_PER_LAYER))
            elif p.startswith("fm-") and p[3:].isdigit():
                ext = other("ext-" + p[3:])
                if ext:
                    ratios["vs_ext"] = ms / ext
                    targets.append(_target(f"{p} time / ext-{p[3:]}", ms / ext, f"<= {TOLERANCE}",
                                           ms / ext <= TOLERANCE))
                full = other("fm-full")
                if full:
                    ratios["speedup_vs_full"] = full / ms
                    if p == "fm-50" and phase == "decode" and mode in ("static-compile", "graph"):
                        targets.append(_target("fm-50 speed-up vs fm-full", full / ms, f">= {SPEEDUP_50}",
                                               full / ms >= SPEEDUP_50))
            elif p == "fm-random-widths":
                full = other("fm-full")
                if full:
                    ratios["speedup_vs_full"] = full / ms
            elif p.startswith("pair-") and r.get("ratio"):
                ratios["a_over_b"] = r["ratio"]
                targets.append(_target(f"{r.get('a')} time / {r.get('b')}, interleaved", r["ratio"],
                                       f"<= {TOLERANCE}", r["ratio"] <= TOLERANCE))
            elif p == "fm-budgets":
                full = r.get("full_ms_per_step", r.get("full_ms"))
                groups = r.get("groups_ms_per_step", r.get("groups_ms"))
                if full:
                    ratios["speedup_vs_full"] = full / ms
                    targets.append(_target("budgets speed-up vs full width", full / ms, f">= {BUDGETS_VS_FULL}",
                                           full / ms >= BUDGETS_VS_FULL))
                if r.get("one_batch_ms"):
                    ratios["speedup_runs_vs_one_batch"] = r["one_batch_ms"] / ms
                pol = r.get("policies_ms_per_step") or {}
                if pol.get("kernels") and pol.get("masked"):
                    ratios["speedup_masked_vs_kernels"] = pol["kernels"] / pol["masked"]
                if groups:
                    ratios["speedup_vs_groups"] = groups / ms
                    targets.append(_target("budgets speed-up vs groups in sequence", groups / ms, "> 1",
                                           groups / ms > 1.0))
        if ratios:
            r["ratios"] = ratios
        if targets:
            r["targets"] = targets
            summary_targets += [dict(t, row=key_str(row_key(r))) for t in targets]
        out.append(r)
    met = [t for t in summary_targets if t["met"]]
    summary = {"targets_met": len(met), "targets_total": len(summary_targets),
               "missed": [t for t in summary_targets if not t["met"]], "host_overhead_us_per_layer": host}
    return out, summary


# -- timing ------------------------------------------------------------------------------------------
class Clock:
    """Marks on the device's timeline: CUDA events on a GPU, ``perf_counter`` on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b)
        return (b - a) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def time_generate(clock: Clock, module: torch.nn.Module, call: Callable[[], object]) -> tuple[float, float]:
    """``(total ms, prefill ms)`` of one ``generate`` call: the prefill ends where the first forward of ``module``
    (the HF model ``generate`` runs) returns. The hook removes itself there, so the decode steps (compiled ones
    included) run without it."""
    marks = {}

    def hook(mod, args, kwargs, output):
        marks["prefill"] = clock.mark()
        handle.remove()

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        start = clock.mark()
        call()
        end = clock.mark()
    finally:
        handle.remove()
    total = clock.ms(start, end)
    return total, clock.ms(start, marks["prefill"]) if "prefill" in marks else math.nan


def _dynamo_counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


def _reset_compiled() -> None:
    torch._dynamo.reset()
    with contextlib.suppress(Exception):
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees

        reset_cudagraph_trees()


@contextlib.contextmanager
def _causal_mask_skipped_in_capture(module: torch.nn.Module) -> Iterator[None]:
    """While a CUDA graph is captured, transformers materialises the causal mask it skips outside capture (it treats
    stream capture as tracing, and cannot look at the values then), which sends the HF model's SDPA off its flash
    path and flextron's attention to SDPA. The prefill inputs carry no padding, so the mask is ``None`` during
    capture as it is outside, for every provider alike."""
    from flextron.attention import no_padding

    owner = sys.modules[type(module).__module__]  # the modeling module that builds the mask (modeling_llama)
    original = getattr(owner, "create_causal_mask", None)
    if original is not None:
        owner.create_causal_mask = lambda *args, **kwargs: None
    try:
        with no_padding():
            yield
    finally:
        if original is not None:
            owner.create_causal_mask = original


def _rewind(cache, length: int) -> None:
    """Put every layer of a static cache back at ``length`` tokens (in place: a captured step reads these)."""
    for layer in cache.layers:
        pos = getattr(layer, "cumulative_length", None)
        if not isinstance(pos, torch.Tensor):
            raise RuntimeError("graph decode needs transformers' static cache with a device-side length "
                               "(StaticLayer.cumulative_length, transformers >= 5)")
        pos.fill_(length)


# -- providers ---------------------------------------------------------------------------------------
@dataclass
class Target:
    """What a row runs: ``module`` is the HF model ``generate`` runs (its first forward ends the prefill);
    ``forward``/``generate`` are the calls a user makes (the FlextronModel's for flextron providers)."""

    module: torch.nn.Module
    forward: Callable
    generate: Callable
    note: dict


def plain_export(fm, subnet):
    """``fm.extract(subnet)`` as a plain HF model: as it comes where transformers can express the config; else (a
    head count that does not divide the hidden size, which transformers' config validation refuses) the slim
    FlextronModel's weights in a plain model whose config counts are set after construction."""
    from flextron import FlextronModel

    out = fm.extract(subnet)
    if not isinstance(out, FlextronModel):
        return out, "fm.extract: plain HF model"
    config = copy.deepcopy(fm.config)
    a = fm.attention_blocks[0]
    config.intermediate_size = subnet.mlp[0]
    config.num_attention_heads = subnet.heads[0]
    config.num_key_value_heads = subnet.heads[0] // a.group_size
    config.head_dim = a.head_dim
    with torch.device("meta"):
        model = type(fm.model)(config)
    missing, unexpected = model.load_state_dict(out.model.state_dict(), strict=False, assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"plain export: missing {missing}, unexpected {unexpected}")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.generation_config = copy.deepcopy(fm.model.generation_config)
    source = dict(fm.model.named_buffers())
    for name, _ in list(model.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = source[name].detach().clone()
    del out
    return model.eval(), ("plain HF model built from fm.extract's slim weights (transformers' config refuses "
                          f"{subnet.heads[0]} heads with hidden size {config.hidden_size})")


def random_width_hooks(fm, device) -> list:
    """Forward pre-hooks giving every token of every call a random MLP width, uniform over its layer's choices."""
    handles = []
    for i, m in enumerate(fm.mlp_blocks):
        choices = torch.tensor(fm.mlp_choices(i), device=device)

        def hook(module, args, kwargs, choices=choices):
            x = args[0] if args else kwargs["x"]
            idx = torch.randint(0, choices.numel(), x.shape[:-1], device=x.device)
            return (x,), {"widths": choices[idx]}

        handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


# -- the run -----------------------------------------------------------------------------------------
class Runner:
    def __init__(self, args: argparse.Namespace, device: torch.device, shapes: dict[str, dict]) -> None:
        self.args, self.device, self.shapes = args, device, shapes
        self.clock = Clock(device)
        self.cuda = device.type == "cuda"
        self.t0 = time.monotonic()
        self.done: list[dict] = []
        self.skipped: list[str] = []
        self.path = self._result_path()
        self.info = self._info()
        self.previous = self._load_previous() if args.merge else {}
        self.shape_info: dict[str, dict] = {}
        self.vocab = 0

    # -- files
    def _result_path(self) -> Path:
        name = BENCH + ("_quick" if self.args.quick else "")
        if self.cuda:
            from _common import result_path

            return result_path(self.args.out, name)
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        return out / f"{name}_{self.device.type}.json"

    def _info(self) -> dict:
        import transformers

        if self.cuda:
            from _common import run_info

            info = run_info()
        else:
            import datetime

            from _common import commit

            info = {"gpu": self.device.type, "torch": torch.__version__, "commit": commit(),
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        return dict(info, transformers=transformers.__version__)

    def _load_previous(self) -> dict:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"--merge: cannot read {self.path}: {e}") from None
        return data if isinstance(data, dict) else {}

    def settings(self) -> dict:
        a = self.args
        return {"prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "prefill": a.prefill,
                "repeats": a.repeats, "space": {"mlp": list(WIDTHS), "heads": list(WIDTHS)},
                "budgets": list(BUDGETS), "dtype": "bfloat16"}

    def write(self) -> None:
        prev = self.previous
        rows = merge_rows(prev.get("rows", []), self.done) if prev else list(self.done)
        shapes = dict(prev.get("shapes", {})) if prev else {}
        shapes.update(self.shape_info)
        layers = {k: v["config"]["num_hidden_layers"] for k, v in shapes.items()}
        rows, summary = evaluate(rows, layers)
        payload = {"bench": BENCH, "info": self.info, "settings": self.settings(), "shapes": shapes,
                   "rows": rows, "summary": summary, "skipped": self.skipped}
        if prev.get("notes"):  # how the merged file's runs were made, written by hand: kept
            payload["notes"] = prev["notes"]
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
        tmp.replace(self.path)

    # -- the loop
    def run(self, specs: list[RowSpec]) -> None:
        for shape in dict.fromkeys(s.shape for s in specs):
            todo = [s for s in specs if s.shape == shape]
            if self._out_of_time():
                self.skipped += [key_str(s.key) for s in todo]
                continue
            self.run_shape(shape, todo)
            self.write()

    def _out_of_time(self) -> bool:
        limit = self.args.time_limit
        return limit is not None and time.monotonic() - self.t0 > limit

    def run_shape(self, shape: str, specs: list[RowSpec]) -> None:
        import flextron

        t = time.monotonic()
        model = build_model(self.shapes[shape], self.device, seed=self.args.seed)
        cfg = model.config
        self.vocab = cfg.vocab_size
        self.shape_info[shape] = {"config": {k: getattr(cfg, k) for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "tie_word_embeddings")}, "parameters": parameter_count(model)}
        print(f"{shape}: {parameter_count(model) / 1e9:.2f}B parameters, built in {time.monotonic() - t:.1f} s",
              flush=True)
        by_provider: dict[str, list[RowSpec]] = {}
        for s in specs:
            by_provider.setdefault(s.provider, []).append(s)
        fm = None
        try:
            if "hf" in by_provider:
                target = Target(model, model, model.generate, {})
                self.run_rows(target, by_provider.pop("hf"))
            fm = flextron.FlextronModel.from_hf(model, make_space())
            for provider, rows in by_provider.items():
                if self._out_of_time():
                    self.skipped += [key_str(s.key) for s in rows]
                    continue
                try:
                    with self.provider(fm, provider) as target:
                        self.run_rows(target, rows)
                        del target  # an exported model is freed with its provider
                except Exception as e:  # the provider could not be set up (an export that does not fit, ...)
                    traceback.print_exc(limit=4)
                    self._failed(rows, e)
                self._free()
            if self.args.paired:
                self.run_pairs(fm, pair_specs(specs))
        finally:
            del model, fm
            self._free()

    @contextlib.contextmanager
    def provider(self, fm, name: str) -> Iterator[Target]:
        fm.set_subnet(None)
        note: dict = {}
        handles: list = []
        ext = None
        try:
            if name.startswith("ext-"):
                subnet = fm.uniform_subnet(int(name[4:]) / 100, int(name[4:]) / 100)
                ext, how = plain_export(fm, subnet)
                note = {"subnet": {"mlp": subnet.mlp[0], "heads": subnet.heads[0]}, "export": how}
                yield Target(ext, ext, ext.generate, note)
                return
            if name.startswith("fm-") and name[3:].isdigit():
                subnet = fm.uniform_subnet(int(name[3:]) / 100, int(name[3:]) / 100)
                fm.set_subnet(subnet)
                note = {"subnet": {"mlp": subnet.mlp[0], "heads": subnet.heads[0]}}
            elif name == "fm-random-widths":
                handles = random_width_hooks(fm, self.device)
                note = {"token_widths": "per token and call, uniform over the layer's MLP choices "
                        f"{fm.mlp_choices(0)}; all heads"}
            yield Target(fm.model, fm, fm.generate, note)
        finally:
            for h in handles:
                h.remove()
            fm.set_subnet(None)
            del ext
            self._free()

    def run_pairs(self, fm, pairs: list[tuple[str, RowSpec]]) -> None:
        """Eager decode timed interleaved: the FlextronModel at a uniform sub-network (A) and the same sub-network as a
        plain HF model (B: ``ext-X``; at full width the plain model exported at full width, the HF model's function
        in HF's own modules), ``generate`` calls alternating A B A B... ``repeats`` times after one warm-up each."""
        n = self.args.new_tokens
        for name, spec in pairs:
            key = (spec.shape, f"pair-{name}", "decode", "eager", spec.batch)
            if self._out_of_time():
                self.skipped.append(key_str(key))
                continue
            t = time.monotonic()
            a_name, b_name = (("fm-full", "hf (exported at full width)") if name == "full"
                              else (f"fm-{name}", f"ext-{name}"))
            row = {"shape": spec.shape, "provider": f"pair-{name}", "phase": "decode", "mode": "eager",
                   "batch": spec.batch, "prompt_len": spec.seq_len, "new_tokens": n, "a": a_name, "b": b_name}
            ext = None
            try:
                frac = 1.0 if name == "full" else int(name) / 100
                subnet = fm.uniform_subnet(frac, frac)
                ext, how = plain_export(fm, subnet)
                fm.set_subnet(None if name == "full" else subnet)
                ids = self._ids(spec.batch, spec.seq_len, seed=spec.batch)
                kw = self._gen_kwargs("eager", n, ids)
                calls = [functools.partial(g, ids, **kw) for g in (fm.generate, ext.generate)]
                sides = [(fm.model, calls[0], []), (ext, calls[1], [])]
                with torch.no_grad():
                    for _, call, _ in sides:
                        call()
                    self.clock.sync()
                    for _ in range(self.args.repeats):
                        for module, call, steps in sides:
                            total, pre = time_generate(self.clock, module, call)
                            steps.append((total - pre) / (n - 1))
                a, b = statistics.median(sides[0][2]), statistics.median(sides[1][2])
                row.update(ms=a, b_ms=b, ratio=a / b, tokens_per_s=spec.batch * 1e3 / a, a_steps_ms=sides[0][2],
                           b_steps_ms=sides[1][2], export=how,
                           how="generate (dynamic cache) of A and B alternating after one warm-up each; ms per "
                               "decode step, medians")
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                traceback.print_exc(limit=4)
            finally:
                fm.set_subnet(None)
                del ext
                self._free()
            row.update(elapsed_s=round(time.monotonic() - t, 1), commit=self.info.get("commit"),
                       date=self.info.get("date"), gpu=self.info.get("gpu"))
            self.done.append(row)
            tail = f", {row['b']} {row['b_ms']:.3f}: {row['ratio']:.3f}x" if row.get("ratio") else ""
            print(describe(row) + tail, flush=True)
            self.write()

    def _failed(self, specs: list[RowSpec], error: Exception) -> None:
        """Record the rows of ``specs`` that have no result yet as failed with ``error``."""
        have = {row_key(r) for r in self.done}
        for spec in specs:
            if spec.key not in have:
                row = {"shape": spec.shape, "provider": spec.provider, "phase": spec.phase, "mode": spec.mode,
                       "batch": spec.batch, "error": f"{type(error).__name__}: {str(error)[:400]}", "elapsed_s": 0.0,
                       "commit": self.info.get("commit"), "date": self.info.get("date"), "gpu": self.info.get("gpu")}
                self.done.append(row)
                print(describe(row), flush=True)
        self.write()

    def _free(self) -> None:
        _reset_compiled()
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def run_rows(self, target: Target, specs: list[RowSpec]) -> None:
        for spec in specs:
            if self._out_of_time():
                self.skipped.append(key_str(spec.key))
                continue
            t = time.monotonic()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            row = {"shape": spec.shape, "provider": spec.provider, "phase": spec.phase, "mode": spec.mode,
                   "batch": spec.batch, **target.note}
            if spec.phase == "prefill":
                row["seq_len"] = spec.seq_len
            else:
                row.update(prompt_len=spec.seq_len, new_tokens=self.args.new_tokens)
            try:
                if spec.mode == "graph" and not self.cuda:
                    row["error"] = "graph mode needs CUDA"
                elif spec.provider == "fm-budgets":
                    row.update(self.budgets_row(target, spec))
                elif spec.phase == "prefill":
                    row.update(self.prefill_row(target, spec))
                else:
                    row.update(self.decode_row(target, spec))
            except Exception as e:  # one failing row is recorded and the sweep goes on
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                traceback.print_exc(limit=4)
            finally:
                if spec.mode == "static-compile":
                    _reset_compiled()
            if self.cuda:
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            row.update(elapsed_s=round(time.monotonic() - t, 1), commit=self.info.get("commit"),
                       date=self.info.get("date"), gpu=self.info.get("gpu"))
            self.done.append(row)
            print(describe(row), flush=True)
            self.write()
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()

    # -- prefill
    def _ids(self, batch: int, length: int, seed: int) -> torch.Tensor:
        """Random prompt tokens (never 0, the pad id given to ``generate``)."""
        g = torch.Generator().manual_seed(seed)
        return torch.randint(1, self.vocab, (batch, length), generator=g).to(self.device)

    def _timed_forward(self, call: Callable[[], object], module: torch.nn.Module, graph: bool) -> list[float]:
        """ms of ``repeats`` calls after one warm-up, eager or replayed from a graph of the call."""
        times = []
        with torch.no_grad():
            fn = self._capture(call, module) if graph else call
            fn()  # warm-up
            self.clock.sync()
            for _ in range(self.args.repeats):
                a = self.clock.mark()
                fn()
                b = self.clock.mark()
                times.append(self.clock.ms(a, b))
            del fn  # a captured graph's memory goes with it
        return times

    def prefill_row(self, target: Target, spec: RowSpec) -> dict:
        ids = self._ids(spec.batch, spec.seq_len, seed=spec.batch * 7919 + spec.seq_len)
        call = lambda: target.forward(input_ids=ids, use_cache=False, logits_to_keep=1)
        times = self._timed_forward(call, target.module, spec.mode == "graph")
        ms = statistics.median(times)
        return {"ms": ms, "ms_per_forward": ms, "times_ms": times,
                "tokens_per_s": spec.batch * spec.seq_len * 1e3 / ms,
                "how": "one forward, use_cache=False, logits_to_keep=1"}

    def _capture(self, fn: Callable[[], object], module: torch.nn.Module | None = None) -> Callable[[], None]:
        """``fn`` captured in a CUDA graph after a warm-up run on a side stream; returns the replay. With
        ``module`` (prefill), the causal mask is left to the attention, as outside capture."""
        ctx = (lambda: _causal_mask_skipped_in_capture(module)) if module is not None else contextlib.nullcontext
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), ctx():
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), ctx():
            fn()
        return graph.replay

    # -- decode
    def _gen_kwargs(self, mode: str, new_tokens: int, ids: torch.Tensor) -> dict:
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, pad_token_id=0)
        if mode == "static-compile":
            kw["cache_implementation"] = "static"
        return kw

    def _timed_generate(self, target: Target, ids: torch.Tensor, mode: str, **extra) -> dict:
        """One full-length warm-up call (the compiling one under static-compile), then ``repeats`` timed calls."""
        n = self.args.new_tokens
        gen = lambda k: target.generate(ids, **self._gen_kwargs(mode, k, ids), **extra)
        out: dict = {}
        with torch.no_grad():
            graphs0, breaks0 = _dynamo_counts()
            t = time.monotonic()
            gen(n)
            self.clock.sync()
            out["warmup_s"] = round(time.monotonic() - t, 2)
            graphs1, breaks1 = _dynamo_counts()
            totals, prefills = [], []
            for _ in range(self.args.repeats):
                total, pre = time_generate(self.clock, target.module, lambda: gen(n))
                totals.append(total)
                prefills.append(pre)
            graphs2, _ = _dynamo_counts()
        steps = [(total - pre) / (n - 1) for total, pre in zip(totals, prefills)]
        out.update(generate_ms=statistics.median(totals), prefill_ms=statistics.median(prefills),
                   ms_per_step=statistics.median(steps), steps_ms=steps)
        if mode == "static-compile":
            out.update(compiled=graphs1 > graphs0, graphs_compiled=graphs1 - graphs0, graph_breaks=breaks1 - breaks0,
                       graphs_compiled_in_timed_calls=graphs2 - graphs1,
                       compile_config=_compile_config(target.module))
        return out

    def _interleaved_generate(self, target: Target, variants: dict) -> dict[str, dict]:
        """Eager ``generate`` of several variants, ``name -> (ids, extra kwargs, setup)`` (``setup()`` a context
        manager the call runs in): one warm-up call each, then ``repeats`` rounds of one timed call each, the order
        reversed every other round, so a host that drifts over the row falls on every variant alike. Per variant,
        ``_timed_generate``'s figures (medians)."""
        n = self.args.new_tokens
        names = list(variants)

        def gen(name: str) -> None:
            ids, extra, setup = variants[name]
            with setup():
                target.generate(ids, **self._gen_kwargs("eager", n, ids), **extra)

        warm, totals, prefills = {}, {k: [] for k in names}, {k: [] for k in names}
        with torch.no_grad():
            for k in names:
                t = time.monotonic()
                gen(k)
                self.clock.sync()
                warm[k] = round(time.monotonic() - t, 2)
            for r in range(self.args.repeats):
                for k in (names if r % 2 == 0 else names[::-1]):
                    total, pre = time_generate(self.clock, target.module, lambda k=k: gen(k))
                    totals[k].append(total)
                    prefills[k].append(pre)
        out = {}
        for k in names:
            steps = [(t - p) / (n - 1) for t, p in zip(totals[k], prefills[k])]
            out[k] = dict(warmup_s=warm[k], generate_ms=statistics.median(totals[k]),
                          prefill_ms=statistics.median(prefills[k]), ms_per_step=statistics.median(steps),
                          steps_ms=steps)
        return out

    def decode_row(self, target: Target, spec: RowSpec) -> dict:
        ids = self._ids(spec.batch, spec.seq_len, seed=spec.batch)
        if spec.mode == "graph":
            r = self.graph_decode(target, ids)
        else:
            r = self._timed_generate(target, ids, spec.mode)
        ms = r["ms_per_step"]
        return {**r, "ms": ms, "tokens_per_s": spec.batch * 1e3 / ms,
                "how": {"eager": "generate, dynamic cache",
                        "static-compile": "generate(cache_implementation='static'): transformers compiles the "
                                          "decode step",
                        "graph": "StaticCache prefilled, one greedy decode step captured in a CUDA graph, "
                                 "replayed"}[spec.mode]}

    def graph_decode(self, target: Target, ids: torch.Tensor) -> dict:
        from transformers import StaticCache

        from flextron.model import cache_kwarg

        n, p = self.args.new_tokens, ids.shape[1]
        cache = StaticCache(config=target.module.config, max_cache_len=p + n + 8)
        times = []
        with torch.no_grad():
            kw = {cache_kwarg(target.module): cache}  # the installed transformers' name for it
            out = target.forward(input_ids=ids, use_cache=True, logits_to_keep=1, **kw)
            buf = out.logits[:, -1:].argmax(-1)
            del out

            def step():
                logits = target.forward(input_ids=buf, use_cache=True, logits_to_keep=1, **kw).logits
                buf.copy_(logits[:, -1:].argmax(-1))

            replay = self._capture(step)
            for _ in range(1 + self.args.repeats):  # the first run warms up
                _rewind(cache, p)
                a = self.clock.mark()
                for _ in range(n):
                    replay()
                b = self.clock.mark()
                times.append(self.clock.ms(a, b) / n)
            del replay
        steps = times[1:]
        return {"ms_per_step": statistics.median(steps), "steps_ms": steps}

    # -- per-request budgets
    def budgets_row(self, target: Target, spec: RowSpec) -> dict:
        if spec.phase == "prefill":
            return self.budgets_prefill_row(target, spec)
        fm = target.forward
        ids = self._ids(spec.batch, spec.seq_len, seed=4242)
        res = {"budgets": list(BUDGETS)}
        static = spec.mode == "static-compile"

        def timed(part: torch.Tensor, budgets: list | None = None) -> dict:
            if spec.mode != "graph":
                return self._timed_generate(target, part, spec.mode,
                                            **({} if budgets is None else {"budgets": budgets}))
            if budgets is None:
                return self.graph_decode(target, part)
            # the budgets' tensors live on the modules while the step is captured and replayed
            with fm._budgets(None, budgets, part.shape[0]):
                return self.graph_decode(Target(fm.model, fm.model, fm.model.generate, {}), part)

        import flextron.layers

        policy = flextron.layers.BUDGET_DECODE
        others = [p for p in ("kernels", "masked") if p != policy]
        parts = {f: [i for i, b in enumerate(BUDGETS) if b == f] for f in dict.fromkeys(BUDGETS)}
        if spec.mode == "eager":  # every call of the row interleaved (the host drifts between calls)

            @contextlib.contextmanager
            def under(p):
                flextron.layers.BUDGET_DECODE = p
                try:
                    yield
                finally:
                    flextron.layers.BUDGET_DECODE = policy

            @contextlib.contextmanager
            def subnet(f):
                fm.set_subnet(None if f == 1.0 else fm.uniform_subnet(f, f))
                try:
                    yield
                finally:
                    fm.set_subnet(None)

            variants = {p: (ids, {"budgets": list(BUDGETS)}, functools.partial(under, p)) for p in [policy] + others}
            variants["full"] = (ids, {}, contextlib.nullcontext)
            variants.update({f"group {f}": (ids[r[0]:r[-1] + 1], {}, functools.partial(subnet, f))
                             for f, r in parts.items()})
            got = self._interleaved_generate(target, variants)
            mixed, full = got[policy], got["full"]
            policies = {p: got[p]["ms_per_step"] for p in [policy] + others}
            group_runs = {f: got[f"group {f}"] for f in parts}
        else:
            mixed = timed(ids, list(BUDGETS))
            policies = {policy: mixed["ms_per_step"]}
            if not static:  # the A/B of the decode policies (FLEXTRON_BUDGET_DECODE): the same call under the others
                try:
                    for other in others:
                        flextron.layers.BUDGET_DECODE = other
                        policies[other] = timed(ids, list(BUDGETS))["ms_per_step"]
                finally:
                    flextron.layers.BUDGET_DECODE = policy
            if static:
                _reset_compiled()
            full = timed(ids)
            group_runs = {}
            for f, r in parts.items():
                fm.set_subnet(None if f == 1.0 else fm.uniform_subnet(f, f))
                if static:
                    _reset_compiled()
                try:
                    group_runs[f] = timed(ids[r[0]:r[-1] + 1])
                finally:
                    fm.set_subnet(None)
        groups, group_ms, group_generate_ms = {}, 0.0, 0.0
        for f, g in group_runs.items():
            groups[str(f)] = {"ms_per_step": g["ms_per_step"], "generate_ms": g.get("generate_ms")}
            group_ms += g["ms_per_step"]
            group_generate_ms += g.get("generate_ms") or 0.0
        ms = mixed["ms_per_step"]
        res.update(mixed)
        res.update(ms=ms, tokens_per_s=spec.batch * 1e3 / ms, full_ms_per_step=full["ms_per_step"],
                   full_generate_ms=full.get("generate_ms"), groups_ms_per_step=group_ms,
                   groups_generate_ms=group_generate_ms or None, groups=groups, decode_policy=policy,
                   policies_ms_per_step=policies,
                   how=("one greedy decode step with budgets=... captured in a CUDA graph (StaticCache prefilled)"
                        if spec.mode == "graph" else "fm.generate(ids, budgets=...)")
                   + " against the 16 at full width and the 4 groups of 4 in sequence (each at its uniform "
                     "subnet); groups_ms_per_step is their sum. decode_policy: FLEXTRON_BUDGET_DECODE (kernels: "
                     "the grouped kernels; masked: the dense ops at the widest budget, the rest zeroed; eager: masked "
                     "outside graph capture and compilation); "
                     "policies_ms_per_step: the same call under each"
                   + ("; eager: every call of the row interleaved, one call each per round, the order reversed "
                      "every other round" if spec.mode == "eager" else ""))
        if static:
            res["full_compiled"] = full.get("compiled")
        return res


    def budgets_prefill_row(self, target: Target, spec: RowSpec) -> dict:
        """One forward of the 16 prompts with per-request budgets, against the same forward at full width and the
        four groups' forwards (each at its uniform subnet) one after another; eager, or each captured in a graph."""
        fm = target.forward
        ids = self._ids(spec.batch, spec.seq_len, seed=4242)
        kw = dict(use_cache=False, logits_to_keep=1)
        graph = spec.mode == "graph"

        def timed(call) -> float:
            return statistics.median(self._timed_forward(call, fm.model, graph))

        def mixed() -> float:
            if graph:  # the budgets' tensors live on the modules while the graph is captured and replayed
                with fm._budgets(None, list(BUDGETS), spec.batch):
                    return timed(lambda: fm.model(input_ids=ids, **kw))
            return timed(lambda: fm(input_ids=ids, budgets=list(BUDGETS), **kw))

        import flextron.layers

        runs = flextron.layers.RUNS_ENABLED
        with torch.no_grad():
            ms = mixed()
            one_batch = None
            if runs:  # the same call with every prompt in one batch (FLEXTRON_BUDGET_RUNS=0): the A/B of the runs
                flextron.layers.RUNS_ENABLED = False
                try:
                    one_batch = mixed()
                finally:
                    flextron.layers.RUNS_ENABLED = True
            full = timed(lambda: fm(input_ids=ids, **kw))
            groups, group_ms = {}, 0.0
            for f in dict.fromkeys(BUDGETS):
                rows = [i for i, b in enumerate(BUDGETS) if b == f]
                part = ids[rows[0]:rows[-1] + 1]
                fm.set_subnet(None if f == 1.0 else fm.uniform_subnet(f, f))
                try:
                    g = timed(lambda part=part: fm(input_ids=part, **kw))
                finally:
                    fm.set_subnet(None)
                groups[str(f)] = g
                group_ms += g
        return {"budgets": list(BUDGETS), "seq_len": spec.seq_len, "ms": ms, "ms_per_forward": ms,
                "tokens_per_s": spec.batch * spec.seq_len * 1e3 / ms, "full_ms": full, "groups_ms": group_ms,
                "groups": groups, "runs": runs, "one_batch_ms": one_batch,
                "how": "one forward of the 16 prompts (use_cache=False, logits_to_keep=1) with budgets=..., against "
                       "the 16 at full width and the 4 groups of 4 in sequence (each at its uniform subnet); "
                       "groups_ms is their sum. runs: whether long prompts ran each run of equal budgets at its own "
                       "width (FLEXTRON_BUDGET_RUNS); one_batch_ms: the same call with that off"}


def _compile_config(module) -> dict | None:
    cfg = getattr(module.generation_config, "compile_config", None)
    if cfg is None:
        with contextlib.suppress(Exception):
            cfg = module._default_compile_config()
    if cfg is None:
        return None
    return {k: v for k, v in cfg.to_dict().items() if isinstance(v, (str, int, float, bool, type(None)))}


def describe(row: dict) -> str:
    head = f"{row['shape']:<10} {row['provider']:<17} {row['phase']:<8} {row['mode']:<15} b{row['batch']:<3}"
    if row.get("error"):
        return f"{head} ERROR {row['error'][:160]} ({row.get('elapsed_s', 0):.0f} s)"
    unit = "ms/step" if row["phase"] == "decode" else "ms/forward"
    extra = ""
    if row.get("compiled") is False:
        extra += " NOT COMPILED"
    if row.get("graph_breaks"):
        extra += f" ({row['graph_breaks']} graph breaks, {row['graphs_compiled']} graphs)"
    if row.get("graphs_compiled_in_timed_calls"):
        extra += f" (recompiled {row['graphs_compiled_in_timed_calls']}x while timed)"
    if row["provider"] == "fm-budgets":
        full = row.get("full_ms_per_step", row.get("full_ms"))
        groups = row.get("groups_ms_per_step", row.get("groups_ms"))
        extra += f", full {full:.3f}, groups {groups:.3f}"
    mem = f", peak {row['peak_mem_gib']:.1f} GiB" if row.get("peak_mem_gib") else ""
    return (f"{head} {row['ms']:9.3f} {unit}, {row['tokens_per_s']:10.0f} tok/s{mem}{extra} "
            f"({row['elapsed_s']:.0f} s)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results", help="folder of the results file")
    p.add_argument("--shapes", default=None, help=f"comma list of {', '.join(SHAPES)} (default llama2-7b)")
    p.add_argument("--providers", default=",".join(PROVIDERS),
                   help=f"comma list of {', '.join(PROVIDERS)}; fm-adaptive = fm-random-widths (default all)")
    p.add_argument("--phases", default="prefill,decode", help="comma list of prefill, decode")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of eager, static-compile, graph "
                   "(prefill: eager and graph)")
    p.add_argument("--batches", default=None, help="decode batch sizes (default 1,16,64)")
    p.add_argument("--prefill", default=None, help="prefill BATCHxTOKENS list (default 4x1024,1x4096)")
    p.add_argument("--prompt-len", type=int, default=None, help="decode prompt tokens (default 512)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per sequence (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row; the median is reported")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--quick", action="store_true",
                   help="llama-1b, batches 1 and 16, prefill 2x512, 32 tokens after 128 (its own results file)")
    p.add_argument("--merge", action="store_true",
                   help="update the rows of an existing results file by (shape, provider, phase, mode, batch)")
    p.add_argument("--paired", action="store_true",
                   help="also time each eager decode comparison interleaved (fm-X against ext-X, fm-full against the "
                        "plain HF model exported at full width): generate calls alternate A B A B..., so drift of "
                        "the host or the GPU over the run falls on both sides alike; rows pair-X")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="start no row after this many seconds; the skipped rows are printed")
    args = p.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.new_tokens < 2 or args.prompt_len < 1 or args.repeats < 1:
        p.error("--new-tokens must be >= 2, --prompt-len and --repeats >= 1")
    return args


def resolve(args: argparse.Namespace, shapes: dict[str, dict]) -> list[RowSpec]:
    """The rows an argument set asks for (``ValueError`` naming a bad option)."""
    names = parse_list(args.shapes, tuple(shapes), "shapes")
    providers = parse_providers(args.providers)
    phases = parse_list(args.phases, PHASES, "phases")
    modes = parse_list(args.modes, MODES, "modes")
    try:
        batches = [int(b) for b in parse_list(args.batches, None, "batches")]
    except ValueError as e:
        raise ValueError(f"--batches: {e}") from None
    return plan(names, providers, phases, modes, batches, parse_prefill(args.prefill), args.prompt_len)


def main(argv: list[str] | None = None, *, device: str | None = None, shapes: dict[str, dict] | None = None) -> int:
    """Command line entry; ``device``/``shapes`` let a CPU test run tiny shapes (graph rows become errors)."""
    args = parse_args(argv)
    shapes = {**SHAPES, **(shapes or {})}
    try:
        specs = resolve(args, shapes)
    except ValueError as e:
        print(f"bench_end_to_end.py: error: {e}", file=sys.stderr)
        return 2
    if device is None:
        if not torch.cuda.is_available():
            raise SystemExit("bench_end_to_end.py needs a CUDA GPU")
        device = "cuda"
    runner = Runner(args, torch.device(device), shapes)
    print(f"{len(specs)} rows -> {runner.path}", flush=True)
    runner.run(specs)
    runner.write()
    print(f"wrote {runner.path}")
    if runner.done:
        print("seconds per row (warm-up and compile included):")
        for r in runner.done:
            print(f"  {r['elapsed_s']:7.1f}  {key_str(row_key(r))}")
        total: dict[tuple, float] = {}
        for r in runner.done:
            total[(r["provider"], r["phase"], r["mode"])] = total.get((r["provider"], r["phase"], r["mode"]), 0) \
                + r["elapsed_s"]
        print("seconds per provider, phase and mode: " + ", ".join(
            f"{p} {ph} {m} {s:.0f}" for (p, ph, m), s in total.items()))
        print(f"total {time.monotonic() - runner.t0:.0f} s")
    if runner.skipped:
        print(f"skipped {len(runner.skipped)} rows (--time-limit {args.time_limit:g} s); rerun them with --merge:")
        for k in runner.skipped:
            print(f"  {k}")
    data = json.loads(runner.path.read_text())
    s = data["summary"]
    print(f"targets met: {s['targets_met']} of {s['targets_total']}")
    for t in s["missed"]:
        print(f"  missed: {t['row']}: {t['name']} = {t['value']:.3f} (goal {t['goal']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
