"""Structural channel pruning of a compact student: channels removed, not zeroed.

``prune_channels`` runs Torch-Pruning (Fang et al., "DepGraph: Towards Any Structural
Pruning", CVPR 2023): its dependency graph groups every set of channels that must go
together (a residual sum, a concatenation, a depthwise conv and the pointwise convs around
it, a squeeze-excitation pair), and each group loses the same fraction of its channels, those
with the smallest L2 norm. The classifier keeps its 21 outputs and the input its 3 channels.

The result is rebuilt as a plain ``CompactStudentModel(widths=...)`` from the pruned layers'
widths and loaded with their weights: what a checkpoint holds (a state dict and model_args),
never a pickled module, and what ``nets.model_from_checkpoint`` rebuilds in any process.
torch_pruning is needed only here (requirements-optional.txt), never to load the result.
"""
import copy

import torch
from torch import nn

from cli import UserError
from nets import STUDENT_ARCHS, build_model
from student_model import layer_widths


def prune_channels(model, sparsity, example=None):
    """A copy of the compact student ``model`` with ``sparsity`` of the channels of every
    coupled group removed (L2 magnitude), rebuilt from its widths; ``model`` is untouched."""
    import torch_pruning as tp

    arch = model.model_args["arch"]
    if arch not in STUDENT_ARCHS:
        raise UserError(f"channel pruning handles the compact students ({', '.join(STUDENT_ARCHS)})"
                        f", not {arch}; pass a checkpoint of one")
    pruned = copy.deepcopy(model).eval()
    example = torch.randn(1, 3, 128, 128) if example is None else example
    pruner = tp.pruner.MagnitudePruner(
        pruned, example, importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=sparsity, ignored_layers=[pruned.classifier])
    pruner.step()
    rebuilt = build_model(arch, model.model_args["num_classes"], widths=layer_widths(pruned))
    # strict: a layer Torch-Pruning resized that the widths did not record fails here
    rebuilt.load_state_dict(pruned.state_dict())
    return rebuilt.train(model.training)


def removed_channel_fraction(model, pruned):
    """Fraction of the output channels of the convs (classifier aside) that pruning removed."""
    def channels(m):
        convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)][:-1]
        return sum(c.out_channels for c in convs)
    return 1 - channels(pruned) / channels(model)
