"""Evaluation of a frozen encoder: weighted kNN and a linear probe on a labelled ImageFolder tree; export.

kNN follows Wu et al. (2018) as used by DINO: cosine similarity to every training feature, the k nearest vote with
weights exp(sim / T). The linear probe is multinomial logistic regression on the frozen, standardised features.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from byolfast.pipeline.config import IMAGENET_MEAN, IMAGENET_STD
from byolfast.pipeline.contract import DataError
from byolfast.pipeline.folder import scan_image_folder
from byolfast.train.config import EvalConfig

log = logging.getLogger(__name__)


def split_samples(root: str, val_fraction: float = 0.2, seed: int = 0
                  ) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    """(train, val, classes): the tree's `train/` and `val/` when both exist, else a fixed stratified split."""
    r = Path(root)
    if (r / "train").is_dir() and (r / "val").is_dir():
        train, classes = scan_image_folder(r / "train", setting="the evaluation data (--data, eval.data)")
        val, val_classes = scan_image_folder(r / "val", setting="the evaluation data (--data, eval.data)")
        if val_classes != classes:
            raise DataError(f"{root}: train/ and val/ have different class folders "
                            f"({len(classes)} and {len(val_classes)}); give both the same classes")
        return train, val, classes
    samples, classes = scan_image_folder(r, setting="the evaluation data (--data, eval.data)")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(len(classes)):
        items = [s for s in samples if s[1] == c]
        order = rng.permutation(len(items))
        n_val = max(1, round(len(items) * val_fraction)) if len(items) > 1 else 0
        val += [items[i] for i in order[:n_val]]
        train += [items[i] for i in order[n_val:]]
    if not val:
        raise DataError(f"{root}: no class has two images, so the held-out split is empty; give the evaluation data "
                        "more images per class, or train/ and val/ subfolders")
    return train, val, classes


