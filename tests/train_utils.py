"""A tiny GQA Llama and synthetic token data for the trainer tests (fast under the Triton interpreter)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flextron import ElasticSpace, FlextronModel
from flextron.tokens import TokenData

VOCAB = 64
MAX_POS = 32


def tiny_fm(seed: int = 0, hidden: int = 32, space: ElasticSpace | None = None) -> FlextronModel:
    """2 layers, 4 query heads in 2 KV groups, MLP 48: small enough that a step takes about a second."""
    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=hidden, intermediate_size=48, vocab_size=VOCAB,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=MAX_POS,
                         tie_word_embeddings=True)
    space = space or ElasticSpace(mlp=(0.5, 1.0), heads=(0.5, 1.0))
    return FlextronModel.from_hf(LlamaForCausalLM(config), space)


def token_data(seed: int = 0, n_train: int = 2000, n_val: int = 200) -> TokenData:
    """Random ids with a little structure (each token often followed by the next id), so losses move."""
    rng = np.random.default_rng(seed)
    def stream(n):
        x = rng.integers(0, VOCAB, n)
        follow = rng.random(n) < 0.5
        x[1:][follow[1:]] = (x[:-1][follow[1:]] + 1) % VOCAB
        return x.astype(np.uint16)
    return TokenData(train=stream(n_train), val=stream(n_val), meta={"tokens": {"train": n_train, "val": n_val}},
                     path="synthetic")


def start_ranks(fn, args: tuple, world: int, device: str, preload: tuple = ()) -> None:
    """``world`` fresh processes running ``fn(rank, *args)``. On the CPU they fork from a server that imported
    torch, transformers and the trainer once (``forkserver``), not each its own (``spawn``: ~5 s of imports per
    process); CUDA processes are spawned (nothing may have touched CUDA before a fork)."""
    import torch.multiprocessing as mp

    method = "spawn"
    if device == "cpu":
        method = "forkserver"
        mp.get_context(method).set_forkserver_preload(["flextron.train", "tests.train_utils", *preload])
    mp.start_processes(fn, args=args, nprocs=world, join=True, start_method=method)
