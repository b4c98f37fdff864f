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
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

import plots
import typeset
from checkpoints import read_history
from cli import REPO_DIR, HelpFormatter, UserError, markdown_table, run_cli
from compute import count_params
from losses import CE_FORMULA, CE_SYMBOL, TERMS
from typeset import (Bullets, Code, Figure, Grid, Heading, Markdown, Math,
                     Only, Para, Table)

METHODS = (  # name, label in the lab's table
    ("teacher", "Teacher"),
    ("no_kd", "Without KD"),
    ("response_kd", "Response-based"),
    ("feature_kd", "Feature-based"),
    ("combined_kd", "Combined (response + feature)"),
)
MAIN_HEADER = ("Knowledge distillation", "mIoU (%)", "# Parameters", "Inference (ms/image)", "FPS",
               "Training time (min)", "Source")


def _typst_number(x):
    """``x`` as typst math: 0.5, 100, or 1 times 10^(-5) (never Python's '1e-05')."""
    text = f"{x:g}"
    if "e" not in text:
        return text
    mantissa, exponent = text.split("e")
    return f"{mantissa} times 10^({int(exponent)})"


def total_formula(weights):
    """The total loss in typst math with its non-zero weights filled in, e.g.
    ``cal(L) = 0.5 dot cal(L)_"CE" + 0.5 dot cal(L)_"KD" + 1 dot cal(L)_"feat"`` for
    {'kd': 0.5, 'feat': 1.0}. ``weights``: {term of TERMS: weight}, as the criterion's
    base weights or its ``weights()`` (then 'ce' is given; otherwise CE gets 1 - weights['kd']).
    Each symbol is the ``symbol`` of its TERMS row (CE_SYMBOL for CE); zero weights are left out.
    """
    unknown = set(weights) - set(TERMS) - {"ce"}
    if unknown:
        raise KeyError(f"unknown loss terms {sorted(unknown)}; known: ce, {', '.join(TERMS)}")
    if any(w < 0 for w in weights.values()):
        raise ValueError(f"loss weights must be >= 0; got {weights}")
    ce = weights.get("ce", 1.0 - weights.get("kd", 0.0))
    parts = [(ce, CE_SYMBOL)] + [(weights.get(name, 0.0), term.symbol)
                                 for name, term in TERMS.items()]
    summands = [f"{_typst_number(w)} dot {symbol}" for w, symbol in parts if w != 0]
    return "cal(L) = " + (" + ".join(summands) or "0")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--outputs", default="outputs", help="where the result JSONs are")
    parser.add_argument("--plots", default="plots", help="where train_kd.py drew its curves")
    parser.add_argument("--out", default="report", help="the report folder to (re)build")
    parser.add_argument("--students", default="students",
                        help="the students' own files: title.toml, discussion.md, llm_use.md "
                             "(read, never written)")
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


# --------------------------------------------------------------------------- figures

def per_class_chart(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    done = [r for r in rows if r["result"] is not None]
    classes = [c for c in done[0]["result"]["per_class_iou"]
               if any(r["result"]["per_class_iou"].get(c) is not None for r in done)]
    width = 0.8 / len(done)
    # wide and low: it shares a printed page with the tables
    fig, ax = plt.subplots(figsize=(min(10, max(7, 0.12 * len(classes) * len(done))), 2.8))
    for i, r in enumerate(done):
        values = [100 * (r["result"]["per_class_iou"].get(c) or 0) for c in classes]
        ax.bar([k + i * width for k in range(len(classes))], values, width, label=r["label"])
    ax.set_xticks([k + width * (len(done) - 1) / 2 for k in range(len(classes))], classes,
                  rotation=45, ha="right")
    ax.set(ylabel="IoU (%)", ylim=(0, 100))
    plots.fit_title(ax, "Per-class IoU on the evaluation images (a class without IoU drawn as 0)",
                    9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1))
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
    stem = Path(result.get("checkpoint") or "").stem
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
        result = write_report(outputs, plots, out, source, Path(args.students))
        replace_dir(out, final)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"report written to {final / 'README.md'} and {final / 'report.pdf'} "
          f"({result['pages']} pages; source: {source})")
    return {**result, "path": str(final / "README.md"), "pdf": str(final / "report.pdf")}


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


def source_lines(source):
    where = ("PASCAL VOC 2012 val (test.txt)" if source == "voc"
             else "offline demo on generated data (python demo.py)")
    return [f"Rebuilt by `python report.py` from the result files named in each table; every "
            f"number is read from those files. Source: **{where}**. Rule: the real-VOC "
            "evaluations when any exists, else the demo's. The PDF (`report.pdf`) holds the "
            "same six sections; the appendix below is in this README only."]


