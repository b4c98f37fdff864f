"""Shared fixtures: small generated VOC-format trees, written once per test session."""
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from synth import write_synth_voc  # noqa: E402


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


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds stand-ins of every pretrained file the lab loads:
    torchvision's own file names, the right architectures, random values. torch reads this
    cache before it downloads, so the default-weights path runs offline exactly as online."""
    import torch
    from torchvision import models
    from torchvision.models import segmentation

    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    stand_ins = [
        (segmentation.FCN_ResNet50_Weights.DEFAULT,
         lambda: segmentation.fcn_resnet50(weights=None, weights_backbone=None, aux_loss=True)),
        (models.MobileNet_V3_Small_Weights.IMAGENET1K_V1, models.mobilenet_v3_small),
        (models.MobileNet_V3_Large_Weights.IMAGENET1K_V1, models.mobilenet_v3_large),
    ]
    for weights, build in stand_ins:
        torch.save(build().state_dict(), checkpoints / weights.url.rsplit("/", 1)[-1])
    return home


def train_flags(root, work, *extra):
    """train_kd.py flags of a tiny offline CPU run writing under ``work``, then ``extra``
    (argparse keeps the last value of a repeated flag, so ``extra`` may override). The thread
    count is fixed: CPU results are bit-identical only at equal counts, and the automatic one
    follows the machine's load."""
    return ["--data-root", str(root), "--epochs", "1", "--batch-size", "4", "--crop-size", "48",
            "--limit-val", "2", "--workers", "0", "--threads", "2", "--device", "cpu",
            "--no-pretrained-backbone",
            "--no-download", "--no-progress", "--model-dir", str(Path(work) / "models"),
            "--output-dir", str(Path(work) / "outputs"), "--plot-dir", str(Path(work) / "plots"),
            *extra]

