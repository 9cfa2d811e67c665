"""Flextron checkpoints: ``save_pretrained`` / ``load_pretrained``, bit-exact, and never at the expense of other files.

A checkpoint directory holds:

- ``config.json``: the HF config of the base model (``transformers``' own writer);
- ``model.safetensors``: the HF model's state dict (tied weights stored once), per-layer shapes as they are
  (a slim, heterogeneous export has smaller layers than ``config.json`` says);
- ``flextron_state.safetensors``: importance scores and the cumulative permutation, per layer;
- ``generation_config.json``: the model's generation defaults;
- the tokenizer's own files (``tokenizer.json``, ``tokenizer_config.json``, ...), when the model has a tokenizer:
  ``save_pretrained(path, tokenizer=tok)``, or ``fm.tokenizer`` when ``tokenizer`` is not given. A tokenizer with
  more tokens than the model's input embedding has rows is refused (``ValueError``). ``AutoTokenizer.from_pretrained``
  reads the checkpoint folder directly;
- ``routers.json``, ``routers.safetensors``, ``latency_table.json``: routers and latency table, when attached;
- ``flextron.json``: format version, architecture, the space, each layer's sizes, the active subnet, whether a
  tokenizer is stored, and the list of files the save wrote. It is written last: a folder without it is not a
  checkpoint.

Where ``save_pretrained(fm, path, tokenizer=None, overwrite=False)`` writes, by what ``path`` is:

- nothing: the checkpoint is written into a temporary sibling directory, renamed to ``path`` at the end;
- an empty directory: the checkpoint is written into it;
- a flextron checkpoint directory (it has ``flextron.json``): refused (``FileExistsError``) unless ``overwrite=True``.
  Then only the checkpoint's own files are replaced: the new files are written to a temporary directory inside
  ``path`` first, moved into place one by one with ``flextron.json`` last, and the files of the previous save that
  the new one does not write (e.g. an old tokenizer) are removed. Any other file in the directory is kept, so
  ``FlextronModel.from_pretrained(d).save_pretrained(d, overwrite=True)`` keeps notes, scripts or data stored in
  ``d``. A file of the user's that has the name of a file this save writes (``tokenizer.json``, ...) is replaced;
- anything else (a file, a link to nothing, a non-empty directory without ``flextron.json`` such as a plain Hugging
  Face model folder): refused with ``FileExistsError`` naming the path, whatever ``overwrite`` says.

A refused save, or one that fails while writing its files, changes nothing at ``path``. A save interrupted while
the files are being moved into an existing checkpoint directory (a short window after all data is written) leaves
that directory without ``flextron.json``: ``load_pretrained`` refuses it with a message, and
``save_pretrained(path, overwrite=True)`` writes a complete checkpoint there again.

``load_pretrained(path)`` builds the model with its parameters on the ``meta`` device (no random initialisation, no
second copy of the weights in memory), takes the tensors of ``model.safetensors`` as the parameters (memory-mapped,
copy-on-write: changing the model never changes the file; replace the file by renaming, as ``save_pretrained`` does,
rather than rewriting it in place while a model loaded from it is in use), computes the buffers the file does not
hold (rotary frequencies) as the model's own constructor does, in the dtype they had when saved, and returns the
model in eval mode with ``fm.tokenizer`` set to the stored tokenizer (``None`` when there is none). Weights, scores,
permutations and outputs come back bit-exact.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from .budget import load_routing, save_routing
from .model import FlextronModel, implements
from .space import ElasticSpace, Subnet

FORMAT_VERSION = 1
META = "flextron.json"
WEIGHTS = "model.safetensors"
STATE = "flextron_state.safetensors"
GENERATION = "generation_config.json"
# While files are being moved into an existing directory: which files belong to the old and the new checkpoint.
SAVING = ".flextron-saving.json"
TMP_PREFIX = ".flextron-tmp-"
# The files of a checkpoint written before flextron.json listed them.
LEGACY_FILES = frozenset({META, "config.json", WEIGHTS, STATE, "routers.json", "routers.safetensors",
                          "latency_table.json"})
DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# -- saving ---------------------------------------------------------------------------------------------------------
@implements("save_pretrained")
def save_pretrained(fm: FlextronModel, path, *, tokenizer=None, overwrite: bool = False) -> None:
    """Write ``fm`` (and ``tokenizer``, else ``fm.tokenizer`` when set) as a checkpoint directory at ``path``.

    ``path`` may be new, an empty directory, or (with ``overwrite=True``) an existing flextron checkpoint, whose own
    files are then replaced and whose other files are kept; anything else raises ``FileExistsError`` and is left
    untouched. See the module docstring for the exact rules.
    """
    path = Path(path)
    if tokenizer is None:
        tokenizer = getattr(fm, "tokenizer", None)
    if tokenizer is not None:
        _check_tokenizer(fm, tokenizer)
    target = _claim(path, overwrite)
    if target is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    else:
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=path))
    try:
        files = _write(fm, tmp, tokenizer)
        if target is None:
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        else:
            _install(tmp, path, files, *target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_tokenizer(fm: FlextronModel, tokenizer) -> None:
    if not callable(getattr(tokenizer, "save_pretrained", None)):
        raise TypeError(f"tokenizer must be a transformers tokenizer (with save_pretrained), got "
                        f"{type(tokenizer).__name__}")
    rows = fm.model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model's input embedding has only {rows} rows, so it is "
            f"not this model's tokenizer; pass the tokenizer the model was made with (tokenizer=...), or set "
            f"fm.tokenizer = None to save without one")


def _claim(path: Path, overwrite: bool):
    """What saving to ``path`` may replace: ``None`` (nothing there), ``(set(), [])`` (an empty directory), or the
    previous checkpoint's ``(file names, temporary directories of an interrupted save)``; raises otherwise."""
    if not path.exists():
        if path.is_symlink():
            raise FileExistsError(f"cannot save a checkpoint to {str(path)!r}: it is a symbolic link to a missing "
                                  f"target; remove the link or choose another path")
        return None
    if not path.is_dir():
        raise FileExistsError(f"cannot save a checkpoint to {str(path)!r}: it is an existing file, which "
                              f"save_pretrained never replaces; choose a new path or an empty directory")
    if not any(path.iterdir()):
        return set(), []
    complete = (path / META).is_file()
    if not complete and not (path / SAVING).is_file():
        raise FileExistsError(
            f"cannot save a checkpoint to {str(path)!r}: the directory is not empty and holds no flextron checkpoint "
            f"(no {META}); save_pretrained writes only to a new path, an empty directory or an existing flextron "
            f"checkpoint, so choose one of those (e.g. a new subdirectory); nothing was changed")
    if not overwrite:
        what = "a flextron checkpoint" if complete else "an incomplete flextron checkpoint (an interrupted save)"
        raise FileExistsError(
            f"{str(path)!r} already holds {what}; pass overwrite=True to replace it (only the checkpoint's own files "
            f"are replaced, other files in the directory are kept), or choose another path")
    return _checkpoint_files(path)


