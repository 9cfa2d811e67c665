"""benchmarks/bench_end_to_end.py on the CPU: the model shapes (built on the meta device), the rows a command line
asks for, merging results files, the ratios and targets, the plain export of a sub-network whose head count
transformers' config refuses, a tiny eager sweep through the real code, and the Markdown table."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_end_to_end as e2e  # noqa: E402

from flextron import FlextronModel  # noqa: E402

TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, vocab_size=256)


@pytest.mark.parametrize("shape, billions, kv, vocab, theta", [
    ("llama2-7b", 6.738, 32, 32000, 10000.0), ("llama3-8b", 8.030, 8, 128256, 500000.0),
    ("llama-1b", 1.236, 8, 128256, 500000.0)])
def test_shapes_on_meta(shape, billions, kv, vocab, theta):
    model = e2e.build_model(shape, "meta")
    assert all(p.is_meta for p in model.parameters())
    assert e2e.parameter_count(model) / 1e9 == pytest.approx(billions, abs=2e-3)
    cfg = model.config
    assert (cfg.num_key_value_heads, cfg.vocab_size, cfg.num_attention_heads) == (kv, vocab, 32)
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta}
    assert rope["rope_theta"] == theta
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (shape == "llama-1b")
    assert next(model.parameters()).dtype == torch.bfloat16
    # The space makes 25/50/75% exact choices of every layer, and the uniform subnets keep exactly those.
    fm = FlextronModel.from_hf(model, e2e.make_space())
    full = cfg.intermediate_size
    assert fm.mlp_choices(0) == [full // 4, full // 2, 3 * full // 4, full]
    for f in (0.25, 0.5, 0.75):
        s = fm.uniform_subnet(f, f)
        assert set(s.mlp) == {int(f * full)} and set(s.heads) == {int(f * 32)}


def test_build_model_materialises_without_host_init():
    model = e2e.build_model(TINY | {"tie_word_embeddings": True}, "cpu", seed=3)
    weights = model.model.layers[0].mlp.up_proj.weight
    assert weights.dtype == torch.bfloat16 and torch.isfinite(weights.float()).all()
    assert weights.float().std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.equal(model.model.norm.weight.float(), torch.ones(TINY["hidden_size"]))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again after to_empty
    fresh = type(model.model.rotary_emb)(config=model.config)
    assert torch.equal(model.model.rotary_emb.inv_freq, fresh.inv_freq)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    again = e2e.build_model(TINY | {"tie_word_embeddings": True}, "cpu", seed=3)
    assert torch.equal(again.model.layers[0].mlp.up_proj.weight, weights)


def args(*argv):
    return e2e.parse_args(list(argv))


def test_plan_default_and_options():
    specs = e2e.resolve(args(), e2e.SHAPES)
    keys = [s.key for s in specs]
    assert len(keys) == len(set(keys)) == 122  # 9 providers x (2 prefill x 2 modes + 3 batches x 3 modes) + 5 budgets
    assert {s.shape for s in specs} == {"llama2-7b"}
    assert specs[0].provider == "hf" and specs[-1].provider == "fm-budgets"
    assert not [s for s in specs if s.phase == "prefill" and s.mode == "static-compile"]
    assert {(s.batch, s.seq_len) for s in specs if s.phase == "prefill" and s.provider != "fm-budgets"} == {
        (4, 1024), (1, 4096)}
    assert {(s.phase, s.mode, s.batch, s.seq_len) for s in specs if s.provider == "fm-budgets"} == {
        ("decode", "eager", 16, 512), ("decode", "static-compile", 16, 512), ("decode", "graph", 16, 512),
        ("prefill", "eager", 16, 512), ("prefill", "graph", 16, 512)}
    order = list(dict.fromkeys(s.provider for s in specs))
    assert order.index("fm-75") + 1 == order.index("ext-75")  # each sub-network beside its export
    quick = e2e.resolve(args("--quick"), e2e.SHAPES)
    assert {s.shape for s in quick} == {"llama-1b"}
    assert {s.batch for s in quick if s.phase == "decode" and s.provider != "fm-budgets"} == {1, 16}
    chunk = e2e.resolve(args("--providers", "fm-adaptive,hf", "--modes", "graph", "--phases", "decode",
                             "--batches", "64"), e2e.SHAPES)
    assert [(s.provider, s.mode, s.batch) for s in chunk] == [("hf", "graph", 64), ("fm-random-widths", "graph", 64)]
    assert e2e.resolve(args("--providers", "fm-budgets", "--modes", "static-compile", "--phases", "prefill"),
                       e2e.SHAPES) == []
    for bad, name in (("--providers=fm-40", "providers"), ("--modes=compile", "modes"), ("--shapes=gpt2", "shapes"),
                      ("--prefill=4by1024", "prefill")):
        with pytest.raises(ValueError, match=f"--{name}"):
            e2e.resolve(args(bad), e2e.SHAPES)


def row(provider, ms, phase="decode", mode="eager", batch=1, shape="s", **extra):
    return {"shape": shape, "provider": provider, "phase": phase, "mode": mode, "batch": batch, "ms": ms, **extra}


def test_merge_rows_replaces_by_key_and_keeps_the_rest():
    old = [row("hf", 1.0), row("fm-full", 2.0), row("hf", 3.0, batch=16)]
    new = [row("fm-full", 1.5), row("fm-50", 0.9)]
    merged = e2e.merge_rows(old, new)
    assert [(r["provider"], r["batch"], r["ms"]) for r in merged] == [
        ("hf", 1, 1.0), ("fm-full", 1, 1.5), ("hf", 16, 3.0), ("fm-50", 1, 0.9)]
    assert e2e.merge_rows([], new) == new


def test_evaluate_ratios_and_targets():
    rows = [row("hf", 10.0), row("fm-full", 10.4), row("fm-50", 5.0), row("ext-50", 4.0),
            row("hf", 4.0, mode="graph"), row("fm-full", 4.4, mode="graph"), row("fm-50", 2.5, mode="graph"),
            row("ext-50", 2.45, mode="graph"), row("fm-random-widths", 8.0),
            row("fm-budgets", 2.0, mode="static-compile", batch=16, full_ms_per_step=3.0, groups_ms_per_step=4.0),
            {**row("fm-25", None), "error": "OOM"}, row("fm-full", 9.0, batch=16, ratios={"stale": 1})]
    out, summary = e2e.evaluate(rows, {"s": 10})
    by = {e2e.row_key(r): r for r in out}

    def targets(key):
        return {t["name"]: (t["value"], t["met"]) for t in by[key].get("targets", [])}

    t = targets(("s", "fm-full", "decode", "eager", 1))
    assert t["fm-full time / hf"] == (pytest.approx(1.04), True)
    assert t["host overhead per layer (µs)"] == (pytest.approx(40.0), False)  # (10.4 - 10) ms / 10 layers
    assert summary["host_overhead_us_per_layer"] == {"s": pytest.approx(40.0)}
    t = targets(("s", "fm-50", "decode", "eager", 1))
    assert t == {"fm-50 time / ext-50": (pytest.approx(1.25), False)}  # no speed-up target in eager mode
    assert by[("s", "fm-50", "decode", "eager", 1)]["ratios"]["speedup_vs_full"] == pytest.approx(10.4 / 5.0)
    t = targets(("s", "fm-50", "decode", "graph", 1))
    assert t["fm-50 speed-up vs fm-full"] == (pytest.approx(1.76), True)
    assert t["fm-50 time / ext-50"][1] is True
    assert targets(("s", "fm-full", "decode", "graph", 1))["fm-full time / hf"][1] is False
    assert by[("s", "fm-random-widths", "decode", "eager", 1)]["ratios"] == {"speedup_vs_full": pytest.approx(1.3)}
    t = targets(("s", "fm-budgets", "decode", "static-compile", 16))
    assert t == {"budgets speed-up vs full width": (pytest.approx(1.5), True),
                 "budgets speed-up vs groups in sequence": (pytest.approx(2.0), True)}
    assert "targets" not in by[("s", "fm-25", "decode", "eager", 1)]
    assert "stale" not in by[("s", "fm-full", "decode", "eager", 16)].get("ratios", {})  # derived fields recomputed
    assert summary["targets_total"] == 8 and summary["targets_met"] == 5
    assert {m["row"] for m in summary["missed"]} == {"s fm-full decode eager b1", "s fm-50 decode eager b1",
                                                     "s fm-full decode graph b1"}


def test_plain_export_when_the_config_refuses_the_head_count():
    fm = FlextronModel.from_hf(e2e.build_model(TINY, "cpu", dtype=torch.float32), e2e.make_space())
    subnet = fm.uniform_subnet(0.75, 0.75)  # 6 of 8 heads: 128 % 6 != 0, so extract gives a slim FlextronModel
    assert isinstance(fm.extract(subnet), FlextronModel)
    plain, how = e2e.plain_export(fm, subnet)
    assert type(plain).__name__ == "LlamaForCausalLM" and "config refuses" in how
    assert plain.config.num_attention_heads == 6 and plain.config.intermediate_size == 192
    ids = torch.randint(1, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    fm.set_subnet(subnet)
    with torch.no_grad():
        want, got = fm(input_ids=ids).logits, plain(input_ids=ids).logits
    assert torch.linalg.norm(got - want) / torch.linalg.norm(want) < 1e-4
    plain, how = e2e.plain_export(fm, fm.uniform_subnet(0.5, 0.5))
    assert type(plain).__name__ == "LlamaForCausalLM" and how == "fm.extract: plain HF model"


def test_random_width_hooks_give_each_token_a_choice():
    fm = FlextronModel.from_hf(e2e.build_model(TINY, "cpu", dtype=torch.float32), e2e.make_space())
    seen = []
    m = fm.mlp_blocks[0]
    spy = m.register_forward_pre_hook(lambda mod, a, kw: seen.append(kw.get("widths")), with_kwargs=True)
    handles = e2e.random_width_hooks(fm, torch.device("cpu"))
    m._forward_pre_hooks.move_to_end(spy.id)  # after the random widths are set
    torch.manual_seed(0)
    with torch.no_grad():
        fm(input_ids=torch.randint(1, 256, (2, 40)), use_cache=False)
    for h in handles + [spy]:
        h.remove()
    w = seen[0]
    assert w.shape == (2, 40) and set(w.unique().tolist()) == set(fm.mlp_choices(0))


def run_tiny(tmp_path, *argv):
    common = ["--out", str(tmp_path), "--shapes", "tiny", "--batches", "1", "--prefill", "1x8", "--prompt-len", "4",
              "--new-tokens", "3", "--repeats", "1", "--modes", "eager"]
    assert e2e.main(common + list(argv), device="cpu", shapes={"tiny": TINY}) == 0
    return json.loads((tmp_path / "end_to_end_cpu.json").read_text())


def test_tiny_sweep_runs_and_merges(tmp_path):
    """Rows of every kind, then merges into the file (plain-torch paths: this test is about the rows)."""
    from flextron_kernels import cpu_reference

    with cpu_reference():
        data = run_tiny(tmp_path, "--providers", "hf,fm-full,fm-50,ext-50")
    assert data["bench"] == "end_to_end" and data["shapes"]["tiny"]["parameters"] == 361088
    rows = {e2e.row_key(r): r for r in data["rows"]}
    assert len(rows) == 8 and not [r for r in rows.values() if r.get("error")]
    dec = rows[("tiny", "fm-50", "decode", "eager", 1)]
    assert dec["subnet"] == {"mlp": 128, "heads": 4} and dec["ms"] > 0 and dec["prompt_len"] == 4
    assert math.isclose(dec["tokens_per_s"], 1e3 / dec["ms"])
    assert dec["ms"] == pytest.approx(statistics_median(dec["steps_ms"]))
    assert rows[("tiny", "ext-50", "prefill", "eager", 1)]["seq_len"] == 8
    assert "vs_ext" in dec["ratios"] and "vs_hf" in rows[("tiny", "fm-full", "prefill", "eager", 1)]["ratios"]
    # A second command adds its rows to the file (notes written into it by hand are kept); a third that may start
    # nothing skips every row.
    path = tmp_path / "end_to_end_cpu.json"
    path.write_text(json.dumps({**data, "notes": "two runs"}))
    data = run_tiny(tmp_path, "--providers", "fm-random-widths", "--phases", "prefill", "--merge")
    assert len(data["rows"]) == 9 and data["rows"][-1]["provider"] == "fm-random-widths"
    assert data["notes"] == "two runs"
    assert data["rows"][-1]["ratios"]["speedup_vs_full"] > 0
    data = run_tiny(tmp_path, "--providers", "hf", "--merge", "--time-limit", "0")
    assert len(data["rows"]) == 9 and data["skipped"] == ["tiny hf prefill eager b1", "tiny hf decode eager b1"]
    assert run_tiny(tmp_path, "--providers", "hf", "--phases", "prefill", "--time-limit", "0")["rows"] == []


def test_tiny_budgets_rows(tmp_path):
    """Per-request budgets through the real code: prefill (one forward of the 16 prompts) and decode, each against
    the 16 at full width and the four groups in sequence (plain-torch paths: this test is about the rows)."""
    from flextron_kernels import cpu_reference

    with cpu_reference():
        data = run_tiny(tmp_path, "--providers", "fm-budgets")
    rows = {e2e.row_key(r): r for r in data["rows"]}
    assert set(rows) == {("tiny", "fm-budgets", "prefill", "eager", 16), ("tiny", "fm-budgets", "decode", "eager", 16)}
    assert not [r for r in rows.values() if r.get("error")]
    pre = rows[("tiny", "fm-budgets", "prefill", "eager", 16)]
    assert pre["seq_len"] == 4 and pre["budgets"] == list(e2e.BUDGETS) and set(pre["groups"]) == {"0.25", "0.5",
                                                                                                  "0.75", "1.0"}
    assert pre["groups_ms"] == pytest.approx(sum(pre["groups"].values()))
    assert pre["ratios"]["speedup_vs_full"] == pytest.approx(pre["full_ms"] / pre["ms"])
    assert pre["runs"] is True and pre["ratios"]["speedup_runs_vs_one_batch"] == pytest.approx(
        pre["one_batch_ms"] / pre["ms"])
    dec = rows[("tiny", "fm-budgets", "decode", "eager", 16)]
    assert dec["ratios"]["speedup_vs_groups"] == pytest.approx(dec["groups_ms_per_step"] / dec["ms"])
    # the decode row's A/B of the decode policies: the row's own figure is the default policy's
    pol = dec["policies_ms_per_step"]
    assert dec["decode_policy"] == "eager" and set(pol) == {"eager", "kernels", "masked"} and pol["eager"] == dec["ms"]
    assert dec["ratios"]["speedup_masked_vs_kernels"] == pytest.approx(pol["kernels"] / pol["masked"])


def test_budgets_graph_rows_run_their_captured_calls(tmp_path, monkeypatch):
    """The graph-mode budgets rows (decode: one step, prefill: one forward) on the CPU with the capture replaced by
    the call itself: the budgets stay on the modules while the step runs, and the row's figures come back."""
    from flextron import FlextronModel
    from flextron_kernels import cpu_reference

    runner = e2e.Runner(args("--out", str(tmp_path), "--prompt-len", "4", "--new-tokens", "3", "--repeats", "1"),
                        torch.device("cpu"), {"tiny": TINY})
    runner.vocab = TINY["vocab_size"]
    seen = []

    def capture(fn, module=None):
        def run():
            seen.append([a.head_budgets is not None for a in fm.attention_blocks])
            return fn()
        return run

    monkeypatch.setattr(runner, "_capture", capture)
    fm = FlextronModel.from_hf(e2e.build_model(TINY, "cpu", dtype=torch.float32), e2e.make_space())
    target = e2e.Target(fm.model, fm, fm.generate, {})
    for phase in ("decode", "prefill"):
        seen.clear()
        with cpu_reference():  # the plain-torch paths: this test is about the row's bookkeeping
            row = runner.budgets_row(target, e2e.RowSpec("tiny", "fm-budgets", phase, "graph", 16, 4))
        assert row["ms"] > 0 and row["budgets"] == list(e2e.BUDGETS) and set(row["groups"]) == {
            "0.25", "0.5", "0.75", "1.0"}
        # the budgets' calls first (every layer with its per-sequence heads), then full width and the groups (none)
        flags = ["budgets" if all(x) else "none" if not any(x) else "mixed" for x in seen]
        n = flags.count("budgets")
        assert n > 0 and flags == ["budgets"] * n + ["none"] * (len(flags) - n) and len(flags) > n
        assert all(a.head_budgets is None for a in fm.attention_blocks) and fm.subnet is None


