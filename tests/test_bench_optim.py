"""`byol bench --what optim`: the fused LARS step and the per-tensor reference, timed side by side."""
from __future__ import annotations

import json

import pytest
import torch

TINY = ["model.arch=resnet18", "model.projector_hidden=32", "model.predictor_hidden=32", "model.projector_out=16",
        "train.num_threads=1"]


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_bench_optim_json_schema(tmp_path):
    from benchmarks.bench import main
    from benchmarks.report import format_table

    out = tmp_path / "optim.json"
    assert main(["--what", "optim", "--out", str(out), "--repeats", "2", "--optim-iters", "1", *TINY]) == 0
    records = json.loads(out.read_text())["records"]
    assert [r["variant"] for r in records] == ["fused", "per_tensor"]
    for r in records:
        assert r["what"] == "optim" and r["ms_per_update"] > 0 and len(r["runs_ms"]) == 2
        assert r["arch"] == "resnet18" and r["num_tensors"] > 60 and r["num_values"] > 10_000_000   # ResNet-18 + heads
        assert r["images_per_sec"] is None and "peak_mem_mb" in r
    assert records[1]["ratio_to_fused"] > 0
    assert "ms/update" in format_table(records)
