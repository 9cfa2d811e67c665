"""The documentation: guides with current figures, not a history, and benchmark tables generated from results files.

Scans the Markdown files of the repository's docs (README.md, CHANGELOG.md, docs/, benchmarks/) for history
language and commit hashes (allowed only in results-file names and links to them), checks that every relative
link in README.md and docs/ resolves, and runs benchmarks/tables.py on the kept results.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def markdown_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md"]
    for folder in ("docs", "benchmarks"):
        files += sorted((ROOT / folder).rglob("*.md"))
    return [f for f in files if f.is_file()]


def load_tables():
    spec = importlib.util.spec_from_file_location("bench_tables", ROOT / "benchmarks" / "tables.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through the module
    spec.loader.exec_module(mod)
    return mod


HISTORY = [
    re.compile(r"\bsessions?\b", re.I),
    re.compile(r"\bissue\s*#", re.I),
    re.compile(r"\bissue\s+\d", re.I),
    re.compile(r"\blent\b", re.I),
    re.compile(r"\bthe other run\b", re.I),
    re.compile(r"\bwe tried\b", re.I),
]
LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)\)")
RESULT_NAME = re.compile(r"[\w./-]*\.(?:json|log)\b")
HEX = re.compile(r"(?<![\w./-])[0-9a-f]{7,40}(?![\w-])")


def without_result_refs(text: str) -> str:
    """The text with links to results files (text and target) and bare results-file names removed."""
    text = LINK.sub(lambda m: "" if RESULT_NAME.search(m.group(2)) else m.group(0), text)
    return RESULT_NAME.sub("", text)


def commit_hashes(text: str) -> list[str]:
    return [h for h in HEX.findall(without_result_refs(text)) if re.search(r"\d", h) and re.search(r"[a-f]", h)]


def test_markdown_files_found():
    names = {f.relative_to(ROOT).as_posix() for f in markdown_files()}
    assert {"README.md", "CHANGELOG.md", "benchmarks/README.md"} <= names
    assert any(n.startswith("docs/") for n in names)


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_history_language(path: Path):
    bad = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        bad += [f"{path.name}:{i}: {p.pattern!r} in {line.strip()[:100]!r}" for p in HISTORY if p.search(line)]
    assert not bad, "history language (docs are guides; history is git's):\n" + "\n".join(bad)


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_commit_hashes(path: Path):
    bad = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        bad += [f"{path.name}:{i}: {h}" for h in commit_hashes(line)]
    assert not bad, "commit hashes outside results-file links:\n" + "\n".join(bad)


def test_hash_rule_itself():
    assert commit_hashes("fixed in 2a6367d") == ["2a6367d"]
    assert commit_hashes("commit [2a6367d](results/nested_mlp_20261205T221715Z.json)") == []
    assert commit_hashes("see results/sliced_linear_NVIDIA_H200_6064814.json") == []
    assert commit_hashes("6,550,000,000 tokens, 1234567, deadbeef, 8192 tokens") == []


def doc_links() -> list[tuple[Path, str]]:
    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for m in LINK.finditer(path.read_text(encoding="utf-8")):
            target = m.group(2)
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue
            out.append((path, target))
    return out


def test_relative_links_resolve():
    links = doc_links()
    assert links
    missing = [f"{p.relative_to(ROOT)} -> {t}" for p, t in links
               if not (p.parent / t.split("#", 1)[0]).exists()]
    assert not missing, "broken relative links:\n" + "\n".join(missing)


def test_docs_json_files_are_linked():
    """Every JSON file under docs/ is the linked source of a figure in some guide."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "docs").glob("*.md"))
    linked = {(ROOT / "docs" / t.split("#", 1)[0]).resolve() for t in (m.group(2) for m in LINK.finditer(text))}
    unlinked = [p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.json") if p.resolve() not in linked]
    assert not unlinked, f"JSON files no guide links to: {unlinked}"


def test_tables_run_on_kept_results():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tables.py")], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for kind in ("sliced_linear", "nested_mlp", "elastic_attention", "latency tables", "torch.compile"):
        assert f"### {kind}" in proc.stdout or kind in proc.stdout, kind
    assert "nan" not in proc.stdout.lower().replace("nanosecond", "")


def test_benchmarks_readme_tables_current():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tables.py"), "--check",
                           str(ROOT / "benchmarks" / "README.md")], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_one_current_file_per_benchmark_and_gpu():
    tables = load_tables()
    groups = tables.current(r for p in RESULTS.glob("*.json") if (r := tables.load(p)) is not None)
    extra = {k: [r.path.name for r in rs] for k, rs in groups.items() if len(rs) > 1}
    assert not extra, f"older result files to delete (git keeps them): {extra}"
    assert not list(RESULTS.glob("*.log")), "stale .log files in benchmarks/results"


def test_tables_robust(tmp_path: Path):
    tables = load_tables()
    (tmp_path / "not_json.json").write_text("{")
    (tmp_path / "a_list.json").write_text("[1, 2]")
    (tmp_path / "mystery_NVIDIA_H100_abcdef1.json").write_text(json.dumps({"gpu": "NVIDIA H100", "rows": []}))
    old = {"bench": "nested_mlp", "gpu": "G", "commit": "1111111", "date": "20260101T000000Z", "cases": []}
    new = dict(old, commit="2222222", date="20260102T000000Z",
               cases=[{"model": "llama2-7b", "T": 1, "mix": "full", "pass": "fwd",
                       "ms": {"flextron": 1.0, "dense": 2.0}}])
    (tmp_path / "nested_mlp_20260101T000000Z.json").write_text(json.dumps(old))
    (tmp_path / "nested_mlp_20260102T000000Z.json").write_text(json.dumps(new))
    out = tables.render(tmp_path)
    assert "commit [2222222](results/nested_mlp_20260102T000000Z.json), 2026-01-02" in out
    assert "1111111" not in out
    assert "| fwd | 1 | full | 2.00x" in out
    assert "mystery" in out  # unknown kinds are listed in the index
    assert tables.kind_of("nested_mlp_explore_20261205T213216Z.json") == "nested_mlp_explore"
    assert tables.kind_of("nested_mlp_explore_NVIDIA_H100_80GB_HBM3.json") == "nested_mlp_explore"
    assert tables.norm_date("2026-12-04T19:13:20+00:00") == tables.norm_date("20261204T191320Z")
    with pytest.raises(ValueError, match="markers"):
        tables.splice("no markers here", "x")
    assert tables.main(["--results", str(tmp_path / "missing")]) == 2
