"""Bad inputs: each gives one line naming the cause and the fix, a non-zero exit, and leaves
the files as they were (no partial file, no checkpoint overwritten).

Every case runs the script's command line in this process (``run_cli``) next to an earlier
good run, ``good``, whose files must come out byte for byte unchanged.
"""
import hashlib
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import split_ids, train_flags, voc_dir
from PIL import Image

import data
import evaluate
import train_kd
from cli import run_cli
from nets import build_model


@pytest.fixture(scope="module")
def good_run(synth_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("good")
    train_kd.main(train_kd.get_args_parser().parse_args(train_flags(synth_root, work,
                                                                    "--out", "good")))
    return work


def snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def save_checkpoint(path, arch, num_classes=21):
    model = build_model(arch, num_classes)
    torch.save({"model": model.state_dict(), "model_args": model.model_args, "epoch": 1}, path)
    return path


def image(root, index=0):
    return voc_dir(root) / "JPEGImages" / f"{split_ids(root, 'train')[index]}.jpg"


def mask(root, index=0):
    return voc_dir(root) / "SegmentationClass" / f"{split_ids(root, 'train')[index]}.png"


def split_file(root):
    return voc_dir(root) / "ImageSets" / "Segmentation" / "train.txt"


# Each case damages the tree or writes a file, and returns (script, argv, words the line needs).
def truncated_jpeg(root, work):
    image(root).write_bytes(image(root).read_bytes()[:300])
    return train_kd, ["--out", "new"], [image(root).name, "cannot read image", "replace the file"]


def truncated_jpeg_mid_run(root, work):  # met in epoch 2 of the resumed good run
    image(root).write_bytes(image(root).read_bytes()[:300])
    return train_kd, ["--out", "good", "--resume", "auto", "--epochs", "2"], \
        [image(root).name, "good_last.pth is intact", "--resume auto"]


def label_37(root, work):
    labels = np.array(Image.open(mask(root)))
    labels[2, 2] = 37
    data.save_mask(labels, mask(root))
    return train_kd, ["--out", "new"], [mask(root).name, "label 37", "fix the mask"]


def missing_split(root, work):
    split_file(root).unlink()
    return train_kd, ["--out", "new"], ["train.txt: split file is missing", "restore it"]


def absent_image(root, work):
    name = image(root, 1).name
    image(root, 1).unlink()
    return train_kd, ["--out", "new"], ["train.txt", "missing", name]


def size_mismatch(root, work):
    Image.open(image(root)).resize((40, 30)).save(image(root))
    return train_kd, ["--out", "new"], [image(root).name, "but its mask", "fix the pair"]


def checkpoint_of_another_architecture(root, work):
    path = save_checkpoint(work / "lab.pth", "lab")
    return train_kd, ["--out", "new", "--resume", str(path)], \
        ["lab.pth", "checkpoint is a lab", "--student lab"]


def checkpoint_of_another_class_count(root, work):
    path = save_checkpoint(work / "five.pth", "lite", num_classes=5)
    return train_kd, ["--out", "new", "--resume", str(path)], ["five.pth", "with 5 classes"]


def evaluate_checkpoint_of_another_class_count(root, work):
    path = save_checkpoint(work / "five.pth", "lite", num_classes=5)
    return evaluate, ["--model_path", str(path), "--data-root", str(root), "--no-download",
                      "--workers", "0", "--device", "cpu", "--output-dir", str(work / "outputs")], \
        ["five.pth", "predicts 5 classes", "VOC has 21"]


def teacher_weights_of_another_architecture(root, work):
    path = save_checkpoint(work / "lite.pth", "lite")
    return train_kd, ["--out", "new", "--alpha", "0.5", "--teacher", "fcn_resnet50",
                      "--teacher-weights", str(path)], ["lite.pth", "checkpoint is a lite",
                                                        "not a fcn_resnet50"]


def compact_teacher_with_default_weights(root, work):
    # torchvision has no pretrained lite: 'default' would be an ImageNet backbone, random head
    return train_kd, ["--out", "new", "--alpha", "0.5", "--teacher", "lite",
                      "--teacher-weights", "default"], \
        ["no pretrained lite teacher exists", "--teacher-weights models/NAME_best.pth"]


def truncated_checkpoint(root, work):
    cut = work / "cut.pth"
    cut.write_bytes((work / "models/good_last.pth").read_bytes()[:5000])
    return train_kd, ["--out", "new", "--resume", str(cut)], \
        ["cut.pth", "cannot read checkpoint", "truncated"]


def evaluate_truncated_checkpoint(root, work):
    cut = work / "cut.pth"
    cut.write_bytes((work / "models/good_best.pth").read_bytes()[:5000])
    return evaluate, ["--model_path", str(cut), "--data-root", str(root), "--no-download",
                      "--device", "cpu", "--output-dir", str(work / "outputs")], \
        ["cut.pth", "cannot read checkpoint", "re-save"]


def crop_larger_than_every_image(root, work):
    return train_kd, ["--out", "new", "--crop-size", "1000"], \
        ["--crop-size 1000 is larger than every training image", "use --crop-size"]


def batch_larger_than_dataset(root, work):
    return train_kd, ["--out", "new", "--batch-size", "64"], \
        ["--batch-size 64 is larger than the training set (12 images)", "lower --batch-size"]


def empty_dataset(root, work):
    split_file(root).write_text("")
    return train_kd, ["--out", "new"], ["train split", "is empty", "add ids"]


def limit_that_keeps_nothing(root, work):
    return train_kd, ["--out", "new", "--limit-train", "0"], ["leaves the train set empty"]


def unknown_device(root, work):
    return train_kd, ["--out", "new", "--device", "tpu"], ["--device 'tpu' is unknown", "use auto"]


def unavailable_device(root, work):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    return train_kd, ["--out", "new", "--device", "cuda:1"], \
        ["--device cuda:1", "CUDA is not available", "use --device cpu"]


def existing_run_without_resume(root, work):
    return train_kd, ["--out", "good"], ["run 'good' exists", "--resume auto", "--overwrite"]


CASES = [truncated_jpeg, truncated_jpeg_mid_run, label_37, missing_split, absent_image,
         size_mismatch, checkpoint_of_another_architecture, checkpoint_of_another_class_count,
         evaluate_checkpoint_of_another_class_count, teacher_weights_of_another_architecture,
         compact_teacher_with_default_weights,
         truncated_checkpoint, evaluate_truncated_checkpoint, crop_larger_than_every_image,
         batch_larger_than_dataset, empty_dataset, limit_that_keeps_nothing, unknown_device,
         unavailable_device, existing_run_without_resume]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_gives_one_line_and_leaves_files_as_they_were(case, synth_copy, good_run,
                                                                 tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    shutil.copytree(good_run, work)
    module, argv, words = case(synth_copy, work)
    if module is train_kd:
        argv = train_flags(synth_copy, work, *argv)
    before = snapshot(work)
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(module.main, module.get_args_parser())
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for word in words:
        assert word in err, (word, err)
    assert snapshot(work) == before  # nothing new, nothing overwritten, no temporary left
