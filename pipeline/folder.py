"""ImageFolder-style trees (`root/<class>/<image>`): discovery and validation with clear errors."""
from __future__ import annotations

import os
from pathlib import Path

from byolfast.pipeline.contract import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def scan_image_folder(root: str | os.PathLike, allow_empty_class: bool = False, setting: str = "data.path"
                      ) -> tuple[list[tuple[str, int]], list[str]]:
    """List `(path, class_index)` for every image under `root/<class>/`, classes sorted by name.

    A `train/` subfolder of class folders is used when `root` has no files of its own (ImageNet's layout).
    `setting` names where the user gave the path, for the messages.

    Raises:
        DataError: the path is missing or not a folder, has no class folders, a class folder has no images
            (unless `allow_empty_class`), or there are no images at all.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{setting} {str(root)!r} does not exist: give an ImageFolder tree (root/<class>/<image>.jpg), "
                        "or run `byol demo-data` to build the embedded one")
    if not root.is_dir():
        raise DataError(f"{setting} {str(root)!r} is a file, not a folder of class folders")
    train = root / "train"
    if (train.is_dir() and not any(p.is_file() for p in root.iterdir())
            and any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(train))):
        root = train   # ImageNet's layout: root/train/<class>/ (a class named "train" holds images, not folders)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{str(root)!r} has no class folders: expected {root}/<class>/<image>.jpg")
    samples: list[tuple[str, int]] = []
    empty = []
    for ci, cname in enumerate(classes):
        files = sorted(e.path for e in os.scandir(root / cname)
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            empty.append(cname)
        samples.extend((f, ci) for f in files)
    if empty and not allow_empty_class:
        raise DataError(f"class folder(s) with no images under {str(root)!r}: {', '.join(empty[:10])}"
                        f"{' ...' if len(empty) > 10 else ''} (remove them or add images; extensions: "
                        f"{', '.join(IMAGE_EXTENSIONS)})")
    if not samples:
        raise DataError(f"no images found under {str(root)!r}")
    return samples, classes