def curves_section(rows, outputs, plots, out, source):
    """Each run's own loss and mIoU plots (train_kd.py's), copied into the report."""
    doc = ["## Training curves of each run", ""]
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
    return doc


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
    return doc + compressed_evaluations(outputs)


def is_compressed(result):
    """An evaluation of one of compress.py's files, or of a student fine-tuned from one."""
    path = str(result.get("checkpoint", ""))
    return result.get("format") in ("int8", "onnx") or "compressed/" in path or "pruned" in path


def compressed_evaluations(outputs):
    """evaluate.py's results on compressed models (outputs/*_eval.json), as they hold them."""
    found = {p: read_json(p) for p in sorted(outputs.glob("*_eval.json"))}
    rows = [[f"`{r['checkpoint']}`", r.get("format", "checkpoint"), fmt_params(r["params"]),
             fmt_miou(r["miou"]), fmt_ms(r["ms_per_image"]), r["num_images"], r["hardware"],
             f"`python evaluate.py --model_path {r['checkpoint']} --json {p}`"]
            for p, r in found.items() if r and is_compressed(r)]
    if not rows:
        return []
    header = ["model", "format", "params", "mIoU (%)", "ms/image", "images", "hardware", "command"]
    return ["Compressed models scored by evaluate.py, full resolution, batch 1:", "",
            markdown_table(header, rows), ""]


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


def write_report(outputs, plots, out, source, students):
    """Write README.md, report.typ and report.pdf with their figures into the (empty) folder
    ``out``; ``students`` is read only."""
    rows, demo_results = result_rows(outputs, source)
    ctx = Context(outputs, plots, out, source, rows, demo_results,
                  {r["method"]: training_runs(outputs, r["method"], source) for r in rows
                   if r["result"] is not None})
    title = title_blocks(read_title(students))
    blocks = ([Only(Para(line), "markdown") for line in source_lines(source)]
              + lab_document(ctx, students) + [Only(Markdown("\n".join(appendix(ctx))), "markdown")])
    (out / "README.md").write_text(typeset.to_markdown(blocks, title[0]), encoding="utf-8")
    pages = write_pdf(out, blocks, title)
    return {"source": source, "rows": rows, "pages": pages}


def appendix(ctx):
    """README-only: each run's own plots, size and speed, compression, sweeps, hardware."""
    outputs = ctx.outputs
    benchmark = read_json(outputs / "benchmark.json")
    compress_files = {path: read_json(path) for path in sorted(outputs.glob("compress*.json"))}
    doc = (["## Appendix (README only)", ""]
           + curves_section(ctx.rows, outputs, ctx.plots, ctx.out, ctx.source)
           + speed_section(outputs, benchmark, compress_files)
           + sweeps_section(outputs, ctx.plots, ctx.out))
    sources = [(r["path"], r["result"]) for r in ctx.rows] + [
        (str(outputs / "benchmark.json"), benchmark),
        (str(outputs / "benchmark_throughput.json"), read_json(outputs / "benchmark_throughput.json")),
    ] + list(compress_files.items())
    return doc + ["## Hardware", "", markdown_table(
        ["result", "device", "hardware"],
        [[f"`{name}`", data.get("device", "?"), data.get("hardware", "?")]
         for name, data in sources if data]), ""]



# --------------------------------------------------------------------------- the lab's report

SECTIONS = ("1. Architecture", "2. Knowledge distillation", "3. Hyperparameters and training",
            "4. Experiments", "5. Discussion", "6. LLM use")
PAGES = (4, 6)  # the lab's page rule
REPRODUCE_TITLE = "Reproduce with test.txt"
REPRODUCE_HEADER = ("result file", "mIoU (%)", "parameters", "checkpoint", "split", "limit")
PROMPTS = {  # the lab's questions, shown while a student's file holds none of their own text
    "discussion.md": ["Was the performance as expected? Why or why not?",
                      "Which knowledge distillation methods helped, and by how much?",
                      "What challenges came up, and how did you overcome them?"],
    "llm_use.md": ["How did you make sure that what an LLM gave you (code, explanations, "
                   "numbers, citations) was not a hallucination?"],
}
VOC_TRAIN_IMAGES = {"voc": 1464, "trainaug": 10582}  # train_kd.py --train-set
# flags that say where files go or how a run is displayed: not hyperparameters
NOT_SETTINGS = {"out", "model_dir", "output_dir", "plot_dir", "progress", "resume", "log_every",
                "data_root", "sbd_root", "no_download", "teacher_weights"}


