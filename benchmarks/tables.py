"""Markdown tables of the current benchmark figures, generated from ``benchmarks/results/*.json``.

For every benchmark kind and GPU the newest result file (by the date recorded in it) is current; each table is
headed by that file's GPU, versions, commit and date, the commit linking to the file. Older files of the same kind
and GPU are ignored (git history keeps them). The latency tables are the one kind merged across files: a run may
time only some phases, so each phase comes from the newest file that has it.

    python benchmarks/tables.py                                   # print every table
    python benchmarks/tables.py --kind nested_mlp                 # one benchmark
    python benchmarks/tables.py --update benchmarks/README.md     # rewrite the generated block in place
    python benchmarks/tables.py --check benchmarks/README.md      # exit 1 if that block is out of date

``--update``/``--check`` act on the text between ``<!-- tables.py:begin -->`` and ``<!-- tables.py:end -->``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BEGIN, END = "<!-- tables.py:begin -->", "<!-- tables.py:end -->"

# File-name prefixes of each kind, longest first so that ``nested_mlp_explore_`` is not read as ``nested_mlp_``.
KINDS = [
    ("nested_mlp_profile_bwd", "nested_mlp --profile-bwd (per-kernel times)"),
    ("nested_mlp_explore", "nested_mlp --explore (variant sweep)"),
    ("nested_mlp_host", "nested_mlp --host (host time per call)"),
    ("nested_mlp", "nested_mlp"),
    ("elastic_attention_decode_sweep", "elastic_attention --decode-sweep"),
    ("elastic_attention", "elastic_attention"),
    ("explore_sliced_linear", "explore_sliced_linear (kernel-variant sweep)"),
    ("sliced_linear", "sliced_linear"),
    ("latency_table", "latency tables and budgets"),
    ("compile", "whole model, eager and torch.compile"),
    ("end_to_end_quick", "end-to-end prefill and generation, --quick"),
    ("end_to_end_budgets", "end-to-end: per-request budgets in one batch (a run of its own)"),
    ("end_to_end_b16", "end-to-end: decode at batch 16, every mode (a run of its own)"),
    ("end_to_end", "end-to-end prefill and generation"),
    ("routing", "nested_mlp routing (rank count vs torch.sort)"),
    ("bf16_drift", "bf16 hidden-state drift"),
    ("train_multi", "training throughput under torchrun, DDP or FSDP2 (flextron train)"),
    ("train", "training throughput (flextron train)"),
    ("distill_loss", "distill_cross_entropy (the training loss)"),
]
MAIN = ["sliced_linear", "nested_mlp", "elastic_attention", "compile", "latency_table"]


@dataclass
class Result:
    """One results file: its kind, GPU, versions, commit and date, and the parsed JSON."""

    path: Path
    kind: str
    gpu: str
    commit: str
    date: str
    torch: str = ""
    triton: str = ""
    data: dict = field(default_factory=dict)


def kind_of(name: str) -> str:
    """The benchmark kind of a results file name (``nested_mlp_NVIDIA_H100_80GB_HBM3.json`` -> ``nested_mlp``)."""
    for prefix, _ in KINDS:
        if name.startswith(prefix + "_"):
            return prefix
    return re.split(r"_(?:NVIDIA|\d{8}T)", Path(name).stem, maxsplit=1)[0]


def norm_date(value: str) -> str:
    """ISO-like ``YYYY-MM-DDTHH:MM:SS`` from either ``2026-12-04T19:13:20+00:00`` or ``20261205T221715Z``."""
    m = re.match(r"(\d{4})-?(\d{2})-?(\d{2})T?(\d{2}):?(\d{2}):?(\d{2})", value or "")
    return "{}-{}-{}T{}:{}:{}".format(*m.groups()) if m else ""


def load(path: Path) -> Result | None:
    """Parse one results file; None when it is not a JSON object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    info = data.get("info") if isinstance(data.get("info"), dict) else data
    gpu = str(info.get("gpu") or data.get("gpu") or data.get("device") or "unknown GPU")
    commit = str(info.get("commit") or data.get("commit") or "")
    if not commit:
        m = re.search(r"_([0-9a-f]{7,40})$", path.stem)
        commit = m.group(1) if m else ""
    date = norm_date(str(info.get("date") or data.get("date") or "")) or norm_date(path.stem.rsplit("_", 1)[-1])
    return Result(path, kind_of(path.name), gpu, commit[:7], date, str(info.get("torch", "")),
                  str(info.get("triton", "")), data)


def current(results: Iterable[Result]) -> dict[tuple[str, str], list[Result]]:
    """(kind, GPU) -> its files, newest first. The first is the current one."""
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.kind, r.gpu), []).append(r)
    for rs in groups.values():
        rs.sort(key=lambda r: (r.date, r.path.name), reverse=True)
    return groups


