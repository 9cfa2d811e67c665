"""The product benchmarks import and parse their arguments on any machine: a refactor that breaks one fails here,
not on the GPU machine, where device time is scarce."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("bench_*.py")))
def test_benchmark_answers_help(script):
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage:" in run.stdout and "--out" in run.stdout


def test_attention_cases_and_tables_run_on_cpu(tmp_path, monkeypatch):
    """bench_elastic_attention's cases at toy sizes on the CPU (timing stubbed: nothing is timed here), then the
    tables its results file renders: the case code and the table code cannot drift apart unnoticed."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import json

    import bench_elastic_attention as bench
    import tables
    import torch

    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "D", 16)
    monkeypatch.setattr(bench, "HQ", 4)
    monkeypatch.setattr(bench, "DTYPE", torch.float32)
    monkeypatch.setattr(bench, "MIXED_SHAPES", [(4, 16)])  # the decode case below counts towards its target
    monkeypatch.setattr(bench, "ROUNDS", 1)  # one timing round per provider: the rows' bookkeeping is the same
    import _common

    monkeypatch.setattr(_common, "bench_ms", lambda fn, grad_to_none=None, rep=0: (fn(), 1.0)[1])
    monkeypatch.setattr(_common, "graph_replay", lambda fn: (fn(), fn)[1])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    rows = bench.prefill_case(4, 1, 16) + [bench.mixed_case(4, 4, 16), bench.decode_case(4, 4, 16)]
    assert {r["kind"] for r in rows} == {"prefill", "backward", "mixed", "decode"}
    for r in rows:  # every provider timed eager and from a graph, against the same baseline
        speeds = r.get("speed_vs_sdpa", r.get("speed_vs_sdpa_all"))
        assert speeds and all(v["eager"] and v["graph"] for v in speeds.values())
    targets = bench.targets(rows)
    assert len(targets) == 12 and all(len(v) == 3 for v in targets.values())
    assert targets["noise_floor_sdpa_vs_itself_eager"] == [[1.0, 1.0], "range", None]
    assert targets["mixed_decode_min_speed_vs_sdpa_all_graph"] == [1.0, ">= 1.3", False]
    assert targets["mixed_decode_all_shapes_speed_vs_sdpa_all_graph"] == [[1.0, 1.0], "range", None]
    payload = dict(benchmark="elastic_attention", gpu="NVIDIA Toy", torch="t", triton="t", commit="0000000",
                   date="2026-01-01T00:00:00+00:00", head_dim=16, hq=4, rows=rows, targets=targets)
    (tmp_path / "elastic_attention_NVIDIA_Toy.json").write_text(json.dumps(payload))
    sl_rows = [dict(weight="w", T=t, mode=m, speed_vs_cublas=1.0, graph_speed_vs_cublas=0.96)
               for t in (1, 256) for m in ("fwd", "fwd+bwd")]
    (tmp_path / "sliced_linear_NVIDIA_Toy.json").write_text(json.dumps(dict(
        info=dict(gpu="NVIDIA Toy", commit="0000000", date="2026-01-01T00:00:00+00:00"), rows=sl_rows,
        summary=dict(max_peak_extra_bytes_flextron=0, target_min_speed_vs_cublas=[0.97, False]))))
    text = tables.render(tmp_path)
    assert "Triton, one launch" in text and "SDPA per group (scattered)" in text and "decode kernel" in text
    assert "speed against itself over the prefill cases: eager 1.00x, graph 1.00x." in text
    assert "an eager call of a small step is bound by its host time): eager 1.00x, graph 1.00x." in text
    assert "speed vs cuBLAS on the slice, eager" in text and "0.96x" in text and "not met" in text


def test_distill_loss_cases_and_table_run_on_cpu(tmp_path, monkeypatch):
    """bench_distill_loss's case at toy size on the CPU (timing and memory stubbed), then its table."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import json

    import bench_distill_loss as bench
    import tables
    import torch

    monkeypatch.setattr(bench, "bench_ms", lambda fn, grad_to_none=None, rep=0: (fn(), 2.0)[1])
    monkeypatch.setattr(bench, "bench_graph_ms", lambda fn, rep=0: (fn(), 1.0)[1])
    monkeypatch.setattr(bench, "peak_extra_bytes", lambda fn: (fn(), 2**30)[1])
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    ceil = {"copy_bytes_per_s": 1e9}
    rows = [bench.case("toy", 70, 6, teacher, ceil, device="cpu") for teacher in (True, False)]
    for r in rows:
        assert set(r["ms"]) == set(r["graph_ms"]) == {"flextron", "torch"} and not r["errors"]
        assert r["speed_vs_torch_ms"] == 1.0 and r["flextron_graph_vs_floor"] > 0
    assert rows[0]["floor_ms"] == pytest.approx(6 * 70 * 2 * 3 / 1e9 * 1e3)
    payload = dict(info=dict(gpu="NVIDIA Toy", commit="0000000", date="2026-01-01T00:00:00+00:00"), rows=rows)
    (tmp_path / "distill_loss_NVIDIA_Toy.json").write_text(json.dumps(payload))
    text = tables.render(tmp_path)
    assert "### distill_cross_entropy (the training loss) (NVIDIA Toy)" in text
    assert "| toy (70) | 6 | yes | 2.000 / 1.000 | 2.000 / 1.000 | 1.00x / 1.00x |" in text
