"""BYOL learns: one epoch of the demo's recipe on the embedded scenes beats the random network it starts from.

The demo's preset (ResNet-18, the paper's augmentations, LARS, EMA) through the real trainer and torch loader, over
one epoch of the 4,400 training patches (68 steps), then kNN top-1 on the held-out patches (parts of each photograph
that no training patch shows). The network BYOL starts from is the random network (`zero_init_residual` off in the
preset, same seed), so the difference is what training did. A broken loss, target update, predictor or augmentation
that stops learning leaves the features at or below their start, and fails this test.
"""
from pathlib import Path

import pytest

from byolfast.pipeline.demo_data import build_scenes
from byolfast.train.config import load_config
from byolfast.train.demo import DEFAULT_PRESET
from byolfast.train.evaluate import evaluate_encoder
from byolfast.train.loop import Trainer

MARGIN = 0.04   # kNN top-1 points over the start (22 classes, 1,100 held-out patches: one std of the estimate ~0.015)


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
    start = _knn(trainer, cfg)
    summary = trainer.run()
    learned = _knn(trainer, cfg)
    assert summary["steps"] == 68 and summary["collapse_std"] > 0.3
    assert learned >= start + MARGIN, f"kNN top-1 {start:.3f} at the start, {learned:.3f} after one epoch"