def header(r: Result, link_base: str) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in (("torch", r.torch), ("triton", r.triton)) if v)
    link = f"{link_base}{r.path.name}"
    commit = f"commit [{r.commit}]({link})" if r.commit else f"[{r.path.name}]({link})"
    return f"**{r.gpu}**" + (f", {versions}" if versions else "") + f", {commit}, {r.date[:10] or 'undated'}."


def fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:{spec}}{suffix}"


def span(values: list[float], suffix: str = "x") -> str:
    """``lo–hi`` of finite values (one value alone), ``–`` when there are none."""
    v = [x for x in values if isinstance(x, (int, float)) and math.isfinite(x)]
    if not v:
        return "–"
    lo, hi = min(v), max(v)
    return f"{lo:.2f}{suffix}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}–{hi:.2f}{suffix}"


def geomean(values: list[float]) -> float | None:
    v = [x for x in values if isinstance(x, (int, float)) and math.isfinite(x) and x > 0]
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else None


def table(head: list[str], rows: list[list[str]], right_from: int = 1) -> list[str]:
    align = ["---" if i < right_from else "---:" for i in range(len(head))]
    return ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def sliced_linear(r: Result) -> list[str]:
    """Speed against cuBLAS on the slice, per token count and pass, over every weight and width."""
    rows = r.data.get("rows", [])
    if rows and "speed_vs_cublas" in rows[0]:
        return sliced_linear_vs_view(r)
    groups = {}
    for row in rows:
        groups.setdefault((row.get("T"), row.get("mode")), []).append(row)
    out = []
    for (t, mode), rs in sorted(groups.items(), key=lambda kv: (kv[0][1] != "fwd", kv[0][0])):
        eager = [x.get("speed_vs_copy") for x in rs]
        graph = [x.get("graph_speed_vs_copy") for x in rs if x.get("graph_ms")]
        floor = [x.get("graph_vs_floor", x.get("vs_floor")) for x in rs]
        out.append([mode, str(t), span(eager), fmt(geomean(eager), ".2f", "x"), span(graph),
                    fmt(geomean(graph), ".2f", "x"), fmt(geomean(floor), ".2f", "x")])
    s = r.data.get("summary", {})
    c = r.data.get("ceilings", {})
    lines = table(["pass", "tokens", "speed vs cuBLAS copy, eager", "geomean", "CUDA graph", "geomean",
                   "time / floor (geomean)"], out, right_from=1)
    extra = []
    if "max_peak_extra_bytes_flextron" in s:
        extra.append(f"peak memory beyond the output: at most {s['max_peak_extra_bytes_flextron']:.0f} bytes")
    if c:
        extra.append(f"measured ceilings: copy {c.get('copy_bytes_per_s', 0) / 1e12:.2f} TB/s, "
                     f"bf16 matmul {c.get('bf16_flops_per_s', 0) / 1e12:.0f} TFLOP/s")
    weights = sorted({x.get("weight") for x in rows if x.get("weight")})
    widths = sorted({x.get("width") for x in rows if x.get("width") is not None})
    extra.append(f"{len(rows)} cases: {', '.join(weights)} at widths {', '.join(f'{w:g}' for w in widths)}")
    return lines + ["", "; ".join(extra) + "."]


def sliced_linear_vs_view(r: Result) -> list[str]:
    """Results that time cuBLAS on the strided view of the slice (what a user calls), eager and from graphs."""
    groups: dict = {}
    for row in r.data.get("rows", []):
        groups.setdefault((row.get("T"), row.get("mode")), []).append(row)
    out = []
    for (t, mode), rs in sorted(groups.items(), key=lambda kv: (kv[0][1] != "fwd", kv[0][0])):
        eager = [x.get("speed_vs_cublas") for x in rs]
        graph = [x.get("graph_speed_vs_cublas") for x in rs]
        out.append([mode, str(t), span(eager), fmt(geomean(eager), ".2f", "x"), span(graph),
                    fmt(geomean(graph), ".2f", "x")])
    s = r.data.get("summary", {})
    lines = table(["pass", "tokens", "speed vs cuBLAS on the slice, eager", "geomean", "CUDA graph", "geomean"], out)
    extra = []
    if "max_peak_extra_bytes_flextron" in s:
        extra.append(f"peak memory beyond the output: at most {s['max_peak_extra_bytes_flextron']:.0f} bytes")
    target = s.get("target_min_speed_vs_cublas")
    if isinstance(target, list) and len(target) == 2:
        extra.append(f"target >= {target[0]}x in every case: {'met' if target[1] else 'not met'}")
    return lines + (["", "; ".join(extra) + "."] if extra else [])


NESTED_MODELS = ("llama2-7b", "llama3-8b")


def ms(case: dict, provider: str) -> float | None:
    return case.get("ms", {}).get(provider)


