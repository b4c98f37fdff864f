"""Grid search with seeds over train_kd.py's flags: every combination trained through
``train_kd.main``, each run's final checkpoint scored by the shared evaluation
(``engine.evaluate``) on the split its training validated on, and mean +- std over seeds.

    python sweep.py --alpha 0 0.5 0.9 --tau 1 2 4 --seeds 0 1 2 --epochs 30
    python sweep.py --name beta --beta 0.5 1 2 5 10 --seeds 0 1 2 --data-root DIR --val-split select

Any train_kd.py flag given several values is an axis of the grid; every other flag goes to
every run as it is. Seeds are paired: a seed gives every setting the same initialisation
and data order, so settings can be compared seed by seed (``paired_gains``).

Runs are named NAME_<axis><value>..._seed<S>. A run whose result file exists is skipped,
and one that a stop interrupted resumes where it stopped (train_kd.py --resume auto): rerun
the same command to continue a sweep. Scores come from the final checkpoint, never a "best"
one, and from ``--val-split``: point it at a split the final report does not use (the
demo's ``select``) so that nothing is chosen on the images a table reports.

Writes OUTPUT_DIR/sweep/NAME/runs/RUN.json (one per run), OUTPUT_DIR/sweep/NAME/sweep.json
(every setting: its runs, mean, std, n), sweep.md (the table, best first) and
PLOT_DIR/NAME_sweep.png (error bars: std over seeds).
"""
import argparse
import itertools
import json
import multiprocessing
import signal
import sys
import time
from pathlib import Path

import train_kd
from cli import HelpFormatter, UserError, markdown_table, ranged, run_cli
from compute import resolve_device, set_compute_resources
from data import eval_loader
from engine import evaluate
from files import StopRequest, save_json
from intervals import CONFIDENCE, mean_std, paired_gain
from losses import TERMS
from nets import model_from_checkpoint
from plots import bar_chart


class _SweepParser(argparse.ArgumentParser):
    """sweep.py's own flags; every other word is kept, in order, as ``args.train_flags``."""

    def parse_args(self, args=None, namespace=None):
        own, rest = self.parse_known_args(args, namespace)
        own.train_flags = rest
        return own


def get_args_parser():
    parser = _SweepParser(
        description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False,
        epilog="Every other flag is train_kd.py's (python train_kd.py --help); give a flag "
               "several values to make it an axis of the grid.")
    parser.add_argument("--name", default="sweep",
                        help="the sweep's name: its folder, and the prefix of its runs' names")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="training seeds; every setting runs with each")
    parser.add_argument("--baseline", nargs="+", default=None, metavar="DEST=VALUE",
                        help="the setting every other one is compared with, seed by seed, "
                             "with a 95%% t-interval and a verdict, e.g. --baseline alpha=0 "
                             "beta=0 (default: the one setting whose distillation weights are "
                             "all 0, when the grid holds it; else no verdict)")
    parser.add_argument("--jobs", type=ranged(int, 1), default=1,
                        help="runs trained at once, each in its own process with its share of "
                             "the CPU threads and its log in the sweep's logs/ folder; on a CPU "
                             "two runs at 1 thread finish sooner than one after the other at 2")
    return parser


COMPUTE = ("device", "workers", "threads", "progress")  # how a run computes, not what


def split_flags(words):
    """({axis dest: (flag, [values as typed])}, the words every run gets, the words of
    COMPUTE flags) from train_kd.py flags: a single-valued flag given several values is an
    axis; the compute flags do not name a run (a rerun may pick other ones)."""
    actions = train_kd.get_args_parser()._option_string_actions
    axes, fixed, compute, i = {}, [], [], 0
    while i < len(words):
        j = i + 1
        while j < len(words) and not words[j].startswith("--"):
            j += 1
        flag, values = words[i], words[i + 1:j]
        action = actions.get(flag)
        if action is None:
            raise UserError(f"{flag}: neither a sweep.py nor a train_kd.py flag; see "
                            "python sweep.py --help and python train_kd.py --help")
        if action.dest in ("seed", "out", "resume"):
            raise UserError(f"{flag} is set by sweep.py for each run; use --seeds and --name")
        if action.nargs is None and len(values) > 1:
            axes[action.dest] = (flag, values)
        elif action.dest in COMPUTE:
            compute += words[i:j]
        else:
            fixed += words[i:j]
        i = j
    return axes, fixed, compute


