"""The trainer on one process: bit-exact resume, atomic checkpoints, subnet sampling, bad input."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import flextron_kernels
from flextron import ElasticSpace, FlextronModel
from flextron import checkpoint as ckpt
from flextron.train import TrainConfig, Trainer, sample_subnets

from .train_utils import MAX_POS, tiny_fm, token_data


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=3, batch_size=2, seq_len=16, warmup=1, k_random=1, distill="inplace", log_every=1,
                eval_every=0, eval_widths=(1.0,), eval_windows=1, save_every=1, keep_checkpoints=0, progress=False)
    return TrainConfig(**{**base, **kw})


def _losses(history: list[dict]) -> dict[int, dict]:
    return {r["step"]: r["losses"] for r in history if "losses" in r}


def _tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@flextron_kernels.cpu_reference()
def test_resume_is_bit_exact(tmp_path):
    """A run stopped after a checkpoint and resumed equals the run straight through. The plain-torch ops, as a CPU
    run executes them (the kernels under the interpreter add most of a minute; the other trainer tests run them)."""
    data = token_data()
    full = Trainer(tiny_fm(), data, _cfg(), tmp_path / "a")
    ref = _losses(full.fit())
    assert sorted(ref) == [1, 2, 3]

    stopped = Trainer(tiny_fm(), data, _cfg(stop_at=2), tmp_path / "b")
    first = _losses(stopped.fit())
    assert [c.name for c in ckpt.list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step-00000001",
                                                                                        "step-00000002"]
    assert not (tmp_path / "b" / "model").exists()  # stopped early: no final export
    resumed = Trainer(tiny_fm(seed=5), data, _cfg(), tmp_path / "b", resume="latest")  # other init: all comes back
    assert resumed.step == 2
    second = _losses(resumed.fit())
    assert {**first, **second} == ref  # every subnet's loss, bit for bit
    a = FlextronModel.from_pretrained(tmp_path / "a" / "model").model.state_dict()
    b = FlextronModel.from_pretrained(tmp_path / "b" / "model").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [line for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines() if '"losses"' in line]
    assert len(steps) == 3  # one record per step, none duplicated by the resume


def test_kill_mid_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    t = Trainer(tiny_fm(), token_data(), _cfg(), tmp_path)
    good = t.save()
    before = _tree_digest(good)
    t.step = 1
    real_save = torch.save

    def dying_save(obj, f, *a, **kw):
        if str(f).endswith("optimizer.pt"):
            raise KeyboardInterrupt("killed mid-save")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        t.save()
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints") == good
    assert _tree_digest(good) == before
    # a half-written folder (as a SIGKILL leaves it) is never taken for a checkpoint
    (tmp_path / "checkpoints" / ".tmp-step-00000002").mkdir()
    (tmp_path / "checkpoints" / "step-00000003").mkdir()  # no meta.json: incomplete
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints") == good
    resumed = Trainer(tiny_fm(seed=3), token_data(), _cfg(), tmp_path, resume="latest")
    assert resumed.step == 0


def test_subnets_are_a_function_of_seed_and_step():
    fm = tiny_fm()
    cfg = _cfg(k_random=3)
    a, b = sample_subnets(fm, 7, cfg), sample_subnets(fm, 7, cfg)
    assert a == b
    names = [n for n, _ in a]
    assert names == ["full", "smallest", "random0", "random1", "random2"]
    assert a[0][1] is None and a[1][1].mlp == (24, 24) and a[1][1].heads == (2, 2)
    for _, s in a[2:]:
        fm.check_subnet(s)
    assert any(sample_subnets(fm, s, cfg)[2:] != a[2:] for s in range(8))


def test_uniform_and_mixed_random_subnets():
    """random_kind="uniform" draws one quantile of the space for every layer; "mixed" alternates with layerwise."""
    fm = tiny_fm()
    seen = set()
    for step in range(20):
        for _, s in sample_subnets(fm, step, _cfg(k_random=2, random_kind="uniform"))[2:]:
            fm.check_subnet(s)
            mq = {fm.mlp_choices(i).index(w) for i, w in enumerate(s.mlp)}
            hq = {fm.head_choices(i).index(h) for i, h in enumerate(s.heads)}
            assert len(mq) == 1 and len(hq) == 1, s
            seen.add((mq.pop(), hq.pop()))
    assert len(seen) > 3  # more than a fixed few subnets
    mixed = [sample_subnets(fm, step, _cfg(k_random=2, random_kind="mixed")) for step in range(20)]
    assert any(len(set(x[3][1].mlp)) > 1 or len(set(x[3][1].heads)) > 1 for x in mixed)  # random1 is layerwise
    with pytest.raises(ValueError, match="random_kind"):
        _cfg(random_kind="sometimes")


def _first_step_grads(tmp_path, name, **kw):
    """The gradients the optimizer sees at step 0 (clipping off, so they are the raw sum of subnet losses). fp32 on
    every device: the identity checked with these is exact up to fp32 rounding, not bf16's."""
    trainer = Trainer(tiny_fm(), token_data(), _cfg(distill="none", clip=0.0, bf16=False, **kw), tmp_path / name)
    seen = []
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (seen.append([p.grad.clone() for p in trainer.fm.parameters()]),
                                              step(*a, **k))[1]
    trainer.train_step()
    return seen[0]


