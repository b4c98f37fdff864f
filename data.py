"""PASCAL VOC 2012 segmentation data: datasets, joint transforms, and a VOC-format generator.

The real data comes through torchvision's ``VOCSegmentation`` (and ``SBDataset`` for the
10,582-image "trainaug" set); this module adds robust loading (errors that name the file),
the joint image/mask transforms, and ``synth``, which writes a small VOC-format tree so that
everything runs offline.

    python data.py synth --root data/synth --train 200 --val 50 --size 128 --seed 0
    python data.py check --data-root data/synth            # load every file once, report problems
"""
import argparse
import os
import shlex
import signal
import sys
import urllib.error
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import datasets, tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

from cli import HelpFormatter, UserError, one_line

IGNORE_INDEX = 255  # "void" in VOC masks: object borders, padding; never a class
NUM_CLASSES = 21
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VOC_ARCHIVE = "VOCtrainval_11-May-2012.tar"


def voc_palette():
    """The 256-entry VOC colour map (class k -> RGB) as a (256, 3) uint8 array."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for k in range(256):
        c, r, g, b = k, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[k] = (r, g, b)
    return palette


# --------------------------------------------------------------------------- loading

def load_image(path):
    """An RGB ``tv_tensors.Image`` (uint8, 3xHxW); grayscale, CMYK and palette become RGB."""
    try:
        with Image.open(path) as im:
            im.load()  # decodes now, so truncated files fail here
            array = np.array(im if im.mode == "RGB" else im.convert("RGB"))  # RGB: no 2nd copy
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{path}: cannot read image ({exc}); replace the file or remove "
                        "its id from the split file") from None
    # a channels-last view: torch's uint8 resize is about 2.5x faster on it than on CHW memory
    return tv_tensors.Image(torch.from_numpy(array).permute(2, 0, 1))


def load_mask(path, num_classes=NUM_CLASSES):
    """A ``tv_tensors.Mask`` (uint8, HxW) of class indices, 255 = ignore; checks the labels."""
    path = Path(path)
    try:
        if path.suffix == ".mat":  # SBD stores its masks as MATLAB structs
            from scipy.io import loadmat
            array = loadmat(str(path))["GTcls"][0]["Segmentation"][0]
        else:
            with Image.open(path) as im:
                if im.mode not in ("P", "L"):
                    raise UserError(f"{path}: mask is a {im.mode} image; VOC masks are palette "
                                    "(or grayscale) PNGs holding class indices: convert the "
                                    "colours to indices")
                array = np.array(im)
    except (OSError, SyntaxError, ValueError, KeyError, IndexError) as exc:
        raise UserError(f"{path}: cannot read mask ({exc}); replace the file or remove its id "
                        "from the split file") from None
    mask = torch.from_numpy(np.ascontiguousarray(array, dtype=np.uint8))  # copies only .mat's
    # fast path: uint8 wraps 255 (ignore) to 0, so labels 0..C-1 and 255 all land below C + 1
    if int(torch.add(mask, 1).max()) <= num_classes:
        return tv_tensors.Mask(mask)
    counts = torch.bincount(mask.flatten(), minlength=256)
    counts[:num_classes] = 0
    counts[IGNORE_INDEX] = 0
    if counts.any():
        bad = int(counts.nonzero()[0])
        raise UserError(f"{path}: mask holds label {bad}, outside 0-{num_classes - 1} and "
                        f"{IGNORE_INDEX} (ignore); fix the mask or remove its id from the split file")
    return tv_tensors.Mask(mask)


class SegmentationFiles(Dataset):
    """(image, mask) pairs from lists of file paths, loaded with checks, transformed jointly."""

    def __init__(self, images, masks, transforms=None, num_classes=NUM_CLASSES):
        assert len(images) == len(masks)
        self.images, self.masks = list(images), list(masks)
        self.transforms = transforms
        self.num_classes = num_classes

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        """``key``: an index, or (seed, epoch, index) from ``EpochSampler``: then the random
        transforms draw from a generator seeded by that triple alone, so a sample's
        augmentation does not depend on the worker that loads it, nor on how many there are."""
        if isinstance(key, tuple):
            with torch.random.fork_rng(devices=[]):  # the caller's random stream is untouched
                # the CPU generator alone, which the transforms draw from: torch.manual_seed
                # also visits every accelerator backend, 0.3 ms a sample
                torch.default_generator.manual_seed(sample_seed(*key))
                return self._load(key[2])
        return self._load(key)

    def _load(self, index):
        image = load_image(self.images[index])
        mask = load_mask(self.masks[index], self.num_classes)
        if image.shape[-2:] != mask.shape[-2:]:
            raise UserError(f"{self.images[index]}: image is {tuple(image.shape[-2:])} (HxW) but "
                            f"its mask {self.masks[index]} is {tuple(mask.shape[-2:])}; fix the "
                            "pair or remove its id from the split file")
        if self.transforms is not None:
            image, mask = self.transforms(image, mask)
        return image, mask


def sample_seed(seed, epoch, index):
    """A 63-bit seed for one sample of one epoch (numpy's SeedSequence mixes the three)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> 1)


class EpochSampler(torch.utils.data.Sampler):
    """The training order of one epoch: a permutation seeded by (seed, epoch), each index
    carried as (seed, epoch, index), so that the dataset seeds its augmentation per sample.

    Persistent workers keep their own copy of the dataset; the epoch reaches them with every
    index. Under torchrun each process takes every ``world_size``-th index of the same
    permutation, cut to equal shares (as ``DistributedSampler(drop_last=True)``).
    """

    def __init__(self, length, seed=0, rank=0, world_size=1):
        self.length, self.seed, self.rank, self.world_size = length, seed, rank, world_size
        self.epoch = 0
        self.total = length - length % world_size

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(self.length,
                               generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return ((self.seed, self.epoch, int(i)) for i in order[self.rank:self.total:self.world_size])

    def __len__(self):
        return self.total // self.world_size


# --------------------------------------------------------------------------- transforms

class ScaleCropFlip:
    """Random scale, pad (image 0, mask 255) to the crop, random crop, random horizontal flip.

    The same random draws and the same pixels as ``v2.Compose`` of a random resize
    (bilinear image, nearest mask), ``v2.RandomCrop(pad_if_needed=True)`` and
    ``v2.RandomHorizontalFlip()`` (tests/test_data.py holds them equal), in less time, which
    VOC-size loading needs (docs/benchmark.md):

    - the mask is never resized whole: its nearest pixels inside the crop are gathered from
      the file's mask, the flip folded into the column order;
    - the image is resized whole (torch's fixed-point bilinear weights depend on the whole
      output, so resizing only the crop would change bits), then cut and flipped with at
      most one copy, and only the crop's share of the padding is filled.

    Every draw is torch's, so ``--seed`` and ``EpochSampler`` control them.
    """

    def __init__(self, crop_size=480, scale=(0.5, 2.0), hflip=True):
        self.crop = v2.RandomCrop(crop_size, pad_if_needed=True)  # draws the window as v2 does
        self.min_scale, self.max_scale = scale
        self.hflip = hflip

    def __call__(self, image, mask):
        s = self.min_scale + (self.max_scale - self.min_scale) * torch.rand(()).item()
        h, w = image.shape[-2:]
        size = [max(1, round(h * s)), max(1, round(w * s))]
        image = F.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
        window = self.crop.make_params([image])
        flip = self.hflip and bool(torch.rand(1) < 0.5)  # RandomHorizontalFlip's draw (p 0.5)
        out, src = crop_slices(window, size, flip)
        shape = (window["height"], window["width"])

        region = image.as_subclass(torch.Tensor)[:, src[0], src[1]]
        out_image = place(region.flip(-1) if flip else region, shape, out, 0)
        rows, cols = nearest_sources(h, size[0])[src[0]], nearest_sources(w, size[1])[src[1]]
        region = mask.numpy()[rows][:, cols[::-1] if flip else cols]  # 6x faster than np.ix_
        out_mask = place(torch.from_numpy(region), shape, out, IGNORE_INDEX)
        return tv_tensors.Image(out_image), tv_tensors.Mask(out_mask)


def crop_slices(window, size, flip):
    """Where ``v2.RandomCrop``'s ``window`` (its ``make_params``) meets an image of ``size``
    (HxW), then flipped if ``flip``: ((rows, cols) of the crop, (rows, cols) of the image)."""
    out, src = [], []
    for start, pad, length, n in ((window["top"], window["padding"][1], window["height"], size[0]),
                                  (window["left"], window["padding"][0], window["width"], size[1])):
        # the crop's pixels that fall on the image (the rest is padding)
        first, end = max(0, pad - start), min(length, n + pad - start)
        out.append(slice(first, end))
        src.append(slice(start - pad + first, start - pad + end))
    if flip:
        out[1] = slice(window["width"] - out[1].stop, window["width"] - out[1].start)
    return out, src


def place(region, shape, where, fill):
    """``region`` at ``where`` (rows, cols) of a ``shape`` canvas of ``fill``; the region
    itself when it covers the canvas (no copy)."""
    if tuple(region.shape[-2:]) == tuple(shape):
        return region
    if region.dim() == 3:  # an image: channels-last, as the decoder and the resize give it
        canvas = region.new_full((*shape, region.shape[0]), fill).permute(2, 0, 1)
    else:
        canvas = region.new_full(shape, fill)
    canvas[..., where[0], where[1]] = region
    return canvas


def nearest_sources(n_in, n_out):
    """The source pixel of each of ``n_out`` pixels when ``F.resize(NEAREST)`` maps ``n_in``
    to ``n_out``: torch's rule, min(floor(dst * (in / out)), in - 1) in float32."""
    scale = np.float32(n_in) / np.float32(n_out)
    index = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, n_in - 1)


def train_transforms(crop_size=480, scale=(0.5, 2.0), hflip=True):
    """Random scale, pad to the crop, random crop, flip (``ScaleCropFlip``).

    Images and masks stay uint8: the workers send a quarter of float32's bytes (an eighth
    of int64's for masks), and ``to_model_input`` normalises the batch on the device.
    """
    return ScaleCropFlip(crop_size, scale, hflip)


def eval_transforms():
    """Each image at its full original size: no resize, no crop, so every pixel is scored
    (uint8, like training; ``to_model_input`` normalises)."""
    return v2.Identity()


def to_model_input(images, masks=None, device="cpu"):
    """A loader's uint8 batch as the networks take it, on ``device``: images as float32
    scaled to [0, 1] and normalised with ImageNet's mean and std there (the same torchvision
    functions the workers used to run per image, so the values are the same), masks as
    int64 class indices. Returns the images, or (images, masks) when masks are given."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image batch from data.py's datasets, got {images.dtype}")
    # channels-last from the loader (collate_pairs): contiguous on the device, where it is cheap
    images = images.to(device, non_blocking=True).as_subclass(torch.Tensor).contiguous()
    images = F.normalize(F.to_dtype(images, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)
    if masks is None:
        return images
    return images, masks.to(device, non_blocking=True).as_subclass(torch.Tensor).long()


# --------------------------------------------------------------------------- datasets

def _manual_voc_message(root, reason):
    return (f"PASCAL VOC 2012 is not in {root} and could not be downloaded ({reason}). "
            f"Fetch {VOC_ARCHIVE} (about 2 GB) by hand from the PASCAL VOC site or a mirror and "
            f"extract it into {root}, so that {root}/VOCdevkit/VOC2012/ holds JPEGImages/, "
            "SegmentationClass/ and ImageSets/Segmentation/; for an offline run, "
            "`python data.py synth --root DIR` writes a small VOC-format tree")


def move_command(src, dst_parent):
    """The shell line that moves ``src`` into ``dst_parent``, for this platform's shell."""
    if os.name == "nt":  # PowerShell, PyCharm's terminal on Windows
        return (f"New-Item -ItemType Directory -Force '{dst_parent}'; "
                f"Move-Item '{src}' '{dst_parent}'")
    return f"mkdir -p {shlex.quote(str(dst_parent))} && mv {shlex.quote(str(src))} {shlex.quote(str(dst_parent))}/"


def check_not_nested(root, voc_dir):
    """Refuse a VOC tree one folder too deep (Windows' "Extract all" adds the archive's name,
    VOCtrainval_11-May-2012) rather than download 2 GB again beside it. Only folders named
    like VOC's own count: data/demo/ holds the demo's generated tree, which is no VOC."""
    for nested in sorted(Path(root).glob("*/VOCdevkit/VOC2012")):
        if nested.parents[1].name.upper().startswith("VOC") and nested.is_dir():
            raise UserError(f"{nested}: PASCAL VOC 2012 is one folder too deep; the scripts read "
                            f"{voc_dir}: move it there with `{move_command(nested, voc_dir.parent)}`")


def ensure_voc(root, download=True):
    """Make sure ``root/VOCdevkit/VOC2012`` exists, downloading it when allowed."""
    voc_dir = Path(root) / "VOCdevkit" / "VOC2012"
    if voc_dir.is_dir():
        return voc_dir
    check_not_nested(root, voc_dir)
    if not download:
        raise UserError(_manual_voc_message(root, "downloading is off"))
    print(f"PASCAL VOC 2012 not found in {root}; downloading {VOC_ARCHIVE} ...", file=sys.stderr)
    try:
        datasets.VOCSegmentation(str(root), year="2012", image_set="train", download=True)
    except (urllib.error.URLError, OSError, RuntimeError, ValueError) as exc:
        raise UserError(_manual_voc_message(root, one_line(exc, 200))) from None
    return voc_dir


def _check_files_exist(paths, split_file):
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise UserError(f"{split_file}: {len(missing)} listed file(s) are missing, e.g. "
                        f"{missing[0]}; restore them or remove their ids from the split file")


VOC_SPLITS = ("train", "val", "trainval")


def voc_files(root, image_set, download=True):
    """Image and mask paths of one segmentation split: VOC 2012's train, val or trainval, or
    any other name with a split file ImageSets/Segmentation/NAME.txt."""
    voc_dir = ensure_voc(root, download)
    split_file = voc_dir / "ImageSets" / "Segmentation" / f"{image_set}.txt"
    if not split_file.is_file() and image_set not in VOC_SPLITS:
        raise UserError(f"{split_file}: no split named {image_set!r}; list its image ids there, "
                        "one per line, or use train, val or trainval")
    if not split_file.is_file():
        raise UserError(f"{split_file}: split file is missing; restore it from {VOC_ARCHIVE} "
                        "or regenerate the tree")
    if image_set in VOC_SPLITS:
        voc = datasets.VOCSegmentation(str(root), year="2012", image_set=image_set, download=False)
        images, masks = voc.images, voc.masks
    else:  # a split of one's own (the demo's 'select'), in VOC's layout; torchvision knows three
        ids = split_file.read_text().split()
        images = [str(voc_dir / "JPEGImages" / f"{i}.jpg") for i in ids]
        masks = [str(voc_dir / "SegmentationClass" / f"{i}.png") for i in ids]
    _check_files_exist(images, split_file)
    _check_files_exist(masks, split_file)
    return images, masks


SBD_SPLITS = ("train", "val", "train_noval")


def _sbd_present(sbd_root):
    return (Path(sbd_root) / "img").is_dir() and any(
        (Path(sbd_root) / f"{s}.txt").is_file() for s in SBD_SPLITS)


def _manual_sbd_message(sbd_root, why):
    return (f"SBD not found in {sbd_root}, and it could not be downloaded ({why}); --train-set trainaug "
            "needs the Semantic Boundaries Dataset: extract benchmark.tgz's "
            f"benchmark_RELEASE/dataset/ folder into {sbd_root} (img/, cls/, train.txt, "
            "val.txt) and add train_noval.txt, or use --train-set voc")


def ensure_sbd(sbd_root, download=True):
    """Make sure SBD is in ``sbd_root``, downloading it through torchvision when allowed."""
    if _sbd_present(sbd_root):
        return
    if not download:
        raise UserError(_manual_sbd_message(sbd_root, "downloading is off"))
    print(f"SBD not found in {sbd_root}; downloading benchmark.tgz (about 1.4 GB) and its "
          "train_noval split ...", file=sys.stderr)
    try:  # train_noval: torchvision then fetches the split that leaves VOC val out
        datasets.SBDataset(str(sbd_root), image_set="train_noval", mode="segmentation",
                           download=True)
    except (urllib.error.URLError, OSError, RuntimeError, ValueError) as exc:
        raise UserError(_manual_sbd_message(sbd_root, one_line(exc, 200))) from None


def sbd_files(sbd_root, download=True):
    """Image and .mat mask paths of every SBD split file present (train, val, train_noval)."""
    ensure_sbd(sbd_root, download)
    images, masks = [], []
    for split in SBD_SPLITS:
        if not (Path(sbd_root) / f"{split}.txt").is_file():
            continue
        sbd = datasets.SBDataset(str(sbd_root), image_set=split, mode="segmentation", download=False)
        images += sbd.images
        masks += sbd.masks
    return images, masks


def _file_id(path):
    return Path(path).stem


def build_dataset(root, split, train_set="voc", crop_size=480, limit=None, download=True,
                  sbd_root=None, transforms=None, scale=(0.5, 2.0)):
    """The dataset for ``split`` ('train' or 'val') with the matching transforms.

    ``train_set='trainaug'`` is VOC train plus SBD, without any VOC val image (SBD's own
    train split overlaps VOC val, which would leak test images into training).
    """
    images, masks = voc_files(root, split, download)
    if split == "train" and train_set == "trainaug":
        val_ids = {_file_id(p) for p in voc_files(root, "val", download)[0]}
        seen = {_file_id(p) for p in images}
        sbd_images, sbd_masks = sbd_files(sbd_root or Path(root) / "SBD", download)
        for img, msk in zip(sbd_images, sbd_masks):
            key = _file_id(img)
            if key not in val_ids and key not in seen:
                seen.add(key)
                images.append(img)
                masks.append(msk)
    elif train_set not in ("voc", "trainaug"):
        raise UserError(f"--train-set {train_set!r} is unknown; use voc or trainaug")
    if limit is not None:
        if limit < 1:
            raise UserError(f"a limit of {limit} {split} images leaves the {split} set empty; "
                            "pass a positive limit (--limit-train, --limit-val, --limit), or none to "
                            "use every image")
        images, masks = images[:limit], masks[:limit]
    if not images:
        raise UserError(f"the {split} split under {root} is empty; add ids to its split file or "
                        "generate data with `python data.py synth`")
    if split == "train" and transforms is None:
        check_crop_fits(images, crop_size, scale[1])
    if transforms is None:
        transforms = train_transforms(crop_size, scale) if split == "train" else eval_transforms()
    return SegmentationFiles(images, masks, transforms)


def check_crop_fits(images, crop_size, max_scale):
    """Refuse a training crop larger than every image even at the largest random scale.

    A crop somewhat larger than the images is normal (DeepLab pads VOC's <= 500 px images to
    513); one larger than all of them at every scale trains mostly on padding. Only the
    image headers are read, which is fast.
    """
    largest = 0
    for path in images:
        try:
            with Image.open(path) as im:
                largest = max(largest, *im.size)
        except OSError:
            return  # the loader names a broken file, with its own message
    if crop_size > largest * max_scale:
        raise UserError(f"--crop-size {crop_size} is larger than every training image, even at "
                        f"the largest random scale ({largest} px x {max_scale:g} = "
                        f"{largest * max_scale:.0f} px): the crops would be mostly padding; "
                        f"use --crop-size {int(largest * max_scale)} or less (VOC: 480)")


class ShardSampler(torch.utils.data.Sampler):
    """Every ``world_size``-th index from ``rank``: the evaluation share of one process.

    Unlike ``DistributedSampler``, it never pads the shards to equal length, so summing the
    processes' confusion matrices counts each image exactly once.
    """

    def __init__(self, length, rank=0, world_size=1):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def eval_loader(root, limit=None, workers=0, download=True, split="val", rank=0, world_size=1,
                pin_memory=False):
    """Full-resolution images one at a time (sizes differ, so no batching).

    In a torchrun job each process gets its own shard (``ShardSampler``); sum the results
    with ``engine.evaluate(..., reduce=...)``. The workers persist across epochs (evaluation
    draws nothing at random), so a run validating every epoch starts them once.
    """
    dataset = build_dataset(root, split, limit=limit, download=download, transforms=eval_transforms())
    return loader(dataset, batch_size=1, sampler=ShardSampler(len(dataset), rank, world_size),
                  workers=workers, pin_memory=pin_memory)


def collate_pairs(batch):
    """``default_collate`` of (image, mask) pairs, the images stacked channels-last (NHWC
    memory, NCHW shape): the decoder and the resize give them so, and a channels-last stack
    copies whole rows, where an NCHW one transposes every pixel (0.15 against 0.33 ms an
    image at 480 px); ``to_model_input`` makes them contiguous on the device."""
    images = default_collate([image.permute(1, 2, 0) for image, _ in batch])
    return images.permute(0, 3, 1, 2), default_collate([mask for _, mask in batch])


def quiet_worker(worker_id):
    """DataLoader ``worker_init_fn``: leave Ctrl-C to the main process.

    A terminal's Ctrl-C reaches every process of the job. A worker that died of it would
    make the main process fail mid-step; the main process instead finishes the step, saves,
    and shuts its workers down itself. SIGTERM keeps its default: it is how the DataLoader
    (and multiprocessing at exit) ends its workers, so a worker must never ignore it.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # blocked while it started (WorkerSafeLoader)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class WorkerSafeLoader(DataLoader):
    """A DataLoader whose worker processes a Ctrl-C cannot kill while they start.

    A terminal's Ctrl-C reaches every process of the job. A worker still starting (under
    spawn, the default on macOS and Windows, that takes seconds: it imports torch) would die
    of it before ``quiet_worker`` ignores it, and the main process would then fail with
    "DataLoader worker exited unexpectedly" instead of saving. So SIGINT is blocked in this
    thread while the workers are created: they inherit the block, and ``quiet_worker``
    ignores SIGINT before unblocking it. A Ctrl-C meanwhile stays pending, and reaches the
    main process's handler as soon as the workers are launched. (POSIX; Windows has no
    signal masks.)
    """

    def __iter__(self):
        if self.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):
            return super().__iter__()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def loader(dataset, batch_size, sampler, workers, pin_memory=False, drop_last=False):
    """A DataLoader of (image, mask) batches whose workers persist across epochs and leave
    Ctrl-C to the main process (``WorkerSafeLoader``)."""
    return WorkerSafeLoader(dataset, batch_size=batch_size, sampler=sampler,
                            collate_fn=collate_pairs,
                            num_workers=workers, persistent_workers=workers > 0,
                            drop_last=drop_last, pin_memory=pin_memory,
                            worker_init_fn=quiet_worker,
                            # its own generator: the DataLoader draws a base seed from it for
                            # every new iterator, never from the run's random stream
                            generator=torch.Generator())


# --------------------------------------------------------------------------- generator

SHAPES = ("disk", "square", "triangle", "ring", "cross")
TEXTURES = ("hstripes", "vstripes", "checker", "dots")


def synth_class_recipe(label):
    """Class ``label`` (1-20) is a (shape, texture) pair; its colours are random per object.

    Consecutive labels change the texture first: labels 1-4 are disks with four textures,
    5-8 squares, and so on, so a generator limited to a few classes stays learnable fast.
    """
    return SHAPES[(label - 1) // len(TEXTURES)], TEXTURES[(label - 1) % len(TEXTURES)]


def _shape_mask(shape, yy, xx, cy, cx, r):
    dy, dx = yy - cy, xx - cx
    if shape == "disk":
        return dy ** 2 + dx ** 2 <= r ** 2
    if shape == "square":
        return np.maximum(np.abs(dy), np.abs(dx)) <= 0.8 * r
    if shape == "triangle":
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) * 0.55)
    if shape == "ring":
        d2 = dy ** 2 + dx ** 2
        return (d2 <= r ** 2) & (d2 >= (0.55 * r) ** 2)
    if shape == "cross":
        arm = 0.32 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(shape)


def _texture(texture, yy, xx, period, phase):
    yy, xx = yy + phase, xx + phase
    half = period / 2
    if texture == "hstripes":
        return (yy // half) % 2 == 0
    if texture == "vstripes":
        return (xx // half) % 2 == 0
    if texture == "checker":
        return ((yy // half) + (xx // half)) % 2 == 0
    if texture == "dots":
        return ((yy % period) - half) ** 2 + ((xx % period) - half) ** 2 <= (period / 3) ** 2
    raise ValueError(texture)


def synth_sample(rng, height, width, max_objects=3, border=3, num_object_classes=NUM_CLASSES - 1):
    """One (RGB uint8 image, uint8 mask) pair.

    Objects are shapes filled with a two-colour texture; the class is the (shape, texture)
    pair and the colours are random, so colour alone never gives the class away and a model
    must see both the outline and the pattern. Borders between regions are 255, as in VOC.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # background: a smooth random colour gradient plus low-contrast diagonal streaks
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (yy / height * rng.uniform(-1, 1) + xx / width * rng.uniform(-1, 1))
    t = (t - t.min()) / (np.ptp(t) + 1e-6)
    image = c0 * (1 - t[..., None]) + c1 * t[..., None]
    streaks = np.sin((yy + xx) / rng.uniform(3, 9) + rng.uniform(0, 6.28))[..., None]
    image += 12 * streaks
    label = np.zeros((height, width), dtype=np.uint8)
    n_objects = rng.integers(0, max_objects + 1)
    for _ in range(n_objects):
        cls = int(rng.integers(1, num_object_classes + 1))
        shape, texture = synth_class_recipe(cls)
        r = rng.uniform(0.12, 0.3) * min(height, width)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        inside = _shape_mask(shape, yy, xx, cy, cx, r)
        if not inside.any():
            continue
        period = rng.uniform(4, 9)
        pattern = _texture(texture, yy, xx, period, rng.uniform(0, period))
        fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        while np.abs(fg - bg).sum() < 150:  # keep the pattern visible
            fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        fill = np.where(pattern[..., None], fg, bg)
        image[inside] = fill[inside]
        label[inside] = cls
    image += rng.normal(0, 8, image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)
    if border > 0:  # void band where a (2*border+1) window sees more than one label
        lab = torch.from_numpy(label).float()[None, None]
        k = 2 * border + 1
        hi = nnf.max_pool2d(lab, k, stride=1, padding=border)
        lo = -nnf.max_pool2d(-lab, k, stride=1, padding=border)
        label[(hi != lo)[0, 0].numpy()] = IGNORE_INDEX
    return image, label


