"""The bundled paper configs (CIFAR-100, ImageNet) load, name real models, and carry the authors' settings."""

from __future__ import annotations

import pytest
import torchvision

from distkd.config import RunConfig, bundled_configs, load_config, resolve_config_path
from distkd.models import MODELS, create_model, list_models
from distkd.published import PUBLISHED, SOURCES
from distkd.reproduce import CIFAR_PAIRS, TABLES

PAPER_CONFIGS = [c for c in bundled_configs() if c.startswith(("cifar100/", "imagenet/"))]


def _load(name: str, *overrides: str) -> RunConfig:
    return load_config(resolve_config_path(name), list(overrides))


def _resolves(name: str) -> bool:
    """Whether ``create_model`` knows ``name`` (timm/torchvision names checked without building anything)."""
    import timm

    if name.startswith("timm_"):
        return timm.is_model(name.removeprefix("timm_"))
    if name.startswith("tv_"):
        return name.removeprefix("tv_") in torchvision.models.list_models(module=torchvision.models)
    list_models()  # registers the families
    return name.lower() in MODELS.names()


def test_every_cifar_and_imagenet_row_has_a_bundled_config() -> None:
    # 9 pairs x (DIST, KD, DKD) + 6 teachers + 9 students alone; ImageNet 8 + 4 + 2 rows. (The other methods'
    # configs under cifar100/baselines/ are counted by tests/test_baseline_configs.py.)
    paper = [c for c in PAPER_CONFIGS if c.startswith("cifar100/") and not c.startswith("cifar100/baselines/")]
    assert len(paper) == 9 * 3 + 6 + 9
    assert len([c for c in PAPER_CONFIGS if c.startswith("imagenet/")]) == 8 + 4 + 2
    assert not [c for c in bundled_configs() if "/_" in c]  # shared bases stay unlisted


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_loads_and_names_known_models(name: str) -> None:
    cfg = _load(name)
    assert cfg.name == name.rsplit("/", 1)[1].removesuffix(".yaml")
    assert _resolves(cfg.model.name), cfg.model.name
    if cfg.teacher is not None:
        assert _resolves(cfg.teacher.name), cfg.teacher.name
        assert cfg.teacher.checkpoint is None  # filled in by the user or by `distkd reproduce`


def test_cifar_models_of_the_configs_build_for_100_classes() -> None:
    names = {n for c in PAPER_CONFIGS if c.startswith("cifar100/") for n in _model_names(_load(c))}
    assert len(names) == 15
    for name in sorted(names):
        model = create_model(name, num_classes=100)
        assert model.distkd_name == name


def _model_names(cfg: RunConfig) -> list[str]:
    return [cfg.model.name] + ([cfg.teacher.name] if cfg.teacher else [])


def test_cifar_configs_follow_the_published_protocol() -> None:
    for teacher, student in CIFAR_PAIRS:
        for method in ("dist", "kd", "dkd"):
            cfg = _load(f"cifar100/{method}_{teacher}-{student}.yaml")
            assert cfg.data.name == "cifar100" and cfg.data.crop_padding == 4 and cfg.data.flip
            assert cfg.data.batch_size == 64 and cfg.train.epochs == 240
            assert cfg.optim.name == "sgd" and cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 5e-4
            assert cfg.schedule.name == "multistep" and cfg.schedule.milestones == [150, 180, 210]
            assert cfg.schedule.gamma == 0.1
            small = student in ("mobilenetv2", "shufflev1", "shufflev2")
            assert cfg.optim.lr == (0.01 if small else 0.05)
            assert cfg.teacher is not None and cfg.teacher.name == f"cifar_{teacher}"
            (term,) = cfg.loss.distill
            assert term.loss == method and term.kwargs["tau"] == 4.0


