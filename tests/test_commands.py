"""train.txt and test.txt hold commands that parse as written; the demo wires everything."""
import importlib
import json
import shlex

import pytest

import demo
from conftest import REPO


def commands(name):
    lines = (REPO / name).read_text().splitlines()
    return [shlex.split(line) for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("name", ["train.txt", "test.txt"])
def test_every_command_line_parses_with_its_script(name):
    seen = set()
    for argv in commands(name):
        assert argv[0] == "python" and argv[1].endswith(".py"), argv
        module = importlib.import_module(argv[1][:-3])
        module.get_args_parser().parse_args(argv[2:])  # exits on an unknown flag
        seen.add(argv[1])
    if name == "train.txt":
        runs = {a[a.index("--out") + 1] for a in commands(name) if "--out" in a}
        assert {"no_kd", "response_kd", "feature_kd", "combined_kd"} <= runs
    else:
        assert {"test_teacher.py", "evaluate.py"} <= seen


def test_demo_runs_end_to_end_on_tiny_settings(tmp_path):
    args = demo.get_args_parser().parse_args([
        "--root", str(tmp_path / "data"), "--train", "8", "--val", "3", "--size", "48",
        "--teacher-epochs", "1", "--epochs", "1", "--batch-size", "4", "--crop-size", "48",
        "--model-dir", str(tmp_path / "models"), "--output-dir", str(tmp_path / "outputs"),
        "--plot-dir", str(tmp_path / "plots"), "--no-progress"])
    demo.main(args)
    results = json.loads((tmp_path / "outputs/demo_results.json").read_text())
    methods = [row["method"] for row in results["rows"]]
    assert methods == ["teacher", "no_kd", "response_kd", "feature_kd", "combined_kd"]
    for row in results["rows"]:
        assert {"miou", "params", "ms_per_image", "fps"} <= set(row)
        evaluation = json.loads((tmp_path / f"outputs/demo/{row['method']}_eval.json").read_text())
        assert row["miou"] == evaluation["miou"] and row["params"] == evaluation["params"]
    assert (tmp_path / "plots/demo_comparison.png").is_file()
    assert (tmp_path / "plots/demo_combined_kd_loss.png").is_file()
