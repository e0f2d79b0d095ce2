"""The demo: embedded scenes -> BYOL -> kNN against random init, the no-predictor ablation, learning curves.

It shows, on held-out images, what the paper claims at a size that fits two CPU cores: BYOL's features recognise
unseen parts of the scenes better than the random network it started from, it does not collapse, and the same run
without the predictor does (`collapse_std` -> 0). On a GPU it runs `GPU_SCALE` times as many epochs in about the time.
"""
from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Optional

from byolfast.pipeline.demo_data import build_scenes
from byolfast.pipeline.storage import write_json_atomic
from byolfast.train.config import load_config, to_dict
from byolfast.train.distributed import resolve_device
from byolfast.train.evaluate import evaluate_encoder, random_init_encoder
from byolfast.train.loop import Trainer
from byolfast.train.runtime import setup_logging

log = logging.getLogger(__name__)
DEFAULT_PRESET = Path(__file__).resolve().parent.parent / "configs" / "demo_cpu.yaml"
GPU_SCALE = 10


def device_overrides(device_type: str, cfg) -> list[str]:
    """More epochs (and kNN points as far apart in epochs) where the device affords them: `GPU_SCALE` on CUDA."""
    if device_type != "cuda":
        return []
    return [f"train.epochs={cfg.train.epochs * GPU_SCALE}", f"eval.every={cfg.eval.every * GPU_SCALE}"]


def _run(cfg) -> tuple[dict, Trainer]:
    trainer = Trainer(cfg)
    summary = trainer.run()
    return summary, trainer


