"""A run's ``pretrain`` stage (RepDistiller's AB/FT/FSP pre-training): derived config, what it trains and freezes,
the main run starting from it, and resuming either stage, end to end on generated CIFAR-100 files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from distkd import api
from distkd.config import load_config
from distkd.engine.trainer import Trainer, frozen_modules, seed_everything
from distkd.errors import ConfigError
from distkd.models import create_model
from distkd.tasks import get_task

sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
from test_cifar import write_cifar100  # noqa: E402

FEATURES = ["layer1", "layer2", "layer3"]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Generated CIFAR-100 files (1 training image per class) and a random cifar_resnet14 teacher's weights."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar100(root, per_class_train=1, per_class_test=1)
    torch.manual_seed(0)
    teacher = root / "teacher.pt"
    torch.save(create_model("cifar_resnet14", num_classes=100).state_dict(), teacher)
    return root, teacher


def _config(cifar: tuple[Path, Path], out: Path, term: str, freeze: str, *extra: str):  # noqa: ANN202
    root, teacher = cifar
    return load_config(None, [
        "data.name=cifar100", f"data.root={root}", "data.batch_size=25", "data.eval_batch_size=100",
        "model.name=cifar_resnet8", "teacher.name=cifar_resnet14", f"teacher.checkpoint={teacher}",
        f"loss.distill=[{term}]", "train.max_steps=2", "train.threads=1", "train.progress=none",
        "train.channels_last=false", "optim.lr=0.05", "schedule.warmup_epochs=0", f"out_dir={out}", "name=staged",
        f"pretrain={{epochs: 1, lr: 0.02, freeze: {freeze}}}", *extra,
    ])


AB = ("{loss: ab, weight: 0.0, pretrain_weight: 1.0, student: [layer1, layer2, layer3], "
      "teacher: [layer1, layer2, layer3]}")
FT = "{loss: ft, weight: 200.0, pretrain_weight: 1.0, student: layer3, teacher: layer3}"


def _model(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def _initial_student(cfg) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """The student a run of ``cfg`` starts from (seeded as ``api.train`` seeds it)."""
    seed_everything(cfg.seed)
    return {k: v.clone() for k, v in get_task(cfg.task).build(cfg, torch.device("cpu")).distiller.student
            .state_dict().items()}


def test_the_stage_config_runs_the_terms_alone_at_a_constant_lr(cifar, tmp_path: Path) -> None:
    cfg = _config(cifar, tmp_path, AB, "classifier", "train.ema_decay=0.99", "schedule.warmup_epochs=2")
    stage = api.pretrain_config(cfg)
    assert stage.run_dir == cfg.run_dir / "pretrain" and stage.pretrain is None
    assert stage.loss.ce_weight == 0 and [(t.weight, t.objective) for t in stage.loss.distill] == [(1.0, "pretrain")]
    assert stage.optim.lr == 0.02 and stage.schedule.name == "constant" and stage.schedule.warmup_epochs == 0
    assert stage.train.epochs == 1 and stage.train.max_steps is None and stage.train.ema_decay is None
    assert stage.train.freeze == "classifier" and stage.teacher_cache.views == 0
    without_lr = _config(cifar, tmp_path, AB, "classifier", "pretrain.lr=null")
    assert api.pretrain_config(without_lr).optim.lr == 0.05  # the run's lr


def test_a_stage_without_pretrain_weights_is_refused_in_one_line(cifar, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no loss.distill term has a pretrain_weight > 0") as info:
        _config(cifar, tmp_path, "{loss: ab, weight: 0.0, student: layer3, teacher: layer3}", "classifier")
    assert "\n" not in str(info.value)


def test_freeze_names_the_classifier_or_the_whole_student() -> None:
    student = create_model("cifar_resnet8", num_classes=10)
    assert frozen_modules(student, "none") == []
    assert frozen_modules(student, "all") == [student]
    assert frozen_modules(student, "classifier") == [student.fc]
    with pytest.raises(ConfigError, match="has no nn.Linear classifier"):
        frozen_modules(nn.Sequential(nn.Conv2d(3, 4, 3)), "classifier")


def test_ab_pretrains_features_and_connectors_then_the_main_run_starts_from_them(cifar, tmp_path: Path,
                                                                                run_train) -> None:
    cfg = _config(cifar, tmp_path, AB, "classifier")
    initial = _initial_student(cfg)
    summary = run_train(cfg)
    stage_dir = cfg.run_dir / "pretrain"
    assert (stage_dir / "summary.json").exists() and summary["steps"] == 2
    stage = torch.load(stage_dir / "checkpoints" / "last.pt", weights_only=True)
    assert stage["step"] == 4  # 100 images / 25: one epoch
    # the classifier is frozen, the feature layers trained (equal widths: AB's connectors are identities)
    assert all(torch.equal(stage["model"][k], initial[k]) for k in initial if k.startswith("fc."))
    assert not torch.equal(stage["model"]["layer3.0.conv1.weight"], initial["layer3.0.conv1.weight"])
    # the main run starts from the stage's student and term state, not from a fresh init
    trainer = Trainer(cfg, get_task(cfg.task).build(cfg, torch.device("cpu")), torch.device("cpu"),
                      tmp_path / "probe", start_from=stage_dir / "checkpoints" / "last.pt")
    assert all(torch.equal(v, stage["model"][k]) for k, v in trainer.student.state_dict().items())
    assert all(torch.equal(v, stage["terms"][k]) for k, v in trainer.distiller.term_state_dict().items())
    # the main stage (AB weight 0: CE only) trains the classifier, which the stage had left as it was
    main = _model(cfg.run_dir / "checkpoints" / "last.pt")
    assert not torch.equal(main["fc.weight"], stage["model"]["fc.weight"])


def test_ft_pretrains_the_paraphraser_alone_and_freezes_it_afterwards(cifar, tmp_path: Path, run_train) -> None:
    cfg = _config(cifar, tmp_path, FT, "all")
    initial = _initial_student(cfg)
    run_train(cfg)
    stage = torch.load(cfg.run_dir / "pretrain" / "checkpoints" / "last.pt", weights_only=True)
    main = torch.load(cfg.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(stage["model"][k], v) for k, v in initial.items())  # the student is frozen
    stage_cfg = api.pretrain_config(cfg)
    seed_everything(cfg.seed)  # the stage's term state before training, built as api.train builds it
    probe = Trainer(stage_cfg, get_task(cfg.task).build(stage_cfg, torch.device("cpu")), torch.device("cpu"),
                    tmp_path / "probe")
    fresh = probe.distiller.term_state_dict()
    paraphraser = [k for k in fresh if ".paraphraser." in k]
    translator = [k for k in fresh if ".translator." in k and k.endswith("weight")]
    assert paraphraser and translator
    assert all(not torch.equal(stage["terms"][k], fresh[k]) for k in paraphraser if k.endswith("weight"))
    assert all(torch.equal(stage["terms"][k], fresh[k]) for k in translator)  # not trained in the stage
    assert all(torch.equal(main["terms"][k], stage["terms"][k]) for k in paraphraser)  # frozen in the main run
    assert any(not torch.equal(main["terms"][k], stage["terms"][k]) for k in translator)


def test_a_run_resumed_in_either_stage_ends_as_an_uninterrupted_one(cifar, tmp_path: Path, run_train) -> None:
    whole = _config(cifar, tmp_path / "whole", AB, "classifier")
    run_train(whole)
    # killed after the stage's last checkpoint, before it finished: the stage, then the main run, resume
    killed = _config(cifar, tmp_path / "killed", AB, "classifier")
    run_train(api.pretrain_config(killed))
    (killed.run_dir / "pretrain" / "summary.json").unlink()
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        run_train(killed)
    run_train(killed, resume=True)
    expected = _model(whole.run_dir / "checkpoints" / "last.pt")
    got = _model(killed.run_dir / "checkpoints" / "last.pt")
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_resume_with_nothing_started_says_so(cifar, tmp_path: Path, run_train) -> None:
    with pytest.raises(ConfigError, match="nothing to resume.*pretrain stage") as info:
        run_train(_config(cifar, tmp_path, AB, "classifier"), resume=True)
    assert "\n" not in str(info.value)


def test_fitnets_hint_stage_trains_the_student_up_to_the_guided_layer(cifar, tmp_path: Path, run_train) -> None:
    """FitNets as Romero et al. ran it: hint training of the layers up to the guided one (and the regressor), then
    the whole student with KD; ``freeze`` takes the layers after the guided one by ready name or module path."""
    hint = "{loss: fitnet, weight: 0.0, pretrain_weight: 1.0, student: stage2, teacher: stage2}"
    kd = "{loss: kd, weight: 0.9, kwargs: {tau: 4.0}}"
    cfg = _config(cifar, tmp_path, f"{hint}, {kd}", "[stage3, fc]", "loss.ce_weight=0.1")
    initial = _initial_student(cfg)
    run_train(cfg)
    stage = _model(cfg.run_dir / "pretrain" / "checkpoints" / "last.pt")
    trained = {k for k in initial if not torch.equal(stage[k], initial[k])}
    assert any(k.startswith("layer2.") for k in trained) and any(k.startswith("layer1.") for k in trained)
    assert not any(k.startswith(("layer3.", "fc.")) for k in trained)  # frozen: no gradient, BN statistics kept
    main = _model(cfg.run_dir / "checkpoints" / "last.pt")
    assert not torch.equal(main["layer3.0.conv1.weight"], stage["layer3.0.conv1.weight"])


def test_an_unknown_module_to_freeze_is_named_with_the_ready_names() -> None:
    student = create_model("cifar_resnet8", num_classes=10)
    assert frozen_modules(student, ["stage3", "fc"]) == [student.layer3, student.fc]
    with pytest.raises(ConfigError, match=r"no module 'stage5'.*ready names stem, stage1") as info:
        frozen_modules(student, ["stage5"])
    assert "\n" not in str(info.value)
