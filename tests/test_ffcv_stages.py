"""`benchmarks.ffcv_stages` on a tiny converted beton: every stage is timed, per image, and they add up."""
from __future__ import annotations

import pytest

pytest.importorskip("ffcv")

from byolfast.pipeline.config import DataConfig  # noqa: E402


def test_stages_are_timed_per_image(tmp_path) -> None:
    from byolfast.benchmarks.bench_data import build_bench_images
    from byolfast.benchmarks.ffcv_stages import STAGES, ffcv_stage_ms
    from byolfast.pipeline.convert import convert_dataset

    folder = build_bench_images(tmp_path, 16, size=(64, 48))
    convert_dataset(str(folder), str(tmp_path / "converted"), ("ffcv",), workers=1, max_side=64, progress=False)
    cfg = DataConfig(backend="ffcv", path=str(tmp_path / "converted"), image_size=48)
    ms = ffcv_stage_ms(cfg, 8, repeats=3)
    assert list(ms) == [*STAGES, "total"]
    assert all(ms[s] > 0 for s in ("decode", "crop", "hand_over", "colour", "normalise"))
    # the blur is a difference of two passes of the fused kernel, floored at 0: on 16 small images it can be within
    # the noise (at 224 px it is ~0.3 ms a sample)
    assert ms["flip"] >= 0 and ms["blur"] >= 0
    assert ms["total"] == pytest.approx(sum(ms[s] for s in STAGES))