def test_cifar_loss_weights_match_the_authors() -> None:
    dist = _load("cifar100/dist_resnet56-resnet20.yaml").loss
    assert dist.ce_weight == 1.0 and dist.distill[0].weight == 2.0  # beta = gamma = 2 effective
    assert (dist.distill[0].kwargs["beta"], dist.distill[0].kwargs["gamma"]) == (1.0, 1.0)
    kd = _load("cifar100/kd_resnet56-resnet20.yaml").loss
    assert (kd.ce_weight, kd.distill[0].weight) == (0.1, 0.9)
    # DKD's beta per pair, as in mdistiller's configs/cifar100/dkd/ (default 8).
    betas = {"resnet56-resnet20": 2.0, "resnet110-resnet32": 2.0, "vgg13-vgg8": 6.0, "wrn_40_2-wrn_16_2": 6.0,
             "wrn_40_2-wrn_40_1": 6.0, "resnet32x4-resnet8x4": 8.0, "resnet50-mobilenetv2": 8.0,
             "resnet32x4-shufflev1": 8.0, "resnet32x4-shufflev2": 8.0}
    for row, beta in betas.items():
        (term,) = _load(f"cifar100/dkd_{row}.yaml").loss.distill
        assert term.kwargs == {"alpha": 1.0, "beta": beta, "tau": 4.0, "warmup": 20}


def test_cifar_teachers_train_alone() -> None:
    for teacher in {t for t, _ in CIFAR_PAIRS}:
        cfg = _load(f"cifar100/teacher_{teacher}.yaml")
        assert cfg.teacher is None and cfg.loss.distill == [] and cfg.model.name == f"cifar_{teacher}"


def test_imagenet_b1_settings_and_pretrained_teachers() -> None:
    for row in TABLES["imagenet-b1"].rows:
        cfg = _load(row.student.config)
        assert cfg.data.name == "imagefolder" and cfg.data.preset == "b1" and cfg.data.batch_size == 256
        assert cfg.optim.nesterov and cfg.optim.lr == 0.1 and cfg.optim.weight_decay == 1e-4
        assert cfg.optim.no_decay_norm_bias
        assert (cfg.schedule.name, cfg.schedule.step_size, cfg.schedule.gamma) == ("step", 30, 0.1)
        assert cfg.train.epochs == 100
        (term,) = cfg.loss.distill
        assert (cfg.loss.ce_weight, term.loss, term.weight, term.kwargs["tau"]) == (1.0, "dist", 2.0, 1.0)
        assert cfg.teacher is not None and cfg.teacher.kwargs == {"pretrained": True}
    for table, preset in (("imagenet-b2", "b2"), ("imagenet-b3", "b3")):
        for row in TABLES[table].rows:
            cfg = _load(row.student.config)
            assert cfg.data.preset == preset and cfg.teacher is not None and cfg.teacher.kwargs["pretrained"]


def test_imagenet_configs_hold_the_authors_global_batch_and_per_gpu_intra_groups() -> None:
    # hunto/DIST_KD README: ImageNet on 8 GPUs (tools/dist_train.sh 8); per GPU 32 images (B1, resnet_dist.yaml)
    # and 96 (B2, dist_b2.yaml); Swin's official recipe 128 per GPU (B3). data.batch_size is the global batch,
    # and DIST's intra-class term sees one GPU's share.
    per_gpu = {"imagenet-b1": 32, "imagenet-b2": 96, "imagenet-b3": 128}
    for table, share in per_gpu.items():
        for row in TABLES[table].rows:
            cfg = _load(row.student.config)
            (term,) = cfg.loss.distill
            assert cfg.data.batch_size == 8 * share, row.name
            assert term.kwargs["intra_group_size"] == share and not term.kwargs.get("global_intra"), row.name
            assert (term.kwargs["beta"], term.kwargs["gamma"], term.kwargs["tau"], term.weight) == (1.0, 1.0, 1.0, 2.0)


def test_published_numbers_belong_to_table_rows_and_cite_a_source() -> None:
    for table, rows in PUBLISHED.items():
        names = {r.name for r in TABLES[table].rows}
        assert set(rows) <= names, set(rows) - names
        for number in rows.values():
            assert number.source in SOURCES and (number.reference is None or number.reference in SOURCES)
            for value in (number.accuracy, number.teacher, number.student, number.kd):
                assert value is None or 50.0 < value < 90.0
    assert PUBLISHED["cifar100"]["resnet56-resnet20"].accuracy == 71.75
    assert PUBLISHED["imagenet-b1"]["resnet34-resnet18"].accuracy == 72.07


def test_every_table_row_points_at_loadable_configs() -> None:
    for table in TABLES.values():
        for row in table.rows:
            cfg = _load(row.student.config, *row.student.overrides)
            if row.teacher is not None:
                teacher = _load(row.teacher.run.config, *row.teacher.run.overrides)
                assert cfg.teacher is not None and teacher.model.name == cfg.teacher.name
