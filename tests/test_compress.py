"""compress.py's pieces on a random-init 'lite' checkpoint. The whole command (int8, pruning,
ONNX, each file loading alone) runs end to end in test_real_path, as test.txt writes it."""
import sys

import pytest
import torch

import compress
from cli import UserError
from nets import build_model, model_from_checkpoint


@pytest.fixture(scope="module")
def lite_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("lite", num_classes=21)
    path = tmp_path_factory.mktemp("ckpt") / "lite_best.pth"
    torch.save({"model": model.state_dict(), "model_args": dict(model.model_args), "epoch": 0,
                "args": {}, "best_miou": 0.0}, path)
    return path


def test_unstructured_pruning_reaches_the_requested_sparsity(lite_checkpoint):
    model, _ = model_from_checkpoint(lite_checkpoint)
    pruned, zero_fraction = compress.prune_model(model, 0.5, structured=False)
    assert zero_fraction == pytest.approx(0.5, abs=0.02)
    convs = compress.prunable_convs(pruned)
    assert not any(hasattr(m, "weight_mask") for _, m in convs)  # made permanent
    assert model.classifier.weight.count_nonzero() == model.classifier.weight.numel()  # a copy


def test_channel_pruning_removes_the_channels_it_reports(lite_checkpoint):
    """structured=True removes channels (no zeroed ones left); tests/test_pruning.py checks
    params, FLOPs, the rebuilt checkpoint and the fine-tuning."""
    pytest.importorskip("torch_pruning")
    model, _ = model_from_checkpoint(lite_checkpoint)
    pruned, removed = compress.prune_model(model, 0.5, structured=True)
    assert removed == pytest.approx(0.5, abs=0.02)
    convs = {name: m for name, m in pruned.named_modules() if isinstance(m, torch.nn.Conv2d)}
    before = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert convs["classifier"].out_channels == 21
    narrower = [n for n in convs if n != "classifier"
                and convs[n].out_channels == pytest.approx(before[n].out_channels / 2, abs=1)]
    assert len(narrower) == len(convs) - 1  # every conv but the classifier lost half
    assert all(c.weight.flatten(1).abs().sum(1).count_nonzero() == c.out_channels
               for c in convs.values())  # removed, not zeroed


def test_missing_optional_packages_stop_before_any_file(lite_checkpoint, synth_root, tmp_path,
                                                        monkeypatch):
    """Without requirements-optional.txt: one line naming the install, nothing written."""
    for module in ("onnxruntime", "torchao"):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    args = compress.get_args_parser().parse_args([
        "--model_path", str(lite_checkpoint), "--data-root", str(synth_root), "--no-download",
        "--out-dir", str(tmp_path / "files"), "--json", str(tmp_path / "compress.json")])
    with pytest.raises(UserError) as err:
        compress.main(args)
    message = str(err.value)
    # (onnx and onnxscript are named too where they are missing as well)
    assert "torchao" in message and "onnxruntime" in message and "not installed" in message
    assert "needed by the int8 and onnx steps" in message
    assert "pip install -r requirements-optional.txt" in message and "--skip int8 onnx" in message
    assert list(tmp_path.iterdir()) == []
