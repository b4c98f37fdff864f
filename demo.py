"""Offline end-to-end demo: the whole lab on generated VOC-format data, in minutes, on a CPU.

1. writes a small VOC-format tree (data.py synth);
2. trains a teacher on it (no pretrained weights exist offline);
3. trains the student without KD, with response KD, feature KD, and both;
4. evaluates all five with evaluate.py and prints the lab's comparison table, saved to
   outputs/demo_results.json, with training plots in plots/ and overlays in outputs/.

    python demo.py
    python demo.py --epochs 3 --teacher-epochs 6 --train 48 --val 12   # a quicker look

The demo's teacher is not FCN-ResNet50: no pretrained weights exist offline, and from scratch
on 2 CPU cores FCN-ResNet50 needs about 1.4 s per step of 8 images at 96x96 and is still near
mIoU 0.05 after 100 steps. The larger 'lab' variant learns slower than 'lite' from scratch
within this budget too. So the teacher is the fastest learner, 'lite', given twice the
students' training: like a real teacher, it has seen far more compute than its student. Every step calls the
real scripts' main(), so the demo runs exactly the code that train.txt and test.txt run.
"""
import argparse
import shlex
import time
from pathlib import Path

import evaluate
import train_kd
from data import write_synth_voc
from utils import (HelpFormatter, add_compute_flags, device_name, markdown_table, resolve_device,
                   run_cli, save_json, set_compute_resources)

METHODS = (  # name, alpha, beta
    ("no_kd", 0.0, 0.0),
    ("response_kd", None, 0.0),
    ("feature_kd", 0.0, None),
    ("combined_kd", None, None),
)


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=HelpFormatter)
    g = parser.add_argument_group("generated data")
    g.add_argument("--root", default="data/demo", help="where the generated VOC tree goes")
    g.add_argument("--train", type=int, default=160, help="generated training images")
    g.add_argument("--val", type=int, default=40, help="generated validation images")
    g.add_argument("--size", type=int, default=96, help="typical image side in pixels")
    g.add_argument("--classes", type=int, default=4, help="object classes in the generated data")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the generated data")
    g = parser.add_argument_group("training")
    g.add_argument("--teacher", default="lite", choices=("lab", "lite"),
                   help="teacher architecture trained on the generated data")
    g.add_argument("--teacher-epochs", type=int, default=24, help="teacher training epochs")
    g.add_argument("--epochs", type=int, default=12, help="training epochs of each student")
    g.add_argument("--batch-size", type=int, default=8, help="images per step")
    g.add_argument("--crop-size", type=int, default=96, help="training crop")
    g.add_argument("--lr", type=float, default=1e-2, help="learning rate (AdamW, poly schedule)")
    g.add_argument("--scale-range", type=float, nargs=2, default=(0.75, 1.5), metavar=("MIN", "MAX"),
                   help="training rescale range (VOC's 0.5-2.0 blurs the small generated textures)")
    g.add_argument("--alpha", type=float, default=0.5, help="KD weight of the response runs")
    g.add_argument("--beta", type=float, default=1.0, help="feature weight of the feature runs")
    g.add_argument("--tau", type=float, default=2.0, help="KD temperature (measured on this data at 8 epochs: 4 learns slowest)")
    g.add_argument("--seed", type=int, default=0, help="training seed")
    g.add_argument("--val-every", type=int, default=4, metavar="N",
                   help="validate every N epochs and after the last (validation is a sixth of a "
                        "demo epoch; docs/benchmark.md)")
    g = parser.add_argument_group("running and output")
    add_compute_flags(g, device="cpu")
    g.add_argument("--prefix", default="demo", help="run names are PREFIX_teacher, PREFIX_no_kd, ...")
    g.add_argument("--model-dir", default="models", help="where checkpoints go")
    g.add_argument("--output-dir", default="outputs", help="where results go")
    g.add_argument("--plot-dir", default="plots", help="where plots go")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return parser


def run_script(module, argv):
    """Run ``module.main`` on exactly the flags a user would type, and echo the command."""
    print(f"\n$ python {module.__name__}.py {shlex.join(argv)}", flush=True)
    return module.main(module.get_args_parser().parse_args(argv))


def compute_argv(args):
    """One device, worker and thread count for every run, chosen once at the start, so that
    the runs are comparable and a rerun computes the same bits."""
    return ["--device", args.device, "--workers", str(args.workers), "--threads", str(args.threads)]


