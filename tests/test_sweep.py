"""sweep.py: the grid, skip-if-done, and mean/std/paired gains against numbers worked by hand."""
import json
import math

import pytest
from conftest import train_flags

import intervals
import sweep
import train_kd
from cli import REPO_DIR, UserError


def parsed(words):
    return sweep.get_args_parser().parse_args(words)


def test_grid_crosses_the_multi_valued_flags_and_passes_the_rest():
    args = parsed(["--name", "g", "--alpha", "0", "0.5", "--epochs", "2", "--tau", "1", "4",
                   "--scale-range", "0.5", "1.5", "--seeds", "0", "1", "--threads", "1"])
    axes, fixed, compute = sweep.split_flags(args.train_flags)
    assert axes == {"alpha": ("--alpha", ["0", "0.5"]), "tau": ("--tau", ["1", "4"])}
    assert fixed == ["--epochs", "2", "--scale-range", "0.5", "1.5"]  # nargs=2: not an axis
    assert compute == ["--threads", "1"]  # how runs compute does not name them
    runs = sweep.grid(args, axes, fixed)
    assert [r["name"] for r in runs[:3]] == ["g_alpha0_tau1_seed0", "g_alpha0_tau1_seed1",
                                             "g_alpha0_tau4_seed0"]
    assert len(runs) == 2 * 2 * 2
    assert runs[-1]["setting"] == {"alpha": "0.5", "tau": "4"} and runs[-1]["seed"] == 1
    assert runs[-1]["argv"] == fixed + ["--alpha", "0.5", "--tau", "4", "--seed", "1",
                                        "--out", "g_alpha0.5_tau4_seed1", "--resume", "auto"]
    parsed_run = train_kd.get_args_parser().parse_args(runs[-1]["argv"])
    assert (parsed_run.alpha, parsed_run.tau, parsed_run.seed, parsed_run.epochs) == (0.5, 4.0, 1, 2)


@pytest.mark.parametrize("words, message", [
    (["--alpha", "0", "1", "--colour", "red"], "--colour: neither a sweep.py nor a train_kd.py flag"),
    (["--seed", "3"], "--seed is set by sweep.py for each run"),
])
def test_flags_sweep_cannot_take_are_refused(words, message):
    with pytest.raises(UserError, match=message):
        sweep.split_flags(parsed(words).train_flags)


def result(setting, seed, miou):
    return {"setting": setting, "seed": seed, "miou": miou, "name": f"{setting}{seed}"}


RESULTS = [result({"alpha": "0.5"}, s, m) for s, m in ((0, 0.5), (1, 0.6), (2, 0.7))] + [
    result({"alpha": "0"}, s, m) for s, m in ((0, 0.4), (1, 0.4), (2, 0.7))]


def test_aggregate_gives_mean_and_sample_std_best_first():
    rows = sweep.aggregate(RESULTS)
    assert [r["setting"] for r in rows] == [{"alpha": "0.5"}, {"alpha": "0"}]
    # by hand: (0.5 + 0.6 + 0.7) / 3 = 0.6; deviations -0.1, 0, 0.1: sqrt(0.02 / 2) = 0.1
    assert rows[0]["mean"] == pytest.approx(0.6) and rows[0]["std"] == pytest.approx(0.1)
    # 0.5; deviations -0.1, -0.1, 0.2: sqrt(0.06 / 2)
    assert rows[1]["mean"] == pytest.approx(0.5) and rows[1]["std"] == pytest.approx(math.sqrt(0.03))
    assert rows[0]["n"] == rows[1]["n"] == 3
    assert sweep.fmt_mean_std(rows[0]["mean"], rows[0]["std"], 3) == "60.00 ± 10.00"
    assert sweep.fmt_mean_std(0.8206, 0.0, 1) == "82.06"  # one run has no spread to show


