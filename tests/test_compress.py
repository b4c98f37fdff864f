"""compress.py on a random-init 'lite' checkpoint: int8 runs, pruning reaches its sparsity,
ONNX matches PyTorch."""
import json
import sys

import pytest
import torch

import compress
from nets import build_model, model_from_checkpoint
from utils import UserError


@pytest.fixture(scope="module")
def lite_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("lite", num_classes=21)
    path = tmp_path_factory.mktemp("ckpt") / "lite_best.pth"
    torch.save({"model": model.state_dict(), "model_args": dict(model.model_args), "epoch": 0,
                "args": {}, "best_miou": 0.0}, path)
    return path


@pytest.mark.parametrize("structured", [False, True])
def test_pruning_reaches_the_requested_sparsity(lite_checkpoint, structured):
    model, _ = model_from_checkpoint(lite_checkpoint)
    pruned, zero_fraction = compress.prune_model(model, 0.5, structured)
    assert zero_fraction == pytest.approx(0.5, abs=0.02)
    convs = compress.prunable_convs(pruned, structured)
    assert not any(hasattr(m, "weight_mask") for _, m in convs)  # made permanent
    if structured:  # whole output channels are zero
        for _, conv in convs:
            per_channel = conv.weight.flatten(1).abs().sum(1)
            assert (per_channel == 0).sum() == round(0.5 * conv.out_channels)
    assert model.classifier.weight.count_nonzero() == model.classifier.weight.numel()  # a copy


def test_compress_end_to_end(lite_checkpoint, synth_root, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torchao")
    out = tmp_path / "compress.json"
    args = compress.get_args_parser().parse_args([
        "--model_path", str(lite_checkpoint), "--data-root", str(synth_root), "--no-download",
        "--limit", "2", "--calib-images", "2", "--size", "64", "--runs", "1", "--warmup", "0",
        "--sparsity", "0.5", "--out-dir", str(tmp_path / "files"), "--json", str(out),
        "--no-progress", "--threads", "1", "--int8-eager"])
    threads = torch.get_num_threads()
    try:  # one thread: small ops gain nothing from two, and a shared CPU makes two crawl
        compress.main(args)
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"fp32", "int8", "pruned_unstructured", "pruned_channels", "onnx"}
    assert result["onnx_max_abs_diff"] <= 1e-4
    assert rows["onnx"]["miou"] == pytest.approx(rows["fp32"]["miou"], abs=1e-6)
    assert rows["pruned_unstructured"]["zero_fraction"] == pytest.approx(0.5, abs=0.02)
    for row in rows.values():
        assert row["size_bytes"] > 0 and row["median_ms"] > 0 and 0 <= row["miou"] <= 1
    assert rows["int8"]["size_bytes"] < rows["fp32"]["size_bytes"]
    # the saved int8 program runs on its own, at a size it was not calibrated on
    program = torch.export.load(rows["int8"]["file"]).module()
    with torch.no_grad():
        logits = program(torch.randn(1, 3, 72, 88))
    assert logits.shape == (1, 21, 72, 88) and torch.isfinite(logits).all()
    # a pruned checkpoint loads like any other
    model, _ = model_from_checkpoint(rows["pruned_channels"]["file"])
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 21, 64, 64)


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
    assert "torchao, onnxruntime not installed" in message
    assert "pip install -r requirements-optional.txt" in message and "--skip int8 onnx" in message
    assert list(tmp_path.iterdir()) == []
