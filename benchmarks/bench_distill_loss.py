"""distill_cross_entropy (the elastic training loss) against the same loss in torch ops, and the roofline floor.

Providers (one run, same inputs: bf16 logits as the output layer makes them under autocast, a bf16 teacher):
  flextron  distill_cross_entropy(logits, target, teacher, alpha=0.5): one kernel, loss and gradient together
  torch     flextron_kernels.reference.distill_cross_entropy_ref: float32 log-softmax, cross-entropy and KL in torch
            ops, as a training loop writes it (the baseline; what flextron train ran before the kernel)
  floor     the bytes the loss must move (student and teacher logits read once, the gradient written once) at the
            measured copy bandwidth

Each case is forward+backward of the loss alone (the gradient reaching the logits), timed eager (do_bench of the
Python call) and from CUDA-graph replays, over the vocabularies of GPT-2, Llama-2, SmolLM2 and Llama-3 at 4096 and
16384 tokens, with a teacher (alpha 0.5) and without (cross-entropy alone). Peak memory beyond the inputs is recorded
per provider; a provider that runs out of memory is recorded as such.
"""

from __future__ import annotations

import torch
from _common import (
    bench_graph_ms,
    bench_ms,
    geomean,
    measure_ceilings,
    parse_args,
    peak_extra_bytes,
    run_info,
    write_result,
)

from flextron_kernels import distill_cross_entropy
from flextron_kernels.reference import distill_cross_entropy_ref

VOCABS = [("gpt2", 50257), ("llama2-7b", 32000), ("smollm2-135m", 49152), ("llama3-8b", 128256)]
TOKENS = [4096, 16384]
DT = torch.bfloat16
PROVIDERS = {"flextron": distill_cross_entropy, "torch": distill_cross_entropy_ref}


def case(name: str, vocab: int, tokens: int, teacher: bool, ceil: dict, device: str = "cuda") -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    z = (3 * torch.randn(tokens, vocab, device=device, generator=g)).to(DT).requires_grad_(True)
    t = (3 * torch.randn(tokens, vocab, device=device, generator=g)).to(DT) if teacher else None
    tgt = torch.randint(0, vocab, (tokens,), device=device, generator=g)
    row = {"vocab_of": name, "vocab": vocab, "tokens": tokens, "teacher": teacher, "ms": {}, "graph_ms": {},
           "peak_extra_bytes": {}, "errors": {}}
    for p, loss_fn in PROVIDERS.items():
        def step(loss_fn=loss_fn):
            z.grad = None  # a fresh gradient each call, eager and in the graph alike (no accumulation pass)
            loss_fn(z, tgt, t, 0.5, 1.0).backward()

        try:
            z.grad = None
            row["peak_extra_bytes"][p] = peak_extra_bytes(step)
            row["ms"][p] = bench_ms(step, rep=40)
            row["graph_ms"][p] = bench_graph_ms(step, rep=40)
        except torch.OutOfMemoryError:
            row["errors"][p] = "OutOfMemoryError"
            row["ms"].pop(p, None)
        z.grad = None
        torch.cuda.empty_cache()
    moved = tokens * vocab * z.element_size() * (3 if teacher else 2)
    row["floor_ms"] = moved / ceil["copy_bytes_per_s"] * 1e3
    for key in ("ms", "graph_ms"):
        f, b = row[key].get("flextron"), row[key].get("torch")
        row[f"speed_vs_torch_{key}"] = b / f if f and b else None
    f = row["graph_ms"].get("flextron")
    row["flextron_graph_vs_floor"] = f / row["floor_ms"] if f else None
    return row


def line(r: dict) -> str:
    ms, gm = r["ms"], r["graph_ms"]

    def fmt(d, p):
        return f"{d[p]:8.3f}" if p in d else "     oom"

    speed = r["speed_vs_torch_ms"]
    return (f"{r['vocab_of']:13} V={r['vocab']:6} T={r['tokens']:5} teacher={int(r['teacher'])}: flextron "
            f"{fmt(ms, 'flextron')} / {fmt(gm, 'flextron')} ms, torch {fmt(ms, 'torch')} / {fmt(gm, 'torch')} ms"
            + (f", {speed:.2f}x" if speed else "") + f", floor {r['floor_ms']:.3f} ms")


def main() -> None:
    args = parse_args(__doc__)
    info = run_info()
    ceil = measure_ceilings()
    rows = []
    vocabs = VOCABS[2:3] if args.quick else VOCABS
    tokens = TOKENS[:1] if args.quick else TOKENS
    for name, vocab in vocabs:
        for T in tokens:
            for teacher in (True, False):
                rows.append(case(name, vocab, T, teacher, ceil))
                print(line(rows[-1]), flush=True)
    speeds = {k: [r[f"speed_vs_torch_{k}"] for r in rows if r[f"speed_vs_torch_{k}"]] for k in ("ms", "graph_ms")}
    summary = {"geomean_speed_vs_torch_eager": geomean(speeds["ms"]) if speeds["ms"] else None,
               "min_speed_vs_torch_eager": min(speeds["ms"], default=None),
               "geomean_speed_vs_torch_graph": geomean(speeds["graph_ms"]) if speeds["graph_ms"] else None,
               "torch_out_of_memory": [f"{r['vocab_of']} T={r['tokens']}" for r in rows if "torch" in r["errors"]]}
    print("summary:", summary)
    write_result(args.out, "distill_loss", {"info": info, "ceilings": ceil, "dtype": "bfloat16", "alpha": 0.5,
                                            "temperature": 1.0, "summary": summary, "rows": rows})


if __name__ == "__main__":
    main()
