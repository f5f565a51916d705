"""``distkd bench``: four figures and their ratios in one run, JSON output, one-line errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from distkd.bench import STEPS, BenchConfig, parse_input, run_bench
from distkd.cli import main
from distkd.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")  # --threads 1 / threads=1 set torch's count; restore it

TINY = ["bench", "--teacher", "small_cnn3_w2", "--student", "small_cnn3_w2", "--input", "1x28x28", "--steps", "2",
        "--warmup", "1", "--repeats", "2", "--batch", "16", "--classes", "10", "--threads", "1"]


def test_bench_prints_all_four_figures_and_the_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(TINY) == 0
    out = capsys.readouterr().out
    for label in ("student train step", "teacher forward", "distill step (live teacher)",
                  "distill step (cached logits)"):
        line = next(ln for ln in out.splitlines() if ln.startswith(label))
        images_per_s, ms_per_step = (float(v) for v in line[len(label):].split())
        assert images_per_s > 0 and ms_per_step > 0
        # batch 16: the two columns agree, up to the printed rounding (0.05 images/s, 0.005 ms)
        assert (images_per_s - 0.06) * (ms_per_step - 0.006) <= 16_000 <= (images_per_s + 0.06) * (ms_per_step + 0.006)
    assert "distill / (student + teacher) =" in out and "cached distill / student      =" in out
    assert "torch " in out and "1 threads" in out and "device cpu" in out


def test_bench_json_parses_and_ratios_follow_from_the_figures(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*TINY, "--json", "--no-channels-last", "--teacher-mode", "no_grad"]) == 0
    result = json.loads(capsys.readouterr().out)
    ips, ratios = result["images_per_s"], result["ratios"]
    assert set(ips) == set(STEPS) and all(v > 0 for v in ips.values())
    expected = (1 / ips["distill"]) / (1 / ips["student"] + 1 / ips["teacher"])
    assert ratios["distill_over_parts"] == pytest.approx(expected)
    assert ratios["cached_over_student"] == pytest.approx(ips["student"] / ips["cached"])
    assert all(len(v) == 2 for v in result["repeat_seconds"].values())
    assert result["settings"]["input"] == "1x28x28" and result["settings"]["channels_last"] is False
    assert result["machine"]["threads"] == 1 and result["machine"]["torch"]


@pytest.mark.parametrize("bad", ["3x32", "3x32x0", "axbxc", "3*32*32", ""])
def test_bad_input_is_a_one_line_error(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*TINY, "--input", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: --input must be CxHxW") and "3x32x32" in err


def test_parse_input_reads_channels_height_width() -> None:
    assert parse_input("3x32x32") == (3, 32, 32)
    assert parse_input("1X28X20") == (1, 28, 20)


def test_a_model_that_cannot_take_the_input_is_a_one_line_error() -> None:
    cfg = BenchConfig(teacher="small_cnn3_w2", student="small_cnn3_w2", input=(3, 2, 2), batch=4, steps=1,
                      warmup=0, repeats=1, classes=10, threads=1)
    with pytest.raises(ConfigError, match="cannot take inputs of shape"):
        run_bench(cfg)


def test_amp_bf16_runs_every_step() -> None:
    cfg = BenchConfig(teacher="small_cnn3_w2", student="small_cnn3_w2", input=(1, 16, 16), batch=8, steps=1,
                      warmup=1, repeats=1, classes=10, amp="bf16", threads=1)
    result = run_bench(cfg)
    assert result["settings"]["amp"] == "bf16" and all(v > 0 for v in result["images_per_s"].values())


def test_device_cuda_runs_there_or_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = main([*TINY, "--device", "cuda", "--json"])
    out, err = capsys.readouterr()
    if torch.cuda.is_available():
        assert code == 0 and json.loads(out)["machine"]["device"].startswith("cuda")
    else:
        assert code == 2 and err.strip() == "error: --device cuda but no CUDA device is available; use --device cpu"


# ------------------------------------------------------------------------------------------------------------
# bench --config: a distillation config's own step on its own data, any task.

def _task_bench(config: str, *overrides: str, json_out: bool = False) -> list[str]:
    return ["bench", "--config", config, *overrides, "--steps", "1", "--warmup", "1", "--repeats", "2",
            *(["--json"] if json_out else [])]


def _initial_teacher(config: str, classes: int, path) -> str:  # noqa: ANN001
    """A teacher checkpoint with the config's teacher at its initial weights (a trained one costs the same)."""
    from distkd.config import load_config, resolve_config_path
    from distkd.models import create_model

    teacher = load_config(resolve_config_path(config)).teacher
    torch.save(create_model(teacher.name, num_classes=classes, **teacher.kwargs).state_dict(), path)
    return f"teacher.checkpoint={path}"