def nested_mlp(r: Result) -> list[str]:
    """Per pass, token count and width mix; each cell ``Llama-2-7B / Llama-3-8B``."""
    cases = r.data.get("cases", [])
    models = [m for m in NESTED_MODELS if any(c.get("model") == m for c in cases)] or sorted(
        {c.get("model", "") for c in cases})
    groups: dict = {}
    for c in cases:
        groups.setdefault((c.get("pass"), c.get("T"), c.get("mix")), {})[c.get("model", "")] = c

    def cell(by_model: dict, fn: Callable[[dict], float | None]) -> str:
        vals = [fn(by_model[m]) if m in by_model else None for m in models]
        return " / ".join(fmt(v, ".2f", "x") for v in vals) if any(v is not None for v in vals) else "–"

    mixes = {"uniform": 0, "skewed": 1, "full": 2}
    out = []
    for (p, t, mix), by_model in sorted(groups.items(), key=lambda kv: (kv[0][0] != "fwd", kv[0][1],
                                                                         mixes.get(kv[0][2], 9))):
        out.append([p, str(t), mix,
                    cell(by_model, lambda c: ratio(ms(c, "dense"), ms(c, "flextron"))),
                    cell(by_model, lambda c: ratio(ms(c, "flextron"), ms(c, "ideal"))),
                    cell(by_model, lambda c: ratio(ms(c, "flextron_graph"), ms(c, "dense_graph"))),
                    cell(by_model, lambda c: ratio(ms(c, "flextron_graph"), ms(c, "ideal")))])
    names = " / ".join(models)
    return table(["pass", "tokens", "mix", f"speed vs dense, eager ({names})", "time / ideal, eager",
                  "CUDA graph: time / dense", "CUDA graph: time / ideal"], out, right_from=3) + [
        "", f"{r.data.get('dtype', '')}; {r.data.get('timing', '')}; CUDA-graph columns up to 2048 tokens."]


