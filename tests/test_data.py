"""The VOC pipeline: generated trees, joint transforms, the ignore label, bad input."""
import shlex
import shutil as data_shutil
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
from conftest import REPO, split_ids, voc_dir
from PIL import Image
from scipy.io import savemat
from torch.utils.data import default_collate
from torchvision import datasets, tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

import augment
import data
import synth
import voc
from cli import UserError
from data import (IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, build_dataset,
                  to_model_input, train_transforms)

NEAREST = InterpolationMode.NEAREST


def denormalise(image):
    """``data.to_model_input``'s output for one uint8 image, back on the 0-1 scale."""
    image = to_model_input(image[None])[0]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return image * std + mean


# --------------------------------------------------------------------------- generator

def test_generated_tree_reads_through_torchvision_voc(synth_root):
    for split, count in (("train", 12), ("val", 6), ("trainval", 18)):
        voc = datasets.VOCSegmentation(str(synth_root), year="2012", image_set=split)
        assert len(voc) == count
    image, mask = voc[0]
    assert image.mode == "RGB" and mask.mode == "P"
    assert image.size == mask.size
    labels = set(np.unique(np.array(mask)).tolist())
    assert labels <= set(range(21)) | {IGNORE_INDEX}


def test_generated_tree_has_void_borders_varied_sizes_and_empty_images(tmp_path):
    synth.write_synth_voc(tmp_path, n_train=40, n_val=0, size=64, seed=3)
    voc = datasets.VOCSegmentation(str(tmp_path), year="2012", image_set="train")
    masks = [np.array(voc[i][1]) for i in range(len(voc))]
    sizes = {m.shape for m in masks}
    assert any(h > w for h, w in sizes) and any(w > h for h, w in sizes)  # portrait and landscape
    with_objects = [m for m in masks if (m[(m != 255)] > 0).any()]
    assert 0 < len(with_objects) < len(masks)  # some images hold no object
    assert all((m == IGNORE_INDEX).any() for m in with_objects)  # VOC-like void borders