@dataclass
class Run:
    """One training run behind a reported result: its name, summary.json and history."""
    name: str
    summary: dict
    history: list

    @property
    def args(self):
        return self.summary.get("args") or {}


def training_runs(outputs, method, source):
    """The runs behind a method's result (every seed of the demo; the VOC run of that name),
    those whose summary.json exists."""
    if source == "demo":
        names = demo_row(outputs, method).get("runs") or []
    else:
        names = [] if method == "teacher" else [method]
    runs = []
    for name in names:
        summary = read_json(outputs / name / "summary.json")
        if summary:
            runs.append(Run(name, summary, read_history(outputs / name / "history.jsonl")))
    return runs


def student_text(students, name):
    """(text or None, its path): a student's file, None when it holds only the template's
    comments (then the report shows the lab's questions)."""
    path = Path(students) / name
    if not path.is_file():
        return None, path
    text = path.read_text(encoding="utf-8")
    own = re.sub(r"<!--.*?-->", "", text, flags=re.S).strip()
    return (text if own else None), path


def read_title(students):
    """students/title.toml: course, title and the students (name, number)."""
    path = Path(students) / "title.toml"
    if not path.is_file():
        return {"course": "ELEC 475 Lab 3", "student": [], "missing": str(path)}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML ({exc}); fix it (keys: course, [[student]] "
                        "name and number)") from None


def title_blocks(title):
    """The title block: (Markdown lines, typst source)."""
    course = title.get("course", "ELEC 475 Lab 3")
    sub = title.get("title", "")
    people = [f"{s.get('name', '?')} ({s.get('number', '?')})" for s in title.get("student", [])]
    who = ", ".join(people) or f"names and numbers: fill in {title.get('missing')}"
    markdown = f"# {course}" + (f": {sub}" if sub else "") + f"\n\n**{who}**"
    typst = ("#align(center)[#text(size: 16pt, weight: \"bold\")[" + typeset.inline_typst(course)
             + "]" + (f" \\\n#text(size: 12pt)[{typeset.inline_typst(sub)}]" if sub else "")
             + f" \\\n#v(2pt)#text(size: 10pt)[{typeset.inline_typst(who)}]]\n#v(4pt)\n\n")
    return markdown, typst


# --------------------------------------------------------------------------- 1. architecture

def student_kinds(ctx):
    """The student architectures of the reported runs, from their saved flags."""
    kinds = []
    for method, runs in ctx.runs.items():
        for run in runs:
            kind = run.summary.get("student") or run.args.get("student")
            if kind and kind not in kinds:
                kinds.append(kind)
    return kinds


def architecture_section(ctx):
    doc = [Heading(SECTIONS[0])]
    kinds = student_kinds(ctx)
    try:
        import architecture
    except ImportError:  # architecture.py arrives with issue 21's ARCH part
        return doc + [Para("not built: `architecture.py` is missing from this checkout")]
    size = next((r.args.get("crop_size") for rs in ctx.runs.values() for r in rs
                 if r.args.get("crop_size")), 480)
    teacher = next((r.args.get("teacher") for rs in ctx.runs.values() for r in rs
                    if run_weights(r).get("feat", 0) > 0), None)  # adapters: feature KD only
    for kind in kinds or ["lite"]:
        doc += architecture_table(architecture, kind, size, teacher)
    doc += [Para(architecture_prose(ctx)), Para("**References.**", size=8.5),
            Bullets([architecture.CITATIONS[k] for k in cited_papers(ctx, architecture)])]
    return doc


def architecture_table(architecture, kind, size, teacher=None):
    """One student's block table at a size×size input, with the adapters to ``teacher``'s
    widths when feature KD ran; the student's rows must sum to count_params."""
    model = architecture.build_student(kind)
    adapters = architecture.build_adapters(teacher) if teacher else None
    blocks = architecture.block_table(model, image_size=(size, size), adapters=adapters)
    header, rows = architecture.markdown_rows(blocks)
    total = sum(b.params for b in blocks if b.part != "adapters")
    if total != count_params(model):  # the table would describe another model than the code
        raise UserError(f"architecture.block_table('{kind}') sums to {total:,} parameters but "
                        f"the model has {count_params(model):,}; fix architecture.py")
    extra = (f", plus {count_params(adapters):,} in the adapters to {teacher} (training only)"
             if adapters is not None else "")
    return [Table(list(header), rows, size=6.5,
                  title=f"Student '{kind}' at a {size}×{size} input: {total:,} parameters "
                        f"(= count_params){extra}")]


