"""Cityscapes and Pascal VOC 2012 segmentation readers with joint (image, label) transforms.

A reader is a map-style dataset of file pairs; item ``i`` is ``(image float (3, H, W) normalised, label int64
(H, W))`` with ignored pixels = 255. Normalisation (:data:`NORMALISATIONS`): ``imagenet`` (RGB, torchvision's
mean/std) or ``caffe`` (the DIST authors' and CIRKD's: BGR channel order, mean (104.008, 116.669, 122.679)
subtracted on the [0, 255] scale, no division), which the weights they release expect. Training
augmentation (random scale 0.5-2.0, random crop with padding, horizontal flip) draws from a ``torch.Generator``
seeded from (``seed``, epoch, index), so an item is the same whatever the number of loader workers; call
``set_epoch`` each epoch for fresh augmentation. Evaluation uses full images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from distkd.errors import DataError

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CITYSCAPES_CROP = (512, 1024)  # training crop (H, W) of the DIST/CIRKD Cityscapes recipe
VOC_CROP = (512, 512)

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
CITYSCAPES_TRAIN_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

Transform = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def label_lut(mapping: dict[int, int]) -> torch.Tensor:
    """A 256-entry int64 lookup table: stored value -> train id, everything unmapped -> 255."""
    lut = torch.full((256,), IGNORE_INDEX, dtype=torch.int64)
    for stored, train_id in mapping.items():
        lut[stored] = train_id
    return lut


CITYSCAPES_LUT = label_lut({label_id: i for i, label_id in enumerate(CITYSCAPES_TRAIN_LABEL_IDS)})
VOC_LUT = label_lut({i: i for i in range(len(VOC_CLASSES))})


@dataclass(frozen=True)
class Normalisation:
    """How an RGB image on the [0, 255] scale becomes a model input: ``bgr`` reverses the channels first;
    ``mean`` and ``std`` (on the [0, 255] scale, in the input's channel order) standardise each channel;
    ``pad`` is the RGB colour a scaled image smaller than the crop is padded with."""

    bgr: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pad: tuple[float, float, float]


CAFFE_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)
NORMALISATIONS: dict[str, Normalisation] = {
    "imagenet": Normalisation(False, tuple(255.0 * m for m in IMAGENET_MEAN),  # type: ignore[arg-type]
                              tuple(255.0 * s for s in IMAGENET_STD), (0.0, 0.0, 0.0)),  # type: ignore[arg-type]
    # CIRKD/DIST dataset/cityscapes.py: cv2 (BGR) pixels minus the mean; padded after it, i.e. with the mean colour
    "caffe": Normalisation(True, CAFFE_BGR_MEAN, (1.0, 1.0, 1.0), CAFFE_BGR_MEAN[::-1]),
}


def normalize(image: torch.Tensor, norm: Normalisation) -> torch.Tensor:
    """RGB (3, H, W) on the [0, 255] scale -> float (3, H, W) as ``norm`` says."""
    x = image.float()
    if norm.bgr:
        x = x.flip(0)
    return (x - torch.tensor(norm.mean).view(-1, 1, 1)) / torch.tensor(norm.std).view(-1, 1, 1)


class EvalTransform:
    """Full image, normalised: ``(uint8 (3, H, W), int64 (H, W), gen) -> (float (3, H, W), int64 (H, W))``."""

    def __init__(self, norm: Normalisation = NORMALISATIONS["imagenet"]) -> None:
        self.norm = norm

    def __call__(self, image: torch.Tensor, label: torch.Tensor,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return normalize(image, self.norm), label


class TrainTransform:
    """Random scale, pad, random crop and horizontal flip of an (image, label) pair, then normalise.

    ``(uint8 (3, H, W), int64 (H, W), gen) -> (float (3, ch, cw), int64 (ch, cw))`` with
    ``crop_size = (ch, cw)``. The image is resized bilinearly, the label by nearest neighbour; when the
    scaled pair is smaller than the crop, the image is padded with ``norm.pad`` (black for ``imagenet``, the
    mean colour for ``caffe``) and the label with ``ignore_index`` on the bottom/right.
    """

    def __init__(self, crop_size: tuple[int, int], scale_range: tuple[float, float] = (0.5, 2.0),
                 flip: bool = True, norm: Normalisation = NORMALISATIONS["imagenet"],
                 ignore_index: int = IGNORE_INDEX) -> None:
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scale_range = scale_range
        self.flip = flip
        self.norm = norm
        self.ignore_index = ignore_index

    def __call__(self, image: torch.Tensor, label: torch.Tensor,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = self.scale_range
        scale = low + (high - low) * float(torch.rand((), generator=gen))
        size = (max(1, round(image.shape[-2] * scale)), max(1, round(image.shape[-1] * scale)))
        img = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        lab = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
        ch, cw = self.crop_size
        pad_h, pad_w = max(ch - size[0], 0), max(cw - size[1], 0)
        if pad_h or pad_w:
            colour = torch.tensor(self.norm.pad).view(3, 1, 1)
            img = F.pad(img - colour, (0, pad_w, 0, pad_h), value=0.0) + colour
            lab = F.pad(lab, (0, pad_w, 0, pad_h), value=self.ignore_index)
        top = int(torch.randint(0, img.shape[-2] - ch + 1, (), generator=gen))
        left = int(torch.randint(0, img.shape[-1] - cw + 1, (), generator=gen))
        img, lab = img[:, top : top + ch, left : left + cw], lab[top : top + ch, left : left + cw]
        if self.flip and float(torch.rand((), generator=gen)) < 0.5:
            img, lab = img.flip(-1), lab.flip(-1)
        return normalize(img, self.norm), lab.contiguous()


def read_image(path: Path) -> torch.Tensor:
    """An RGB image file as uint8 (3, H, W)."""
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()


def read_label(path: Path, lut: torch.Tensor, palette: bool) -> torch.Tensor:
    """A label PNG as train ids int64 (H, W) through ``lut``; ``palette`` requires a mode-P PNG (VOC)."""
    with Image.open(path) as im:
        allowed = ("P",) if palette else ("L", "P")
        if im.mode not in allowed:
            kind = "palette (mode P) PNGs" if palette else "single-channel id PNGs"
            raise DataError(f"label '{path}' has PIL mode {im.mode}; labels must be {kind}, as distributed")
        return lut[torch.from_numpy(np.array(im)).long()]


class SegmentationFiles(Dataset):
    """(image, label) file pairs read on access; ``transform`` gets a per-item seeded generator."""

    def __init__(self, pairs: list[tuple[Path, Path]], lut: torch.Tensor, palette: bool, transform: Transform,
                 classes: tuple[str, ...], seed: int = 0) -> None:
        self.pairs = pairs
        self.lut = lut
        self.palette = palette
        self.transform = transform
        self.classes = classes
        self.seed = seed
        self.epoch = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        """Use a fresh augmentation stream for ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def generator(self, index: int) -> torch.Generator:
        """The generator item ``index`` is augmented with in the current epoch."""
        return torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index) % 2**63)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        label = read_label(label_path, self.lut, self.palette)
        if image.shape[-2:] != label.shape:
            raise DataError(f"image '{image_path}' is {tuple(image.shape[-2:])} but its label '{label_path}' "
                            f"is {tuple(label.shape)}; the pair must have the same size")
        return self.transform(image, label, self.generator(index))


