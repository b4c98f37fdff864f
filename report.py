"""Rebuild report/ from the result files in outputs/ and the plots in plots/; no number is typed.

report/README.md gets the lab's table (method, mIoU, parameters, inference speed, training
time), training curves, a per-class IoU chart, a gallery of successes and failures, the
benchmark and compression tables, and the hardware behind each result. Every figure is
copied into report/ so the folder stands alone. A result that does not exist shows as
"not run" with the command that would produce it.

Source rule (--source auto): the real-VOC results named in test.txt
(outputs/teacher_eval.json, outputs/no_kd_eval.json, ...) when at least one of them exists,
otherwise the offline demo's (outputs/demo_results.json and the evaluations it names).
Sweeps (outputs/sweep/*/sweep.json, sweep.py) get a section of their own.
One source per report, never a mix: demo numbers are on generated data.

    python report.py
    python report.py --source demo --out report
"""
import argparse
import json
import os
import shlex
import shutil
import tempfile
from pathlib import Path

from utils import REPO_DIR, HelpFormatter, UserError, markdown_table, run_cli

METHODS = (  # name, label in the lab's table
    ("teacher", "Teacher"),
    ("no_kd", "Without KD"),
    ("response_kd", "Response-based"),
    ("feature_kd", "Feature-based"),
    ("combined_kd", "Combined (response + feature)"),
)
MAIN_HEADER = ("Knowledge distillation", "mIoU (%)", "# Parameters", "Inference (ms/image)", "FPS",
               "Training time (min)", "Source")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--outputs", default="outputs", help="where the result JSONs are")
    parser.add_argument("--plots", default="plots", help="where train_kd.py drew its curves")
    parser.add_argument("--out", default="report", help="the report folder to (re)build")
    parser.add_argument("--source", default="auto", choices=("auto", "voc", "demo"),
                        help="voc: outputs/NAME_eval.json (test.txt); demo: outputs/demo/; "
                             "auto: voc when any of its files exists, else demo")
    return parser


# --------------------------------------------------------------------------- reading

def read_json(path):
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); rerun the command that wrote it") from None


def command_for(method, source):
    """The command that produces ``method``'s evaluation, taken from test.txt / train.txt."""
    if source == "demo":
        return "python demo.py"
    target = "outputs/teacher_eval.json" if method == "teacher" else f"outputs/{method}_eval.json"
    for line in (REPO_DIR / "test.txt").read_text().splitlines():
        if line.startswith("python") and target in shlex.split(line):
            return line
    return f"python evaluate.py --model_path models/{method}_last.pth --json {target}"


def demo_row(outputs, method):
    """The method's row of outputs/demo_results.json (its runs, one per seed), or {}."""
    rows = (read_json(outputs / "demo_results.json") or {}).get("rows", [])
    return next((r for r in rows if r["method"] == method), {})


def eval_path(outputs, method, source):
    """The evaluation a row shows: the run's (VOC), or the demo's first seed's."""
    if source == "demo":
        evaluations = demo_row(outputs, method).get("evaluations") or ["(not run)"]
        return Path(evaluations[0])
    return outputs / f"{method}_eval.json"


def choose_source(outputs, requested):
    if requested != "auto":
        return requested
    voc = any(eval_path(outputs, m, "voc").is_file() for m, _ in METHODS)
    return "voc" if voc else "demo"


def extra_methods(outputs, source):
    """Evaluations beyond the lab's five (advanced KD runs of test.txt), by file name."""
    if source == "demo":
        return []
    known = {f"{m}_eval.json" for m, _ in METHODS}
    return sorted(p.name[: -len("_eval.json")] for p in outputs.glob("*_eval.json") if p.name not in known)


def train_seconds(outputs, method, source, demo_results):
    """Total training time: the run's summary.json, or the demo's results row."""
    run = (demo_row(outputs, method).get("runs") or [""])[0] if source == "demo" else method
    summary = read_json(outputs / run / "summary.json")
    if summary and summary.get("train_seconds_total") is not None:
        return summary["train_seconds_total"], str(outputs / run / "summary.json")
    for row in (demo_results or {}).get("rows", []) if source == "demo" else []:
        if row["method"] == method and row.get("train_seconds") is not None:
            return row["train_seconds"], str(outputs / "demo_results.json")
    return None, None


