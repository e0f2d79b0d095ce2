"""A fast learning probe: BYOL on images held in memory, kNN and the features' effective rank along the way.

    python -m byolfast.benchmarks.learning_probe --data scenes --steps 200 --evals 4 [--opt sgd --lr 0.2 ...]

It answers "does this recipe move the features past a random network's, and how soon" in minutes on a CPU, without
JPEGs or a loader. Data: `scenes` (the demo's scene patches), or scikit-learn's digits drawn into a uint8 tensor
(`plain` white on black; `shade` the same in random grey levels; `posscale` white on black at 40-80 % size and a
random position; `gray` posscale in random grey levels; `color` random ink and paper). Both views are cut with a
batched random resized crop and flip (`grid_sample`, bilinear) and coloured by the project's `BatchedViewAugment`;
the model, LARS/SGD and schedules are the trainer's own. Every eval prints the kNN top-1 (k = 20, held-out split) of
the online encoder and the effective rank of its features (`train.evaluate`). It is a research tool: the trainer
(`byol train` / `byol demo`) is what users run.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from byolfast.model import ModelConfig, build_byol, collapse_std
from byolfast.pipeline.config import ViewSpec
from byolfast.pipeline.device_augment import BatchedViewAugment
from byolfast.train.evaluate import effective_rank, knn_top1
from byolfast.train.optim import build_optimizer
from byolfast.train.schedules import target_tau, warmup_cosine_lr

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
LUMA = np.array([0.299, 0.587, 0.114])


def draw_digit(gray: np.ndarray, size: int, rng: np.random.Generator, style: str) -> np.ndarray:
    """One 8x8 digit (0..255) as a (size, size, 3) uint8 image in `style`."""
    if style == "plain":
        return np.asarray(Image.fromarray(gray, "L").resize((size, size), Image.BICUBIC).convert("RGB"))
    if style == "shade":  # plain digits in grey levels: paper 0-50 %, ink 30-50 % above it (within the jitter's reach)
        alpha = np.asarray(Image.fromarray(gray, "L").resize((size, size), Image.BICUBIC), np.float32)[..., None] / 255
        paper = rng.uniform(0, 0.5) * 255
        img = paper + alpha * rng.uniform(0.3, 0.5) * 255
        return np.repeat(img, 3, axis=2).clip(0, 255).astype(np.uint8)
    lo, hi = (0.4, 0.8) if style in ("posscale", "gray") else (0.6, 1.0)
    side = int(round(size * rng.uniform(lo, hi)))
    alpha = np.asarray(Image.fromarray(gray, "L").resize((side, side), Image.BICUBIC), np.float32)[..., None] / 255
    ink, paper = np.full(3, 255.0), np.zeros(3)
    if style == "gray":  # grey levels within the colour jitter's reach: paper 0-50 %, ink 25-50 % above it
        paper = np.full(3, rng.uniform(0, 0.5) * 255)
        ink = paper + rng.uniform(0.25, 0.5) * 255
    while style == "color":
        ink, paper = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if abs(float(ink @ LUMA - paper @ LUMA)) > 60:
            break
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = paper
    y, x = rng.integers(0, size - side + 1, 2)
    canvas[y:y + side, x:x + side] = canvas[y:y + side, x:x + side] * (1 - alpha) + ink * alpha
    return canvas.clip(0, 255).astype(np.uint8)


def digits(style: str, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, held-out images, held-out labels), NCHW uint8: the digits in a fixed 80/20 split,
    or with `style="scenes"` the demo's scene patches (`pipeline.demo_data.scene_patches`)."""
    if style == "scenes":
        from byolfast.pipeline.demo_data import scene_patches
        (xtr, ytr), (xva, yva) = scene_patches("train", size), scene_patches("val", size)
        return tuple(torch.from_numpy(a).permute(0, 3, 1, 2).contiguous() if a.ndim == 4 else torch.from_numpy(a)
                     for a in (xtr, ytr, xva, yva))
    from sklearn.datasets import load_digits
    d = load_digits()
    gray = (d.images / 16 * 255).clip(0, 255).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(d.target))
    n_val = len(order) // 5

    def make(idx):
        x = np.stack([draw_digit(gray[i], size, np.random.default_rng([0, int(i)]), style) for i in idx])
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(d.target[idx])
    return (*make(order[n_val:]), *make(order[:n_val]))


