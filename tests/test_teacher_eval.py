"""test_teacher.py end to end on generated data, against an independent evaluation."""
import json
import sys

import numpy as np
import pytest
import torch
from conftest import split_ids, voc_dir
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex
from torchvision.models.segmentation import fcn_resnet50

import data
import evaluate
import synth
import test_teacher
from checkpoints import model_record
from cli import UserError, run_cli
from nets import build_model, load_model


@pytest.fixture(scope="module")
def odd_tree(tmp_path_factory):
    """Odd sizes, portrait and landscape, a grayscale JPEG, an image with no object."""
    root = tmp_path_factory.mktemp("odd")
    synth.write_synth_voc(root, n_train=2, n_val=5, size=72, seed=11)
    ids = split_ids(root, "val")
    jpg = voc_dir(root) / "JPEGImages"
    Image.open(jpg / f"{ids[0]}.jpg").convert("L").save(jpg / f"{ids[0]}.jpg")
    Image.new("RGB", (61, 97), (120, 130, 90)).save(jpg / f"{ids[1]}.jpg")  # portrait, odd
    data.save_mask(np.zeros((97, 61), np.uint8), voc_dir(root) / "SegmentationClass" / f"{ids[1]}.png")
    return root


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = fcn_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    path = tmp_path_factory.mktemp("w") / "fcn.pth"
    torch.save(model.state_dict(), path)
    return path


def run_script(monkeypatch, capsys, *argv):
    """test_teacher.py's command line, run in this process as its __main__ does: (exit
    status, stderr). The subprocess path of the same script is rehearsed in test_real_path."""
    monkeypatch.setattr(sys, "argv", ["test_teacher.py", *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # anything else (a traceback) fails the test
        run_cli(test_teacher.main, test_teacher.get_args_parser())
    return exit_.value.code, capsys.readouterr().err


def independent_evaluation(root, weights, limit):
    """Full-resolution forward of torchvision's model on ImageNet-normalised images."""
    model = fcn_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    macro = MulticlassJaccardIndex(21, average="macro", ignore_index=255)
    per_class = MulticlassJaccardIndex(21, average="none", ignore_index=255)
    present = torch.zeros(21, dtype=torch.bool)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for name in split_ids(root, "val")[:limit]:
        rgb = np.asarray(Image.open(voc_dir(root) / "JPEGImages" / f"{name}.jpg").convert("RGB"))
        x = torch.from_numpy(((rgb / 255.0 - mean) / std).transpose(2, 0, 1)).float()[None]
        target = torch.from_numpy(np.array(Image.open(
            voc_dir(root) / "SegmentationClass" / f"{name}.png")).astype(np.int64))[None]
        with torch.no_grad():
            pred = model(x)["out"].argmax(1)
        macro.update(pred, target)
        per_class.update(pred, target)
        valid = target != 255
        present |= torch.bincount(target[valid], minlength=21).bool()
        present |= torch.bincount(pred[valid], minlength=21).bool()
    return float(macro.compute()), per_class.compute(), present


def test_teacher_script_matches_an_independent_evaluation(odd_tree, teacher_weights, tmp_path):
    out = tmp_path / "out.json"
    args = test_teacher.get_args_parser().parse_args(
        ["--data-root", str(odd_tree), "--weights", str(teacher_weights), "--limit", "5",
         "--device", "cpu", "--json", str(out), "--workers", "0"])
    test_teacher.main(args)
    result = json.loads(out.read_text())
    for key in ("miou", "pixel_accuracy", "per_class_iou", "params", "ms_per_image", "fps",
                "device", "num_images"):
        assert key in result
    assert result["params"] == 35_322_218 and result["num_images"] == 5
    assert result["device"] == "cpu" and result["fps"] > 0
    miou, per_class, present = independent_evaluation(odd_tree, teacher_weights, 5)
    assert result["miou"] == pytest.approx(miou, abs=1e-4)
    for c, (name, iou) in enumerate(result["per_class_iou"].items()):
        if present[c]:
            assert iou == pytest.approx(float(per_class[c]), abs=1e-4), name
        else:
            assert iou is None, name


def test_truncated_jpeg_exits_with_one_line_naming_the_file(synth_copy, monkeypatch, capsys):
    name = split_ids(synth_copy, "val")[1]
    path = voc_dir(synth_copy) / "JPEGImages" / f"{name}.jpg"
    path.write_bytes(path.read_bytes()[:400])
    code, stderr = run_script(monkeypatch, capsys, "--data-root", str(synth_copy), "--weights",
                              "none", "--limit", "3", "--device", "cpu", "--json", "",
                              "--workers", "0")
    assert code == 2
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{name}.jpg" in errors[0]


def test_label_37_exits_with_one_line_naming_file_and_value(synth_copy, monkeypatch, capsys):
    name = split_ids(synth_copy, "val")[0]
    mask_path = voc_dir(synth_copy) / "SegmentationClass" / f"{name}.png"
    mask = np.array(Image.open(mask_path))
    mask[3, 3] = 37
    data.save_mask(mask, mask_path)
    code, stderr = run_script(monkeypatch, capsys, "--data-root", str(synth_copy), "--weights",
                              "none", "--limit", "2", "--device", "cpu", "--json", "",
                              "--workers", "1")  # raised in a worker
    assert code == 2
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{name}.png" in errors[0] and "label 37" in errors[0]


def test_weights_of_another_model_or_a_broken_file_are_refused(tmp_path, teacher_weights):
    other = tmp_path / "other.pth"
    torch.save({"model": {}, "model_args": {"arch": "lite", "num_classes": 21}}, other)
    with pytest.raises(UserError, match="checkpoint is a lite"):
        load_model("fcn_resnet50", str(other))
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes(teacher_weights.read_bytes()[:5000])
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_model("fcn_resnet50", str(truncated))
    with pytest.raises(UserError, match="no such checkpoint"):
        load_model("fcn_resnet50", str(tmp_path / "missing.pth"))


def test_unknown_device_is_a_clear_error(synth_root, monkeypatch, capsys):
    code, stderr = run_script(monkeypatch, capsys, "--data-root", str(synth_root), "--weights",
                              "none", "--device", "tpu")
    assert code == 2 and "--device 'tpu' is unknown" in stderr


@pytest.mark.parametrize("script", [test_teacher, evaluate])
def test_no_progress_silences_the_bar_of_both_evaluating_scripts(script, odd_tree, tmp_path,
                                                                 monkeypatch, capsys):
    """The bar (tqdm, on stderr) shows by default and never with --no-progress."""
    if script is evaluate:
        torch.save(model_record(build_model("lite")), tmp_path / "lite.pth")
        argv = ["--model_path", str(tmp_path / "lite.pth"), "--output-dir", str(tmp_path)]
    else:
        argv = ["--weights", "none"]
    argv += ["--data-root", str(odd_tree), "--limit", "2", "--device", "cpu", "--workers", "0",
             "--json", str(tmp_path / "out.json")]
    printed = {}
    for display in ([], ["--no-progress"]):
        monkeypatch.setattr(sys, "argv", [f"{script.__name__}.py", *argv, *display])
        capsys.readouterr()
        run_cli(script.main, script.get_args_parser())  # returns: no error
        printed[bool(display)] = capsys.readouterr().err
    assert "it/s]" in printed[False]  # tqdm's rate: the bar was drawn
    assert "it/s]" not in printed[True] and "%|" not in printed[True], printed[True]
