"""Shared fixtures: tiny real-image datasets in temporary folders and a tiny config."""
from __future__ import annotations

import gc

import pytest
import torch

# One torch thread per test process: next to loader workers and subprocesses on two cores, OpenMP barriers with a
# descheduled thread make multi-threaded steps orders of magnitude slower.
torch.set_num_threads(1)


@pytest.fixture(scope="module", autouse=True)
def _collect_each_modules_garbage():
    """FFCV loaders are reference cycles whose numba finalizers raise an ignored error when collected; collected at
    the end of the module that made them, that error cannot land inside a later parse (pytest formats it with `ast`,
    and an `ast.parse` it interrupts fails with 'AST constructor recursion depth mismatch')."""
    yield
    gc.collect()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-batch tests, whatever an earlier test (a trainer with
    `train.num_threads=0`) set: faster, and immune to oversubscription on busy 2-core machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits16(tmp_path_factory):
    """scikit-learn's digits as a 16 px ImageFolder with train/ and val/."""
    from byolfast.pipeline.demo_data import build_digits
    return build_digits(tmp_path_factory.mktemp("digits16"), size=16)


def tiny_overrides(out_dir, data_path="", backend="synthetic", steps=6, batch=8) -> list[str]:
    """A miniature of the real config: ResNet-18 with the small stem, 16 px, narrow heads, a few steps."""
    return [
        f"data.backend={backend}", f"data.path={data_path}", "data.image_size=16", "data.num_workers=0",
        "data.synthetic_size=64", "model.arch=resnet18", "model.small_stem=true", "model.projector_hidden=64",
        "model.predictor_hidden=64", "model.projector_out=32", f"train.batch_size={batch}", "train.epochs=4",
        "train.warmup_epochs=1", f"train.max_steps={steps}", f"train.out_dir={out_dir}", "train.log_every=1",
        "train.ckpt_every=0", "train.precision=fp32", "train.base_lr=0.5", "train.num_threads=1",
    ]
