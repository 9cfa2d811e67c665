"""``extract`` builds the small model in place of the weights it takes: no random initialisation of real tensors,
the source's dtype and device, and tensors of its own."""

from __future__ import annotations

import pytest
import torch

from flextron import FlextronModel, Subnet

from .model_utils import rel, tiny_model, tokens


@pytest.fixture
def init_spy(monkeypatch):
    """The non-meta tensors that random initialisation touches."""
    touched = []
    for name in ("normal_", "uniform_"):
        orig = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=orig, **k):
            if not self.is_meta:
                touched.append(tuple(self.shape))
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return touched


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2", "gpt2"])
def test_extract_initialises_nothing_and_keeps_dtype(family, init_spy):
    fm = FlextronModel.from_hf(tiny_model(family).to(torch.bfloat16))
    subnet = fm.uniform_subnet(mlp=0.5, heads=1.0 if family == "gpt2" else 0.5)
    init_spy.clear()
    small = fm.extract(subnet)
    assert init_spy == []  # built on the meta device, then given the cut weights
    tensors = [*small.parameters(), *small.buffers()]
    assert all(not t.is_meta for t in tensors)
    assert {p.dtype for p in small.parameters()} == {torch.bfloat16}
    if family == "llama_gqa":  # tied embeddings stay tied
        assert small.lm_head.weight is small.model.embed_tokens.weight
    x = tokens()
    fm.set_subnet(subnet)
    with torch.no_grad():
        assert rel(small(input_ids=x).logits, fm(input_ids=x).logits) < 1e-2


@pytest.mark.parametrize("plain", [True, False])
def test_exports_own_their_tensors(plain):
    fm = FlextronModel.from_hf(tiny_model("llama_gqa"))
    g = fm.attention_blocks[0].group_size
    subnet = fm.uniform_subnet(mlp=0.5, heads=0.5) if plain else Subnet(mlp=[fm.mlp_choices(0)[0], 72], heads=[g, 6])
    small = fm.extract(subnet)
    x = tokens()
    with torch.no_grad():
        before = small(input_ids=x).logits
        for p in fm.parameters():  # changing the source leaves the export as it was
            p.add_(1.0)
        assert torch.equal(small(input_ids=x).logits, before)
    source = {p.data_ptr() for p in fm.parameters()} | {b.data_ptr() for b in fm.buffers()}
    assert not source & {t.data_ptr() for t in (*small.parameters(), *small.buffers())}