def architecture_prose(ctx):
    teacher = ("torchvision's FCN-ResNet50 (35.3 M parameters with its auxiliary head, frozen)"
               if ctx.source == "voc" else
               f"the demo's own `{(ctx.demo_results or {}).get('teacher_arch', 'lite')}` network "
               "trained on a generated pretraining set (not FCN-ResNet50)")
    return ("The student is an encoder-decoder in the DeepLabV3+ style. The encoder is "
            "MobileNetV3-Small's feature extractor (inverted residual blocks with "
            "squeeze-and-excitation and hardswish), cut at output stride 16. Its output "
            "feeds an ASPP module: parallel 3×3 convolutions at the dilation rates of the "
            "table, a 1×1 branch and global image pooling, concatenated and projected by a "
            "1×1 convolution. The decoder upsamples the ASPP output bilinearly to the "
            "stride-4 low-level tap, concatenates the tap's (1×1-reduced) features, refines "
            "them with a 3×3 convolution, applies dropout 0.5 and a 1×1 classifier to 21 "
            "classes, and upsamples the logits bilinearly to the input size. The adapters "
            "(1×1 convolutions, training only) map the low, mid and high taps to the "
            f"teacher's channel counts for feature KD. The teacher is {teacher}. Sizes are "
            "measured by forward hooks at the stated input, so they are the code's, "
            "not the lab's approximations.")


def cited_papers(ctx, architecture):
    """MobileNetV3, ASPP and Hinton always; then the paper of every KD term that was used."""
    keys = ["mobilenetv3", "deeplab_aspp", "hinton"]
    for name in used_terms(ctx):
        paper = TERMS[name].paper
        if paper and paper not in keys:
            keys.append(paper)
    return [k for k in keys if k in architecture.CITATIONS]


# --------------------------------------------------------------------------- 2. distillation

def run_weights(run):
    """{term: weight} of a run's saved flags (train_kd.py's term flags, losses.TERMS)."""
    return {name: float(run.args.get(term.weight.dest, run.summary.get(term.weight.dest, 0))
                        or 0) for name, term in TERMS.items()}


def used_terms(ctx):
    """The terms with a non-zero weight in at least one reported run, in TERMS' order."""
    used = set()
    for runs in ctx.runs.values():
        for run in runs:
            used |= {n for n, w in run_weights(run).items() if w > 0}
    return [n for n in TERMS if n in used]


def weight_settings(ctx):
    """[(methods, weights, params)] for each distinct setting of the reported runs."""
    settings = []
    for method, runs in ctx.runs.items():
        for run in runs[:1]:
            weights = {n: w for n, w in run_weights(run).items() if w > 0}
            params = {opt.dest: run.args.get(opt.dest, opt.default) for n in weights
                      for opt in TERMS[n].params}
            for entry in settings:
                if entry[1] == weights and entry[2] == params:
                    entry[0].append(method)
                    break
            else:
                settings.append(([method], weights, params))
    return settings


def kd_section(ctx):
    doc = [Heading(SECTIONS[1]),
           Para("Every run minimises one loss; each term below is rendered from its row of "
                "`losses.TERMS`, where it is written once. Cross-entropy over the labelled "
                "pixels (label 255 ignored):"), Math(f"{CE_SYMBOL} = {CE_FORMULA}", "cross-entropy")]
    for name in used_terms(ctx):
        term = TERMS[name]
        doc.append(Math(f"{term.symbol} = {term.formula}", term.label))
    doc.append(Para("The total loss of each reported setting, at the weights it was run with:"))
    for methods, weights, params in weight_settings(ctx):
        extra = ", ".join(f"{k} = {v:g}" for k, v in params.items())
        doc.append(Math(total_formula(weights), ", ".join(label_of(m) for m in methods)
                        + (f" ({extra})" if extra else "")))
    used = used_terms(ctx)
    names = {"kd": "alpha", "feat": "beta"}  # the weights' names in our formula
    doc += [Para("One training step (the loss of each setting above):"),
            Code(training_step(used, {n: names.get(n, f"w_{n}") for n in used}))]
    return doc + [Para(KD_WHY), lab_weights_table(ctx)]


STEP_LINES = {  # pseudocode of each term's line in a training step (TERMS' names)
    "kd": ["    terms['kd'] = tau**2 * KL(softmax(logits_t / tau) || softmax(logits_s / tau))"
           "  # fp32, mean over pixels"],
    "feat": ["    terms['feat'] = mean(1 - cos(resize(adapter[k](taps_s[k]), taps_t[k]), taps_t[k])",
             "                         for k in ('low', 'mid', 'high'))  # per pixel, then mean"],
}