def plot_curves(histories: dict[str, list[dict]], path: Path, knn_random: float | None = None) -> None:
    """Loss and collapse_std against the step for each run, and the kNN curve against the random network's (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if any("knn_top1" in m for h in histories.values() for m in h) else 2,
                             figsize=(13, 4))
    for name, hist in histories.items():
        steps = [m["step"] for m in hist if "loss" in m]
        axes[0].plot(steps, [m["loss"] for m in hist if "loss" in m], label=name)
        axes[1].plot(steps, [m["collapse_std"] for m in hist if "loss" in m], label=name)
        if len(axes) > 2:
            pts = [(m["step"], m["knn_top1"]) for m in hist if "knn_top1" in m]
            if pts:
                axes[2].plot(*zip(*pts), marker="o", label=name)
    axes[0].set(title="BYOL loss", xlabel="step", ylabel="2 - 2 cos (symmetrised)")
    axes[1].set(title="collapse monitor", xlabel="step", ylabel="std of normalised projection x sqrt(d)")
    axes[1].axhline(0, color="grey", lw=0.5)
    if len(axes) > 2:
        if knn_random is not None:
            axes[2].axhline(knn_random, color="grey", ls="--", label="random init")
        axes[2].set(title="kNN top-1 (held-out)", xlabel="step", ylim=(0, None))
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict(knn_random: float, knn_byol: float, steps: int) -> str:
    """One plain sentence on what the kNN numbers show, so that a short run is not read as a broken trainer."""
    if knn_byol > knn_random:
        return (f"  verdict                BYOL's features beat the random network's by "
                f"{100 * (knn_byol - knn_random):.1f} points of kNN top-1 after {steps} steps")
    return (f"  verdict                not learned yet: after {steps} steps BYOL's kNN is "
            f"{100 * (knn_random - knn_byol):.1f} points below the random network's. This budget shows the "
            "mechanism (no collapse with the predictor, collapse without it), not the representation: see the "
            "README's 'What the demo shows'")


def run_demo(out: str = "runs/demo", quick: bool = False, config: Optional[str] = None,
             data_root: str = "data/demo", extra: tuple[str, ...] = ()) -> dict:
    """Build the data, train with and without the predictor, evaluate, write `out/summary.json` and curves PNG."""
    setup_logging()
    t_start = time.perf_counter()
    out_dir = Path(out)
    base = load_config(config or DEFAULT_PRESET, list(extra))
    size = base.data.image_size
    scenes = build_scenes(Path(data_root) / f"scenes{size}", size=size)   # the demo's data only
    overrides = [f"data.path={scenes / 'train'}", f"eval.data={scenes}", f"train.out_dir={out_dir / 'byol'}",
                 "train.resume="]
    if quick:
        overrides += ["train.max_steps=6", "train.log_every=2", "train.ckpt_every=0"]
    device = resolve_device(base.train.device)   # the device the trainer will use, so both kNN runs share it
    if not quick:
        overrides += device_overrides(device.type, base)
    cfg = load_config(config or DEFAULT_PRESET, [*overrides, *extra])   # the caller's overrides win

    log.info("kNN of a randomly initialised %s on the held-out scene patches", cfg.model.arch)
    enc = random_init_encoder(cfg.model.arch, cfg.model.small_stem, device, seed=cfg.train.seed,
                              channels_last=cfg.model.channels_last)
    knn_random = evaluate_encoder(enc, cfg.eval, device, cfg.model.channels_last, mean=cfg.data.augment.mean,
                                  std=cfg.data.augment.std)

    log.info("BYOL pretraining (%s, %d px, batch %d)", cfg.model.arch, size, cfg.train.batch_size)
    trainer = Trainer(cfg)
    # The network BYOL starts from: with model.zero_init_residual (the paper's) every residual block starts as the
    # identity, so its features are far weaker than the standard random network's above, the baseline to beat.
    knn_start = evaluate_encoder(trainer.model.encoder, cfg.eval, trainer.device, cfg.model.channels_last,
                                 mean=cfg.data.augment.mean, std=cfg.data.augment.std)
    byol_summary = trainer.run()
    knn_byol = evaluate_encoder(trainer.model.encoder, cfg.eval, trainer.device, cfg.model.channels_last,
                                mean=cfg.data.augment.mean, std=cfg.data.augment.std)

    log.info("ablation: the same run without the predictor")
    ablation = copy.deepcopy(cfg)
    ablation.model.use_predictor = False
    ablation.train.out_dir = str(out_dir / "no_predictor")
    ablation.eval.every = 0
    abl_summary, abl_trainer = _run(ablation)

    summary = {
        "images_per_sec": byol_summary["images_per_sec"],
        "final_loss": byol_summary["final_loss"],
        "knn_top1_random_init": knn_random["knn_top1"],
        "knn_top1_byol": knn_byol["knn_top1"],
        "knn_top1_byol_start": knn_start["knn_top1"],
        "knn_random_init": knn_random,
        "knn_byol_start": knn_start,
        "knn_byol": knn_byol,
        "collapse_std": byol_summary["collapse_std"],
        "ablation_no_predictor_collapse_std": abl_summary["collapse_std"],
        "ablation_no_predictor_final_loss": abl_summary["final_loss"],
        "steps": byol_summary["steps"],
        "seconds": time.perf_counter() - t_start,
        "device": str(trainer.device),
        "config": to_dict(cfg),
    }
    n_classes = sum(1 for p in (scenes / "val").iterdir() if p.is_dir())
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "summary.json", summary)
    plot_curves({"BYOL": [{"step": 0, "knn_top1": knn_start["knn_top1"]}, *trainer.state.history],
                 "no predictor (ablation)": abl_trainer.state.history}, out_dir / "curves.png", knn_random["knn_top1"])
    lines = [
        "byolfast demo summary",
        f"  pretraining speed      {summary['images_per_sec']:.1f} images/sec ({summary['device']})",
        f"  final BYOL loss        {summary['final_loss']:.4f} after {summary['steps']} steps",
        f"  kNN top-1 (k={cfg.eval.k[0]})     random init {summary['knn_top1_random_init']:.3f}  ->  BYOL "
        f"{summary['knn_top1_byol']:.3f}  (held-out scene patches, {n_classes} scenes; BYOL's start "
        f"{summary['knn_top1_byol_start']:.3f})",
        f"  feature rank           random init {knn_random['feature_rank']:.1f}  ->  BYOL "
        f"{knn_byol['feature_rank']:.1f}  (effective rank of the encoder's features; falling = dimensional collapse)",
        f"  collapse check         std*sqrt(d) = {summary['collapse_std']:.3f} with the predictor, "
        f"{summary['ablation_no_predictor_collapse_std']:.3f} without (~1 spread, ->0 collapsed)",
        f"  wall time              {summary['seconds'] / 60:.1f} min",
        f"  written                {out_dir / 'summary.json'}, {out_dir / 'curves.png'}",
        verdict(summary["knn_top1_random_init"], summary["knn_top1_byol"], summary["steps"]),
    ]
    print("\n".join(lines))
    return summary
