"""Result trees shaped like python demo.py's and like the real lab's (train.txt / test.txt),
written from made-up numbers in a few milliseconds, for report.py's tests:

    python tests/report_fixtures.py /tmp/fx demo     # then: python report.py --outputs
    python tests/report_fixtures.py /tmp/fx voc      #   /tmp/fx/outputs --plots /tmp/fx/plots ...

Every file has the keys that train_kd.py, evaluate.py and demo.py write; the numbers are
random draws, so a test that passes compares the report with the files, not with constants.
"""
import functools
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import intervals  # noqa: E402
import train_kd  # noqa: E402
from data import VOC_CLASSES  # noqa: E402

DEMO_CLASSES = VOC_CLASSES[:5]
METHOD_WEIGHTS = {"no_kd": (0, 0), "response_kd": (0.5, 0), "feature_kd": (0, 0.5),
                  "combined_kd": (0.5, 0.5)}


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def run_args(name, *flags):
    """The args dict train_kd.py saves for ``flags``."""
    return vars(train_kd.get_args_parser().parse_args(["--out", name, *map(str, flags)]))


def write_run(outputs, name, args, rng, params=1298981):
    """outputs/NAME/summary.json and history.jsonl of a finished run."""
    records = []
    for epoch in range(1, args["epochs"] + 1):
        val = epoch % args["val_every"] == 0 or epoch == args["epochs"]
        records.append({"epoch": epoch, "loss_total": 2 / epoch ** 0.5 + 0.1 * rng.random(),
                        "loss_ce": 1.5 / epoch ** 0.5,
                        "val_miou": 0.3 + 0.4 * (1 - 1 / epoch) + 0.05 * rng.random() if val else None,
                        "epoch_seconds": 5 + rng.random(), "train_seconds": 4.5})
    (outputs / name).mkdir(parents=True, exist_ok=True)
    (outputs / name / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write(outputs / name / "summary.json", {
        "name": name, "student": args["student"], "alpha": args["alpha"], "beta": args["beta"],
        "tau": args["tau"], "epochs": args["epochs"], "params": params,
        "train_seconds_total": sum(r["epoch_seconds"] for r in records),
        "device": "cpu", "hardware": "CPU (test, 2 threads)", "git": "abc1234", "args": args})


def fake_eval(rng, checkpoint, classes, params=1298981, split="val", overlays=None):
    miou = 0.4 + 0.4 * rng.random()
    result = {"miou": miou, "params": params, "ms_per_image": 5 + 20 * rng.random(),
              "per_class_iou": {c: min(1.0, max(0.0, miou + 0.3 * (rng.random() - 0.5)))
                                for c in classes},
              "device": "cpu", "hardware": "CPU (test, 2 threads)", "git": "abc1234",
              "checkpoint": checkpoint, "split": split, "num_images": 10}
    result["fps"] = 1000 / result["ms_per_image"]
    if overlays:
        result["overlays"] = overlays
    return result


@functools.lru_cache
def drawn_overlays():
    """A success and a failure overlay as evaluate.py --visualize draws them, drawn once per
    session (a second each) and copied where a tree needs them."""
    from plots import save_overlay
    folder = Path(tempfile.mkdtemp(prefix="overlays"))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    target = np.zeros((48, 64), dtype=np.int64)
    target[10:30, 10:40] = 1
    return [save_overlay(image, target, np.roll(target, shift, 1), folder / f"{kind}_img{i}.png",
                         title=f"img{i}: image mIoU {miou} ({kind})")
            for i, (kind, shift, miou) in enumerate((("success", 2, 91.0), ("failure", 20, 12.0)))]


def write_overlays(folder, title):
    folder.mkdir(parents=True, exist_ok=True)
    return [str(shutil.copy(path, folder / path.name)) for path in drawn_overlays()]


def demo_tree(root, seeds=(0, 1, 2, 3), seed=0):
    """outputs/ and plots/ as python demo.py leaves them (paired seeds, 'val' reported)."""
    rng, outputs = random.Random(seed), Path(root) / "outputs"
    common = ["--epochs", 12, "--val-every", 3, "--crop-size", 96, "--batch-size", 8,
              "--lr", 0.01, "--no-pretrained-backbone", "--val-split", "select", "--teacher", "lite"]
    teacher = "demo_teacher_75ff3821"
    write_run(outputs, teacher, run_args(teacher, *common), rng)
    t_eval = outputs / "demo" / f"{teacher}_last_eval.json"
    write(t_eval, fake_eval(rng, f"models/{teacher}_last.pth", DEMO_CLASSES, overlays=write_overlays(
        outputs / f"{teacher}_last_overlays", f"{teacher}_last")))
    t = json.loads(t_eval.read_text())
    rows = [{"method": "teacher", "mious": [t["miou"]], "seeds": [0], "params": t["params"],
             "ms_per_image": t["ms_per_image"], "runs": [teacher], "evaluations": [str(t_eval)],
             "train_seconds": 300.0}]
    base = {}
    for method, (alpha, beta) in METHOD_WEIGHTS.items():
        runs, evals, mious = [], [], []
        for s in seeds:
            name = f"demo_students_2ef8b4c1_alpha{alpha:g}_beta{beta:g}_seed{s}"
            write_run(outputs, name, run_args(name, *common, "--alpha", alpha, "--beta", beta,
                                              "--tau", 1, "--seed", s), rng)
            path = outputs / "demo" / "demo_students_2ef8b4c1" / f"{name}_eval.json"
            overlays = write_overlays(outputs / f"{name}_last_overlays", f"{name}_last") \
                if method == "combined_kd" and s == seeds[0] else None
            write(path, fake_eval(rng, f"models/{name}_last.pth", DEMO_CLASSES, overlays=overlays))
            runs.append(name)
            evals.append(str(path))
            mious.append(json.loads(path.read_text())["miou"])
        row = {"method": method, "mious": mious, "seeds": list(seeds), "params": 1298981,
               "ms_per_image": 10.0, "runs": runs, "evaluations": evals, "train_seconds": 90.0}
        if method == "no_kd":
            base = dict(zip(seeds, mious))
        else:
            row["paired_gain"] = intervals.paired_gain(dict(zip(seeds, mious)), base)
        rows.append(row)
    for row in rows:
        row["mean"], row["std"], row["n"] = intervals.mean_std(row["mious"])
    write(outputs / "demo_results.json", {
        "rows": rows, "table_markdown": "| demo's own table |", "reported_split": "val",
        "teacher_arch": "lite", "student_arch": "lite", "hardware": "CPU (test, 2 threads)",
        "data": {"train": 40, "val": 300, "select": 150, "pretrain": 1600, "size": 96,
                 "classes": 4, "data_seed": 0}})
    return outputs


VOC_RUNS = {  # train.txt's runs: name -> flags
    "no_kd": ["--alpha", 0, "--beta", 0],
    "response_kd": ["--alpha", 0.5, "--tau", 4, "--beta", 0],
    "feature_kd": ["--alpha", 0, "--beta", 1.0],
    "combined_kd": ["--alpha", 0.5, "--tau", 4, "--beta", 1.0],
    "pixel_pair_kd": ["--w-pixel", 100, "--w-pair", 1],
    "cwd_kd": ["--w-cwd", 3, "--cwd-tau", 4],
    "lab_no_kd": ["--student", "lab"],
}


def voc_tree(root, runs=VOC_RUNS, seed=0):
    """outputs/ as train.txt and test.txt leave them: a run per line, teacher_eval.json and
    NAME_eval.json for each run (21 VOC classes)."""
    rng, outputs = random.Random(seed), Path(root) / "outputs"
    common = ["--epochs", 30, "--batch-size", 8, "--lr", 1e-3, "--crop-size", 480]
    write(outputs / "teacher_eval.json", fake_eval(rng, None, VOC_CLASSES, params=35322218))
    for name, flags in runs.items():
        write_run(outputs, name, run_args(name, *common, *flags), rng)
        overlays = write_overlays(outputs / f"{name}_last_overlays", f"{name}_last") \
            if name == "no_kd" else None
        write(outputs / f"{name}_eval.json",
              fake_eval(rng, f"models/{name}_last.pth", VOC_CLASSES, overlays=overlays))
    return outputs


if __name__ == "__main__":
    (demo_tree if sys.argv[2] == "demo" else voc_tree)(Path(sys.argv[1]))
    print(f"wrote {sys.argv[1]}/outputs")