def training_step(used, weights):
    """One training step as pseudocode, with the lines of the terms that were used only."""
    lines = ["for images, labels in train_loader:  # random scale, crop, flip: image and mask together",
             "    logits_s, taps_s = student(images)  # taps: low, mid, high (strides in section 1)"]
    if used:
        lines += ["    with torch.no_grad():  # the teacher is frozen: eval(), no gradients",
                  "        logits_t, taps_t = teacher(images)"]
    lines.append("    terms = {'ce': cross_entropy(logits_s, labels, ignore_index=255)}")
    for name in used:
        lines += STEP_LINES.get(name, [f"    terms['{name}'] = L_{name}(student, teacher)"
                                       "  # its formula above"])
    parts = (["(1 - alpha) * terms['ce']" if "kd" in used else "terms['ce']"]
             + [f"{weights[n]} * terms['{n}']" for n in used])
    total = "    loss = " + " + ".join(parts)
    if len(total) > 90:  # one term a line: a wrapped line would break the indentation
        total = "    loss = (" + "\n            + ".join(parts) + ")"
    return "\n".join(lines + [total,
                              "    optimizer.zero_grad(); loss.backward(); optimizer.step()"
                              + ("  # student and adapters" if "feat" in used else ""),
                              "    # after each epoch: scheduler.step() (poly decay by default)"])


KD_WHY = ("**Taps and adapters.** The student exposes three encoder taps (low, mid, high); a "
          "1×1 convolution per tap (an adapter, trained with the student and dropped at "
          "inference) maps its channels to the teacher's at the matching depth. **Why τ².** "
          "Softening both distributions by τ shrinks the KL's gradients by 1/τ², so "
          "multiplying by τ² keeps the soft-target term on the scale of the hard-label term "
          "whatever τ is (Hinton et al.). **Why features are resized.** The two networks' "
          "taps have different strides, so the adapted student map is resized bilinearly to "
          "the teacher's grid before the per-pixel cosine is taken: a cosine needs the two "
          "vectors at the same place in the image.")


def lab_weights_table(ctx):
    """Our (alpha, beta) against the lab's L = a_lab H(y, s) + b_lab H(t_tau, s_tau)."""
    rows = []
    for methods, weights, params in weight_settings(ctx):
        alpha, beta = weights.get("kd", 0.0), weights.get("feat", 0.0)
        rows.append([", ".join(label_of(m) for m in methods), f"{alpha:g}", f"{beta:g}",
                     f"{params.get('tau', 0):g}" if alpha else "",
                     f"{1 - alpha:g}", f"{alpha:g}"])
    return Table(["runs", "our α", "our β", "τ", "lab's α (= 1 − α)", "lab's β (= α)"], rows,
                 title="The lab writes L = α·H(y, σ(z_s)) + β·H(σ(z_t; τ), σ(z_s; τ)); "
                       "ours weights CE by 1 − α (the lab's β omits τ²)", size=7.5)


def label_of(method):
    return dict(METHODS).get(method, method)


# --------------------------------------------------------------------------- 3. hyperparameters

def unused_flags(ctx):
    """The flags of terms no reported run used: they do not appear in the report."""
    used = set(used_terms(ctx))
    return {opt.dest for name, term in TERMS.items() if name not in used
            for opt in (term.weight, *term.params)}


def settings_of(ctx):
    """{method: {flag: value}} from the first run of each method (seeds are listed apart)."""
    skip = NOT_SETTINGS | unused_flags(ctx) | {"seed"}
    return {m: {k: v for k, v in runs[0].args.items() if k not in skip}
            for m, runs in ctx.runs.items() if runs}


