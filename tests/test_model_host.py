"""The eager inference path's own work, by operator: a prompt's forward and a decode step of the FlextronModel
dispatch no operator the plain Hugging Face model does not (at full width), or the extracted plain model does not
(at a uniform sub-network): no extra launches, copies, value checks or host syncs (``aten._local_scalar_dense`` is
``.item()``).

Operators are counted with a ``TorchDispatchMode``; views are left out (they launch nothing). On the CPU the GPU's
dispatch is taken (``F.linear`` on the prefix views, SDPA on the kept heads), since the CPU's own falls back to the
references; on a GPU the model runs as it is."""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

import flextron.layers
from flextron import FlextronModel
from flextron_kernels import attention_backend
from tests.model_utils import FAMILIES, tiny_model, tokens
from tests.utils import DEVICE, ON_GPU

# transformers 5.2x deprecates ``past_key_values`` for ``cache``; older versions know only the former
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

VIEWS = {"view", "_unsafe_view", "t", "transpose", "slice", "select", "unsqueeze", "squeeze", "expand", "split",
         "unbind", "alias", "detach", "lift_fresh", "as_strided", "permute", "reshape", "_reshape_alias"}


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture()
def gpu_dispatch(monkeypatch):
    if ON_GPU:
        yield
        return
    monkeypatch.setattr(flextron.layers, "blas_serves", lambda x: True)
    with attention_backend("sdpa"):
        yield


def _step_ops(model, ids, mask) -> collections.Counter:
    """Operators of the prompt's forward and of one decode step after it (dynamic cache), the batch's padding mask
    passed; the step's counted under ``step:`` names."""
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        with _Ops() as prefill:
            out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        with _Ops() as step:
            model(input_ids=nxt, attention_mask=torch.cat([mask, mask[:, -1:]], 1), past_key_values=cache,
                  use_cache=True)
    return prefill.counts + collections.Counter({f"step:{k}": n for k, n in step.counts.items()})


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "left-padding"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_decode_dispatch_nothing_extra(family, padded, gpu_dispatch):
    hf = tiny_model(family).to(DEVICE)
    fm = FlextronModel.from_hf(copy.deepcopy(hf))
    ids = tokens(2, 12).to(DEVICE)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0
    base = _step_ops(hf, ids, mask)
    full = _step_ops(fm, ids, mask)
    assert not full - base, f"at full width beyond the HF model's: {dict(full - base)}"
    assert base["step:mm"] + base["step:addmm"] > 0 and base["mm"] + base["addmm"] > 0  # the counts saw products
    subnet = fm.uniform_subnet(mlp=0.5, heads=0.5)
    extracted = fm.extract(subnet)
    fm.set_subnet(subnet)
    part = _step_ops(fm, ids, mask)
    extra = part - _step_ops(extracted, ids, mask)
    if family == "gpt2":  # q, k and v of the kept heads are three row blocks of c_attn: three products, not one
        two = 2 * hf.config.n_layer
        assert extra == collections.Counter({"addmm": two, "step:addmm": two}), dict(extra)
    else:
        assert not extra, f"at {subnet} beyond the extracted model's: {dict(extra)}"
