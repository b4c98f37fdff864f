"""PASCAL VOC 2012 segmentation data: the datasets, their samplers and loaders, and the
conversion of a batch to the networks' input.

The file lists come from torchvision's ``VOCSegmentation`` (and ``SBDataset`` for the
10,582-image "trainaug" set) through ``voc.py``; this module loads each pair with checks
(errors that name the file), applies the joint transforms (``augment.py``'s for training),
seeds them per sample, and batches them (``loader``, on a DataLoader whose workers leave
Ctrl-C to the main process). ``synth.py`` writes a
small VOC-format tree so that everything runs offline.

    python data.py check --data-root data/synth            # load every file once, report problems
"""
import argparse
import functools
import shlex
import signal
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from augment import ScaleCropFlip
from cli import HelpFormatter, UserError
from voc import sbd_files, voc_files

IGNORE_INDEX = 255  # "void" in VOC masks: object borders, padding; never a class
NUM_CLASSES = 21
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=1)
def voc_palette_bytes():
    """``voc_palette()`` as the 768 bytes Pillow's ``putpalette`` takes, computed once."""
    return voc_palette().tobytes()


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
    # a channels-last view: torch's uint8 resize is faster on it than on CHW memory
    # (docs/benchmark.md)
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
                # also visits every accelerator backend, a cost paid for every sample
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


def train_transforms(crop_size=480, scale=(0.5, 2.0), hflip=True):
    """Random scale, pad to the crop, random crop, flip (``ScaleCropFlip``).

    Images and masks stay uint8: the workers send a quarter of float32's bytes (an eighth
    of int64's for masks), and ``to_model_input`` normalises the batch on the device.
    """
    return ScaleCropFlip(crop_size, scale, hflip, mask_fill=IGNORE_INDEX)


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
    images = TF.normalize(TF.to_dtype(images, torch.float32, scale=True), IMAGENET_MEAN,
                          IMAGENET_STD)
    if masks is None:
        return images
    return images, masks.to(device, non_blocking=True).as_subclass(torch.Tensor).long()


# --------------------------------------------------------------------------- datasets

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
                        "generate data with `python synth.py`")
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
    copies whole rows, where an NCHW one transposes every pixel (docs/benchmark.md has the
    timing); ``to_model_input`` makes them contiguous on the device."""
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


# --------------------------------------------------------------------------- files and CLI

def save_mask(label, path):
    """Save a (H, W) uint8 label array as a VOC palette PNG (indices kept as they are)."""
    mask = Image.fromarray(np.asarray(label, dtype=np.uint8), mode="P")
    mask.putpalette(voc_palette_bytes())  # without one, Pillow renumbers indices
    mask.save(path, format="PNG")  # named: a temporary file's suffix is not .png


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
    # the generator's old command: '+' as its option prefix takes its flags, whatever they
    # are, as plain words, which main() passes on to the command that replaced it
    p = sub.add_parser("synth", help="moved: python synth.py (same flags)", add_help=False,
                       prefix_chars="+")
    p.add_argument("flags", nargs="*", help="the flags for synth.py")
    c = sub.add_parser("check", help="load every image and mask of a VOC tree once and report "
                       "problems", formatter_class=HelpFormatter)
    c.add_argument("--data-root", default="./data", help="directory holding VOCdevkit/VOC2012")
    return parser


def main(args):
    if args.command == "synth":
        raise UserError("the generator moved to synth.py, with the same flags: run "
                        f"`{shlex.join(['python', 'synth.py', *args.flags])}`")
    if args.command == "check":
        counts = check_tree(args.data_root)
        print(", ".join(f"{k}: {v} pairs" for k, v in counts.items()) + " - all readable")


if __name__ == "__main__":
    from cli import run_cli
    run_cli(main, get_args_parser())