def fmt_setting(value):
    if isinstance(value, (list, tuple)):
        return " ".join(fmt_setting(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def hyperparameter_section(ctx):
    doc = [Heading(SECTIONS[2])]
    settings = settings_of(ctx)
    if not settings:
        return doc + [Para("not run: no training run with a summary.json is reported")]
    keys = sorted(set().union(*settings.values()))
    same = [k for k in keys if len({fmt_setting(s.get(k)) for s in settings.values()}) == 1]
    differ = [k for k in keys if k not in same]
    first = next(iter(settings.values()))
    doc.append(Para("Every flag each run saved (`outputs/RUN/summary.json`, `args`); flags of "
                    "terms no run used are left out. **The same in every run:** "
                    + "; ".join(f"`{k}` {fmt_setting(first.get(k))}" for k in same) + ".",
                    size=8))
    methods = list(settings)
    rows = [[f"`{k}`"] + [fmt_setting(settings[m].get(k, "")) for m in methods] for k in differ]
    rows.append(["seeds"] + [" ".join(str(r.args.get("seed")) for r in ctx.runs[m])
                             for m in methods])
    doc.append(Table(["setting"] + [label_of(m) for m in methods], rows, size=7.5,
                     title="The settings that differ between the runs"))
    doc.append(time_table(ctx))
    figure = curves_figure(ctx)
    if figure:
        doc.append(figure)
    return doc


def train_images(ctx, method, run):
    """How many images one epoch of ``run`` trained on (None when it cannot be told)."""
    if ctx.source == "demo":
        data = (ctx.demo_results or {}).get("data") or {}
        return data.get("pretrain" if method == "teacher" else "train")
    limit = run.args.get("limit_train")
    return limit or VOC_TRAIN_IMAGES.get(run.args.get("train_set", "voc"))


def timing(ctx, method):
    """(s per epoch, total s, train ms per image) of a method, means over its runs."""
    runs = ctx.runs.get(method) or []
    if not runs:
        return None
    per_epoch = [statistics.fmean(r["epoch_seconds"] for r in run.history) for run in runs
                 if run.history]
    totals = [run.summary.get("train_seconds_total") for run in runs]
    totals = [t for t in totals if t is not None]
    images = train_images(ctx, method, runs[0])
    epoch_s = statistics.fmean(per_epoch) if per_epoch else None
    ms = 1000 * epoch_s / images if epoch_s and images else None
    return epoch_s, (statistics.fmean(totals) if totals else None), ms


def time_table(ctx):
    rows = []
    for method, runs in ctx.runs.items():
        t = timing(ctx, method)
        if t:
            epoch_s, total, ms = t
            rows.append([label_of(method), str(len(runs)), str(runs[0].args.get("epochs", "?")),
                         "?" if epoch_s is None else f"{epoch_s:.1f}",
                         fmt_minutes(total), "?" if ms is None else f"{ms:.1f}",
                         runs[0].summary.get("hardware", "?")])
    return Table(["run", "seeds", "epochs", "s / epoch", "total (min)", "train ms / image",
                  "hardware"], rows, size=7.5,
                 title="Training time (epoch_seconds of history.jsonl, train_seconds_total of "
                       "summary.json; means over seeds)")


def curves_figure(ctx):
    """One panel per method: loss and validation mIoU, mean over seeds with a band."""
    curves = [(label_of(m), [r.history for r in runs if r.history])
              for m, runs in ctx.runs.items() if any(r.history for r in runs)]
    if not curves:
        return None
    path = plots.method_panels(curves, ctx.out / "curves.png")
    return Figure(path.name, "Training loss (top, all terms weighted) and validation mIoU "
                             "(bottom) per method: the mean over seeds, the band from the "
                             "lowest to the highest seed.")


# --------------------------------------------------------------------------- 4. experiments

def claimed(ctx):
    """The rows whose evaluation the report claims (the file exists)."""
    return [r for r in ctx.rows if r["result"] is not None]


def experiments_section(ctx):
    doc = [Heading(SECTIONS[3]), hardware_table(ctx),
           Para("Test time is the median model time per image at batch 1 over the evaluation "
                "images at full resolution (`engine.evaluate`); training time per image is "
                "the mean epoch time over the images of an epoch (section 3)."),
           lab_table(ctx)]
    if ctx.demo_results:
        doc.append(seeds_table(ctx.demo_results))
    if claimed(ctx):
        per_class_chart(ctx.rows, ctx.out / "per_class_iou.png")
        doc.append(Figure("per_class_iou.png", "Per-class IoU on the evaluation images (a class "
                                               "without IoU is drawn as 0).", width="80%"))
    doc += gallery_blocks(ctx)
    return doc + [reproduce_table(ctx)]


def hardware_table(ctx):
    """Hardware and software of each result, from its own records, grouped when equal."""
    groups = {}
    for r in claimed(ctx):
        e = r["result"]
        runs = ctx.runs.get(r["method"]) or []
        trained = runs[0].summary.get("hardware", "") if runs else "pretrained (torchvision)"
        key = (e.get("hardware", "?"), trained, str(e.get("git") or "?"),
               f"torch {e['torch']}" if e.get("torch") else "")
        groups.setdefault(key, []).append(r["label"])
    rows = [[", ".join(labels), test, train, git] for (test, train, git, _), labels in
            groups.items()]
    return Table(["results", "evaluated on", "trained on", "git revision"], rows, size=7.5,
                 title="Hardware and software (each result's JSON and its run's summary.json)")


def lab_table(ctx):
    """The lab's comparison table (each method's first seed in the demo), the source file as
    a README-only column: a result file's name appears in the PDF only in the reproduce table."""
    header = [h for h in MAIN_HEADER if h != "Source"]
    rows, sources = [], []
    for r in ctx.rows:
        e = r["result"]
        if e is None:
            if r["method"] in ("teacher", "no_kd", "response_kd", "feature_kd", "combined_kd"):
                rows.append([r["label"], "not run", "", "", "", ""])
                sources.append(f"`{r['command']}`")
            continue
        rows.append([r["label"], fmt_miou(e["miou"]), fmt_params(e["params"]),
                     fmt_ms(e["ms_per_image"]), fmt_fps(e["fps"]),
                     fmt_minutes(r["train_seconds"])])
        sources.append(f"`{r['path']}`")
    seed = " (each method's first seed)" if ctx.source == "demo" else ""
    return Table(header, rows, size=7.5, markdown_only=[("Source", sources)],
                 title=f"The lab's comparison table{seed}")


def seeds_table(demo_results):
    """Every seed of the demo: mean ± std and each KD method's paired gain over no KD."""
    rows = []
    for r in demo_results["rows"]:
        g = r.get("paired_gain")
        mious = r["mious"]
        std = statistics.stdev(mious) if len(mious) > 1 else 0.0
        spread = f" ± {100 * std:.2f}" if len(mious) > 1 else ""
        rows.append([label_of(r["method"]), f"{100 * statistics.fmean(mious):.2f}{spread}",
                     str(len(mious)), fmt_gain(g) if g else "", g["verdict"] if g else ""])
    return Table(["method", "mIoU (%) mean ± std", "seeds", "gain over no KD, 95% CI (paired t)",
                  "verdict"], rows, size=7.5,
                 title=f"All seeds (demo_results.json), final checkpoints scored on "
                       f"'{demo_results.get('reported_split', 'val')}', which chose nothing")


def fmt_gain(g):
    """'+gain [low, high]' in points (sweep.fmt_gain's form; sweep.py is an entry script)."""
    if g["n"] < 2:
        return f"{100 * g['gain']:+.2f}"
    return f"{100 * g['gain']:+.2f} [{100 * g['ci_low']:+.2f}, {100 * g['ci_high']:+.2f}]"


def gallery_blocks(ctx):
    """Successes and failures: in the PDF one of each per method, in the README all."""
    pdf, markdown = [], []
    for r in claimed(ctx):
        files = overlay_files(r["result"], ctx.outputs)
        if not files:
            continue
        paths = [copy_into(f, ctx.out, "gallery/" + r["method"]) for f in files]
        markdown += [Para(f"**{r['label']}**")] + [Figure(p, Path(p).stem) for p in paths]
        picks = [next((p for p in paths if Path(p).name.startswith(k)), None)
                 for k in ("success", "failure")]
        pdf += [Figure(p, f"{r['label']}: {Path(p).stem.replace('_', ' ', 1)}")
                for p in picks if p]
    if not markdown:
        return [Para("Successes and failures: not run: add `--visualize` to an evaluate.py "
                     "command of test.txt")]
    caption = ("Successes (left) and failures (right), chosen by per-image mIoU "
               "(`evaluate.py --visualize`); each title names the model and the image's mIoU.")
    return ([Only(Grid(pdf, 2, caption), "typst")] + [Only(b, "markdown") for b in
                                                      [Para(caption)] + markdown])


def reproduce_table(ctx):
    """The contract's table: one row per claimed evaluation; pack.py --check finds each
    result file's name and takes the next two-decimal number and comma integer after it."""
    rows = []
    for r in claimed(ctx):
        e = r["result"]
        checkpoint = Path(e["checkpoint"]).name if e.get("checkpoint") else "torchvision default"
        limit = e.get("limit")
        rows.append([Path(r["path"]).name, fmt_miou(e["miou"]), fmt_params(e["params"]),
                     checkpoint, str(e.get("split", "val")), "none" if limit is None else str(limit)])
    return Table(list(REPRODUCE_HEADER), rows, title=REPRODUCE_TITLE, size=6.8)


# --------------------------------------------------------------------------- 5, 6: students

def students_section(heading, students, name, facts=()):
    """A student's own file, byte for byte, or the lab's questions as prompts; then facts."""
    text, path = student_text(students, name)
    doc = [Heading(heading)]
    if text is None:
        doc += [Para(f"*To write in `{path.name}` of `{path.parent.name}/` (this section shows "
                     "the lab's questions until it holds your own text):*"),
                Bullets([f"*{q}*" for q in PROMPTS[name]])]
    else:
        doc.append(Markdown(text))
    if facts:
        doc += [Para("**Computed from the results** (by report.py, for your discussion):"),
                Bullets(list(facts))]
    return doc


def gain_facts(ctx):
    """Each KD method's gain over no KD: the demo's paired gain with its 95% interval; on VOC
    one run each, a difference without an interval."""
    facts = []
    if ctx.demo_results:
        for r in ctx.demo_results["rows"]:
            g = r.get("paired_gain")
            if g:
                interval = ("" if g["n"] < 2 else f", 95% CI {100 * g['ci_low']:+.2f} to "
                            f"{100 * g['ci_high']:+.2f}")
                facts.append(f"{label_of(r['method'])}: {100 * g['gain']:+.2f} points over no "
                             f"KD ({g['n']} paired seeds{interval}): {g['verdict']}.")
        return facts
    base = next((r["result"] for r in ctx.rows if r["method"] == "no_kd" and r["result"]), None)
    for r in claimed(ctx):
        runs = ctx.runs.get(r["method"]) or []
        distilled = any(w > 0 for run in runs for w in run_weights(run).values())
        if base and distilled:
            facts.append(f"{r['label']}: {100 * (r['result']['miou'] - base['miou']):+.2f} "
                         "points over no KD.")
        elif base and runs and r["method"] != "no_kd":  # another student trained without KD
            facts.append(f"{r['label']} (student '{runs[0].summary.get('student')}', "
                         f"{r['result']['params']:,} parameters): "
                         f"{100 * (r['result']['miou'] - base['miou']):+.2f} points against no "
                         f"KD ({base['params']:,} parameters).")
    if facts:
        facts.append("One run per method: these differences have no interval; several seeds "
                     "of each (`python sweep.py`) give one.")
    return facts


def teacher_facts(ctx):
    """Where the best student beat or missed the teacher, overall and per class; which
    classes fail (IoU below 50%) for it."""
    teacher = next((r for r in claimed(ctx) if r["method"] == "teacher"), None)
    students = [r for r in claimed(ctx) if r["method"] != "teacher"]
    if not students:
        return []
    best = max(students, key=lambda r: r["result"]["miou"])
    ious = {c: v for c, v in best["result"]["per_class_iou"].items() if v is not None}
    facts = []
    if teacher:
        gap = 100 * (best["result"]["miou"] - teacher["result"]["miou"])
        t_ious = teacher["result"]["per_class_iou"]
        beat = [c for c, v in ious.items() if t_ious.get(c) is not None and v > t_ious[c]]
        facts.append(f"Best student: {best['label']}, {gap:+.2f} points against the teacher; "
                     f"it beats the teacher on {len(beat)} of {len(ious)} classes"
                     + (f" ({', '.join(beat[:8])})." if beat else "."))
    failing = sorted((v, c) for c, v in ious.items() if v < 0.5)
    facts.append(f"Classes below 50% IoU for {best['label']}: "
                 + (", ".join(f"{c} {100 * v:.1f}" for v, c in failing) or "none") + ".")
    return facts


# --------------------------------------------------------------------------- the document

@dataclass
class Context:
    outputs: Path
    plots: Path
    out: Path
    source: str
    rows: list
    demo_results: dict
    runs: dict  # method -> [Run]


def lab_document(ctx, students):
    """The six sections, in the lab's order, as typeset blocks."""
    return (architecture_section(ctx) + kd_section(ctx) + hyperparameter_section(ctx)
            + experiments_section(ctx)
            + students_section(SECTIONS[4], students, "discussion.md",
                               gain_facts(ctx) + teacher_facts(ctx))
            + students_section(SECTIONS[5], students, "llm_use.md"))


def write_pdf(out, blocks, title):
    """report.typ and report.pdf; returns the page count, warning outside the lab's 4-6."""
    markdown_title, typst_title = title
    (out / "report.typ").write_text(typeset.to_typst(blocks, typst_title), encoding="utf-8")
    pages = typeset.compile_pdf(out / "report.typ", out / "report.pdf")
    if not PAGES[0] <= pages <= PAGES[1]:
        print(f"warning: report.pdf has {pages} pages; the lab asks for {PAGES[0]}-{PAGES[1]}: "
              + ("shorten students/discussion.md and llm_use.md, or report fewer runs (the "
                 "architecture table of a second student kind and the extra KD runs take the "
                 "most room)" if pages > PAGES[1] else "write students/discussion.md and "
                 "llm_use.md"), file=sys.stderr)
    return pages


if __name__ == "__main__":
    run_cli(main, get_args_parser())
