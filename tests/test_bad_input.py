"""Bad input, as a demanding user gives it: every case is exit status 2 with one line on stderr, no traceback,
and nothing written outside the run folder it names. Crafted pickles never run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from distkd.cli import main

TINY = ("train.threads=1", "train.progress=none", "train.epochs=1", "train.amp=none", "model.name=small_cnn3_w2")


class RunsCode:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def case_files(tmp: Path) -> dict[str, list[str]]:
    """Each case: the argv of one distkd command that must fail cleanly (files it needs are created here)."""
    write(tmp / "empty.pt", b"")
    torch.save({"conv.weight": torch.zeros(1)}, tmp / "foreign.pt")
    torch.save({"model": RunsCode(tmp / "ran")}, tmp / "malicious.pt")
    write(tmp / "bin.yaml", b"\x00\x01\x02\xff\xfe")
    write(tmp / "latin.yaml", b"name: caf\xe9\n")
    write(tmp / "base.yaml", "base: 3\n")
    write(tmp / "blank.yaml", "\n# nothing\n")
    write(tmp / "a_file", "not a folder")
    write(tmp / "runs" / "dead" / "checkpoints" / "last.pt", b"")
    torch.save({"conv.weight": RunsCode(tmp / "ran")}, tmp / "malicious_weights.pt")
    student = ["demo/student.yaml", *TINY, f"out_dir={tmp / 'runs'}"]
    return {
        "empty checkpoint (eval)": ["eval", str(tmp / "empty.pt")],
        "empty checkpoint (resume)": ["train", *student, "name=dead", "--resume"],
        "foreign checkpoint (eval)": ["eval", str(tmp / "foreign.pt")],
        "malicious checkpoint (eval)": ["eval", str(tmp / "malicious.pt")],
        "wrong loss keyword": ["train", "demo/dist.yaml", *TINY, f"out_dir={tmp / 'runs'}",
                               "teacher.checkpoint=x.pt", "loss.distill.0.kwargs.temperature=4"],
        "binary config": ["train", str(tmp / "bin.yaml")],
        "non-UTF-8 config": ["train", str(tmp / "latin.yaml")],
        "base is not a string": ["train", str(tmp / "base.yaml")],
        "empty config": ["train", str(tmp / "blank.yaml")],
        "seed beyond 64 bits": ["train", *student, f"seed={2**70}"],
        "negative seed": ["train", *student, "seed=-1"],
        "out_dir is a file": ["train", "demo/student.yaml", *TINY, f"out_dir={tmp / 'a_file'}"],
        "unknown device": ["train", *student, "train.device=bogus"],
        "missing GPU": ["train", *student, "train.device=cuda:99"],
        "nan lr": ["train", *student, "optim.lr=.nan"],
        "infinite lr": ["train", *student, "optim.lr=.inf"],
        "nan weight": ["train", *student, "loss.ce_weight=.nan"],
        "teacher without terms": ["train", *student, "teacher.name=small_cnn3_w2", "teacher.checkpoint=x.pt"],
        "option the dataset ignores": ["train", *student, "data.val_size=100"],
        "name climbing out": ["train", *student, "name=../../escaped"],
        "absolute name": ["train", *student, f"name={tmp / 'abs'}"],
        "empty name": ["train", *student, "name="],
        "resume with nothing to resume": ["train", *student, "name=never", "--resume"],
        "overrides with a checkpoint": ["eval", str(tmp / "foreign.pt"), "data.name=cifar10"],
        "config without weights (eval)": ["eval", "demo/student.yaml"],
        "malicious weights (eval with a config)": ["eval", "demo/student.yaml",
                                                   f"model.checkpoint={tmp}/malicious_weights.pt"],
        "weights of another model (eval with a config)": ["eval", "demo/student.yaml", "model.name=small_cnn6_w32",
                                                          f"model.checkpoint={tmp}/foreign.pt"],
        "unknown task": ["train", *student, "task=detecton"],
        "unknown term transform": ["train", "demo/dist.yaml", *TINY, f"out_dir={tmp / 'runs'}",
                                   "teacher.checkpoint=x.pt", "loss.distill.0.transform=flaten"],
    }


CASES = sorted(case_files(Path("/nonexistent")))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_2(case: str, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    argv = case_files(tmp_path)[case]
    before = {p for p in tmp_path.rglob("*")}
    threads = torch.get_num_threads()
    try:
        code = main(argv)
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert code == 2, f"{case}: exit {code}\n{out}\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, f"{case}: {err!r}"
    created = {p for p in tmp_path.rglob("*")} - before
    assert not created, f"{case} wrote {sorted(map(str, created))}"
    assert not (tmp_path / "ran").exists(), f"{case}: a crafted file ran code"


def test_the_messages_name_the_problem_and_the_fix(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    cases = case_files(tmp_path)
    expected = {
        "empty checkpoint (eval)": "is empty (0 bytes)",
        "foreign checkpoint (eval)": "distkd eval CONFIG model.checkpoint=PATH",
        "malicious checkpoint (eval)": "cannot read checkpoint",
        "wrong loss keyword": "loss 'dist' has no argument 'temperature'; valid: beta, gamma, tau",
        "non-UTF-8 config": "is not UTF-8 text (byte 0xe9",
        "base is not a string": "base: expected the name of another config file, got int 3",
        "empty config": "is empty",
        "seed beyond 64 bits": "seed: expected a value <=",
        "out_dir is a file": "cannot create the run folder",
        "unknown device": "train.device: expected auto, cpu, cuda or cuda:N, got 'bogus'",
        "nan lr": "optim.lr: expected a finite number, got nan",
        "teacher without terms": "loss.distill has no terms",
        "option the dataset ignores": "data.val_size is not used by dataset 'silhouettes'",
        "name climbing out": "a run name is one folder name inside out_dir",
        "resume with nothing to resume": "nothing to resume in",
        "unknown term transform": "unknown term transform 'flaten' (did you mean 'flatten'?)",
        "weights of another model (eval with a config)": "1 unexpected key(s) (conv.weight)",
    }
    for case, text in expected.items():
        threads = torch.get_num_threads()
        try:
            main(cases[case])
        finally:
            torch.set_num_threads(threads)
        assert text in capsys.readouterr().err, case


def test_an_unfinished_run_is_started_over_not_appended_to(tmp_path: Path, make_config, run_train, capsys) -> None:
    cfg = make_config("demo/student.yaml", tmp_path, "train.epochs=1")
    # What a run killed before its first checkpoint leaves: its records so far and a half-written checkpoint.
    write(cfg.run_dir / "metrics.jsonl", '{"epoch": 1, "step": 54, "train/loss": -1}\n{"epoch": 2, "ste')
    write(cfg.run_dir / "tensorboard" / "events.out.tfevents.0.dead", b"old")
    write(cfg.run_dir / "checkpoints" / ".last.pt.abc123.tmp", b"x" * 4096)
    write(cfg.run_dir / "teacher_cache" / "meta.json", "{}")  # a shared cache is kept
    run_train(cfg)
    out = capsys.readouterr().out
    assert "starting over in" in out and "metrics.jsonl" in out
    lines = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"train/loss": -1' not in lines[0]
    assert not (cfg.run_dir / "tensorboard" / "events.out.tfevents.0.dead").exists()
    assert not list((cfg.run_dir / "checkpoints").glob(".*.tmp"))
    assert (cfg.run_dir / "teacher_cache" / "meta.json").exists()


def test_stale_checkpoint_temp_files_are_removed_on_resume(tmp_path: Path, make_config, run_train, capsys) -> None:
    cfg = make_config("demo/student.yaml", tmp_path, "train.epochs=1", "train.progress=lines")
    run_train(cfg)
    stale = write(cfg.run_dir / "checkpoints" / ".last.pt.k1ll3d.tmp", b"x" * 100_000)  # a SIGKILL mid-write
    resumed = make_config("demo/student.yaml", tmp_path, "train.epochs=1", "train.progress=lines")
    run_train(resumed, resume=True)
    assert not stale.exists() and "removed .last.pt.k1ll3d.tmp" in capsys.readouterr().out


def test_checkpoints_get_the_mode_the_umask_gives(tmp_path: Path) -> None:
    from distkd.engine.checkpoint import save_atomic

    old = os.umask(0o022)
    try:
        save_atomic({"x": torch.zeros(1)}, tmp_path / "a.pt")
        os.umask(0o077)
        save_atomic({"x": torch.zeros(1)}, tmp_path / "b.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "a.pt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.pt").stat().st_mode & 0o777 == 0o600


def test_a_full_disk_while_checkpointing_says_so_and_keeps_the_previous_file(tmp_path: Path, monkeypatch) -> None:
    import errno

    from distkd.engine import checkpoint
    from distkd.errors import CheckpointError

    checkpoint.save_atomic({"x": torch.ones(1)}, tmp_path / "last.pt")

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    intact = r"the disk is full: could not write .* \(the previous last.pt is intact\)"
    with pytest.raises(CheckpointError, match=intact):
        checkpoint.save_atomic({"x": torch.zeros(1)}, tmp_path / "last.pt")
    assert torch.load(tmp_path / "last.pt", weights_only=True)["x"].item() == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_corrupt_image_is_named_and_can_be_left_out_with_a_count(tmp_path: Path, monkeypatch, capsys) -> None:
    sys.path.insert(0, str(Path(__file__).parent / "data"))
    from test_imagefolder import write_tree

    root = write_tree(tmp_path / "tree")
    broken = write(root / "train" / "bee" / "broken.jpg", b"\xff\xd8 not really a jpeg")
    argv = ["train", "demo/teacher.yaml", *TINY, f"out_dir={tmp_path / 'runs'}", "data.name=imagefolder",
            f"data.root={root}", "data.image_size=32", "data.num_workers=1", "data.batch_size=4",
            "data.eval_batch_size=4", "model.kwargs.in_chans=3", "data.crop_padding=2"]
    threads = torch.get_num_threads()
    try:
        code = main([*argv[:-1]])  # crop_padding is not an image-folder option: its default is left alone
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and f"cannot read image {broken}" in err, err
        assert "data.skip_unreadable=true" in err
        code = main([*argv[:-1], "data.skip_unreadable=true", "name=skipping"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code == 0 and "left out 1 unreadable image file(s) of 13" in out


def test_ctrl_c_says_what_will_work(tmp_path: Path, monkeypatch, capsys) -> None:
    import distkd.api

    def interrupted(cfg: object, resume: bool = False) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(distkd.api, "train", interrupted)
    argv = ["train", "demo/student.yaml", *TINY, f"out_dir={tmp_path}"]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 130
    assert "before its first checkpoint: run the same command again" in capsys.readouterr().err
    write(tmp_path / "student" / "checkpoints" / "last.pt", b"x")
    with pytest.raises(SystemExit):
        main(argv)
    assert "continue it with the same command and --resume" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_is_started_over(tmp_path: Path, teacher_run) -> None:
    import signal
    import subprocess
    import time

    teacher = teacher_run[0] / "checkpoints" / "best.pt"
    cmd = [sys.executable, "-m", "distkd", "train", "demo/dist.yaml", *TINY, f"out_dir={tmp_path}",
           "teacher.name=small_cnn3_w4", f"teacher.checkpoint={teacher}", "teacher_cache.views=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    metrics = tmp_path / "dist" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not metrics.exists() or not metrics.read_text().strip():  # the teacher's line comes first
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "dist" / "checkpoints" / "last.pt").exists(), "killed too late"
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "starting over in" in again.stdout
    epochs = metrics.read_text().splitlines()
    assert len(epochs) == 2 and '"epoch": 0' in epochs[0] and '"epoch": 1' in epochs[1]  # teacher line once
