"""scripts/train_experiment.py's plot: in-run evaluations placed at the training tokens they were taken at, and a
PNG with its three panels written from a results dict as the script saves it."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import train_experiment as te  # noqa: E402

WIDTHS = ("0.25", "0.5", "0.75", "1")


def _history(ppl0: float, tokens_per_step: int, steps=(0, 10, 20)) -> list[dict]:
    out = []
    for s in steps:
        if s:
            out.append({"step": s, "loss": 1.0, "losses": {"full": 1.0, "smallest": 2.0},
                        "tokens": s * tokens_per_step})
        out.append({"step": s, "eval": {w: ppl0 / (1 + s) * (2 - float(w)) for w in WIDTHS}})
    return out


def test_evals_are_placed_at_their_tokens():
    tok, evals = te._evals_by_tokens(_history(100.0, 4096))
    assert tok == [0.0, 10 * 4096 / 1e6, 20 * 4096 / 1e6]
    assert [e["1"] for e in evals] == [100.0, 100.0 / 11, 100.0 / 21]
    # a history without training rows (no tokens to place them by) or without evaluations gives nothing
    assert te._evals_by_tokens([{"step": 0, "eval": {"1": 3.0}}]) == ([], [])
    assert te._evals_by_tokens([{"step": 5, "tokens": 50, "losses": {}}]) == ([], [])


def test_plot_writes_three_panels(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ppl = {w: 10.0 * (2 - float(w)) for w in WIDTHS}
    results = {"parent": {"ppl": {w: 50.0 * (2 - float(w)) for w in WIDTHS}},
               "elastic": {"ppl": ppl, "history": _history(100.0, 512)},
               "baselines": {w: {"ppl": ppl[w] * 0.9, "history": [
                   {"step": 0, "eval": {"1": 90.0}}, {"step": 10, "tokens": 5120, "losses": {"full": 1.0}},
                   {"step": 10, "eval": {"1": 9.0}}]} for w in WIDTHS[:3]}}
    saved = []
    real_savefig = plt.Figure.savefig

    def spy(fig, path, **kw):
        saved.append([a for a in fig.axes if a.get_visible()])
        return real_savefig(fig, path, **kw)

    plt.Figure.savefig = spy
    try:
        te.plot(results, tmp_path / "p.png", "toy")
    finally:
        plt.Figure.savefig = real_savefig
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (axes,) = saved
    assert [a.get_title() for a in axes] == ["toy", "in-run evaluations against tokens",
                                             "training loss per sampled subnet"]
    # the middle panel: one elastic curve per width and one dedicated curve per baseline, at their tokens
    lines = {ln.get_label(): ln for ln in axes[1].get_lines()}
    assert set(lines) == {f"elastic {float(w):.0%}" for w in WIDTHS} | {f"dedicated {float(w):.0%}"
                                                                         for w in WIDTHS[:3]}
    assert list(lines["elastic 100%"].get_xdata()) == [0.0, 10 * 512 / 1e6, 20 * 512 / 1e6]
    assert list(lines["dedicated 50%"].get_ydata()) == [90.0, 9.0]
