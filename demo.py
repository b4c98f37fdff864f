"""The lab, offline, on generated VOC-format data: does distillation help a small student?

    python demo.py                                   # about 13 min on 2 CPU cores; 12 with the teacher kept
    python demo.py --data-seed 1 --classes 6         # another generated task
    python demo.py --seeds 0 1 --epochs 4 --train 40 --val 40 --select 20 --pretrain 200   # a quick look

Why it is built this way: in the lab, the teacher (torchvision's FCN-ResNet50) learned from
far more images than the 1,464 VOC images the student sees, so its soft targets carry what
the student's labels cannot. The demo mirrors that: the teacher learns from a generated
"pretraining" set ten times the students' labelled set (another seed), the students from
the small set alone, with and without the teacher. A teacher trained on the students' own
images would know little that their labels do not already teach.

1. writes the data (synth.write_synth_voc) under ROOT/<its settings>/: students/ holds the
   labelled `train` split, the reported `val` split, and `select`, the split on which
   anything is chosen (sweeps, the demo's settings, the curves); pretrain/ the teacher's set;
2. trains the teacher (train_kd.py), or reuses it when its checkpoint exists for the same
   data and flags;
3. trains the students with sweep.py: alpha in {0, --alpha} x beta in {0, --beta} (no KD,
   response KD, feature KD, both), each with every seed of --seeds; a seed gives every
   method the same initialisation and data order (paired);
4. names the KD method expected to help most, chosen on `select`; then scores every final
   checkpoint (never a "best" one) on `val` with evaluate.py, and prints and saves the table:
   mean +- std over seeds, n, and each method's paired gain over no KD with its 95% Student's
   t interval and verdict ("helps" only when all of the interval lies above 0).

Stopped (Ctrl-C), the same command continues: finished runs are skipped and the interrupted
one resumes where it stopped. A run is named by the flags that change its training, so the
no-KD runs are shared by every --alpha and --beta (students_sweep_name). Results:
outputs/PREFIX_results.json, plots/PREFIX_comparison.png.
"""
import argparse
import hashlib
import json
import shlex
import time
from pathlib import Path

import evaluate
import intervals
import sweep
import train_kd
from cli import HelpFormatter, UserError, markdown_table, run_cli
from compute import (add_compute_flags, device_name, resolve_device,
                     set_compute_resources)
from files import save_json
from plots import comparison_chart
from synth import write_synth_voc

METHODS = {(False, False): "no_kd", (True, False): "response_kd", (False, True): "feature_kd",
           (True, True): "combined_kd"}  # (response on, feature on) -> name
