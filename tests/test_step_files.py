"""How many project files one training step reads through: measured, not claimed.

A profiler hook (``sys.setprofile``) records the file of every Python function called while
``engine.train_one_epoch`` runs one step with every distillation term on, its data loading
included (the loader's iterator, the dataset, the augmentation, the collation). A reader
following that step opens exactly those files.
"""
import sys

import torch
from conftest import REPO

from data import EpochSampler, build_dataset, loader
from distill import build_distiller, build_optimizer, build_teacher
from engine import train_one_epoch
from losses import TERMS, DistillationCriterion
from nets import build_model

# the entry scripts of the layout (tests/test_structure.py holds the same list)
ENTRY_SCRIPTS = {"train_kd.py", "test_teacher.py", "evaluate.py", "demo.py", "sweep.py",
                 "benchmark.py", "compress.py", "report.py", "pack.py", "predict.py"}
MAX_FILES = 6


def files_of_one_step(root, weights):
    """The project files whose functions run during one step of ``train_one_epoch``."""
    torch.manual_seed(0)
    dataset = build_dataset(root, "train", crop_size=48, limit=2, download=False)
    batches = loader(dataset, 2, EpochSampler(len(dataset)), workers=0, drop_last=True)
    criterion = DistillationCriterion(weights)
    distiller = build_distiller(build_model("lite"), criterion,
                                build_teacher(criterion, "fcn_resnet50", "none"))
    optimizer = build_optimizer("adam", distiller.trainable_parameters(), 1e-3, 0.0,
                                torch.device("cpu"))
    files = set()

    def record(frame, event, arg):
        if event == "call":
            files.add(frame.f_code.co_filename)

    sys.setprofile(record)
    try:
        train_one_epoch(distiller, criterion, optimizer, batches, torch.device("cpu"), 1,
                        progress=False)
    finally:
        sys.setprofile(None)
    assert len(batches) == 1  # the measurement is of exactly one step
    return sorted(name[len(str(REPO)) + 1:] for name in files
                  if name.startswith(str(REPO) + "/") and "/tests/" not in name
                  and "/.venv/" not in name)


def test_one_step_reads_at_most_six_project_files_and_no_entry_script(synth_root):
    every_term = {name: 1.0 for name in TERMS}
    files = files_of_one_step(synth_root, every_term)
    print("files of one training step:", ", ".join(files))
    assert "engine.py" in files and "losses.py" in files  # the hook sees the project
    assert not set(files) & ENTRY_SCRIPTS, files
    assert len(files) <= MAX_FILES, files


def test_a_step_without_distillation_reads_no_more(synth_root):
    files = files_of_one_step(synth_root, {})
    assert not set(files) & ENTRY_SCRIPTS, files
    assert len(files) <= MAX_FILES, files