def elastic_attention(r: Result) -> list[str]:
    rows = r.data.get("rows", [])
    if rows and isinstance(rows[0].get("ms"), dict):
        return elastic_attention_vs_default(r)
    by = lambda k: [x for x in rows if x.get("kind") == k]
    out = ["Prefill and backward (causal, head dim " + str(r.data.get("head_dim", "")) + ", "
           + str(r.data.get("hq", "")) + " query heads), speed against SDPA flash on the same kept heads, "
           "over kept heads 8-32:", ""]
    pre: dict = {}
    for x in by("prefill") + by("backward"):
        pre.setdefault((x.get("hkv"), x.get("B"), x.get("S")), {}).setdefault(x.get("kind"), []).append(x)
    rows_out = []
    for (hkv, b, s), kinds in sorted(pre.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        p, bw = kinds.get("prefill", []), kinds.get("backward", [])
        rows_out.append([str(hkv), f"{b} x {s}", span([x.get("speed_vs_sdpa_prefix") for x in p]),
                         span([x.get("speed_vs_sdpa_prefix_graph") for x in p]),
                         span([x.get("speed_vs_sdpa_prefix") for x in bw])])
    out += table(["KV heads", "batch x tokens", "prefill, eager", "prefill, CUDA graph", "backward, eager"],
                 rows_out, right_from=2)
    mixed = by("mixed")
    if mixed:
        out += ["", "Mixed per-sequence head budgets (8/16/24/32 of 32) in one launch:", ""]
        out += table(["KV heads", "batch x tokens", "ms", "speed vs SDPA on all heads", "vs SDPA per budget group"],
                     [[str(x.get("hkv")), f"{x.get('B')} x {x.get('S')}", fmt(x.get("flextron_ms"), ".3f"),
                       fmt(x.get("speed_vs_sdpa_all"), ".2f", "x"), fmt(x.get("speed_vs_sdpa_groups"), ".2f", "x")]
                      for x in mixed], right_from=2)
    dec = by("decode")
    if dec:
        out += ["", "Decode (one query token per sequence against its cache; CUDA graph replays, L2 flushed):", ""]
        out += table(["KV heads", "batch", "context", "ms", "SDPA on the cache ms", "speed vs SDPA",
                       "time / memory floor"],
                     [[str(x.get("hkv")), str(x.get("B")), str(x.get("ctx")), fmt(x.get("flextron_ms"), ".4f"),
                       fmt(x.get("sdpa_cache_ms"), ".4f"), fmt(x.get("speed_vs_sdpa"), ".2f", "x"),
                       fmt(x.get("ratio_to_floor"), ".2f", "x")]
                      for x in sorted(dec, key=lambda x: (-x.get("hkv", 0), x.get("ctx", 0), x.get("B", 0)))],
                     right_from=1)
    targets = r.data.get("targets", {})
    if targets:
        out += ["", "Targets recorded by the run:", ""]
        out += table(["target", "measured", "goal", "met"],
                     [[k, fmt(v[0], ".3f"), str(v[1]), "yes" if v[2] else "no"]
                      for k, v in targets.items() if isinstance(v, list) and len(v) == 3 and v[1] != "info"],
                     right_from=1)
    return out


def _eager_graph(values: list[dict | None]) -> str:
    eager = [v.get("eager") for v in values if v]
    graph = [v.get("graph") for v in values if v and v.get("graph") is not None]
    return f"{span(eager)} / {span(graph)}"


def elastic_attention_vs_default(r: Result) -> list[str]:
    """Results against SDPA with torch's default backend, each figure eager / from CUDA graphs."""
    rows = r.data.get("rows", [])
    backends = sorted({x.get("sdpa_backend", "") for x in rows if x.get("sdpa_backend")})
    out = [f"Speed against `F.scaled_dot_product_attention` with the backend torch picks ({', '.join(backends)}), "
           f"head dim {r.data.get('head_dim', '')}, {r.data.get('hq', '')} query heads; each cell eager / CUDA graph, "
           "over kept heads 8-32:", ""]
    pre: dict = {}
    for x in rows:
        if x.get("kind") in ("prefill", "backward"):
            pre.setdefault((x.get("hkv"), x.get("B"), x.get("S")), {}).setdefault(x.get("kind"), []).append(x)
    body = []
    has_tma = any("triton_tma" in (x.get("speed_vs_sdpa") or x.get("speed_vs_sdpa_all") or {}) for x in rows)
    for (hkv, b, s), kinds in sorted(pre.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        p, bw = kinds.get("prefill", []), kinds.get("backward", [])
        tma = [x["speed_vs_sdpa"].get("triton_tma") for x in p]
        body.append([str(hkv), f"{b} x {s}", _eager_graph([x["speed_vs_sdpa"].get("flextron") for x in p]),
                     _eager_graph([x["speed_vs_sdpa"].get("triton") for x in p])]
                    + ([_eager_graph(tma)] if has_tma else [])
                    + [_eager_graph([x["speed_vs_sdpa"].get("flextron") for x in bw])])
    out += table(["KV heads", "batch x tokens", "prefill", "prefill, Triton kernel forced"]
                 + (["prefill, Triton TMA kernel forced"] if has_tma else []) + ["backward"], body, right_from=2)
    mixed = [x for x in rows if x.get("kind") in ("mixed", "decode")]
    if mixed:
        out += ["", "Mixed per-sequence budgets (8/16/24/32 of 32 heads, a quarter of the batch each) against SDPA on "
                "all heads, eager / CUDA graph:", ""]
        body = []
        for x in mixed:
            sp = x.get("speed_vs_sdpa_all", {})
            size = f"{x.get('B')} x {x.get('S')}" if x["kind"] == "mixed" else f"{x.get('B')}, {x.get('ctx')} cached"
            provs = ("triton",) + (("triton_tma",) if has_tma else ()) + ("list", "grouped", "grouped_scattered",
                                                                          "decode")
            body.append([x["kind"], str(x.get("hkv")), size] + [
                _eager_graph([sp.get(p)]) if sp.get(p) else "–" for p in provs])
        out += table(["pass", "KV heads", "batch", "Triton, one launch"]
                     + (["Triton TMA, one launch"] if has_tma else [])
                     + ["host list (default dispatch)", "SDPA per group (adjacent)", "SDPA per group (scattered)",
                        "decode kernel"], body, right_from=3)
    targets = r.data.get("targets", {})
    if targets:
        out += ["", "Targets recorded by the run:", ""]
        out += table(["target", "measured", "goal", "met"],
                     [[k, fmt(v[0], ".3f"), str(v[1]), "yes" if v[2] else "no"] for k, v in targets.items()
                      if isinstance(v, list) and len(v) == 3 and v[1] != "range"], right_from=1)
        def ranges(prefix):
            return [(k.rsplit("_", 1)[-1], v[0]) for k, v in targets.items()
                    if k.startswith(prefix) and isinstance(v, list) and len(v) == 3 and v[1] == "range"]

        noise = ranges("noise_floor")
        if noise:
            out += ["", "Noise floor: the baseline's SDPA call timed again as a provider of its own, speed against "
                    "itself over the prefill cases: " + ", ".join(f"{m} {span(v)}" for m, v in noise) + "."]
        every = ranges("mixed_decode_all_shapes")
        if every:
            out += ["", "Decode kernel with mixed budgets over every decode shape (the target counts the mixed "
                    "shapes; an eager call of a small step is bound by its host time): "
                    + ", ".join(f"{m} {span(v)}" for m, v in every) + "."]
    return out


COMPILE_PROVIDERS = [
    ("hf_eager", "dense HF model, eager"),
    ("hf_reduce_overhead", "dense HF model, reduce-overhead"),
    ("full_eager", "FlextronModel at full width, eager"),
    ("full_reduce_overhead", "FlextronModel at full width, reduce-overhead"),
    ("flextron_eager", "sub-network, eager"),
    ("flextron_compiled", "sub-network, torch.compile default"),
    ("flextron_reduce_overhead", "sub-network, reduce-overhead"),
]


def compile_table(r: Result) -> list[str]:
    rows = r.data.get("rows", [])
    cfg = r.data.get("config", {})
    sub = r.data.get("subnet", {})
    ts = [x.get("T") for x in rows]
    out_rows = []
    for key, name in COMPILE_PROVIDERS:
        vals = [x.get("ms_per_call", {}).get(key) for x in rows]
        if any(v is not None for v in vals):
            out_rows.append([name] + [fmt(v, ".3f") for v in vals])
    model = (f"Llama-shaped, {cfg.get('num_hidden_layers')} layers, hidden {cfg.get('hidden_size')}, "
             f"MLP {cfg.get('intermediate_size')}, {cfg.get('num_attention_heads')} heads, random weights, bf16")
    subnet = ""
    if sub.get("mlp") and sub.get("heads"):
        subnet = (f"; the sub-network keeps MLP {sub['mlp'][0]} and {sub['heads'][0]} heads per layer, with "
                  f"per-token MLP widths ({sub.get('token_widths', '')})")
    return [f"ms per forward call, batch 1 ({model}{subnet}):", ""] + table(
        ["provider"] + [f"{t} tokens" for t in ts], out_rows, right_from=1)


E2E_MODES = {"eager": 0, "static-compile": 1, "graph": 2}


def end_to_end(r: Result) -> list[str]:
    """Whole models per phase, batch and mode: times of the dense HF model and the FlextronModel at full width, the
    ratios the targets are set on, and per-request budgets; then the targets met and the rows that failed."""
    rows = [x for x in r.data.get("rows", []) if isinstance(x, dict)]
    st = r.data.get("settings", {})
    index = {(x.get("shape"), x.get("provider"), x.get("phase"), x.get("mode"), x.get("batch")): x for x in rows}
    shapes = r.data.get("shapes", {})
    names = ", ".join(f"{k} ({v.get('parameters', 0) / 1e9:.1f}B)" for k, v in shapes.items())
    out = [f"Random-weight bf16 models {names}; sub-networks keep 75/50/25% of every layer's MLP neurons and heads. "
           f"Decode: ms per greedy step of `generate`, {st.get('new_tokens')} tokens after a {st.get('prompt_len')}"
           "-token prompt (prefill excluded); prefill: ms per forward. Time ratios: at most 1.05x is the target; "
           "speed-ups: fm-50 >= 1.5x under static-compile and graph (ext-50 vs hf: what the same sub-network gains "
           "as a plain dense model, the bound of that ratio).", ""]
    keys = sorted({(x.get("shape"), x.get("phase"), x.get("batch"), x.get("mode"), x.get("seq_len"))
                   for x in rows if x.get("provider") != "fm-budgets" and not str(x.get("provider")).startswith(
                       "pair-") and x.get("ms")},
                  key=lambda k: (list(shapes).index(k[0]) if k[0] in shapes else 99, k[1] != "prefill",
                                 k[2] or 0, -(k[4] or 0), E2E_MODES.get(k[3], 9)))

    def val(shape, provider, phase, mode, batch, field="ms"):
        x = index.get((shape, provider, phase, mode, batch))
        return x.get(field) if x else None

    body = []
    for shape, phase, batch, mode, seq in keys:
        cell = lambda p, f="ms", k=(shape, phase, mode, batch): val(k[0], p, k[1], k[2], k[3], f)
        row = [shape, phase, f"{batch} x {seq}" if phase == "prefill" else str(batch), mode,
               fmt(cell("hf"), ".2f"), fmt(cell("fm-full"), ".2f"), fmt(ratio(cell("fm-full"), cell("hf")), ".2f", "x")]
        row += [fmt(ratio(cell(f"fm-{w}"), cell(f"ext-{w}")), ".2f", "x") for w in (75, 50, 25)]
        row += [fmt(ratio(cell("fm-full"), cell(p)), ".2f", "x") for p in ("fm-50", "fm-random-widths")]
        row.insert(-1, fmt(ratio(cell("hf"), cell("ext-50")), ".2f", "x"))
        body.append(row)
    out += table(["model", "phase", "batch", "mode", "hf ms", "fm-full ms", "fm-full / hf", "fm-75 / ext-75",
                  "fm-50 / ext-50", "fm-25 / ext-25", "fm-50 speed-up", "ext-50 speed-up vs hf",
                  "random widths speed-up"], body, right_from=4)
    pairs = [x for x in rows if str(x.get("provider")).startswith("pair-") and x.get("ratio")]
    if pairs:
        out += ["", "Eager decode timed interleaved (`--paired`): `generate` of A and B alternating, medians, so drift "
                "over the run falls on both (ms per decode step):", ""]
        out += table(["model", "batch", "A", "B", "A ms", "B ms", "A / B"],
                     [[x.get("shape"), str(x.get("batch")), str(x.get("a")), str(x.get("b")), fmt(x.get("ms"), ".2f"),
                       fmt(x.get("b_ms"), ".2f"), fmt(x.get("ratio"), ".3f", "x")] for x in pairs], right_from=4)
    budgets = [x for x in rows if x.get("provider") == "fm-budgets" and x.get("ms")]
    if budgets:
        out += ["", "Per-request budgets: 16 sequences at 25/50/75/100% (four each) in one batch, against the same 16 "
                "at full width and the four groups of 4 run one after another (decode: ms per step; prefill: ms per "
                "forward of the 16 prompts):", ""]

        def both(x, name):
            return x.get(f"{name}_ms_per_step", x.get(f"{name}_ms"))

        # prefill rows that also timed every prompt in one batch (the per-run path's A/B) get two more columns
        one = any(x.get("one_batch_ms") for x in budgets)
        # decode rows timed under both decode policies (FLEXTRON_BUDGET_DECODE) get their figures and ratio
        pol = any(len(x.get("policies_ms_per_step") or {}) > 1 for x in budgets)

        def policy(x, name):
            return (x.get("policies_ms_per_step") or {}).get(name)

        out += table(["model", "phase", "mode", "budgets", "full width", "groups in sequence", "speed-up vs full",
                      "vs groups"] + (["one batch", "per-run vs one batch"] if one else [])
                     + (["decode policy", "kernels", "masked", "masked vs kernels"] if pol else []),
                     [[x.get("shape"), x.get("phase"), x.get("mode"), fmt(x.get("ms"), ".2f"),
                       fmt(both(x, "full"), ".2f"), fmt(both(x, "groups"), ".2f"),
                       fmt(ratio(both(x, "full"), x.get("ms")), ".2f", "x"),
                       fmt(ratio(both(x, "groups"), x.get("ms")), ".2f", "x")]
                      + ([fmt(x.get("one_batch_ms"), ".2f"), fmt(ratio(x.get("one_batch_ms"), x.get("ms")), ".2f", "x")]
                         if one else [])
                      + ([x.get("decode_policy") or "–", fmt(policy(x, "kernels"), ".2f"),
                          fmt(policy(x, "masked"), ".2f"),
                          fmt(ratio(policy(x, "kernels"), policy(x, "masked")), ".2f", "x")] if pol else [])
                      for x in sorted(budgets, key=lambda x: (x.get("phase") != "prefill",
                                                              E2E_MODES.get(x.get("mode"), 9)))], right_from=3)
    s = r.data.get("summary", {})
    notes = []
    host = s.get("host_overhead_us_per_layer") or {}
    if host:
        notes.append("Eager host overhead per layer (fm-full - hf at decode batch 1): " + ", ".join(
            f"{k} {fmt(v, '.1f')} µs" for k, v in host.items()) + " (target <= 20 µs)")
    if s.get("targets_total"):
        missed = s.get("missed", [])
        notes.append(f"Targets met: {s.get('targets_met')} of {s.get('targets_total')}" + (
            "; missed: " + "; ".join(f"{t.get('row')}: {t.get('name')} = {fmt(t.get('value'), '.2f')}"
                                     for t in missed[:12]) + ("; ..." if len(missed) > 12 else "") if missed else ""))
    other = [x for x in rows if x.get("phase") == "decode" and x.get("ms") and st.get("new_tokens")
             and x.get("new_tokens") not in (None, st.get("new_tokens"))]
    if other:  # rows merged from runs with another --new-tokens (ms per step, over a longer or shorter cache)
        notes.append("Decode rows with another token count than above: " + "; ".join(
            f"{x.get('shape')} {x.get('provider')} {x.get('mode')} b{x.get('batch')} ({x.get('new_tokens')} tokens)"
            for x in other[:8]) + ("; ..." if len(other) > 8 else ""))
    broken = [x for x in rows if x.get("graph_breaks")]
    if broken:
        notes.append("Compiled with graph breaks (past Dynamo's recompile limit, eager): " + "; ".join(
            f"{x.get('shape')} {x.get('provider')} b{x.get('batch')} ({x.get('graph_breaks')} breaks)"
            for x in broken[:8]) + ("; ..." if len(broken) > 8 else ""))
    failed = [x for x in rows if x.get("error")]
    if failed:
        notes.append(f"{len(failed)} rows failed: " + "; ".join(
            f"{x.get('shape')} {x.get('provider')} {x.get('phase')} {x.get('mode')} b{x.get('batch')}"
            for x in failed[:8]) + ("; ..." if len(failed) > 8 else ""))
    return out + (["", ". ".join(notes) + "."] if notes else [])


def latency_table(rs: list[Result], link_base: str) -> list[str]:
    """Phases merged over the files, newest first: each phase from the newest file that timed it."""
    phases: dict[str, tuple[Result, dict]] = {}
    for r in rs:
        for name, p in (r.data.get("phases") or {}).items():
            phases.setdefault(name, (r, p))
    model = rs[0].data.get("model", {})
    out = [f"{model.get('layers')} layers, hidden {model.get('hidden')}, MLP {model.get('mlp')}, "
           f"{model.get('heads')} heads, {model.get('dtype')}, random weights. Table accuracy: predicted against "
           "measured whole-model latency of the full model and random sub-networks.", ""]
    order = sorted(phases, key=lambda n: (not n.startswith("prefill"), "eager" in n))
    acc = []
    for name in order:
        r, p = phases[name]
        v = p.get("validation", {})
        acc.append([name.replace("_", " "), fmt(100 * v.get("median_abs_rel_error", math.nan), ".1f", "%"),
                    fmt(100 * v.get("max_abs_rel_error", math.nan), ".1f", "%"),
                    fmt(100 * v.get("noise_floor_full_vs_full", math.nan), ".1f", "%"),
                    fmt(p.get("full_measured_ms"), ".1f"),
                    f"[{str(p.get('commit') or r.commit)[:7]}]({link_base}{r.path.name})"])
    out += table(["phase, timing", "median error", "worst error", "noise floor (full vs full)",
                  "full model ms", "file"], acc, right_from=1)
    targets = sorted({b.get("target") for _, p in phases.values() for b in p.get("budgets", [])})
    cols = [(n, m) for n in order for m in ("guarantee", "uniform_nearest")
            if any(b.get("mode") == m for b in phases[n][1].get("budgets", []))
            or (m == "guarantee" and phases[n][1].get("unreachable"))]
    if targets and cols:
        out += ["", "Budgets held: measured latency as a fraction of the full model's, per target "
                "(guarantee = the projection of the full model; uniform nearest = the uniform sub-network whose "
                "prediction is nearest the target; `unreachable` = the smallest sub-network is predicted above it):",
                ""]
        body = []
        for t in targets:
            row = [fmt(t, ".1f")]
            for n, m in cols:
                p = phases[n][1]
                hit = [b for b in p.get("budgets", []) if b.get("mode") == m and b.get("target") == t]
                miss = m == "guarantee" and any(u.get("target") == t for u in p.get("unreachable", []))
                row.append(fmt(hit[0].get("measured_fraction"), ".3f") if hit else ("unreachable" if miss else "–"))
            body.append(row)
        out += table(["target"] + [f"{n.replace('_', ' ')}: {m.replace('_', ' ')}" for n, m in cols], body)
    return out


def routing(r: Result) -> list[str]:
    return table(["tokens", "rank count µs", "torch.sort µs"],
                 [[str(x.get("T")), fmt(x.get("rank_us"), ".1f"), fmt(x.get("torch_sort_us"), ".1f")]
                  for x in r.data.get("rows", [])])


def train(r: Result) -> list[str]:
    rows = r.data.get("rows", [])
    dense = {x["shape"]: x for x in rows if x.get("mode") == "dense"}
    peak = (r.data.get("ceilings") or {}).get("bf16_flops_per_s")
    out = ["Training steps of `flextron train` (bf16 autocast, fp32 master weights), random token ids; FLOPs counted "
           "by torch's FlopCounterMode; utilisation against the bf16 matmul rate measured in the same run"
           + (f" ({peak / 1e12:.0f} TFLOP/s)" if peak else "") + ". elastic: full + smallest + 2 random subnets "
           "distilled from a frozen parent; dense: the full model alone, cross-entropy.", ""]
    out += table(["shape", "mode", "batch x tokens", "ms / step", "data tokens/s", "GFLOP / token", "TFLOP/s",
                  "utilisation", "vs dense tokens/s"],
                 [[x["shape"], x["mode"] + (f" ({x['loss']} loss)" if x.get("loss") else "")
                   + (f", {x['parallel']} on {x['world']} GPUs" if x.get("world", 1) > 1 else ""),
                   f"{x['batch']} x {x['seq_len']}", fmt(x.get("step_ms"), ".1f"),
                   fmt(x.get("tokens_per_s"), ",.0f"), fmt(x["flops_per_token"] / 1e9, ".3f"),
                   fmt(x.get("tflops_per_s"), ".1f"), fmt(x.get("utilisation_vs_measured_matmul"), ".1%"),
                   fmt(ratio(x.get("tokens_per_s"), dense.get(x["shape"], {}).get("tokens_per_s")), ".2f", "x")
                   if x.get("mode") != "dense" else "–"] for x in rows], right_from=3)
    return out


def distill_loss(r: Result) -> list[str]:
    rows = r.data.get("rows", [])

    def ms(x, key, p):
        return "out of memory" if p in x.get("errors", {}) else fmt(x.get(key, {}).get(p), ".3f")

    out = ["Forward+backward of the training loss alone on bf16 logits (alpha 0.5, T 1 with a teacher; "
           "cross-entropy alone without): `distill_cross_entropy` against the same loss in torch ops; ms eager / "
           "from a CUDA graph; floor: student and teacher logits read once, the gradient written once, at the "
           "measured copy bandwidth; peak memory beyond the inputs.", ""]
    out += table(["vocabulary", "tokens", "teacher", "flextron ms", "torch ms", "speed-up eager / graph",
                  "flextron / floor (graph)", "peak GiB flextron / torch"],
                 [[f"{x['vocab_of']} ({x['vocab']:,})", str(x["tokens"]), "yes" if x.get("teacher") else "no",
                   f"{ms(x, 'ms', 'flextron')} / {ms(x, 'graph_ms', 'flextron')}",
                   f"{ms(x, 'ms', 'torch')} / {ms(x, 'graph_ms', 'torch')}",
                   " / ".join(fmt(x.get(k), ".2f", "x") for k in ("speed_vs_torch_ms", "speed_vs_torch_graph_ms")),
                   fmt(x.get("flextron_graph_vs_floor"), ".2f", "x"),
                   " / ".join(fmt((x.get("peak_extra_bytes") or {}).get(p, 0) / 2**30, ".1f")
                              if p in (x.get("peak_extra_bytes") or {}) else "–" for p in ("flextron", "torch"))]
                  for x in rows], right_from=3)
    note = r.data.get("note")
    return out + (["", note] if note else [])


RENDER: dict[str, Callable[[Result], list[str]]] = {
    "train": train,
    "train_multi": train,
    "distill_loss": distill_loss,
    "sliced_linear": sliced_linear,
    "nested_mlp": nested_mlp,
    "elastic_attention": elastic_attention,
    "compile": compile_table,
    "end_to_end": end_to_end,
    "end_to_end_quick": end_to_end,
    "end_to_end_budgets": end_to_end,
    "end_to_end_b16": end_to_end,
    "routing": routing,
}


def render(results_dir: Path = RESULTS, kinds: list[str] | None = None, link_base: str = "results/") -> str:
    """Markdown for the current file of each (kind, GPU): the main benchmarks first, then an index of every
    current file. ``kinds`` limits the tables (the index always lists everything)."""
    loaded = [r for p in sorted(results_dir.glob("*.json")) if (r := load(p)) is not None]
    groups = current(loaded)
    titles = dict(KINDS)
    lines: list[str] = []
    ordered = MAIN + [k for k, _ in KINDS if k not in MAIN] + sorted({k for k, _ in groups} - set(titles))
    for kind in ordered:
        if kinds and kind not in kinds:
            continue
        gpus = sorted(g for k, g in groups if k == kind)
        if kind not in RENDER and kind != "latency_table":
            continue
        for gpu in gpus:
            rs = groups[(kind, gpu)]
            lines += [f"### {titles.get(kind, kind)} ({gpu})", ""]
            if kind == "latency_table":
                lines += [header(rs[0], link_base), ""] + latency_table(rs, link_base)
            else:
                lines += [header(rs[0], link_base), ""] + RENDER[kind](rs[0])
            lines.append("")
    if not kinds:
        lines += ["### Current result files", ""]
        idx = []
        for kind in ordered:
            for gpu in sorted(g for k, g in groups if k == kind):
                for r in groups[(kind, gpu)][: 2 if kind == "latency_table" else 1]:
                    idx.append([kind, gpu, r.date[:10] or "undated", f"[{r.path.name}]({link_base}{r.path.name})"])
        lines += table(["kind", "GPU", "date", "file"], idx, right_from=9) + [""]
    return "\n".join(lines).rstrip() + "\n"


def splice(text: str, block: str) -> str:
    """Replace what lies between the begin/end markers of ``text`` with ``block``."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"markers {BEGIN} ... {END} not found")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n\n{block}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of result JSON files")
    ap.add_argument("--kind", action="append", help="only this benchmark kind (repeatable)")
    ap.add_argument("--link-base", default="results/", help="prefix of links to result files")
    ap.add_argument("--update", type=Path, help="rewrite the generated block of this markdown file")
    ap.add_argument("--check", type=Path, help="exit 1 if the generated block of this markdown file is stale")
    args = ap.parse_args(argv)
    if not args.results.is_dir():
        print(f"tables.py: error: --results {args.results} is not a folder", file=sys.stderr)
        return 2
    block = render(args.results, args.kind, args.link_base)
    target = args.update or args.check
    if target is None:
        sys.stdout.write(block)
        return 0
    text = target.read_text()
    new = splice(text, block)
    if args.check:
        if new != text:
            print(f"{target}: generated tables are stale; run python benchmarks/tables.py --update {target}",
                  file=sys.stderr)
            return 1
        return 0
    target.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