# --------------------------------------------------------------------------- formatting
# One formatter per column: the test parses the table and applies the same rounding.

def fmt_miou(v):
    return f"{100 * v:.2f}"


def fmt_params(v):
    return f"{v:,}"


def fmt_ms(v):
    return f"{v:.2f}"


def fmt_fps(v):
    return f"{v:.1f}"


def fmt_minutes(seconds):
    return "not recorded" if seconds is None else f"{seconds / 60:.1f}"


def main_table(rows):
    cells = []
    for r in rows:
        e = r["result"]
        cells.append([r["label"], "not run", "", "", "", "", f"`{r['command']}`"] if e is None
                     else [r["label"], fmt_miou(e["miou"]), fmt_params(e["params"]),
                           fmt_ms(e["ms_per_image"]), fmt_fps(e["fps"]),
                           fmt_minutes(r["train_seconds"]), f"`{r['path']}`"])
    return markdown_table(MAIN_HEADER, cells)


# --------------------------------------------------------------------------- figures

def per_class_chart(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    done = [r for r in rows if r["result"] is not None]
    classes = [c for c in done[0]["result"]["per_class_iou"]
               if any(r["result"]["per_class_iou"].get(c) is not None for r in done)]
    width = 0.8 / len(done)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(classes) * max(1, len(done) / 2)), 4))
    for i, r in enumerate(done):
        values = [100 * (r["result"]["per_class_iou"].get(c) or 0) for c in classes]
        ax.bar([k + i * width for k in range(len(classes))], values, width, label=r["label"])
    ax.set_xticks([k + width * (len(done) - 1) / 2 for k in range(len(classes))], classes,
                  rotation=45, ha="right")
    ax.set(ylabel="IoU (%)", ylim=(0, 100),
           title="Per-class IoU on the validation set (a class without IoU drawn as 0)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def copy_into(src, out, sub):
    """Copy a figure into the report folder; returns its path relative to the report."""
    dst = out / sub / Path(src).name
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
    return dst.relative_to(out).as_posix()


def overlay_files(result, outputs):
    listed = [Path(p) for p in result.get("overlays") or []]
    if listed and all(p.is_file() for p in listed):
        return listed
    stem = Path(result.get("checkpoint", "")).stem
    return sorted((outputs / f"{stem}_overlays").glob("*.png")) if stem else []


# --------------------------------------------------------------------------- main

def main(args):
    outputs, plots, out = Path(args.outputs), Path(args.plots), Path(args.out)
    source = choose_source(outputs, args.source)
    if not result_files(outputs, source):
        raise UserError(f"no result files to report in {outputs} (source: {source}); {out} is "
                        "left as it was: run the commands of test.txt, or `python demo.py`, first")
    # built beside the old report and swapped in at the end: a failure on the way leaves the
    # old one whole
    out.parent.mkdir(parents=True, exist_ok=True)
    final, out = out, Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    out.chmod(0o755)  # mkdtemp's 0700 would stay with the report
    try:
        result = write_report(outputs, plots, out, source)
        replace_dir(out, final)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"report written to {final / 'README.md'} (source: {source})")
    return {**result, "path": str(final / "README.md")}


def result_files(outputs, source):
    """The result files a report would read; none means there is nothing to report."""
    methods = [m for m, _ in METHODS] + extra_methods(outputs, source)
    candidates = [eval_path(outputs, m, source) for m in methods]
    candidates += [outputs / "benchmark.json", *sorted(outputs.glob("compress*.json"))]
    return [p for p in candidates if p.is_file()]


