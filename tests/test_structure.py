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


# The layout's entry scripts; every other top-level module is a library module, whether or
# not it also has a small CLI (data.py, plots.py, typeset.py, ...).
LAYOUT_ENTRY_SCRIPTS = {"train_kd.py", "test_teacher.py", "evaluate.py", "demo.py", "sweep.py",
                        "benchmark.py", "compress.py", "report.py", "pack.py", "predict.py"}
LIBRARY_MODULES = sorted(p for p in REPO.glob("*.py") if p.name not in LAYOUT_ENTRY_SCRIPTS)
MAX_LIBRARY_LINES = 450


@pytest.mark.parametrize("module", LIBRARY_MODULES, ids=[p.name for p in LIBRARY_MODULES])
def test_library_modules_stay_readable(module):
    lines = len(module.read_text().splitlines())
    assert lines <= MAX_LIBRARY_LINES, f"{module.name} has {lines} lines; split it by concern"


@pytest.mark.parametrize("name", sorted(LAYOUT_ENTRY_SCRIPTS - {"predict.py"}))
def test_layout_entry_scripts_keep_functions_short(name):
    """The 60-line rule holds for every entry script the layout names (they all exist)."""
    assert REPO / name in ENTRY_SCRIPTS, f"{name} is missing or has no __main__ block"


def test_no_grab_bag_utils():
    utils = REPO / "utils.py"
    assert not utils.exists() or len(utils.read_text().splitlines()) < 150


def test_the_training_loop_takes_no_cli_args_and_no_callback_from_the_entry_script():
    """engine.train_one_epoch gets explicit values, and train_kd.py defines no function or
    lambda that the loop calls back."""
    import inspect

    import engine
    params = inspect.signature(engine.train_one_epoch).parameters
    assert "args" not in params
    assert list(params)[:6] == ["model", "criterion", "optimizer", "loader", "device", "epoch"]
    tree = ast.parse((REPO / "train_kd.py").read_text())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and getattr(node.func, "id", None) == "train_one_epoch"]
    assert calls, "train_kd.py no longer calls train_one_epoch"
    for call in calls:
        passed = call.args + [k.value for k in call.keywords]
        assert not any(isinstance(a, ast.Lambda) for a in passed)
    caller = next(f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                  and any(c in ast.walk(f) for c in calls))
    nested = [n for n in ast.walk(caller) if n is not caller
              and isinstance(n, (ast.FunctionDef, ast.Lambda))]
    assert not nested, f"{caller.name} defines a callback"
