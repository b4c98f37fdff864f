import sys
import urllib.error
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli import UserError  # noqa: E402
from distill import FeatureAdapters  # noqa: E402
from student_model import CompactStudentModel  # noqa: E402

# The strides the module docstring claims for each tap.
CLAIMED = {"low": (24, 8), "mid": (40, 16), "high": (576, 16)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The models are tiny at these sizes; on a shared 2-core machine intra-op threads only
    # wait on each other (a 2 s file took 30 s under load), so run single-threaded here.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {v: CompactStudentModel(v, num_classes=21, pretrained_backbone=False).eval()
            for v in ("lite", "lab")}


@pytest.mark.parametrize("variant", ["lite", "lab"])
@pytest.mark.parametrize("hw", [(333, 500), (65, 47)])
def test_logits_match_odd_input_sizes(models, variant, hw):
    with torch.no_grad():
        out = models[variant](torch.randn(1, 3, *hw))
    assert out.shape == (1, 21, *hw)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("variant", ["lite", "lab"])
def test_feature_channels_and_measured_strides(models, variant):
    with torch.no_grad():
        _, feats = models[variant](torch.randn(1, 3, 256, 256), return_features=True)
    assert set(feats) == set(CLAIMED)
    for name, (channels, stride) in CLAIMED.items():
        assert CompactStudentModel.FEATURE_CHANNELS[name] == channels
        assert feats[name].shape == (1, channels, 256 // stride, 256 // stride), name


def test_parameter_budget(models):
    lite, lab = n_params(models["lite"]), n_params(models["lab"])
    # the exact counts the module docstring gives (num_classes=21, all used at inference)
    assert (lite, lab) == (1_298_981, 6_831_637)


def test_model_args_and_num_classes():
    model = CompactStudentModel("lite", num_classes=5, pretrained_backbone=False).eval()
    assert model.model_args == {"arch": "lite", "num_classes": 5}
    with torch.no_grad():
        assert model(torch.randn(1, 3, 40, 56)).shape == (1, 5, 40, 56)
    with pytest.raises(ValueError, match="unknown variant"):
        CompactStudentModel("huge", pretrained_backbone=False)


@pytest.mark.parametrize("variant", ["lite", "lab"])
def test_return_features_does_not_change_logits(models, variant):
    x = torch.randn(2, 3, 97, 81)
    with torch.no_grad():
        plain = models[variant](x)
        logits, _ = models[variant](x, return_features=True)
    torch.testing.assert_close(plain, logits, rtol=0, atol=0)


@pytest.mark.parametrize("batch", [1, 2])
def test_train_mode_runs_and_backprops_into_backbone(batch):
    torch.manual_seed(0)
    model = CompactStudentModel("lite", num_classes=21, pretrained_backbone=False).train()
    x = torch.randn(batch, 3, 64, 72)
    target = torch.randint(0, 21, (batch, 64, 72))
    logits, feats = model(x, return_features=True)
    loss = torch.nn.functional.cross_entropy(logits, target) + feats["mid"].pow(2).mean()
    loss.backward()
    first_conv = model.backbone[0][0]
    assert isinstance(first_conv, torch.nn.Conv2d) and first_conv.in_channels == 3
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0


def test_feature_adapters_map_channels_outside_student(models):
    teacher = {"low": 256, "mid": 512, "high": 2048}
    student = models["lite"]
    adapters = FeatureAdapters(CompactStudentModel.FEATURE_CHANNELS, teacher)
    with torch.no_grad():
        _, feats = student(torch.randn(1, 3, 64, 64), return_features=True)
        mapped = adapters(feats)
    for name, ch in teacher.items():
        assert mapped[name].shape == (1, ch, *feats[name].shape[-2:])
    assert all(conv.bias is not None and conv.kernel_size == (1, 1)
               for conv in adapters.adapters.values())
    # adapters are training-only: nothing of theirs may leak into the student's checkpoint
    student_keys = set(student.state_dict())
    assert not any("adapter" in key for key in student_keys)
    adapter_ids = {id(p) for p in adapters.parameters()}
    assert not adapter_ids & {id(p) for p in student.parameters()}
    assert len(student_keys) == len(CompactStudentModel("lite", pretrained_backbone=False).state_dict())


def test_pretrained_download_failure_is_one_line_naming_the_hub_file(monkeypatch, tmp_path):
    """Offline, the backbone request stops with the file to place in the hub cache (no
    silent random init, which a later reader of the run could not tell apart)."""
    import torchvision.models._api as tv_api

    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("no network in test")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(UserError) as err:
        CompactStudentModel("lite", num_classes=21, pretrained_backbone=True)
    message = str(err.value)
    assert calls and "mobilenet_v3_small" in calls[0]
    assert "\n" not in message and "no network in test" in message
    assert f"copy mobilenet_v3_small-047dcff4.pth into {tmp_path / 'hub' / 'checkpoints'}" in message
    assert "--no-pretrained-backbone" in message

    # pretrained_backbone=False must not even try
    with torch.no_grad():
        model = CompactStudentModel("lite", pretrained_backbone=False).eval()
        assert model(torch.randn(1, 3, 48, 48)).shape == (1, 21, 48, 48)
    assert len(calls) == 1
