"""Ready tap names of the CIFAR zoo (``distill_taps``) against RepDistiller's ``forward(x, is_feat=True, preact=...)``.

Each ``reference_*`` below re-computes RepDistiller's feature list step by step from the model's own submodules,
following ``HobbitLong/RepDistiller/models/*.py``: ``feats[0]`` is ``stem``, ``feats[k]`` is ``stage{k}`` (its
``preact=True`` entry ``stage{k}_preact``) and ``feats[-1]`` is ``penultimate``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from functools import cache

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - as RepDistiller writes it
from torch import Tensor, nn

from distkd.distill.taps import FeatureTaps, tap_names
from distkd.models import create_model

Features = tuple[list[Tensor], list[Tensor], Tensor]  # feats (preact=False), their preact=True stages, logits


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    recorded.cache_clear()


def rd_shuffle(x: Tensor, groups: int) -> Tensor:
    """RepDistiller's ShuffleBlock."""
    n, c, h, w = x.size()
    return x.view(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


def reference_resnet(m: nn.Module, x: Tensor) -> Features:
    """``models/resnet.py`` (BasicBlock; ``preact`` is the last block's sum before its ReLU)."""
    x = F.relu(m.bn1(m.conv1(x)))
    feats, pres = [x], []
    for layer in (m.layer1, m.layer2, m.layer3):
        for b in layer:
            out = F.relu(b.bn1(b.conv1(x)))
            out = b.bn2(b.conv2(out))
            pre = out + (x if b.downsample is None else b.downsample(x))
            x = F.relu(pre)
        feats.append(x)
        pres.append(pre)
    flat = F.avg_pool2d(x, 8).view(x.size(0), -1)
    return [*feats, flat], pres, m.fc(flat)


def reference_resnet50(m: nn.Module, x: Tensor) -> Features:
    """``models/resnetv2.py`` (Bottleneck)."""
    x = F.relu(m.bn1(m.conv1(x)))
    feats, pres = [x], []
    for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
        for b in layer:
            out = F.relu(b.bn1(b.conv1(x)))
            out = F.relu(b.bn2(b.conv2(out)))
            pre = b.bn3(b.conv3(out)) + b.shortcut(x)
            x = F.relu(pre)
        feats.append(x)
        pres.append(pre)
    flat = F.adaptive_avg_pool2d(x, (1, 1)).view(x.size(0), -1)
    return [*feats, flat], pres, m.linear(flat)


def reference_wrn(m: nn.Module, x: Tensor) -> Features:
    """``models/wrn.py``: pre-activation blocks; ``preact`` is the BN that follows each stage."""
    out = m.conv1(x)
    feats = [out]
    for stage in (m.block1, m.block2, m.block3):
        for b in stage.layer:
            if b.equal_in_out:
                act = F.relu(b.bn1(out))
                out = torch.add(out, b.conv2(F.relu(b.bn2(b.conv1(act)))))
            else:
                out = F.relu(b.bn1(out))
                out = torch.add(b.convShortcut(out), b.conv2(F.relu(b.bn2(b.conv1(out)))))
        feats.append(out)
    flat = F.avg_pool2d(F.relu(m.bn1(out)), 8).view(out.size(0), -1)
    pres = [m.block2.layer[0].bn1(feats[1]), m.block3.layer[0].bn1(feats[2]), m.bn1(feats[3])]
    return [*feats, flat], pres, m.fc(flat)


def reference_vgg(m: nn.Module, x: Tensor) -> Features:
    """``models/vgg.py`` at 32x32 (no ``pool3``)."""
    x = F.relu(m.block0(x))
    feats, pres = [x], []
    x = m.pool0(x)
    for block, pool in ((m.block1, m.pool1), (m.block2, m.pool2), (m.block3, None), (m.block4, None)):
        x = block(x)
        pres.append(x)
        x = F.relu(x)
        feats.append(x)
        if pool is not None:
            x = pool(x)
    flat = m.pool4(x).view(x.size(0), -1)
    return [*feats, flat], pres, m.classifier(flat)


def reference_mobilenetv2(m: nn.Module, x: Tensor) -> Features:
    """``models/mobilenetv2.py``; its ``preact=True`` returns the same features."""
    out = m.conv1(x)
    feats = [out]
    for i, stage in enumerate(m.blocks):
        out = stage(out)
        if i in (1, 2, 4, 6):
            feats.append(out)
    out = m.conv2(out)
    flat = nn.AvgPool2d(2, ceil_mode=True)(out).view(out.size(0), -1)
    return [*feats, flat], feats[1:], m.classifier(flat)


def reference_shufflev1(m: nn.Module, x: Tensor) -> Features:
    """``models/ShuffleNetv1.py``: ``preact`` is the last block's concatenation/sum before its ReLU."""
    x = F.relu(m.bn1(m.conv1(x)))
    feats, pres = [x], []
    for layer in (m.layer1, m.layer2, m.layer3):
        for b in layer:
            out = rd_shuffle(F.relu(b.bn1(b.conv1(x))), b.conv1.groups)
            out = F.relu(b.bn2(b.conv2(out)))
            out = b.bn3(b.conv3(out))
            res = b.shortcut(x)
            pre = torch.cat([out, res], 1) if b.stride == 2 else out + res
            x = F.relu(pre)
        feats.append(x)
        pres.append(pre)
    flat = F.avg_pool2d(x, 4).view(x.size(0), -1)
    return [*feats, flat], pres, m.linear(flat)


def reference_shufflev2(m: nn.Module, x: Tensor) -> Features:
    """``models/ShuffleNetv2.py``: ``preact`` is cat(kept half, bn3 output) of the last block, not shuffled."""
    x = F.relu(m.bn1(m.conv1(x)))
    feats, pres = [x], []
    for layer in (m.layer1, m.layer2, m.layer3):
        d = layer[0]
        left = F.relu(d.bn2(d.conv2(d.bn1(d.conv1(x)))))
        right = F.relu(d.bn3(d.conv3(x)))
        right = F.relu(d.bn5(d.conv5(d.bn4(d.conv4(right)))))
        x = rd_shuffle(torch.cat([left, right], 1), 2)
        for b in layer[1:]:
            c = int(x.size(1) * 0.5)
            x1, x2 = x[:, :c], x[:, c:]
            out = b.bn2(b.conv2(F.relu(b.bn1(b.conv1(x2)))))
            pre = b.bn3(b.conv3(out))
            x = rd_shuffle(torch.cat([x1, F.relu(pre)], 1), 2)
            pre = torch.cat([x1, pre], 1)
        feats.append(x)
        pres.append(pre)
    out = F.relu(m.bn2(m.conv2(x)))
    flat = F.avg_pool2d(out, 4).view(out.size(0), -1)
    return [*feats, flat], pres, m.linear(flat)


FAMILIES: dict[str, Callable[[nn.Module, Tensor], Features]] = {
    **{f"cifar_resnet{d}": reference_resnet for d in (8, 14, 20, 32, 44, 56, 110, "8x4", "32x4")},
    **{f"cifar_wrn_{d}_{k}": reference_wrn for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))},
    **{f"cifar_vgg{d}": reference_vgg for d in (8, 11, 13, 16, 19)},
    "cifar_mobilenetv2": reference_mobilenetv2,
    "cifar_mobile_half": reference_mobilenetv2,
    "cifar_shufflev1": reference_shufflev1,
    "cifar_shufflev2": reference_shufflev2,
    "cifar_resnet50": reference_resnet50,
}
ZOO = list(FAMILIES)
FOUR_STAGES = {"cifar_vgg8", "cifar_vgg11", "cifar_vgg13", "cifar_vgg16", "cifar_vgg19", "cifar_mobilenetv2",
               "cifar_mobile_half", "cifar_resnet50"}  # fmt: skip