def replace_dir(new, old):
    """Put folder ``new`` where ``old`` is, removing ``old`` only once ``new`` is in place."""
    if old.exists():
        trash = old.with_name(f".{old.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(old, trash)
        os.replace(new, old)
        shutil.rmtree(trash)
    else:
        os.replace(new, old)


def result_rows(outputs, source):
    """One row per method (the lab's five, then any other evaluation): its result or None."""
    demo_results = read_json(outputs / "demo_results.json") if source == "demo" else None
    rows = []
    for method, label in list(METHODS) + [(m, m) for m in extra_methods(outputs, source)]:
        path = eval_path(outputs, method, source)
        seconds, seconds_from = train_seconds(outputs, method, source, demo_results)
        rows.append({"method": method, "label": label, "result": read_json(path), "path": str(path),
                     "train_seconds": seconds, "train_seconds_from": seconds_from,
                     "command": command_for(method, source)})
    return rows, demo_results


def results_section(rows, demo_results, outputs, source):
    where = ("PASCAL VOC 2012 val (test.txt)" if source == "voc"
             else "offline demo on generated data (python demo.py)")
    doc = ["# Report", "",
           "Rebuilt by `python report.py` from the result files named in each table; every "
           "number below is read from those files.", "",
           f"Source: **{where}**. Rule: the real-VOC evaluations when any exists, else the "
           "demo's.", "", "## Results", "", main_table(rows), ""]
    if demo_results:
        n = max(row.get("n", 1) for row in demo_results["rows"])
        doc += [f"The table above shows each method's first seed. Over all {n} seeds "
                f"(`{outputs / 'demo_results.json'}`, final checkpoints on the reported "
                f"'{demo_results.get('reported_split')}' split; nothing was chosen on it):", "",
                demo_results["table_markdown"], "",
                f"Demo teacher: `{demo_results.get('teacher_arch')}` trained from scratch on "
                "a generated pretraining set, not FCN-ResNet50; data: "
                + ", ".join(f"{k} {v}" for k, v in (demo_results.get("data") or {}).items())
                + ".", ""]
    return doc + ["Inference: median model time per image at batch 1 on the evaluation images "
                  "(`engine.evaluate`); this is also the test time per image. Training time: "
                  "`train_seconds_total` of each run's summary.", ""]


def figures_section(rows, outputs, plots, out, source):
    """Training curves, the per-class chart and the gallery, copied into the report."""
    doc = ["## Training curves", ""]
    for r in rows:
        if r["method"] == "teacher" and source == "voc":
            continue  # the pretrained teacher is not trained here
        run = (demo_row(outputs, r["method"]).get("runs") or [""])[0] if source == "demo" \
            else r["method"]
        figures = [plots / f"{run}_{kind}.png" for kind in ("loss", "miou")]
        if all(f.is_file() for f in figures):
            doc += [f"**{r['label']}**", ""] + [f"![{f.stem}]({copy_into(f, out, 'plots')})"
                                                for f in figures] + [""]
        else:
            doc += [f"**{r['label']}**: not run (`{r['command']}` after training it)", ""]
    if source == "demo" and (plots / "demo_comparison.png").is_file():
        doc += [f"![demo comparison]({copy_into(plots / 'demo_comparison.png', out, 'plots')})", ""]
    doc += ["## Per-class IoU", ""]
    if any(r["result"] for r in rows):
        per_class_chart(rows, out / "per_class_iou.png")
        doc += ["![per-class IoU](per_class_iou.png)", ""]
    else:
        doc += ["not run: no evaluation exists yet", ""]
    doc += ["## Successes and failures", "",
            "Chosen by per-image mIoU (`evaluate.py --visualize`): the best images with objects "
            "and the worst ones; each title carries the image's mIoU.", ""]
    gallery = []
    for r in rows:
        files = overlay_files(r["result"], outputs) if r["result"] else []
        if files:
            gallery += [f"**{r['label']}**", ""] + [
                f"![{f.stem}]({copy_into(f, out, 'gallery/' + r['method'])})" for f in files] + [""]
    return doc + (gallery or ["not run: add `--visualize` to an evaluate.py command of test.txt",
                              ""])


def speed_section(outputs, benchmark, compress_files):
    """The benchmark, training-cost and compression tables, as their files hold them."""
    doc = ["## Size and speed (benchmark.py)", ""]
    if benchmark:
        doc += [f"`{outputs / 'benchmark.json'}`: {benchmark['hardware']} ({benchmark['device']}), "
                f"input {benchmark['size']}x{benchmark['size']}.", "", benchmark["table_markdown"], ""]
    else:
        doc += ["not run: `python benchmark.py --device cpu --json outputs/benchmark.json`", ""]
    cost = read_json(outputs / "benchmark_train_cost.json")
    if cost:  # written by benchmark.py --train-cost; its keys are read as they come
        ratios = cost.get("ratios") or ({"ratio": cost["ratio"]} if "ratio" in cost else {})
        doc += [f"Training step cost (`{outputs / 'benchmark_train_cost.json'}`, "
                f"{cost.get('hardware', '?')}), median ms per step: " + ", ".join(
                    f"{k} {v:.1f}" for k, v in cost.get("median_ms", {}).items())
                + "; " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()) + ".", ""]
    doc += throughput_section(outputs)
    doc += ["## Compression (compress.py)", ""]
    for path, compress in compress_files.items():  # compress.json, compress_compiled.json, ...
        onnx = compress.get("onnx_max_abs_diff")
        doc += [f"`{path}`: {compress['checkpoint']} on {compress['hardware']}, input "
                f"{compress['size']}x{compress['size']}, int8 run by {compress.get('int8_runtime', '?')}, "
                f"mIoU on {compress['num_val_images']} images of {compress['data_root']}"
                + (f"; ONNX max abs difference {onnx:.1e}." if onnx is not None else "."),
                "", compress["table_markdown"], ""]
    if not compress_files:
        doc += ["not run: `python compress.py --model_path models/no_kd_last.pth`", ""]
    return doc