def grid(own, axes, fixed):
    """Every run of the sweep: [{'name', 'setting', 'seed', 'argv'}], settings in grid order,
    seeds innermost."""
    runs = []
    names = list(axes)
    for values in itertools.product(*(axes[n][1] for n in names)):
        setting = dict(zip(names, values))
        label = "_".join(f"{n}{v}" for n, v in setting.items())
        for seed in own.seeds:
            name = "_".join(filter(None, [own.name, label, f"seed{seed}"]))
            argv = fixed + [a for n, v in setting.items() for a in (axes[n][0], v)] + [
                "--seed", str(seed), "--out", name, "--resume", "auto"]
            runs.append({"name": name, "setting": setting, "seed": seed, "argv": argv})
    return runs


def score_final_checkpoint(args):
    """The run's final checkpoint on its --val-split: the shared evaluation, whole set."""
    path = Path(args.model_dir) / f"{args.out}_last.pth"
    model, _ = model_from_checkpoint(path)
    loader = eval_loader(args.data_root, args.limit_val, args.workers, not args.no_download,
                         split=args.val_split)
    device = resolve_device(args.device)
    result = evaluate(model.to(device), loader, device, warmup=0, desc=f"score {args.out}",
                      progress=args.progress)
    return {"miou": result["miou"], "pixel_accuracy": result["pixel_accuracy"],
            "split": args.val_split, "num_images": result["num_images"], "checkpoint": str(path)}


def finished(run, folder):
    """The run's result when it finished before with the same flags, else None."""
    path = Path(folder) / "runs" / f"{run['name']}.json"
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    if done["argv"] != run["argv"]:
        raise UserError(f"{path}: this run was made with other flags ({' '.join(done['argv'])}); "
                        "give the sweep another --name, or move that folder away")
    return done


def run_one(run, folder, rerun, compute=()):
    """Train and score one run, or read its result when it already finished. ``compute``:
    device, worker and thread flags, which do not make another run; a run resumed from its
    checkpoint keeps its own thread count (CPU bits depend on it)."""
    done = finished(run, folder)
    if done is not None:
        print(f"{run['name']}: done before, mIoU {100 * done['miou']:.2f} (skipped)")
        return done
    resumed = (Path(train_kd.get_args_parser().parse_args(run["argv"]).model_dir)
               / f"{run['name']}_last.pth").is_file()
    compute = list(compute)
    if resumed and "--threads" in compute:
        del compute[compute.index("--threads"):compute.index("--threads") + 2]
    print(f"\n== {run['name']}: python train_kd.py {' '.join(run['argv'] + compute)}", flush=True)
    args = train_kd.get_args_parser().parse_args(run["argv"] + compute)
    summary = train_kd.main(args, rerun=rerun)
    result = {**run, **score_final_checkpoint(args),
              "train_seconds": summary["train_seconds_total"]}
    save_json(result, Path(folder) / "runs" / f"{run['name']}.json")
    stop_if_requested(summary, rerun)
    return result


def stop_if_requested(summary, rerun):
    """A stop that came with a run's last step finished that run; it still ends the sweep."""
    if summary.get("stopped_by"):
        name = signal.Signals(summary["stopped_by"]).name
        print(f"stopped by {name} after {summary['name']} finished. To finish the rest, {rerun}",
              file=sys.stderr, flush=True)
        raise SystemExit(128 + summary["stopped_by"])