def train_argv(args, name, student, alpha, beta, epochs, teacher_weights=None):
    argv = ["--data-root", args.root, "--out", name, "--student", student,
            "--alpha", str(alpha), "--beta", str(beta), "--tau", str(args.tau),
            "--epochs", str(epochs), "--batch-size", str(args.batch_size),
            "--crop-size", str(args.crop_size), "--lr", str(args.lr), "--seed", str(args.seed),
            "--scale-range", *map(str, args.scale_range), "--val-every", str(args.val_every),
            *compute_argv(args), "--no-pretrained-backbone",
            "--no-download", "--overwrite", "--model-dir", args.model_dir,
            "--output-dir", args.output_dir, "--plot-dir", args.plot_dir]
    if teacher_weights:
        argv += ["--teacher", args.teacher, "--teacher-weights", teacher_weights]
    if not args.progress:
        argv.append("--no-progress")
    return argv


def results_table(rows):
    return markdown_table(
        ["Knowledge distillation", "mIoU (%)", "# Parameters", "Inference (ms/image)", "FPS"],
        [[r["method"], f"{100 * r['miou']:.2f}", f"{r['params']:,}", f"{r['ms_per_image']:.2f}",
          f"{r['fps']:.1f}"] for r in rows])


def plot_comparison(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["method"] for r in rows]
    ax.bar(names, [100 * r["miou"] for r in rows],
           color=["#555555"] + ["#4C72B0"] * (len(rows) - 1))
    for i, r in enumerate(rows):
        ax.text(i, 100 * r["miou"], f"{100 * r['miou']:.1f}", ha="center", va="bottom")
    ax.set(ylabel="val mIoU (%)", title="Demo: teacher vs student with and without KD")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args):
    start = time.perf_counter()
    device = resolve_device(args.device)
    print(set_compute_resources(args, device))
    voc = Path(args.root) / "VOCdevkit" / "VOC2012"
    if not voc.is_dir():
        write_synth_voc(args.root, args.train, args.val, args.size, args.data_seed,
                        num_object_classes=args.classes)
        print(f"generated {args.train} train + {args.val} val images in {voc}")
    else:
        print(f"using the generated tree in {voc} (delete it to regenerate)")

    p = args.prefix
    teacher_ckpt = str(Path(args.model_dir) / f"{p}_teacher_best.pth")
    summaries = {"teacher": run_script(train_kd, train_argv(
        args, f"{p}_teacher", args.teacher, 0.0, 0.0, args.teacher_epochs))}
    for method, alpha, beta in METHODS:
        alpha = args.alpha if alpha is None else alpha
        beta = args.beta if beta is None else beta
        summaries[method] = run_script(train_kd, train_argv(
            args, f"{p}_{method}", "lite", alpha, beta, args.epochs,
            teacher_ckpt if alpha > 0 or beta > 0 else None))

    rows = []
    for method, summary in summaries.items():
        argv = ["--model_path", summary["best_checkpoint"], "--data-root", args.root,
                *compute_argv(args), "--no-download",
                "--output-dir", args.output_dir,
                "--json", str(Path(args.output_dir) / p / f"{method}_eval.json")]
        if method in ("teacher", "combined_kd"):
            argv += ["--visualize", "--num_images", "4"]
        result = run_script(evaluate, argv)
        rows.append({"method": method, "miou": result["miou"], "params": result["params"],
                     "ms_per_image": result["ms_per_image"], "fps": result["fps"],
                     "pixel_accuracy": result["pixel_accuracy"],
                     "train_seconds": summary["train_seconds_total"],
                     "alpha": summary["alpha"], "beta": summary["beta"],
                     "checkpoint": summary["best_checkpoint"]})

    table = results_table(rows)
    plot_path = Path(args.plot_dir) / f"{p}_comparison.png"
    plot_comparison(rows, plot_path)
    results = {"rows": rows, "device": str(device), "hardware": device_name(device),
               "teacher_arch": args.teacher, "student_arch": "lite", "tau": args.tau,
               "data": {"root": args.root, "train": args.train, "val": args.val, "size": args.size},
               "seconds": time.perf_counter() - start, "table_markdown": table,
               "args": vars(args)}
    out = Path(args.output_dir) / f"{p}_results.json"
    save_json(results, out)
    print(f"\n{table}\n\nteacher - no-KD student: "
          f"{100 * (rows[0]['miou'] - rows[1]['miou']):+.2f} mIoU points")
    print(f"saved {out} and {plot_path}; the demo took {results['seconds'] / 60:.1f} min")
    return results


if __name__ == "__main__":
    run_cli(main, get_args_parser())
