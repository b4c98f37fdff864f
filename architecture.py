"""The student's architecture as a table of blocks, read from the modules themselves.

Each row is one module of the network (an encoder stage, an ASPP branch, a decoder block,
the classifier, an adapter): its operator, kernel, stride and dilation (read from its
Conv2d layers), channels in and out and output size (measured by forward hooks on a
forward pass at the stated input size), and its parameters. The rows are disjoint
subtrees of the module tree that together hold every parameter, so their sum is
``count_params`` by construction, not by subtraction from a total.

    python architecture.py --student lite --size 520
    python architecture.py --student lab --size 512 683 --adapters
"""
import argparse
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from cli import HelpFormatter, UserError, markdown_table, run_cli
from compute import count_params

STUDENTS = ("lite", "lab")

# Where the tree is split into rows: these containers are expanded into their children,
# every other module is one row. A module path not listed here is a leaf row.
_SPLIT = {"", "backbone", "aspp", "aspp.branches", "refine", "adapters"}

# The part of the network a row belongs to, by the first component of its module path.
_PARTS = {"backbone": "encoder", "aspp": "aspp", "skip": "decoder", "refine": "decoder",
          "classifier": "head", "adapters": "adapters"}

# Leaf layers named in an operator description; layers not named (SE internals) are skipped.
_LEAF_NAMES = {nn.BatchNorm2d: "BN", nn.ReLU: "ReLU", nn.Hardswish: "hardswish",
               nn.AdaptiveAvgPool2d: "global average pool"}

CITATIONS = {
    "mobilenetv3": "A. Howard, M. Sandler, G. Chu, L.-C. Chen, B. Chen, M. Tan, W. Wang, Y. Zhu, "
                   "R. Pang, V. Vasudevan, Q. V. Le, H. Adam. Searching for MobileNetV3. "
                   "In Proc. IEEE/CVF International Conference on Computer Vision (ICCV), "
                   "pp. 1314-1324, 2019.",
    "deeplab_aspp": "L.-C. Chen, G. Papandreou, F. Schroff, H. Adam. Rethinking Atrous "
                    "Convolution for Semantic Image Segmentation. arXiv:1706.05587, 2017 "
                    "(DeepLabV3: ASPP with rates 6, 12, 18 and image pooling).",
    "deeplabv3plus": "L.-C. Chen, Y. Zhu, G. Papandreou, F. Schroff, H. Adam. Encoder-Decoder "
                     "with Atrous Separable Convolution for Semantic Image Segmentation. "
                     "In Proc. European Conference on Computer Vision (ECCV), pp. 801-818, 2018.",
    "hinton": "G. Hinton, O. Vinyals, J. Dean. Distilling the Knowledge in a Neural Network. "
              "NIPS Deep Learning and Representation Learning Workshop, 2014; "
              "arXiv:1503.02531, 2015.",
    "fitnets": "A. Romero, N. Ballas, S. E. Kahou, A. Chassang, C. Gatta, Y. Bengio. FitNets: "
               "Hints for Thin Deep Nets. In International Conference on Learning "
               "Representations (ICLR), 2015.",
    "overhaul": "B. Heo, J. Kim, S. Yun, H. Park, N. Kwak, J. Y. Choi. A Comprehensive Overhaul "
                "of Feature Distillation. In Proc. IEEE/CVF International Conference on "
                "Computer Vision (ICCV), pp. 1921-1930, 2019.",
    "skd": "Y. Liu, K. Chen, C. Liu, Z. Qin, Z. Luo, J. Wang. Structured Knowledge Distillation "
           "for Semantic Segmentation. In Proc. IEEE/CVF Conference on Computer Vision and "
           "Pattern Recognition (CVPR), pp. 2604-2613, 2019.",
    "attention_transfer": "S. Zagoruyko, N. Komodakis. Paying More Attention to Attention: "
                          "Improving the Performance of Convolutional Neural Networks via "
                          "Attention Transfer. In International Conference on Learning "
                          "Representations (ICLR), 2017.",
    "cwd": "C. Shu, Y. Liu, J. Gao, Z. Yan, C. Shen. Channel-wise Knowledge Distillation for "
           "Dense Prediction. In Proc. IEEE/CVF International Conference on Computer Vision "
           "(ICCV), pp. 5311-5320, 2021.",
    "fcn": "J. Long, E. Shelhamer, T. Darrell. Fully Convolutional Networks for Semantic "
           "Segmentation. In Proc. IEEE Conference on Computer Vision and Pattern Recognition "
           "(CVPR), pp. 3431-3440, 2015.",
}