def test_bench_config_times_a_detection_distillation_step_and_its_parts(tmp_path, capsys) -> None:  # noqa: ANN001
    scenes = f"data.kwargs={{train: 16, val: 8, test: 8, size: 64, folder: {tmp_path}}}"
    small = [scenes, "data.batch_size=4", "model.kwargs.min_size=64", "model.kwargs.max_size=64"]
    frcnn = _initial_teacher("demo/det_frcnn_dist.yaml", 10, tmp_path / "frcnn.pt")
    assert main(_task_bench("demo/det_frcnn_dist.yaml", *small, frcnn)) == 0
    out = capsys.readouterr().out
    assert "(detection): det_fasterrcnn_tiny -> det_fasterrcnn_tiny, terms dist, batch 4" in out
    for label in ("student train step", "teacher forward", "distill step (live teacher)"):
        images_per_s = float(next(ln for ln in out.splitlines() if ln.startswith(label))[len(label):].split()[0])
        assert images_per_s > 0
    assert "distill / (student + teacher) =" in out and "cached" not in out
    assert main(_task_bench("demo/det_frcnn_dist.yaml", *small, frcnn, "teacher_cache.views=2")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "depend on the student's sampled RoIs, so they cannot be cached" in err
    retinanet = _initial_teacher("demo/det_dist.yaml", 10, tmp_path / "retinanet.pt")
    assert main(_task_bench("demo/det_dist.yaml", *small, retinanet, json_out=True)) == 0  # per-level terms
    result = json.loads(capsys.readouterr().out)
    ips = result["images_per_s"]
    assert result["settings"]["terms"] == ["dist_cls_logits"] and set(ips) == {"student", "teacher", "distill"}
    expected = (1 / ips["distill"]) / (1 / ips["student"] + 1 / ips["teacher"])
    assert result["ratios"]["distill_over_parts"] == pytest.approx(expected)
    assert len(result["repeat_seconds"]["distill"]) == 2


def test_bench_config_times_the_cached_detection_step_from_a_temporary_cache(tmp_path, capsys,  # noqa: ANN001
                                                                              monkeypatch) -> None:  # noqa: ANN001
    scenes = f"data.kwargs={{train: 12, val: 4, test: 4, size: 64, folder: {tmp_path}}}"
    small = [scenes, "data.batch_size=4", "model.kwargs.min_size=64", "model.kwargs.max_size=64"]
    retinanet = _initial_teacher("demo/det_dist.yaml", 10, tmp_path / "retinanet.pt")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temporary))
    assert main(_task_bench("demo/det_dist.yaml", *small, retinanet, "teacher_cache.views=2")) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("distill step (cached logits)"))
    assert float(line.split(")")[1].split()[0]) > 0
    assert "cached distill / student      =" in out and "live / cached distill" in out
    assert "teacher cache (2 views): the setup took" in out
    assert list(temporary.iterdir()) == []  # the temporary cache is removed

    kept = tmp_path / "kept_cache"  # teacher_cache.dir: built there once, then opened
    overrides = [*small, retinanet, "teacher_cache.views=2", f"teacher_cache.dir={kept}"]
    assert main(_task_bench("demo/det_dist.yaml", *overrides, json_out=True)) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["teacher_cache"]["views"] == 2 and first["teacher_cache"]["setup_seconds"] > 0
    assert set(first["ratios"]) == {"distill_over_parts", "cached_over_student", "distill_over_cached"}
    ips = first["images_per_s"]
    assert first["ratios"]["cached_over_student"] == pytest.approx(ips["student"] / ips["cached"])
    built = (kept / "cls_logits.f32").stat().st_mtime_ns
    assert main(_task_bench("demo/det_dist.yaml", *overrides)) == 0
    assert "written to" not in capsys.readouterr().out and (kept / "cls_logits.f32").stat().st_mtime_ns == built