PRETRAIN_SEED_OFFSET = 1000  # the teacher's images: another seed, never the students'


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = parser.add_argument_group("generated data")
    g.add_argument("--root", default="data/demo", help="where the generated trees go")
    g.add_argument("--train", type=int, default=160, help="the students' labelled images")
    g.add_argument("--val", type=int, default=300, help="reported images (the table's)")
    g.add_argument("--select", type=int, default=150,
                   help="images for choosing settings and drawing the curves, never reported")
    g.add_argument("--pretrain", type=int, default=1600,
                   help="the teacher's images, drawn with seed DATA_SEED + 1000")
    g.add_argument("--size", type=int, default=96, help="typical image side in pixels")
    g.add_argument("--classes", type=int, default=4, help="object classes in the generated data")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the generated data")
    g = parser.add_argument_group("teacher")
    g.add_argument("--teacher", default="lite", choices=("lite", "lab", "fcn_resnet50"),
                   help="teacher architecture, trained from scratch on the pretraining set")
    g.add_argument("--teacher-epochs", type=int, default=5, help="teacher training epochs")
    g = parser.add_argument_group("students")
    g.add_argument("--epochs", type=int, default=20, help="training epochs of each student")
    g.add_argument("--batch-size", type=int, default=8, help="images per step")
    g.add_argument("--crop-size", type=int, default=96, help="training crop")
    g.add_argument("--lr", type=float, default=1e-2, help="learning rate (AdamW, poly schedule)")
    g.add_argument("--scale-range", type=float, nargs=2, default=(0.75, 1.5), metavar=("MIN", "MAX"),
                   help="training rescale range (VOC's 0.5-2.0 blurs the small generated textures)")
    # chosen on 'select' by the sweeps in report/README.md#sweeps-sweeppy (docs/demo.md)
    g.add_argument("--alpha", type=float, default=0.5,
                   help="KD weight of the response runs (the sweep: 0.5 above 0.9 at every tau)")
    g.add_argument("--beta", type=float, default=0.5,
                   help="feature weight of the feature runs (the sweep: best of 0.5 to 10)")
    g.add_argument("--tau", type=float, default=1.0,
                   help="KD temperature (the sweep: 1 above 2 and 4)")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="training seeds, each run by every method (paired)")
    g.add_argument("--ema-decay", type=float, default=0.0, metavar="D",
                   help="score each student's exponential moving average of weights "
                        "(train_kd.py --ema-decay); 0: its last step's weights")
    g.add_argument("--val-every", type=int, default=5, metavar="N",
                   help="draw the 'select' curve every N epochs and after the last (scoring the "
                        "150 'select' images costs about a third of an epoch; docs/benchmark.md)")
    g.add_argument("--jobs", type=int, default=2,
                   help="student runs trained at once (sweep.py --jobs), sharing the threads")
    g = parser.add_argument_group("running and output")
    add_compute_flags(g, device="cpu")
    g.add_argument("--prefix", default="demo", help="run names and result files start with it")
    g.add_argument("--model-dir", default="models", help="where checkpoints go")
    g.add_argument("--output-dir", default="outputs", help="where results go")
    g.add_argument("--plot-dir", default="plots", help="where plots go")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return parser


def settings_hash(*parts):
    """A short name for settings: runs with other settings never take each other's files."""
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:8]


def make_data(args):
    """{'students': root, 'pretrain': root}, generated unless already there."""
    settings = {k: getattr(args, k) for k in ("train", "val", "select", "pretrain", "size",
                                              "classes", "data_seed")}
    name = f"seed{args.data_seed}_classes{args.classes}_{settings_hash(settings)}"
    folder = Path(args.root) / name
    trees = {"students": folder / "students", "pretrain": folder / "pretrain"}
    recipes = {"students": (args.train, args.val, args.data_seed, args.select),
               "pretrain": (args.pretrain, 50, args.data_seed + PRETRAIN_SEED_OFFSET, 0)}
    for name, (train, val, seed, select) in recipes.items():
        voc = trees[name] / "VOCdevkit" / "VOC2012"
        if (voc / "ImageSets" / "Segmentation" / "train.txt").is_file():
            print(f"using the generated {name} tree in {voc}")
            continue
        write_synth_voc(trees[name], train, val, args.size, seed,
                        num_object_classes=args.classes, n_select=select)
        print(f"generated {name}: {train} train + {val} val + {select} select images in {voc}")
    save_json(settings, folder / "settings.json")
    return trees, settings


def compute_argv(args, threads=None):
    """One device, worker and thread count for every run, chosen once at the start, so that
    the runs are comparable and a rerun computes the same bits. Like display_argv, never part
    of a run's name."""
    return ["--device", args.device, "--workers", str(args.workers),
            "--threads", str(threads or args.threads)]


def display_argv(args):
    """Progress bars: a rerun with or without --no-progress reuses every run."""
    return [] if args.progress else ["--no-progress"]


def common_argv(args):
    """The training flags every run shares."""
    return ["--batch-size", str(args.batch_size), "--crop-size", str(args.crop_size),
            "--lr", str(args.lr), "--scale-range", *map(str, args.scale_range),
            "--no-pretrained-backbone", "--no-download", "--model-dir", args.model_dir,
            "--output-dir", args.output_dir, "--plot-dir", args.plot_dir]


