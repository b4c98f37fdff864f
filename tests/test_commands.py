"""train.txt and test.txt hold commands that parse as written (fast; test_real_path runs
every one of them, the demo included, end to end)."""
import importlib
import shlex

import pytest

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
