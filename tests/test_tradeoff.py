"""tradeoff.py: every number of its table comes from the files it reads, and its intervals
are the paired Student-t intervals of the per-seed differences."""
import json
import statistics

import pytest
import scipy.stats

import tradeoff


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def fake_sweep(root, seeds):
    """Evaluate and compress JSONs as run_sweep.sh and compress.py name them; returns
    {(form, seed): mIoU in %}."""
    mious = {}
    for seed in seeds:
        variants = {"": 60, "_cont": 66} | {f"_p{sp}": 20 - i for i, sp in enumerate(tradeoff.SPARSITIES)}
        variants |= {f"_p{sp}_ft": 63 - 5 * i for i, sp in enumerate(tradeoff.SPARSITIES)}
        for name, base in variants.items():
            value = base + 1.5 * seed + 0.25 * seed * seed * (name == "_p0.5_ft")
            mious[name, seed] = value
            write(root / f"pbase_s{seed}{name}_val.json", {"miou": value / 100})
        rows = [{"variant": v, "miou": (60 + 1.5 * seed + d) / 100}
                for v, d in (("fp32", 0), ("int8", -0.3 * seed), ("onnx", 0))]
        write(root / f"pbase_s{seed}_compress_int8.json", {"rows": rows})
    return mious


def fake_benchmark(path):
    names = ["models/pbase_s0_last.pth", "models/compressed/pbase_s0_last_int8.pt2",
             "models/compressed/pbase_s0_last.onnx", "fcn_resnet50",
             *[f"models/compressed/pbase_s0_last_pruned_channels_{sp}.pth"
               for sp in tradeoff.SPARSITIES]]
    rows = [{"model": n, "median_ms": 150.0 - 10 * i if n != "fcn_resnet50" else 2500.0,
             "params": 1000 + i, "gflops": None if n.endswith((".pt2", ".onnx")) else 2.0 - 0.1 * i}
            for i, n in enumerate(names)]
    write(path, {"rows": rows, "size": 520, "threads": 1, "hardware": "CPU (test)"})
    return {r["model"]: r for r in rows}


def test_the_table_and_intervals_come_from_the_files(tmp_path):
    mious = fake_sweep(tmp_path / "sweep", seeds=(0, 1, 2, 3, 4))
    bench = fake_benchmark(tmp_path / "bench.json")
    result = tradeoff.main(tradeoff.get_args_parser().parse_args([
        "--sweep", str(tmp_path / "sweep"), "--benchmark", str(tmp_path / "bench.json"),
        "--seeds", "0", "1", "2", "--check-seeds", "3", "4", "--out", str(tmp_path / "t")]))
    rows = {r["form"]: r for r in result["rows"]}
    ft = rows["p0.5_ft"]
    assert ft["median_ms"] == bench["models/compressed/pbase_s0_last_pruned_channels_0.5.pth"]["median_ms"]
    assert ft["miou_mean"] == pytest.approx(statistics.fmean(mious["_p0.5_ft", s] for s in (0, 1, 2)))
    diffs = [mious["_p0.5_ft", s] - mious["", s] for s in (0, 1, 2)]
    half = scipy.stats.t.ppf(0.975, 2) * statistics.stdev(diffs) / 3 ** 0.5
    assert ft["vs_fp32"]["ci_low"] == pytest.approx(statistics.fmean(diffs) - half)
    check = [mious["_p0.5_ft", s] - mious["_cont", s] for s in (3, 4)]
    assert ft["vs_control_check"]["gain"] == pytest.approx(statistics.fmean(check))
    assert rows["int8"]["miou_by_seed"] == pytest.approx({0: 60.0, 1: 61.2, 2: 62.4})
    assert "vs_fp32_check" not in rows["int8"]  # int8 was scored on the main seeds only
    assert [r["form"] for r in result["references"]] == ["fcn_resnet50"]
    table = (tmp_path / "t.md").read_text()
    assert "| pruned 0.5, fine-tuned (KD) | 1,005 | 1.50 | 100.0 | 1.50x |" in table
    assert (tmp_path / "t.png").stat().st_size > 10_000


def test_a_missing_seed_names_the_file_and_the_command(tmp_path):
    fake_sweep(tmp_path / "sweep", seeds=(0,))
    fake_benchmark(tmp_path / "bench.json")
    args = tradeoff.get_args_parser().parse_args([
        "--sweep", str(tmp_path / "sweep"), "--benchmark", str(tmp_path / "bench.json"),
        "--seeds", "0", "1", "--out", str(tmp_path / "t")])
    with pytest.raises(tradeoff.UserError, match=r"pbase_s1_val\.json: missing; run report/pruning/run_sweep\.sh"):
        tradeoff.main(args)
    assert not (tmp_path / "t.md").exists()
