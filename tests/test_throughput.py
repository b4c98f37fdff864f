"""benchmark.py --throughput's measurements, each run once on a tiny generated tree."""
import pytest
import torch

import benchmark
import throughput

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")


@pytest.fixture
def tiny(monkeypatch):
    setting = {"size": 64, "crop": 48, "scale": (0.75, 1.5), "train": 12, "val": 6}
    monkeypatch.setitem(throughput.SIZES, "demo", setting)
    return setting


def test_each_throughput_part_measures_what_it_says(synth_root, tmp_path, tiny):
    assert throughput.loader_rate(synth_root, tiny, 0) > 0
    steps = throughput.step_rates(synth_root, CPU, rounds=1)
    assert set(steps) == {"no_kd", "response_kd", "response_feature_kd"}
    assert all(s["loop_ips"] > 0 and s["bare_ips"] > 0 for s in steps.values())
    # the evaluation's wall time holds its model calls: never less than them
    assert throughput.eval_overhead(synth_root, CPU) >= 1.0
    share = throughput.epoch_fixed_share(synth_root, tmp_path, CPU)
    assert 0 < share < 1
    assert (tmp_path / "fixed" / "last.pth").is_file()


def test_throughput_tables_show_each_number_with_its_target():
    result = {"loader_ips": {"voc": {"0": 80.0, "2": 170.0}},
              "step": {"no_kd": {"loop_ips": 50.0, "bare_ips": 60.0, "loop_over_bare": 1.2,
                                 "kd_cost": 1.0}},
              "eval_wall_over_model": {"voc": 1.25}, "epoch_fixed_share": 0.125}
    tables = benchmark.throughput_tables(result)
    assert "| voc | 2 | 170.0 | 85.0 |" in tables  # per worker: 170 / 2
    assert "| no_kd | 50.0 | 60.0 | 1.20x | 1.00x |" in tables
    assert "| voc | 1.25x |" in tables and "12.5%" in tables
    assert "150 VOC-size images/s per worker" in tables
