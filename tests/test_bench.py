"""``distkd bench``: four figures and their ratios in one run, JSON output, one-line errors."""

from __future__ import annotations

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