def test_budgets_eager_decode_interleaves_its_calls(tmp_path):
    """The eager budgets decode row times each of its calls (the budgets under every decode policy, full width, the
    four groups) once per round, the order reversed every other round, each under its own policy or subnet, and
    leaves both as they were; the row's figures are each variant's medians."""
    import flextron.layers
    from flextron import FlextronModel
    from flextron_kernels import cpu_reference

    runner = e2e.Runner(args("--out", str(tmp_path), "--prompt-len", "4", "--new-tokens", "3", "--repeats", "3"),
                        torch.device("cpu"), {"tiny": TINY})
    runner.vocab = TINY["vocab_size"]
    fm = FlextronModel.from_hf(e2e.build_model(TINY, "cpu", dtype=torch.float32), e2e.make_space())
    calls = []

    def generate(ids, **kw):
        width = None if fm.subnet is None else fm.subnet.mlp[0] / fm.mlp_blocks[0].full_width
        calls.append((flextron.layers.BUDGET_DECODE if "budgets" in kw else "-", width, ids.shape[0]))
        return fm.generate(ids, **kw)

    with cpu_reference():
        row = runner.budgets_row(e2e.Target(fm.model, fm, generate, {}),
                                 e2e.RowSpec("tiny", "fm-budgets", "decode", "eager", 16, 4))
    one_round = [("eager", None, 16), ("kernels", None, 16), ("masked", None, 16), ("-", None, 16),
                 ("-", 0.25, 4), ("-", 0.5, 4), ("-", 0.75, 4), ("-", None, 4)]
    assert calls == one_round * 2 + one_round[::-1] + one_round  # warm-ups, then three timed rounds
    assert flextron.layers.BUDGET_DECODE == "eager" and fm.subnet is None
    assert row["ms"] == pytest.approx(statistics_median(row["steps_ms"])) and len(row["steps_ms"]) == 3
    assert set(row["policies_ms_per_step"]) == {"eager", "kernels", "masked"} and row["decode_policy"] == "eager"
    assert row["groups_ms_per_step"] == pytest.approx(sum(g["ms_per_step"] for g in row["groups"].values()))
    assert "interleaved" in row["how"]


