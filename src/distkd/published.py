"""Published top-1 accuracies (%) and COCO box mAPs that ``distkd reproduce`` compares against, with sources.

Every number was read from the source named in :data:`SOURCES`: the authors' READMEs, which restate
the papers' tables, or, where the authors publish none, another README that restates the paper (said so in
the source's text). ``None`` means no source found gives a number for that cell. Keys are
``PUBLISHED[table][row]`` with the table and row names of :mod:`distkd.reproduce`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType

SOURCES: MappingProxyType[str, str] = MappingProxyType({
    "dist-readme": "hunto/DIST_KD README.md (results tables of Huang et al., NeurIPS 2022), CIFAR-100 rows "
                   "added on 2022-12-27; CIFAR-100 numbers are mean +- std over runs",
    "crd-readme": "HobbitLong/RepDistiller README.md (Tian et al., ICLR 2020, CIFAR-100 Tables 1-2): "
                  "teachers, students trained alone, and KD",
    "dkd-readme": "megvii-research/mdistiller README.md (Zhao et al., CVPR 2022, CIFAR-100 results): KD and DKD",
    "repdistiller-tables": "HobbitLong/RepDistiller README.md, Benchmark Results on CIFAR-100, Tables 1-2 (Tian et "
                           "al., ICLR 2020): FitNet, AT, SP, CC, VID, RKD, PKT, AB, FT, FSP, NST and CRD",
    "crdkd-restated": "giakoumoglou/distillers README.md, CRD+KD rows of its CIFAR-100 tables: the CRD paper's "
                      "Tables 1-2 (Tian et al., ICLR 2020) restated; RepDistiller's own README has no CRD+KD row",
    "reviewkd-restated": "roymiles/ITRD README.md, ReviewKD rows of its CIFAR-100 tables: the ReviewKD paper's "
                         "results (Chen et al., CVPR 2021) restated; the authors' repository (dvlab-research/ReviewKD) "
                         "publishes no table (WangYZ1608/Knowledge-Distillation-via-ND's README restates the same "
                         "values)",
    "reviewkd-pwc": "paperswithcode.com/paper/distilling-knowledge-via-knowledge-review, 'Results from the Paper' "
                    "(Chen et al., CVPR 2021), CIFAR-100 vgg8 (T: vgg13)",
    "ls-readme": "sunshangquan/logit-standardization-KD README.md (Sun et al., CVPR 2024), CIFAR-100 tables: "
                 "'KD+Ours' rows (LS-KD; base temperature and KD weight in the names of the linked logs), and the "
                 "CTKD and MLKD rows it restates",
    "ctkd-readme": "zhengli97/CTKD README.md (Li et al., AAAI 2023), Main Results: '+CTKD' on KD, CIFAR-100",
    "ttm-readme": "zkxufo/TTM README.md (Zheng & Yang, ICLR 2024), Benchmark Results on CIFAR-100: WTTM rows",
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

# ----------------------------------------------------------------------------- cifar100-methods
# The zoo's CIFAR-100 pairs in the column order used below (RepDistiller's Tables 1-2 without the pairs the zoo's
# table does not run: resnet110 -> resnet20, vgg13 -> MobileNetV2, ResNet50 -> vgg8, wrn-40-2 -> ShuffleNetV1).
_PAIRS = ("wrn_40_2-wrn_16_2", "wrn_40_2-wrn_40_1", "resnet56-resnet20", "resnet110-resnet32", "resnet32x4-resnet8x4",
          "vgg13-vgg8", "resnet50-mobilenetv2", "resnet32x4-shufflev1", "resnet32x4-shufflev2")
# Teachers and students trained alone (crd-readme).
_TEACHER = {"wrn_40_2": 75.61, "resnet56": 72.34, "resnet32x4": 79.42, "resnet50": 79.34, "vgg13": 74.64,
            "resnet110": 74.31}
_STUDENT = {"wrn_40_1": 71.98, "resnet20": 69.06, "resnet8x4": 72.50, "mobilenetv2": 64.60, "shufflev1": 70.50,
            "shufflev2": 71.82, "vgg8": 70.36, "resnet32": 71.14, "wrn_16_2": 73.26}
# One tuple per method, in _PAIRS order; None: the source gives no number for that pair.
_REPDISTILLER = {  # repdistiller-tables, except kd (crd-readme) and crd_kd (crdkd-restated)
    "kd": (74.92, 73.54, 70.66, 73.08, 73.33, 72.98, 67.35, 74.07, 74.45),
    "fitnet": (73.58, 72.24, 69.21, 71.06, 73.50, 71.02, 63.16, 73.59, 73.54),
    "at": (74.08, 72.77, 70.55, 72.31, 73.44, 71.43, 58.58, 71.73, 72.73),
    "sp": (73.83, 72.43, 69.67, 72.69, 72.94, 72.68, 68.08, 73.48, 74.56),
    "cc": (73.56, 72.21, 69.63, 71.48, 72.97, 70.71, 65.43, 71.14, 71.29),
    "vid": (74.11, 73.30, 70.38, 72.61, 73.09, 71.23, 67.57, 73.38, 73.40),
    "rkd": (73.35, 72.22, 69.61, 71.82, 71.90, 71.48, 64.43, 72.28, 73.21),
    "pkt": (74.54, 73.45, 70.34, 72.61, 73.64, 72.88, 66.52, 74.10, 74.69),
    "ab": (72.50, 72.38, 69.47, 70.98, 73.17, 70.94, 67.20, 73.55, 74.31),
    "ft": (73.25, 71.59, 69.84, 72.37, 72.86, 70.58, 60.99, 71.75, 72.50),
    "fsp": (72.91, None, 69.95, 71.89, 72.62, 70.23, None, None, None),  # N/A in Table 1, no row in Table 2
    "nst": (73.68, 72.24, 69.60, 71.96, 73.30, 71.53, 64.96, 74.12, 74.68),
    "crd": (75.48, 74.14, 71.16, 73.48, 75.51, 73.94, 69.11, 75.11, 75.65),
    "crd_kd": (75.64, 74.38, 71.63, 73.75, 75.46, 74.29, 69.54, 75.12, 76.05),
}
_NEWER = {  # (numbers, source of each number)
    "reviewkd": ((76.12, 75.09, 71.89, 73.89, 75.63, 74.84, 69.89, 77.45, 77.78),
                 ("reviewkd-restated",) * 5 + ("reviewkd-pwc",) + ("reviewkd-restated",) * 3),
    "ls_kd": ((76.11, 74.37, 71.43, 74.17, 76.62, 74.36, 69.02, None, 75.56), ("ls-readme",) * 9),
    "mlkd": ((76.63, 75.35, 72.19, 74.11, 77.08, 75.18, 71.04, None, 78.44), ("ls-readme",) * 9),
    "ctkd": ((75.45, 73.93, 71.19, 73.52, 73.39, 73.52, 68.67, None, 75.37),
             ("ctkd-readme",) * 4 + ("ls-readme", "ctkd-readme", "ls-readme", "ls-readme", "ls-readme")),
    "nkd": ((None,) * 9, ("crd-readme",) * 9),
    "wttm": ((76.37, 74.58, 71.92, 74.13, 76.06, 74.44, 69.59, 74.37, 76.55), ("ttm-readme",) * 9),
}
_STAGE_NOTE = "both stages from one config (distkd's pretrain stage, then the main schedule)"
# What a reader must know about a method's rows: the number's provenance and what our config cannot reproduce.
_METHOD_NOTES = {
    "fitnet": "RepDistiller's one-stage FitNet (hint loss with CE from the first epoch), as its table; the FitNets "
              "paper's separate hint pre-training is not part of that recipe",
    "ab": f"{_STAGE_NOTE}: 30 epochs of the AB loss alone on connectors and student features, then CE only (AB "
          "weight 0), as RepDistiller",
    "ft": f"{_STAGE_NOTE}: 30 epochs of paraphraser pre-training on the teacher's features, then CE + 200 x FT with "
          "the paraphraser frozen, as RepDistiller",
    "fsp": f"{_STAGE_NOTE}: 30 epochs of the FSP loss alone on the student's features, then CE only (FSP weight 0), "
           "as RepDistiller",
    "crd": "one process as RepDistiller; under DDP the memory banks are those of the global batch (every rank's "
           "samples), the negatives drawn per rank",
    "crd_kd": "one process as RepDistiller; under DDP the memory banks are those of the global batch (every rank's "
              "samples), the negatives drawn per rank",
    "reviewkd": "the authors' CIFAR-100 code: batch 128, lr 0.1 (0.02 for ShuffleNet/MobileNet), Nesterov",
    "mlkd": "one view: MLKD's released training also feeds a strong-augmentation view (RandAugment + Cutout) with its "
            "own CE and KD terms, not run here; MLKD number: the LS README's MLKD row (Jin et al., CVPR 2023 restated)",
    "nkd": "no NKD number found for this pair: the authors' CIFAR-100 result and setting (yzd-v/cls_KD: tau 3, gamma "
           "3.5, used here) are for ResNet34 -> ResNet18 only",
    "dist": "distkd's DIST configs warm the lr up over one epoch (the paper has none; "
            "schedule.warmup_epochs=0 restores it)",
    "wttm": "the paper's per-pair T and beta (its appendix A.4) were not available: gamma 0.2 and weight 4 from the "
            "README's WTTM example (there added to CRD)",
}
_PAIR_NOTES = {
    ("ls_kd", "resnet32x4-shufflev1"): "no LS-KD number or setting published for this pair (base temperature 2 and "
                                       "KD weight 9 of the README's command)",
    ("mlkd", "resnet32x4-shufflev1"): "no MLKD number found for this pair (MLKD's README has no table; the LS README "
                                      "omits it)",
    ("ctkd", "resnet32x4-shufflev1"): "no CTKD number found for this pair",
    ("ctkd", "resnet32x4-resnet8x4"): "not in CTKD's README: the CTKD row of the LS README",
    ("ctkd", "resnet50-mobilenetv2"): "not in CTKD's README: the CTKD row of the LS README",
    ("ctkd", "resnet32x4-shufflev2"): "not in CTKD's README: the CTKD row of the LS README",
    ("reviewkd", "vgg13-vgg8"): "roymiles/ITRD's README restates 74.85; the authors' script has no command for this "
                                "pair (weight 1.0, its default)",
    ("reviewkd", "resnet50-mobilenetv2"): "the authors' script has no command for this pair (weight 1.0, its default)",
    ("dist", "vgg13-vgg8"): "no DIST number in the DIST README; zkxufo/TTM's README lists 73.89, their "
                            "reimplementation",
    ("dist", "resnet110-resnet32"): "no DIST number in the DIST README; zkxufo/TTM's README lists 73.69, their "
                                    "reimplementation",
    ("dist", "wrn_40_2-wrn_16_2"): "no DIST number in the DIST README; zkxufo/TTM's README lists 75.51, their "
                                   "reimplementation",
}


def _methods_table(dist: dict[str, Published], dkd: dict[str, Published]) -> dict[str, Published]:
    """``cifar100-methods``: ``METHOD-TEACHER-STUDENT`` -> the method's published top-1 for that pair."""
    rows: dict[str, Published] = {}

    def add(method: str, pair: str, accuracy: float | None, source: str, std: float | None = None,
            note: str = "") -> None:
        teacher, student = pair.split("-")
        notes = [n for n in (note, _METHOD_NOTES.get(method, ""), _PAIR_NOTES.get((method, pair), "")) if n]
        rows[f"{method}-{pair}"] = _P(accuracy, _TEACHER[teacher], _STUDENT[student], source, std=std,
                                      kd=_REPDISTILLER["kd"][_PAIRS.index(pair)], reference="crd-readme",
                                      note="; ".join(notes))

    for method, numbers in _REPDISTILLER.items():
        source = {"kd": "crd-readme", "crd_kd": "crdkd-restated"}.get(method, "repdistiller-tables")
        for pair, accuracy in zip(_PAIRS, numbers, strict=True):
            if method != "fsp" or accuracy is not None:  # FSP has no row where RepDistiller could not run it
                add(method, pair, accuracy, source)
    for method, (numbers, sources) in _NEWER.items():
        for pair, accuracy, source in zip(_PAIRS, numbers, sources, strict=True):
            add(method, pair, accuracy, source)
    for pair in _PAIRS:
        add("dkd", pair, dkd[pair].accuracy, dkd[pair].source, note=dkd[pair].note)
        add("dist", pair, dist[pair].accuracy, dist[pair].source, std=dist[pair].std)
    return rows