def throughput_section(outputs):
    """benchmark.py --throughput's tables: loader, training loop, evaluation, fixed cost."""
    path = outputs / "benchmark_throughput.json"
    result = read_json(path)
    if not result:
        return ["### Throughput", "", "not run: `python benchmark.py --throughput`", ""]
    return ["### Throughput", "", f"`{path}`, written by `{result['command']}` on "
            f"{result['hardware']} ({result['device']}, {result['threads']} threads).", "",
            result["table_markdown"], ""]


def sweeps_section(outputs, plots, out):
    """Every sweep.py result: its command and table (mean ± std over seeds), its JSON and plot
    copied into the report, so the evidence behind a setting stays in the repository."""
    doc = ["## Sweeps (sweep.py)", ""]
    for path in sorted(outputs.glob("sweep/*/sweep.json")):
        sweep = read_json(path)
        name = path.parent.name
        saved = out / "sweeps" / f"{name}.json"
        saved.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, saved)
        doc += [f"### {name}", "", f"[`sweeps/{name}.json`](sweeps/{name}.json) (from `{path}`), "
                f"written by `{sweep['command']}`; final checkpoints scored on "
                f"'{sweep['split']}':", "", sweep["table_markdown"], ""]
        plot = plots / f"{name}_sweep.png"
        if plot.is_file():
            doc += [f"![{name}]({copy_into(plot, out, 'sweeps')})", ""]
    return doc if len(doc) > 2 else []


def write_report(outputs, plots, out, source):
    """Write report/README.md and its figures into the (empty) folder ``out``."""
    rows, demo_results = result_rows(outputs, source)
    benchmark = read_json(outputs / "benchmark.json")
    compress_files = {path: read_json(path) for path in sorted(outputs.glob("compress*.json"))}
    doc = (results_section(rows, demo_results, outputs, source)
           + figures_section(rows, outputs, plots, out, source)
           + speed_section(outputs, benchmark, compress_files)
           + sweeps_section(outputs, plots, out))
    sources = [(r["path"], r["result"]) for r in rows] + [
        (str(outputs / "benchmark.json"), benchmark),
        (str(outputs / "benchmark_throughput.json"), read_json(outputs / "benchmark_throughput.json")),
    ] + list(compress_files.items())
    doc += ["## Hardware", "", markdown_table(
        ["result", "device", "hardware"],
        [[f"`{name}`", data.get("device", "?"), data.get("hardware", "?")]
         for name, data in sources if data]), ""]
    (out / "README.md").write_text("\n".join(doc))
    return {"source": source, "rows": rows}


if __name__ == "__main__":
    run_cli(main, get_args_parser())
