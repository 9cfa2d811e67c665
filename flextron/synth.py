"""A training corpus written by the parent model itself: sampled documents in the token-cache format of
:mod:`flextron.tokens`, with real held-out text for validation.

``sample_corpus(model, tokenizer, out_dir, tokens=N, val_text_files=[...])`` samples documents (HF ``generate``,
``do_sample=True`` at ``temperature``, ``top_k=0``, ``top_p=1.0``) until at least ``N`` training tokens are written:

- a document starts from a prompt (``<s>`` alone, or ``<s>`` + the first ``prompt_tokens`` ids of a document of the
  prompt files, cycling through them) and ends at EOS (not kept) or when it holds ``seq_len`` tokens, ``<s>``
  included; it is stored like :func:`flextron.tokens.tokenize_files` stores a document: ``<s>`` + its ids (the prompt
  ids included);
- batch ``b`` is sampled under a torch seed derived from ``(seed, b)`` alone, so the corpus is a function of the
  settings and the parent's weights, and a run resumed in another process writes what an uninterrupted one would;
- exact duplicates (same token ids, compared by a 128-bit prefix of their sha256) are dropped across the whole
  corpus, resumes included, and counted; a document with no id at all (EOS straight after ``<s>``) is dropped too;
- ``val.bin`` is real text: the validation split of ``val_text_files`` by tokenize_files' rule (the last 10% of the
  documents), and prompt documents equal to a held-out one are never used as prompts.

Folder layout while sampling (every step atomic or truncated back on resume):

- ``progress.json``: the settings the corpus is a function of, batches done, token and document counts (written
  atomically after each batch);
- ``train.partial.bin``: the kept documents of the batches done (whole batches appended; bytes past the recorded
  count are cut off on resume);
- ``hashes.bin``: 16 bytes per kept document, the dedup record (cut back the same way);
- ``val.bin``: written at the start.

When the target is reached, ``train.partial.bin`` becomes ``train.bin`` and ``tokens.json`` is written last; only then
is the folder a cache (:func:`flextron.tokens.open_cache`). Calling again with a larger ``tokens`` continues the same
corpus; with other settings the folder is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .model import FlextronModel
from .tokens import (
    FORMAT_VERSION,
    META,
    PROGRESS,
    SEPARATOR,
    TokenData,
    _check_files,
    _write_atomic,
    file_sources,
    ids_dtype,
    open_cache,
    read_documents,
    tokenizer_fingerprint,
    validation_ids,
)

PARTIAL = "train.partial.bin"
HASHES = "hashes.bin"
HASH_BYTES = 16
SEED_SALT = 0x5EED
CHECKSUM_COVERS = ("sha256 over every tensor of the model's state_dict() (for a FlextronModel, of its Hugging Face "
                   "model), in sorted name order: for each, its name, dtype and shape, then its raw bytes (native "
                   "little-endian), copied to the host in chunks of at most 64 MiB; tied tensors count once per name")
_CHUNK = 64 << 20
CACHES = ("dynamic", "static")


def _hf(model):
    return model.model if isinstance(model, FlextronModel) else model


def model_checksum(model) -> str:
    """The parent's checksum (see ``CHECKSUM_COVERS``): equal for bit-identical weights under the same names,
    whatever device they live on. At most one 64 MiB chunk is on the host at a time."""
    sd = _hf(model).state_dict()
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name]
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        flat = t.detach().contiguous().reshape(-1)
        raw = flat.view(torch.uint8)
        for i in range(0, raw.numel(), _CHUNK):
            h.update(raw[i:i + _CHUNK].cpu().numpy().tobytes())
    return h.hexdigest()


def batch_seed(seed: int, batch: int) -> int:
    """The torch seed of batch ``batch``: a pure function of ``(seed, batch)`` (numpy ``SeedSequence``)."""
    return int(np.random.SeedSequence([seed, batch, SEED_SALT]).generate_state(1, np.uint64)[0] >> 1)


def document_hash(ids) -> bytes:
    """The dedup key of a document: the first 16 bytes of sha256 over its ids as little-endian uint32."""
    return hashlib.sha256(np.asarray(ids, dtype="<u4").tobytes()).digest()[:HASH_BYTES]


class SamplingStalled(RuntimeError):
    """Many batches in a row gave no new document (every one a duplicate or empty): the target is out of reach."""


def progress_state(out_dir: str | Path) -> dict | None:
    """The ``progress.json`` of a synthetic corpus folder (unfinished or complete), or None."""
    p = Path(out_dir) / PROGRESS
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _fsync_append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _truncate(path: Path, size: int, what: str) -> None:
    have = path.stat().st_size if path.is_file() else 0
    if have < size:
        raise ValueError(f"{path} holds {have} bytes but {PROGRESS} records {size}: the {what} is damaged; "
                         f"start the corpus again in an empty folder")
    if not path.is_file():
        path.touch()
    with open(path, "r+b") as f:
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())


@dataclass
class CorpusJob:
    """A checked, ready-to-run :func:`sample_corpus` call (:func:`prepare_corpus`); ``run()`` does the sampling."""

    model: object
    tokenizer: object
    out: Path
    target: int
    settings: dict
    provenance: dict
    prompts: list[list[int]]
    val: np.ndarray
    dtype: type
    seq_len: int
    batch_size: int
    seed: int
    temperature: float
    progress: bool
    time_limit_s: float | None
    max_stalled_batches: int
    cache: str = "dynamic"
    state: dict = field(default_factory=dict)

    # -- folder state ---------------------------------------------------------------------------------------------
    def _write_progress(self) -> None:
        _write_atomic(self.out / PROGRESS, (json.dumps(self.state, indent=2) + "\n").encode())

    def _load(self) -> set[bytes]:
        """Bring the folder to the last recorded batch (or start it); returns the kept documents' hashes."""
        out = self.out
        out.mkdir(parents=True, exist_ok=True)
        prev = progress_state(out)
        if prev is None:  # progress.json first: from here on the folder is a corpus that continues
            self.state = {"format_version": FORMAT_VERSION, "settings": self.settings, "target_tokens": self.target,
                          "batches_done": 0, "train_tokens": 0, "documents": 0, "generated": 0, "duplicates": 0,
                          "empty": 0, "stalled_batches": 0, "sampling_s": 0.0}
            self._write_progress()
        else:
            self.state = {**prev, "target_tokens": self.target}
        (out / META).unlink(missing_ok=True)  # complete or not, the folder is not a cache while it grows
        if (out / "train.bin").is_file():  # a finished corpus being extended, or a stop mid-finish
            os.replace(out / "train.bin", out / PARTIAL)
        itemsize = np.dtype(self.dtype).itemsize
        _truncate(out / PARTIAL, self.state["train_tokens"] * itemsize, "partial train file")
        _truncate(out / HASHES, self.state["documents"] * HASH_BYTES, "document hash record")
        val_path = out / "val.bin"
        if not val_path.is_file() or val_path.read_bytes() != self.val.tobytes():
            _write_atomic(val_path, self.val.tobytes())
        self._write_progress()
        raw = (out / HASHES).read_bytes()
        return {raw[i:i + HASH_BYTES] for i in range(0, len(raw), HASH_BYTES)}

    # -- sampling -------------------------------------------------------------------------------------------------
    def _generate(self, batch: int) -> list[list[int]]:
        """The documents of batch ``batch`` (before dedup), ids without ``<s>``."""
        hf = _hf(self.model)
        device = next(hf.parameters()).device
        start = batch * self.batch_size
        rows = [self.prompts[(start + r) % len(self.prompts)] for r in range(self.batch_size)]
        inp = torch.tensor(rows, dtype=torch.long, device=device)
        from transformers import GenerationConfig

        eos = self.tokenizer.eos_token_id
        pad = eos if eos is not None else 0
        gc = GenerationConfig(do_sample=True, temperature=self.temperature, top_k=0, top_p=1.0,
                              cache_implementation="static" if self.cache == "static" else None,
                              max_new_tokens=self.seq_len - inp.shape[1], eos_token_id=eos, pad_token_id=pad,
                              bos_token_id=self.tokenizer.bos_token_id)
        devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(batch_seed(self.seed, batch))
            out = self.model.generate(inp, attention_mask=torch.ones_like(inp), generation_config=gc)
        out = out.cpu().tolist()
        skip = 1 if self.tokenizer.bos_token_id is not None else 0
        docs = []
        for row in out:
            gen = row[len(rows[0]):]
            if eos is not None and eos in gen:
                gen = gen[:gen.index(eos)]
            docs.append(row[skip:len(rows[0])] + gen)
        return docs

    def run(self) -> TokenData | None:
        """Sample until the target; returns the cache, or None when ``time_limit_s`` stopped it first (the folder
        then continues on the next call). Raises :class:`SamplingStalled` after ``max_stalled_batches`` batches in a
        row without a new document."""
        prev = progress_state(self.out)
        if prev is not None and (self.out / META).is_file() and prev.get("train_tokens", 0) >= self.target:
            return open_cache(self.out)  # complete with enough tokens: nothing to sample
        seen = self._load()
        st = self.state
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        hf = _hf(self.model)
        was_training = hf.training
        hf.eval()
        t0 = time.perf_counter()
        try:
            with tqdm(total=self.target, initial=min(st["train_tokens"], self.target), unit="tok",
                      desc="sampling", disable=not self.progress, leave=False) as bar:
                while st["train_tokens"] < self.target:
                    tb = time.perf_counter()
                    docs = self._generate(st["batches_done"])
                    kept, hashes, dups, empty = [], [], 0, 0
                    for ids in docs:
                        if not ids:
                            empty += 1
                            continue
                        h = document_hash(ids)
                        if h in seen:
                            dups += 1
                            continue
                        seen.add(h)
                        hashes.append(h)
                        kept.append(np.asarray(bos + ids, dtype=self.dtype))
                    n = int(sum(len(k) for k in kept))
                    if kept:
                        _fsync_append(self.out / PARTIAL, np.concatenate(kept).tobytes())
                        _fsync_append(self.out / HASHES, b"".join(hashes))
                    st.update(batches_done=st["batches_done"] + 1, train_tokens=st["train_tokens"] + n,
                              documents=st["documents"] + len(kept), generated=st["generated"] + len(docs),
                              duplicates=st["duplicates"] + dups, empty=st["empty"] + empty,
                              stalled_batches=0 if kept else st["stalled_batches"] + 1,
                              sampling_s=st["sampling_s"] + time.perf_counter() - tb)
                    self._write_progress()
                    bar.update(min(n, max(0, self.target - bar.n)))
                    bar.set_postfix(docs=st["documents"], dups=st["duplicates"])
                    if st["train_tokens"] >= self.target:
                        break
                    if st["stalled_batches"] >= self.max_stalled_batches:
                        raise SamplingStalled(
                            f"the last {st['stalled_batches']} batches gave no new document (all duplicates or "
                            f"empty) at {st['train_tokens']:,} of {self.target:,} tokens: the parent repeats itself; "
                            f"raise the temperature or give more prompt documents")
                    if self.time_limit_s is not None and time.perf_counter() - t0 >= self.time_limit_s:
                        return None
        finally:
            hf.train(was_training)
        return self._finish()

    def _finish(self) -> TokenData:
        st = self.state
        os.replace(self.out / PARTIAL, self.out / "train.bin")
        meta = {
            "format_version": FORMAT_VERSION,
            "synthetic": True,
            "tokenizer": self.provenance["tokenizer"],
            "dtype": np.dtype(self.dtype).name,
            "tokens": {"train": st["train_tokens"], "val": int(len(self.val))},
            "documents": {"train": st["documents"], "val": self.provenance["validation"]["documents"]},
            "generated": {"documents": st["generated"], "duplicates_dropped": st["duplicates"],
                          "empty_dropped": st["empty"], "batches": st["batches_done"]},
            "target_tokens": self.target,
            "seed": self.seed,
            "sampler": self.provenance["sampler"],
            "parent": self.provenance["parent"],
            "validation": self.provenance["validation"],
            "split_rule": self.provenance["validation"]["split_rule"],
            "dedup": f"exact: documents with equal token ids (first {HASH_BYTES} bytes of sha256 over the ids as "
                     f"little-endian uint32) are kept once, across the whole corpus",
            "sampling_s": round(st["sampling_s"], 3),
        }
        _write_atomic(self.out / META, (json.dumps(meta, indent=2) + "\n").encode())
        return open_cache(self.out)


