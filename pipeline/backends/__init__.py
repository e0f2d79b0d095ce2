"""The loader backends, each a package that describes itself in one `Backend` record (its `BACKEND`).

A backend package holds its loader, and where it has them its on-disk format and its settings section; its
`__init__` imports nothing heavy (DALI, FFCV, numba and the loader module are imported when a loader is built or a
format written). `pipeline.registry.BACKENDS` lists the records: every place that offers or switches on a backend
(the config's validation, `build_two_view_loader`, `byol convert`, `byol bench`, `byol tune`, the profiler's advice)
reads them.
A backend imports the shared modules below it (contract, config, storage, sharding, the augmentation engines),
never another backend and never `pipeline.convert`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

if TYPE_CHECKING:
    from byolfast.pipeline.config import DataConfig
    from byolfast.pipeline.contract import LoaderContext, TwoViewLoader
    from byolfast.pipeline.storage import SampleRef


@dataclass(frozen=True)
class Knob:
    """One setting `byol tune` searches: its config key, the candidate values, whether they are ordered numbers
    (climbed) or choices (each tried), and `when` = (key, value) that must hold for the knob to matter."""

    key: str
    values: tuple
    numeric: bool = False
    when: Optional[tuple[str, Any]] = None


@dataclass(frozen=True)
class WriteJob:
    """What `byol convert` hands a format's writer besides the samples.

    Args:
        pool: the conversion's worker processes (`imap_unordered(fn, tasks)`), for a writer with `uses_pool`.
        workers: how many worker processes a writer may run.
        progress: show progress bars.
        max_image_bytes, total_bytes: decoded RGB bytes of the largest image and of all images.
    """

    pool: Any
    workers: int
    progress: bool
    max_image_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class Writer:
    """How `byol convert` writes a backend's format into `out/<backend name>/`.

    Args:
        settings: (the settings every format shares, convert's options) -> the settings recorded with the output,
            which a later run must match to resume or to call it complete; a bad option raises DataError.
        complete: (folder, settings) -> the output record of a finished output made with `settings`, None when it
            is missing or unfinished; raises DataError when it was made with other settings.
        write: (folder, sample refs, class names, settings, job) -> the output record (`status`, `path`,
            `num_samples`, `bytes`, ...), written all or nothing (resumable where the format allows).
        uses_pool: `write` deals its work to `job.pool`; else it runs after the pool has closed, with its own
            processes.
    """

    settings: Callable[[dict, dict], dict]
    complete: Callable[[Path, dict], Optional[dict]]
    write: Callable[[Path, "Sequence[SampleRef]", Sequence[str], dict, WriteJob], dict]
    uses_pool: bool


@dataclass(frozen=True)
class Backend:
    """One loader backend, as the rest of the project sees it.

    Args:
        name: `data.backend`'s value, and the name of its settings section (`data.<name>`) and of its folder in the
            output of `byol convert` (`out/<name>/`).
        summary: one line for help texts.
        loader: (data config, context) -> the backend's `TwoViewLoader`; imports the loader module when called, so
            DALI and FFCV are imported only when asked for.
        settings: the dataclass of `data.<name>`, whose `problems()` lists `(key, allowed, value)` for each setting
            out of range; None when the backend has no settings of its own.
        writer: how `byol convert` writes its format; None when it reads images as they are.
        bench_path: the `data.path` for `byol bench`'s images: given the ImageFolder tree itself when the backend
            has no writer, else the folder `byol convert` wrote them to; None for a backend that reads no images.
        advice: (data config, device type, CPU cores, the loader's `stats()`) -> what would make this loader
            faster, for the profiler's report (settings named as `section.key=value`).
        knobs: (device type, the ladder of parallelism values) -> the settings that matter for its speed, parallelism
            first, for `byol tune`.
        requires: modules that must import for the backend to run (`byol tune` leaves it out where one is missing).
        first_start_s: extra seconds its first loader in a process may take (numba compilation, graph build), which
            `byol tune` adds to that trial's time limit.
    """

    name: str
    summary: str
    loader: Callable[["DataConfig", "LoaderContext"], "TwoViewLoader"]
    settings: Optional[type]
    writer: Optional[Writer]
    bench_path: Optional[Callable[[Path], str]]
    advice: Callable[["DataConfig", str, int, dict], list[str]]
    knobs: Callable[[str, tuple], list[Knob]]
    requires: tuple[str, ...] = ()
    first_start_s: float = 0.0


__all__ = ["Backend", "Knob", "WriteJob", "Writer"]
