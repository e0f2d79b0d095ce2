"""Loader-only images/s of another library's BYOL transform beside ours, on the same JPEGs, in one run.

    pip install --no-deps --target /tmp/peer lightly lightning-utilities     # a scratch folder, not a dependency
    python -m byolfast.benchmarks.peer_loader --peer-path /tmp/peer --out peer.json [--photo-size 500x375 ...]

The peer is lightly's `BYOLTransform` (two views at `--size`, the paper's probabilities, PIL's box-approximated
Gaussian blur and bilinear crops) in a torch `DataLoader` over the benchmark folder; ours are `byol bench --what
loader` with the same batch, workers, view size and JPEGs. Both count two-view samples per second after a warm-up,
each timed `--repeats` times in turn (peer, ours, peer, ours...), and the medians are compared. Both sides drain what
their workers read ahead before the clock starts, and DALI gets as many threads as the others get workers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from byolfast.benchmarks import bench, bench_data


class _Folder:
    """The benchmark JPEGs as a map-style dataset of the peer's two views (labels are not needed)."""

    def __init__(self, folder: Path, transform):
        self.files = sorted(folder.glob("*/*.jpg"))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image
        with Image.open(self.files[i]) as img:
            return self.transform(img.convert("RGB"))


def time_peer(folder: Path, size: int, batch: int, workers: int, warmup: int, steps: int) -> float:
    """Samples/s of lightly's BYOLTransform through a DataLoader: `steps` batches after `warmup`."""
    import torch
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform
    transform = BYOLTransform(view_1_transform=BYOLView1Transform(input_size=size),
                              view_2_transform=BYOLView2Transform(input_size=size))
    loader = torch.utils.data.DataLoader(_Folder(folder, transform), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True)
    it = iter(loader)
    for _ in range(warmup + 2 * workers):   # and the batches its workers prefetched (2 each) before the clock starts
        next(it)
    t0 = time.perf_counter()
    for _ in range(steps):
        views = next(it)
        assert len(views) == 2 and views[0].shape[-1] == size
    return steps * batch / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer-path", required=True, help="folder holding the peer library (pip install --target)")
    p.add_argument("--data", default="data/peer")
    p.add_argument("--photo-size", default="500x375")
    p.add_argument("--images", type=int, default=768)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--backends", default="dali,ffcv,torch")
    p.add_argument("--out", default="peer_loader.json")
    a = p.parse_args(argv)
    sys.path.insert(0, a.peer_path)
    try:
        import lightly
    except ImportError as err:
        raise SystemExit(f"the peer library is not in {a.peer_path!r} ({err}): pip install --no-deps --target "
                         f"{a.peer_path} lightly lightning-utilities") from None
    folder = bench_data.build_bench_images(a.data, a.images, size=bench_data.photo_size(a.photo_size))
    ours_args = ["--what", "loader", "--data", a.data, "--images", str(a.images), "--photo-size", a.photo_size,
                 "--backends", a.backends, "--repeats", "1", "--loader-warmup", str(a.warmup),
                 "--loader-steps", str(a.steps), f"data.image_size={a.size}", f"train.batch_size={a.batch}",
                 f"data.num_workers={a.workers}", f"data.dali.num_threads={a.workers}"]
    peer, ours, env = [], {}, None
    for r in range(a.repeats):
        peer.append(time_peer(folder, a.size, a.batch, a.workers, a.warmup, a.steps))
        print(f"run {r + 1}: lightly {lightly.__version__} BYOLTransform {peer[-1]:.1f} samples/s", flush=True)
        out = Path(a.out).with_suffix(f".ours{r + 1}.json")
        bench.main([*ours_args, "--out", str(out)])
        written = json.loads(out.read_text())
        env = env or written["env"]
        for rec in written["records"]:
            if rec.get("what") == "loader" and rec.get("images_per_sec"):
                ours.setdefault(rec["backend"], []).append(rec["images_per_sec"])
    result = {"env": env,
              "protocol": vars(a) | {"peer_path": None},
              "peer": {"name": f"lightly {lightly.__version__} BYOLTransform", "runs": peer,
                       "median": statistics.median(peer)},
              "ours": {b: {"runs": v, "median": statistics.median(v)} for b, v in ours.items()}}
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"median samples/s ({a.size} px two views, batch {a.batch}, {a.workers} workers, {a.photo_size} JPEGs): "
          f"peer {result['peer']['median']:.1f} | " +
          " | ".join(f"{b} {v['median']:.1f} ({v['median'] / result['peer']['median']:.2f}x)"
                     for b, v in result["ours"].items()))
    return result


if __name__ == "__main__":
    main()
