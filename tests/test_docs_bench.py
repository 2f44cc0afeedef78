"""The README and the benchmarks as a first-time user meets them: every file they
name exists, every bench script answers --help, and every flag says what it does."""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = sorted((ROOT / "bench").glob("*.py"))
DOCS = [ROOT / "README.md", ROOT / "bench" / "RESULTS.md", *BENCH]
TOP = ("csrc", "metal", "python", "tests", "bench", ".ci")


def _expand(path: str):
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [p for alt in m.group(1).split(",") for p in _expand(path[: m.start()] + alt + path[m.end() :])]


def referenced_files(doc: Path):
    text = doc.read_text()
    refs = set(re.findall(r"\]\(([\w./-]+)\)", text))  # markdown links
    refs |= set(re.findall(r"(?<![\w/.~-])([\w./-]+\.md)\b", text))  # any *.md named
    refs |= {
        t for t in re.findall(r"(?<![\w/.~<-])((?:%s)/[\w./{},-]*)" % "|".join(map(re.escape, TOP)), text)
    }
    return sorted(r.rstrip(".,") for r in refs if not r.startswith(("http:", "https:")))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_file_exists(doc):
    missing = []
    for ref in referenced_files(doc):
        for path in _expand(ref):
            if not any((base / path).exists() for base in (ROOT, doc.parent)):
                missing.append(path)
    assert not missing, f"{doc.relative_to(ROOT)} names files the repository lacks: {missing}"


def _parser(script: Path) -> argparse.ArgumentParser:
    sys.path.insert(0, str(script.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{script.stem}", script)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(script.parent))
    assert hasattr(mod, "build_parser"), f"{script.name}: no build_parser()"
    return mod.build_parser()


@pytest.mark.parametrize("script", BENCH, ids=lambda p: p.name)
def test_bench_flags_have_help(script):
    ap = _parser(script)
    undocumented = [a.option_strings or a.dest for a in ap._actions if not a.help]
    assert not undocumented, f"{script.name}: flags without help: {undocumented}"
    # The description is the whole module docstring: never cut mid-sentence.
    assert ap.description and ap.description.strip() == (sys.modules[f"bench_{script.stem}"].__doc__.strip())


@pytest.mark.parametrize("script", BENCH, ids=lambda p: p.name)
def test_bench_help_runs(script):
    r = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: {script.name}"), r.stdout[:200]


def test_quick_start_clones_first_and_venv_is_ignored():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "git clone" in quick and quick.index("git clone") < quick.index("pip install")
    assert "demo --workdir" in quick
    ignored = (ROOT / ".gitignore").read_text().split()
    assert ".venv/" in ignored or ".venv" in ignored
