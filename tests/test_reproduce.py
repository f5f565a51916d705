"""``distkd reproduce``: listing, dry runs, errors, the report, and one real CIFAR-100 row end to end."""

from __future__ import annotations

import json
import pickle
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from distkd.cli import main
from distkd.config import RunConfig, load_config, resolve_config_path
from distkd.data.imagefolder import load_imagefolder
from distkd.errors import ConfigError, UnknownNameError
from distkd.models import create_model
from distkd.published import PUBLISHED
from distkd.reproduce import (
    STRENGTH_STUDENT,
    STRENGTH_STUDIES,
    STRENGTH_TEACHERS,
    TABLES,
    RowResult,
    get_table,
    parse_teacher_checkpoints,
    plan,
    render,
    reproduce,
)

TINY = ("train.threads=1", "train.progress=none", "train.amp=none")


def _write_cifar100(root: Path, per_class: int = 1) -> None:
    """``root/cifar-100-python/{train,test,meta}`` in the official pickle format, random images."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        fine = rng.permutation(np.repeat(np.arange(100), per_class))
        entry = {"data": rng.integers(0, 256, size=(len(fine), 3072), dtype=np.uint8), "fine_labels": fine.tolist(),
                 "coarse_labels": (fine // 5).tolist(), "filenames": [f"{i}.png" for i in range(len(fine))]}
        (folder / split).write_bytes(pickle.dumps(entry))
    meta = {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta))


def test_list_names_every_table_and_row(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reproduce", "--list"]) == 0
    text = capsys.readouterr().out
    for name in ("cifar100", "cifar100-kd", "cifar100-dkd", "cifar100-baselines", "imagenet-b1", "imagenet-b2",
                 "imagenet-b3", "imagenet-kd-vs-dist", "silhouettes-strength", "pairs-strength", "coco"):
        assert f"{name}: " in text
        for row in TABLES[name].rows:
            assert f"  {row.name} " in text
    assert "published  71.75  cifar100/dist_resnet56-resnet20.yaml" in text


def test_dry_run_trains_each_teacher_once_then_every_seed(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "rep"
    argv = ["reproduce", "cifar100", "--rows", "resnet32x4-resnet8x4", "resnet32x4-shufflev1", "--seeds", "2",
            "--out", str(out), "--dry-run", "--set", "data.root=/data", "train.epochs=3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[::2] == ["# batch 64 (global) = 64 per process x 1 process"] * 5
    lines = [shlex.split(line) for line in printed[1::2]]
    assert [line[2] for line in lines] == ["cifar100/teacher_resnet32x4.yaml"] + \
        ["cifar100/dist_resnet32x4-resnet8x4.yaml"] * 2 + ["cifar100/dist_resnet32x4-shufflev1.yaml"] * 2
    teacher_ckpt = out / "teachers" / "cifar100-resnet32x4" / "checkpoints" / "best.pt"
    assert lines[0][3:] == [f"out_dir={out / 'teachers'}", "name=cifar100-resnet32x4", "data.root=/data",
                            "train.epochs=3"]
    assert lines[2][3:] == [f"out_dir={out / 'cifar100' / 'resnet32x4-resnet8x4'}", "name=seed1", "seed=1",
                            f"teacher.checkpoint={teacher_ckpt}", "data.root=/data", "train.epochs=3"]
    assert all(line[:2] == ["distkd", "train"] for line in lines)


def test_dry_run_on_eight_processes_prints_torchrun_and_the_share_of_the_global_batch(
    capsys: pytest.CaptureFixture[str]
) -> None:
    rows = (("imagenet-b1", "resnet34-resnet18", 256), ("imagenet-b2", "resnet50sb-resnet18", 768))
    for table, row, global_batch in rows:
        assert main(["reproduce", table, "--rows", row, "--dry-run", "--nproc", "8", "--set", "data.root=/d"]) == 0
        note, command = capsys.readouterr().out.strip().splitlines()
        assert note == f"# batch {global_batch} (global) = {global_batch // 8} per process x 8 processes"
        assert shlex.split(command)[:6] == ["torchrun", "--standalone", "--nproc_per_node=8", "-m", "distkd", "train"]


def test_given_teacher_checkpoint_skips_training_that_teacher(tmp_path: Path) -> None:
    table = get_table("cifar100-kd")
    by_row = parse_teacher_checkpoints(["resnet56-resnet20=/ckpt/r56.pt"], table)
    steps = plan(table, ["resnet56-resnet20"], 1, tmp_path, teacher_ckpts=by_row)
    assert [role for role, _ in steps] == ["resnet56-resnet20"]
    assert "teacher.checkpoint=/ckpt/r56.pt" in steps[0][1].overrides
    by_key = parse_teacher_checkpoints(["cifar100-resnet32x4=/ckpt/r32x4.pt"], table)
    steps = plan(table, ["resnet32x4-resnet8x4", "resnet32x4-shufflev2"], 1, tmp_path, teacher_ckpts=by_key)
    assert [role for role, _ in steps] == ["resnet32x4-resnet8x4", "resnet32x4-shufflev2"]
    assert all("teacher.checkpoint=/ckpt/r32x4.pt" in run.overrides for _, run in steps)


def test_pretrained_teacher_rows_train_no_teacher(tmp_path: Path) -> None:
    table = get_table("imagenet-b1")
    steps = plan(table, None, 1, tmp_path)
    assert len(steps) == len(TABLES["imagenet-b1"].rows)
    assert not any(o.startswith("teacher.checkpoint=") for _, run in steps for o in run.overrides)
    # A local file replaces the hub weights of that row's teacher only.
    ckpts = parse_teacher_checkpoints(["resnet34-resnet18=/w/resnet34.pth"], table)
    steps = dict(plan(table, ["resnet34-resnet18", "resnet50-resnet18"], 1, tmp_path, teacher_ckpts=ckpts))
    assert {"teacher.checkpoint=/w/resnet34.pth", "teacher.kwargs.pretrained=false"} <= set(
        steps["resnet34-resnet18"].overrides)
    assert not any(o.startswith("teacher.") for o in steps["resnet50-resnet18"].overrides)


def test_teacher_checkpoint_for_a_row_without_teacher_is_refused() -> None:
    with pytest.raises(UnknownNameError, match="has no row or teacher 'resnet20'"):
        parse_teacher_checkpoints(["resnet20=/w.pt"], get_table("cifar100-baselines"))


@pytest.mark.parametrize(("table", "prefix", "data"), [("silhouettes-strength", "demo/", "silhouettes"),
                                                       ("pairs-strength", "demo/pairs_", "pairs")])
def test_strength_study_trains_each_teacher_once_for_kd_and_dist(tmp_path: Path, table, prefix, data) -> None:
    steps = plan(get_table(table), None, 3, tmp_path, ["train.epochs=2"])
    teachers = [run for role, run in steps if role == "teacher"]
    names = STRENGTH_STUDIES[table][1]
    assert names[:4] == STRENGTH_TEACHERS[:4]
    assert [run.overrides[0] for run in teachers] == [f"model.name={t}" for t in names]
    assert {run.config for run in teachers} == {f"{prefix}teacher.yaml"}
    students = [(role, run) for role, run in steps if role != "teacher"]
    assert len(students) == 3 * (1 + 2 * len(names))
    for role, run in students:
        assert f"model.name={STRENGTH_STUDENT}" in run.overrides and run.overrides[-1] == "train.epochs=2"
        if role == "alone":
            assert run.config == f"{prefix}student.yaml"
            assert not any(o.startswith("teacher.") for o in run.overrides)
        else:
            method, teacher = role.split("-", 1)
            ckpt = tmp_path / "teachers" / f"{data}-{teacher}" / "checkpoints" / "best.pt"
            assert run.config == f"{prefix}{method}.yaml"
            assert f"teacher.name={teacher}" in run.overrides and f"teacher.checkpoint={ckpt}" in run.overrides
            # KD's and DIST's students of one teacher share one teacher-output cache
            assert f"teacher_cache.dir={tmp_path / 'teacher_caches' / f'{data}-{teacher}'}" in run.overrides


def test_baselines_train_teachers_and_students_alone(tmp_path: Path) -> None:
    steps = plan(get_table("cifar100-baselines"), None, 1, tmp_path)
    assert {role for role, _ in steps} == set(PUBLISHED["cifar100-baselines"]) and len(steps) == 15
    assert not any(o.startswith("teacher.") for _, run in steps for o in run.overrides)


def test_unknown_table_row_and_bad_arguments_fail_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["reproduce", "cifar10", "--dry-run"], "unknown table 'cifar10' (did you mean 'cifar100'?)"),
        (["reproduce", "cifar100", "--rows", "resnet56-resnet2", "--dry-run"],
         "table 'cifar100' has no row 'resnet56-resnet2' (did you mean 'resnet56-resnet20'?)"),
        (["reproduce", "cifar100", "--teacher-ckpt", "r56.pt", "--dry-run"], "is not ROW=PATH"),
        (["reproduce", "cifar100", "--teacher-ckpt", "resnet57=r.pt", "--dry-run"], "has no row or teacher 'resnet57'"),
        (["reproduce", "cifar100", "--seeds", "0", "--dry-run"], "--seeds must be at least 1"),
        (["reproduce", "cifar100", "--rows", "resnet56-resnet20", "--nproc", "3", "--dry-run"],
         "data.batch_size=64 (the global batch) does not divide over 3 processes"),
        (["reproduce", "cifar100", "--nproc", "2"], "--nproc 2 but 1 process(es) run; launch with torchrun"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    with pytest.raises(UnknownNameError):
        get_table("imagenet-b4")


def test_report_sets_mean_std_beside_the_published_number_with_the_gap() -> None:
    table = get_table("cifar100")
    results = [RowResult("resnet56-resnet20", [70.0, 72.0], teacher=72.5), RowResult("vgg13-vgg8", [71.0])]
    text = render(table, results, seeds=2)
    assert "| resnet56-resnet20 | 72.50 | 72.34 | 69.06 | 71.00 ± 1.41 | 71.75 ± 0.30 | -0.75 |" in text
    assert "| vgg13-vgg8 | - | 74.64 | 70.36 | 71.00 ± 0.00 | - | - |" in text  # no DIST number published
    assert "hunto/DIST_KD README.md" in text and "HobbitLong/RepDistiller README.md" in text
    assert "vgg13-vgg8: no DIST number published" in text


@pytest.mark.slow
def test_reproduce_trains_teacher_then_student_and_writes_the_table(tmp_path: Path, one_thread: None) -> None:
    _write_cifar100(tmp_path / "data")
    out = tmp_path / "rep"
    overrides = [*TINY, f"data.root={tmp_path / 'data'}", "train.epochs=1", "data.batch_size=32",
                 "data.eval_batch_size=100"]
    argv = ["reproduce", "cifar100", "--rows", "resnet56-resnet20", "--seeds", "1", "--out", str(out), "--set",
            *overrides]
    assert main(argv) == 0
    teacher_dir = out / "teachers" / "cifar100-resnet56"
    student_dir = out / "cifar100" / "resnet56-resnet20" / "seed0"
    assert (teacher_dir / "checkpoints" / "best.pt").is_file() and (student_dir / "summary.json").is_file()
    teacher = json.loads((teacher_dir / "summary.json").read_text())
    student = json.loads((student_dir / "summary.json").read_text())
    assert student["teacher_val"]["top1"] == pytest.approx(teacher["best_val"])  # the trained teacher was loaded
    saved = json.loads((out / "cifar100.json").read_text())
    (row,) = saved["rows"]
    assert row["scores"] == [student["best_test"]]
    gap = student["best_test"] - PUBLISHED["cifar100"]["resnet56-resnet20"].accuracy
    markdown = (out / "cifar100.md").read_text()
    assert f"| {student['best_test']:.2f} ± 0.00 | 71.75 ± 0.30 | {gap:+.2f} |" in markdown

    # A second call reuses both finished runs (no training: the files stay untouched) ...
    stamp = (student_dir / "checkpoints" / "last.pt").stat().st_mtime_ns
    again = reproduce("cifar100", ["resnet56-resnet20"], 1, out, overrides)
    assert again == markdown and (student_dir / "checkpoints" / "last.pt").stat().st_mtime_ns == stamp
    # ... and refuses to mix a finished run with another config.
    with pytest.raises(ConfigError, match="differs in train.epochs"):
        reproduce("cifar100", ["resnet56-resnet20"], 1, out, [*overrides, "train.epochs=2"])
    assert torch.get_num_threads() == 1


def _write_imagefolder(root: Path, classes: int = 2, per_class: int = 4) -> None:
    """``root/{train,val}/<class>/<i>.png``: random 80x80 RGB images."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, size=(80, 80, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.mark.slow