def _safe_names(names) -> set[str]:
    """File names of the directory itself (a damaged record cannot point elsewhere)."""
    return {n for n in names if isinstance(n, str) and n not in ("", ".", "..") and n == Path(n).name}


def _checkpoint_files(path: Path) -> tuple[set[str], list[Path]]:
    files, tmps = set(), []
    try:
        meta = json.loads((path / META).read_text())
        files |= _safe_names(meta["files"])
    except (OSError, ValueError, KeyError, TypeError):  # none, or written before the list was recorded
        if (path / META).is_file():
            files |= LEGACY_FILES
    if (path / SAVING).is_file():
        try:
            saving = json.loads((path / SAVING).read_text())
            files |= _safe_names(saving.get("old_files", [])) | _safe_names(saving.get("new_files", []))
            tmps = [path / n for n in _safe_names([saving.get("tmp")]) if n.startswith(TMP_PREFIX)]
        except (OSError, ValueError, AttributeError):
            files |= LEGACY_FILES
    return files, tmps


def _write(fm: FlextronModel, out: Path, tokenizer) -> list[str]:
    """Write every file of the checkpoint into the empty directory ``out`` (``flextron.json`` last, synced);
    returns their names."""
    if tokenizer is not None:  # first, so that the model's own files win any name clash
        tokenizer.save_pretrained(str(out))
    fm.config.save_pretrained(out)
    generation = getattr(fm.model, "generation_config", None)
    if generation is not None and fm.model.can_generate():
        try:
            generation.save_pretrained(out)
        except ValueError as e:  # transformers refuses inconsistent settings (e.g. temperature without sampling)
            raise ValueError(f"fm.model.generation_config cannot be saved: {e}") from None
    save_model(fm.model, str(out / WEIGHTS), metadata={"format": "pt"})
    state = {}
    for i in range(fm.num_layers):
        for kind in ("mlp", "heads"):
            state[f"permutation.{kind}.{i}"] = fm.permutation[kind][i].contiguous()
            if fm.importance is not None:
                state[f"importance.{kind}.{i}"] = fm.importance[kind][i].contiguous()
    save_file(state, str(out / STATE))
    save_routing(fm, out)  # routers and latency table, if any
    files = sorted({p.name for p in out.iterdir()} | {META})
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
        "tokenizer": tokenizer is not None,
        # dtypes of the buffers the weights file does not hold (rotary frequencies): recomputed on load, then cast
        "buffers": {name: str(b.dtype).removeprefix("torch.") for name, b in _non_persistent_buffers(fm.model)
                    if b.is_floating_point()},
        "files": files,
    }
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    for f in out.iterdir():  # data on disk before any rename makes it visible
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    return files


