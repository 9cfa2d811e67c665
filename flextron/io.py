"""Flextron checkpoints: ``save_pretrained`` / ``load_pretrained``, bit-exact and atomic.

A checkpoint directory holds:

- ``config.json``: the HF config of the base model (``transformers``' own writer);
- ``model.safetensors``: the HF model's state dict (tied weights stored once), per-layer shapes as they are
  (a slim, heterogeneous export has smaller layers than ``config.json`` says);
- ``flextron_state.safetensors``: importance scores and the cumulative permutation, per layer;
- ``flextron.json``: format version, architecture, the space, each layer's sizes, the active subnet.

Everything is written into a temporary sibling directory and renamed into place at the end, so an interrupted save
leaves either the previous checkpoint or the new one, never a half-written directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from .model import FlextronModel
from .space import ElasticSpace, Subnet

FORMAT_VERSION = 1
META = "flextron.json"
WEIGHTS = "model.safetensors"
STATE = "flextron_state.safetensors"


def save_pretrained(fm: FlextronModel, path) -> None:
    """Write ``fm`` to directory ``path`` (replaced if it exists) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        fm.config.save_pretrained(tmp)
        save_model(fm.model, str(tmp / WEIGHTS), metadata={"format": "pt"})
        state = {}
        for i in range(fm.num_layers):
            for kind in ("mlp", "heads"):
                state[f"permutation.{kind}.{i}"] = fm.permutation[kind][i].contiguous()
                if fm.importance is not None:
                    state[f"importance.{kind}.{i}"] = fm.importance[kind][i].contiguous()
        save_file(state, str(tmp / STATE))
        meta = {
            "format": "flextron",
            "format_version": FORMAT_VERSION,
            "architecture": type(fm.model).__name__,
            "family": fm.family,
            "space": fm.space.to_dict(),
            "layers": {
                "mlp": [m.full_width for m in fm.mlp_blocks],
                "heads": [a.num_heads for a in fm.attention_blocks],
                "head_dim": [a.head_dim for a in fm.attention_blocks],
            },
            "ranked": fm.importance is not None,
            "subnet": None if fm.subnet is None else fm.subnet.to_dict(),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        from .budget import save_routing  # routers and latency table, if any (issue 7)

        save_routing(fm, tmp)
        for f in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "ckpt")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_pretrained(path) -> FlextronModel:
    """Load a directory written by :func:`save_pretrained`; weights, scores and permutations come back bit-exact."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / META).is_file():
        raise ValueError(f"path must be a flextron checkpoint directory (with {META}), got {str(path)!r}")
    meta = json.loads((path / META).read_text())
    if meta.get("format") != "flextron" or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"path holds an unknown checkpoint format: {meta.get('format')} v{meta.get('format_version')}")
    config = AutoConfig.from_pretrained(path)
    with safe_open(str(path / WEIGHTS), framework="pt") as f:
        dtype = f.get_slice(next(iter(f.keys()))).get_dtype()
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}[dtype]
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    fm = FlextronModel.from_hf(model, ElasticSpace.from_dict(meta["space"]))
    sizes = meta["layers"]
    for i, (m, a) in enumerate(zip(fm.mlp_blocks, fm.attention_blocks)):
        if m.full_width != sizes["mlp"][i]:
            m.slim_(sizes["mlp"][i])
        if a.num_heads != sizes["heads"][i]:
            a.slim_(sizes["heads"][i])
    missing, unexpected = load_model(fm.model, str(path / WEIGHTS), strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise ValueError(f"path's weights do not match its config: missing {missing}, unexpected {unexpected}")
    if missing:  # tied lm_head: make sure it is tied after loading
        fm.model.tie_weights()
    state = load_file(str(path / STATE))
    n = fm.num_layers
    fm.permutation = {k: [state[f"permutation.{k}.{i}"] for i in range(n)] for k in ("mlp", "heads")}
    if meta["ranked"]:
        fm.importance = {k: [state[f"importance.{k}.{i}"] for i in range(n)] for k in ("mlp", "heads")}
    fm.set_subnet(None if meta["subnet"] is None else Subnet.from_dict(meta["subnet"]))
    from .budget import load_routing  # routers and latency table, if any (issue 7)

    load_routing(fm, path)
    fm.eval()
    return fm
