"""The random scale, pad, crop and flip that training applies to an image and its mask
together (``ScaleCropFlip``), and the index maths it rests on: where a crop window meets the
image (``crop_slices``), a region placed on a padded canvas (``place``), and torch's
nearest-neighbour source pixels (``nearest_sources``). ``data.train_transforms`` builds it
with VOC's ignore label as the mask's padding.
"""
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF


class ScaleCropFlip:
    """Random scale, pad (image 0, mask ``mask_fill``) to the crop, random crop, random
    horizontal flip.

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

    def __init__(self, crop_size=480, scale=(0.5, 2.0), hflip=True, *, mask_fill):
        self.crop = v2.RandomCrop(crop_size, pad_if_needed=True)  # draws the window as v2 does
        self.min_scale, self.max_scale = scale
        self.hflip = hflip
        self.mask_fill = mask_fill

    def __call__(self, image, mask):
        s = self.min_scale + (self.max_scale - self.min_scale) * torch.rand(()).item()
        h, w = image.shape[-2:]
        size = [max(1, round(h * s)), max(1, round(w * s))]
        image = TF.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
        window = self.crop.make_params([image])
        flip = self.hflip and bool(torch.rand(1) < 0.5)  # RandomHorizontalFlip's draw (p 0.5)
        out, src = crop_slices(window, size, flip)
        shape = (window["height"], window["width"])

        region = image.as_subclass(torch.Tensor)[:, src[0], src[1]]
        out_image = place(region.flip(-1) if flip else region, shape, out, 0)
        rows, cols = nearest_sources(h, size[0])[src[0]], nearest_sources(w, size[1])[src[1]]
        # rows, then columns: faster than one np.ix_ gather (docs/benchmark.md)
        region = mask.numpy()[rows][:, cols[::-1] if flip else cols]
        out_mask = place(torch.from_numpy(region), shape, out, self.mask_fill)
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
    """The source pixel of each of ``n_out`` pixels when ``TF.resize(NEAREST)`` maps ``n_in``
    to ``n_out``: torch's rule, min(floor(dst * (in / out)), in - 1) in float32."""
    scale = np.float32(n_in) / np.float32(n_out)
    index = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, n_in - 1)

