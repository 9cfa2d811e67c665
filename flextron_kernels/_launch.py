"""Launching a compiled Triton kernel without Triton's per-call Python.

``kernel[grid](...)`` binds the arguments by name, works out the specialisation (each pointer's 16-byte alignment,
each integer's divisibility by 16 and width), builds a cache key with the options, checks the globals the kernel
read, builds launch metadata and only then calls the compiled kernel's launcher. For a decode step, whose kernels run
for microseconds, that Python is most of the call (``benchmarks/lab/launch_overhead.py``). :class:`DirectLaunch`
keeps the compiled kernel per device and per the properties the specialisation reads, worked out in a few
operations, and calls the launcher itself. A first call for a key, the interpreter, and a launch hook set (a profiler
such as proton) go through ``kernel[grid]`` as before.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from triton import knobs
from triton.knobs import HookChain

from ._runtime import INTERPRET


def _hooked(hook) -> bool:
    """Whether a launch hook is set: Triton keeps an empty ``HookChain`` there by default; a user may set a function."""
    return hook is not None and (not isinstance(hook, HookChain) or bool(hook.calls))


def _spec(a):
    """What Triton specialises an argument on, or more (two calls that share a key may share a compiled kernel):
    a tensor's dtype and base alignment; an integer's value 1, divisibility by 16 and width (32, 64 bits or more);
    a bool's value; a float nothing (Triton does not specialise floats)."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if isinstance(a, bool):
        return a
    if isinstance(a, int):
        return a == 1, a % 16 == 0, a.bit_length() // 32
    if isinstance(a, float):
        return float
    raise TypeError(f"DirectLaunch takes tensors, ints, bools and floats as runtime arguments, got {type(a).__name__}")


class DirectLaunch:
    """``launch(grid, tensors, scalars, constexprs)`` for one ``@triton.jit`` kernel, autotuned or not, whose runtime
    parameters are ``tensors`` then ``scalars`` (ints, bools, floats), in order; ``constexprs`` are the constexpr
    arguments the caller gives, in the signature's order (by value: a changed value is another key); an autotuned
    kernel's config supplies the rest, and the autotuner's key arguments are part of the key by value, so each tuning
    key keeps the config the autotuner chose for it. ``options`` (``num_warps``, ``num_stages``) are fixed per
    launcher (not for an autotuned kernel).

    Two lookups: by the exact scalars with each tensor's dtype and alignment (a few microseconds: a decode loop on a
    static cache repeats them), then by what Triton specialises on (a cache that grows each step changes its strides,
    not their specialisation)."""

    _EXACT_MAX = 4096  # exact keys kept (cleared past this: a long generation meets a new length each step)

    def __init__(self, kernel, **options):
        self.kernel = kernel
        self._options = options
        fn = kernel
        while not inspect.isfunction(fn):  # an Autotuner wraps a JITFunction, which wraps the Python function
            fn = fn.fn
        params = list(inspect.signature(fn).parameters.values())
        names = [p.name for p in params]
        constexprs = [i for i, p in enumerate(params) if "constexpr" in str(p.annotation)]
        n = len(names)
        if constexprs != list(range(n - len(constexprs), n)):
            raise TypeError(f"{fn.__name__}: DirectLaunch needs the constexpr parameters last")
        self._n_args = n - len(constexprs)
        self._constexpr_names = [names[i] for i in constexprs]
        configs = getattr(kernel, "configs", None)
        if configs is not None:
            if options:
                raise TypeError("an autotuned kernel's options come from its configs")
            if any(c.pre_hook is not None for c in configs) or kernel.restore_value or kernel.reset_to_zero:
                raise TypeError(f"{fn.__name__}: DirectLaunch skips the autotuner's hooks; this kernel has some")
            self._tune_idx = tuple(names.index(k) for k in kernel.keys if names.index(k) < self._n_args)
        else:
            self._tune_idx = ()
        self._exact: dict = {}
        self._by_spec: dict = {}
        self.misses = 0  # launches that went through kernel[grid] (the tests count them)

    def __call__(self, grid: Sequence[int], tensors: tuple, scalars: tuple, constexprs: tuple) -> None:
        if INTERPRET or _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook):
            self._slow(grid, tensors + scalars, constexprs)
            return
        device = torch.cuda.current_device()
        exact = (device, constexprs, scalars, tuple([t.dtype for t in tensors]),
                 tuple([t.data_ptr() & 15 for t in tensors]))
        hit = self._exact.get(exact)
        if hit is None:
            args = tensors + scalars
            key = (device, constexprs, tuple(map(_spec, args)), tuple(args[i] for i in self._tune_idx))
            hit = self._by_spec.get(key)
            if hit is None:
                self.misses += 1
                compiled = self._slow(grid, args, constexprs)
                best = getattr(self.kernel, "best_config", None)
                tail = constexprs + tuple(best.kwargs[n] for n in self._constexpr_names[len(constexprs):]) if best \
                    else constexprs
                self._by_spec[key] = (compiled, tail)
                return
            if len(self._exact) >= self._EXACT_MAX:
                self._exact.clear()
            self._exact[exact] = hit
        compiled, tail = hit
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        compiled.run(grid[0], g1, g2, torch._C._cuda_getCurrentRawStream(device), compiled.function,
                     compiled.packed_metadata, None, None, None, *tensors, *scalars, *tail)

    def _slow(self, grid, args, constexprs):
        if len(args) != self._n_args:
            raise TypeError(f"DirectLaunch: {self._n_args} runtime arguments expected, got {len(args)}")
        return self.kernel[grid](*args, **dict(zip(self._constexpr_names, constexprs)), **self._options)
