"""torchrun: DistributedDataParallel on CPU with the gloo backend, 2 processes."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, train_flags

import train_kd
from cli import UserError
from compute import Distributed
from data import eval_loader
from engine import evaluate
from nets import model_from_checkpoint


@pytest.mark.slow
def test_torchrun_two_processes_log_once_and_score_like_one_process(synth_root, tmp_path):
    # 5 val images over 2 processes: shares of 3 and 2; padding them to 3 and 3, as a
    # DistributedSampler does, would count one image twice and change the mIoU
    # batch 1 and a tiny lr: 24 BatchNorm updates per process leave a barely trained student
    # whose eval-mode answers spread over several classes (see the last assertion)
    argv = train_flags(synth_root, tmp_path, "--epochs", "4", "--batch-size", "1", "--lr",
                       "1e-6", "--limit-val", "5", "--alpha", "0.5", "--beta", "1", "--teacher",
                       "lite", "--teacher-weights", "none", "--out", "ddp", "--threads", "1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(REPO / "train_kd.py"), *argv],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes (torchrun)" in proc.stdout
    assert proc.stdout.count("epoch 1/4:") == 1 and proc.stdout.count("epoch 4/4:") == 1
    records = [json.loads(x) for x in (tmp_path / "outputs/ddp/history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]  # one writer
    ckpt = torch.load(tmp_path / "models/ddp_last.pth", weights_only=True)
    assert ckpt["adapters"] is not None  # the adapters trained under DDP too
    assert not any(k.startswith("module.") for k in ckpt["model"])  # saved unwrapped

    model, _ = model_from_checkpoint(tmp_path / "models/ddp_last.pth")
    alone = evaluate(model, eval_loader(synth_root, limit=5), torch.device("cpu"), warmup=0,
                     progress=False)
    assert alone["num_images"] == 5
    assert records[-1]["val_miou"] == alone["miou"]  # exactly
    assert records[-1]["val_pixel_accuracy"] == alone["pixel_accuracy"]
    # the whole confusion matrix, pixel for pixel: a barely trained student spreads its
    # answers over many classes, so an image counted twice, or a process scoring with its
    # own BatchNorm statistics instead of the saved ones, changes it
    val = json.loads((tmp_path / "outputs/ddp/val_last.json").read_text())
    assert val["epoch"] == 4 and val["num_images"] == 5
    assert val["confusion_matrix"] == alone["confusion_matrix"]
    assert len({i for row in alone["confusion_matrix"] for i, n in enumerate(row) if n}) > 1


def test_sync_bn_on_cpu_processes_is_refused_before_any_work(synth_root, tmp_path):
    args = train_kd.get_args_parser().parse_args([
        "--data-root", str(synth_root), "--device", "cpu", "--sync-bn", "--out", "x",
        "--model-dir", str(tmp_path / "models"), "--output-dir", str(tmp_path / "outputs")])
    fake_job = Distributed(rank=0, world_size=2, device=torch.device("cpu"))
    with pytest.raises(UserError, match="--sync-bn needs CUDA GPUs"):
        train_kd.train(args, fake_job)
    assert not (tmp_path / "models").exists() and not (tmp_path / "outputs").exists()