class _EvalImages(Dataset):
    """Resize the shorter side to size * 8/7, centre-crop `size`, normalise with the training's mean/std (the
    standard evaluation transform). An unreadable image yields a zero image and its error, which the caller raises
    (from a worker, an exception would reach the user as a worker traceback)."""

    def __init__(self, samples: Sequence[tuple[str, int]], size: int, mean: Sequence[float], std: Sequence[float]):
        from torchvision.transforms import v2
        self.samples, self.size = list(samples), size
        self.transform = v2.Compose([
            v2.PILToTensor(), v2.Resize(round(size * 8 / 7), antialias=True), v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return torch.zeros(3, self.size, self.size), label, f"{path}: {e}"
        return self.transform(img), label, ""


@torch.no_grad()
def extract_features(encoder: nn.Module, samples: Sequence[tuple[str, int]], image_size: int, batch_size: int,
                     device: torch.device, channels_last: bool = True, num_workers: int = 0,
                     mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised float32 features and labels of `samples`, with the encoder in eval mode."""
    was_training = encoder.training
    encoder.eval()
    loader = DataLoader(_EvalImages(samples, image_size, mean, std), batch_size=batch_size, num_workers=num_workers)
    feats, labels = [], []
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for x, y, errors in loader:
        bad = [e for e in errors if e]
        if bad:
            encoder.train(was_training)
            raise DataError(f"evaluation image {bad[0]}: remove or replace it"
                            + (f" ({len(bad) - 1} more in the same batch)" if len(bad) > 1 else ""))
        x = x.to(device, non_blocking=True).to(memory_format=fmt)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            f = encoder(x)
        feats.append(F.normalize(f.float(), dim=1).cpu())
        labels.append(y)
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def knn_top1(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
             k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Weighted kNN top-1 accuracy on normalised features (k is capped at the training set's size)."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, train_f.shape[0])
    correct = 0
    for i in range(0, test_f.shape[0], chunk):
        sim = test_f[i:i + chunk] @ train_f.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_y[top_idx], weights)
        correct += (votes.argmax(1) == test_y[i:i + chunk]).sum().item()
    return correct / test_f.shape[0]


def effective_rank(features: torch.Tensor) -> float:
    """exp(entropy) of the centred features' normalised spectrum (Roy & Vetterli, 2007): from 1 (every sample on
    one line) to the feature dimension (spread evenly). A falling rank with a steady projection spread is the
    encoder's dimensional collapse, which the projection's `collapse_std` does not see."""
    s = torch.linalg.svdvals((features - features.mean(dim=0)).double())
    p = s.square() / s.square().sum().clamp_min(1e-300)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def linear_probe_top1(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                      epochs: int = 100, lr: float = 0.1, weight_decay: float = 1e-4, seed: int = 0) -> float:
    """Logistic regression on frozen features (standardised with the training statistics), full-batch Adam."""
    g = torch.Generator().manual_seed(seed)
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    xtr, xte = (train_f - mean) / std, (test_f - mean) / std
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    head = nn.Linear(xtr.shape[1], num_classes)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=g)
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(head(xtr), train_y).backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return (head(xte).argmax(1) == test_y).float().mean().item()


def evaluate_encoder(encoder: nn.Module, cfg: EvalConfig, device: torch.device, channels_last: bool = True,
                     linear: bool = False, num_workers: int = 0, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD) -> dict:
    """kNN top-1 for each k (and the linear probe when asked) on `cfg.data`; `mean`/`std`: the training's
    normalisation (`data.augment.mean/std`)."""
    train_s, val_s, classes = split_samples(cfg.data, cfg.val_fraction)
    tr_f, tr_y = extract_features(encoder, train_s, cfg.image_size, cfg.batch_size, device, channels_last,
                                  num_workers, mean, std)
    va_f, va_y = extract_features(encoder, val_s, cfg.image_size, cfg.batch_size, device, channels_last,
                                  num_workers, mean, std)
    result: dict = {"num_train": len(train_s), "num_val": len(val_s), "num_classes": len(classes)}
    for k in cfg.k:
        result[f"knn_top1_k{k}"] = knn_top1(tr_f, tr_y, va_f, va_y, k, cfg.temperature)
    result["knn_top1"] = result[f"knn_top1_k{cfg.k[0]}"]
    result["feature_rank"] = effective_rank(tr_f)
    if linear:
        result["linear_top1"] = linear_probe_top1(tr_f, tr_y, va_f, va_y, epochs=max(1, cfg.linear_epochs))
    return result


class KnnMonitor:
    """The kNN evaluation (and, with `eval.linear_epochs` > 0, the linear probe) as a periodic monitor during
    training (rank 0)."""

    def __init__(self, cfg: EvalConfig, device: torch.device, channels_last: bool = True,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.cfg, self.device, self.channels_last, self.mean, self.std = cfg, device, channels_last, mean, std
        split_samples(cfg.data, cfg.val_fraction)   # a missing or empty folder stops the run now, not hours later

    def __call__(self, encoder: nn.Module) -> dict:
        """The scores; {} when the evaluation data has become unusable (the training goes on, with a warning)."""
        try:
            r = evaluate_encoder(encoder, self.cfg, self.device, self.channels_last,
                                 linear=self.cfg.linear_epochs > 0, mean=self.mean, std=self.std)
        except DataError as e:
            log.warning("kNN monitor skipped: %s", e)
            return {}
        scores = {k: v for k, v in r.items() if k.startswith(("knn", "linear", "feature_rank"))}
        log.info("kNN monitor: %s", ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
        return scores


def encoder_from_checkpoint(state: dict, device: torch.device) -> tuple[nn.Module, dict]:
    """The online encoder of a training checkpoint (built from the checkpoint's own model config)."""
    from byolfast.model import ModelConfig, build_encoder
    from byolfast.train.config import _from_dict

    mcfg = _from_dict(ModelConfig, state["config"]["model"], "model")
    encoder, _ = build_encoder(mcfg.arch, mcfg.small_stem)
    prefix = "online.encoder."
    weights = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    encoder.load_state_dict(weights)
    encoder = encoder.to(device)
    if mcfg.channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    return encoder, {"arch": mcfg.arch, "small_stem": mcfg.small_stem, "channels_last": mcfg.channels_last}


def export_encoder(state: dict, out: str | Path) -> dict:
    """Write the online encoder as a torchvision state_dict (no `fc.*` keys); returns what was written.

    Load it with `m = torchvision.models.<arch>(); m.fc = torch.nn.Identity(); m.load_state_dict(sd, strict=True)`
    (or `m.load_state_dict(sd, strict=False)` keeping a fresh `fc`). A `small_stem` encoder needs the same 3x3 `conv1`
    and `maxpool = Identity()` before loading.
    """
    from byolfast.model import encoder_state_dict

    encoder, meta = encoder_from_checkpoint(state, torch.device("cpu"))
    sd = encoder_state_dict(encoder)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(sd, tmp)
    tmp.replace(out)
    return {"path": str(out), "keys": len(sd), **meta}


def random_init_encoder(arch: str, small_stem: bool, device: torch.device, seed: int = 0,
                        channels_last: bool = True) -> nn.Module:
    """A randomly initialised encoder (the baseline that BYOL's features are compared against)."""
    from byolfast.model import build_encoder
    torch.manual_seed(seed)
    enc, _ = build_encoder(arch, small_stem)
    enc = enc.to(device)
    return enc.to(memory_format=torch.channels_last) if channels_last else enc