def random_resized_crop(x: torch.Tensor, g: torch.Generator, scale_lo: float) -> torch.Tensor:
    """Per-sample crops (area in [scale_lo, 1], aspect log-uniform in [3/4, 4/3]) with flips, resized to x's size."""
    n, _, h, w = x.shape
    u = torch.rand(n, 5, generator=g)
    area = scale_lo + (1 - scale_lo) * u[:, 0]
    ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * u[:, 1])
    cw, ch = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cw * torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    theta[:, 0, 2] = (u[:, 2] * (1 - cw) + cw / 2) * 2 - 1
    theta[:, 1, 1] = ch
    theta[:, 1, 2] = (u[:, 3] * (1 - ch) + ch / 2) * 2 - 1
    grid = F.affine_grid(theta, (n, 3, h, w), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def evaluate(encoder: torch.nn.Module, xtr, ytr, xva, yva) -> dict:
    encoder.eval()
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)

    def features(x):
        return torch.cat([F.normalize(encoder(((x[i:i + 512].float() / 255 - mean) / std)
                                              .contiguous(memory_format=torch.channels_last)).float(), dim=1)
                          for i in range(0, len(x), 512)])
    ftr, fva = features(xtr), features(xva)
    encoder.train()
    return {"knn_top1": knn_top1(ftr, ytr, fva, yva, k=20), "feature_rank": effective_rank(ftr)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="posscale", choices=("scenes", "plain", "shade", "posscale", "gray", "color"))
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--evals", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--opt", default="lars", choices=("lars", "sgd"))
    p.add_argument("--lr", type=float, default=0.4, help="base LR per 256 images")
    p.add_argument("--eta", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=1.5e-6)
    p.add_argument("--tau", type=float, default=0.99)
    p.add_argument("--warmup", type=int, default=20, help="warm-up steps")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--small-stem", action="store_true", help="3x3 stride-1 stem without max-pool (CIFAR-style)")
    p.add_argument("--zero-init", type=int, default=1, help="zero-initialised last BN of each residual block (1/0)")
    p.add_argument("--pred-lr", type=float, default=1.0, help="the predictor's LR as a multiple of the others'")
    p.add_argument("--scale-lo", type=float, default=0.08)
    p.add_argument("--blur", type=float, default=1.0, help="view 1's blur probability (view 2: 0.1, or 0 with 0)")
    p.add_argument("--solarize", type=float, default=0.2, help="view 2's solarize probability")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--out-dim", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp32", action="store_true")
    p.add_argument("--json", default="", help="write the curve here")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    xtr, ytr, xva, yva = digits(a.data, a.size)
    views = [ViewSpec(crop_scale=(a.scale_lo, 1.0), blur_p=a.blur, solarize_p=0.0),
             ViewSpec(crop_scale=(a.scale_lo, 1.0), blur_p=0.1 if a.blur > 0 else 0.0, solarize_p=a.solarize)]
    augment = [BatchedViewAugment(v, MEAN, STD, a.size) for v in views]
    model = build_byol(ModelConfig(arch=a.arch, small_stem=a.small_stem, projector_hidden=a.hidden,
                                   projector_out=a.out_dim, predictor_hidden=a.hidden, bn="local",
                                   zero_init_residual=bool(a.zero_init)), device_type="cpu")
    optimizer = build_optimizer(model, a.opt, 0.9, a.wd, a.eta)
    predictor = {id(q) for q in model.predictor.parameters()} if model.predictor is not None else set()
    for group in optimizer.param_groups:  # split each group into predictor / rest so the predictor can run faster
        group["lr_mult"] = 1.0
    for group in list(optimizer.param_groups):
        mine = [q for q in group["params"] if id(q) in predictor]
        if mine and a.pred_lr != 1.0:
            group["params"] = [q for q in group["params"] if id(q) not in predictor]
            optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"},
                                       "params": mine, "lr_mult": a.pred_lr})
    peak = a.lr * a.batch / 256
    g = torch.Generator().manual_seed(a.seed)
    curve = [{"step": 0, **evaluate(model.encoder, xtr, ytr, xva, yva)}]
    print(json.dumps(curve[-1]), flush=True)
    every, losses, t0 = max(1, a.steps // a.evals), [], time.perf_counter()
    for step in range(a.steps):
        x = xtr[torch.randint(0, len(xtr), (a.batch,), generator=g)]
        v1, v2 = (aug(random_resized_crop(x, g, a.scale_lo), g) for aug in augment)
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(step, peak, a.warmup, a.steps) * group["lr_mult"]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not a.fp32):
            out = model(v1, v2)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_target(target_tau(step, a.tau, a.steps))
        losses.append(float(out.loss.detach()))
        if (step + 1) % every == 0:
            curve.append({"step": step + 1, "loss": float(np.mean(losses[-every:])),
                          "collapse_std": float(collapse_std(out.projection)),
                          **evaluate(model.encoder, xtr, ytr, xva, yva), "seconds": time.perf_counter() - t0})
            print(json.dumps(curve[-1]), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "curve": curve}, f, indent=1)
    return curve


if __name__ == "__main__":
    main()