def save_mask(label, path):
    """Save a (H, W) uint8 label array as a VOC palette PNG (indices kept as they are)."""
    mask = Image.fromarray(np.asarray(label, dtype=np.uint8), mode="P")
    mask.putpalette(voc_palette().flatten().tolist())  # without one, Pillow renumbers indices
    mask.save(path)


def write_synth_voc(root, n_train=200, n_val=50, size=128, seed=0, max_objects=3,
                    num_object_classes=NUM_CLASSES - 1, n_select=0):
    """Write ``root/VOCdevkit/VOC2012`` in VOC's layout; returns that directory.

    Sizes vary from 0.75x to 1.25x ``size`` on each side, so landscape, portrait and odd
    sizes all occur; some images hold no object. Objects take labels 1..num_object_classes.
    ``n_select`` more images form a third split, 'select' (select.txt), drawn after train and
    val (which stay what they are without it): for choosing settings and checkpoints away
    from the val images a table reports.
    """
    if not 1 <= num_object_classes < NUM_CLASSES:
        raise UserError(f"--classes {num_object_classes}: use 1 to {NUM_CLASSES - 1} object classes")
    rng = np.random.default_rng(seed)
    voc = Path(root) / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    ids = {"train": [], "val": [], "select": []}
    for split, count in (("train", n_train), ("val", n_val), ("select", n_select)):
        for i in range(count):
            h = int(rng.integers(int(0.75 * size), int(1.25 * size) + 1))
            w = int(rng.integers(int(0.75 * size), int(1.25 * size) + 1))
            image, label = synth_sample(rng, h, w, max_objects=max_objects,
                                        border=max(1, size // 64),
                                        num_object_classes=num_object_classes)
            name = f"synth_{split}_{i:05d}"
            Image.fromarray(image).save(voc / "JPEGImages" / f"{name}.jpg", quality=92)
            save_mask(label, voc / "SegmentationClass" / f"{name}.png")
            ids[split].append(name)
    seg = voc / "ImageSets" / "Segmentation"
    (seg / "train.txt").write_text("".join(f"{i}\n" for i in ids["train"]))
    (seg / "val.txt").write_text("".join(f"{i}\n" for i in ids["val"]))
    (seg / "trainval.txt").write_text("".join(f"{i}\n" for i in ids["train"] + ids["val"]))
    if n_select:
        (seg / "select.txt").write_text("".join(f"{i}\n" for i in ids["select"]))
    return voc


def check_tree(root, splits=("train", "val"), progress=True):
    """Load every listed image and mask once; returns {split: number of pairs}."""
    counts = {}
    for split in splits:
        # evaluation transforms: the training crop check is about a training run, not the files
        ds = build_dataset(root, split, download=False, transforms=eval_transforms())
        ds.transforms = None  # read and check each pair, nothing more
        for i in tqdm(range(len(ds)), desc=f"checking {split}", disable=not progress, leave=False):
            ds[i]
        counts[split] = len(ds)
    return counts


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="write a small VOC-format tree of generated images",
                       formatter_class=HelpFormatter)
    p.add_argument("--root", required=True, help="directory that receives VOCdevkit/VOC2012")
    p.add_argument("--train", type=int, default=200, help="number of training images")
    p.add_argument("--val", type=int, default=50, help="number of validation images")
    p.add_argument("--select", type=int, default=0,
                   help="images of a third split, 'select', for choosing settings away from val")
    p.add_argument("--size", type=int, default=128, help="typical side in pixels (sides vary 0.75-1.25x)")
    p.add_argument("--max-objects", type=int, default=3, help="most objects per image")
    p.add_argument("--classes", type=int, default=NUM_CLASSES - 1,
                   help="object classes used, labels 1..N (fewer make a task that trains in minutes)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same tree")
    c = sub.add_parser("check", help="load every image and mask of a VOC tree once and report "
                       "problems", formatter_class=HelpFormatter)
    c.add_argument("--data-root", default="./data", help="directory holding VOCdevkit/VOC2012")
    return parser


def main(args):
    if args.command == "synth":
        voc = write_synth_voc(args.root, args.train, args.val, args.size, args.seed, args.max_objects,
                              args.classes, args.select)
        print(f"wrote {args.train} train + {args.val} val + {args.select} select images to {voc}")
    elif args.command == "check":
        counts = check_tree(args.data_root)
        print(", ".join(f"{k}: {v} pairs" for k, v in counts.items()) + " - all readable")


if __name__ == "__main__":
    from cli import run_cli
    run_cli(main, get_args_parser())
