"""The authors' segmentation protocol (CIRKD / hunto/DIST_KD segmentation): caffe-style BGR normalisation and
mean-colour padding, logits upsampled with align_corners=True, and multi-scale + flip evaluation against a
re-computation written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_data import write_cityscapes

from distkd.cli import main
from distkd.data.base import Split
from distkd.data.loaders import TensorLoader
from distkd.data.segmentation import NORMALISATIONS, EvalTransform, TrainTransform, cityscapes
from distkd.errors import ConfigError
from distkd.models import create_model
from distkd.tasks import segmentation as task

BGR_MEAN = np.array([104.00698793, 116.66876762, 122.67891434])  # CIRKD dataset/cityscapes.py


def test_caffe_normalisation_is_bgr_minus_the_mean_and_pads_with_the_mean_colour(tmp_path) -> None:
    write_cityscapes(tmp_path)
    caffe = NORMALISATIONS["caffe"]
    data = cityscapes(tmp_path, "train", EvalTransform(caffe))
    rgb = np.array(Image.open(data.pairs[0][0]).convert("RGB"), dtype=np.float64)
    np.testing.assert_allclose(data[0][0].permute(1, 2, 0).numpy(), rgb[..., ::-1] - BGR_MEAN, atol=1e-4)
    small = TrainTransform(crop_size=(40, 80), scale_range=(0.5, 0.5), flip=False, norm=caffe)
    image, label = cityscapes(tmp_path, "train", small)[0]  # 32x64 scaled to 16x32, padded to 40x80
    assert torch.all(label[16:] == 255) and torch.all(image[:, 16:].abs() < 1e-4)  # the mean colour, normalised: 0


def _miou(pred: np.ndarray, target: np.ndarray, classes: int) -> float:
    keep = target != 255
    m = np.bincount(classes * target[keep] + pred[keep], minlength=classes * classes).reshape(classes, classes)
    inter, union = np.diag(m), m.sum(0) + m.sum(1) - np.diag(m)
    return float(100 * np.mean(inter[union > 0] / union[union > 0]))


def test_multi_scale_flip_evaluation_matches_a_recomputation() -> None:
    torch.manual_seed(0)
    model = create_model("seg_pspnet_tiny", num_classes=4, in_chans=1).eval()
    images = torch.randint(0, 256, (3, 1, 40, 56), dtype=torch.uint8)
    labels = torch.randint(0, 4, (3, 40, 56))
    labels[:, :3] = 255
    loader = TensorLoader(Split(images, labels), batch_size=2, mean=(0.5,), std=(0.25,))
    scales = (0.5, 1.0, 1.5)
    got = task.evaluate(model, loader, scales=scales, flip=True)
    preds = []
    with torch.no_grad():
        for i in range(3):
            x = (images[i : i + 1].double() / 255 - 0.5) / 0.25
            total = torch.zeros(1, 4, 40, 56, dtype=torch.float64)
            for s in scales:
                xs = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=True) if s != 1 else x
                for mirror in (False, True):
                    out = model((xs.flip(-1) if mirror else xs).float())["out"].double()
                    up = F.interpolate(out, size=(40, 56), mode="bilinear", align_corners=True)
                    total += up.flip(-1) if mirror else up
            preds.append(total.argmax(1)[0].numpy())
    want = _miou(np.stack(preds).ravel(), labels.numpy().ravel(), 4)
    assert got["miou"] == pytest.approx(want, abs=1e-6)
    single = task.evaluate(model, loader)
    assert task.evaluate(model, loader, scales=(1.0,), flip=False) == single
    assert got != single  # the options change the prediction
    with pytest.raises(ConfigError, match="evaluation scales must be positive"):
        task.evaluate(model, loader, scales=(0.0,))


def test_the_loss_upsamples_with_align_corners_as_the_authors() -> None:
    gen = torch.Generator().manual_seed(0)
    logits, target = torch.randn(2, 3, 4, 5, generator=gen), torch.randint(0, 3, (2, 32, 40), generator=gen)
    want = F.cross_entropy(F.interpolate(logits, size=(32, 40), mode="bilinear", align_corners=True), target)
    other = F.cross_entropy(F.interpolate(logits, size=(32, 40), mode="bilinear", align_corners=False), target)
    got = task._upsampled_ce(logits, target)
    assert torch.allclose(got, want) and not torch.allclose(got, other)


def test_scales_and_flip_are_refused_for_classification_and_bad_normalisation_in_one_line(capsys) -> None:
    argv = ["eval", "demo/student.yaml", "model.checkpoint=/nowhere.pt", "--scales", "0.5", "1.0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--scales/--flip (multi-scale and flip evaluation) are for segmentation" in err and err.count("\n") == 1
    with pytest.raises(ConfigError, match="data.kwargs.normalise must be one of imagenet, caffe, got 'bgr'"):
        task._files(_cfg({"normalise": "bgr"}), 0)
    with pytest.raises(ConfigError, match="data.kwargs scale not read by dataset 'cityscapes'"):
        task._files(_cfg({"scale": 2}), 0)


def _cfg(kwargs: dict):  # noqa: ANN202 - a DataConfig
    from distkd.config import DataConfig

    return DataConfig(name="cityscapes", root="/nowhere", kwargs=kwargs)