def statistics_median(xs):
    import statistics

    return statistics.median(xs)


def load_tables():
    spec = importlib.util.spec_from_file_location("bench_tables_e2e", ROOT / "benchmarks" / "tables.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_table(tmp_path):
    rows = [row("hf", 10.0, shape="llama2-7b"), row("fm-full", 10.4, shape="llama2-7b"),
            row("fm-50", 5.0, shape="llama2-7b"), row("ext-50", 4.0, shape="llama2-7b"),
            row("hf", 50.0, phase="prefill", batch=4, seq_len=1024, shape="llama2-7b"),
            row("fm-full", 52.0, phase="prefill", batch=4, seq_len=1024, shape="llama2-7b"),
            row("fm-budgets", 2.0, mode="static-compile", batch=16, shape="llama2-7b", full_ms_per_step=3.0,
                groups_ms_per_step=4.0),
            row("fm-budgets", 40.0, phase="prefill", batch=16, seq_len=512, shape="llama2-7b", full_ms=60.0,
                groups_ms=100.0),
            {**row("fm-25", None, shape="llama2-7b"), "error": "OutOfMemoryError"}]
    rows, summary = e2e.evaluate(rows, {"llama2-7b": 32})
    payload = {"bench": "end_to_end", "info": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11", "triton": "3.6.0",
                                               "commit": "abcdef1", "date": "2026-12-06T10:00:00+00:00"},
               "settings": {"prompt_len": 512, "new_tokens": 128}, "rows": rows, "summary": summary,
               "shapes": {"llama2-7b": {"parameters": 6738415616}}}
    (tmp_path / "end_to_end_NVIDIA_H100_80GB_HBM3.json").write_text(json.dumps(payload))
    (tmp_path / "end_to_end_quick_NVIDIA_H100_80GB_HBM3.json").write_text(json.dumps(dict(payload, rows=[])))
    tables = load_tables()
    assert tables.kind_of("end_to_end_quick_NVIDIA_H100_80GB_HBM3.json") == "end_to_end_quick"
    out = tables.render(tmp_path, kinds=["end_to_end"])
    assert "### end-to-end prefill and generation (NVIDIA H100 80GB HBM3)" in out
    assert "llama2-7b (6.7B)" in out and "128 tokens after a 512-token prompt" in out
    assert "| llama2-7b | prefill | 4 x 1024 | eager | 50.00 | 52.00 | 1.04x | – | – | – | – | – | – |" in out
    assert "end_to_end_b16" == tables.kind_of("end_to_end_b16_NVIDIA_H100_80GB_HBM3.json")
    assert "| llama2-7b | decode | 1 | eager | 10.00 | 10.40 | 1.04x | – | 1.25x | – | 2.08x | 2.50x | – |" in out
    assert "| llama2-7b | decode | static-compile | 2.00 | 3.00 | 4.00 | 1.50x | 2.00x |" in out
    assert "| llama2-7b | prefill | eager | 40.00 | 60.00 | 100.00 | 1.50x | 2.50x |" in out
    assert "llama2-7b 12.5 µs" in out  # (10.4 - 10) ms over 32 layers
    assert "Targets met: 7 of 8; missed: llama2-7b fm-50 decode eager b1: fm-50 time / ext-50 = 1.25" in out
    assert "1 rows failed: llama2-7b fm-25 decode eager b1" in out
    assert "per-run vs one batch" not in out  # no row timed the one-batch path
    # a prefill row with its own A/B of the per-run path: two more columns (decode rows have no such figure)
    rows[7]["one_batch_ms"] = 50.0
    payload["rows"] = rows
    (tmp_path / "end_to_end_NVIDIA_H100_80GB_HBM3.json").write_text(json.dumps(payload))
    out = tables.render(tmp_path, kinds=["end_to_end"])
    assert "| llama2-7b | prefill | eager | 40.00 | 60.00 | 100.00 | 1.50x | 2.50x | 50.00 | 1.25x |" in out
    assert "| llama2-7b | decode | static-compile | 2.00 | 3.00 | 4.00 | 1.50x | 2.00x | – | – |" in out
    assert "masked vs kernels" not in out
    # a decode row timed under both decode policies: three more columns
    rows[6].update(policies_ms_per_step={"kernels": 2.0, "masked": 1.6}, decode_policy="kernels")
    payload["rows"] = rows
    (tmp_path / "end_to_end_NVIDIA_H100_80GB_HBM3.json").write_text(json.dumps(payload))
    out = tables.render(tmp_path, kinds=["end_to_end"])
    assert ("| llama2-7b | decode | static-compile | 2.00 | 3.00 | 4.00 | 1.50x | 2.00x | – | – | kernels | 2.00 | "
            "1.60 | 1.25x |") in out
    assert "another token count" not in out
    # a decode row merged from a run with another --new-tokens is named as such
    rows[6]["new_tokens"] = 64
    payload["rows"] = rows
    (tmp_path / "end_to_end_NVIDIA_H100_80GB_HBM3.json").write_text(json.dumps(payload))
    out = tables.render(tmp_path, kinds=["end_to_end"])
    assert ("Decode rows with another token count than above: llama2-7b fm-budgets static-compile b16 "
            "(64 tokens).") in out


