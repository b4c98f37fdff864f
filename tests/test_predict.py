"""predict.py on the files a camera or the web produces, against evaluate.py, on video, and
its docs snippet. The model: a random-weight 'lite' whose classifier bias is zeroed, so that
it predicts several classes across an image (a plain random init predicts one class
everywhere, which no rotation or conversion could change)."""
import io
import re
import sys

import matplotlib.cbook
import numpy as np
import pytest
import torch
from PIL import Image

import engine
import evaluate
import predict
from checkpoints import default_class_names, model_record
from cli import UserError
from conftest import REPO, split_ids, voc_dir
from nets import build_model, model_from_checkpoint
from plots import blend


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("lite")
    with torch.no_grad():
        model.classifier.bias.zero_()
    path = tmp_path_factory.mktemp("ckpt") / "lite_last.pth"
    torch.save(model_record(model), path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    return model_from_checkpoint(checkpoint)[0].eval()


@pytest.fixture(scope="module")
def photo():
    """matplotlib's grace_hopper.jpg (600x512, HxW) as RGB uint8."""
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        return np.array(im.convert("RGB"))


def run(checkpoint, *argv):
    """predict.main on ``argv`` at 1 thread: the references are computed at the same count,
    and on cores other programs keep busy 2 threads ran the file 4x slower (84 s against 19)."""
    args = predict.get_args_parser().parse_args(
        ["--model_path", str(checkpoint), "--device", "cpu", "--threads", "1", "--no-progress",
         *map(str, argv)])
    return predict.main(args)


def segment_array(model, rgb):
    return predict.segment(model, Image.fromarray(np.ascontiguousarray(rgb)))


def read_mask(path):
    with Image.open(path) as im:
        assert im.mode == "P"  # class indices with VOC's palette, as VOC stores its labels
        return np.array(im)


def jpeg_with_orientation(rgb, orientation, path):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(path, quality=95, exif=exif)
    with Image.open(path) as im:  # the stored pixels, before any EXIF rotation
        return np.array(im)


# how each orientation is shown: 3 turned half round, 6 a quarter clockwise, 8 anticlockwise
ORIENTATIONS = {3: lambda a: np.rot90(a, 2), 6: lambda a: np.rot90(a, -1),
                8: lambda a: np.rot90(a, 1)}


def write_variants(small, folder):
    """{name: the RGB array a viewer shows} for each good variant written into ``folder``;
    the exact ones are derived by hand, independently of Pillow's conversions."""
    shown = {}
    for k, turn in ORIENTATIONS.items():
        shown[f"exif{k}"] = turn(jpeg_with_orientation(small, k, folder / f"exif{k}.jpg"))
    gray = np.array(Image.fromarray(small).convert("L"))
    Image.fromarray(gray).save(folder / "gray.png")
    shown["gray"] = np.repeat(gray[..., None], 3, 2)
    Image.fromarray(gray.astype(np.uint16) * 257).save(folder / "gray16.png")  # I;16, 16-bit
    shown["gray16"] = shown["gray"]  # scaled by 255/65535, not clipped at 255
    pal = Image.fromarray(small).quantize(64)
    pal.save(folder / "palette.png")
    shown["palette"] = np.array(pal.getpalette(), np.uint8).reshape(-1, 3)[np.array(pal)]
    alpha = np.where(np.arange(small.shape[1]) < small.shape[1] // 2, 0, 255).astype(np.uint8)
    alpha = np.broadcast_to(alpha, small.shape[:2])
    Image.fromarray(np.dstack([small, alpha])).save(folder / "rgba.png")
    shown["rgba"] = np.where(alpha[..., None] == 0, 255, small).astype(np.uint8)  # on white
    Image.fromarray(small).save(folder / "lossless.webp", lossless=True)
    shown["lossless"] = small
    shown["tiny"] = small[:3, :2].copy()  # smaller than the network's stride
    shown["wide"] = np.tile(small[:4], (1, 3, 1))  # 4 x 3W
    for name in ("tiny", "wide"):
        Image.fromarray(shown[name]).save(folder / f"{name}.png")
    return shown


def test_every_variant_of_a_photo_gives_its_displayed_size_and_prediction(
        checkpoint, model, photo, tmp_path, capsys):
    small = np.array(Image.fromarray(photo).resize((96, 112)))  # WxH
    folder = tmp_path / "in"
    folder.mkdir()
    shown = write_variants(small, folder)
    Image.fromarray(small).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    buffer = io.BytesIO()
    Image.fromarray(small).save(buffer, "JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "text.jpg").write_text("not a photo\n")
    with pytest.raises(UserError, match="2 of 13 inputs could not be read"):
        run(checkpoint, folder, "--out", tmp_path / "out")
    err = capsys.readouterr().err.splitlines()
    for name in ("truncated", "text"):
        lines = [line for line in err if line.startswith(f"predict: {folder / name}.jpg: ")]
        assert len(lines) == 1, err
    for name, rgb in shown.items():
        mask = read_mask(tmp_path / "out" / f"{name}_mask.png")
        assert mask.shape == rgb.shape[:2], name
        np.testing.assert_array_equal(mask, segment_array(model, rgb), err_msg=name)
        with Image.open(tmp_path / "out" / f"{name}_overlay.png") as overlay:
            assert overlay.size == (rgb.shape[1], rgb.shape[0])
    # CMYK through JPEG is lossy: the mask agrees with the original's converted in memory
    # on 97.7% of the pixels (a plain RGB JPEG of the same quality: 94.1%)
    cmyk = read_mask(tmp_path / "out" / "cmyk_mask.png")
    expected = segment_array(model, np.array(Image.fromarray(small).convert("CMYK").convert("RGB")))
    assert cmyk.shape == small.shape[:2] and (cmyk == expected).mean() >= 0.9


def test_the_real_photograph_at_full_size_with_its_json(checkpoint, model, photo, tmp_path):
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    records = run(checkpoint, path, "--out", tmp_path, "--save-probs")
    mask = read_mask(tmp_path / "grace_hopper_mask.png")
    assert mask.shape == photo.shape[:2] == (600, 512)
    np.testing.assert_array_equal(mask, segment_array(model, photo))
    with Image.open(tmp_path / "grace_hopper_overlay.png") as overlay:
        np.testing.assert_array_equal(np.array(overlay), blend(photo, mask))
    record = records["grace_hopper"]
    assert (record["width"], record["height"]) == (512, 600) and record["ms"] > 0
    assert sum(record["classes"].values()) == pytest.approx(1, abs=1e-4)
    names = default_class_names(21)
    counts = np.bincount(mask.ravel(), minlength=21)
    assert record["classes"] == {names[k]: pytest.approx(counts[k] / mask.size, abs=1e-6)
                                 for k in np.flatnonzero(counts)}
    probs = np.load(tmp_path / "grace_hopper_probs.npy")
    assert probs.shape == (21, 600, 512)
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1, atol=1e-2)


def test_max_side_predicts_small_and_returns_the_original_size(checkpoint, model, photo, tmp_path):
    Image.fromarray(photo).save(tmp_path / "p.png")
    run(checkpoint, tmp_path / "p.png", "--out", tmp_path / "out", "--max-side", 64,
        "--save-logits")
    mask = read_mask(tmp_path / "out" / "p_mask.png")
    assert mask.shape == (600, 512)
    logits = np.load(tmp_path / "out" / "p_logits.npy")
    assert logits.shape == (21, 600, 512)
    assert (mask == logits.argmax(0)).mean() > 0.99  # float16 logits: near ties may flip
    assert (mask == segment_array(model, photo)).mean() < 1  # it did predict at 64 px


def test_batch_1_mask_is_what_evaluate_scores(checkpoint, synth_root, tmp_path, monkeypatch):
    scored = []
    original = engine.confusion_matrix

    def recording(preds, targets, *rest):
        scored.append(preds[0].to(torch.uint8).numpy().copy())
        return original(preds, targets, *rest)

    monkeypatch.setattr(engine, "confusion_matrix", recording)
    evaluate.main(evaluate.get_args_parser().parse_args([
        "--model_path", str(checkpoint), "--data-root", str(synth_root), "--no-download",
        "--device", "cpu", "--threads", "1", "--workers", "0", "--no-progress", "--limit", "2",
        "--output-dir", str(tmp_path / "eval")]))
    ids = split_ids(synth_root, "val")[:2]
    assert len(scored) == len(ids)
    images = [voc_dir(synth_root) / "JPEGImages" / f"{i}.jpg" for i in ids]
    run(checkpoint, *images, "--out", tmp_path / "out")
    for name, prediction in zip(ids, scored):
        np.testing.assert_array_equal(read_mask(tmp_path / "out" / f"{name}_mask.png"),
                                      prediction, err_msg=name)
    assert len({p.tobytes() for p in scored}) > 1 and any(len(np.unique(p)) > 1 for p in scored)


def write_video(path, frames, fps):
    import av
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as sink:
        stream = sink.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv444p"
        for rgb in frames:
            sink.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        sink.mux(stream.encode())


def decode_video(path):
    import av
    with av.open(str(path)) as source:
        stream = source.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in source.decode(video=0)]
        size = (stream.codec_context.width, stream.codec_context.height)
        return frames, stream.average_rate, size


def test_a_video_round_trips_with_each_frame_predicted_as_an_image(checkpoint, model, photo,
                                                                   tmp_path, capsys):
    pytest.importorskip("av")
    small = np.array(Image.fromarray(photo).resize((65, 49)))  # odd sides
    frames = [np.roll(small, 6 * k, axis=1) for k in range(5)]
    clip = tmp_path / "clip.mp4"
    write_video(clip, frames, 12)
    (tmp_path / "broken.mp4").write_text("not a video\n")
    with pytest.raises(UserError, match="1 of 2 inputs could not be read"):
        run(checkpoint, clip, tmp_path / "broken.mp4", "--out", tmp_path / "out")
    printed = capsys.readouterr()
    assert "5 frames" in printed.out and "frames/s" in printed.out
    assert f"predict: {tmp_path / 'broken.mp4'}: cannot decode the video" in printed.err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["clip_overlay.mp4",
                                                                   "predictions.json"]
    out_frames, rate, size = decode_video(tmp_path / "out" / "clip_overlay.mp4")
    assert (len(out_frames), rate, size) == (5, 12, (65, 49))
    decoded, _, _ = decode_video(clip)
    import av
    with av.open(str(clip)) as source:
        pairs = list(predict.segment_frames(model, source, "cpu"))
    assert len(pairs) == 5
    for k, (rgb, mask) in enumerate(pairs):  # the prediction taken before encoding
        np.testing.assert_array_equal(rgb, decoded[k])
        np.testing.assert_array_equal(mask, segment_array(model, decoded[k]), err_msg=f"frame {k}")


def test_without_pyav_a_video_stops_before_anything_is_written(checkpoint, tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "clip.mp4").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` fail
    with pytest.raises(UserError, match=r"needs PyAV, which is not installed: pip install av"):
        run(checkpoint, tmp_path / "in", "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_rerun_skips_what_exists_and_overwrite_redoes_it(checkpoint, tmp_path, capsys):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for name, size in (("a.png", (20, 10)), ("sub/b.jpg", (9, 13))):
        Image.new("RGB", size, (200, 30, 30)).save(tmp_path / "in" / name)
    run(checkpoint, tmp_path / "in", "--out", tmp_path / "out")
    masks = [tmp_path / "out" / "a_mask.png", tmp_path / "out" / "sub" / "b_mask.png"]
    stamps = [m.stat().st_mtime_ns for m in masks]
    capsys.readouterr()
    records = run(checkpoint, tmp_path / "in", "--out", tmp_path / "out")
    assert "0 written" in capsys.readouterr().out and set(records) == {"a", "sub/b"}
    assert [m.stat().st_mtime_ns for m in masks] == stamps
    run(checkpoint, tmp_path / "in", "--out", tmp_path / "out", "--overwrite")
    assert "2 written" in capsys.readouterr().out
    assert all(m.stat().st_mtime_ns != s for m, s in zip(masks, stamps))


def test_nothing_is_written_into_an_input_folder(checkpoint, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (12, 12)).save(folder / "a.jpg")
    before = sorted(folder.rglob("*"))
    for out in (folder, folder / "predictions"):
        with pytest.raises(UserError, match="nothing is written into an input folder"):
            run(checkpoint, folder, "--out", out)
    with pytest.raises(UserError, match="nothing is written into an input folder"):
        run(checkpoint, folder / "a.jpg", "--out", folder)
    run(checkpoint, folder, "--out", tmp_path / "out")
    assert sorted(folder.rglob("*")) == before
    assert (tmp_path / "out" / "a_mask.png").is_file()


def test_the_docs_snippet_runs_as_written(checkpoint, tmp_path, monkeypatch):
    text = (REPO / "docs" / "predict.md").read_text(encoding="utf-8")
    snippets = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(snippets) == 1
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "combined_kd_last.pth").write_bytes(checkpoint.read_bytes())
    Image.new("RGB", (40, 30), (10, 120, 200)).save(tmp_path / "holiday.jpg")
    namespace = {}
    exec(compile(snippets[0], "docs/predict.md", "exec"), namespace)
    assert namespace["mask"].shape == (30, 40) and namespace["mask"].dtype == np.uint8
    assert (tmp_path / "holiday_mask.png").is_file()


def test_a_teacher_by_name_predicts_with_its_default_weights(hub_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(hub_cache))  # torchvision's file names, offline
    Image.new("RGB", (21, 17), (90, 140, 60)).save(tmp_path / "field.png")
    records = run("fcn_resnet50", tmp_path / "field.png", "--out", tmp_path / "out")
    assert read_mask(tmp_path / "out" / "field_mask.png").shape == (17, 21)
    assert set(records["field"]["classes"]) <= set(default_class_names(21))


def test_the_command_exits_non_zero_with_the_count(checkpoint, tmp_path):
    import subprocess
    (tmp_path / "in").mkdir()
    Image.new("RGB", (10, 10)).save(tmp_path / "in" / "good.png")
    (tmp_path / "in" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    done = subprocess.run([sys.executable, str(REPO / "predict.py"), "--model_path",
                           str(checkpoint), str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                           "--device", "cpu", "--threads", "1", "--no-progress"],
                          capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith(f"predict: {tmp_path / 'in' / 'bad.png'}: ")
    assert lines[-1].startswith("error: 1 of 2 inputs could not be read")
    assert (tmp_path / "out" / "good_mask.png").is_file()


@pytest.mark.slow
def test_an_onnx_file_predicts_like_its_checkpoint(checkpoint, model, photo, tmp_path):
    """compress.py's ONNX form through runtimes.load_any (the export takes ~30 s)."""
    pytest.importorskip("onnxruntime")
    from runtimes import export_metadata, export_onnx
    _, ckpt = model_from_checkpoint(checkpoint)
    small = np.array(Image.fromarray(photo).resize((96, 112)))
    Image.fromarray(small).save(tmp_path / "p.png")
    export_onnx(model, torch.randn(1, 3, 64, 80), tmp_path / "lite.onnx",
                export_metadata(model, ckpt, checkpoint))
    records = run(tmp_path / "lite.onnx", tmp_path / "p.png", "--out", tmp_path / "out")
    mask = read_mask(tmp_path / "out" / "p_mask.png")
    assert mask.shape == (112, 96)
    assert (mask == segment_array(model, small)).mean() > 0.999  # float differences at ties
    assert set(records["p"]["classes"]) <= set(default_class_names(21))