# (number of keys, sha256 of the keys joined by newlines, first 16 hex digits) of each model's state_dict,
# recorded from the zoo before the tap modules were added: RepDistiller's keys, which its checkpoints need.
STATE_DICT_KEYS = {
    "cifar_resnet8": (56, "b90db0829d4f2017"),
    "cifar_resnet14": (92, "91b3eccd11cc4456"),
    "cifar_resnet20": (128, "8b63b6f92921e186"),
    "cifar_resnet32": (200, "307981a729f5b634"),
    "cifar_resnet44": (272, "09ad8b7d3c4c898c"),
    "cifar_resnet56": (344, "fa1effc02561143a"),
    "cifar_resnet110": (668, "aeba6e33283fb472"),
    "cifar_resnet8x4": (62, "ac6a0b237e2a52a6"),
    "cifar_resnet32x4": (206, "9d9d6697a5b9ab5f"),
    "cifar_wrn_16_1": (82, "833fc4075dcd560a"),
    "cifar_wrn_16_2": (83, "b363520407cb2d45"),
    "cifar_wrn_40_1": (226, "9376505eaadaaf51"),
    "cifar_wrn_40_2": (227, "5411682dbe83b6e3"),
    "cifar_vgg8": (37, "165ccf4281e3ed23"),
    "cifar_vgg11": (58, "0aedf0f2f81ab0d9"),
    "cifar_vgg13": (72, "9a32cdc33cc15fde"),
    "cifar_vgg16": (93, "2a47b52049064d03"),
    "cifar_vgg19": (114, "6eae55ef1041a5bc"),
    "cifar_mobilenetv2": (320, "0d96727f34f5ed42"),
    "cifar_mobile_half": (320, "0d96727f34f5ed42"),
    "cifar_shufflev1": (296, "00548d47888a69df"),
    "cifar_shufflev2": (338, "d49bc83fde3c83d1"),
    "cifar_resnet50": (320, "8fcd44aaa73b7095"),
}


