"""scripts/smollm2_prepare.py's text: WikiText-2 raw cut into articles and paragraphs that flextron's token cache
reads back as the same documents."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from flextron.tokens import SEPARATOR, split_documents

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import smollm2_prepare as prep  # noqa: E402

WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw"


@pytest.mark.skipif(not (WIKI / "wiki.test.raw").is_file(), reason="shared/data/wikitext-2-raw not present")
def test_articles_and_paragraphs_round_trip():
    text = (WIKI / "wiki.test.raw").read_text(encoding="utf-8")
    lines = text.splitlines()
    headings = [x for x in lines if re.fullmatch(r" = [^=].* = ", x)]  # level-1 headings; "= = x = =" are sections
    docs = prep.articles(text)
    assert len(docs) == len(headings) == 62
    assert [d.splitlines()[0].strip() for d in docs] == [h.strip() for h in headings]
    # nothing lost or added: the articles hold every non-empty line, in order
    assert [x.strip() for d in docs for x in d.splitlines() if x.strip()] == [x.strip() for x in lines if x.strip()]
    paras = prep.paragraphs(text)
    assert paras and all(not p.startswith("=") for p in paras)
    assert len(paras) == sum(1 for x in lines if x.strip() and not x.strip().startswith("="))
    # the token cache's document rule reads back exactly these documents
    assert split_documents(prep.join_docs(docs), SEPARATOR) == docs
    assert split_documents(prep.join_docs(paras), SEPARATOR) == paras


def test_bad_input_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["smollm2_prepare.py", "--out", str(out), "--gguf", str(tmp_path / "no.gguf")])
    with pytest.raises(SystemExit, match="--gguf: no GGUF file"):
        prep.main()
    monkeypatch.setattr(sys, "argv", ["smollm2_prepare.py", "--out", str(out), "--wikitext", str(tmp_path),
                                      "--gguf", str(tmp_path / "x.gguf")])
    (tmp_path / "x.gguf").write_bytes(b"x")
    with pytest.raises(SystemExit, match="--wikitext: .*wiki.valid.raw does not exist"):
        prep.main()
    bad = tmp_path / prep.GGUF_NAME  # the packaged file's name with other bytes
    bad.write_bytes(b"not a gguf")
    (tmp_path / "wiki.valid.raw").write_text(" = A = \n text\n")
    (tmp_path / "wiki.test.raw").write_text(" = B = \n text\n")
    monkeypatch.setattr(sys, "argv", ["smollm2_prepare.py", "--out", str(out), "--gguf", str(bad),
                                      "--wikitext", str(tmp_path)])
    with pytest.raises(SystemExit, match="sha256"):
        prep.main()
    assert not out.exists()
