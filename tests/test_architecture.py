"""The house rules that keep the code changeable, checked on the source itself.

- A stage module (one ``run_all.sh`` or a documented command runs) parses its
  arguments, calls library functions and writes artefacts; it never imports
  another stage module (not even inside a function), so shared pieces live
  in the library, once.
- Library modules import no stage module either.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: modules that are run as stages: run_all.sh's, plus the documented commands run on their own
#: (the embeddings stage; tagging new audio and exporting a tagger, which read a finished run)
EXTRA_STAGES = {"pipeline.embeddings", "pipeline.predict", "pipeline.export"}


def stage_modules() -> set[str]:
    text = (ROOT / "run_all.sh").read_text()
    found = set(re.findall(r'stage "[^"]+" ([a-z_.]+)', text)) | set(re.findall(r'-m (pipeline\.summary)', text))
    return found | EXTRA_STAGES


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-local imports included)."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)  # from pipeline import train
    return out


def module_path(name: str) -> Path:
    return ROOT / (name.replace(".", "/") + ".py")


def library_modules() -> list[str]:
    stages = stage_modules()
    names = []
    for package in ("pipeline", "stacking", "models"):
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            if name not in stages and not name.endswith("__init__"):
                names.append(name)
    return names


def test_the_stage_list_is_what_run_all_runs():
    stages = stage_modules()
    assert {"pipeline.features", "pipeline.folds", "pipeline.pseudo_label", "pipeline.train", "stacking.stack",
            "pipeline.report", "pipeline.summary", "pipeline.embeddings", "pipeline.predict", "pipeline.export"} <= stages
    for name in stages:
        assert module_path(name).is_file(), name


@pytest.mark.parametrize("stage", sorted(stage_modules()))
def test_no_stage_imports_another_stage(stage):
    others = stage_modules() - {stage}
    bad = sorted(imported_modules(module_path(stage)) & others)
    assert not bad, f"{stage} imports stage module(s) {bad}: move what it needs into a library module"


def test_no_library_module_imports_a_stage():
    stages = stage_modules()
    bad = {name: sorted(imported_modules(module_path(name)) & stages) for name in library_modules()}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"library modules importing stages: {bad}"


def test_stage_modules_are_thin():
    """A stage holds its command line and the calls; the work is in the library."""
    for name in sorted(stage_modules()):
        tree = ast.parse(module_path(name).read_text())
        functions = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        size = len(module_path(name).read_text().splitlines())
        assert len(functions) <= 4 and size <= 200, (
            f"{name}: {len(functions)} top-level functions/classes, {size} lines: move the work into the library")


def test_the_import_parser_sees_function_local_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from pipeline.train import x\n    import pipeline.folds\n")
    assert {"pipeline.train", "pipeline.folds"} <= imported_modules(path)