_TABLES: dict[str, dict[str, Published]] = {
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
        # listed under CONFIG=configs/strategies/distill/dist_b2.yaml in the README, not Swin's recipe
        "swinl-resnet50": _P(80.2, 86.3, 78.5, "dist-readme", kd=80.0),
    },
    "imagenet-b3": {
        "swinl-swint": _P(82.3, 86.3, 81.3, "dist-readme", kd=81.5),
    },
}
_CASCADE = ("the published teacher is a Cascade Mask R-CNN X101-64x4d (45.6); torchvision has none, so ours is a "
            "Faster R-CNN X101-64x4d")
_TABLES["coco"] = {  # dist-readme's COCO Detection table (box mAP on val2017)
    "retinanet-r50": _P(37.4, None, 37.4, "dist-readme"),
    "dist-retinanet_x101-r50": _P(39.8, 41.0, 37.4, "dist-readme"),
    "dist+mimic-retinanet_x101-r50": _P(40.1, 41.0, 37.4, "dist-readme"),
    "fasterrcnn-r50": _P(38.4, None, 38.4, "dist-readme"),
    "dist-fasterrcnn_x101-r50": _P(40.4, 45.6, 38.4, "dist-readme", note=_CASCADE),
    "dist+mimic-fasterrcnn_x101-r50": _P(41.8, 45.6, 38.4, "dist-readme", note=_CASCADE),
}
_TABLES["cifar100-methods"] = _methods_table(_TABLES["cifar100"], _TABLES["cifar100-dkd"])
# KD (T=4) beside DIST on every ImageNet pair the README gives both for: rows METHOD-STRATEGY-PAIR.
_TABLES["imagenet-kd-vs-dist"] = {
    f"{method}-{table.removeprefix('imagenet-')}-{pair}": (
        dataclasses.replace(pub, accuracy=pub.kd, kd=None) if method == "kd" else pub)
    for table in ("imagenet-b1", "imagenet-b2", "imagenet-b3")
    for pair, pub in _TABLES[table].items() if pub.kd is not None
    for method in ("kd", "dist")
}
PUBLISHED: MappingProxyType[str, MappingProxyType[str, Published]] = MappingProxyType({
    name: MappingProxyType(rows) for name, rows in _TABLES.items()
})


def published(table: str, row: str) -> Published | None:
    """The published numbers of ``row`` in ``table``, or None when no source covers it."""
    return PUBLISHED.get(table, {}).get(row)