def test_paired_eager_decode(tmp_path):
    """``--paired``: fm-full against the plain model exported at full width and fm-50 against ext-50, generate calls
    alternating; each pair row carries both sides' steps, its ratio, a target, and a line in the table."""
    from flextron_kernels import cpu_reference

    with cpu_reference():  # plain-torch paths: this test is about the rows
        data = run_tiny(tmp_path, "--providers", "hf,fm-full,fm-50,ext-50", "--phases", "decode", "--paired",
                        "--repeats", "2")
    rows = {e2e.row_key(r): r for r in data["rows"]}
    assert len(rows) == 6 and not [r for r in rows.values() if r.get("error")]
    for name, a, b in (("full", "fm-full", "hf (exported at full width)"), ("50", "fm-50", "ext-50")):
        r = rows[("tiny", f"pair-{name}", "decode", "eager", 1)]
        assert (r["a"], r["b"]) == (a, b) and len(r["a_steps_ms"]) == len(r["b_steps_ms"]) == 2
        assert r["ms"] == pytest.approx(statistics_median(r["a_steps_ms"]))
        assert r["ratio"] == pytest.approx(r["ms"] / statistics_median(r["b_steps_ms"]))
        assert r["ratios"]["a_over_b"] == r["ratio"]
        assert [t["name"] for t in r["targets"]] == [f"{a} time / {b}, interleaved"]
    # fm-full / hf and fm-50 / ext-50, each plain and interleaved, and the host overhead per layer at batch 1
    assert data["summary"]["targets_total"] == 5
    payload = dict(data, info=dict(data["info"], gpu="NVIDIA Toy"))
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "end_to_end_NVIDIA_Toy.json").write_text(json.dumps(payload))
    out = load_tables().render(tmp_path / "toy", kinds=["end_to_end"])
    assert "timed interleaved" in out and "| tiny | 1 | fm-50 | ext-50 |" in out
    assert sum(line.startswith("| tiny | decode |") for line in out.splitlines()) == 1  # pairs not in the main table
    assert e2e.pair_specs(e2e.resolve(e2e.parse_args(["--providers", "fm-50,ext-25", "--modes", "eager"]),
                                      e2e.SHAPES)) == []