def test_paired_gains_are_per_seed_differences_with_their_standard_error():
    gains = sweep.paired_gains(RESULTS, {"alpha": "0"})
    g = gains["alpha=0.5"]
    # differences 0.1, 0.2, 0.0: mean 0.1, sample std 0.1, standard error 0.1 / sqrt(3)
    assert g["diffs"] == pytest.approx([0.1, 0.2, 0.0]) and g["seeds"] == [0, 1, 2]
    assert (g["gain"], g["se"], g["n"]) == (pytest.approx(0.1), pytest.approx(0.1 / math.sqrt(3)), 3)
    # by hand, t(0.975, 2 df) = 4.3027 from a t table: 0.1 +- 4.3027 * 0.1 / sqrt(3) = 0.1 +- 0.2484
    assert (g["ci_low"], g["ci_high"]) == (pytest.approx(-0.1484, abs=1e-4),
                                           pytest.approx(0.3484, abs=1e-4))
    assert g["verdict"] == "no difference detectable with 3 seeds"  # straddles 0
    assert sweep.fmt_gain(g) == "+10.00 [-14.84, +34.84]"
    assert gains["alpha=0"]["gain"] == 0.0 and gains["alpha=0"]["n"] == 3
    one = intervals.paired_gain({0: 0.6}, {0: 0.6211})
    assert sweep.fmt_gain(one) == "-2.11"  # one pair has no interval to show
    assert one["verdict"] == "no difference detectable with 1 seed"


@pytest.mark.parametrize("n", range(2, 31))
def test_the_interval_is_students_t_with_n_minus_1_degrees_of_freedom(n):
    scipy_stats = pytest.importorskip("scipy.stats")
    diffs = [0.03 + 0.02 * math.sin(3 * i + n) for i in range(n)]  # any spread will do
    mean, low, high = intervals.t_interval(diffs)
    want = scipy_stats.t.interval(0.95, df=n - 1, loc=sum(diffs) / n,
                                  scale=scipy_stats.sem(diffs))
    assert (low, high) == (pytest.approx(want[0], rel=1e-12), pytest.approx(want[1], rel=1e-12))
    assert mean == pytest.approx(sum(diffs) / n)


@pytest.mark.parametrize("diffs, verdict", [
    ([0.05, 0.06, 0.07], "helps"),      # 0.06 +- 4.3027 * 0.01 / sqrt(3) = [0.035, 0.085]
    ([-0.05, -0.06, -0.07], "hurts"),   # its mirror: all of it below 0
    ([0.05, -0.01, 0.02], "no difference detectable with 3 seeds"),  # [-0.056, 0.096]
    ([0.20, 0.00], "no difference detectable with 2 seeds"),  # t(0.975, 1) = 12.71: [-1.17, 1.37]
])
def test_the_verdict_follows_where_the_interval_lies(diffs, verdict):
    g = intervals.paired_gain(dict(enumerate(diffs)), dict.fromkeys(range(len(diffs)), 0.0))
    assert g["verdict"] == verdict
    assert (g["ci_low"] > 0) == (verdict == "helps") and (g["ci_high"] < 0) == (verdict == "hurts")


def test_a_sweep_compares_with_its_baseline_or_gives_no_verdict():
    axes = {"alpha": ("--alpha", ["0", "0.5"]), "beta": ("--beta", ["0", "0.5"])}
    runs = [{"setting": {"alpha": a, "beta": b}} for a in ("0", "0.5") for b in ("0", "0.5")]
    assert sweep.find_baseline(None, axes, runs) == {"alpha": "0", "beta": "0"}  # the default
    # a flag's name or its dest, and a number as typed another way, name the same setting
    assert sweep.find_baseline(["alpha=0.5", "--beta=0.0"], axes, runs) == {"alpha": "0.5",
                                                                            "beta": "0"}
    tau = {"alpha": ("--alpha", ["0", "0.5"]), "tau": ("--tau", ["1", "4"])}
    tau_runs = [{"setting": {"alpha": a, "tau": t}} for a in ("0", "0.5") for t in ("1", "4")]
    assert sweep.find_baseline(None, tau, tau_runs) is None  # alpha=0 at two taus: no one baseline
    lr = {"lr": ("--lr", ["0.01", "0.001"])}
    assert sweep.find_baseline(None, lr, [{"setting": {"lr": v}} for v in ("0.01", "0.001")]) is None
    with pytest.raises(UserError, match="matches 2 settings"):
        sweep.find_baseline(["alpha=0"], tau, tau_runs)
    with pytest.raises(UserError, match="an axis of this grid"):
        sweep.find_baseline(["gamma=1"], axes, runs)
    rows = sweep.aggregate([result({"alpha": "0.5"}, s, m) for s, m in ((0, 0.5), (1, 0.6), (2, 0.7))]
                           + [result({"alpha": "0"}, s, m) for s, m in ((0, 0.4), (1, 0.5), (2, 0.6))])
    gains = sweep.paired_gains([r | {"setting": row["setting"]} for row in rows for r in row["runs"]],
                               {"alpha": "0"})
    for row in rows:
        row["paired_gain"] = gains[sweep.label(row["setting"])]
    md = sweep.table(rows, {"alpha": ("--alpha", ["0", "0.5"])}, {"alpha": "0"})
    assert "| 0.5 | 60.00 ± 10.00 | 3 | 0 1 2 | +10.00 [+10.00, +10.00] | helps |" in md
    assert "| 0 | 50.00 ± 10.00 | 3 | 0 1 2 | (baseline) |  |" in md


