"""Figures: training curves drawn from a history.jsonl, and segmentation overlays.

Plots are always redrawn from result files, so they can be regenerated without training:

    python plots.py outputs/response_kd/history.jsonl --name response_kd
"""
import argparse
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from checkpoints import read_history  # noqa: E402
from cli import HelpFormatter  # noqa: E402
from data import IGNORE_INDEX, VOC_CLASSES, voc_palette, voc_palette_bytes  # noqa: E402


def fit_title(ax, text, fontsize=10):
    """A title wrapped to the axes' width: a long run name would otherwise run off the
    figure's edge (tight_layout makes room for titles' height, never their width)."""
    width_in = ax.figure.get_figwidth() * ax.get_position().width
    chars = max(20, int(width_in * 72 / (0.6 * fontsize)))  # ~0.6 em per character
    ax.set_title("\n".join(textwrap.wrap(text, chars, break_on_hyphens=False)),
                 fontsize=fontsize)


def wrap_to_figure(fig, text, fontsize):
    """A suptitle wrapped to the figure's width (see fit_title)."""
    chars = max(20, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.wrap(text, chars, break_on_hyphens=False))


def epoch_axis(ax):
    """Epochs are whole numbers: no 2.5 or 7.5 ticks. Call it after plotting."""
    lo, hi = ax.get_xlim()
    if hi - lo < 2:  # a single point: autoscale's margins hold no whole number to tick
        mid = round((lo + hi) / 2)
        ax.set_xlim(mid - 1, mid + 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_history(history_path, plot_dir, name):
    """Write ``NAME_loss.png`` (each loss term) and ``NAME_miou.png``; returns their paths."""
    records = read_history(history_path)
    if not records:
        return []
    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    epochs = [r["epoch"] for r in records]
    terms = [k for k in records[-1] if k.startswith("loss_")]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in terms:
        style = "-" if key == "loss_total" else "--"
        ax.plot(epochs, [r.get(key, np.nan) for r in records], style, marker=".",
                label=key[len("loss_"):])
    ax.set(xlabel="epoch", ylabel="train loss (unweighted terms)")
    fit_title(ax, f"{name}: training loss")
    epoch_axis(ax)
    ax.grid(alpha=0.3)
    ax.legend()
    loss_png = plot_dir / f"{name}_loss.png"
    fig.tight_layout()
    fig.savefig(loss_png, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    validated = [r for r in records if r.get("val_miou") is not None]  # --val-every N
    ax.plot([r["epoch"] for r in validated], [100 * r["val_miou"] for r in validated], marker="o")
    ax.set(xlabel="epoch", ylabel="val mIoU (%)")
    fit_title(ax, f"{name}: validation mIoU")
    epoch_axis(ax)
    ax.grid(alpha=0.3)
    miou_png = plot_dir / f"{name}_miou.png"
    fig.tight_layout()
    fig.savefig(miou_png, dpi=120)
    plt.close(fig)
    return [loss_png, miou_png]


def mean_band(runs, key):
    """(epochs, mean, low, high) of ``key`` over the runs (one record list per seed), on the
    epochs that every run recorded; low/high: the smallest and largest run."""
    common = set.intersection(*({r["epoch"] for r in rs if r.get(key) is not None}
                                for rs in runs))
    epochs = sorted(common)
    values = np.array([[next(r[key] for r in rs if r["epoch"] == e) for e in epochs]
                       for rs in runs], dtype=float)
    return epochs, values.mean(0), values.min(0), values.max(0)


def method_panels(curves, path, title=""):
    """One column per method: training loss (top) and validation mIoU (bottom), the mean
    over its seeds with a band from the lowest to the highest seed where it has several.
    ``curves``: [(label, [history records of one seed, ...]), ...]."""
    per_row = 4 if len(curves) > 5 else len(curves)  # more methods: a second row of panels
    rows = -(-len(curves) // per_row)
    fig, grid = plt.subplots(2 * rows, per_row, figsize=(2.1 * per_row + 0.6, 1.8 * 2 * rows),
                             squeeze=False)
    for i in range(len(curves), rows * per_row):  # the last row's empty places
        for row in (0, 1):
            grid[2 * (i // per_row) + row][i % per_row].set_visible(False)
    for i, (label, runs) in enumerate(curves):
        col = i % per_row
        axes = grid[2 * (i // per_row): 2 * (i // per_row) + 2]
        for row, (key, scale, ylabel) in enumerate((("loss_total", 1, "train loss (total)"),
                                                    ("val_miou", 100, "val mIoU (%)"))):
            ax = axes[row][col]
            epochs, mean, low, high = mean_band(runs, key)
            ax.plot(epochs, scale * mean, marker="." if row else None, ms=3, color="#4C72B0")
            if len(runs) > 1:
                ax.fill_between(epochs, scale * low, scale * high, alpha=0.25, color="#4C72B0",
                                lw=0)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            epoch_axis(ax)
            if col == 0:
                ax.set_ylabel(ylabel, fontsize=8)
        fit_title(axes[0][col], f"{label} ({len(runs)} seed{'s' if len(runs) > 1 else ''})", 8)
        axes[1][col].set_xlabel("epoch", fontsize=8)
    if title:
        fig.suptitle(wrap_to_figure(fig, title, 9), fontsize=9)
    fig.tight_layout(pad=0.4)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return Path(path)


def bar_chart(labels, means, errors, path, title, ylabel, grey=()):
    """Bars with error bars and their values on top (sweep.py's settings, demo.py's methods);
    the labels in ``grey`` are drawn grey (the teacher, the baseline)."""
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 2), 4.2))
    colors = ["#888888" if label in grey else "#4C72B0" for label in labels]
    ax.bar(range(len(labels)), means, yerr=errors, capsize=4, color=colors)
    for i, (m, e) in enumerate(zip(means, errors)):
        # 4 points above the error bar's cap, so the number never sits on the cap's line
        ax.annotate(f"{m:.1f}", (i, m + (e or 0)), xytext=(0, 4), textcoords="offset points",
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 5 else 0, ha="right"
                  if len(labels) > 5 else "center", fontsize=8)
    ax.set(ylabel=ylabel)
    fit_title(ax, title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def comparison_chart(rows, path, title):
    """demo.py's figure: [mIoU per method, mean ± std over seeds | each KD method's paired
    gain over no KD with its 95% t-interval and verdict]. ``rows``: demo.method_rows."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), width_ratios=(5, 4))
    names = [r["method"] for r in rows]
    means, stds = [100 * r["mean"] for r in rows], [100 * r["std"] for r in rows]
    left.bar(range(len(rows)), means, yerr=stds, capsize=4,
             color=["#888888" if n == "teacher" else "#4C72B0" for n in names])
    for i, (m, e) in enumerate(zip(means, stds)):
        left.annotate(f"{m:.1f}", (i, m + e), xytext=(0, 4), textcoords="offset points",
                      ha="center", va="bottom", fontsize=8)
    left.set_xticks(range(len(rows)), [n.replace("_", " ") for n in names], fontsize=8)
    left.set(ylabel="mIoU (%)", title="final mIoU, mean ± std over seeds")
    left.grid(axis="y", alpha=0.3)
    kd = [r for r in rows if "paired_gain" in r]
    gains = [100 * r["paired_gain"]["gain"] for r in kd]
    halves = [0.0 if r["paired_gain"]["n"] < 2 else
              100 * (r["paired_gain"]["ci_high"] - r["paired_gain"]["ci_low"]) / 2 for r in kd]
    colours = {"helps": "#2E7D32", "hurts": "#C62828"}
    right.axhline(0, color="black", lw=0.8)
    for i, (r, g, h) in enumerate(zip(kd, gains, halves)):
        verdict = r["paired_gain"]["verdict"]
        right.errorbar(i, g, yerr=h, fmt="o", capsize=5, color=colours.get(verdict, "#555555"))
        right.annotate(f"{g:+.1f}\n{verdict.replace('detectable with', 'with')}", (i, g + h),
                       xytext=(0, 4), textcoords="offset points", ha="center", va="bottom",
                       fontsize=7)
    right.set_xticks(range(len(kd)), [r["method"].replace("_", " ") for r in kd], fontsize=8)
    right.set_xlim(-0.6, len(kd) - 0.4)
    low, high = min([g - h for g, h in zip(gains, halves)] + [0]), max(
        [g + h for g, h in zip(gains, halves)] + [0])
    right.set_ylim(low - 0.1 * (high - low + 1), high + 0.35 * (high - low + 1))  # room for labels
    right.set(ylabel="gain over no KD (points)", title="paired gain, 95% t-interval")
    right.grid(axis="y", alpha=0.3)
    fig.suptitle(wrap_to_figure(fig, title, 10), fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def tradeoff_chart(rows, refs, seeds, path, title):
    """Latency (log scale) against mIoU: every seed's score small, the mean large, an arrow
    from each pruned point before fine-tuning to after (same network, same latency); the
    references, not scored on this data, as dashed vertical lines at their latency."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    by = {r["form"]: r for r in rows}
    for i, r in enumerate(rows):
        color = plt.cm.tab10.colors[i % 10]
        ys = [r["miou_by_seed"][s] for s in seeds]
        ax.scatter([r["median_ms"]] * len(ys), ys, s=14, color=color, alpha=0.45, linewidths=0)
        ax.scatter(r["median_ms"], r["miou_mean"], s=70, color=color, edgecolors="black",
                   marker="s" if r["form"].endswith("_ft") else "o", label=r["label"], zorder=3)
    for key, r in by.items():
        if key + "_ft" in by:
            after = by[key + "_ft"]
            ax.annotate("", (after["median_ms"], after["miou_mean"]),
                        (r["median_ms"], r["miou_mean"]),
                        arrowprops={"arrowstyle": "->", "color": "0.4", "lw": 1})
    for ref in refs:
        ax.axvline(ref["median_ms"], ls="--", color="0.5", lw=1)
        ax.text(ref["median_ms"], 0.02, f" {ref['label']}: {ref['median_ms']:.0f} ms\n"
                " (mIoU not measured here)", rotation=90, fontsize=7, va="bottom", ha="right",
                transform=ax.get_xaxis_transform())
    ax.set_xscale("log")
    # 300, not 3 x 10^2; minor ticks labelled at 2, 3 and 5 of each decade only
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "235"
                                               else ""))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("median latency, ms (log scale)")
    ax.set_ylabel("mIoU (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fit_title(ax, title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def colorize(label):
    """(H, W) labels -> (H, W, 3) uint8 in the VOC palette (255 drawn in VOC's void colour)."""
    return voc_palette()[np.asarray(label, dtype=np.uint8)]


def blend(image, label, alpha=0.55):
    """(H, W, 3) uint8: ``label`` in the VOC palette over ``image``; objects and void are
    tinted, background keeps the photo visible. Pillow's blend and composite: a few
    milliseconds, which predict.py spends on every image (numpy's took four times more)."""
    image = np.asarray(image)
    photo = Image.fromarray(image if image.dtype == np.uint8 else
                            image.clip(0, 255).astype(np.uint8))
    label = Image.fromarray(np.asarray(label, dtype=np.uint8))
    colours = label.copy()
    colours.putpalette(voc_palette_bytes())  # L -> P: each index drawn in its colour
    tinted = label.point(lambda v: 255 if v else 0)
    return np.asarray(Image.composite(Image.blend(photo, colours.convert("RGB"), alpha), photo,
                                      tinted))


def save_overlay(image, target, pred, path, title="", class_names=VOC_CLASSES, alpha=0.55):
    """[image | ground truth | prediction] with masks blended on the image, plus a legend.

    image: (H, W, 3) uint8; target, pred: (H, W) integer labels.
    """
    image = np.asarray(image, dtype=np.float32)
    target, pred = np.asarray(target), np.asarray(pred)

    present = sorted(set(np.unique(target).tolist()) | set(np.unique(pred).tolist()))
    present = [c for c in present if c != IGNORE_INDEX and c < len(class_names)]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.3))
    for ax, panel, label in zip(axes, (image.astype(np.uint8), blend(image, target, alpha),
                                       blend(image, pred, alpha)),
                                ("image", "ground truth", "prediction")):
        ax.imshow(panel)
        ax.set_title(label)
        ax.axis("off")
    palette = voc_palette() / 255.0
    handles = [Patch(color=palette[c], label=class_names[c]) for c in present]
    if (target == IGNORE_INDEX).any():
        handles.append(Patch(color=palette[IGNORE_INDEX], label="void (ignored)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), frameon=False)
    if title:
        fig.suptitle(wrap_to_figure(fig, title, 12), fontsize=12)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("history", help="a history.jsonl written by train_kd.py")
    parser.add_argument("--name", required=True, help="run name used in the file names")
    parser.add_argument("--plot-dir", default="plots", help="where the PNGs go")
    return parser


def main(args):
    for path in plot_history(args.history, args.plot_dir, args.name):
        print(f"wrote {path}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
