"""Dataset-level mIoU: a hand-made confusion matrix, torchmetrics, and the evaluation loop."""
import math

import pytest
import torch
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassJaccardIndex
from torchmetrics.functional.classification import multiclass_confusion_matrix

from data import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from engine import evaluate
from metrics import confusion_matrix, scores_from_confusion


def test_scores_on_a_hand_made_confusion_matrix():
    # 3 classes; truth and prediction chosen so every count is known
    target = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 255, 255])
    pred = torch.tensor([0, 0, 1, 2, 1, 1, 0, 2, 1, 2, 0])
    cm = confusion_matrix(pred, target, 3)
    expected = torch.tensor([[2, 1, 1],
                             [1, 2, 0],
                             [0, 1, 1]])
    assert torch.equal(cm, expected)
    s = scores_from_confusion(cm)
    # IoU_c = TP / (row + column - TP)
    iou = [2 / (4 + 3 - 2), 2 / (3 + 4 - 2), 1 / (2 + 2 - 1)]
    assert s["per_class_iou"] == pytest.approx(iou)
    assert s["miou"] == pytest.approx(sum(iou) / 3)
    assert s["pixel_accuracy"] == pytest.approx(5 / 9)
    assert s["mean_class_accuracy"] == pytest.approx((2 / 4 + 2 / 3 + 1 / 2) / 3)


def test_absent_class_is_undefined_and_left_out_of_the_mean():
    cm = torch.tensor([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    s = scores_from_confusion(cm)
    assert math.isnan(s["per_class_iou"][2]) and math.isnan(s["per_class_accuracy"][2])
    assert s["miou"] == pytest.approx((5 / 8 + 3 / 6) / 2)


def test_ignored_pixels_are_ignored():
    target = torch.tensor([[1, 255], [0, 255]])
    a = confusion_matrix(torch.tensor([[1, 0], [0, 0]]), target, 3)
    b = confusion_matrix(torch.tensor([[1, 2], [0, 1]]), target, 3)
    assert torch.equal(a, b) and a.sum() == 2


def test_accumulated_matrix_equals_torchmetrics_jaccard():
    g = torch.Generator().manual_seed(0)
    reference = MulticlassJaccardIndex(21, average="macro", ignore_index=IGNORE_INDEX)
    per_class = MulticlassJaccardIndex(21, average="none", ignore_index=IGNORE_INDEX)
    total = torch.zeros(21, 21, dtype=torch.int64)
    for step in range(5):
        # uneven batches; classes 15-20 never occur, 255 scattered through the truth
        target = torch.randint(0, 15, (2, 17 + step, 23), generator=g)
        target[torch.rand(target.shape, generator=g) < 0.1] = IGNORE_INDEX
        pred = torch.where(torch.rand(target.shape, generator=g) < 0.6, target.clamp(max=14),
                           torch.randint(0, 15, target.shape, generator=g))
        total += confusion_matrix(pred, target, 21)
        reference.update(pred, target)
        per_class.update(pred, target)
    s = scores_from_confusion(total)
    assert s["miou"] == pytest.approx(float(reference.compute()), abs=1e-6)
    ours = torch.tensor(s["per_class_iou"][:15], dtype=torch.float64)
    assert torch.allclose(ours, per_class.compute()[:15].double(), atol=1e-6)


class _FixedPredictor(torch.nn.Module):
    """Returns one-hot logits of a stored prediction per call, in order."""

    def __init__(self, preds):
        super().__init__()
        self.preds = preds
        self.calls = 0

    def forward(self, x):
        pred = self.preds[min(self.calls, len(self.preds) - 1)]
        self.calls += 1
        return {"out": torch.nn.functional.one_hot(pred, 21).permute(2, 0, 1)[None].float()}


def test_evaluate_scores_the_whole_set_not_an_average_of_images():
    g = torch.Generator().manual_seed(1)
    targets = [torch.randint(0, 4, (9, 11), generator=g), torch.randint(0, 2, (30, 20), generator=g)]
    preds = [torch.randint(0, 4, t.shape, generator=g) for t in targets]
    loader = DataLoader(list(zip([torch.zeros(3, *t.shape, dtype=torch.uint8) for t in targets],
                                 targets)), batch_size=1)
    # no warm-up calls, so the model hands out the predictions in order
    results = evaluate(_FixedPredictor(preds), loader, torch.device("cpu"), warmup=0, progress=False,
                       per_image=True)
    reference = MulticlassJaccardIndex(21, average="macro", ignore_index=IGNORE_INDEX)
    for p, t in zip(preds, targets):
        reference.update(p, t)
    assert results["miou"] == pytest.approx(float(reference.compute()), abs=1e-6)
    per_image_mean = sum(results["per_image_miou"]) / 2
    assert abs(per_image_mean - results["miou"]) > 1e-3  # the two rules really differ here
    assert results["num_images"] == 2 and results["ms_per_image"] > 0


class _InputIsThePrediction(torch.nn.Module):
    """Logits that predict the class written in channel 0 of each pixel (the uint8 value
    that ``data.to_model_input`` normalised)."""

    def forward(self, x):
        value = ((x[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255).round().long()
        return torch.nn.functional.one_hot(value, 21).permute(0, 3, 1, 2).float()


def test_batched_evaluation_counts_each_image_and_per_image_scores_come_on_request():
    """One confusion matrix per batch (images of one size batch together): the same whole-set
    matrix as torchmetrics over the images, and per-image lists only when asked for."""
    g = torch.Generator().manual_seed(2)
    targets = torch.randint(0, 5, (4, 6, 7), generator=g)
    wrong = torch.randint(0, 5, (4, 6, 7), generator=g)
    preds = torch.where(torch.rand(4, 6, 7, generator=g) < 0.7, targets, wrong)
    targets[0, 0, :3] = IGNORE_INDEX
    images = preds[:, None].repeat(1, 3, 1, 1).to(torch.uint8)  # as the loaders send them
    loader = DataLoader(list(zip(images, targets)), batch_size=2)
    plain = evaluate(_InputIsThePrediction(), loader, torch.device("cpu"), warmup=0, progress=False)
    both = evaluate(_InputIsThePrediction(), loader, torch.device("cpu"), warmup=0, progress=False,
                    per_image=True)
    reference = torch.zeros(21, 21, dtype=torch.int64)
    for p, t in zip(preds, targets):
        reference += multiclass_confusion_matrix(p, t, 21, ignore_index=IGNORE_INDEX)
    assert plain["confusion_matrix"] == reference.tolist() == both["confusion_matrix"]
    assert plain["num_images"] == both["num_images"] == 4
    assert "per_image_miou" not in plain and len(both["per_image_miou"]) == 4
    assert 0 < plain["model_seconds"]
