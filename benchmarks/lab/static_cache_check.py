"""Greedy tokens of a tiny GPT-2/Llama sub-network with each cache, compiled or not, against HF's masked model."""

import copy
import sys

import torch

sys.path.insert(0, ".")
from flextron import FlextronModel
from tests.model_utils import masked_reference, tiny_model, tokens

dev = "cuda" if torch.cuda.is_available() else "cpu"
for fam in ["gpt2", "llama_gqa", "qwen2"]:
    orig = tiny_model(fam).to(dev)
    fm = FlextronModel.from_hf(copy.deepcopy(orig))
    sub = fm.uniform_subnet(0.5, 0.5)
    fm.set_subnet(sub)
    ref = masked_reference(orig, sub)
    x = tokens(2, 6).to(dev)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(x))
    rows = {}
    for name, m in (("fm", fm), ("ref", ref)):
        rows[f"{name} dynamic"] = m.generate(x, **kw)
        rows[f"{name} static"] = m.generate(x, cache_implementation="static", **kw)
        rows[f"{name} static eager"] = m.generate(x, cache_implementation="static", disable_compile=True, **kw)
    base = rows["ref dynamic"]
    print(fam, {k: bool(torch.equal(v, base)) for k, v in rows.items()})
    print("  ref dynamic", base[:, 6:].tolist(), " fm static", rows["fm static"][:, 6:].tolist())
