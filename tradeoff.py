"""The size-speed-accuracy picture of the compressed students, drawn from result files.

Reads three kinds of file and writes one table and one picture:

- the pruning sweep's scores (report/pruning/run_sweep.sh): evaluate.py JSONs named
  BASE_sSEED[_VARIANT]_SPLIT.json, VARIANT one of '' (the unpruned student), 'cont' (it,
  trained 20 epochs more by the fine-tuning recipe: as many epochs as a fine-tuned one),
  'pSPARSITY' (channel-pruned, before fine-tuning) and 'pSPARSITY_ft' (after);
- compress.py's JSON of each seed's unpruned student (BASE_sSEED_compress_int8.json): the
  int8 and ONNX forms' val mIoU;
- one benchmark.py JSON that timed every form side by side (latency, parameters, GFLOPs),
  the teacher and LR-ASPP with them as references.

For every form: latency, parameters, GFLOPs, val mIoU for each seed and their mean, and the
paired differences to the unpruned student and to the control, each with its 95% Student-t
interval (intervals.paired_gain), over --seeds, and again over --check-seeds, a disjoint set,
where given. Written to --out
(.json, .md, .png): latency against mIoU, one marker per seed and the mean, an arrow from
each pruned point before fine-tuning to after; the references, whose mIoU was not measured
on this data, as vertical lines at their latency.

    python tradeoff.py --sweep report/pruning/sweep --benchmark report/pruning/benchmark_tradeoff.json --seeds 0 1 2 --check-seeds 3 4 5 --out report/compression/tradeoff
"""
import argparse
import json
from pathlib import Path

from cli import HelpFormatter, UserError, markdown_table, run_cli
from files import save_json
from plots import tradeoff_chart
from intervals import paired_gain

SPARSITIES = ("0.25", "0.5", "0.75")
REFERENCES = {"fcn_resnet50": "FCN-ResNet50 (teacher)",
              "lraspp_mobilenet_v3_large": "LR-ASPP MobileNetV3-Large"}


def forms():
    """(key, label, where its mIoU is, the benchmark row that times it)."""
    rows = [("fp32", "student, fp32", ("sweep", ""), "_last.pth"),
            ("fp32_cont", "student, 20 epochs more", ("sweep", "_cont"), "_last.pth"),
            ("int8", "student, int8 (PT2E)", ("compress", "int8"), "_int8.pt2"),
            ("onnx", "student, ONNX Runtime fp32", ("compress", "onnx"), ".onnx")]
    for sp in SPARSITIES:
        bench = f"_pruned_channels_{sp}.pth"
        rows += [(f"p{sp}", f"pruned {sp}, before fine-tuning", ("sweep", f"_p{sp}"), bench),
                 (f"p{sp}_ft", f"pruned {sp}, fine-tuned (KD)", ("sweep", f"_p{sp}_ft"), bench)]
    return rows


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--sweep", default="report/pruning/sweep",
                        help="folder of the sweep's evaluate.py and compress.py JSONs")
    parser.add_argument("--base", default="pbase", help="the sweep's run name before _sSEED")
    parser.add_argument("--benchmark", default="report/pruning/benchmark_tradeoff.json",
                        help="benchmark.py JSON that timed every form")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="training seeds of the means and intervals")
    parser.add_argument("--check-seeds", nargs="*", type=int, default=[],
                        help="a disjoint seed set: the same intervals again, as a check")
    parser.add_argument("--split", default="val", help="the split whose mIoU is reported")
    parser.add_argument("--out", default="report/compression/tradeoff",
                        help="output stem: STEM.json, STEM.md, STEM.png")
    return parser