def _install(tmp: Path, path: Path, files: list[str], old_files: set[str], old_tmps: list[Path]) -> None:
    """Move the checkpoint written in ``tmp`` (inside ``path``) into ``path``, replacing only checkpoint files."""
    for name in files:
        if (path / name).is_dir() and not (path / name).is_symlink():
            raise FileExistsError(f"cannot save a checkpoint to {str(path)!r}: {name!r} there is a directory; "
                                  f"move it away or choose another path")
    saving = path / SAVING
    saving.write_text(json.dumps({"tmp": tmp.name, "old_files": sorted(old_files), "new_files": files}) + "\n")
    with open(saving, "rb") as fh:
        os.fsync(fh.fileno())
    with contextlib.suppress(FileNotFoundError):  # from here on the directory reads as incomplete ...
        os.remove(path / META)
    for name in files:
        if name != META:
            os.replace(tmp / name, path / name)
    for name in sorted(old_files - set(files)):  # files of the previous checkpoint that this one does not have
        stale = path / name
        if stale.is_symlink() or stale.is_file():
            stale.unlink()
    _fsync_dir(path)
    os.replace(tmp / META, path / META)  # ... until the new flextron.json lands
    _fsync_dir(path)
    saving.unlink()
    for old in old_tmps:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported here (e.g. Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _non_persistent_buffers(model: nn.Module):
    """``(name, tensor)`` of the buffers that are not part of the state dict (e.g. rotary ``inv_freq``)."""
    for prefix, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            b = module._buffers.get(name)
            if b is not None:
                yield (f"{prefix}.{name}" if prefix else name), b


# -- loading --------------------------------------------------------------------------------------------------------
_META_PARAMETERS = threading.local()  # .depth > 0: this thread is inside _parameters_on_meta
_PATCH_LOCK = threading.Lock()
_patch = {"users": 0, "register": None}


def _register_parameter(module, name, param):
    if param is not None and param.device.type != "meta" and getattr(_META_PARAMETERS, "depth", 0):
        param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
    _patch["register"](module, name, param)


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters registered by this thread inside the block are moved to the ``meta`` device (no storage, and the
    constructors' random initialisation runs on nothing); buffers are built as usual, on the CPU. Other threads
    are not affected."""
    with _PATCH_LOCK:
        if _patch["users"] == 0:
            _patch["register"] = nn.Module.register_parameter
            nn.Module.register_parameter = _register_parameter
        _patch["users"] += 1
    depth = getattr(_META_PARAMETERS, "depth", 0)
    _META_PARAMETERS.depth = depth + 1
    try:
        yield
    finally:
        _META_PARAMETERS.depth = depth
        with _PATCH_LOCK:
            _patch["users"] -= 1
            if _patch["users"] == 0:
                nn.Module.register_parameter = _patch["register"]


@implements("from_pretrained")
def load_pretrained(path) -> FlextronModel:
    """Load a directory written by :func:`save_pretrained`, in eval mode, with its tokenizer (``fm.tokenizer``,
    ``None`` when it has none); weights, scores, permutations and outputs come back bit-exact."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / META).is_file():
        if (path / SAVING).is_file():
            raise ValueError(f"path {str(path)!r} holds an incomplete flextron checkpoint: a save into it was "
                             f"interrupted; save the model there again with save_pretrained(path, overwrite=True)")
        raise ValueError(f"path must be a flextron checkpoint directory (with {META}), got {str(path)!r}")
    meta = json.loads((path / META).read_text())
    if meta.get("format") != "flextron" or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"path holds an unknown checkpoint format: {meta.get('format')} v{meta.get('format_version')}")
    config = AutoConfig.from_pretrained(path)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config)
    fm = FlextronModel.from_hf(model, ElasticSpace.from_dict(meta["space"]))
    sizes = meta["layers"]
    for i, (m, a) in enumerate(zip(fm.mlp_blocks, fm.attention_blocks)):  # shapes only: still on meta
        if m.full_width != sizes["mlp"][i]:
            m.slim_(sizes["mlp"][i])
        if a.num_heads != sizes["heads"][i]:
            a.slim_(sizes["heads"][i])
    # Tied parameters (lm_head and the embedding) are one Parameter under several names, stored under one of them.
    groups: dict[int, list[str]] = {}
    for name, p in fm.model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    weights = load_file(str(path / WEIGHTS))
    try:
        missing, unexpected = fm.model.load_state_dict(weights, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatch
        raise ValueError(f"path {str(path)!r}: the weights do not match its config and {META}: {e}") from None
    tied = set()
    for names in groups.values():
        stored = [n for n in names if n in weights]
        if stored and len(stored) < len(names):
            param = fm.model.get_parameter(stored[0])
            for n in names:
                if n not in weights:
                    owner, _, local = n.rpartition(".")
                    setattr(fm.model.get_submodule(owner), local, param)
                    tied.add(n)
    missing = [k for k in missing if k not in tied]
    if unexpected or missing:
        raise ValueError(f"path's weights do not match its config: missing {missing}, unexpected {unexpected}")
    dtypes = meta.get("buffers")
    for name, b in _non_persistent_buffers(fm.model):
        if not b.is_floating_point():
            continue
        # as saved; a checkpoint that did not record them gets the weights' dtype, as it always did
        dtype = DTYPES.get(dtypes.get(name, "")) if dtypes is not None else weights[next(iter(weights))].dtype
        if dtype is not None and dtype != b.dtype:
            owner, _, local = name.rpartition(".")
            fm.model.get_submodule(owner)._buffers[local] = b.to(dtype)
    del weights
    left = [n for n, t in [*fm.model.named_parameters(remove_duplicate=False), *fm.model.named_buffers()]
            if t.is_meta]
    if left:
        raise ValueError(f"path {str(path)!r} does not set {left} (the model has no values for them)")
    if (path / GENERATION).is_file():
        from transformers import GenerationConfig

        fm.model.generation_config = GenerationConfig.from_pretrained(path)
    has_tokenizer = meta.get("tokenizer")
    if has_tokenizer is None:  # older checkpoints: a tokenizer saved into the folder by hand
        has_tokenizer = (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()
    if has_tokenizer:
        from transformers import AutoTokenizer

        fm.tokenizer = AutoTokenizer.from_pretrained(path)
    state = load_file(str(path / STATE))
    n = fm.num_layers
    fm.permutation = {k: [state[f"permutation.{k}.{i}"] for i in range(n)] for k in ("mlp", "heads")}
    if meta["ranked"]:
        fm.importance = {k: [state[f"importance.{k}.{i}"] for i in range(n)] for k in ("mlp", "heads")}
    fm.set_subnet(None if meta["subnet"] is None else Subnet.from_dict(meta["subnet"]))
    load_routing(fm, path)  # routers and latency table, if any
    fm.eval()
    return fm
