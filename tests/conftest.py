"""Shared fixtures: small generated VOC-format trees, written once per test session."""
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data import write_synth_voc  # noqa: E402


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A read-only generated tree: 12 train and 6 val images around 64 px."""
    root = tmp_path_factory.mktemp("synth")
    write_synth_voc(root, n_train=12, n_val=6, size=64, seed=0)
    return root


@pytest.fixture
def synth_copy(synth_root, tmp_path):
    """A private copy of the generated tree that a test may damage."""
    dst = tmp_path / "voc"
    shutil.copytree(synth_root, dst)
    return dst


def voc_dir(root):
    return Path(root) / "VOCdevkit" / "VOC2012"


def split_ids(root, split):
    return (voc_dir(root) / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
