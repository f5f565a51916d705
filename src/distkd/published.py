"""Published top-1 accuracies (%) that ``distkd reproduce`` compares against, each with its source.

Every number was read from the source named in :data:`SOURCES` (the authors' READMEs, which restate
the papers' tables). ``None`` means the source gives no number for that cell. Keys are
``PUBLISHED[table][row]`` with the table and row names of :mod:`distkd.reproduce`.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

SOURCES: MappingProxyType[str, str] = MappingProxyType({
    "dist-readme": "hunto/DIST_KD README.md (results tables of Huang et al., NeurIPS 2022), CIFAR-100 rows "
                   "added on 2022-12-27; CIFAR-100 numbers are mean +- std over runs",
    "crd-readme": "HobbitLong/RepDistiller README.md (Tian et al., ICLR 2020, CIFAR-100 Tables 1-2): "
                  "teachers, students trained alone, and KD",
    "dkd-readme": "megvii-research/mdistiller README.md (Zhao et al., CVPR 2022, CIFAR-100 results): KD and DKD",
})


@dataclass(frozen=True)
class Published:
    """One published row: the method's accuracy (``std`` when given) beside its teacher and student alone.

    ``kd``: the same pair distilled with classic KD, where the source gives it. ``source`` keys
    :data:`SOURCES` for ``accuracy``; ``reference`` for ``teacher``/``student``/``kd`` when they come
    from elsewhere. ``note``: anything a reader must know about the number.
    """

    accuracy: float | None
    teacher: float | None
    student: float | None
    source: str
    std: float | None = None
    kd: float | None = None
    reference: str | None = None
    note: str = ""


_P = Published
_DIST_NOTE = "no DIST number published for this pair; KD/teacher/student from RepDistiller"
_SHUV2_NOTE = ("mdistiller's README heads this column 'ResNet32x4 / MobileNet-V2', but its KD number (74.45) is "
               "CRD's ResNet32x4 -> ShuffleNetV2 and mdistiller ships configs/cifar100/dkd/res32x4_shuv2.yaml")

PUBLISHED: MappingProxyType[str, MappingProxyType[str, Published]] = MappingProxyType({
    name: MappingProxyType(rows) for name, rows in {
        "cifar100": {
            "wrn_40_2-wrn_40_1": _P(74.43, 75.61, 71.98, "dist-readme", std=0.24, kd=73.54, reference="crd-readme"),
            "resnet56-resnet20": _P(71.75, 72.34, 69.06, "dist-readme", std=0.30, kd=70.66, reference="crd-readme"),
            "resnet32x4-resnet8x4": _P(76.31, 79.42, 72.50, "dist-readme", std=0.19, kd=73.33,
                                       reference="crd-readme"),
            "resnet50-mobilenetv2": _P(68.66, 79.34, 64.60, "dist-readme", std=0.23, kd=67.35,
                                       reference="crd-readme"),
            "resnet32x4-shufflev1": _P(76.34, 79.42, 70.50, "dist-readme", std=0.18, kd=74.07,
                                       reference="crd-readme"),
            "resnet32x4-shufflev2": _P(77.35, 79.42, 71.82, "dist-readme", std=0.25, kd=74.45,
                                       reference="crd-readme"),
            "vgg13-vgg8": _P(None, 74.64, 70.36, "crd-readme", kd=72.98, note=_DIST_NOTE),
            "resnet110-resnet32": _P(None, 74.31, 71.14, "crd-readme", kd=73.08, note=_DIST_NOTE),
            "wrn_40_2-wrn_16_2": _P(None, 75.61, 73.26, "crd-readme", kd=74.92, note=_DIST_NOTE),
        },
        "cifar100-kd": {
            "wrn_40_2-wrn_40_1": _P(73.54, 75.61, 71.98, "crd-readme"),
            "resnet56-resnet20": _P(70.66, 72.34, 69.06, "crd-readme"),
            "resnet32x4-resnet8x4": _P(73.33, 79.42, 72.50, "crd-readme"),
            "resnet50-mobilenetv2": _P(67.35, 79.34, 64.60, "crd-readme"),
            "resnet32x4-shufflev1": _P(74.07, 79.42, 70.50, "crd-readme"),
            "resnet32x4-shufflev2": _P(74.45, 79.42, 71.82, "crd-readme"),
            "vgg13-vgg8": _P(72.98, 74.64, 70.36, "crd-readme"),
            "resnet110-resnet32": _P(73.08, 74.31, 71.14, "crd-readme"),
            "wrn_40_2-wrn_16_2": _P(74.92, 75.61, 73.26, "crd-readme"),
        },
        "cifar100-dkd": {
            "wrn_40_2-wrn_40_1": _P(74.81, 75.61, 71.98, "dkd-readme", kd=73.54, reference="crd-readme"),
            "resnet56-resnet20": _P(71.97, 72.34, 69.06, "dkd-readme", kd=70.66, reference="crd-readme"),
            "resnet32x4-resnet8x4": _P(76.32, 79.42, 72.50, "dkd-readme", kd=73.33, reference="crd-readme"),
            "resnet50-mobilenetv2": _P(70.35, 79.34, 64.60, "dkd-readme", kd=67.35, reference="crd-readme"),
            "resnet32x4-shufflev1": _P(76.45, 79.42, 70.50, "dkd-readme", kd=74.07, reference="crd-readme"),
            "resnet32x4-shufflev2": _P(77.07, 79.42, 71.82, "dkd-readme", kd=74.45, reference="crd-readme",
                                       note=_SHUV2_NOTE),
            "vgg13-vgg8": _P(74.68, 74.64, 70.36, "dkd-readme", kd=72.98, reference="crd-readme"),
            "resnet110-resnet32": _P(74.11, 74.31, 71.14, "dkd-readme", kd=73.08, reference="crd-readme"),
            "wrn_40_2-wrn_16_2": _P(76.23, 75.61, 73.26, "dkd-readme", kd=74.92, reference="crd-readme"),
        },
        "cifar100-baselines": {  # teachers and students trained alone (CE only)
            **{name: _P(acc, None, None, "crd-readme") for name, acc in (
                ("wrn_40_2", 75.61), ("resnet56", 72.34), ("resnet32x4", 79.42), ("resnet50", 79.34),
                ("vgg13", 74.64), ("resnet110", 74.31), ("wrn_40_1", 71.98), ("resnet20", 69.06),
                ("resnet8x4", 72.50), ("mobilenetv2", 64.60), ("shufflev1", 70.50), ("shufflev2", 71.82),
                ("vgg8", 70.36), ("resnet32", 71.14), ("wrn_16_2", 73.26))},
        },
        "imagenet-b1": {
            "resnet34-resnet18": _P(72.07, 73.31, 69.76, "dist-readme", kd=71.21),
            "resnet50-mobilenetv1": _P(73.24, 76.16, 70.13, "dist-readme"),
            "resnet50-resnet18": _P(72.12, 76.13, 69.76, "dist-readme", kd=71.35),
            "resnet101-resnet18": _P(72.08, 77.37, 69.76, "dist-readme", kd=71.09),
            "resnet152-resnet18": _P(72.24, 78.31, 69.76, "dist-readme", kd=71.12),
            "resnet50-resnet34": _P(75.06, 76.13, 73.31, "dist-readme", kd=74.73),
            "resnet101-resnet34": _P(75.36, 77.37, 73.31, "dist-readme", kd=74.89),
            "resnet152-resnet34": _P(75.42, 78.31, 73.31, "dist-readme", kd=74.87),
        },
        "imagenet-b2": {
            "resnet50sb-resnet18": _P(74.5, 80.1, 73.4, "dist-readme", kd=72.6),
            "resnet50sb-resnet34": _P(77.8, 80.1, 76.8, "dist-readme", kd=77.2),
            "resnet50sb-mobilenetv2": _P(74.4, 80.1, 73.6, "dist-readme", kd=71.7),
            "resnet50sb-efficientnet_b0": _P(78.6, 80.1, 78.0, "dist-readme", kd=77.4),
        },
        "imagenet-b3": {
            "swinl-resnet50": _P(80.2, 86.3, 78.5, "dist-readme", kd=80.0),
            "swinl-swint": _P(82.3, 86.3, 81.3, "dist-readme", kd=81.5),
        },
    }.items()
})


def published(table: str, row: str) -> Published | None:
    """The published numbers of ``row`` in ``table``, or None when no source covers it."""
    return PUBLISHED.get(table, {}).get(row)
