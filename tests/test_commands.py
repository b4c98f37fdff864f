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


def test_no_evaluation_scores_a_checkpoint_chosen_on_the_set_it_reports():
    """test.txt reports VOC val: it scores each run's final checkpoint, or a best one only
    when its training line chose it on another split (--val-split)."""
    val_split = {a[a.index("--out") + 1]: a[a.index("--val-split") + 1] if "--val-split" in a
                 else "val" for a in commands("train.txt") if "--out" in a}
    scored = [a for a in commands("test.txt") if "--model_path" in a]
    assert len(scored) >= 5  # the four students and compress.py
    for argv in scored:
        checkpoint = argv[argv.index("--model_path") + 1]
        assert checkpoint.startswith("models/") and checkpoint.endswith((".pth")), argv
        run, kind = checkpoint[len("models/"):-len(".pth")].rsplit("_", 1)
        reported = argv[argv.index("--split") + 1] if "--split" in argv else "val"
        assert kind == "last" or val_split[run] != reported, " ".join(argv)
