"""`byol demo --quick`: the main job end to end on the embedded scenes (a few steps), its verdict line, its data."""
import json

from byolfast.train.demo import run_demo, verdict


def test_verdict_says_which_side_of_random_init_byol_is():
    assert "beat the random network's by 14.0 points" in verdict(0.19, 0.33, 1000)
    assert "not learned yet" in verdict(0.19, 0.13, 176) and "6.0 points below" in verdict(0.19, 0.13, 176)


def test_quick_demo_writes_its_summary_and_prints_a_verdict(tmp_path, capsys):
    summary = run_demo(out=str(tmp_path / "demo"), quick=True, data_root=str(tmp_path / "data"),
                       extra=("train.batch_size=32", "eval.k=[5]", "data.num_workers=0"))
    written = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert written["steps"] == summary["steps"] == 6
    for key in ("knn_top1_random_init", "knn_top1_byol", "knn_top1_byol_start"):
        assert 0.0 <= written[key] <= 1.0
    assert 1.0 <= written["knn_byol"]["feature_rank"] <= 512
    assert (tmp_path / "demo" / "curves.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "kNN top-1" in out and "verdict" in out and "feature rank" in out


def test_scene_patches_are_reproducible_and_held_out_rows_are_unseen():
    from byolfast.pipeline.demo_data import SCENES, scene_patches
    x, y = scene_patches("val", 16, per_class=3)
    x2, y2 = scene_patches("val", 16, per_class=3)
    assert x.shape == (3 * len(SCENES), 16, 16, 3) and x.dtype.name == "uint8"
    assert (x == x2).all() and (y == y2).all() and sorted(set(y.tolist())) == list(range(len(SCENES)))
    assert not (x == scene_patches("val", 16, per_class=3, seed=1)[0]).all()


def test_every_patch_lies_inside_its_split_and_the_splits_do_not_meet():
    import numpy as np

    from byolfast.pipeline.demo_data import SCENE_SPLITS, patch_box
    (_, train_hi), (val_lo, _) = SCENE_SPLITS["train"], SCENE_SPLITS["val"]
    assert train_hi < val_lo
    rng = np.random.default_rng(0)
    for h, w in ((102, 102), (172, 448), (427, 640), (1411, 1411), (640, 300)):   # the smallest scenes, and others
        for split, (lo, hi) in SCENE_SPLITS.items():
            for _ in range(500):
                top, left, side = patch_box(h, w, split, rng)
                assert side >= 1 and int(lo * h) <= top and top + side <= int(hi * h) and 0 <= left <= w - side
    # the rows of the two splits never overlap, so no held-out patch shares a pixel with a training patch
    assert all(int(train_hi * h) <= int(val_lo * h) for h in range(50, 2000))


def test_the_demo_runs_longer_on_a_gpu():
    from byolfast.train.config import load_config
    from byolfast.train.demo import DEFAULT_PRESET, GPU_SCALE, device_overrides
    cfg = load_config(DEFAULT_PRESET, [])
    assert device_overrides("cpu", cfg) == []
    scaled = load_config(DEFAULT_PRESET, device_overrides("cuda", cfg))
    assert scaled.train.epochs == GPU_SCALE * cfg.train.epochs and scaled.eval.every == GPU_SCALE * cfg.eval.every