def _prompt_ids(prompts, prompt_tokens: int, tokenizer, held_out: set[str]) -> tuple[list[list[int]], dict]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if isinstance(prompts, str) and prompts == "bos":
        if not bos:
            raise ValueError("prompts='bos' needs a tokenizer with a BOS token; give prompt text files instead")
        return [bos], {"kind": "bos"}
    paths = _check_files(prompts)
    docs = read_documents(paths, SEPARATOR)
    usable = [d for d in docs if d not in held_out]
    rows, short = [], 0
    for i in range(0, len(usable), 512):
        for t in tokenizer(usable[i:i + 512], add_special_tokens=False, verbose=False)["input_ids"]:
            if len(t) < prompt_tokens:
                short += 1
            else:
                rows.append(bos + t[:prompt_tokens])
    if not rows:
        raise ValueError(f"no prompt document of {[str(p) for p in paths]} holds {prompt_tokens} tokens "
                         f"(outside the validation split)")
    info = {"kind": "files", "files": file_sources(paths), "prompt_tokens": prompt_tokens, "documents": len(rows),
            "skipped_short": short, "skipped_validation": len(docs) - len(usable)}
    return rows, info


def prepare_corpus(model, tokenizer, out_dir, *, tokens: int, val_text_files, seq_len: int = 512,
                   batch_size: int = 64, seed: int = 0, temperature: float = 1.0, prompts="bos", prompt_tokens: int = 8,
                   progress: bool = True, time_limit_s: float | None = None,
                   max_stalled_batches: int = 32, cache: str = "dynamic") -> CorpusJob:
    """Every check of :func:`sample_corpus` (arguments, files, the folder), without sampling: ``ValueError`` or
    ``FileNotFoundError`` for bad input. Returns the job; ``job.run()`` samples."""
    for name, v, low in (("tokens", tokens, 1), ("seq_len", seq_len, 2), ("batch_size", batch_size, 1),
                         ("prompt_tokens", prompt_tokens, 1), ("max_stalled_batches", max_stalled_batches, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    if not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    if time_limit_s is not None and not 0 <= time_limit_s < math.inf:
        raise ValueError(f"time_limit_s must be None or a number >= 0, got {time_limit_s!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} is a file, not a folder")
    hf = _hf(model)
    cfg = getattr(hf, "config", None)
    max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if max_pos is not None and seq_len > max_pos:
        raise ValueError(f"seq_len={seq_len} exceeds the model's {max_pos} positions")

    val, val_info = validation_ids(val_text_files, tokenizer)
    held_out = set(read_documents([Path(s["path"]) for s in val_info["sources"]], SEPARATOR)[-val_info["documents"]:])
    rows, prompt_info = _prompt_ids(prompts, prompt_tokens, tokenizer, held_out)
    if len(rows[0]) >= seq_len:
        raise ValueError(f"seq_len={seq_len} leaves no room to sample after a prompt of {len(rows[0])} tokens")
    fingerprint = tokenizer_fingerprint(tokenizer)
    dtype = ids_dtype(tokenizer)
    checksum = model_checksum(model)
    sampler = {"temperature": float(temperature), "top_k": 0, "top_p": 1.0, "seq_len": seq_len,
               "batch_size": batch_size, "prompts": prompt_info,
               "batch_seeds": f"torch.manual_seed(SeedSequence([seed, batch, {SEED_SALT:#x}]) state >> 1)",
               "document_rule": "prompt, then sampled ids up to EOS (not kept) or seq_len tokens with <s>; stored as "
                                "<s> + ids"}
    if cache != "dynamic":  # only then: corpora started before the option keep their settings
        sampler["cache"] = cache
    # What the corpus is a function of (compared on resume): file contents by sha256, not paths or mtimes.
    sampler_id = {**sampler, "prompts": {k: v for k, v in prompt_info.items() if k != "files"}}
    if "files" in prompt_info:
        sampler_id["prompts"]["sha256"] = [f["sha256"] for f in prompt_info["files"]]
    settings = {"seed": seed, "sampler": sampler_id, "parent_sha256": checksum, "tokenizer_vocab_sha256":
                fingerprint["vocab_sha256"], "dtype": np.dtype(dtype).name,
                "validation_sha256": [s["sha256"] for s in val_info["sources"]]}
    settings = json.loads(json.dumps(settings))  # as progress.json holds it (tuples -> lists)
    if out.is_dir() and any(out.iterdir()):
        prev = progress_state(out)
        if prev is None:
            raise ValueError(f"out_dir {str(out)!r} is not empty and holds no synthetic corpus: give a new or empty "
                             f"folder")
        if prev.get("settings") != settings:
            old = prev.get("settings") or {}
            keys = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ValueError(f"out_dir {str(out)!r} holds a corpus sampled with other settings (differing: "
                             f"{', '.join(keys)}): continue it with the same model, tokenizer and settings, or give "
                             f"another folder")
    params = sum(p.numel() for p in hf.parameters())
    device = next(hf.parameters()).device
    parent = {"class": type(hf).__name__, "name_or_path": str(getattr(cfg, "_name_or_path", "") or ""),
              "parameters": params, "dtype": str(next(hf.parameters()).dtype).removeprefix("torch."),
              "device": str(device), "sha256": checksum, "sha256_covers": CHECKSUM_COVERS}
    if isinstance(model, FlextronModel):
        parent["flextron_subnet"] = str(model.subnet) if model.subnet is not None else "full"
    provenance = {"tokenizer": fingerprint, "sampler": sampler, "parent": parent,
                  "validation": {k: val_info[k] for k in ("sources", "settings", "split_rule", "documents")}}
    return CorpusJob(model=model, tokenizer=tokenizer, out=out, target=int(tokens), settings=settings,
                     provenance=provenance, prompts=rows, val=val, dtype=dtype, seq_len=seq_len,
                     batch_size=batch_size, seed=seed, temperature=float(temperature), progress=progress,
                     time_limit_s=time_limit_s, max_stalled_batches=max_stalled_batches, cache=cache)


def sample_corpus(model, tokenizer, out_dir, *, tokens: int, val_text_files, seq_len: int = 512,
                  batch_size: int = 64, seed: int = 0, temperature: float = 1.0, prompts="bos", prompt_tokens: int = 8,
                  progress: bool = True, time_limit_s: float | None = None,
                  max_stalled_batches: int = 32, cache: str = "dynamic") -> TokenData | None:
    """Sample a training corpus of at least ``tokens`` tokens from ``model`` into ``out_dir`` (see the module
    docstring for every rule) and return it as :class:`flextron.tokens.TokenData`.

    Args:
        model: a Hugging Face causal LM or a :class:`FlextronModel` (its active sub-network samples), on any device.
        tokenizer: the model's own tokenizer.
        out_dir: a new or empty folder, or one this function wrote before (then it continues).
        tokens: stop once at least this many training tokens are written.
        val_text_files: real text whose validation split (last 10% of documents) becomes ``val.bin``.
        prompts: ``"bos"`` (every document starts from ``<s>``) or text files (a path or a list) whose documents'
            first ``prompt_tokens`` ids start the documents, cycling; shorter documents are skipped.
        time_limit_s: stop after the batch in flight once this many seconds have passed; returns None then, and
            the folder continues on the next call.
        max_stalled_batches: raise :class:`SamplingStalled` after this many batches in a row without a new document.
        cache: ``"dynamic"`` (transformers' default cache) or ``"static"`` (a fixed-size cache; on a GPU transformers
            then compiles the decode step and replays it from CUDA graphs, after one compile). Part of
            the settings: a corpus continues with the cache it was started with.
    Already complete with at least ``tokens`` tokens: returns the cache as it is.
    """
    job = prepare_corpus(model, tokenizer, out_dir, tokens=tokens, val_text_files=val_text_files, seq_len=seq_len,
                         batch_size=batch_size, seed=seed, temperature=temperature, prompts=prompts,
                         prompt_tokens=prompt_tokens, progress=progress, time_limit_s=time_limit_s,
                         max_stalled_batches=max_stalled_batches, cache=cache)
    return job.run()
