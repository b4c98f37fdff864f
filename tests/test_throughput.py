"""benchmark.py --throughput's measurements, each run once on a tiny generated tree."""
import pytest
import torch

import benchmark
import throughput

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")


@pytest.fixture
def tiny(monkeypatch):
    setting = {"size": 64, "crop": 48, "scale": (0.75, 1.5), "train": 12, "val": 6, "val_every": 3}
    monkeypatch.setitem(throughput.SIZES, "demo", setting)
    return setting


def test_each_throughput_part_measures_what_it_says(synth_root, tmp_path, tiny):
    assert throughput.loader_rate(synth_root, tiny, 0) > 0
    steps = throughput.step_rates(synth_root, CPU, rounds=1)
    assert set(steps) == {"no_kd", "response_kd", "response_feature_kd"}
    assert all(s["loop_ips"] > 0 and s["bare_ips"] > 0 for s in steps.values())
    # the evaluation's wall time holds its model calls: never less than them
    assert throughput.eval_overhead(synth_root, CPU) >= 1.0
    parts = throughput.epoch_parts(synth_root, tmp_path, CPU, epochs=1)
    assert set(parts) == {"train", "validation", "checkpoint", "history"}
    assert all(v > 0 for v in parts.values())
    assert (tmp_path / "fixed" / "last.pth").is_file()
    assert (tmp_path / "fixed" / "history.jsonl").read_text().count("\n") == 2  # 2 epochs


def test_fixed_share_spreads_validation_over_val_every_epochs():
    parts = {"train": 9.0, "validation": 2.0, "checkpoint": 0.5, "history": 0.5}
    assert throughput.fixed_share(parts, 1) == pytest.approx(3.0 / 12.0)
    assert throughput.fixed_share(parts, 4) == pytest.approx(1.5 / 10.5)


def test_contention_chooses_no_more_threads_beside_a_busy_process(synth_root, tiny):
    result = throughput.contention(synth_root, CPU)
    assert 1 <= result["busy_threads"] <= result["idle_threads"] <= result["default_threads"]
    assert result["busy_over_idle"] == result["busy_seconds"] / result["idle_seconds"]
    assert result["busy_default_over_idle"] == pytest.approx(
        result["busy_default_seconds"] / result["idle_seconds"])


def test_the_demo_settings_are_demo_py_s():
    import demo
    defaults = demo.get_args_parser().parse_args([])
    s = throughput.SIZES["demo"]
    # the demo's students validate on its 'select' split
    assert (defaults.size, defaults.crop_size, tuple(defaults.scale_range), defaults.train,
            defaults.select, defaults.val_every) == (s["size"], s["crop"], s["scale"], s["train"],
                                                     s["val"], s["val_every"])


def test_throughput_tables_show_each_number_with_its_target():
    result = {"loader_ips": {"voc": {"0": 80.0, "2": 170.0}},
              "step": {"no_kd": {"loop_ips": 50.0, "bare_ips": 60.0, "loop_over_bare": 1.2,
                                 "kd_cost": 1.0}},
              "eval_wall_over_model": {"voc": 1.25}, "epoch_fixed_share": {"1": 0.125, "4": 0.05},
              "contention": {"idle_threads": 2, "idle_seconds": 3.0, "busy_threads": 1,
                             "busy_seconds": 3.9, "busy_over_idle": 1.3, "default_threads": 2,
                             "busy_default_seconds": 9.9, "busy_default_over_idle": 3.3}}
    tables = benchmark.throughput_tables(result)
    assert "| voc | 2 | 170.0 | 85.0 |" in tables  # per worker: 170 / 2
    assert "| no_kd | 50.0 | 60.0 | 1.20x | 1.00x |" in tables
    assert "| voc | 1.25x |" in tables
    assert "| 1 epoch(s) | 12.5% |" in tables and "| 4 epoch(s) | 5.0% |" in tables
    assert "| one busy process | 1 (auto) | 3.90 | 1.30x |" in tables
    assert "| one busy process | 2 (torch's default) | 9.90 | 3.30x |" in tables
    assert "150 VOC-size images/s per worker" in tables