@dataclass(frozen=True)
class Block:
    """One row of the architecture table (see the module docstring)."""
    name: str
    part: str
    operator: str
    kernel: Optional[int]
    stride: Optional[int]
    dilation: Optional[int]
    c_in: int
    c_out: int
    out_size: Optional[tuple]
    params: int


def build_student(name):
    """The compact student 'lite' or 'lab' with random weights (no download), in eval mode."""
    if name not in STUDENTS:
        raise UserError(f"unknown student {name!r}; choose one of {', '.join(STUDENTS)}")
    from student_model import CompactStudentModel
    return CompactStudentModel(variant=name, pretrained_backbone=False).eval()


def build_adapters(teacher="fcn_resnet50"):
    """The training-only 1x1 adapters from the student's taps to ``teacher``'s widths."""
    from distill import FeatureAdapters, feature_channels
    from student_model import CompactStudentModel
    return FeatureAdapters(CompactStudentModel.FEATURE_CHANNELS, feature_channels(teacher))


def _row_modules(module, prefix=""):
    """[(path, module)] of the rows: containers in _SPLIT expanded into their children."""
    if prefix not in _SPLIT:
        return [(prefix, module)]
    own = [n for n, _ in module.named_parameters(recurse=False)]
    if own:  # a split container's own parameters would belong to no row
        raise ValueError(f"module {prefix or 'root'!r} holds parameters {own} itself; "
                         "make it a row (remove it from architecture._SPLIT)")
    rows = []
    for child_name, child in module.named_children():
        rows += _row_modules(child, f"{prefix}.{child_name}" if prefix else child_name)
    return rows


def _convs(module):
    """The Conv2d layers of ``module`` outside squeeze-excitation gates (whose 1x1 convs
    act on a pooled 1x1 vector, not on the feature map), in registration order."""
    inside = _gated(module)
    return [m for m in module.modules() if isinstance(m, nn.Conv2d) and id(m) not in inside]


def _gated(module):
    """ids of the layers inside ``module``'s squeeze-excitation gates (torchvision's)."""
    gates = [m for m in module.modules() if type(m).__name__ == "SqueezeExcitation"]
    return {id(layer) for gate in gates for layer in gate.modules()}


def _spatial_conv(convs):
    """The conv whose kernel, stride and dilation the row shows: the depthwise one when the
    block has one (it carries the block's stride and dilation), else the first."""
    depthwise = [c for c in convs if c.groups > 1 and c.groups == c.in_channels]
    return (depthwise or convs)[0] if convs else None


def _conv_name(conv):
    return "depthwise conv" if conv.groups > 1 and conv.groups == conv.in_channels else "conv"


def _operator(module):
    """A short description of what ``module`` computes, read from its layers."""
    kind = type(module).__name__
    if kind == "InvertedResidual":
        gated, convs = _gated(module), _convs(module)
        acts = {_LEAF_NAMES[type(m)] for m in module.modules()
                if type(m) in (nn.ReLU, nn.Hardswish) and id(m) not in gated}
        words = ["inverted residual"]
        if len(convs) == 3:  # 1x1 expand, depthwise, 1x1 project (block 1 has no expansion)
            words.append(f"expand to {convs[0].out_channels}")
        words += ["SE"] if gated else []
        words += sorted(acts)
        words += ["residual add"] if getattr(module, "use_res_connect", False) else []
        return ", ".join(words)
    words = []
    for leaf in module.modules():
        if isinstance(leaf, nn.Conv2d):
            words.append(_conv_name(leaf) + ("" if leaf.bias is None else " (bias)"))
        elif isinstance(leaf, nn.Dropout):
            words.append(f"dropout {leaf.p:g}")
        elif type(leaf) in _LEAF_NAMES:
            words.append(_LEAF_NAMES[type(leaf)])
    return ", ".join(words) or kind


