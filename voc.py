"""Where PASCAL VOC 2012 and SBD sit on disk: finding them, downloading them through
torchvision when allowed, and listing the image and mask files of a split, with errors that
say what to do (the manual download, a tree one folder too deep, missing split files).

``data.build_dataset`` reads its file lists from here.
"""
import os
import shlex
import sys
import urllib.error
from pathlib import Path

from torchvision import datasets

from cli import UserError, one_line

VOC_ARCHIVE = "VOCtrainval_11-May-2012.tar"


def _manual_voc_message(root, reason):
    return (f"PASCAL VOC 2012 is not in {root} and could not be downloaded ({reason}). "
            f"Fetch {VOC_ARCHIVE} (about 2 GB) by hand from the PASCAL VOC site or a mirror and "
            f"extract it into {root}, so that {root}/VOCdevkit/VOC2012/ holds JPEGImages/, "
            "SegmentationClass/ and ImageSets/Segmentation/; for an offline run, "
            "`python synth.py --root DIR` writes a small VOC-format tree")


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

