"""The `byol` command: train, eval, export, convert, bench, profile, tune, demo, demo-data.

A user mistake (bad config key, missing data, unusable checkpoint) ends with one line `byol: error: ...` and exit
status 2; a numerical failure with status 1; a preemption with status 75 after its checkpoint is written.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger("byol")


def config_file_overrides(path: str) -> list[str]:
    """The keys of a YAML config file as `section.key=value` overrides, each value written back as YAML (so it parses
    to itself); sections merge key by key, as they do over the defaults. Same errors as `load_config`'s file."""
    import yaml

    from byolfast.train.config import ConfigError

    if not Path(path).is_file():
        raise ConfigError(f"config file {path!r} not found (presets are in configs/)")
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path!r} is not valid YAML: {err}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of sections")

    def flat(data: dict, prefix: str) -> list[str]:
        return [o for k, v in data.items() for o in (flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else
                                                        [f"{prefix}{k}={yaml.safe_dump(v, default_flow_style=True)}"])]
    return flat(loaded or {}, "")


def load_configs(paths: Optional[Sequence[str]], overrides: Sequence[str] = ()):
    """`--config A.yaml --config B.yaml k=v`: the defaults, then A, then B (later files override earlier ones key by
    key), then the `section.key=value` overrides; validated once, as `train.config.load_config` does."""
    from byolfast.train.config import load_config

    paths = list(paths or [])
    later = [o for p in paths[1:] for o in config_file_overrides(p)]
    return load_config(paths[0] if paths else None, [*later, *overrides])


def _train(args: argparse.Namespace) -> int:
    from byolfast.train.loop import train

    cfg = load_configs(args.config, list(args.overrides))
    if args.resume:   # a path is taken as it is (as an override it would be read as YAML: '#', numbers...)
        cfg.train.resume = args.resume
    summary = train(cfg)
    if summary.get("run_dir"):
        log.info("done: %s", json.dumps({k: v for k, v in summary.items() if k != "loader"}))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from byolfast.pipeline.config import IMAGENET_MEAN, IMAGENET_STD
    from byolfast.train.checkpoint import load_checkpoint
    from byolfast.train.config import ConfigError, EvalConfig, validate_eval
    from byolfast.train.distributed import resolve_device
    from byolfast.train.evaluate import encoder_from_checkpoint, evaluate_encoder

    device = resolve_device(args.device, setting="--device")
    state = load_checkpoint(args.checkpoint)
    encoder, meta = encoder_from_checkpoint(state, device)
    image_size = args.image_size or state["config"]["data"]["image_size"]
    cfg = EvalConfig(data=args.data, image_size=image_size, batch_size=args.batch_size, k=args.k,
                     linear_epochs=args.linear_epochs)
    validate_eval(cfg, prefix="--")
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}")
    augment = state["config"].get("data", {}).get("augment", {})   # normalise as the encoder was trained
    result = evaluate_encoder(encoder, cfg, device, meta["channels_last"], linear=args.linear,
                              num_workers=args.workers, mean=augment.get("mean", IMAGENET_MEAN),
                              std=augment.get("std", IMAGENET_STD))
    result.update({"checkpoint": str(args.checkpoint), "step": state["step"], "data": args.data, **meta})
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    from byolfast.train.checkpoint import load_checkpoint
    from byolfast.train.evaluate import export_encoder

    info = export_encoder(load_checkpoint(args.checkpoint), args.out)
    print(json.dumps(info, indent=2))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from byolfast.pipeline.convert import convert_dataset

    formats = () if args.format in ("all", "both") else (args.format,)   # (): every format
    report = convert_dataset(args.src, args.out, formats, file_list=args.file_list, workers=args.workers,
                             max_side=args.max_side, jpeg_quality=args.jpeg_quality, shard_size=args.shard_size,
                             ffcv_write_mode=args.write_mode, overwrite=args.overwrite)
    print(report.summary() if hasattr(report, "summary") else report)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from byolfast.train.demo import run_demo

    run_demo(args.out, quick=args.quick, config=args.config, extra=tuple(args.overrides))
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    from byolfast.pipeline.demo_data import build_demo_data

    paths = build_demo_data(args.out, size=args.size)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


def _forward(module: str):
    def run(args: argparse.Namespace) -> int:
        import importlib
        return importlib.import_module(module).main(args.rest)
    return run