def test_a_finished_run_is_skipped_and_other_flags_under_its_name_refused(synth_root, tmp_path,
                                                                          monkeypatch):
    words = ["--name", "s", "--seeds", "0", "--alpha", "0", "0.5", "--teacher", "lite",
             "--teacher-weights", "none", *train_flags(synth_root, tmp_path, "--limit-train", "4",
                                                         "--batch-size", "2")]
    first = sweep.main(parsed(words))
    assert len(first["runs"]) == 2 and first["split"] == "val"
    assert (tmp_path / "outputs/sweep/s/sweep.md").is_file()
    assert (tmp_path / "plots/s_sweep.png").is_file()
    for run in first["runs"]:  # scored on the final checkpoint
        assert run["checkpoint"].endswith(f"{run['name']}_last.pth")

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train_kd, "main", no_training)
    again = sweep.main(parsed(words))
    assert [r["miou"] for r in again["runs"]] == [r["miou"] for r in first["runs"]]
    with pytest.raises(UserError, match="s_alpha0_seed0.json: this run was made with other flags"):
        sweep.main(parsed(words + ["--lr", "0.5"]))
    saved = json.loads((tmp_path / "outputs/sweep/s/sweep.json").read_text())
    assert saved["rows"][0]["n"] == 1 and saved["command"].startswith("python sweep.py --name s")


@pytest.mark.slow
def test_runs_in_parallel_processes_compute_the_same_bits(synth_root, tmp_path):
    """--jobs 2 trains each run in a spawned process: same flags, same thread count, same
    checkpoint bits as one run after the other in this process."""
    import torch

    def sweep_in(work, jobs):
        words = ["--name", "p", "--seeds", "0", "--jobs", jobs, "--alpha", "0", "0.5", "--teacher",
                 "lite", "--teacher-weights", "none", *train_flags(
                     synth_root, work, "--limit-train", "4", "--batch-size", "2", "--threads", "1")]
        return sweep.main(parsed(words))

    alone, parallel = sweep_in(tmp_path / "a", "1"), sweep_in(tmp_path / "b", "2")
    assert [r["miou"] for r in alone["runs"]] == [r["miou"] for r in parallel["runs"]]
    for run in alone["runs"]:
        a = torch.load(tmp_path / "a/models" / f"{run['name']}_last.pth", weights_only=True)
        b = torch.load(tmp_path / "b/models" / f"{run['name']}_last.pth", weights_only=True)
        assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items()), run["name"]
    assert len(list((tmp_path / "b/outputs/sweep/p/logs").glob("*.log"))) == 2


def test_a_failed_run_ends_a_parallel_sweep_with_runs_still_waiting(tmp_path):
    """With --jobs, a failure (or a stop) starts no new run; the sweep must still end once
    the running ones have, not wait forever on the runs it will not start."""
    import subprocess
    import sys
    command = [sys.executable, "sweep.py", "--name", "f", "--seeds", "0", "1", "2", "--jobs", "2",
               "--data-root", str(tmp_path / "no_voc_here"), "--no-download", "--threads", "1",
               "--model-dir", str(tmp_path / "models"), "--output-dir", str(tmp_path / "outputs"),
               "--plot-dir", str(tmp_path / "plots")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180,
                          cwd=REPO_DIR)
    assert done.returncode == 2, done.stderr
    assert "sweep stopped; to finish it" in done.stderr
    logs = sorted((tmp_path / "outputs/sweep/f/logs").glob("*.log"))
    assert len(logs) == 2  # the third run was never started
    assert "error:" in logs[0].read_text()
