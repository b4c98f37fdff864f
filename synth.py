"""A VOC-format tree of generated images, so that everything runs offline: textured shapes
whose class is a (shape, texture) pair, palette PNG masks with 255 borders, VOC's split files.

    python synth.py --root data/synth --train 200 --val 50 --size 128 --seed 0
    python synth.py --root data/demo --train 24 --val 8 --select 16 --classes 4
"""
import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cli import HelpFormatter, UserError
from data import IGNORE_INDEX, NUM_CLASSES, save_mask

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
        hi = F.max_pool2d(lab, k, stride=1, padding=border)
        lo = -F.max_pool2d(-lab, k, stride=1, padding=border)
        label[(hi != lo)[0, 0].numpy()] = IGNORE_INDEX
    return image, label


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


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    # the tree: where it goes and how many images each split holds
    parser.add_argument("--root", required=True, help="directory that receives VOCdevkit/VOC2012")
    parser.add_argument("--train", type=int, default=200, help="number of training images")
    parser.add_argument("--val", type=int, default=50, help="number of validation images")
    parser.add_argument("--select", type=int, default=0,
                        help="images of a third split, 'select', for choosing settings away from val")
    # the images
    parser.add_argument("--size", type=int, default=128, help="typical side in px (sides vary 0.75-1.25x)")
    parser.add_argument("--max-objects", type=int, default=3, help="most objects per image")
    parser.add_argument("--classes", type=int, default=NUM_CLASSES - 1,
                        help="object classes used, labels 1..N (fewer make a task that trains "
                        "in minutes)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed; the same seed writes the same tree")
    return parser


def main(args):
    voc = write_synth_voc(args.root, args.train, args.val, args.size, args.seed, args.max_objects,
                          args.classes, args.select)
    print(f"wrote {args.train} train + {args.val} val + {args.select} select images to {voc}")


if __name__ == "__main__":
    from cli import run_cli
    run_cli(main, get_args_parser())
