"""Compact DeepLabV3+-style student for semantic segmentation distillation.

Architecture (``CompactStudentModel``, one class, two variants)::

    image -> MobileNetV3-Small .features (last stage dilated, output stride 16)
               |-- 'low'  tap -> 1x1 conv to 48 ch + BN + ReLU ------------------.
               |-- 'mid'  tap (returned for feature distillation only)           |
               '-- 'high' tap -> ASPP [1x1 | 3x3 r6 | 3x3 r12 | 3x3 r18 | image  |
                                  pooling] -> concat -> 1x1 + BN + ReLU           |
                                  -> Dropout(0.5) -> bilinear up to skip size --> concat
             -> two 3x3 convs (+BN+ReLU) -> Dropout(0.5) -> 1x1 classifier
             -> bilinear upsampling (align_corners=False) to the input H x W

* ``'lab'``: the lab's example as written: 256-channel ASPP and decoder, full 3x3 convs.
* ``'lite'`` (default): every 3x3 conv is depthwise-separable (depthwise 3x3 dilated +
  BN + ReLU, then pointwise 1x1 + BN + ReLU), ASPP and decoder 96 channels.

Measured feature taps (256 x 256 input; tests/test_student_model.py checks them):

    ======  ========  =====================  ======  ==========================
    tap     channels  features index         stride  lab's description
    ======  ========  =====================  ======  ==========================
    low     24        3 (last 24-ch block)   8       "24 ch, stride ~4"
    mid     40        6 (last 40-ch block)   16      "40 ch, stride ~8"
    high    576       12 (final 1x1 conv)    16      "576 ch, stride ~16"
    ======  ========  =====================  ======  ==========================

With ``return_preact=True`` the features also hold 'preact': the output of the last
refinement BatchNorm before its ReLU (96 channels in 'lite', 256 in 'lab', stride 8), the
pre-activation of the last layer before the classifier that the pixel-wise distillation loss
compares; the logits and the state dict do not change.

The lab's "stride ~4 / ~8" for low/mid are one octave off: MobileNetV3-Small reaches
stride 4 with 16 channels, 24 channels only at stride 8, 40 channels at stride 16. The
decoder therefore works at stride 8 (cheap); no stride-4 path is added.

Parameter counts (num_classes=21, all of them used at inference):
``lite`` 1,298,981 (backbone 927,008 + head 371,973); ``lab`` 6,831,637 (head 5,904,629).

Why dilation gives output stride 16: undilated, blocks 9-12 (96 and 576 channels) sit at
stride 32 because block 9's 5x5 depthwise conv has stride 2. ``mobilenet_v3_small(
dilated=True)`` (the option torchvision's own DeepLabV3-MobileNetV3 uses) gives the 5x5
depthwise convs of blocks 9-11 stride 1, dilation 2 and padding 4 (same size out). The
feature map stays at stride 16 while each kernel still spans the receptive field it had at
stride 32, so the ImageNet weights keep their meaning, and the ASPP sees 2x finer features.

A channel-pruned student (pruning.py) is the same class built with ``widths``: the layers
whose channel counts differ from the variant's, rebuilt at those counts before the state dict
is loaded; its ``feature_channels`` and ``preact_channels`` are then its own, narrower ones.

The image-pooling branch broadcasts its 1x1 output back to H x W (``expand``): that is what
bilinear upsampling of a 1x1 map gives, without the interpolation call.
"""
import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import MobileNet_V3_Small_Weights, mobilenet_v3_small

from nets import load_pretrained, with_model_args

# Head widths: (ASPP channels, decoder channels, separable 3x3 convs?)
_VARIANTS = {"lab": (256, 256, False), "lite": (96, 96, True)}