def _measure(model, rows, image_size):
    """{path: (c_in, c_out, (h, w))} for every row that runs in one forward pass of a
    1 x 3 x H x W input, by forward hooks (the first call of each module)."""
    seen, handles = {}, []

    def hook(path):
        def record(module, inputs, output):
            if path not in seen and torch.is_tensor(output) and output.dim() == 4:
                seen[path] = (inputs[0].shape[1], output.shape[1], tuple(output.shape[-2:]))
        return record

    for path, module in rows:
        handles.append(module.register_forward_hook(hook(path)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            device = next(model.parameters()).device  # a model already on a GPU runs there
            model(torch.zeros(1, 3, *image_size, device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return seen


def _block(path, module, part, measured, tap=None):
    convs = _convs(module)
    conv = _spatial_conv(convs)
    if path in measured:
        c_in, c_out, size = measured[path]
    elif convs:  # off the forward path (adapters): channels from the convs themselves
        c_in, c_out, size = convs[0].in_channels, convs[-1].out_channels, None
    else:
        return None  # no conv, not run: nothing to show
    operator = _operator(module) + (f"; tap '{tap}'" if tap else "")
    return Block(name=path, part=part, operator=operator,
                 kernel=conv.kernel_size[0] if conv else None,
                 stride=conv.stride[0] if conv else None,
                 dilation=conv.dilation[0] if conv else None,
                 c_in=int(c_in), c_out=int(c_out), out_size=size, params=count_params(module))


def block_table(model, image_size=(520, 520), adapters=None):
    """The rows of ``model`` (a compact student) and, when given, of its FeatureAdapters.

    ``out_size`` is measured for a 1 x 3 x H x W input, ``image_size`` = (H, W); adapters
    run only in training on the taps, so their ``out_size`` is None. Kernel, stride and
    dilation are those of the block's depthwise conv when it has one, else of its first
    conv (squeeze-excitation convs excluded); None for a block without a conv.
    """
    if len(image_size) != 2 or min(image_size) < 1:
        raise UserError(f"image size {tuple(image_size)} is not (H, W) with H, W >= 1; "
                        "pass two positive integers")
    rows = _row_modules(model)
    measured = _measure(model, rows, tuple(image_size))
    # the student's feature taps by module path, named in the operator ("tap 'low'")
    taps = {f"backbone.{i}": tap for i, tap in getattr(model, "_taps", {}).items()}
    blocks = [_block(path, module, _PARTS.get(path.split(".")[0], "other"), measured,
                     taps.get(path)) for path, module in rows]
    if adapters is not None:
        blocks += [_block(path, module, "adapters", {}) for path, module in _row_modules(adapters)]
    return [b for b in blocks if b is not None]


def _cell(value):
    return "–" if value is None else str(value)


def markdown_rows(blocks):
    """(header, rows) of strings for ``cli.markdown_table`` or a typst table."""
    header = ("block", "part", "operator", "kernel", "stride", "dilation", "channels",
              "output size", "parameters")
    rows = [(b.name, b.part, b.operator, _cell(b.kernel), _cell(b.stride), _cell(b.dilation),
             f"{b.c_in} → {b.c_out}", "–" if b.out_size is None else "×".join(map(str, b.out_size)),
             f"{b.params:,}") for b in blocks]
    return header, rows


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--student", default="lite", choices=STUDENTS, help="the compact student")
    parser.add_argument("--size", type=int, nargs="+", default=[520], metavar="N",
                        help="input size: one number (square) or H W")
    parser.add_argument("--adapters", action="store_true",
                        help="add the training-only feature adapters to fcn_resnet50's widths")
    return parser


def main(args):
    if len(args.size) not in (1, 2):
        raise UserError(f"--size takes one or two numbers, got {len(args.size)}; e.g. --size 520")
    size = tuple(args.size) * (3 - len(args.size))
    model = build_student(args.student)
    adapters = build_adapters() if args.adapters else None
    blocks = block_table(model, size, adapters)
    print(markdown_table(*markdown_rows(blocks)))
    inference = sum(b.params for b in blocks if b.part != "adapters")
    print(f"\n{args.student}: {inference:,} inference parameters (count_params: "
          f"{count_params(model):,}) at input {size[0]}×{size[1]}")
    if adapters is not None:
        print(f"adapters (training only): {count_params(adapters):,} parameters")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
