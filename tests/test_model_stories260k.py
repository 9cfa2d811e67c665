"""The real pretrained stories260K (../shared/data): conversion, ranking, export, checkpoints."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from flextron import FlextronModel
from flextron.data import STORIES260K_DIR, read_stories, token_windows
from flextron.ranking import random_order

from .model_utils import rel

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HF_DIR = SHARED / "models" / "stories260K" / "hf"
TEXT = SHARED / "tinystories" / "TinyStories-train.part-A.txt"
pytestmark = pytest.mark.skipif(not HF_DIR.is_dir(), reason="shared/data/models/stories260K not present")


@pytest.fixture(scope="module")
def setup():
    orig = AutoModelForCausalLM.from_pretrained(HF_DIR).eval()
    tok = AutoTokenizer.from_pretrained(HF_DIR)
    stories = read_stories(TEXT, drop_last=True)
    calib = token_windows(tok, stories[:40], 64, max_windows=4)
    evals = token_windows(tok, stories[1000:1100], 64, max_windows=4)
    fm = FlextronModel.from_hf(copy.deepcopy(orig))
    with torch.no_grad():
        ref_logits = orig(input_ids=evals).logits
    fm.rank([calib])
    return orig, fm, calib, evals, ref_logits


def _loss(model, x):
    with torch.no_grad():
        logits = model(input_ids=x).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).item()


def test_bundled_copy_is_the_shared_checkpoint():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (STORIES260K_DIR / name).read_bytes() == (HF_DIR / name).read_bytes(), name


def test_full_width_equals_original_after_ranking(setup):
    orig, fm, calib, evals, ref_logits = setup
    with torch.no_grad():
        assert rel(fm(input_ids=evals).logits, ref_logits) < 1e-5
    assert fm.importance is not None and len(fm.importance["heads"][0]) == 8


def test_ranking_beats_random_order_at_half_width(setup):
    orig, fm, calib, evals, ref_logits = setup
    rnd = copy.deepcopy(fm)
    rnd.permute(**random_order(rnd, torch.Generator().manual_seed(0)))
    subnet = fm.uniform_subnet(mlp=0.5, heads=0.5)
    fm.set_subnet(subnet)
    rnd.set_subnet(subnet)
    try:
        assert _loss(fm, evals) < _loss(rnd, evals)
    finally:
        fm.set_subnet(None)


def test_extract_and_checkpoint(setup, tmp_path):
    orig, fm, calib, evals, ref_logits = setup
    subnet = fm.uniform_subnet(mlp=0.75, heads=0.5)
    fm.set_subnet(subnet)
    try:
        with torch.no_grad():
            want = fm(input_ids=evals).logits
        small = fm.extract(subnet)
        assert small.config.head_dim == 8 and small.config.num_key_value_heads == 2
        small.save_pretrained(tmp_path / "plain")
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
        with torch.no_grad():
            assert rel(loaded(input_ids=evals).logits, want) < 1e-5
        fm.save_pretrained(tmp_path / "fx")
        back = FlextronModel.from_pretrained(tmp_path / "fx")
        assert back.subnet == subnet
        with torch.no_grad():
            assert torch.equal(back(input_ids=evals).logits, want)
    finally:
        fm.set_subnet(None)
