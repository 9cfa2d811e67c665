"""bf16 as accurate as the plain HF model: every hidden state's error against fp32 within 1.1x of HF's own (CUDA).

A 4-layer Llama of Llama-2-7B width with random weights: the fp32 model is the reference; the HF model in bf16 is
the bar. At a sub-network the bar is the extracted plain model in bf16 against the fp32 extract.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flextron import FlextronModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels run on CUDA")


def _states(model, x):
    with torch.no_grad():
        out = model(input_ids=x, output_hidden_states=True)
    return [h.float() for h in (*out.hidden_states, out.logits)]


def _errors(got, ref):
    return [((g - r).norm() / r.norm()).item() for g, r in zip(got, ref)]


@pytest.fixture(scope="module")
def fp32_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=4, vocab_size=32000, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).cuda().eval()


@pytest.mark.parametrize("tokens", [16, 1024])
@pytest.mark.parametrize("width", [1.0, 0.5])
def test_bf16_error_within_hf(fp32_model, tokens, width):
    x = torch.randint(0, 32000, (2, tokens // 2), device="cuda")
    fm32 = FlextronModel.from_hf(copy.deepcopy(fp32_model))
    subnet = fm32.uniform_subnet(mlp=width, heads=width)
    ref32 = fp32_model if width == 1.0 else fm32.extract(subnet)
    bar = _errors(_states(copy.deepcopy(ref32).to(torch.bfloat16), x), _states(ref32, x))
    fm = FlextronModel.from_hf(copy.deepcopy(fp32_model).to(torch.bfloat16))
    fm.set_subnet(subnet)
    got = _errors(_states(fm, x), _states(ref32, x))
    for i, (g, b) in enumerate(zip(got, bar)):
        assert g <= 1.1 * b, f"hidden state {i}: flextron bf16 error {g:.3e}, HF's {b:.3e} (all: {got} vs {bar})"
