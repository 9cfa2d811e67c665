"""Text files -> token ids, tokenised once with the model's own tokenizer and kept as memory-mapped files.

A cache directory holds:

- ``train.bin`` / ``val.bin``: the token ids (``uint16`` when the vocabulary fits, else ``uint32``), each document
  as ``<s>`` (when the tokenizer has one) + its tokens, documents concatenated in file order;
- ``tokens.json``: provenance (every source file's path, size, mtime and sha256; the tokenizer's name, class, vocab
  size and a hash of its vocabulary; the separator and the split rule) and the token counts.

Documents are the pieces of each file between ``separator`` lines (TinyStories' ``<|endoftext|>``); a file without
the separator is one document. Text after the last separator of a file that has one is dropped, because a file cut
mid-story (like the shared 2 MiB TinyStories sample) ends in a partial document.

Validation split, a fixed rule: the last ``val_fraction`` of the documents (at least one) in file order are held out.
The same files and settings therefore always give the same split, and it does not depend on a random seed.

The cache is current when ``tokens.json`` matches the files (size and sha256) and the settings; then nothing is
tokenised again. Files are written to a temporary name and renamed, and ``tokens.json`` last, so an interrupted run
never leaves a cache that looks current.

:func:`open_cache` opens any complete cache directory of this format as it is, without the source files: one made
here, or a corpus sampled from the parent (:mod:`flextron.synth`, ``"synthetic": true`` in its ``tokens.json``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

FORMAT_VERSION = 1
META = "tokens.json"
SEPARATOR = "<|endoftext|>"


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> dict:
    """Name, class, vocabulary size and a sha256 of the sorted vocabulary: what decides the ids a text gets."""
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode("utf-8"))
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "class": type(tokenizer).__name__,
        "vocab_size": len(vocab),
        "vocab_sha256": h.hexdigest(),
        "bos_token_id": tokenizer.bos_token_id,
    }


def split_documents(text: str, separator: str | None = SEPARATOR) -> list[str]:
    """The non-empty documents of ``text`` (see the module docstring for the rule about the last piece)."""
    if separator is None or separator not in text:
        return [text.strip()] if text.strip() else []
    parts = text.split(separator)[:-1]
    return [p.strip() for p in parts if p.strip()]


def read_documents(paths: list[Path], separator: str | None = SEPARATOR) -> list[str]:
    """The documents of every file in order; ``ValueError`` naming a file that holds none."""
    docs: list[str] = []
    for p in paths:
        d = split_documents(Path(p).read_text(encoding="utf-8"), separator)
        if not d:
            raise ValueError(f"text file {str(p)!r} holds no document with text")
        docs += d
    return docs


def held_out_count(n_docs: int, val_fraction: float) -> int:
    """How many of ``n_docs`` documents (the last ones) the split rule holds out."""
    n_val = 0 if val_fraction == 0 else max(1, int(round(n_docs * val_fraction)))
    if n_val >= n_docs:
        raise ValueError(f"val_fraction={val_fraction} leaves no training document of {n_docs}")
    return n_val


def file_sources(paths: list[Path]) -> list[dict]:
    """Each file's provenance record: resolved path, size, mtime and sha256."""
    out = []
    for p in paths:
        st = p.stat()
        out.append({"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(p)})
    return out


def ids_dtype(tokenizer) -> type:
    """``np.uint16`` when every id of ``tokenizer`` fits, else ``np.uint32``."""
    return np.uint16 if max(len(tokenizer), len(tokenizer.get_vocab())) <= 1 << 16 else np.uint32


def _check_files(paths) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("text_files must name at least one text file")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"text file {str(p)!r} does not exist (or is not a file)")
        if p.stat().st_size == 0:
            raise ValueError(f"text file {str(p)!r} is empty: it holds no text to train on")
    return paths


@dataclass
class TokenData:
    """Memory-mapped train and validation token ids of one cache directory."""

    train: np.ndarray
    val: np.ndarray
    meta: dict
    path: Path

    def __repr__(self) -> str:
        return f"TokenData({self.path}, train={len(self.train):,} tokens, val={len(self.val):,} tokens)"

    def check_seq_len(self, seq_len: int) -> None:
        """Raise ``ValueError`` unless both splits hold at least one block of ``seq_len + 1`` tokens."""
        for name, arr in (("train", self.train), ("val", self.val)):
            if len(arr) < seq_len + 1:
                raise ValueError(
                    f"seq_len={seq_len} needs at least {seq_len + 1} tokens in the {name} split, "
                    f"but {self.path} holds {len(arr)}"
                )

    def blocks(self, starts: np.ndarray, seq_len: int, split: str = "train") -> torch.Tensor:
        """``[len(starts), seq_len + 1]`` int64 token ids: the block of ``seq_len + 1`` tokens at each start."""
        arr = self.train if split == "train" else self.val
        idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
        return torch.from_numpy(arr[idx].astype(np.int64))

    def batch_starts(self, step: int, n: int, seq_len: int, *, seed: int, mode: str = "random") -> np.ndarray:
        """The start offsets of the ``n`` train blocks of step ``step``: a pure function of (seed, step).

        ``random``: uniform over all offsets (a fresh generator seeded with ``(seed, step)``).
        ``sequential``: consecutive non-overlapping blocks, step after step, wrapping around at the end.
        Being a function of the step, the data position to resume from is just the step.
        """
        last = len(self.train) - (seq_len + 1)
        if mode == "random":
            rng = np.random.default_rng([seed, step, 0xDA7A])
            return rng.integers(0, last + 1, size=n)
        if mode == "sequential":
            per_pass = (len(self.train) - 1) // seq_len
            k = (np.arange(n, dtype=np.int64) + step * n) % per_pass
            return k * seq_len
        raise ValueError(f"mode must be 'random' or 'sequential', got {mode!r}")

    def val_windows(self, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
        """``[N, seq_len]`` non-overlapping windows of the validation split (in order, the first ``max_windows``)."""
        n = len(self.val) // seq_len
        if max_windows is not None:
            n = min(n, max_windows)
        if n == 0:
            raise ValueError(f"the validation split ({len(self.val)} tokens) holds no window of seq_len={seq_len}")
        return torch.from_numpy(np.asarray(self.val[: n * seq_len]).astype(np.int64)).view(n, seq_len)


@dataclass
class MixedTokenData(TokenData):
    """Training blocks from two token caches: ``round(share * n)`` of each step's ``n`` blocks from ``other``'s
    train split, at random positions of the batch, the rest from ``train``; validation, ``path`` and ``meta`` are
    the first cache's (``meta["mix"]`` records the second). Made by :func:`mix`."""

    other: TokenData | None = None
    share: float = 0.0

    def check_seq_len(self, seq_len: int) -> None:
        super().check_seq_len(seq_len)
        self.other.check_seq_len(seq_len)

    def batch_starts(self, step: int, n: int, seq_len: int, *, seed: int, mode: str = "random") -> np.ndarray:
        """Like :meth:`TokenData.batch_starts` (``random`` only): a block from ``other`` at offset ``o`` is
        ``len(train) + o``."""
        if mode != "random":
            raise ValueError(f"a mix of token caches draws random blocks only (mode='random'), got mode={mode!r}")
        rng = np.random.default_rng([seed, step, 0xDA7A, 0x313])
        from_other = rng.permutation(n) < round(self.share * n)
        starts = rng.integers(0, len(self.train) - seq_len, size=n)
        other = rng.integers(0, len(self.other.train) - seq_len, size=n)
        return np.where(from_other, len(self.train) + other, starts)

    def blocks(self, starts: np.ndarray, seq_len: int, split: str = "train") -> torch.Tensor:
        if split != "train":
            return super().blocks(starts, seq_len, split)
        starts = np.asarray(starts, dtype=np.int64)
        out = torch.empty((len(starts), seq_len + 1), dtype=torch.int64)
        mine = starts < len(self.train)
        if mine.any():
            out[torch.from_numpy(mine)] = super().blocks(starts[mine], seq_len)
        if (~mine).any():
            out[torch.from_numpy(~mine)] = self.other.blocks(starts[~mine] - len(self.train), seq_len)
        return out


def mix(data: TokenData, other: TokenData, share: float) -> MixedTokenData:
    """``data`` with a share ``share`` in [0, 1) of its training blocks drawn from ``other``'s train split instead,
    e.g. real text mixed into a corpus the parent sampled (:mod:`flextron.synth`). The two caches must hold the
    same token ids (one tokenizer); validation stays ``data``'s."""
    if not isinstance(data, TokenData) or not isinstance(other, TokenData):
        raise TypeError(f"data and other must be TokenData, got {type(data).__name__} and {type(other).__name__}")
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
        raise ValueError(f"share must be a number in [0, 1), got {share!r}")
    fp = [(d.meta.get("tokenizer") or {}).get("vocab_sha256") for d in (data, other)]
    if fp[0] != fp[1]:
        raise ValueError(f"other ({str(other.path)!r}) was tokenised with another tokenizer than data "
                         f"({str(data.path)!r}): vocab sha256 {fp[1]} against {fp[0]}")
    meta = dict(data.meta, mix={"other": str(other.path), "share": float(share), "other_tokens": other.meta["tokens"]})
    return MixedTokenData(train=data.train, val=data.val, meta=meta, path=data.path, other=other, share=float(share))


def default_cache_dir(paths: list[Path], fingerprint: dict, settings: dict) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flextron" / "tokens"
    key = json.dumps({"files": [str(p.resolve()) for p in paths], "tok": fingerprint["vocab_sha256"], **settings})
    return root / hashlib.sha256(key.encode()).hexdigest()[:16]


def _current(cache: Path, sources: list[dict], fingerprint: dict, settings: dict) -> dict | None:
    meta_path = cache / META
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = (meta.get("format_version") == FORMAT_VERSION and meta.get("settings") == settings
            and meta.get("tokenizer", {}).get("vocab_sha256") == fingerprint["vocab_sha256"]
            and [(s["path"], s["size"], s["sha256"]) for s in meta.get("sources", [])]
            == [(s["path"], s["size"], s["sha256"]) for s in sources])
    files_ok = all((cache / f).is_file() for f in ("train.bin", "val.bin"))
    return meta if same and files_ok else None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _open(cache: Path, meta: dict) -> TokenData:
    dtype = np.dtype(meta["dtype"])
    arrays = []
    for split in ("train", "val"):
        n = meta["tokens"][split]
        arrays.append(np.memmap(cache / f"{split}.bin", dtype=dtype, mode="r", shape=(n,)) if n else
                      np.zeros(0, dtype=dtype))
    return TokenData(train=arrays[0], val=arrays[1], meta=meta, path=cache)


def tokenize_files(text_files, tokenizer, cache_dir: str | Path | None = None, *, val_fraction: float = 0.1,
                   separator: str | None = SEPARATOR, progress: bool = True, chunk: int = 512) -> TokenData:
    """Tokenise ``text_files`` with ``tokenizer`` into a cache directory (once) and memory-map it.

    Args:
        text_files: a path or a list of paths to UTF-8 text files.
        tokenizer: a transformers tokenizer (the model's own).
        cache_dir: where the token files live; ``None``: ``$XDG_CACHE_HOME/flextron/tokens/<key>``.
        val_fraction: the fraction of documents held out (the last ones, in file order); in ``[0, 1)``.
        separator: the line between documents (``None``: each file is one document).
    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for an empty one or one without text.
    """
    paths = _check_files(text_files)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    fingerprint = tokenizer_fingerprint(tokenizer)
    settings = {"separator": separator, "val_fraction": val_fraction, "bos": tokenizer.bos_token_id}
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(paths, fingerprint, settings)
    sources = file_sources(paths)
    meta = _current(cache, sources, fingerprint, settings)
    if meta is not None:
        return _open(cache, meta)

    docs = read_documents(paths, separator)
    n_val = held_out_count(len(docs), val_fraction)
    dtype = ids_dtype(tokenizer)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out = {"train": [], "val": []}
    n_train_docs = len(docs) - n_val
    with tqdm(total=len(docs), desc="tokenizing", unit="doc", disable=not progress, leave=False) as bar:
        for i in range(0, len(docs), chunk):
            ids = tokenizer(docs[i:i + chunk], add_special_tokens=False, verbose=False)["input_ids"]
            for j, t in enumerate(ids):
                out["train" if i + j < n_train_docs else "val"].append(np.asarray(bos + t, dtype=dtype))
            bar.update(len(ids))
    cache.mkdir(parents=True, exist_ok=True)
    (cache / META).unlink(missing_ok=True)  # the cache is not current while its files change
    counts = {}
    for split, arrs in out.items():
        arr = np.concatenate(arrs) if arrs else np.zeros(0, dtype=dtype)
        counts[split] = int(len(arr))
        _write_atomic(cache / f"{split}.bin", arr.tobytes())
    meta = {
        "format_version": FORMAT_VERSION,
        "sources": sources,
        "tokenizer": fingerprint,
        "settings": settings,
        "split_rule": f"last {val_fraction:g} of documents in file order (at least one) are validation",
        "documents": {"train": n_train_docs, "val": n_val},
        "tokens": counts,
        "dtype": np.dtype(dtype).name,
    }
    _write_atomic(cache / META, (json.dumps(meta, indent=2) + "\n").encode())
    return _open(cache, meta)


def validation_ids(text_files, tokenizer, *, val_fraction: float = 0.1, separator: str | None = SEPARATOR,
                   chunk: int = 512) -> tuple[np.ndarray, dict]:
    """The validation split of ``text_files`` exactly as :func:`tokenize_files` makes it (the last ``val_fraction``
    of the documents, each as ``<s>`` + its ids), without tokenising the training documents. Returns
    ``(ids, info)``; ``info`` holds the sources, settings, split rule and document counts for provenance."""
    paths = _check_files(text_files)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    docs = read_documents(paths, separator)
    n_val = held_out_count(len(docs), val_fraction)
    dtype = ids_dtype(tokenizer)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    held = docs[len(docs) - n_val:]
    arrs = []
    for i in range(0, len(held), chunk):
        for t in tokenizer(held[i:i + chunk], add_special_tokens=False, verbose=False)["input_ids"]:
            arrs.append(np.asarray(bos + t, dtype=dtype))
    info = {
        "sources": file_sources(paths),
        "settings": {"separator": separator, "val_fraction": val_fraction, "bos": tokenizer.bos_token_id},
        "split_rule": f"last {val_fraction:g} of documents in file order (at least one) are validation",
        "documents": n_val,
        "documents_in_files": len(docs),
    }
    return np.concatenate(arrs), info


PROGRESS = "progress.json"  # an unfinished synthetic corpus (flextron.synth) keeps its state here


def open_cache(path: str | Path) -> TokenData:
    """Memory-map a prepared cache directory (``tokenize_files``' or a synthetic corpus of
    :func:`flextron.synth.sample_corpus`) as it is, without looking at any source file.

    Raises ``ValueError`` naming ``path`` when it is not a complete cache of this format: no ``tokens.json`` (for an
    unfinished synthetic corpus: how many tokens of how many it holds and how to continue), another format version,
    or ``train.bin``/``val.bin`` missing or of another size than ``tokens.json`` records.
    """
    cache = Path(path)
    if not cache.is_dir():
        raise ValueError(f"token cache {str(cache)!r} does not exist (or is not a directory)")
    meta_path = cache / META
    if not meta_path.is_file():
        progress = cache / PROGRESS
        if progress.is_file():
            try:
                p = json.loads(progress.read_text())
                have, want = int(p["train_tokens"]), int(p["target_tokens"])
            except (OSError, ValueError, KeyError, TypeError):
                have, want = None, None
            held = f"{have:,} of {want:,} training tokens" if have is not None else "an unknown number of tokens"
            raise ValueError(f"token cache {str(cache)!r} is an unfinished synthetic corpus ({held}): run the same "
                             f"`flextron sample-corpus` command (or sample_corpus with this out_dir) again to continue")
        raise ValueError(f"{str(cache)!r} is not a token cache (no {META})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"token cache {str(cache)!r}: cannot read {META}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise ValueError(f"token cache {str(cache)!r} has format version {version!r}, this flextron reads "
                         f"{FORMAT_VERSION}: make it again")
    try:
        dtype = np.dtype(meta["dtype"])
        counts = {split: int(meta["tokens"][split]) for split in ("train", "val")}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"token cache {str(cache)!r}: {META} lacks the dtype or token counts ({e})") from None
    for split, n in counts.items():
        f = cache / f"{split}.bin"
        if not f.is_file() or f.stat().st_size != n * dtype.itemsize:
            size = f"{f.stat().st_size} bytes" if f.is_file() else "missing"
            raise ValueError(f"token cache {str(cache)!r}: {split}.bin is {size}, {META} records {n} tokens of "
                             f"{dtype.name} ({n * dtype.itemsize} bytes)")
    return _open(cache, meta)
