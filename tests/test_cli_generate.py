"""``flextron generate``: the text each prompt gets at its budget, streamed for one prompt, batched for several."""

from __future__ import annotations

import pytest
import torch

from flextron import FlextronModel
from flextron.cli import main
from flextron.data import load_stories260k
from flextron_kernels import cpu_reference


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, tok = load_stories260k()
    path = tmp_path_factory.mktemp("gen") / "ck"
    fm = FlextronModel.from_hf(model, tokenizer=tok)
    fm.save_pretrained(path)
    return path, fm, tok


def _alone(fm, tok, prompt: str, budget: float, n: int) -> str:
    fm.set_subnet(fm.uniform_subnet(mlp=budget, heads=budget))
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = fm.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id or 0,
                          attention_mask=torch.ones_like(ids))
    fm.set_subnet(None)
    return prompt + tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_one_prompt_streams_the_subnets_text(checkpoint, capsys):
    path, fm, tok = checkpoint
    with cpu_reference():
        assert main(["generate", str(path), "--prompt", "Once upon a time", "--budget", "0.75",
                     "--max-new-tokens", "12"]) == 0
        want = _alone(fm, tok, "Once upon a time", 0.75, 12)
    out = capsys.readouterr().out
    assert "Subnet(mlp=[128/172 (74%)] * 5, heads=[6/8 (75%)] * 5)" in out
    assert want in out
    assert f"tokens/s on {'cuda' if torch.cuda.is_available() else 'cpu'}" in out  # --device auto


def test_one_budget_per_prompt_in_one_batch(checkpoint, capsys):
    path, fm, tok = checkpoint
    prompts = ["Once upon a time", "Tom had a red ball and"]
    with cpu_reference():
        assert main(["generate", str(path), "--prompt", prompts[0], "--prompt", prompts[1], "--budget", "1,0.75",
                     "--max-new-tokens", "10"]) == 0
        want = [_alone(fm, tok, prompts[0], 1.0, 10), _alone(fm, tok, prompts[1], 0.75, 10)]
    out = capsys.readouterr().out
    assert all(w in out for w in want), (out, want)


@pytest.mark.parametrize("argv, match", [
    (["--prompt", "a", "--prompt", "b", "--budget", "0.5,0.5,1"], "--budget gives 3 fractions for 2 prompts"),
    ([], "give at least one prompt"),
    (["--prompt", "a", "--budget", "1.5"], "argument --budget: 1.5 is not a fraction in"),
])
def test_bad_input_is_one_line(checkpoint, capsys, argv, match):
    path, _, _ = checkpoint
    try:
        code = main(["generate", str(path), *argv])
    except SystemExit as e:  # argparse's own errors exit
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err and "Traceback" not in err