def _run_in_child(run, folder, rerun, compute, log):
    """A --jobs process: one run, its output in ``log``; a bad-input error exits 2."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", buffering=1) as out:
        sys.stdout = sys.stderr = out
        try:
            run_one(run, folder, rerun, compute)
        except UserError as exc:
            print(f"error: {exc}")
            raise SystemExit(2) from None


def run_parallel(runs, folder, rerun, compute, jobs):
    """Up to ``jobs`` runs at once, each in a spawned process. A stop (Ctrl-C reaches every
    process of the terminal; SIGTERM is passed on) starts no new run and lets the running
    ones save their checkpoints and exit, as each would alone."""
    context = multiprocessing.get_context("spawn")  # never fork a process holding torch threads
    pending, running, failures = [], {}, {}
    for run in runs:
        done = finished(run, folder)
        if done is None:
            pending.append(run)
        else:
            print(f"{run['name']}: done before, mIoU {100 * done['miou']:.2f} (skipped)")
    with StopRequest(verbose=False) as stop:
        # after a stop or a failure no run starts, so only the running ones are waited for
        while running or (pending and not stop.requested and not failures):
            while pending and len(running) < jobs and not stop.requested and not failures:
                run = pending.pop(0)
                log = Path(folder) / "logs" / f"{run['name']}.log"
                child = context.Process(target=_run_in_child, args=(run, folder, rerun,
                                                                     compute, log))
                child.start()
                running[child] = run
                print(f"started {run['name']} (log: {log})", flush=True)
            time.sleep(0.2)
            if stop.signum == signal.SIGTERM:
                for child in running:
                    child.terminate()  # SIGTERM: the run saves, then exits
                stop.signum = signal.SIGINT  # passed on once
            for child in [c for c in running if not c.is_alive()]:
                run = running.pop(child)
                print(f"{run['name']}: " + ("finished" if child.exitcode == 0 else
                      f"stopped (exit {child.exitcode}; its log says why)"), flush=True)
                if child.exitcode != 0:
                    failures[run["name"]] = child.exitcode
    if failures or stop.requested:
        print(f"sweep stopped; to finish it, {rerun}", file=sys.stderr, flush=True)
        raise SystemExit(next(iter(failures.values()), 128 + signal.SIGINT))
    return [finished(run, folder) for run in runs]


def fmt_mean_std(mean, std, n):
    """'mean ± std' in percent; one run has no spread to show."""
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if n > 1 else f"{100 * mean:.2f}"


def aggregate(results):
    """One row per setting: mean, std and n of its runs' mIoU, best mean first."""
    rows = {}
    for r in results:
        key = json.dumps(r["setting"], sort_keys=True)
        rows.setdefault(key, {"setting": r["setting"], "runs": []})["runs"].append(
            {"seed": r["seed"], "miou": r["miou"], "name": r["name"]})
    for row in rows.values():
        row["mean"], row["std"], row["n"] = mean_std([x["miou"] for x in row["runs"]])
    return sorted(rows.values(), key=lambda row: -row["mean"])


def paired_gains(results, baseline):
    """{setting label: paired_gain}: each setting against ``baseline`` (a setting dict)."""
    by = {}
    for r in results:
        by.setdefault(label(r["setting"]), {})[r["seed"]] = r["miou"]
    return {name: paired_gain(seeds, by[label(baseline)]) for name, seeds in by.items()}


def fmt_gain(g):
    """'+mean [low, high]' in points, the 95% t-interval; one pair has no interval to show."""
    if g["n"] < 2:
        return f"{100 * g['gain']:+.2f}"
    return f"{100 * g['gain']:+.2f} [{100 * g['ci_low']:+.2f}, {100 * g['ci_high']:+.2f}]"


def label(setting):
    return " ".join(f"{k}={v}" for k, v in setting.items()) or "(one setting)"


def table(rows, axes, baseline=None):
    """Best first; with a baseline, each setting's paired gain over it and the verdict."""
    names = list(axes)
    head = [axes[n][0] for n in names] + ["mIoU mean ± std (%)", "n", "seeds"]
    if baseline is not None:
        head += [f"gain over {label(baseline)}, {CONFIDENCE:.0%} CI (paired t)", "verdict"]
    body = []
    for row in rows:
        cells = [row["setting"][n] for n in names] + [
            fmt_mean_std(row["mean"], row["std"], row["n"]), row["n"],
            " ".join(str(x["seed"]) for x in row["runs"])]
        if baseline is not None:
            gain = row["paired_gain"]
            cells += ["(baseline)", ""] if row["setting"] == baseline else [fmt_gain(gain),
                                                                            gain["verdict"]]
        body.append(cells)
    return markdown_table(head, body)


def same_value(a, b):
    """Axis values as typed ('0', '0.0') compared as numbers where both are numbers."""
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def find_baseline(words, axes, runs):
    """The setting every other is compared with: ``--baseline DEST=VALUE ...`` or, without
    it, the one setting of the grid whose distillation weights (losses.TERMS) are all 0.
    None when the grid holds no such single setting: then the sweep gives no verdict."""
    settings = list({json.dumps(r["setting"], sort_keys=True): r["setting"] for r in runs}.values())
    if words is None:
        weights = [n for n in axes if n in {t.weight.dest for t in TERMS.values()}]
        zero = [s for s in settings if weights and all(same_value(s[n], 0) for n in weights)]
        return zero[0] if len(zero) == 1 else None
    wanted = {}
    for word in words:
        key, _, value = word.partition("=")
        key = key.lstrip("-").replace("-", "_")
        if key not in axes or not value:
            raise UserError(f"--baseline {word}: give DEST=VALUE for an axis of this grid "
                            f"({', '.join(axes) or 'none'}), e.g. --baseline alpha=0 beta=0")
        wanted[key] = value
    found = [s for s in settings if all(same_value(s[k], v) for k, v in wanted.items())]
    if len(found) != 1:
        raise UserError(f"--baseline {' '.join(words)} matches {len(found)} settings of the "
                        "grid; name a value of every axis so that it matches one")
    return found[0]


