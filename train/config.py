"""One typed config tree: dataclasses loaded from a YAML preset, overridden by `section.key=value` arguments.

Each section is the constructor config of the part it drives: `data` -> `pipeline`, `model` -> `model`, the rest ->
`train`. Unknown keys and wrong types are rejected with the list of valid keys; out-of-range values with the range.
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from byolfast.model.config import ModelConfig
from byolfast.pipeline.config import COLOR_OPS, DataConfig


class ConfigError(ValueError):
    """A config key, type or value a user must fix; the message names the key and what is allowed."""


@dataclass
class TrainConfig:
    """The optimisation and the run.

    Args:
        batch_size: the GLOBAL batch (all ranks together); each rank takes `batch_size / world_size`.
        epochs: length of the schedules in epochs.
        max_steps: stop after this many steps (0: run all epochs); the schedules still span `epochs`.
        base_lr: learning rate per 256 images: lr = base_lr * batch_size / 256.
        weight_decay: LARS/SGD weight decay (not applied to parameters with ndim <= 1).
            The defaults of `epochs`, `base_lr`, `weight_decay` and `base_tau` are the paper's 1000-epoch recipe
            (0.2, 1.5e-6, 0.996); for 300 epochs the paper uses 0.3, 1e-6 and 0.99 (`configs/small_gpu.yaml`).
        warmup_epochs: linear warm-up of the learning rate, then cosine decay to 0.
        optimizer: `lars` (the paper) or `sgd` (momentum SGD with the same exclusions).
        momentum: the optimizer's momentum.
        lars_eta: LARS trust coefficient.
        base_tau: the target EMA's initial decay; tau rises to 1 by a cosine over the run.
        precision: `bf16` (autocast), `fp16` (autocast + gradient scaler), `fp32`, or `auto` (bf16 where the device
            has native bf16 — GPUs from Ampere on, CPUs with AVX512-BF16/AMX —, fp16 on older GPUs, else fp32).
        compile: wrap the model in `torch.compile`.
        device: `auto` (cuda when present), `cpu`, `cuda` or `cuda:N`.
        seed: base seed; each rank mixes its rank into it for its augmentation and dropout-free model init is shared.
        out_dir: the run folder (config, checkpoints, TensorBoard, summary).
        log_every: steps between logged scalars (the only host-device syncs of the loop, apart from fp16's grad
            scaler, which reads its overflow flag every step).
        ckpt_every: steps between checkpoints (0: only at the end and on preemption).
        keep_last: checkpoints kept in the run folder.
        resume: `` (start fresh), `auto` (the newest valid checkpoint in out_dir) or a checkpoint path.
        allow_changed: config keys allowed to differ from the checkpoint's on resume (e.g. `train.base_lr`), and
            `data.size` for a dataset with another number of batches per epoch.
        on_nonfinite: `stop` (keep the last good checkpoint and stop naming the step) or `skip` the step.
        max_skipped_steps: with `skip`, stop anyway after this many skipped steps; with fp16, stop after this many
            steps in a row whose gradients overflowed (the grad scaler skips each one).
        preempt_signals: signals that make the run checkpoint and exit for requeue.
        num_threads: CPU threads for torch (0: torch's default, every core; on the CPU they are shared with the
            loader's workers, whose work is light next to the model's; `byol bench --what e2e` compares counts).
    """

    batch_size: int = 4096
    epochs: int = 1000
    max_steps: int = 0
    base_lr: float = 0.2
    weight_decay: float = 1.5e-6
    warmup_epochs: float = 10.0
    optimizer: str = "lars"
    momentum: float = 0.9
    lars_eta: float = 1e-3
    base_tau: float = 0.996
    precision: str = "auto"
    compile: bool = False
    device: str = "auto"
    seed: int = 0
    out_dir: str = "runs/byol"
    log_every: int = 50
    ckpt_every: int = 1000
    keep_last: int = 3
    resume: str = ""
    allow_changed: list[str] = field(default_factory=list)
    on_nonfinite: str = "stop"
    max_skipped_steps: int = 100
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])
    num_threads: int = 0


@dataclass
class EvalConfig:
    """Evaluation of the frozen encoder (kNN and linear probe), also usable as a monitor during training.

    Args:
        data: a labelled ImageFolder tree; with `train/` and `val/` subfolders those are used, else a fixed
            stratified split holds out `val_fraction` of each class.
        every: run the kNN monitor every this many training steps (0: off). Under torchrun rank 0 runs it while
            the other ranks wait in their next collective: keep `data` small enough to finish within
            `dist.timeout_s`, or raise that.
        k: neighbour counts of the weighted kNN.
        temperature: kNN weight temperature (weights exp(cos / T)).
        image_size: evaluation crop; images are resized to image_size * 8/7 then centre-cropped.
        batch_size: feature-extraction batch.
        linear_epochs: epochs of the linear probe that the training monitor also fits (0: kNN only); `byol eval`
            takes `--linear --linear-epochs N` instead.
        val_fraction: held-out share of each class when `data` has no `val/`.
    """

    data: str = ""
    every: int = 0
    k: list[int] = field(default_factory=lambda: [20, 200])
    temperature: float = 0.07
    image_size: int = 224
    batch_size: int = 256
    linear_epochs: int = 0
    val_fraction: float = 0.2


@dataclass
class DistConfig:
    """torch.distributed settings (read only when launched by torchrun).

    Args:
        backend: `auto` (nccl on GPUs, gloo on CPUs), `nccl` or `gloo`.
        timeout_s: a collective that waits longer (e.g. on a dead rank) ends the job with an error.
        check_every: every this many steps, check by hash that weights agree across ranks (0: off).
    """

    backend: str = "auto"
    timeout_s: int = 600
    check_every: int = 0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)


# --- building dataclasses from plain data ----------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str, default: Any = None) -> Any:
    """Check `value` against the annotation `tp` (converting lists to tuples and ints to floats).

    A section (dataclass) is merged over `default`, the parent's default for it, so a partial section keeps the
    parent's defaults for the keys it does not name (e.g. view2's blur_p of 0.1).
    """
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return _from_dict(tp, value, key, default)
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _from_dict(cls: type, data: dict, prefix: str = "", base: Any = None) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"section {prefix!r}" if prefix else "the top level"
        raise ConfigError(f"unknown key(s) {', '.join(repr(f'{prefix}.{k}' if prefix else k) for k in unknown)} "
                          f"in {where}; valid keys: {', '.join(names)}")
    base = copy.deepcopy(base) if base is not None else cls()
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k, getattr(base, k)) for k, v in data.items()}
    for k, v in kwargs.items():
        setattr(base, k, v)
    return base


def to_dict(cfg: Any) -> dict:
    """The config as plain data (tuples as lists), for YAML, JSON and checkpoints."""
    def plain(x):
        if dataclasses.is_dataclass(x):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x
    return plain(cfg)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value (e.g. train.batch_size=256)")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: cannot parse the value ({err.problem})") from None
    return parts, value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """The defaults, merged with the YAML file at `path`, then with `section.key=value` overrides; validated."""
    data: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found (presets are in configs/)")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
        data = loaded or {}
    for text in overrides:
        parts, value = parse_override(text)
        nested: Any = value
        for p in reversed(parts):
            nested = {p: nested}
        data = _merge(data, nested)
    cfg = _from_dict(Config, data)
    validate(cfg)
    return cfg


def _check(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is out of range: {allowed}")


def _check_prob(key: str, v: float) -> None:
    _check(0.0 <= v <= 1.0, key, "a probability in [0, 1]", v)


def _check_range(key: str, lo_hi: tuple, lo: float, hi: float | None = None) -> None:
    a, b = lo_hi
    ok = lo <= a <= b and (hi is None or b <= hi)
    _check(ok, key, f"[low, high] with {lo} <= low <= high" + (f" <= {hi}" if hi is not None else ""), list(lo_hi))


def validate_eval(e: EvalConfig, prefix: str = "eval.") -> None:
    """The `eval` section's ranges; `byol eval` checks its options with them (prefix `--`)."""
    def key(name: str) -> str:
        return prefix + (name.replace("_", "-") if prefix == "--" else name)

    _check(all(k >= 1 for k in e.k) and len(e.k) >= 1, key("k"), "positive integers", e.k)
    _check(e.temperature > 0, key("temperature"), "> 0", e.temperature)
    _check(e.every >= 0, key("every"), ">= 0 (0: off)", e.every)
    _check(not (e.every and not e.data), key("data"), "a labelled ImageFolder tree when eval.every > 0 (the kNN "
           "monitor needs one; or set eval.every=0)", e.data)
    _check(e.batch_size >= 1, key("batch_size"), ">= 1", e.batch_size)
    _check(e.image_size >= 8, key("image_size"), ">= 8", e.image_size)
    _check(e.linear_epochs >= 0, key("linear_epochs"), ">= 0", e.linear_epochs)
    _check(0 < e.val_fraction < 1, key("val_fraction"), "(0, 1)", e.val_fraction)