def _conv_bn_relu(cin, cout, kernel=1, dilation=1):
    pad = dilation * (kernel // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _conv3x3(cin, cout, dilation, separable):
    if not separable:
        return _conv_bn_relu(cin, cout, 3, dilation)
    depthwise = nn.Sequential(
        nn.Conv2d(cin, cin, 3, padding=dilation, dilation=dilation, groups=cin, bias=False),
        nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
    return nn.Sequential(depthwise, _conv_bn_relu(cin, cout))


class ASPP(nn.Module):
    def __init__(self, cin, cout, separable, rates=(6, 12, 18)):
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(cin, cout)] + [_conv3x3(cin, cout, r, separable) for r in rates])
        # No BatchNorm in the image-pooling branch: its input is 1x1 per image, so in training
        # with batch 1 BN sees one value per channel and raises (and with small batches its
        # statistics would be noise). A biased conv + ReLU does the same job.
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1), nn.ReLU(inplace=True))
        self.project = nn.Sequential(_conv_bn_relu(5 * cout, cout), nn.Dropout(0.5))

    def forward(self, x):
        outs = [branch(x) for branch in self.branches]
        outs.append(self.pool(x).expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(outs, 1))


def _backbone(pretrained):
    if pretrained:
        # a failed download stops the run: a student silently trained from random weights
        # could not be told apart from a pretrained one later
        weights = MobileNet_V3_Small_Weights.IMAGENET1K_V1
        features = load_pretrained(
            lambda: mobilenet_v3_small(weights=weights, dilated=True).features, weights,
            "MobileNetV3-Small's ImageNet weights",
            "pass --no-pretrained-backbone to start from random weights")
    else:
        features = mobilenet_v3_small(weights=None, dilated=True).features
    # torchvision builds MobileNetV3's BatchNorms with momentum 0.01 (long ImageNet runs);
    # segmentation fine-tuning runs far fewer steps, and at 0.01 the running statistics used
    # in eval mode lag the weights for hundreds of steps. 0.1 is PyTorch's default.
    for module in features.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    return features


class CompactStudentModel(nn.Module):
    """DeepLabV3+-style head on a dilated MobileNetV3-Small; see the module docstring."""

    # the unpruned widths; an instance's own are ``feature_channels`` / ``preact_channels``
    FEATURE_CHANNELS = {"low": 24, "mid": 40, "high": 576}
    # 'preact': the last refinement BN's output before its ReLU (pixel-wise distillation)
    PREACT_CHANNELS = {variant: dec for variant, (_, dec, _) in _VARIANTS.items()}

    def __init__(self, variant="lite", num_classes=21, pretrained_backbone=True, widths=None):
        """``widths``: {layer name: [in, out] (conv) or [features] (BatchNorm)} of the layers
        whose widths differ from the variant's (a channel-pruned student, pruning.py)."""
        super().__init__()
        if variant not in _VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(_VARIANTS)}")
        with_model_args(self, variant, num_classes, widths=widths)
        aspp_ch, dec_ch, separable = _VARIANTS[variant]

        self.backbone = _backbone(pretrained_backbone)
        # Tap = the last block producing that channel count, found from the blocks themselves
        # so the indices cannot drift from torchvision's layout silently.
        last_index = {}
        for i, block in enumerate(self.backbone):
            last_index[block.out_channels] = i
        self._taps = {last_index[ch]: name for name, ch in self.FEATURE_CHANNELS.items()}
        assert len(self._taps) == 3 and max(self._taps) == len(self.backbone) - 1

        self.aspp = ASPP(576, aspp_ch, separable)
        self.skip = _conv_bn_relu(24, 48)
        self.refine = nn.Sequential(_conv3x3(aspp_ch + 48, dec_ch, 1, separable),
                                    _conv3x3(dec_ch, dec_ch, 1, separable),
                                    nn.Dropout(0.5))
        self.classifier = nn.Conv2d(dec_ch, num_classes, 1)
        resize_layers(self, widths or {})
        # the taps' widths read from the layers themselves, so a pruned student's adapters
        # (distill.build_distiller) and a pruned teacher's fit its real channels
        self.feature_channels = {name: out_width(self.backbone[i]) for i, name in self._taps.items()}
        self.preact_channels = out_width(self.refine)

    def forward(self, x, return_features=False, return_preact=False):
        """Logits at the input size; with ``return_features`` also the taps {'low', 'mid',
        'high'}, plus 'preact' (the last refinement layer before its ReLU) when
        ``return_preact``. The outputs never depend on the flags."""
        if return_preact and not return_features:
            raise ValueError("return_preact=True needs return_features=True")
        size = x.shape[-2:]
        feats = {}
        for i, block in enumerate(self.backbone):
            x = block(x)
            if i in self._taps:
                feats[self._taps[i]] = x
        skip = self.skip(feats["low"])
        y = F.interpolate(self.aspp(feats["high"]), size=skip.shape[-2:], mode="bilinear",
                          align_corners=False)
        y = torch.cat([y, skip], 1)
        y = self._refine_with_preact(y, feats) if return_preact else self.refine(y)
        logits = F.interpolate(self.classifier(y), size=size, mode="bilinear", align_corners=False)
        return (logits, feats) if return_features else logits

    def _refine_with_preact(self, y, feats):
        """``self.refine(y)``, keeping the input of its last ReLU as feats['preact'].

        ``refine`` nests only nn.Sequential, so its leaf modules in registration order are
        its forward order; the last ReLU runs out of place so the pre-activation survives.
        """
        leaves = [m for m in self.refine.modules() if not isinstance(m, nn.Sequential)]
        last_relu = max(i for i, m in enumerate(leaves) if isinstance(m, nn.ReLU))
        for module in leaves[:last_relu]:
            y = module(y)
        feats["preact"] = y
        y = F.relu(y)
        for module in leaves[last_relu + 1:]:
            y = module(y)
        return y