def cityscapes(root: str | Path, split: str, transform: Transform, seed: int = 0) -> SegmentationFiles:
    """Cityscapes fine annotations: 19 train classes, every other label id -> 255.

    Layout: ``root/leftImg8bit/{split}/{city}/*_leftImg8bit.png`` and
    ``root/gtFine/{split}/{city}/*_gtFine_labelIds.png``.
    """
    root = Path(root)
    image_dir = root / "leftImg8bit" / split
    images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
    if not images:
        raise DataError(
            f"no Cityscapes images in '{image_dir}'; unzip leftImg8bit_trainvaltest.zip and "
            f"gtFine_trainvaltest.zip into '{root}' (giving leftImg8bit/{split}/<city>/ and gtFine/{split}/<city>/)"
        )
    pairs = []
    for image in images:
        stem = image.name[: -len("_leftImg8bit.png")]
        label = root / "gtFine" / split / image.parent.name / f"{stem}_gtFine_labelIds.png"
        if not label.is_file():
            raise DataError(f"missing Cityscapes label '{label}' for '{image}'; unzip gtFine_trainvaltest.zip "
                            f"into '{root}'")
        pairs.append((image, label))
    return SegmentationFiles(pairs, CITYSCAPES_LUT, False, transform, CITYSCAPES_CLASSES, seed)


def voc(root: str | Path, split: str, transform: Transform, seed: int = 0) -> SegmentationFiles:
    """Pascal VOC 2012 segmentation: 21 classes (0 = background), palette PNG labels, 255 = ignore.

    ``root`` is the ``VOC2012`` folder holding ``JPEGImages/``, ``SegmentationClass/`` and
    ``ImageSets/Segmentation/{split}.txt``.
    """
    root = Path(root)
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise DataError(f"no VOC split list '{listing}'; extract VOCtrainval_11-May-2012.tar and point the root "
                        "at VOCdevkit/VOC2012 (holding JPEGImages/, SegmentationClass/, ImageSets/)")
    ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"VOC split list '{listing}' is empty; it should name one image id per line")
    pairs = [(root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png") for i in ids]
    missing = [str(p) for pair in pairs for p in pair if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} files listed in '{listing}' are missing (first: '{missing[0]}'); "
                        f"re-extract the VOC 2012 archive into '{root}'")
    return SegmentationFiles(pairs, VOC_LUT, True, transform, VOC_CLASSES, seed)