def build_parser() -> argparse.ArgumentParser:
    from byolfast.pipeline import registry

    p = argparse.ArgumentParser(prog="byol", description="Fast, faithful BYOL pretraining.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="pretrain BYOL (one process, or many under torchrun)")
    t.add_argument("--config", action="append", help="a YAML preset (configs/*.yaml); given again (e.g. a `byol tune` "
                   "output), later files override earlier ones, and section.key=value overrides all files")
    t.add_argument("--resume", help="'auto' (newest valid checkpoint in train.out_dir) or a checkpoint path")
    t.add_argument("overrides", nargs="*", metavar="section.key=value")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="kNN (and linear probe) of a checkpoint's encoder on a labelled ImageFolder")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", required=True, help="ImageFolder tree (with train/ and val/, or split 80/20)")
    e.add_argument("--linear", action="store_true", help="also train a linear probe")
    e.add_argument("--linear-epochs", type=int, default=100)
    e.add_argument("--k", type=int, nargs="+", default=[20, 200])
    e.add_argument("--image-size", type=int, default=0, help="evaluation crop (default: the training size)")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--device", default="auto")
    e.add_argument("--out", help="also write the JSON here")
    e.set_defaults(func=_eval)

    x = sub.add_parser("export", help="write the encoder as a torchvision state_dict")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", required=True)
    x.set_defaults(func=_export)

    formats = registry.formats()
    c = sub.add_parser("convert", help=f"ImageNet-style folder -> the formats of {', '.join(formats)}")
    c.add_argument("src", help="ImageFolder tree (root/<class>/<image>, or root/train/<class>/...)")
    c.add_argument("out", help="output folder")
    c.add_argument("--format", choices=(*formats, "all", "both"), default="all",
                   help="one format, or all of them (`both`: the same, its name from when there were two)")
    c.add_argument("--file-list", help="text file of 'relative/path label' lines instead of class folders")
    c.add_argument("--workers", type=int, default=0, help="worker processes (0: all cores)")
    c.add_argument("--max-side", type=int, default=256, help="longer side after resizing (0: keep)")
    c.add_argument("--jpeg-quality", type=int, default=90)
    c.add_argument("--shard-size", type=int, default=1000, help="images per DALI shard")
    c.add_argument("--write-mode", default="jpg", choices=("jpg", "raw", "smart"),
                   help="FFCV image storage")
    c.add_argument("--overwrite", action="store_true", help="rebuild outputs that are already complete")
    c.set_defaults(func=_convert)

    for name, module, text in (("bench", "byolfast.benchmarks.bench",
                                "images/sec: loader-only, model-only, end-to-end, EMA"),
                               ("profile", "byolfast.benchmarks.profile", "torch.profiler trace + bottleneck report"),
                               ("tune", "byolfast.benchmarks.tune",
                                "the fastest loader settings for this machine, as a YAML")):
        b = sub.add_parser(name, help=text, add_help=False)
        b.add_argument("rest", nargs=argparse.REMAINDER)
        b.set_defaults(func=_forward(module))

    d = sub.add_parser("demo", help="embedded data -> BYOL -> kNN vs random init, ablation, plots (10x the epochs "
                                    "on a GPU)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--config", default=None, help="preset to start from (default configs/demo_cpu.yaml)")
    d.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    d.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, as in byol train")
    d.set_defaults(func=_demo)

    dd = sub.add_parser("demo-data", help="write the embedded datasets as ImageFolder trees")
    dd.add_argument("--out", default="data/demo")
    dd.add_argument("--size", type=int, default=32)
    dd.set_defaults(func=_demo_data)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from byolfast.pipeline.contract import DataError
    from byolfast.train.checkpoint import CheckpointError
    from byolfast.train.config import ConfigError
    from byolfast.train.preempt import Preempted
    from byolfast.train.runtime import setup_logging
    from byolfast.train.step import NonFiniteError

    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("bench", "profile", "tune"):
        # Their own parsers take every argument (argparse's REMAINDER refuses a first one starting with `-`).
        args = argparse.Namespace(command=argv[0], rest=argv[1:], func=_forward(f"byolfast.benchmarks.{argv[0]}"))
    else:
        args = build_parser().parse_args(argv)
    if args.command == "convert" and args.workers == 0:
        import os
        args.workers = os.cpu_count() or 1
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"byol {args.command}: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"byol {args.command}: stopped: {err}", file=sys.stderr)
        return 1
    except OSError as err:   # a folder that cannot be created or written (out_dir, --out, ...)
        where = f" {err.filename!r}" if getattr(err, "filename", None) else ""
        print(f"byol {args.command}: error: cannot write or read{where}: {err.strerror or err}", file=sys.stderr)
        return 2
    except Preempted as p:
        return p.code
    except KeyboardInterrupt:
        print(f"byol {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