def test_generator_is_deterministic_and_colour_does_not_give_the_class(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    synth.write_synth_voc(a, 5, 0, 48, seed=7)
    synth.write_synth_voc(b, 5, 0, 48, seed=7)
    for name in split_ids(a, "train"):
        assert (voc_dir(a) / "JPEGImages" / f"{name}.jpg").read_bytes() == \
               (voc_dir(b) / "JPEGImages" / f"{name}.jpg").read_bytes()
    # the same class drawn twice gets different colours
    rng = np.random.default_rng(0)
    means = []
    while len(means) < 3:
        image, label = synth.synth_sample(rng, 64, 64, max_objects=1)
        inside = label == 4
        if inside.sum() > 50:
            means.append(image[inside].mean(0))
    assert np.ptp(np.stack(means), axis=0).max() > 40


def test_old_generator_command_names_its_replacement_which_writes_the_same_tree(tmp_path):
    """`python data.py synth FLAGS` says in one line what replaced it and fails; the command
    it names, run as printed, writes what ``write_synth_voc`` writes for those flags."""
    flags = ["--root", str(tmp_path / "cli"), "--train", "3", "--val", "2", "--select", "1",
             "--size", "40", "--classes", "4", "--seed", "9"]
    old = subprocess.run([sys.executable, "data.py", "synth", *flags], cwd=REPO,
                         capture_output=True, text=True)
    assert old.returncode != 0 and old.stdout == ""
    assert old.stderr.count("\n") == 1 and "synth.py" in old.stderr
    assert not (tmp_path / "cli").exists()
    command = shlex.split(old.stderr.split("`")[1])
    assert command == ["python", "synth.py", *flags]
    subprocess.run([sys.executable, *command[1:]], cwd=REPO, check=True, capture_output=True)
    synth.write_synth_voc(tmp_path / "api", 3, 2, 40, seed=9, num_object_classes=4, n_select=1)
    for split in ("train", "val", "select"):
        for name in split_ids(tmp_path / "api", split):
            for sub, ext in (("JPEGImages", "jpg"), ("SegmentationClass", "png")):
                assert (voc_dir(tmp_path / "cli") / sub / f"{name}.{ext}").read_bytes() == \
                       (voc_dir(tmp_path / "api") / sub / f"{name}.{ext}").read_bytes()


# --------------------------------------------------------------------------- transforms

def _coded_pair(h, w, block=32):
    """A mask of label blocks and an image whose pixel value encodes the label (x10)."""
    yy, xx = np.mgrid[0:h, 0:w]
    label = ((yy // block) * 3 + (xx // block) * 5 + (xx // (2 * block))) % 21
    label[:, : block // 2] = IGNORE_INDEX  # an ignore stripe on the left edge
    code = np.where(label == IGNORE_INDEX, 250, label * 10).astype(np.uint8)
    image = tv_tensors.Image(torch.from_numpy(np.stack([code] * 3)))
    return image, tv_tensors.Mask(torch.from_numpy(label.astype(np.uint8)))


def _interior(mask, k=7):
    m = mask.float()[None, None]
    hi = torch.nn.functional.max_pool2d(m, k, 1, k // 2)
    lo = -torch.nn.functional.max_pool2d(-m, k, 1, k // 2)
    return (hi == lo)[0, 0]


def test_train_transforms_keep_image_and_mask_aligned():
    torch.manual_seed(0)
    transform = train_transforms(crop_size=96)
    image, mask = _coded_pair(120, 150)
    flips_seen = set()
    for _ in range(12):
        out_image, out_mask = transform(image, mask)
        assert out_image.shape == (3, 96, 96) and out_mask.shape == (96, 96)
        assert out_image.dtype == torch.uint8 and out_mask.dtype == torch.uint8  # 4x, 8x less to send
        value = denormalise(out_image)[0] * 255
        # the bilinear image and the nearest mask differ only near block edges: score the
        # pixels whose 7x7 neighbourhood holds one label
        interior = _interior(out_mask) & (out_mask != IGNORE_INDEX)
        agree = (value - out_mask * 10).abs() < 3
        assert interior.sum() > 1000 and agree[interior].all()
        # control: the same check fails when the mask is off by 16 pixels
        shifted = torch.roll(out_mask, 16, dims=1)
        assert ((value - shifted * 10).abs() < 3)[interior].float().mean() < 0.9
        # the ignore stripe lies on the left unless the pair was flipped
        cols = (out_mask == IGNORE_INDEX).float().mean(0)
        flips_seen.add(bool(cols[-4:].mean() > cols[:4].mean()))
    assert flips_seen == {True, False}


def test_device_normalisation_equals_the_per_image_transforms_bit_for_bit():
    """The workers send uint8; to_model_input on the batch must give exactly what v2's
    ToDtype + Normalize gave per image (and int64 masks), or results would move."""
    torch.manual_seed(0)
    pairs = [train_transforms(crop_size=64)(*_coded_pair(70, 90)) for _ in range(3)]
    per_image = v2.Compose([v2.ToDtype({tv_tensors.Image: torch.float32,
                                        tv_tensors.Mask: torch.int64}, scale=True),
                            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    expected = [per_image(image, mask) for image, mask in pairs]
    images, masks = to_model_input(torch.stack([i for i, _ in pairs]),
                                   torch.stack([m for _, m in pairs]))
    assert images.dtype == torch.float32 and masks.dtype == torch.int64
    assert torch.equal(images, torch.stack([i for i, _ in expected]))
    assert torch.equal(masks, torch.stack([m for _, m in expected]))
    with pytest.raises(TypeError, match="uint8"):
        to_model_input(images)  # normalising twice would go unnoticed otherwise


def test_loader_batches_are_channels_last_and_reach_the_model_as_default_collate_would(synth_root):
    """collate_pairs stacks the images channels-last (no transpose in the worker); the
    values, and what to_model_input hands the network (contiguous NCHW), must be those of
    torch's default_collate, padded crops (canvas) and unpadded ones (views) alike."""
    torch.manual_seed(0)
    transform = train_transforms(crop_size=80)  # the generated images are 64 px: some crops padded
    ds = build_dataset(synth_root, "train", download=False, transforms=transform)
    samples = [ds[i] for i in range(len(ds))]
    images, masks = data.collate_pairs(samples)
    ref_images, ref_masks = default_collate(samples)
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(images, ref_images) and torch.equal(masks, ref_masks)
    model_input, targets = to_model_input(images, masks)
    ref_input, ref_targets = to_model_input(ref_images, ref_masks)
    assert model_input.is_contiguous()  # CPU convolutions give other bits on channels-last input
    assert torch.equal(model_input, ref_input) and torch.equal(targets, ref_targets)


def test_ignore_label_never_becomes_a_class_and_padding_is_ignore():
    torch.manual_seed(1)
    image, mask = _coded_pair(40, 50)
    present = set(torch.unique(mask).tolist())
    transform = train_transforms(crop_size=200)  # larger than the image even at 2x: padded
    for _ in range(5):
        out_image, out_mask = transform(image, mask)
        assert set(torch.unique(out_mask).tolist()) <= present
        pad = out_mask[-1, :]  # bottom row lies in the padding (at most 100 rows of content)
        assert (pad == IGNORE_INDEX).all()
        pixel = denormalise(out_image)[:, -1, -1]
        assert torch.allclose(pixel, torch.zeros(3), atol=1e-5)  # image padded with 0


def test_eval_dataset_keeps_full_resolution(synth_root):
    ds = build_dataset(synth_root, "val", download=False)
    for i in range(len(ds)):
        image, mask = ds[i]
        with Image.open(ds.images[i]) as im:
            assert image.shape[-2:] == (im.height, im.width) == mask.shape


def test_grayscale_and_cmyk_images_become_rgb(synth_copy):
    ids = split_ids(synth_copy, "val")
    jpg = voc_dir(synth_copy) / "JPEGImages"
    Image.open(jpg / f"{ids[0]}.jpg").convert("L").save(jpg / f"{ids[0]}.jpg")
    Image.open(jpg / f"{ids[1]}.jpg").convert("CMYK").save(jpg / f"{ids[1]}.jpg")
    ds = build_dataset(synth_copy, "val", download=False)
    for i in (0, 1):
        assert ds[i][0].shape[0] == 3


# --------------------------------------------------------------------------- bad input

def test_truncated_jpeg_names_the_file(synth_copy):
    name = split_ids(synth_copy, "val")[2]
    path = voc_dir(synth_copy) / "JPEGImages" / f"{name}.jpg"
    path.write_bytes(path.read_bytes()[:300])
    ds = build_dataset(synth_copy, "val", download=False)
    with pytest.raises(UserError, match=f"{name}.jpg: cannot read image"):
        ds[2]


def test_mask_label_outside_classes_names_file_and_value(synth_copy):
    name = split_ids(synth_copy, "val")[0]
    path = voc_dir(synth_copy) / "SegmentationClass" / f"{name}.png"
    mask = np.array(Image.open(path))
    for bad in (37, 21, 254):  # 254: the value next to ignore, at the edge of the fast check
        mask[0, 0] = bad
        data.save_mask(mask, path)
        ds = build_dataset(synth_copy, "val", download=False)
        with pytest.raises(UserError, match=rf"{name}.png: mask holds label {bad}\b"):
            ds[0]
    mask[0, 0], mask[0, 1] = 20, IGNORE_INDEX  # the largest class and ignore are fine
    data.save_mask(mask, path)
    assert int(build_dataset(synth_copy, "val", download=False)[0][1][0, 0]) == 20


def _torchvision_train_transforms(crop_size, scale, hflip):
    """The training augmentation built from torchvision alone: what ``ScaleCropFlip``
    must reproduce, draw for draw and pixel for pixel."""
    def random_scale(image, mask):
        s = scale[0] + (scale[1] - scale[0]) * torch.rand(()).item()
        size = [max(1, round(n * s)) for n in image.shape[-2:]]
        return (TF.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True),
                TF.resize(mask, size, interpolation=NEAREST))
    steps = [random_scale, v2.RandomCrop(crop_size, pad_if_needed=True,
                                         fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX})]
    return v2.Compose(steps + [v2.RandomHorizontalFlip()] * hflip)


def test_train_transforms_equal_torchvision_v2_bit_for_bit():
    """ScaleCropFlip gathers the mask's crop without resizing it whole and pads only the
    crop; it must give the very pixels, and leave the very random state, of torchvision's
    resize + RandomCrop(pad_if_needed) + RandomHorizontalFlip, or training results move."""
    g = torch.Generator().manual_seed(0)
    sizes = [(int(h), int(w), int(c)) for h, w, c in torch.randint(1, 300, (150, 3), generator=g)]
    sizes += [(440, 7, 480), (441, 441, 480), (500, 250, 480), (333, 480, 480)]  # VOC-like
    for trial, (h, w, crop) in enumerate(sizes):
        scale, hflip = ((0.5, 2.0), (0.75, 1.5))[trial % 2], trial % 3 > 0
        image = tv_tensors.Image(torch.randint(0, 256, (h, w, 3), dtype=torch.uint8,
                                               generator=g).permute(2, 0, 1))  # as load_image
        mask = tv_tensors.Mask(torch.randint(0, 256, (h, w), dtype=torch.uint8, generator=g))
        results = []
        for transform in (_torchvision_train_transforms(crop, scale, hflip),
                          train_transforms(crop, scale, hflip)):
            torch.manual_seed(trial)
            results.append((*transform(image, mask), torch.get_rng_state()))
        (ref_image, ref_mask, ref_state), (out_image, out_mask, out_state) = results
        assert torch.equal(out_image, ref_image) and torch.equal(out_mask, ref_mask), (h, w, crop)
        assert torch.equal(out_state, ref_state), (h, w, crop)  # the same draws
        assert isinstance(out_image, tv_tensors.Image) and isinstance(out_mask, tv_tensors.Mask)


def test_nearest_sources_pick_the_pixels_torchvision_picks_for_any_size():
    """ScaleCropFlip gathers the mask through nearest_sources; it must pick the very pixels
    that TF.resize(NEAREST) picks, or image and mask would drift apart by a pixel."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        h, w, out_h, out_w = (int(v) for v in torch.randint(1, 700, (4,), generator=g))
        mask = torch.randint(0, 256, (h, w), dtype=torch.uint8, generator=g)
        expected = TF.resize(tv_tensors.Mask(mask), [out_h, out_w], interpolation=NEAREST)
        gathered = mask[augment.nearest_sources(h, out_h)][:, augment.nearest_sources(w, out_w)]
        assert torch.equal(gathered, expected), (h, w, out_h, out_w)
    for h, out_h in ((440, 880), (441, 441), (500, 250), (333, 1000)):  # torch's special cases
        mask = torch.randint(0, 256, (h, 7), dtype=torch.uint8, generator=g)
        expected = TF.resize(tv_tensors.Mask(mask), [out_h, 7], interpolation=NEAREST)
        assert torch.equal(mask[augment.nearest_sources(h, out_h)], expected)


def test_rgb_mask_is_refused(synth_copy):
    name = split_ids(synth_copy, "val")[0]
    path = voc_dir(synth_copy) / "SegmentationClass" / f"{name}.png"
    Image.open(path).convert("RGB").save(path)
    with pytest.raises(UserError, match="mask is a RGB image"):
        build_dataset(synth_copy, "val", download=False)[0]


def test_size_mismatch_missing_file_and_missing_split(synth_copy):
    ids = split_ids(synth_copy, "val")
    img = voc_dir(synth_copy) / "JPEGImages" / f"{ids[0]}.jpg"
    Image.open(img).resize((17, 13)).save(img)
    with pytest.raises(UserError, match="image is .* but its mask"):
        build_dataset(synth_copy, "val", download=False)[0]
    (voc_dir(synth_copy) / "JPEGImages" / f"{ids[1]}.jpg").unlink()
    with pytest.raises(UserError, match=r"val.txt: 1 listed file\(s\) are missing"):
        build_dataset(synth_copy, "val", download=False)
    (voc_dir(synth_copy) / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(UserError, match="val.txt: split file is missing"):
        build_dataset(synth_copy, "val", download=False)


def test_empty_split_is_refused(synth_copy):
    (voc_dir(synth_copy) / "ImageSets" / "Segmentation" / "val.txt").write_text("")
    with pytest.raises(UserError, match="split under .* is empty"):
        build_dataset(synth_copy, "val", download=False)


def test_failed_download_explains_the_manual_path(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(voc.datasets, "VOCSegmentation", offline)
    with pytest.raises(UserError) as err:
        build_dataset(tmp_path / "nothing", "val", download=True)
    message = str(err.value)
    assert "could not be downloaded" in message and "name resolution" in message
    assert "VOCtrainval_11-May-2012.tar" in message and "VOCdevkit/VOC2012" in message
    assert "\n" not in message
    with pytest.raises(UserError, match="downloading is off"):
        build_dataset(tmp_path / "nothing", "val", download=False)


# --------------------------------------------------------------------------- trainaug

def test_trainaug_adds_sbd_without_voc_val_images(synth_root, tmp_path):
    sbd = tmp_path / "SBD"
    (sbd / "img").mkdir(parents=True)
    (sbd / "cls").mkdir()
    val_ids = split_ids(synth_root, "val")
    train_ids = split_ids(synth_root, "train")
    sbd_ids = ["sbd_a", "sbd_b", val_ids[0], train_ids[0]]  # one leaks val, one repeats train
    for name in sbd_ids:
        Image.new("RGB", (20, 16), (90, 20, 200)).save(sbd / "img" / f"{name}.jpg")
        seg = np.zeros((16, 20), dtype=np.uint8)
        seg[4:10, 5:12] = 12
        savemat(sbd / "cls" / f"{name}.mat", {"GTcls": {"Segmentation": seg}})
    (sbd / "train.txt").write_text("\n".join(sbd_ids[:2]) + "\n")
    (sbd / "train_noval.txt").write_text("\n".join(sbd_ids) + "\n")
    ds = build_dataset(synth_root, "train", train_set="trainaug", sbd_root=sbd,
                       crop_size=32, download=False)
    names = [p.rsplit("/", 1)[-1].split(".")[0] for p in ds.images]
    assert len(ds) == len(train_ids) + 2
    assert "sbd_a" in names and "sbd_b" in names and val_ids[0] not in names
    image, mask = ds[names.index("sbd_a")]
    assert set(torch.unique(mask).tolist()) <= {0, 12, IGNORE_INDEX}
    with pytest.raises(UserError, match="SBD not found"):
        build_dataset(synth_root, "train", train_set="trainaug", sbd_root=tmp_path / "none",
                      download=False)


def test_voc_one_folder_too_deep_names_the_exact_move(synth_root, tmp_path):
    """Windows' "Extract all" adds the archive's name as a folder: say how to move it,
    and never start the 2 GB download beside it."""
    root = tmp_path / "data"
    nested = root / "VOCtrainval_11-May-2012" / "VOCdevkit" / "VOC2012"
    data_shutil.copytree(voc_dir(synth_root), nested)
    with pytest.raises(UserError) as err:
        build_dataset(root, "val", download=True)
    message = str(err.value)
    assert "\n" not in message and "one folder too deep" in message
    command = message.split("`")[1]
    assert command == voc.move_command(nested, root / "VOCdevkit")
    if voc.os.name != "nt":  # the command, run as printed, puts VOC where it is read
        subprocess.run(command, shell=True, check=True)
        assert len(build_dataset(root, "val", download=False)) == len(split_ids(synth_root, "val"))


def test_data_check_reads_a_generated_tree_and_names_a_broken_file(synth_copy, capsys):
    """`python data.py check` on generated data (small images: no training-crop check)."""
    args = data.get_args_parser().parse_args(["check", "--data-root", str(synth_copy)])
    data.main(args)
    assert capsys.readouterr().out.strip() == "train: 12 pairs, val: 6 pairs - all readable"
    broken = voc_dir(synth_copy) / "SegmentationClass" / f"{split_ids(synth_copy, 'val')[2]}.png"
    data.save_mask(np.full((40, 40), 37, np.uint8), broken)
    with pytest.raises(UserError) as err:
        data.main(args)
    assert str(err.value).startswith(f"{broken}: ") and "\n" not in str(err.value)


def test_augmentation_is_seeded_per_sample_and_epoch(synth_root):
    """(seed, epoch, index) alone fixes a sample's crop and flip: the same key gives the same
    tensors in any process or worker, another epoch gives another draw, and the caller's
    random stream (dropout in the training step) is left where it was."""
    ds = build_dataset(synth_root, "train", crop_size=48, download=False)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first, again = ds[(0, 1, 3)], ds[(0, 1, 3)]
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other_epochs = [ds[(0, epoch, 3)] for epoch in (2, 3, 4)]
    assert any(not torch.equal(first[0], image) for image, _ in other_epochs)
    assert not torch.equal(first[0], ds[(1, 1, 3)][0])  # another seed: another draw


def test_epoch_sampler_carries_the_epoch_and_shards_one_permutation():
    sampler = data.EpochSampler(10, seed=4)
    sampler.set_epoch(2)
    keys = list(sampler)
    assert {(s, e) for s, e, _ in keys} == {(4, 2)} and sorted(i for *_, i in keys) == list(range(10))
    assert keys == list(sampler)  # the same epoch, the same order
    sampler.set_epoch(3)
    assert [i for *_, i in sampler] != [i for *_, i in keys]
    shards = [data.EpochSampler(10, seed=4, rank=r, world_size=3) for r in range(3)]
    for shard in shards:
        shard.set_epoch(2)
    seen = [i for shard in shards for *_, i in shard]
    assert all(len(shard) == 3 for shard in shards) and len(set(seen)) == 9  # 10 cut to 3 x 3
    assert set(seen) <= {i for *_, i in keys}


def test_a_generated_tree_beside_the_data_root_is_not_taken_for_a_nested_voc(synth_root,
                                                                             tmp_path):
    """`python demo.py` leaves data/demo/VOCdevkit/VOC2012; the real runs in ./data must still
    look for (and download) VOC, not call the demo's tree a misplaced VOC."""
    root = tmp_path / "data"
    data_shutil.copytree(voc_dir(synth_root), root / "demo" / "VOCdevkit" / "VOC2012")
    with pytest.raises(UserError, match="downloading is off"):
        build_dataset(root, "val", download=False)
