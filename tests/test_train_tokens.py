"""Text files -> cached token ids: provenance, the held-out split, cache reuse, bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from flextron.data import STORIES260K_DIR
from flextron.tokens import SEPARATOR, mix, tokenize_files


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(STORIES260K_DIR)


def _write_stories(path, n=10, cut=True):
    text = "".join(f"Story {i}: once upon a time there was a cat named Tom {i}.\n{SEPARATOR}\n" for i in range(n))
    path.write_text(text + ("The last story is cut mid-sent" if cut else ""), encoding="utf-8")
    return path


def test_tokenize_split_provenance_and_cache(tmp_path, tokenizer, monkeypatch):
    src = _write_stories(tmp_path / "stories.txt")
    d = tokenize_files(src, tokenizer, tmp_path / "cache", val_fraction=0.2, progress=False)
    meta = json.loads((tmp_path / "cache" / "tokens.json").read_text())
    assert meta["documents"] == {"train": 8, "val": 2}  # the cut-off tail is dropped; the last 20% held out
    assert meta["sources"][0]["size"] == src.stat().st_size and len(meta["sources"][0]["sha256"]) == 64
    assert meta["tokenizer"]["vocab_size"] == 512 and meta["dtype"] == "uint16"
    assert isinstance(d.train, np.memmap) and d.train[0] == tokenizer.bos_token_id
    assert tokenizer.decode(d.val[1:12]).startswith("Story 8")
    assert tokenizer.decode(d.train).count("Story") == 8

    def boom(*a, **k):
        raise AssertionError("tokenized again although the cache is current")

    monkeypatch.setattr(type(tokenizer), "__call__", boom)
    again = tokenize_files(src, tokenizer, tmp_path / "cache", val_fraction=0.2, progress=False)
    assert np.array_equal(again.train, d.train)
    monkeypatch.undo()
    _write_stories(src, n=12)  # the text changed: tokenised again
    assert tokenize_files(src, tokenizer, tmp_path / "cache", val_fraction=0.2, progress=False).meta["documents"] == {
        "train": 10, "val": 2}


def test_blocks_random_and_sequential(tmp_path, tokenizer):
    d = tokenize_files(_write_stories(tmp_path / "s.txt"), tokenizer, tmp_path / "c", progress=False)
    r1, r2 = d.batch_starts(3, 4, 8, seed=1), d.batch_starts(3, 4, 8, seed=1)
    assert np.array_equal(r1, r2) and not np.array_equal(r1, d.batch_starts(4, 4, 8, seed=1))
    s = d.batch_starts(1, 2, 8, seed=0, mode="sequential")
    assert s.tolist() == [16, 24]
    b = d.blocks(s, 8)
    assert b.shape == (2, 9) and b[0].tolist() == d.train[16:25].tolist()


def test_missing_text_file(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        tokenize_files(tmp_path / "nope.txt", tokenizer, tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists()


def test_empty_text_file(tmp_path, tokenizer):
    good = _write_stories(tmp_path / "good.txt")
    tokenize_files(good, tokenizer, tmp_path / "cache", progress=False)
    before = (tmp_path / "cache" / "tokens.json").read_bytes()
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt.* is empty"):
        tokenize_files([good, tmp_path / "empty.txt"], tokenizer, tmp_path / "cache", progress=False)
    (tmp_path / "blank.txt").write_text(f"\n  \n{SEPARATOR}\n")
    with pytest.raises(ValueError, match="blank.txt.* holds no document"):
        tokenize_files([tmp_path / "blank.txt"], tokenizer, tmp_path / "cache", progress=False)
    assert (tmp_path / "cache" / "tokens.json").read_bytes() == before  # the existing cache is untouched


def test_mix_of_two_caches(tmp_path, tokenizer):
    """A share of each step's blocks from a second cache: the count, the blocks' contents from each source, a pure
    function of (seed, step), validation from the first cache, and bad input."""
    a = tokenize_files(_write_stories(tmp_path / "a.txt", n=40), tokenizer, tmp_path / "ca", progress=False)
    text = "".join(f"Zebra {i} runs far in the tall green grass today.\n{SEPARATOR}\n" for i in range(40))
    (tmp_path / "b.txt").write_text(text, encoding="utf-8")
    b = tokenize_files(tmp_path / "b.txt", tokenizer, tmp_path / "cb", progress=False)
    m = mix(a, b, 0.25)
    m.check_seq_len(8)
    starts = m.batch_starts(5, 16, 8, seed=3)
    assert np.array_equal(starts, m.batch_starts(5, 16, 8, seed=3))
    assert not np.array_equal(starts, m.batch_starts(6, 16, 8, seed=3))
    from_b = starts >= len(a.train)
    assert from_b.sum() == 4
    blocks = m.blocks(starts, 8)
    for s, row, other in zip(starts, blocks, from_b):
        src, off = (b.train, s - len(a.train)) if other else (a.train, s)
        assert 0 <= off <= len(src) - 9 and row.tolist() == src[off:off + 9].tolist()
    assert torch.equal(m.val_windows(8), a.val_windows(8)) and m.meta["mix"]["share"] == 0.25
    assert (mix(a, b, 0).batch_starts(5, 16, 8, seed=3) < len(a.train)).all()
    with pytest.raises(ValueError, match="random blocks only"):
        m.batch_starts(0, 4, 8, seed=0, mode="sequential")
    with pytest.raises(ValueError, match="share must be a number in"):
        mix(a, b, 1.0)
    b.meta["tokenizer"] = dict(b.meta["tokenizer"], vocab_sha256="0" * 64)
    with pytest.raises(ValueError, match="another tokenizer"):
        mix(a, b, 0.5)