def assert_close(actual: Tensor, expected: Tensor, what: str) -> None:
    """Equal up to float32 rounding (pooling may sum in another order), relative to the tensor's scale."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def expected_names(name: str) -> list[str]:
    stages = range(1, 5 if name in FOUR_STAGES else 4)
    return ["stem", *(f"stage{k}" for k in stages), "penultimate", *(f"stage{k}_preact" for k in stages)]


def randomise_batchnorm(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine parameters, so eval-mode BN is not nearly the identity."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0.0, 0.2)


@cache
def recorded(name: str) -> tuple[nn.Module, dict[str, Tensor], Tensor, Features]:
    """The model (eval mode), what each ready name recorded in one forward, its logits, and the reference."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=100).eval()
    with torch.no_grad():
        randomise_batchnorm(model)
    taps = FeatureTaps(model, list(tap_names(model)), "the student")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), taps.recording() as outputs:
        logits = model(x)
    assert all(len(calls) == 1 for calls in outputs.values()), {k: len(v) for k, v in outputs.items()}
    features = {path: calls[0] for path, calls in outputs.items()}
    with torch.no_grad():
        reference = FAMILIES[name](model, x)
    return model, features, logits, reference


@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_model_offers_repdistillers_names(name: str) -> None:
    model = recorded(name)[0]
    names = tap_names(model)
    assert list(names) == expected_names(name)
    assert "logits" not in names
    modules = dict(model.named_modules())
    assert all(path in modules for path in names.values())


@pytest.mark.parametrize("name", ZOO)
def test_taps_equal_repdistillers_features(name: str) -> None:
    _, features, logits, (feats, pres, ref_logits) = recorded(name)
    assert len(feats) == len(pres) + 2
    for k, ref in enumerate(feats):
        tap = "stem" if k == 0 else "penultimate" if k == len(feats) - 1 else f"stage{k}"
        assert features[tap].shape == ref.shape, tap
        assert_close(features[tap], ref, tap)
    for k, ref in enumerate(pres, 1):
        assert features[f"stage{k}_preact"].shape == ref.shape
        assert_close(features[f"stage{k}_preact"], ref, f"stage{k}_preact")
    assert_close(logits, ref_logits, "logits")