def write_results(own, axes, fixed, results, folder, plot_dir):
    """sweep.json, sweep.md and the plot; returns the sweep.json content."""
    rows = aggregate(results)
    baseline = find_baseline(own.baseline, axes, results)
    if baseline is not None:
        gains = paired_gains(results, baseline)
        for row in rows:
            row["paired_gain"] = gains[label(row["setting"])]
    split = results[0]["split"]
    md = table(rows, axes, baseline)
    command = "python sweep.py " + " ".join(
        ["--name", own.name, "--seeds", *map(str, own.seeds), "--jobs", str(own.jobs)]
        + (["--baseline", *own.baseline] if own.baseline else []) + own.train_flags)
    sweep = {"name": own.name, "command": command, "split": split, "axes": {
        n: values for n, (_, values) in axes.items()}, "fixed": fixed, "baseline": baseline,
        "confidence": CONFIDENCE, "rows": rows, "runs": results, "table_markdown": md}
    save_json(sweep, Path(folder) / "sweep.json")
    verdicts = (f" Gains: the mean of the per-seed differences from {label(baseline)} with its "
                f"{CONFIDENCE:.0%} Student's t interval; 'helps' only when all of it lies above "
                "0." if baseline is not None else " No verdict: the grid has no single setting "
                "with every distillation weight 0; give --baseline DEST=VALUE ...")
    (Path(folder) / "sweep.md").write_text(
        f"`{command}`\n\nmIoU of each run's final checkpoint on the '{split}' split, mean ± "
        f"sample std over seeds.{verdicts}\n\n{md}\n")
    bar_chart([label(r["setting"]) for r in rows], [100 * r["mean"] for r in rows],
              [100 * r["std"] for r in rows], Path(plot_dir) / f"{own.name}_sweep.png",
              f"{own.name}: final mIoU on '{split}' (mean ± std over seeds)", "mIoU (%)")
    return sweep


def compute_flags(args, base, compute):
    """The compute words of every run: as given, plus --threads unless given (with --jobs
    N, each run's share of the threads chosen now from the cores free of other programs)."""
    if "--threads" not in compute:
        free = argparse.Namespace(threads=None, workers=0)
        print(set_compute_resources(free, resolve_device(base.device)))
        compute = compute + ["--threads", str(max(1, free.threads // args.jobs))]
    return compute + (["--no-progress"] if args.jobs > 1 else [])


def main(args, rerun=None):
    """Run the sweep; returns sweep.json's content. ``rerun``: what a stop tells the user to
    run to continue (the demo says its own command)."""
    axes, fixed, compute = split_flags(args.train_flags)
    runs = grid(args, axes, fixed)
    base = train_kd.get_args_parser().parse_args(runs[0]["argv"] + compute)  # bad flags fail here
    folder = Path(base.output_dir) / "sweep" / args.name
    print(f"sweep {args.name}: {len(runs) // len(args.seeds)} setting(s) x {len(args.seeds)} "
          f"seed(s) = {len(runs)} runs, scored on '{base.val_split}'; results in {folder}")
    rerun = rerun or ("rerun the same sweep.py command: finished runs are skipped and this "
                      "one continues where it stopped")
    compute = compute_flags(args, base, compute)
    results = ([run_one(run, folder, rerun, compute) for run in runs] if args.jobs == 1
               else run_parallel(runs, folder, rerun, compute, args.jobs))
    sweep = write_results(args, axes, fixed, results, folder, base.plot_dir)
    print(f"\n{sweep['table_markdown']}\n\nwritten to {folder}/sweep.json, sweep.md and "
          f"{base.plot_dir}/{args.name}_sweep.png")
    return sweep


if __name__ == "__main__":
    run_cli(main, get_args_parser())
