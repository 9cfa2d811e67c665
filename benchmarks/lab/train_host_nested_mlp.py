"""Where an eager nested_mlp training call of 256 tokens spends its time, against the dense MLP (GPU only).

Llama-2-7B MLP (4096 / 11008), bf16, forward+backward with fresh gradients per step, the torch path that such calls
take (``nested_mlp.op.EAGER_TRAINING_MAX_TOKENS``) under three width mixes, and the dense MLP. Prints per provider:
the eager step (``do_bench`` median over eight interleaved rounds), the host time per step (ten steps queued
behind a long GPU sleep, so the host never waits for the GPU), and a torch.profiler table of five steps (its
"Self CUDA time total" / 5 is the GPU time per step).

    python benchmarks/lab/train_host_nested_mlp.py
"""

import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

from flextron_kernels import nested_mlp

H, INTER, T = 4096, 11008, 256
MIXES = {"uniform": ([0.25, 0.5, 0.75, 1.0], [0.25] * 4), "skewed": ([0.25, 0.5, 0.75, 1.0], [0.7, 0.1, 0.1, 0.1])}


def widths(fracs, probs):
    g = torch.Generator().manual_seed(0)
    pick = torch.multinomial(torch.tensor(probs), T, replacement=True, generator=g)
    return (torch.tensor(fracs)[pick] * INTER).round().long().cuda()


def main():
    torch.manual_seed(0)
    dt = torch.bfloat16
    x = torch.randn(T, H, device="cuda", dtype=dt, requires_grad=True)
    wg = (torch.randn(INTER, H, device="cuda", dtype=dt) * H**-0.5).requires_grad_()
    wu = (torch.randn(INTER, H, device="cuda", dtype=dt) * H**-0.5).requires_grad_()
    wd = (torch.randn(H, INTER, device="cuda", dtype=dt) * INTER**-0.5).requires_grad_()
    dy = torch.randn(T, H, device="cuda", dtype=dt)
    params = [x, wg, wu, wd]
    ws = {name: widths(*mix) for name, mix in MIXES.items()}
    ws["full"] = torch.full((T,), INTER, device="cuda")
    fns = {"dense": lambda: F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)}
    for name, w in ws.items():
        fns[name] = lambda w=w: nested_mlp(x, wu, wd, w, gate_weight=wg, check_widths=False)

    def step(fn):
        fn().backward(dy)
        for p in params:
            p.grad = None

    for fn in fns.values():
        for _ in range(5):
            step(fn)
    torch.cuda.synchronize()
    eager = {n: [] for n in fns}
    host = {n: [] for n in fns}
    for r in range(8):
        for n, fn in list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]:
            eager[n].append(do_bench(lambda fn=fn: step(fn), warmup=10, rep=30, return_mode="median"))
            torch.cuda._sleep(50_000_000)  # the GPU busy for a while: the ten steps below never wait for it
            t0 = time.perf_counter()
            for _ in range(10):
                step(fn)
            host[n].append((time.perf_counter() - t0) / 10 * 1e3)
            torch.cuda.synchronize()
    for n in fns:
        print(f"{n:8} eager {statistics.median(eager[n]):.3f} ms (min {min(eager[n]):.3f} max {max(eager[n]):.3f})"
              f"  host {statistics.median(host[n]):.3f} ms/call")
    for n in ("dense", "skewed", "full"):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step(fns[n])
            torch.cuda.synchronize()
        print("==", n)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=50))


if __name__ == "__main__":
    main()
