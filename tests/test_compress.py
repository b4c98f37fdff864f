"""compress.py's pieces on a random-init 'lite' checkpoint. The whole command (int8, pruning,
ONNX, each file loading alone) runs end to end in test_real_path, as test.txt writes it."""
import sys
from pathlib import Path

import pytest
import torch

import compress
import runtimes
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


class TinySegmenter(torch.nn.Module):
    """The student's ops that matter to inductor's shape guards, small enough to compile in
    seconds: conv, batch norm, hard-swish, a squeeze-excite pool, upsampling to full size."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.BatchNorm2d(8),
                                        torch.nn.Hardswish())
        self.excite = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(8, 8, 1),
                                          torch.nn.Hardsigmoid())
        self.head = torch.nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = self.stem(x)
        y = self.head(y * self.excite(y))
        return torch.nn.functional.interpolate(y, size=x.shape[-2:], mode="bilinear")


@pytest.fixture(scope="module")
def tiny_int8():
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    calib = [torch.randn(1, 3, 96, 112) for _ in range(2)]
    return runtimes.quantize_int8(TinySegmenter().eval(), calib)


def test_compiled_int8_compiles_once_for_every_image_size(tiny_int8):
    """A square first image (duck sizing), pools on both sides of inductor's 4096-element
    reduction split, and an input made outside inference mode each used to compile the whole
    network again."""
    import copy

    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    reference = copy.deepcopy(tiny_int8)  # the eager quantize/dequantize graph
    compiled = runtimes.compile_frozen(copy.deepcopy(tiny_int8))
    before = counters["stats"]["unique_graphs"]
    # pooled H*W 3136 and 3648 (<= 4096), 6000 and 8835 (> 4096); every conv input above the
    # 20480 elements where convolution picks another kernel (a split left in: tiny images)
    with torch.inference_mode():
        for h, w in [(112, 112), (160, 150), (113, 127), (190, 186)]:
            x = torch.randn(1, 3, h, w)
            out = compiled(x)
            assert out.shape == (1, 3, h, w)
            assert (out - reference(x)).abs().mean() < 0.02  # int8 kernels round a step apart
    assert compiled(torch.randn(1, 3, 150, 170)).shape == (1, 3, 150, 170)  # not an inference
    assert counters["stats"]["unique_graphs"] - before == 1


def test_saved_int8_predicts_the_same_in_a_fresh_process(tiny_int8, tmp_path):
    import subprocess
    torch.manual_seed(1)
    x = torch.randn(1, 3, 120, 100)
    path = tmp_path / "tiny_int8.pt2"
    runtimes.save_int8(tiny_int8, x, path)
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch, runtimes; m = runtimes.load_int8(sys.argv[1]); "
            "torch.save(m(torch.load(sys.argv[2])), sys.argv[3])")
    subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.pt"),
                    str(tmp_path / "out.pt")], check=True, cwd=Path(compress.__file__).parent)
    loaded = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        here = tiny_int8(x)
    assert torch.equal(loaded.argmax(1), here.argmax(1))
    assert torch.allclose(loaded, here, atol=1e-5)


class TinyVOCSegmenter(TinySegmenter):
    """TinySegmenter with VOC's 21 outputs, so evaluate.py scores it on generated VOC."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Conv2d(8, 21, 1)


def test_evaluate_and_benchmark_take_the_int8_and_onnx_files(synth_root, tmp_path):
    """runtimes.load_any opens compress.py's .pt2 and .onnx with the record they carry;
    evaluate.py scores them as it scores the model they came from, benchmark.py times them."""
    pytest.importorskip("torchao")
    pytest.importorskip("onnxruntime")
    import benchmark
    import evaluate
    from data import eval_loader
    from engine import evaluate as score
    torch.manual_seed(0)
    model = TinyVOCSegmenter().eval()
    record = {"model_args": {"arch": "tiny", "num_classes": 21}, "epoch": 3}
    meta = runtimes.export_metadata(model, record, "tiny.pth")
    x = torch.randn(1, 3, 64, 72)
    qmodel = runtimes.quantize_int8(model, [x, torch.randn(1, 3, 80, 64)])
    runtimes.save_int8(qmodel, x, tmp_path / "tiny_int8.pt2", meta)
    runtimes.export_onnx(model, x, tmp_path / "tiny.onnx", meta)
    loader = eval_loader(synth_root, None, 0, False)
    expected = {"int8": score(runtimes.Frozen(qmodel), loader, torch.device("cpu"), progress=False)["miou"],
                "onnx": score(model, loader, torch.device("cpu"), progress=False)["miou"]}
    for fmt, name in (("int8", "tiny_int8.pt2"), ("onnx", "tiny.onnx")):
        _, loaded = runtimes.load_any(tmp_path / name)
        assert loaded == {**meta, "format": fmt}
        out = tmp_path / f"{fmt}_eval.json"
        result = evaluate.main(evaluate.get_args_parser().parse_args([
            "--model_path", str(tmp_path / name), "--data-root", str(synth_root),
            "--no-download", "--device", "cpu", "--json", str(out), "--no-progress"]))
        assert out.is_file() and result["format"] == fmt and result["params"] == meta["params"]
        # compiled int8 kernels round a step away from the eager quantize/dequantize graph
        assert result["miou"] == pytest.approx(expected[fmt], abs=0.02 if fmt == "int8" else 1e-6)
    # (the int8 file only through evaluate: each compilation costs a minute on a busy CI)
    bench = benchmark.main(benchmark.get_args_parser().parse_args([
        "--models", str(tmp_path / "tiny.onnx"), "--size", "64", "--batch", "2", "--runs", "1",
        "--warmup", "0", "--json", str(tmp_path / "b.json")]))
    row = bench["rows"][0]
    assert row["format"] == "onnx" and row["params"] == meta["params"] and row["gflops"] is None
    assert row["checkpoint_bytes"] == (tmp_path / "tiny.onnx").stat().st_size
    assert row["throughput_ips"] > 0  # batch 2 through a batch-1 export, one image at a time


def test_load_any_names_the_file_and_the_fix(tmp_path):
    (tmp_path / "broken.pt2").write_bytes(b"not a program")
    for name, cause in (("model.h5", "not a model file"), ("missing.onnx", "no such file"),
                        ("broken.pt2", "cannot be read as an int8 program")):
        with pytest.raises(UserError, match=cause) as err:
            runtimes.load_any(tmp_path / name)
        assert name in str(err.value) and "\n" not in str(err.value)