@flextron_kernels.cpu_reference()
def test_full_weight_scales_only_the_full_models_gradient(tmp_path):
    """Weighted sandwich = unweighted sandwich + (w - 1) x the full model's own gradient (from a run that trains the
    full model alone on the same batch). The plain-torch ops; the trainer's step through the kernels is checked
    against an independent loss below."""
    g1 = _first_step_grads(tmp_path, "w1", k_random=1)
    g3 = _first_step_grads(tmp_path, "w3", k_random=1, full_weight=3.0)
    full = _first_step_grads(tmp_path, "full", sampling="full")
    assert any(float(f.abs().max()) > 0 for f in full)
    for a, b, f in zip(g1, g3, full):
        torch.testing.assert_close(b - a, 2.0 * f, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="full_weight"):
        _cfg(full_weight=0.0)


def test_parent_distillation_loss_at_step_zero(tmp_path):
    """At step 0 the frozen parent is the full model itself: its KL term is zero, so the full model's logged loss is
    ``(1 - alpha)`` x its cross-entropy on the batch, computed here apart from the trainer."""
    trainer = Trainer(tiny_fm(), token_data(), _cfg(distill="parent", alpha=0.25, k_random=0, bf16=False),
                      tmp_path / "run")
    starts = trainer.data.batch_starts(0, 2, 16, seed=0, mode="random")
    block = trainer.data.blocks(starts, 16)
    trainer.fm.set_subnet(None)
    with torch.no_grad():
        logits = trainer.fm(input_ids=block[:, :-1].to(trainer.device)).logits
    ce = torch.nn.functional.cross_entropy(logits.double().reshape(-1, logits.shape[-1]),
                                           block[:, 1:].reshape(-1).to(trainer.device))
    losses = trainer.train_step()["losses"]
    assert losses["full"] == pytest.approx(0.75 * float(ce), rel=1e-5)
    assert losses["smallest"] > losses["full"]


def test_seq_len_longer_than_model_allows(tmp_path):
    with pytest.raises(ValueError, match=rf"seq_len={MAX_POS + 1} is longer than the model allows \({MAX_POS}"):
        Trainer(tiny_fm(), token_data(), _cfg(seq_len=MAX_POS + 1), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_several_processes_without_parallel_refused(tmp_path, monkeypatch):
    """Under torchrun with 2 processes and parallel='none' each would train its own copy: refused, naming the fix."""
    import flextron.train

    monkeypatch.setattr(flextron.train, "init_distributed", lambda device, group: (0, 2, torch.device("cpu")))
    with pytest.raises(ValueError, match=r"parallel='none' with 2 processes: pass parallel='ddp' or 'fsdp'"):
        Trainer(tiny_fm(), token_data(), _cfg(), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_space_with_no_valid_subnet(tmp_path):
    # 3 query heads would split a KV group of 2 heads: no subnet of this space exists for the model. Conversion
    # refuses such a space; one assigned afterwards is refused before training starts.
    with pytest.raises(ValueError, match=r"space\.heads\[0\] = 3 must be a multiple of 2"):
        tiny_fm(space=ElasticSpace(heads=(3,)))
    fm = tiny_fm()
    fm.space = ElasticSpace(heads=(3,))
    with pytest.raises(ValueError, match="space .* has no valid subnet for this model"):
        Trainer(fm, token_data(), _cfg(), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_resume_from_another_models_checkpoint(tmp_path):
    t = Trainer(tiny_fm(), token_data(), _cfg(), tmp_path)
    saved = t.save()
    before = _tree_digest(tmp_path)
    with pytest.raises(ValueError, match="resume: checkpoint .* belongs to another model .*hidden|resume: .*another"):
        Trainer(tiny_fm(hidden=48), token_data(), _cfg(), tmp_path, resume="latest")
    assert _tree_digest(tmp_path) == before  # nothing saved was touched
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints") == saved
    # and a fresh run does not silently start over a directory that holds checkpoints
    with pytest.raises(ValueError, match="already holds checkpoints"):
        Trainer(tiny_fm(), token_data(), _cfg(), tmp_path)
    assert _tree_digest(tmp_path) == before


def test_command_line_from_hf_model_and_text(tmp_path):
    import argparse

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from flextron.cli.train import add_train_parser, run_train
    from flextron.data import STORIES260K_DIR, TINYSTORIES_EXCERPT

    torch.manual_seed(0)  # a tiny random model with the stories260K vocabulary, saved as a HF model directory
    LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=48, vocab_size=512,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                 max_position_embeddings=64)).save_pretrained(tmp_path / "hf")
    AutoTokenizer.from_pretrained(STORIES260K_DIR).save_pretrained(tmp_path / "hf")
    parser = argparse.ArgumentParser(prog="flextron")
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--model", str(tmp_path / "hf"), "--data", str(TINYSTORIES_EXCERPT),
                              "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "tok"), "--mlp", "0.5,1",
                              "--heads", "0.5,1", "--rank-windows", "2", "--steps", "1", "--batch-size", "1",
                              "--seq-len", "16", "--k-random", "0", "--eval-windows", "1", "--eval-widths", "0.5,1",
                              "--no-progress"])
    assert run_train(args) == 0
    fm = FlextronModel.from_pretrained(tmp_path / "run" / "model")
    assert fm.importance is not None and fm.space.mlp == (0.5, 1.0)  # ranked, with the space given
    assert (tmp_path / "tok" / "tokens.json").is_file()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3  # eval, step, eval