def out_width(module):
    """Channels coming out of ``module``: those of its last BatchNorm (every tap block and
    the refinement end in one)."""
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


def _resized(layer, shape):
    """A fresh layer like ``layer`` with the widths ``shape``; a depthwise conv stays one."""
    if isinstance(layer, nn.BatchNorm2d) and len(shape) == 1:
        return nn.BatchNorm2d(shape[0], eps=layer.eps, momentum=layer.momentum)
    if isinstance(layer, nn.Conv2d) and len(shape) == 2:
        cin, cout = shape
        depthwise = layer.groups > 1 and layer.groups == layer.in_channels
        if depthwise != (layer.groups > 1) or (depthwise and cin != cout):
            raise ValueError(f"a conv with groups={layer.groups} cannot become {cin} -> {cout}")
        return nn.Conv2d(cin, cout, layer.kernel_size, layer.stride, layer.padding,
                         layer.dilation, groups=cin if depthwise else 1,
                         bias=layer.bias is not None)
    raise ValueError(f"cannot give a {type(layer).__name__} the widths {shape}")


def resize_layers(model, widths):
    """Replace each layer named in ``widths`` by one of those widths (random weights: the
    checkpoint's state dict fills them)."""
    for name, shape in widths.items():
        parent_name, _, leaf = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            layer = getattr(parent, leaf)
        except AttributeError:
            raise ValueError(f"widths name a layer {name!r} the model does not have") from None
        setattr(parent, leaf, _resized(layer, list(shape)))


def layer_widths(model):
    """{layer name: [in, out] or [features]} of the convs and BatchNorms of a compact student
    whose widths differ from its variant's: what ``widths`` rebuilds it from."""
    reference = dict(CompactStudentModel(model.model_args["arch"], model.model_args["num_classes"],
                                         pretrained_backbone=False).named_modules())
    shape = lambda m: ([m.num_features] if isinstance(m, nn.BatchNorm2d)
                       else [m.in_channels, m.out_channels])
    return {name: shape(m) for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) and shape(m) != shape(reference[name])}