def rerun_hint():
    return ("rerun the same python demo.py command: finished runs are skipped and this one "
            "continues where it stopped")


def train_teacher(args, trees, settings):
    """The teacher's final checkpoint: trained, or reused (same data and flags: same name)."""
    argv = common_argv(args) + ["--data-root", str(trees["pretrain"]), "--student", args.teacher,
                                "--epochs", str(args.teacher_epochs), "--val-every",
                                str(args.val_every), "--seed", "0"]
    name = f"{args.prefix}_teacher_{settings_hash(settings, argv)}"
    argv = compute_argv(args) + display_argv(args) + argv
    last = Path(args.model_dir) / f"{name}_last.pth"
    if (Path(args.output_dir) / name / "summary.json").is_file() and last.is_file():
        print(f"\nteacher: reusing {last} (same data and flags; delete it to retrain)")
        return last
    print(f"\n$ python train_kd.py {shlex.join(argv + ['--out', name, '--resume', 'auto'])}")
    summary = train_kd.main(
        train_kd.get_args_parser().parse_args(argv + ["--out", name, "--resume", "auto"]),
        rerun=rerun_hint())
    sweep.stop_if_requested(summary, rerun_hint())
    return last


def students_sweep_name(args, settings, teacher, shared, axes):
    """The students' sweep name, keyed by the flags its runs share (``shared``), not by the
    --alpha and --beta ``axes``: sweep.py names each run NAME_alpha<A>_beta<B>_seed<S>, so a
    run is keyed by its own alpha and beta, and the no-KD runs (alpha0_beta0) are the same
    runs, trained once, for every --alpha and --beta (the feature-KD ones for every --alpha).
    --tau and the teacher stay in the key although no-KD ignores them: a sweep gives every run
    the same fixed flags, and sweep.py reuses a run only with the flags it was made with.
    A sweep named before, when the axes were in the key, is still used when it is there."""
    name = f"{args.prefix}_students_{settings_hash(settings, str(teacher), shared)}"
    before = f"{args.prefix}_students_{settings_hash(settings, str(teacher), shared + axes)}"
    folder = Path(args.output_dir) / "sweep"
    return before if (folder / before).is_dir() and not (folder / name).is_dir() else name


