"""The house rules that keep the code easy to change, checked on the code itself."""
import ast

import pytest

from conftest import REPO

ENTRY_SCRIPTS = sorted(p for p in REPO.glob("*.py") if '__name__ == "__main__"' in p.read_text())
MAX_LINES = 60


@pytest.mark.parametrize("script", ENTRY_SCRIPTS, ids=[p.name for p in ENTRY_SCRIPTS])
def test_entry_script_functions_read_at_a_glance(script):
    """No function of an entry script is longer than 60 lines (argument parsers aside)."""
    tree = ast.parse(script.read_text())
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.name != "get_args_parser" and node.end_lineno - node.lineno + 1 > MAX_LINES]
    assert not long, f"{script.name}: {', '.join(long)}"


def test_the_entry_scripts_are_the_ones_the_layout_names():
    names = {p.name for p in ENTRY_SCRIPTS}
    assert {"train_kd.py", "test_teacher.py", "evaluate.py", "demo.py", "benchmark.py",
            "compress.py", "report.py", "sweep.py"} <= names


def imports_of(path):
    tree = ast.parse(path.read_text())
    return {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
            for alias in node.names} | {(node.module or "").split(".")[0] for node in
                                        ast.walk(tree) if isinstance(node, ast.ImportFrom)}


def test_arrows_point_down_to_the_core():
    """No module imports an entry script, except the two that run the others' main() rather
    than copying them: demo.py and sweep.py (data.py, synth.py, plots.py, architecture.py
    and typeset.py are core modules with a small CLI; report.py imports architecture and
    typeset)."""
    entry = {p.stem for p in ENTRY_SCRIPTS} - {"data", "synth", "plots", "architecture",
                                                "typeset"}
    for path in sorted(REPO.glob("*.py")):
        if path.stem not in ("demo", "sweep"):
            wrong = imports_of(path) & (entry - {path.stem})
            assert not wrong, f"{path.name} imports the entry script(s) {sorted(wrong)}"