@pytest.mark.parametrize(("table", "row", "teacher_name", "share", "number"), [
    ("imagenet-b1", "resnet34-resnet18", "timm_resnet34.tv_in1k", 32, 72.07),
    ("imagenet-b2", "resnet50sb-resnet18", "timm_resnet50.a1_in1k", 96, 74.5),
])
def test_imagenet_row_runs_with_a_local_teacher_file(tmp_path: Path, one_thread: None, table: str, row: str,
                                                     teacher_name: str, share: int, number: float) -> None:
    _write_imagefolder(tmp_path / "images")
    teacher = create_model(teacher_name, num_classes=2)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    out = tmp_path / "rep"
    overrides = [*TINY, f"data.root={tmp_path / 'images'}", "data.image_size=64", "data.batch_size=4",
                 "data.eval_batch_size=8", "data.num_workers=0", "train.epochs=1",
                 "loss.distill.0.kwargs.intra_group_size=4"]  # the config's group (a GPU's share) exceeds this batch
    assert _load_row(table, row).loss.distill[0].kwargs["intra_group_size"] == share
    text = reproduce(table, [row], 1, out, overrides, [f"{row}={tmp_path / 'teacher.pth'}"])
    run = out / table / row / "seed0"
    summary = json.loads((run / "summary.json").read_text())
    # The teacher the row used is the file's: its val loss is the one we compute here from the file.
    preset = _load_row(table, row).data.preset
    data = load_imagefolder(str(tmp_path / "images"), preset=preset, image_size=64, val_size=0, seed=0)
    x, y = default_collate([data.val[i] for i in range(len(data.val))])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(teacher.eval()(x), torch.as_tensor(y)).item()
    assert summary["teacher_val"]["loss"] == pytest.approx(loss, rel=1e-3)
    gap = summary["best_test"] - number
    assert f"| {summary['best_test']:.2f} ± 0.00 | {number:.2f} | {gap:+.2f} |" in text
    assert not (out / "teachers").exists()  # the teacher came from the file, nothing was trained for it
    if table == "imagenet-b2":  # select_ema: best.pt holds the EMA weights (one epoch: the last EMA)
        best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
        last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
        assert all(torch.equal(best["model"][k], v) for k, v in last["ema"].items())
        assert not all(torch.equal(best["model"][k], v) for k, v in last["model"].items())


def _load_row(table: str, row: str) -> RunConfig:
    return load_config(resolve_config_path(TABLES[table].row(row).student.config))