def validate(cfg: Config) -> None:
    """Reject values out of range, naming the key and the allowed range."""
    from byolfast.model.resnet import RESNETS
    from byolfast.pipeline.registry import BACKENDS

    d, m, t, e = cfg.data, cfg.model, cfg.train, cfg.eval
    _check(d.backend in BACKENDS, "data.backend", f"one of {', '.join(BACKENDS)}", d.backend)
    _check(d.image_size >= 8, "data.image_size", ">= 8 pixels", d.image_size)
    _check(d.num_workers >= 0, "data.num_workers", ">= 0", d.num_workers)
    _check(d.synthetic_size >= 1, "data.synthetic_size", ">= 1", d.synthetic_size)
    _check(0.0 <= d.max_bad_fraction <= 1.0, "data.max_bad_fraction", "a fraction in [0, 1]", d.max_bad_fraction)
    for backend in BACKENDS.values():   # each backend's section checks its own ranges
        if backend.settings is not None:
            for key, allowed, value in getattr(d, backend.name).problems():
                _check(False, f"data.{backend.name}.{key}", allowed, value)
    for name in ("view1", "view2"):
        v = getattr(d.augment, name)
        k = f"data.augment.{name}"
        _check_range(f"{k}.crop_scale", v.crop_scale, 0.0, 1.0)
        _check(v.crop_scale[1] > 0, f"{k}.crop_scale", "high > 0", list(v.crop_scale))
        _check_range(f"{k}.crop_ratio", v.crop_ratio, 1e-3)
        _check_range(f"{k}.blur_sigma", v.blur_sigma, 1e-3)
        for p in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p", "solarize_threshold"):
            _check_prob(f"{k}.{p}", getattr(v, p))
        for s in ("brightness", "contrast", "saturation"):
            _check(getattr(v, s) >= 0, f"{k}.{s}", ">= 0", getattr(v, s))
        _check(0 <= v.hue <= 0.5, f"{k}.hue", "[0, 0.5]", v.hue)
        _check(0 < v.blur_kernel_frac <= 1, f"{k}.blur_kernel_frac", "(0, 1]", v.blur_kernel_frac)
    _check(all(s > 0 for s in d.augment.std), "data.augment.std", "positive values", list(d.augment.std))
    _check(d.augment.color_ops in COLOR_OPS, "data.augment.color_ops", f"one of {', '.join(COLOR_OPS)}",
           d.augment.color_ops)
    _check(m.arch in RESNETS, "model.arch", f"one of {', '.join(RESNETS)}", m.arch)
    _check(m.bn in ("sync", "local"), "model.bn", "sync or local", m.bn)
    for k in ("projector_hidden", "projector_out", "predictor_hidden"):
        _check(getattr(m, k) >= 1, f"model.{k}", ">= 1", getattr(m, k))
    _check(t.batch_size >= 2, "train.batch_size", ">= 2 (BatchNorm needs two samples)", t.batch_size)
    _check(t.epochs >= 1, "train.epochs", ">= 1", t.epochs)
    _check(t.max_steps >= 0, "train.max_steps", ">= 0 (0: no limit)", t.max_steps)
    _check(t.base_lr > 0, "train.base_lr", "> 0", t.base_lr)
    _check(t.weight_decay >= 0, "train.weight_decay", ">= 0", t.weight_decay)
    _check(0 <= t.warmup_epochs <= t.epochs, "train.warmup_epochs", f"[0, train.epochs={t.epochs}]", t.warmup_epochs)
    _check(t.optimizer in ("lars", "sgd"), "train.optimizer", "lars or sgd", t.optimizer)
    _check(0 <= t.momentum < 1, "train.momentum", "[0, 1)", t.momentum)
    _check(t.lars_eta > 0, "train.lars_eta", "> 0", t.lars_eta)
    _check(0 <= t.base_tau <= 1, "train.base_tau", "[0, 1]", t.base_tau)
    _check(t.precision in ("auto", "bf16", "fp16", "fp32"), "train.precision", "auto, bf16, fp16 or fp32",
           t.precision)
    _check(t.log_every >= 1, "train.log_every", ">= 1", t.log_every)
    _check(t.ckpt_every >= 0, "train.ckpt_every", ">= 0 (0: only at the end)", t.ckpt_every)
    _check(t.keep_last >= 1, "train.keep_last", ">= 1", t.keep_last)
    _check(t.on_nonfinite in ("stop", "skip"), "train.on_nonfinite", "stop or skip", t.on_nonfinite)
    _check(t.max_skipped_steps >= 0, "train.max_skipped_steps", ">= 0", t.max_skipped_steps)
    _check(t.num_threads >= 0, "train.num_threads", ">= 0", t.num_threads)
    _check(0 <= t.seed < 2**63, "train.seed", "[0, 2^63)", t.seed)
    _check(bool(t.out_dir), "train.out_dir", "a folder path", t.out_dir)
    import signal
    for s in t.preempt_signals:
        _check(isinstance(getattr(signal, s, None), signal.Signals) and s not in ("SIGKILL", "SIGSTOP"),
               "train.preempt_signals", "names of signals a process can catch, such as SIGTERM, SIGINT, SIGUSR1", s)
    validate_eval(e)
    _check(cfg.dist.backend in ("auto", "nccl", "gloo"), "dist.backend", "auto, nccl or gloo", cfg.dist.backend)
    _check(cfg.dist.timeout_s >= 1, "dist.timeout_s", ">= 1", cfg.dist.timeout_s)
    _check(cfg.dist.check_every >= 0, "dist.check_every", ">= 0", cfg.dist.check_every)


def check_world(cfg: Config, world_size: int) -> int:
    """The per-rank batch; the global batch must split evenly over the ranks."""
    if cfg.train.batch_size % world_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by the world size {world_size}: "
                          f"use a multiple of {world_size}")
    return cfg.train.batch_size // world_size


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
