"""bench_train at toy size on the CPU: the rows it writes, and its FLOP count against a count by hand (the GPU run
is where device time is scarce; a broken benchmark must fail here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_train  # noqa: E402

import flextron_kernels  # noqa: E402

TOY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           head_dim=8, vocab_size=128, rope_theta=10000.0, tie_word_embeddings=True)
BATCH, SEQ = 2, 16


@pytest.fixture()
def toy(monkeypatch):
    """The toy shape, run through the plain-torch references (as a GPU runs cuBLAS and SDPA: ops the FLOP counter
    sees; the interpreter's Triton launches it would not)."""
    monkeypatch.setitem(bench_train.SHAPES, "smollm2-135m", (TOY, BATCH, SEQ))
    with flextron_kernels.cpu_reference():
        yield bench_train.parse_args(["--shapes", "smollm2-135m", "--warmup", "1", "--steps", "2"])


def test_dense_row_counts_six_flops_per_matmul_parameter(toy):
    row = bench_train.measure("smollm2-135m", "dense", toy, torch.device("cpu"), peak=None)
    assert row["tokens_per_s"] > 0 and row["step_ms"] > 0 and row["passes_per_step"] == 1 and not row["teacher"]
    # By hand: forward + backward = 6 FLOPs per matmul parameter per token (the tied embedding is the output
    # matmul, its lookup is free). The counter has no formula for the CPU's fused SDPA, so attention adds nothing
    # here (on a GPU it counts cuDNN's and flash's, forward and backward).
    h, L = TOY["num_attention_heads"] * TOY["head_dim"], TOY["num_hidden_layers"]
    matmul = (L * (TOY["hidden_size"] * h * 2 + TOY["hidden_size"] * TOY["head_dim"] * TOY["num_key_value_heads"] * 2
                   + 3 * TOY["hidden_size"] * TOY["intermediate_size"]) + TOY["vocab_size"] * TOY["hidden_size"])
    # Older transformers releases (5.17) compute the rotary angles as a matmul (inv_freq @ positions, once per
    # forward, no backward): at most 2 * head_dim/2 FLOPs per token more, which the counter sees there.
    assert 6 * matmul <= row["flops_per_token"] <= 6 * matmul + TOY["head_dim"]


def test_elastic_row_and_its_table(toy, tmp_path):
    dense = bench_train.measure("smollm2-135m", "dense", toy, torch.device("cpu"), peak=None)
    row = bench_train.measure("smollm2-135m", "elastic", toy, torch.device("cpu"), peak=1e12)
    assert row["passes_per_step"] == 4 and row["teacher"]
    # full + smallest + 2 random subnets (each at most the full model) + a teacher forward (a third of a pass)
    assert dense["flops_per_token"] * 1.5 < row["flops_per_token"] < dense["flops_per_token"] * (4 + 1 / 3) * 1.01
    assert row["utilisation_vs_measured_matmul"] == pytest.approx(row["tflops_per_s"] * 1e12 / 1e12)
    assert "tok/s" in bench_train.line(row)

    import json

    import tables

    payload = {"benchmark": "train", "info": {"gpu": "NVIDIA Toy", "commit": "0000000",
                                              "date": "2026-01-01T00:00:00+00:00"},
               "ceilings": {"bf16_flops_per_s": 1e12}, "rows": [dense, row]}
    (tmp_path / "train_NVIDIA_Toy.json").write_text(json.dumps(payload))
    text = tables.render(tmp_path)
    assert "training throughput" in text and "data tokens/s" in text
    ratio = row["tokens_per_s"] / dense["tokens_per_s"]
    assert f"| {ratio:.2f}x |" in text and "| – |" in text  # elastic against dense; none for dense itself


def test_arguments():
    args = bench_train.parse_args(["--quick"])
    assert args.shapes == ["smollm2-135m"] and args.steps == 4
    with pytest.raises(SystemExit):
        bench_train.parse_args(["--shapes", "gpt5"])
    with pytest.raises(SystemExit):
        bench_train.parse_args(["--steps", "0"])


def test_gqa_flop_counts_on_a_torch_that_rejects_gqa(monkeypatch):
    """Where FlopCounterMode's SDPA formulas reject fewer KV heads than query heads (torch 2.11 on a GPU), the
    counts inside ``gqa_flop_counts`` are those of the KV heads broadcast to the query heads; outside, unchanged."""
    import torch.utils.flop_counter as fc

    def strict(fn, kv_at):
        def f(*shapes):
            if shapes[kv_at][1] != shapes[kv_at - 1][1]:
                raise AssertionError("sdpa_flop_count: query/key/value shapes are incompatible")
            return fn(*shapes)
        return f

    full_f, full_b = fc.sdpa_flop_count, fc.sdpa_backward_flop_count
    q, kv, wide = (2, 8, 16, 32), (2, 2, 16, 32), (2, 8, 16, 32)
    monkeypatch.setattr(fc, "sdpa_flop_count", strict(full_f, 1))
    monkeypatch.setattr(fc, "sdpa_backward_flop_count", strict(full_b, 2))
    old_f, old_b = fc.sdpa_flop_count, fc.sdpa_backward_flop_count
    with bench_train.gqa_flop_counts():
        assert fc.sdpa_flop_count(q, kv, kv) == full_f(q, wide, wide) > 0
        assert fc.sdpa_backward_flop_count(q, q, kv, kv) == full_b(q, q, wide, wide) > 0
        assert fc.sdpa_flop_count(q, wide, wide) == full_f(q, wide, wide)
    assert (fc.sdpa_flop_count, fc.sdpa_backward_flop_count) == (old_f, old_b)
    with pytest.raises(AssertionError):
        fc.sdpa_flop_count(q, kv, kv)


def test_losses_argument():
    assert bench_train.parse_args(["--losses", "fused,torch"]).losses == ["fused", "torch"]
    with pytest.raises(SystemExit):
        bench_train.parse_args(["--losses", "liger"])
    from flextron_kernels import distill_loss

    before = distill_loss._ENABLED
    with bench_train.loss_kernel(not before):
        assert distill_loss._ENABLED is (not before)
    assert distill_loss._ENABLED is before


def _ranks_worker(rank: int, port: int, parallel: str, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    bench_train.SHAPES["smollm2-135m"] = (TOY, BATCH, SEQ)
    try:
        args = bench_train.parse_args(["--shapes", "smollm2-135m", "--warmup", "1", "--steps", "2",
                                       "--parallel", parallel])
        with flextron_kernels.cpu_reference():
            row = bench_train.measure("smollm2-135m", "dense", args, torch.device("cpu"), peak=1e12)
        if rank == 0:
            torch.save(row, os.path.join(out, "row.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_rows_under_two_processes(toy, parallel, tmp_path):
    """Two gloo processes (as torchrun starts them): each trains its own blocks, tokens/s counts the global batch,
    and the FLOPs per token are the one-process count (the same work per token, wherever it runs)."""
    import socket

    from .train_utils import start_ranks

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one = bench_train.measure("smollm2-135m", "dense", toy, torch.device("cpu"), peak=1e12)
    start_ranks(_ranks_worker, (port, parallel, str(tmp_path)), 2, "cpu", preload=("tests.test_bench_train",))
    row = torch.load(tmp_path / "row.pt", weights_only=False)
    assert row["world"] == 2 and row["parallel"] == parallel and one["world"] == 1
    assert row["flops_per_token"] == one["flops_per_token"] and row["params"] == one["params"]
    assert row["tokens_per_s"] * row["step_ms"] / 1e3 == pytest.approx(2 * BATCH * SEQ)
    assert row["utilisation_vs_measured_matmul"] == pytest.approx(row["tflops_per_s"] * 1e12 / 2e12)
    assert f"{parallel} x2" in bench_train.line(row)

    import json

    import tables

    payload = {"benchmark": "train_multi", "info": {"gpu": "NVIDIA Toy", "commit": "0000000",
                                                    "date": "2026-01-01T00:00:00+00:00"},
               "ceilings": {"bf16_flops_per_s": 1e12}, "rows": [row]}
    (tmp_path / "train_multi_NVIDIA_Toy.json").write_text(json.dumps(payload))
    text = tables.render(tmp_path)
    assert "training throughput under torchrun, DDP or FSDP2" in text
    assert f"dense ({row['loss']} loss), {parallel} on 2 GPUs" in text


def test_parallel_argument(monkeypatch):
    with pytest.raises(SystemExit):  # several ranks need ddp or fsdp
        monkeypatch.setenv("WORLD_SIZE", "2")
        bench_train.parse_args(["--quick"])
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(SystemExit):  # and ddp or fsdp needs torchrun
        bench_train.parse_args(["--quick", "--parallel", "ddp"])
    assert bench_train.parse_args(["--quick"]).parallel == "none"
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # torchrun with one process: the wrapper on one GPU
    assert bench_train.parse_args(["--quick", "--parallel", "fsdp"]).parallel == "fsdp"
