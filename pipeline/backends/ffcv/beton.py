"""Opening a `.beton` for the ffcv backend: find it from `data.path`, check it before FFCV's reader touches it (a
malformed file must be a one-line `DataError`, not a crash in FFCV's C code), and read its class names."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from byolfast.pipeline.contract import DataError
from byolfast.pipeline.backends.ffcv.decode import keep_torch_threads
from byolfast.pipeline.backends.ffcv.format import load_beton_meta

with keep_torch_threads():   # importing ffcv resets torch's thread count
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader
    from ffcv.types import TYPE_ID_HANDLER, FieldDescType, HeaderType, get_handlers, get_metadata_type

BETON_IN_FOLDER = ("ffcv/train.beton", "train.beton")
CLASSES_FILE = "classes.json"
CONVERT_HINT = "write one with `byol convert` (an ImageFolder tree -> FFCV .beton)"
# What FFCV's reader and loader raise on a file that passed `check_beton` but is still malformed.
READ_ERRORS = (ValueError, AssertionError, KeyError, IndexError, OSError, TypeError)


def resolve_beton(path: str) -> Path:
    """The `.beton` file named by `data.path`: the file itself, or `<folder>/ffcv/train.beton` (`<folder>/train.beton`).

    Raises:
        DataError: the path is empty or missing, or a folder without a beton.
    """
    if not path:
        raise DataError(f"data.path is empty: the ffcv backend needs a .beton file; {CONVERT_HINT}")
    p = Path(path)
    if p.is_dir():
        for rel in BETON_IN_FOLDER:
            if (p / rel).is_file():
                return p / rel
        raise DataError(f"folder {str(p)!r} has no {' or '.join(BETON_IN_FOLDER)}: point data.path at a .beton "
                        f"file or {CONVERT_HINT}")
    if not p.is_file():
        raise DataError(f"data path {str(p)!r} does not exist: {CONVERT_HINT}")
    return p


def check_beton(path: Path) -> Reader:
    """Open a beton after checking that its header, field table, metadata and allocation table fit in the file.

    FFCV's own reader trusts the file: a truncated or foreign file gives an IndexError, garbage or a crash in compiled
    code. The structural checks are `format.load_beton_meta`'s (also used by `byol convert`); this adds what
    needs FFCV itself: known field types and a metadata block that ends before the allocation table.

    Raises:
        DataError: not a beton, another format version, truncated or unfinished, or image data outside the file.
    """
    meta = load_beton_meta(path)
    redo = "delete it and run `byol convert` again"
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    num_fields = int(header["num_fields"])
    if num_fields == 0:
        raise DataError(f"{str(path)!r} has no fields: not a beton; {redo}")
    descs = np.fromfile(path, dtype=FieldDescType, count=num_fields, offset=HeaderType.itemsize)
    unknown = sorted({int(t) for t in descs["type_id"] if TYPE_ID_HANDLER.get(int(t)) is None})
    if unknown:
        raise DataError(f"{str(path)!r} has fields of unknown type {unknown}: not a beton this FFCV reads; {redo}")
    item = get_metadata_type(get_handlers(descs)).itemsize
    metadata_end = HeaderType.itemsize + num_fields * FieldDescType.itemsize + meta["num_samples"] * item
    if metadata_end > int(header["alloc_table_ptr"]):
        raise DataError(f"{str(path)!r} is truncated ({meta['bytes']} bytes; its metadata overruns the allocation "
                        f"table): {redo}")
    try:
        reader = Reader(str(path))
    except READ_ERRORS as e:
        raise DataError(f"{str(path)!r} cannot be read as an FFCV .beton ({e}): {redo}") from e
    return reader


def check_fields(reader: Reader, path: Path) -> None:
    handlers = reader.handlers
    if not isinstance(handlers.get("image"), RGBImageField) or not isinstance(handlers.get("label"), IntField):
        found = ", ".join(f"{k}: {type(v).__name__}" for k, v in handlers.items())
        raise DataError(f"{str(path)!r} must have an `image` RGBImageField and a `label` IntField (found {found}): "
                        f"{CONVERT_HINT}")
    if "index" in handlers and not isinstance(handlers["index"], IntField):
        raise DataError(f"{str(path)!r}: field `index` must be an IntField: {CONVERT_HINT}")
    if reader.num_samples == 0:
        raise DataError(f"{str(path)!r} holds no images: {CONVERT_HINT}")
    images = field_metadata(reader, "image")
    table = reader.alloc_table
    data_end = int(reader.header["alloc_table_ptr"])
    inside = (table["ptr"] + table["size"] <= data_end).all()
    if not inside or not np.isin(images["data_ptr"], table["ptr"]).all():
        raise DataError(f"{str(path)!r} is damaged (image data missing from its allocation table): delete it and run "
                        "`byol convert` again")


def field_metadata(reader: Reader, name: str) -> np.ndarray:
    return reader.metadata[f"f{list(reader.handlers).index(name)}"]


def read_classes(beton: Path, labels: np.ndarray) -> list[str]:
    """Class names from `classes.json` (a JSON list) next to the beton, else `"0", "1", ...` up to the largest label.

    Raises:
        DataError: the file is not a list of strings, or a label lies outside it (or is negative).
    """
    labels = np.asarray(labels)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        raise DataError(f"{str(beton)!r} has negative labels (min {lo}): {CONVERT_HINT}")
    path = beton.parent / CLASSES_FILE
    if not path.is_file():
        return [str(i) for i in range(hi + 1)]
    try:
        names = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{str(path)!r} is not valid JSON ({e}): it should be a list of class names") from e
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{str(path)!r} should be a JSON list of class names")
    if hi >= len(names):
        raise DataError(f"{str(beton)!r} has label {hi} but {str(path)!r} lists {len(names)} classes: the two files "
                        "come from different conversions; run `byol convert` again")
    return names


# ---------------------------------------------------------------------------------------------------- the loader
