"""DataLoader workers as every platform starts them: results that do not depend on their
number or start method, workers that persist across epochs, and a Ctrl-C while spawned
workers are still starting that saves and exits like any other."""
import multiprocessing
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO, train_flags

import train_kd

pytestmark = pytest.mark.slow
SITE = REPO / "tests" / "spawn_site"


def flags(root, work, workers):
    """A tiny distillation run (dropout, augmentation and a teacher all draw randomness)."""
    return train_flags(root, work, "--epochs", "2", "--batch-size", "2", "--limit-train", "8",
                       "--limit-val", "3", "--crop-size", "48", "--alpha", "0.5", "--beta", "1",
                       "--teacher", "lite", "--teacher-weights", "none", "--seed", "5",
                       "--workers", str(workers), "--out", "w")


@pytest.fixture
def start_method():
    before = multiprocessing.get_start_method(allow_none=True)
    yield lambda method: multiprocessing.set_start_method(method, force=True)
    multiprocessing.set_start_method(before, force=True)


def trained(root, work, workers):
    train_kd.main(train_kd.get_args_parser().parse_args(flags(root, work, workers)))
    return torch.load(work / "models" / "w_last.pth", weights_only=True)


def assert_same_run(a, b):
    for part in ("model", "adapters"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    assert a["best_miou"] == b["best_miou"]


@pytest.mark.skipif(sys.platform == "win32", reason="fork does not exist on Windows")
def test_worker_count_and_start_method_leave_the_checkpoint_bit_identical(synth_root, tmp_path,
                                                                         start_method):
    alone = trained(synth_root, tmp_path / "w0", 0)
    start_method("fork")
    forked = trained(synth_root, tmp_path / "fork", 2)
    start_method("spawn")  # macOS's and Windows' default; validation runs with workers too
    spawned = trained(synth_root, tmp_path / "spawn", 2)
    assert_same_run(alone, forked)
    assert_same_run(alone, spawned)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="a POSIX process group and FIFO")
def test_ctrl_c_while_spawned_workers_start_saves_and_exits_130(synth_root, tmp_path):
    """A terminal's Ctrl-C reaches the whole process group, workers included. They must not
    die of it while they start: the run finishes its step, saves, and exits 130."""
    sync = tmp_path / "sync"
    sync.mkdir()
    os.mkfifo(sync / "workers_started")  # reading it blocks until train_kd.py writes it
    env = dict(os.environ, PYTHONPATH=str(SITE), KD_SYNC=str(sync))
    argv = flags(synth_root, tmp_path, 2)
    proc = subprocess.Popen([sys.executable, str(REPO / "train_kd.py"), *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal's job
    try:
        (sync / "workers_started").read_text()  # the sync point: the workers are starting
        os.killpg(proc.pid, signal.SIGINT)
        (sync / "sigint_sent").touch()
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "exited unexpectedly" not in err and "Traceback" not in err
    assert "stopped by SIGINT at epoch 1, step 1/4" in err
    ckpt = torch.load(tmp_path / "models" / "w_last.pth", weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["partial"]["step"] == 1
    # and the run finishes from there (here without workers: the results do not depend on them)
    resumed = train_kd.main(train_kd.get_args_parser().parse_args(
        flags(synth_root, tmp_path, 0) + ["--resume", "auto"]))
    assert resumed["epochs"] == 2 and resumed["final_miou"] is not None
