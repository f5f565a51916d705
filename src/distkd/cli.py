"""The ``distkd`` command line: train, eval, export, predict, demo, compare, cache, models, configs, reproduce, bench.

Errors distkd raises on purpose are printed as one line (``error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from distkd.config import bundled_configs, resolve_config_path
from distkd.errors import ConfigError, DistkdError


def _train(args: argparse.Namespace) -> None:
    from distkd.config import load_config

    cfg = load_config(*_train_config(args))  # config errors come before torch loads
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun every rank returns the same summary
    if main_rank:
        print(f"run folder: {cfg.run_dir}", flush=True)

    from distkd.api import train

    try:
        summary = train(cfg, resume=args.resume)
    except KeyboardInterrupt:
        if (cfg.run_dir / "checkpoints" / "last.pt").exists():
            advice = f"continue it with the same command and --resume (from {cfg.run_dir}/checkpoints/last.pt)"
        else:
            advice = "it stopped before its first checkpoint: run the same command again to start it over"
        print(f"interrupted; {advice}", file=sys.stderr)
        raise SystemExit(130) from None
    if main_rank:
        print(json.dumps(summary, indent=2))
        print(f"report: {cfg.run_dir / 'report.md'}")


def _train_config(args: argparse.Namespace) -> tuple[Path, list[str]]:
    """The config file and overrides of ``distkd train``: a run folder given with --resume continues with its saved
    config (where it now lies), and the overrides given now on top."""
    folder = Path(args.config)
    if not folder.is_dir():
        return resolve_config_path(args.config), args.overrides
    if not args.resume:
        raise ConfigError(f"{folder} is a run folder: add --resume to continue it with its saved config, or give a "
                          "config file to start a new run")
    if not (folder / "config.yaml").is_file():
        raise ConfigError(f"{folder} holds no config.yaml, so it is not a run folder; give the folder `distkd train` "
                          "printed as 'run folder', or a config file")
    where = [f"out_dir={folder.resolve().parent}", f"name={folder.resolve().name}"]
    return folder / "config.yaml", [*where, *args.overrides]


def _eval(args: argparse.Namespace) -> None:
    overrides = [*args.overrides, *([f"data.root={args.data}"] if args.data else [])]
    if args.checkpoint.endswith((".yaml", ".yml")):  # a config whose model.checkpoint names the weights
        from distkd.config import load_config

        cfg = load_config(args.checkpoint, overrides)  # config errors come before torch loads

        from distkd.api import evaluate_config

        metrics = evaluate_config(cfg, args.split, scales=args.scales, flip=args.flip, per_class=args.per_class)
    else:
        from distkd.api import evaluate_checkpoint

        metrics = evaluate_checkpoint(args.checkpoint, args.split, scales=args.scales, flip=args.flip,
                                      overrides=overrides, per_class=args.per_class)
    print(json.dumps({"split": args.split, **({"data": args.data} if args.data else {}), **metrics}, indent=2))


def _export(args: argparse.Namespace) -> None:
    from distkd.export import export

    info = export(args.source, args.format, args.out, last=args.last, ema=args.ema)
    check = info["check"]
    compared = (f"{check['detections_compared']} detections, max |box and score difference|"
                if "detections_compared" in check else "max |logit difference|")
    print(f"exported {info['source']['weights']} weights of {info['source']['checkpoint']} as {args.format}: "
          f"{info['path']} (+ {info['sidecar']}); checked on {check['inputs']}: {compared} "
          f"{check['max_abs_difference']:.3g} (allowed {check['tolerance']:.3g})")


def _predict(args: argparse.Namespace) -> None:
    from distkd.predict import format_table, predict

    results = predict(args.source, args.images, top_k=args.top_k, min_score=args.min_score)
    print(json.dumps(results, indent=2) if args.json else format_table(results))


def _demo(args: argparse.Namespace) -> None:
    from distkd.demo import run_demo

    if args.detector and args.task != "detection":
        raise ConfigError(f"--detector chooses the detection demo's models; it needs --task detection, not {args.task}")
    task = "detection-retinanet" if args.detector == "retinanet" else args.task
    folder = {"segmentation": "runs/demo_seg", "detection": "runs/demo_det",
              "detection-retinanet": "runs/demo_det_retinanet"}.get(task, "runs/demo")
    out = args.out or folder + ("_quick" if args.quick else "")  # a quick run's teacher must not serve the full demo
    run_demo(Path(out), seeds=args.seeds, quick=args.quick, task=task, jobs=args.jobs)


def _compare(args: argparse.Namespace) -> None:
    from distkd.compare import DEFAULT_METHODS, resolve_methods, run_compare

    methods = resolve_methods(args.methods or ",".join(DEFAULT_METHODS), args.task)
    out = Path(args.out or f"runs/compare_{args.task}" + ("_quick" if args.quick else ""))
    seeds = 1 if args.quick and args.seeds is None else (args.seeds or 3)
    run_compare(out, methods, seeds=seeds, task=args.task, quick=args.quick, overrides=tuple(args.set),
                student_overrides=tuple(args.student_set))


def _cache(args: argparse.Namespace) -> None:
    from distkd.config import load_config

    cfg = load_config(resolve_config_path(args.config), args.overrides)

    from distkd.api import build_teacher_cache

    directory = build_teacher_cache(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"teacher cache ready in {directory}")


def _models(args: argparse.Namespace) -> None:
    from distkd.models import list_models

    print("\n".join(list_models()))
    print("timm_<name>   any timm model, e.g. timm_resnet18\ntv_<name>     any torchvision model, e.g. tv_resnet18")


def _configs(args: argparse.Namespace) -> None:
    from distkd.config import config_description

    names = bundled_configs()
    width = max(map(len, names))
    print("\n".join(f"{name:<{width}}  {config_description(name)}".rstrip() for name in names))


def _reproduce(args: argparse.Namespace) -> None:
    from distkd.reproduce import (
        check_nproc,
        commands,
        get_table,
        list_tables,
        parse_teacher_checkpoints,
        plan,
        reproduce,
    )

    if args.list or args.table is None:
        print(list_tables())
        return
    if args.dry_run:
        table = get_table(args.table)
        ckpts = parse_teacher_checkpoints(args.teacher_ckpt, table)
        print("\n".join(commands(plan(table, args.rows, args.seeds, Path(args.out), args.set, ckpts), args.nproc)))
        return
    check_nproc(args.nproc)
    print(reproduce(args.table, args.rows, args.seeds, args.out, args.set, args.teacher_ckpt))


def _bench(args: argparse.Namespace) -> None:
    from distkd.bench import (
        BenchConfig,
        TaskBenchConfig,
        format_result,
        format_task_result,
        parse_input,
        run_bench,
        run_task_bench,
    )

    if args.config:
        if args.teacher or args.student:
            raise ConfigError("bench --config times the config's own models; drop --teacher/--student (or --config)")
        task_cfg = TaskBenchConfig(args.config, tuple(args.overrides), args.steps, args.warmup, args.repeats)
        result = run_task_bench(task_cfg)
        print(json.dumps(result, indent=2) if args.json else format_task_result(result))
        return
    if args.overrides:
        raise ConfigError(f"key=value overrides ({args.overrides[0]}) apply to --config only; give --config CONFIG")
    if not (args.teacher and args.student):
        raise ConfigError("bench needs --teacher and --student (model names), or --config CONFIG (a distillation "
                          "config, timed on its own data)")
    cfg = BenchConfig(
        teacher=args.teacher, student=args.student, input=parse_input(args.input), batch=args.batch,
        steps=args.steps, warmup=args.warmup, repeats=args.repeats, classes=args.classes, amp=args.amp,
        channels_last=args.channels_last, compile=args.compile, teacher_mode=args.teacher_mode,
        device=args.device, threads=args.threads,
    )
    result = run_bench(cfg)
    print(json.dumps(result, indent=2) if args.json else format_result(result))


def build_parser() -> argparse.ArgumentParser:
    from distkd import __version__

    parser = argparse.ArgumentParser(prog="distkd", description="Knowledge distillation from a stronger teacher.")
    parser.add_argument("--version", action="version", version=f"distkd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a teacher (no distillation terms) or a student (with a teacher)")
    p.add_argument("config", help="YAML file, or a bundled name from `distkd configs`, or with --resume a run folder")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=0.05")
    p.add_argument("--resume", action="store_true", help="continue the run's checkpoints/last.pt (given a run "
                   "folder: with its saved config)")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on its dataset (or another), or a config's "
                       "model.checkpoint weights")
    p.add_argument("checkpoint", help="a distkd checkpoint (best.pt, last.pt), or a YAML config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="changes to the checkpoint's saved config or to "
                   "the config, e.g. data.root=OTHER or model.checkpoint=PATH")
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--data", metavar="ROOT", help="evaluate on this dataset root instead (an image folder with the "
                   "same classes; the same as data.root=ROOT)")
    p.add_argument("--per-class", action="store_true", help="classification: also each class's top-1 and the "
                   "confusion matrix (rows: true class, columns: predicted)")
    p.add_argument("--scales", type=float, nargs="+", metavar="S", help="segmentation: average the predictions "
                   "over these input scales (e.g. 0.5 0.75 1.0 1.25 1.5 1.75; default: 1.0 alone, the authors' "
                   "reported protocol)")
    p.add_argument("--flip", action="store_true", help="segmentation: also average over mirrored inputs")
    p.set_defaults(func=_eval)

    p = sub.add_parser("export", help="write a run's student alone (state_dict, safetensors, torchscript, onnx; "
                       "detectors: not torchscript) with its class names and preprocessing in a JSON beside it")
    p.add_argument("source", help="a run folder (its checkpoints/best.pt) or a distkd checkpoint")
    p.add_argument("--format", required=True, choices=("state_dict", "safetensors", "torchscript", "onnx"))
    p.add_argument("--out", help="output file (default <run>/export/student.<ext>)")
    p.add_argument("--last", action="store_true", help="the run's last checkpoint instead of the best on val")
    p.add_argument("--ema", action="store_true", help="the checkpoint's EMA weights (runs with train.ema_decay)")
    p.set_defaults(func=_export)

    p = sub.add_parser("predict", help="top-k classes (or a detector's boxes) of image files, from a run, a "
                       "checkpoint or an exported file")
    p.add_argument("source", help="an exported file (with its .json beside it), a run folder or a distkd checkpoint")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--top-k", type=int, default=None, help="classifiers: classes shown per image (default 5)")
    p.add_argument("--min-score", type=float, default=None,
                   help="detectors: the boxes scoring at least this are shown (default 0.5)")
    p.add_argument("--json", action="store_true", help="print the predictions as JSON")
    p.set_defaults(func=_predict)

    p = sub.add_parser("demo", help="teacher -> tiny student on embedded data (silhouette pairs, scenes): alone, KD, "
                       "DIST")
    p.add_argument("--task", choices=("classification", "segmentation", "detection"), default="classification")
    p.add_argument("--detector", choices=("fasterrcnn", "retinanet"),
                   help="the detection demo's models (default fasterrcnn: RoI KD/DIST; retinanet: per-level sigmoid)")
    p.add_argument("--out", help="output folder (default runs/demo, runs/demo_seg, runs/demo_det, "
                   "runs/demo_det_retinanet; with --quick, the same with _quick)")
    p.add_argument("--seeds", type=int, default=3, help="student seeds per method (default 3)")
    p.add_argument("--quick", action="store_true", help="a smaller run (about a minute)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="runs trained at once, one process and one thread each (default: 2, or 1 on one core); "
                        "the results do not depend on it")
    p.set_defaults(func=_demo)

    p = sub.add_parser("compare", help="distillation methods side by side on the embedded data (teacher trained once)")
    p.add_argument("--methods", help="comma-separated method names, or a YAML file of {name: {ce_weight, distill}} "
                   "(default: kd,dkd,fitnet,at,rkd,crd,reviewkd,dist); the student alone is always included")
    p.add_argument("--task", choices=("classification", "segmentation"), default="classification")
    p.add_argument("--seeds", type=int, default=None, help="student seeds per method (default 3; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="shorter runs (as demo --quick)")
    p.add_argument("--out", help="output folder (default runs/compare_<task>, with --quick runs/compare_<task>_quick)")
    p.add_argument("--set", nargs="+", default=[], metavar="key=value",
                   help="overrides for every run, teacher included")
    p.add_argument("--student-set", nargs="+", default=[], metavar="key=value",
                   help="overrides for the students only (their recipe, e.g. optim.lr=0.05); the teacher keeps its own")
    p.set_defaults(func=_compare)

    p = sub.add_parser("cache", help="teacher-output cache: `distkd cache build CONFIG` computes it without training")
    p.add_argument("action", choices=("build",))
    p.add_argument("config", help="a config with teacher_cache.views > 0 (a path or a bundled name)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for train")
    p.set_defaults(func=_cache)

    p = sub.add_parser("models", help="list the model names")
    p.set_defaults(func=_models)
    p = sub.add_parser("configs", help="list the bundled configs, each with a line on what it trains")
    p.set_defaults(func=_configs)
    p = sub.add_parser("reproduce", help="re-run a published table (teachers, rows x seeds) beside the paper's numbers")
    p.add_argument("table", nargs="?", help="table name; `distkd reproduce --list` lists them")
    p.add_argument("--list", action="store_true", help="list the tables and their rows")
    p.add_argument("--rows", nargs="+", metavar="ROW", help="only these rows (default: all)")
    p.add_argument("--seeds", type=int, default=1, help="student seeds per row (default 1)")
    p.add_argument("--teacher-ckpt", nargs="+", default=[], metavar="ROW=PATH",
                   help="use this teacher checkpoint for a row (or a teacher key) instead of training it")
    p.add_argument("--set", nargs="+", default=[], metavar="key=value",
                   help="overrides for every run, e.g. data.root=~/data train.epochs=1")
    p.add_argument("--out", default="runs/reproduce", help="output folder (default runs/reproduce)")
    p.add_argument("--dry-run", action="store_true", help="print the equivalent `distkd train` commands")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (default 1): the dry run prints torchrun "
                   "commands and each run's batch per process; a real run must be launched by torchrun with as many")
    p.set_defaults(func=_reproduce)

    p = sub.add_parser("bench", help="images/s of the student step, teacher forward, distill step, cached distill")
    p.add_argument("--config", help="time this distillation config's own step (any task, e.g. a detection config) "
                   "on its own data, instead of --teacher/--student on random images; with teacher_cache.views > 0 "
                   "also its cached step")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for --config")
    p.add_argument("--teacher", help="teacher model name (see `distkd models`)")
    p.add_argument("--student", help="student model name")
    p.add_argument("--input", default="3x32x32", help="one image's CxHxW (default 3x32x32)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--steps", type=int, default=10, help="steps per timed repeat (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each kind first (default 3)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported (default 5)")
    p.add_argument("--classes", type=int, default=100, help="number of classes (default 100)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast dtype (default none)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format (default on)")
    p.add_argument("--compile", action="store_true", help="torch.compile the student and the teacher")
    p.add_argument("--teacher-mode", choices=("inference", "no_grad"), default="inference",
                   help="the teacher's grad mode (default inference)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    from distkd.engine.cpu import tune_malloc

    tune_malloc()
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DistkdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