def read(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing; run report/pruning/run_sweep.sh (and compress.py for "
                        "the int8 and ONNX scores) first, or pass the seeds that ran") from None


def seed_mious(args, where, seed):
    """The val mIoU (%) of one form, one seed."""
    kind, name = where
    stem = f"{args.base}_s{seed}"
    if kind == "sweep":
        return 100 * read(Path(args.sweep) / f"{stem}{name}_{args.split}.json")["miou"]
    rows = read(Path(args.sweep) / f"{stem}_compress_int8.json")["rows"]
    return 100 * next(r["miou"] for r in rows if r["variant"] == name)


def timing(bench, suffix):
    """The benchmark row of the form's file (its name ends with ``suffix``)."""
    found = [r for r in bench["rows"] if r["model"].endswith(suffix)
             and (suffix != "_last.pth" or "compressed" not in r["model"])]
    if len(found) != 1:
        raise UserError(f"the benchmark JSON times {len(found)} models ending in {suffix}; "
                        "time each form once (tradeoff.py's docstring)")
    return found[0]


def form_row(args, bench, key, label, where, suffix):
    # int8 and ONNX were scored on the main seeds only (compress.py per seed, not the sweep)
    check = args.check_seeds if where[0] == "sweep" else []
    seeds = sorted(set(args.seeds) | set(check))
    mious = {s: seed_mious(args, where, s) for s in seeds}
    base = {s: seed_mious(args, ("sweep", ""), s) for s in seeds}
    control = {s: seed_mious(args, ("sweep", "_cont"), s) for s in seeds}
    t = timing(bench, suffix)
    row = {"form": key, "label": label, "model": t["model"], "median_ms": t["median_ms"],
           "params": t["params"], "gflops": t["gflops"], "miou_by_seed": mious,
           "miou_mean": sum(mious[s] for s in args.seeds) / len(args.seeds)}
    for suffix, subset in (("", args.seeds), ("_check", check)):
        if subset:
            row["vs_fp32" + suffix] = paired_gain({s: mious[s] for s in subset}, base)
            row["vs_control" + suffix] = paired_gain({s: mious[s] for s in subset}, control)
    return row


COMPARED = ("vs_fp32", "vs_control", "vs_fp32_check", "vs_control_check")


def fmt_interval(g):
    if g["n"] < 2:
        return f"{g['gain']:+.2f} (1 seed: no interval)"
    return f"{g['gain']:+.2f} [{g['ci_low']:+.2f}, {g['ci_high']:+.2f}]"


def markdown(rows, refs, fp32_ms, args):
    seeds, check = (" ".join(map(str, s)) for s in (args.seeds, args.check_seeds))
    header = ["form", "params", "GFLOPs", "median ms", "speed-up", f"{args.split} mIoU (%)",
              f"vs fp32, seeds {seeds}", f"vs 20 epochs more, seeds {seeds}"]
    if args.check_seeds:
        header += [f"vs fp32, seeds {check}", f"vs 20 epochs more, seeds {check}"]
    compared = COMPARED[:len(header) - 6]
    body = []
    for r in rows + refs:
        gflops = "-" if r["gflops"] is None else f"{r['gflops']:.2f}"
        cells = [r["label"], f"{r['params']:,}", gflops,
                 f"{r['median_ms']:.1f}", f"{fp32_ms / r['median_ms']:.2f}x",
                 f"{r['miou_mean']:.2f}" if "miou_mean" in r else "not measured"]
        cells += [fmt_interval(r[k]) if k in r else "-" for k in compared]
        body.append(cells)
    return markdown_table(header, body)


def main(args):
    bench = read(args.benchmark)
    rows = [form_row(args, bench, *form) for form in forms()]
    refs = [{**{k: r[k] for k in ("model", "median_ms", "params", "gflops")}, "form": r["model"],
             "label": REFERENCES[r["model"]]} for r in bench["rows"] if r["model"] in REFERENCES]
    fp32_ms = rows[0]["median_ms"]
    table = markdown(rows, refs, fp32_ms, args)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = (f"{args.split} mIoU against latency at {bench['size']}x{bench['size']}, batch 1, "
             f"{bench['hardware']}; seeds {' '.join(map(str, args.seeds))}")
    tradeoff_chart(rows, refs, args.seeds, out.with_suffix(".png"), title)
    result = {"benchmark": args.benchmark, "sweep": args.sweep, "seeds": args.seeds,
              "check_seeds": args.check_seeds, "split": args.split,
              "hardware": bench["hardware"], "size": bench["size"], "rows": rows,
              "references": refs, "table_markdown": table}
    save_json(result, out.with_suffix(".json"))
    out.with_suffix(".md").write_text(f"{title}\n\n{table}\n")
    print(f"written: {out}.json, {out}.md, {out}.png")
    return result


if __name__ == "__main__":
    run_cli(main, get_args_parser())
