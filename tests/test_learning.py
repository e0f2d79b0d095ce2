"""BYOL learns: one epoch of the demo's recipe on the embedded scenes beats the random network it starts from.

The demo's preset (ResNet-18, the paper's augmentations, LARS, EMA) through the real trainer and torch loader, over
one epoch of the 4,400 training patches (68 steps), then kNN top-1 on the held-out patches (parts of each photograph
that no training patch shows). The network BYOL starts from is the random network (`zero_init_residual` off in the
preset, same seed), so the difference is what training did. What fails it:
- a loss or augmentation that stops learning: the kNN stays at or below its start;
- a predictor that stops working: the projections collapse (`collapse_std` ~0.45 after one epoch without the
  predictor, ~0.8 with it), although one epoch is too short for the kNN to show it;
- a target that stops following the online network: its weights stay where they started.
"""
from pathlib import Path

import pytest

from byolfast.pipeline.demo_data import build_scenes
from byolfast.train.config import load_config
from byolfast.train.demo import DEFAULT_PRESET
from byolfast.train.evaluate import evaluate_encoder
from byolfast.train.loop import Trainer

MARGIN = 0.04   # kNN top-1 points over the start (22 classes, 1,100 held-out patches: one std of the estimate ~0.015)
MIN_COLLAPSE_STD = 0.6   # spread projections: ~0.8 with the predictor after one epoch, ~0.45 without it


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_scenes(tmp_path_factory.mktemp("scenes") / "scenes32", size=32)


def _knn(trainer: Trainer, cfg) -> float:
    return evaluate_encoder(trainer.model.encoder, cfg.eval, trainer.device, cfg.model.channels_last,
                            mean=cfg.data.augment.mean, std=cfg.data.augment.std)["knn_top1"]


@pytest.mark.slow
def test_one_epoch_of_byol_beats_the_random_network_it_starts_from(scenes: Path, tmp_path: Path) -> None:
    cfg = load_config(DEFAULT_PRESET, [f"data.path={scenes / 'train'}", f"eval.data={scenes}", "eval.every=0",
                                       "eval.k=[20]", "train.epochs=1", "train.warmup_epochs=0.2",
                                       "train.ckpt_every=0", f"train.out_dir={tmp_path / 'run'}", "train.resume="])
    trainer = Trainer(cfg)
    target_start = [p.detach().clone() for p in trainer.model.target["encoder"].parameters()]
    start = _knn(trainer, cfg)
    summary = trainer.run()
    learned = _knn(trainer, cfg)
    assert summary["steps"] == 68
    assert summary["collapse_std"] > MIN_COLLAPSE_STD, f"projections collapsing: {summary['collapse_std']:.3f}"
    moved = sum(float((p.detach() - p0).norm()) for p, p0 in zip(trainer.model.target["encoder"].parameters(),
                                                                 target_start))
    assert moved > 0.1, f"the target encoder moved by {moved:.2e} in one epoch: its update is broken"
    assert learned >= start + MARGIN, f"kNN top-1 {start:.3f} at the start, {learned:.3f} after one epoch"