def test_bench_cached_batches_carry_the_teachers_outputs(tmp_path) -> None:  # noqa: ANN001
    from distkd.bench import _cached_batches
    from distkd.config import load_config, resolve_config_path
    from distkd.tasks import get_task
    from distkd.tasks.common import resolve_teacher

    scenes = f"data.kwargs={{train: 8, val: 4, test: 4, size: 64, folder: {tmp_path}}}"
    run = resolve_teacher(load_config(resolve_config_path("demo/det_dist.yaml"), [
        scenes, "data.batch_size=4", "model.kwargs.min_size=64", "model.kwargs.max_size=64", "data.flip=false",
        "teacher_cache.views=1", _initial_teacher("demo/det_dist.yaml", 10, tmp_path / "retinanet.pt")]))
    batches, seconds = _cached_batches(run, torch.device("cpu"), 2)
    assert len(batches) == 2 and seconds > 0
    live_run = dataclasses.replace(run, teacher_cache=dataclasses.replace(run.teacher_cache, views=0))
    live = get_task("detection").build(live_run, torch.device("cpu")).distiller
    for batch in batches:
        cached = batch.teacher["cls_logits"]
        transformed, _ = live.student.transform(list(batch.inputs))
        with torch.no_grad(), live.teacher_taps.recording() as taps:
            live.run_teacher(batch, {"images": transformed})
            expected = list(taps["cls_logits"])
        live.teacher_taps.clear()
        assert len(cached) == len(expected) == len(live.student.anchor_generator.sizes)  # one per level
        for c, e in zip(cached, expected, strict=True):
            torch.testing.assert_close(c, e, atol=2e-3, rtol=2e-3)  # float16 storage


@pytest.mark.parametrize(("config", "classes", "overrides", "task"), [
    ("demo/pairs_dist.yaml", 100, ["data.kwargs={train: 2, val: 1, test: 1}", "data.batch_size=32"], "classification"),
    ("demo/seg_dist.yaml", 11, ["data.kwargs={train: 8, val: 4, test: 4}", "data.batch_size=4"], "segmentation"),
])
def test_bench_config_times_classification_and_segmentation_configs_too(config: str, classes: int, overrides: list,
                                                                         task: str, tmp_path, capsys) -> None:  # noqa: ANN001
    teacher = _initial_teacher(config, classes, tmp_path / "teacher.pt")
    assert main(_task_bench(config, *overrides, teacher, json_out=True)) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["settings"]["task"] == task and result["settings"]["batch"] == int(overrides[1].split("=")[1])
    assert all(v > 0 for v in result["images_per_s"].values())
    # demo/pairs_dist.yaml trains from a 16-view teacher cache, so its cached step is timed too
    assert ("cached" in result["images_per_s"]) == (result["teacher_cache"] is not None) == (task == "classification")


@pytest.mark.parametrize(("argv", "message"), [
    (["bench", "--config", "demo/pairs_student.yaml"], "has no distillation terms"),
    (["bench", "--config", "demo/pairs_dist.yaml", "--teacher", "small_cnn3_w2"], "drop --teacher/--student"),
    (["bench", "optim.lr=0.1", "--teacher", "a", "--student", "b"], "apply to --config only"),
    (["bench"], "needs --teacher and --student"),
    (["bench", "--config", "demo/pairs_dist.yaml", "teacher.checkpoint=/nonexistent/best.pt"], "does not exist"),
])
def test_bench_config_misuse_is_a_one_line_error(argv: list[str], message: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err