@pytest.mark.parametrize("name", ZOO)
def test_penultimate_feeds_the_classifier_exactly(name: str) -> None:
    model, features, logits, _ = recorded(name)
    head = next(getattr(model, attr) for attr in ("fc", "linear", "classifier") if hasattr(model, attr))
    penultimate = features["penultimate"]
    assert penultimate.dim() == 2 and penultimate.shape[0] == 2
    with torch.no_grad():
        assert torch.equal(head(penultimate), logits)


def _relu_gives_stage(name: str) -> Callable[[Tensor], Tensor] | None:
    """How a stage follows from its pre-activation feature; ``None`` where it does not (WRN: BN in between)."""
    if name.startswith("cifar_wrn"):
        return None
    if name in ("cifar_mobilenetv2", "cifar_mobile_half"):
        return lambda pre: pre  # blocks end in a linear projection: RepDistiller's preact features are the same
    if name == "cifar_shufflev2":
        return lambda pre: rd_shuffle(F.relu(pre), 2)  # its preact is taken before the channel shuffle
    return F.relu


@pytest.mark.parametrize("name", [n for n in ZOO if _relu_gives_stage(n) is not None])
def test_stage_is_its_activated_preact(name: str) -> None:
    model, features, _, _ = recorded(name)
    relation = _relu_gives_stage(name)
    assert relation is not None
    stages = [k for k in range(1, 5) if f"stage{k}" in features]
    for k in stages:
        assert torch.equal(relation(features[f"stage{k}_preact"]), features[f"stage{k}"]), k
    if name not in ("cifar_mobilenetv2", "cifar_mobile_half"):  # the preact features do hold negative values
        assert all((features[f"stage{k}_preact"] < 0).any() for k in stages)


def test_wrn_preact_is_the_bn_after_the_stage() -> None:
    model, features, _, _ = recorded("cifar_wrn_16_2")
    with torch.no_grad():
        assert torch.equal(features["stage3_preact"], model.bn1(features["stage3"]))
        assert torch.equal(features["stage1_preact"], model.block2.layer[0].bn1(features["stage1"]))


@pytest.mark.parametrize("name", ZOO)
def test_state_dict_keys_are_unchanged(name: str) -> None:
    keys = list(recorded(name)[0].state_dict())
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
    assert (len(keys), digest) == STATE_DICT_KEYS[name], keys


def test_training_mode_taps_match_the_reference_too() -> None:
    """BatchNorm on batch statistics: the taps still see RepDistiller's features (here a ShuffleNetV2)."""
    torch.manual_seed(0)
    model = create_model("cifar_shufflev2", num_classes=100).train()
    taps = FeatureTaps(model, ["stage2", "stage3_preact", "penultimate"], "the student")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), taps.recording() as outputs:
        logits = model(x)
        feats, pres, ref_logits = reference_shufflev2(model, x)
    assert_close(outputs["stage2"][0], feats[2], "stage2")
    assert_close(outputs["stage3_preact"][0], pres[2], "stage3_preact")
    assert_close(outputs["penultimate"][0], feats[-1], "penultimate")
    assert_close(logits, ref_logits, "logits")


@pytest.mark.parametrize("name", ["timm_resnet18", "tv_resnet18"])
def test_hub_resnets_offer_stages_and_penultimate(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    names = ["stage1", "stage2", "stage3", "stage4", "penultimate"]
    assert list(tap_names(model)) == names
    taps = FeatureTaps(model, names, "the teacher")
    with torch.no_grad(), taps.recording() as outputs:
        logits = model(torch.randn(2, 3, 64, 64))
    shapes = [tuple(outputs[n][0].shape) for n in names[:4]]
    assert shapes == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]
    with torch.no_grad():
        assert torch.equal(model.fc(outputs["penultimate"][0].flatten(1)), logits)
