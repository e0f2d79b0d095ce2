"""The DALI two-view loader: read, decode once, draw BYOL's two views with per-sample randomness, hand them to torch.

Sources:
  - a shard folder (`manifest.json`, see `pipeline.backends.dali.format`): `fn.readers.webdataset`, each rank reading
    its own contiguous share of the samples (DALI's `shard_id` / `num_shards`) through a shuffle buffer; the order of
    the tars is permuted per epoch with the same seed on every rank, so the shares stay disjoint and change every epoch;
  - an ImageFolder tree: `fn.readers.file` over this rank's list of the epoch (`pipeline.sharding.rank_indices`, the
    same order as the torch backend). The reader's label is the sample's index; the class comes from a table on the
    torch side, so `Batch.index` is exact.

The graph decodes each image once (`mixed` = nvJPEG on the GPU, else the CPU) and cuts both views out of it, or, with
`dali.random_crop_decoder`, decodes only each view's window (two partial decodes). Each view then runs through
`pipeline.dali_augment.augment_view` with its own `ViewSpec` and ends as normalised float HWC, which torch sees as a
channels-last NCHW tensor without a copy.

Epochs and resume: DALI's readers cannot be re-seeded, so each epoch has its own pipeline, with a seed derived from
(seed, rank, epoch). Its build and first batch stalled the consumer at every epoch start (on the CPU, 0.05 s to build
and ~0.2 s to the first batch, 0.8 s for the first build in a process, which converts the graph's conditionals;
`stats()["pipeline_build_s"]` reports the last build on any device). So `data.dali.build_ahead` batches before an
epoch's end, the next epoch's pipeline is built and primed in a background thread, unless the trainer said the run
stops before it (`stop_epoch`), and a finished one is torn down in another (`pipeline.backends.dali.lifetime`);
`stats()["epochs_built_ahead"]` counts the epochs that started that way. If that build fails for another reason than
the data (no memory for two pipelines at once), the epoch's pipeline is built when it starts, with a warning.
`set_epoch(e, start_batch)` then resumes exactly: the folder source drops the first `start_batch` batches from its list
(same order; the augmentation draws of the rest are fresh, from a seed that also takes `start_batch`); the shard source
runs and discards them, which reproduces the order and the augmentation draws of an uninterrupted epoch at the cost of
processing those batches.

Decoding once is the default because the crop decoder saved nothing where it was measured (on the CPU, two views at
224 px: the same CPU time per image either way): each partial decode still parses the compressed data up to its
window. On a GPU the choice is not measured yet; `byol bench --what loader data.dali.random_crop_decoder=true` measures
it, and the numbers live in `benchmarks/results/`.

Bad data: shards were validated by `byol convert`. A folder is checked at start (`pipeline.backends.dali.image_files`)
for empty files, unknown signatures and JPEG/PNG files without their end marker (cut short); those are left out and
counted (`stats()["bad_images"]`), and above `data.max_bad_fraction` the loader refuses to start. A file that passes the
check but whose compressed data is corrupt still stops DALI mid-epoch: that surfaces as a DataError carrying DALI's
message (which names the file when the decoder knows it); convert the folder with `byol convert` to validate every image
by decoding it.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from byolfast.pipeline.augment_spec import DRAWS
from byolfast.pipeline.config import AugmentConfig, DataConfig
from byolfast.pipeline.contract import Batch, DataError, LoaderContext, TwoViewLoader, to_contract
from byolfast.pipeline.storage import skipped_at_convert
from byolfast.pipeline.dali_augment import augment_view, crop_window, decode_window, resize_window
from byolfast.pipeline.backends.dali.format import MANIFEST, load_manifest
from byolfast.pipeline.storage import ORDER
from byolfast.pipeline.folder import scan_image_folder
from byolfast.pipeline.backends.dali.image_files import check_image_files
from byolfast.pipeline.backends.dali.lifetime import BuildAhead, StreamHold, drop_in_background, with_index
from byolfast.pipeline.sharding import rank_indices

logger = logging.getLogger(__name__)

_DECODE_FAILURES = ("Failed to decode", "nvImageCodec failure", "decoders.image", "peek_image_shape")
SHUFFLE_BUFFER = 2048  # samples in the webdataset reader's shuffle buffer (per rank)
# The per-view draws delivered with `debug_params`, by DALI name, in the spec's table order.
DEBUG_DRAWS = tuple(d.dali_name for d in DRAWS)


def epoch_seed(*keys: int) -> int:
    """A non-negative 31-bit DALI seed from (seed, rank, epoch, ...)."""
    return int(np.random.SeedSequence([k & 0xFFFFFFFF for k in keys]).generate_state(1)[0] & 0x7FFFFFFF)


def is_shard_folder(path: str) -> bool:
    p = Path(path)
    return (p.is_file() and p.name == MANIFEST) or (p / MANIFEST).is_file() or (p / "dali" / MANIFEST).is_file()


@pipeline_def(enable_conditionals=True)
def two_view_pipeline(source: dict, aug: AugmentConfig, image_size: int, decoder: str, random_crop_decoder: bool,
                      hw_decoder_load: float, out_dtype: types.DALIDataType, debug: bool, exact_hue: bool,
                      cpu_threads: int = 0):
    """Read, decode, and draw two augmented views; outputs view1, view2, index, [label], [per-view draws]."""
    if source["kind"] == "shards":
        jpegs, label, index = fn.readers.webdataset(
            paths=source["tars"], index_paths=source["indices"], ext=["jpg", "label", "index"],
            dtypes=[types.UINT8, types.INT64, types.INT64], shard_id=source["shard_id"],
            num_shards=source["num_shards"], random_shuffle=source["shuffle"], initial_fill=source["initial_fill"],
            pad_last_batch=True, name="Reader")
        extra = [label]
    else:
        jpegs, index = fn.readers.file(files=source["files"], labels=source["indices"], random_shuffle=False,
                                       name="Reader")
        extra = []
    shapes = fn.peek_image_shape(jpegs)
    if not random_crop_decoder:
        kwargs = {"hw_decoder_load": hw_decoder_load} if decoder == "mixed" else {}
        images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB, **kwargs)
    # On the CPU with the numba operator, the crop's resize runs inside it too (`CpuCropAugment`).
    crop_in_kernel = cpu_threads > 0 and decoder == "cpu" and not random_crop_decoder
    views, draws = [], []
    for spec in (aug.view1, aug.view2):
        anchor, shape = crop_window(shapes, spec)
        if random_crop_decoder:
            cropped = decode_window(jpegs, anchor, shape, image_size, decoder, hw_decoder_load)
        elif crop_in_kernel:
            cropped = images
        else:
            cropped = resize_window(images, anchor, shape, image_size)
        drawn = {} if debug else None
        views.append(augment_view(cropped, spec, image_size, aug.mean, aug.std, out_dtype, drawn, exact_hue,
                                  cpu_threads, aug.color_ops, (anchor, shape) if crop_in_kernel else None))
        if debug:
            drawn.update(crop_anchor=anchor, crop_shape=shape)
            draws.extend(drawn.get(k, fn.cast(index, dtype=types.FLOAT) * 0 - 1) for k in DEBUG_DRAWS)
    if debug:
        draws.append(shapes)
    return tuple(views) + (index,) + tuple(extra) + tuple(draws)


class DaliTwoViewLoader(TwoViewLoader):
    """BYOL's two views from a shard folder or an ImageFolder tree through a DALI pipeline.

    Args:
        cfg: the data config (`cfg.dali` for the backend's settings).
        ctx: the run's context.
        debug_params: also deliver every per-sample random draw (see `iter_with_params`), for tests.
        exact_hue: torchvision's HSV hue shift (True), or DALI's cheaper chroma rotation, a different augmentation
            (see `pipeline.dali_augment`).
    """

    def __init__(self, cfg: DataConfig, ctx: LoaderContext, debug_params: bool = False, exact_hue: bool = True):
        super().__init__(ctx)
        self.cfg = cfg
        self.debug_params = debug_params
        self.exact_hue = exact_hue
        if cfg.dali.decoder not in ("mixed", "cpu"):
            raise DataError(f"data.dali.decoder is {cfg.dali.decoder!r}: choose 'mixed' or 'cpu'")
        on_gpu = ctx.device.type == "cuda" and torch.cuda.is_available()
        self.decoder = "mixed" if cfg.dali.decoder == "mixed" and on_gpu else "cpu"
        if cfg.dali.decoder == "mixed" and not on_gpu:
            logger.warning("DALI: no CUDA device for the 'mixed' (nvJPEG) decoder; decoding and augmenting on the CPU")
        self.device_id: Optional[int] = None
        if self.decoder == "mixed":
            self.device_id = with_index(ctx.device).index
        self._bad: list[str] = []
        self._bad_reasons: dict[str, int] = {}
        self._convert_skips: dict = {}
        self._build_s: list[float] = []
        self._reader_meta: dict = {}
        self._pipe = None
        self._ahead: Optional[BuildAhead] = None
        self._built_ahead = 0   # epochs that started from a pipeline built ahead
        if is_shard_folder(cfg.path):
            self._init_shards()
        else:
            self._init_folder()
        self.require_one_global_batch(repr(cfg.path))

    # ----------------------------------------------------------------------------------------------- sources
    def _init_shards(self) -> None:
        m = load_manifest(self.cfg.path)
        self.kind = "shards"
        self.classes: list[str] = list(m["classes"])
        self._num_samples = int(m["num_samples"])
        self._tars, self._indices = list(m["tar_paths"]), list(m["index_paths"])
        self._convert_skips = skipped_at_convert(m["dir"], self._num_samples)
        if m.get("order") != ORDER and self.ctx.rank == 0:
            logger.warning("%s: these shards hold the samples in class order (written by an earlier byol convert), so "
                           "the reader's shuffle gives batches of few classes; convert again with --overwrite",
                           m["dir"])
        if self._convert_skips.get("convert_skipped"):
            logger.info("%s: %d images were skipped at convert time (see %s)", m["dir"],
                        self._convert_skips["convert_skipped"], self._convert_skips["convert_report"])

    def _init_folder(self) -> None:
        samples, self.classes = scan_image_folder(self.cfg.path)
        self.kind = "folder"
        self._paths = [p for p, _ in samples]
        self._class_of = torch.tensor([c for _, c in samples], dtype=torch.int64)
        problems = check_image_files(self._paths)
        self._bad = [p for p, why in zip(self._paths, problems) if why]
        self._bad_reasons = dict(Counter(why for why in problems if why))
        self._valid = np.flatnonzero([not why for why in problems]).astype(np.int64)  # scan positions in use
        if self._bad:
            frac = len(self._bad) / len(self._paths)
            listing = [f"{p} ({why})" for p, why in zip(self._paths, problems) if why][:10]
            listing = ", ".join(listing) + (" ..." if len(self._bad) > 10 else "")
            if frac > self.cfg.max_bad_fraction:
                raise DataError(f"{len(self._bad)} of {len(self._paths)} files under {self.cfg.path!r} are empty, "
                                f"not images or cut short ({frac:.1%} > data.max_bad_fraction="
                                f"{self.cfg.max_bad_fraction}): {listing}; repair or remove them")
            logger.warning("DALI: leaving out %d unreadable image file(s): %s", len(self._bad), listing)
        self._num_samples = int(len(self._valid))

    @property
    def num_samples(self) -> int:
        return self._num_samples

    # ----------------------------------------------------------------------------------------------- pipeline
    def _source(self, epoch: int, start_batch: int) -> tuple[dict, int, int]:
        """The reader's arguments for one epoch, the pipeline seed, and how many leading batches to discard."""
        c = self.ctx
        if self.kind == "shards":
            order = np.arange(len(self._tars))
            if c.shuffle:  # the same permutation on every rank: the ranks' shares stay disjoint
                order = np.random.default_rng([c.seed, epoch]).permutation(len(self._tars))
            per_rank = self._num_samples // c.world_size
            source = {"kind": "shards", "tars": [self._tars[i] for i in order],
                      "indices": [self._indices[i] for i in order], "shard_id": c.rank, "num_shards": c.world_size,
                      "shuffle": c.shuffle, "initial_fill": max(1, min(SHUFFLE_BUFFER, per_rank))}
            return source, epoch_seed(c.seed, c.rank, epoch), start_batch
        pos = rank_indices(self._num_samples, c.batch_size, c.rank, c.world_size, c.seed, epoch, c.shuffle)
        scan = self._valid[pos[start_batch * c.batch_size:]]
        source = {"kind": "folder", "files": [self._paths[i] for i in scan], "indices": scan.tolist()}
        return source, epoch_seed(c.seed, c.rank, epoch, start_batch), 0

    def _build(self, source: dict, seed: int) -> Pipeline:
        c, d = self.ctx, self.cfg.dali
        out_dtype = types.FLOAT16 if c.dtype == torch.float16 else types.FLOAT
        t0 = time.perf_counter()
        pipe = two_view_pipeline(
            source=source, aug=self.cfg.augment, image_size=self.cfg.image_size, decoder=self.decoder,
            random_crop_decoder=d.random_crop_decoder, hw_decoder_load=d.hw_decoder_load, out_dtype=out_dtype,
            debug=self.debug_params, exact_hue=self.exact_hue, cpu_threads=d.num_threads if d.cpu_kernels else 0,
            batch_size=c.batch_size, num_threads=d.num_threads,
            device_id=self.device_id, seed=seed, prefetch_queue_depth=d.prefetch_queue_depth, exec_dynamic=True)
        pipe.build()
        self._build_s.append(time.perf_counter() - t0)
        return pipe

    def _output_names(self) -> list[str]:
        names = ["view1", "view2", "index"] + (["label"] if self.kind == "shards" else [])
        if self.debug_params:
            names += [f"view{v}/{k}" for v in (1, 2) for k in DEBUG_DRAWS] + ["image_shape"]
        return names

    def _convert(self, out: dict[str, torch.Tensor]) -> tuple[Batch, dict[str, torch.Tensor]]:
        c = self.ctx
        index = out["index"].reshape(-1).to(torch.int64).cpu()
        if self.kind == "shards":
            labels = out["label"].reshape(-1).to(torch.int64)
        else:
            labels = self._class_of[index]
        # HWC from DALI: permuting to NCHW is a channels-last view, so `to_contract` copies only to change dtype/device.
        views = [to_contract(out[k].permute(0, 3, 1, 2), c) for k in ("view1", "view2")]
        batch = Batch(views[0], views[1], labels.to(c.device, non_blocking=True), index)
        params = {k: v.cpu() for k, v in out.items() if "/" in k or k == "image_shape"} if self.debug_params else {}
        return batch, params

    def iter_with_params(self) -> Iterator[tuple[Batch, dict[str, torch.Tensor]]]:
        """Like iterating the loader, with each batch's per-sample draws (`view1/flip`, ..., `image_shape`) when
        built with `debug_params=True` (else an empty dict)."""
        epoch, start = self.epoch, self.start_batch
        self.start_batch = 0
        return self._generate(epoch, start)

    def _generate(self, epoch: int, start: int) -> Iterator[tuple[Batch, dict[str, torch.Tensor]]]:
        total = len(self)
        if start >= total:
            return
        self._pipe = None   # the last epoch's pipeline (not the one built ahead for this epoch)
        pipe, it, first = self._take_ahead(epoch, start) or self._open(epoch, start)
        self._pipe, self._reader_meta = pipe, pipe.reader_meta("Reader")
        ahead_at = max(first, total - self.cfg.dali.build_ahead) if self.cfg.dali.build_ahead else total
        hold, out = StreamHold(self.ctx.device), None
        try:
            for b in range(first, total):
                with self._data_errors(epoch, b):
                    out = next(it, None)
                if out is None:
                    break
                if b == ahead_at and self._pipe is pipe:   # not from a superseded epoch's generator
                    self._build_ahead(epoch + 1)
                if b >= start:
                    yield self._convert(out[0])
                    hold.hold(out)   # the consumer has queued its work on this batch: keep it until that has run
        finally:
            hold.drain()
            if self._pipe is pipe:
                self._pipe = None
            last = [pipe, it]
            pipe = it = out = None
            drop_in_background(last, self.ctx.device)

    def _open(self, epoch: int, start: int) -> tuple[Pipeline, DALIGenericIterator, int]:
        """The epoch's pipeline, its iterator (which has run the first batch) and the first batch's number."""
        source, seed, discard = self._source(epoch, start)
        # A pipeline per epoch, in both modes, because DALI fixes at build time everything an epoch changes: the
        # reader's input (`fn.readers.file`'s file list, `fn.readers.webdataset`'s tar order) and the seeds of the
        # random operators (`fn.random.*`, the crop generator), which have no re-seed call; a checkpoint restores
        # a state that was saved, not one for a new seed. One pipeline for the run would need every list and every
        # draw fed per epoch through `fn.external_source` (a Python reader, and `pipeline.dali_augment` taking its
        # draws as inputs); without that, a reused pipeline would continue its random state, and `set_epoch(e, b)`
        # would no longer give the batches of an uninterrupted run. The build's stall is hidden instead: the next
        # epoch's pipeline is built and primed while this one hands out its last batches (`_build_ahead`).
        pipe = self._build(source, seed)
        first = start - discard
        with self._data_errors(epoch, first):  # the iterator runs the first batch when it is created
            it = DALIGenericIterator(pipe, self._output_names(), reader_name="Reader",
                                     last_batch_policy=LastBatchPolicy.DROP, auto_reset=True)
        return pipe, it, first

    def _build_ahead(self, epoch: int) -> None:
        """Build and prime epoch `epoch`'s pipeline (from its first batch) in a background thread."""
        if self.stop_epoch is not None and epoch >= self.stop_epoch:
            return
        self._drop_ahead()
        self._ahead = BuildAhead(lambda: self._open(epoch, 0), (epoch, 0), self.ctx.device)

    def _take_ahead(self, epoch: int, start: int) -> Optional[tuple[Pipeline, DALIGenericIterator, int]]:
        """The pipeline built ahead, if it was built for this epoch and start (else it is dropped)."""
        if self._ahead is None or self._ahead.key != (epoch, start):
            self._drop_ahead()   # another epoch or start was asked for
            return None
        ahead, self._ahead = self._ahead, None
        try:
            opened = ahead.result()
        except DataError:
            raise   # a corrupt image in the epoch's first batch: a build now would stop on it too
        except Exception as e:   # e.g. no memory for a second pipeline beside the running one: build it now, alone
            logger.warning("DALI: the pipeline built ahead for epoch %d failed (%s); building it now", epoch, e)
            return None
        self._built_ahead += 1
        return opened

    def _drop_ahead(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            with contextlib.suppress(Exception):   # its error belongs to an epoch nobody asked for
                ahead.result()

    @contextlib.contextmanager
    def _data_errors(self, epoch: int, batch: int) -> Iterator[None]:
        """DALI stops the pipeline on an undecodable image: report it as the data problem it is."""
        try:
            yield
        except RuntimeError as e:
            if not any(k in str(e) for k in _DECODE_FAILURES):
                raise
            raise DataError(f"DALI stopped reading {self.cfg.path!r} (epoch {epoch}, batch {batch}): {e}\nA file "
                            "that passed the start-up check is corrupt; remove it, or run `byol convert` to validate "
                            "every image and read the shards instead") from e

    def _iter_epoch(self) -> Iterator[Batch]:
        return (batch for batch, _ in self.iter_with_params())

    @property
    def read_ahead(self) -> int:
        return self.cfg.dali.prefetch_queue_depth + 1   # the executor's queue, and the batch being handed out

    def stats(self) -> dict:
        """`bad_images` left out at start (their paths, and counts per reason), what `byol convert` left out of a
        shard folder (`convert_skipped`, its reasons and report), the decoder, the last pipeline build time, the
        reader's meta. (DALI's executor statistics exist only for its legacy executor, not the dynamic one here.)"""
        return {"bad_images": len(self._bad), "bad_paths": list(self._bad), "bad_reasons": dict(self._bad_reasons),
                "decoder": self.decoder,
                "random_crop_decoder": self.cfg.dali.random_crop_decoder,
                "pipeline_build_s": round(self._build_s[-1], 3) if self._build_s else None,
                "pipelines_built": len(self._build_s), "epochs_built_ahead": self._built_ahead,
                "reader": dict(self._reader_meta), **self._convert_skips}

    def close(self) -> None:
        self._pipe = None  # DALI frees the pipeline's threads and buffers when it is collected
        self._drop_ahead()