def train_students(args, trees, settings, teacher):
    """sweep.py over the four methods and the seeds; returns sweep.json's content."""
    shared = common_argv(args) + [
        "--data-root", str(trees["students"]), "--val-split", "select", "--student", "lite",
        "--teacher", args.teacher, "--teacher-weights", str(teacher), "--epochs", str(args.epochs),
        "--tau", str(args.tau), "--val-every", str(args.val_every)]
    if args.ema_decay:  # named only when on: the runs of a demo without it keep their names
        shared += ["--ema-decay", str(args.ema_decay)]
    axes = ["--alpha", "0", str(args.alpha), "--beta", "0", str(args.beta)]
    name = students_sweep_name(args, settings, teacher, shared, axes)
    argv = (["--name", name, "--seeds", *map(str, args.seeds), "--jobs", str(args.jobs)]
            + compute_argv(args, threads=max(1, args.threads // args.jobs))  # a share per job
            + display_argv(args) + shared + axes)
    print(f"\n$ python sweep.py {shlex.join(argv)}")
    return sweep.main(sweep.get_args_parser().parse_args(argv), rerun=rerun_hint())


def evaluate_on_val(args, checkpoint, data_root, json_path, visualize=False):
    """evaluate.py on the reported split ('val'), or its saved result when there is one."""
    if Path(json_path).is_file():
        result = json.loads(Path(json_path).read_text())
        if result.get("checkpoint") == str(checkpoint):
            return result
    argv = ["--model_path", str(checkpoint), "--data-root", str(data_root), "--split", "val",
            *compute_argv(args), *display_argv(args), "--no-download", "--output-dir",
            args.output_dir, "--json", str(json_path)]
    argv += ["--visualize", "--num_images", "4"] if visualize else []
    print(f"\n$ python evaluate.py {shlex.join(argv)}")
    return evaluate.main(evaluate.get_args_parser().parse_args(argv))


def teacher_row(args, trees, teacher):
    """The teacher's evaluation on the reported split, with its run's name and time."""
    run = teacher.stem[: -len("_last")]
    path = Path(args.output_dir) / args.prefix / f"{teacher.stem}_eval.json"
    summary = json.loads((Path(args.output_dir) / run / "summary.json").read_text())
    return {**evaluate_on_val(args, teacher, trees["students"], path, visualize=True), "run": run,
            "evaluation": str(path), "train_seconds": summary["train_seconds_total"]}


def method_of(setting):
    return METHODS[(float(setting["alpha"]) > 0, float(setting["beta"]) > 0)]


def score_students(args, trees, students):
    """{method: [evaluate.py results, one per seed, in seed order]} on the reported split."""
    scored = {}
    folder = Path(args.output_dir) / args.prefix / students["name"]
    for run in sorted(students["runs"], key=lambda r: r["seed"]):
        method = method_of(run["setting"])
        first = run["seed"] == args.seeds[0]
        result = evaluate_on_val(args, run["checkpoint"], trees["students"],
                                 folder / f"{run['name']}_eval.json",
                                 visualize=first and method == "combined_kd")
        scored.setdefault(method, []).append({
            **result, "seed": run["seed"], "train_seconds": run["train_seconds"], "run": run["name"],
            "evaluation": str(folder / f"{run['name']}_eval.json")})
    return scored


def expected_best(students):
    """The KD method expected to help most, chosen on 'select' before 'val' is scored: the
    largest mean paired gain over no KD of the runs' final checkpoints on the split their
    training validated on. Returns (method, {method: paired gain on select})."""
    by = {}
    for run in students["runs"]:
        by.setdefault(method_of(run["setting"]), {})[run["seed"]] = run["miou"]
    gains = {m: intervals.paired_gain(by[m], by["no_kd"]) for m in METHODS.values() if m != "no_kd"}
    return max(gains, key=lambda m: gains[m]["gain"]), gains


def method_rows(teacher_result, scored):
    """The table's rows: the teacher, then each method's mean, std, n and its paired gain
    over no KD with the 95% t-interval and the verdict; each names its runs and their
    evaluation files (report.py reads them)."""
    rows = [{"method": "teacher", "mious": [teacher_result["miou"]], "seeds": [0],
             "params": teacher_result["params"], "ms_per_image": teacher_result["ms_per_image"],
             "runs": [teacher_result["run"]], "evaluations": [teacher_result["evaluation"]],
             "train_seconds": teacher_result["train_seconds"]}]
    base = {r["seed"]: r["miou"] for r in scored["no_kd"]}
    for method in METHODS.values():
        runs = scored[method]
        row = {"method": method, "mious": [r["miou"] for r in runs],
               "seeds": [r["seed"] for r in runs], "params": runs[0]["params"],
               "ms_per_image": sorted(r["ms_per_image"] for r in runs)[len(runs) // 2],
               "runs": [r["run"] for r in runs], "evaluations": [r["evaluation"] for r in runs],
               "train_seconds": sum(r["train_seconds"] for r in runs) / len(runs)}
        if method != "no_kd":
            row["paired_gain"] = intervals.paired_gain({r["seed"]: r["miou"] for r in runs}, base)
        rows.append(row)
    for row in rows:
        row["mean"], row["std"], row["n"] = intervals.mean_std(row["mious"])
    return rows


def results_table(rows):
    return markdown_table(
        ["Knowledge distillation", "mIoU (%) mean ± std", "n",
         f"gain over no KD, {intervals.CONFIDENCE:.0%} CI (paired t)", "verdict", "# Parameters",
         "Inference (ms/image)"],
        [[r["method"], sweep.fmt_mean_std(r["mean"], r["std"], r["n"]), r["n"],
          sweep.fmt_gain(r["paired_gain"]) if "paired_gain" in r else "",
          r["paired_gain"]["verdict"] if "paired_gain" in r else "",
          f"{r['params']:,}", f"{r['ms_per_image']:.2f}"] for r in rows])


def verdict_lines(rows, expected):
    """Each KD method's verdict in a sentence, the expected one first."""
    lines = []
    for r in sorted(rows, key=lambda r: r["method"] != expected):
        if "paired_gain" not in r:
            continue
        g = r["paired_gain"]
        interval = "" if g["n"] < 2 else (f", {g['confidence']:.0%} CI {100 * g['ci_low']:+.2f} "
                                          f"to {100 * g['ci_high']:+.2f}")
        lines.append(f"- {r['method']}{' (expected to help most)' if r['method'] == expected else ''}"
                     f": {g['verdict']} ({100 * g['gain']:+.2f} points over no KD{interval}, "
                     f"{g['n']} paired seeds)")
    return lines


def run_lab(args):
    """Data, teacher, students, then the scores on 'val'; returns (rows, expected method,
    its gains on 'select', the teacher's checkpoint, the sweep's name, data settings, the
    wall seconds of each phase, so that a rerun's cost can be read off)."""
    phases, phase_start = {}, time.perf_counter()

    def phase(name):
        nonlocal phase_start
        phases[name], phase_start = time.perf_counter() - phase_start, time.perf_counter()

    trees, settings = make_data(args)
    phase("data")
    teacher = train_teacher(args, trees, settings)
    phase("teacher")
    students = train_students(args, trees, settings, teacher)
    phase("students")
    expected, on_select = expected_best(students)  # named before anything is scored on 'val'
    print(f"\nexpected to help most, chosen on 'select' before 'val' is scored: {expected} "
          f"({100 * on_select[expected]['gain']:+.2f} points over no KD on 'select')")
    rows = method_rows(teacher_row(args, trees, teacher), score_students(args, trees, students))
    phase("scoring")
    return rows, expected, on_select, teacher, students["name"], settings, phases


def main(args):
    start = time.perf_counter()
    if args.alpha <= 0 or args.beta <= 0:
        raise UserError("--alpha and --beta must be positive: the demo compares them with 0 "
                        "(no KD) itself")
    device = resolve_device(args.device)
    print(set_compute_resources(args, device))
    print(__doc__.split("\n\n")[2].replace("\n", " "))  # why the demo is built this way
    rows, expected, on_select, teacher, sweep_name, settings, phases = run_lab(args)
    table = results_table(rows)
    plot_path = comparison_chart(
        rows, Path(args.plot_dir) / f"{args.prefix}_comparison.png",
        f"Demo: final mIoU on {args.val} reported images, {len(args.seeds)} paired seeds "
        f"({device_name(device)})")
    results = {"rows": rows, "table_markdown": table, "expected_best": expected,
               "expected_best_on_select": on_select, "confidence": intervals.CONFIDENCE,
               "device": str(device), "hardware": device_name(device),
               "teacher_arch": args.teacher, "teacher_checkpoint": str(teacher),
               "student_arch": "lite", "sweep": sweep_name, "data": settings,
               "reported_split": "val", "selection_split": "select",
               "seconds": time.perf_counter() - start, "phase_seconds": phases,
               "args": vars(args)}
    out = Path(args.output_dir) / f"{args.prefix}_results.json"
    save_json(results, out)
    print(f"\n{table}\n\nfinal checkpoints scored on the {args.val} 'val' images, which chose "
          f"nothing (curves and sweeps use 'select'); teacher - no KD: "
          f"{100 * (rows[0]['mean'] - rows[1]['mean']):+.2f} points; {device_name(device)}")
    print("\n".join(verdict_lines(rows, expected)))
    print(f"saved {out} and {plot_path}; the demo took {results['seconds'] / 60:.1f} min ("
          + ", ".join(f"{k} {v / 60:.1f}" for k, v in phases.items()) + ")")
    return results


if __name__ == "__main__":
    run_cli(main, get_args_parser())
