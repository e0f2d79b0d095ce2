"""Seeded per-sample crops and flips of both views, from one decode per image, inside FFCV's compiled pipeline.

FFCV 1.0.2 seeds only its sample order: its crop (`get_random_crop`) and flip draw from numba's per-thread
`np.random`, which numba seeds from OS entropy. `TwoViewCropFlipDecoder` decodes each image once and cuts both views'
crops (resized with PIL's antialiased bicubic, `pipeline.resample`) and flips from it in one compiled loop, re-seeding numba's generator per view and sample from
`(seed, rank, epoch, view, index)` right before its draws, `index` being the sample's global index, not its position
in the beton (`byol convert` stores the samples shuffled): the draws do not depend on the storage order.
`SeededEpochIterator` writes the epoch's seeds into the decoder's buffer before FFCV's epoch thread starts, and each
batch's global indices before that batch is decoded (compiled code cannot see a Python attribute change without a
recompilation, and FFCV hands a decoder only the positions). `allocate_once` keeps FFCV's buffers from one epoch to
the next.
"""
from __future__ import annotations

import contextlib
import queue
from dataclasses import replace
from typing import Any, Iterator, Sequence

import numba
import numpy as np
import torch


@contextlib.contextmanager
def keep_torch_threads() -> Iterator[None]:
    # FFCV sets torch's intra-op thread count to its worker count (`Compiler.set_num_threads`, which also runs when
    # ffcv is first imported: torch then drops to 1 thread); the trainer's setting is put back afterwards.
    n = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(n)


with keep_torch_threads():
    from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder, get_random_crop
    from ffcv.libffcv import imdecode
    from ffcv.loader import Loader
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.graph import Graph
    from ffcv.pipeline.operation import Operation
    from ffcv.pipeline.state import State

from byolfast.pipeline.resample import resize_crop_u8
from byolfast.pipeline.sharding import mix_seed, rank_seed

_U64 = np.uint64


# ---------------------------------------------------------------------------------------------------------- draws

# FFCV's own crop sampler, torchvision's algorithm (10 tries of area x log-aspect, then a central crop).
_random_crop = numba.njit(fastmath=True)(get_random_crop)


@numba.njit(inline="always")
def _sample_seed32(view_seed: int, index: int) -> np.uint32:
    # splitmix64 of (view_seed, index), top 32 bits: numba's np.random.seed takes a 32-bit seed.
    z = _U64(view_seed) ^ (_U64(index) * _U64(0x9E3779B97F4A7C15))
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    z = z ^ (z >> _U64(31))
    return np.uint32(z >> _U64(32))


@numba.njit
def crop_flip_params(view_seed: int, index: int, height: int, width: int, scale: np.ndarray, ratio: np.ndarray,
                     flip_p: float) -> tuple[int, int, int, int, bool]:
    """The crop `(top, left, h, w)` and flip of the sample of global index `index` under `view_seed` (see
    `view_seed`), as the loader draws.

    Seeds numba's generator of the calling thread, then draws the crop with FFCV's `get_random_crop` and the flip.
    Callable from Python: the tests replay the loader's draws with it.
    """
    np.random.seed(_sample_seed32(view_seed, index))
    i, j, h, w = _random_crop(height, width, scale, ratio)
    flip = np.random.random() < flip_p
    return i, j, h, w, flip


@numba.njit(inline="always")
def flip_columns(img: np.ndarray) -> None:
    # In-place horizontal flip of one (H, W, 3) uint8 image.
    width = img.shape[1]
    for r in range(img.shape[0]):
        for c in range(width // 2):
            for ch in range(3):
                t = img[r, c, ch]
                img[r, c, ch] = img[r, width - 1 - c, ch]
                img[r, width - 1 - c, ch] = t


def view_seed(seed: int, rank: int, epoch: int, view: int) -> int:
    """The 63-bit seed of one view's crops and flips in one epoch on one rank (each sample mixes in its index)."""
    return mix_seed(rank_seed(seed, rank), epoch, view)


class TwoViewCropFlipDecoder(RandomResizedCropRGBImageDecoder):
    """FFCV's decode + random resized crop, for both views at once: one decode per image, two seeded crops and flips.

    Args:
        output_size: (height, width) of the crops (both views).
        views: per view, `(scale, ratio, flip_p)`: the crop's area fraction and aspect-ratio ranges (as
            `RandomResizedCropRGBImageDecoder`) and the probability of a horizontal flip.

    Each image is decoded once into a scratch buffer and both views are cut from it (a decode costs more than a
    view's crop), each resized by `pipeline.resample.resize_crop_u8` (PIL's antialiased bicubic, torchvision's
    `resized_crop`, in place of FFCV's OpenCV `INTER_AREA`). The views' draws are those of two separate seeded decoders: each re-seeds from its own view seed
    and the sample's global index (`crop_flip_params`). The result is view-major, `(2, N, H, W, 3)` in the memory
    FFCV allocates per sample as `(2, H, W, 3)`: each view's batch is one contiguous block, which `ViewOf` hands on
    without a copy. The third buffer holds, per batch slot, `(view 1 seed, view 2 seed, global index)` of each
    sample: the seeds are written before the epoch starts, the indices before each batch (`SeededEpochIterator`).
    """

    def __init__(self, output_size: tuple[int, int], views: Sequence[tuple[Sequence[float], Sequence[float], float]]):
        super().__init__(output_size, scale=views[0][0], ratio=views[0][1])
        if len(views) != 2:
            raise ValueError(f"TwoViewCropFlipDecoder cuts two views, got {len(views)}")
        self.view_scale = np.array([v[0] for v in views], dtype=np.float64)
        self.view_ratio = np.array([v[1] for v in views], dtype=np.float64)
        self.view_flip_p = np.array([v[2] for v in views], dtype=np.float64)

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        state, (out, temp) = super().declare_state_and_memory(previous_state)   # one crop's output; one scratch
        views = AllocationQuery((2, *out.shape), out.dtype)
        return replace(state, shape=views.shape), (views, temp, AllocationQuery((3,), np.dtype("<i8")))

    def generate_code(self):
        # FFCV's ResizedCropRGBImageDecoder.generate_code, decoding once and cutting both views with the seeded draws.
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        draw = crop_flip_params
        flip_columns_c = flip_columns
        scale, ratio, flip_p = self.view_scale, self.view_ratio, self.view_flip_p
        out_h, out_w = self.output_size

        def decode(batch_indices, my_storage, metadata, storage_state):
            per_sample, temp_storage, draws = my_storage
            n = len(batch_indices)
            views = per_sample.reshape((2, n, out_h, out_w, 3))   # the same bytes, view-major
            for dst_ix in my_range(n):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    temp_buffer = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                for v in range(2):
                    i, j, h, w, flip = draw(draws[dst_ix, v], draws[dst_ix, 2], height, width, scale[v], ratio[v],
                                            flip_p[v])
                    resize_crop_u8(views[v, dst_ix], temp_buffer, i, j, h, w)
                    if flip:
                        flip_columns_c(views[v, dst_ix])
            return views

        decode.is_parallel = True
        return decode


class ViewOf(Operation):
    """One view of `TwoViewCropFlipDecoder`'s result: `(N, H, W, 3)`, contiguous, no copy."""

    def __init__(self, view: int):
        super().__init__()
        self.view = view

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, None]:
        return replace(previous_state, shape=previous_state.shape[1:], jit_mode=False), None

    def generate_code(self):
        view = self.view

        def select(views, _):
            return views[view]

        return select


class SeededEpochIterator(EpochIterator):
    """FFCV's epoch thread over the beton positions `order`, filling the seeded decoder's buffer (graph node
    `node_id`): the view seeds after allocation and before the thread starts (EpochIterator.__init__ allocates the
    epoch's buffers, then calls start()), and the global indices `index_of[positions]` of each batch in its slot right
    before it is decoded."""

    def __init__(self, loader: Loader, order: np.ndarray, node_id: int, seeds: Sequence[int], index_of: np.ndarray):
        self.error: BaseException | None = None
        self.failed_batch: int | None = None
        self._node_id = node_id
        self._seeds = np.asarray(seeds, dtype=np.int64)
        self._index_of = index_of
        super().__init__(loader, order)

    def _draws(self) -> np.ndarray:
        return self.memory_allocations["operation"][self._node_id][2]

    def start(self) -> None:
        self._draws()[..., :len(self._seeds)] = self._seeds
        super().start()

    def run(self) -> None:
        # FFCV's thread catches only StopIteration: any other error (a device copy out of memory, a read error) ended
        # the thread and left the consumer waiting on the queue for ever. The error is kept and the end marker queued;
        # `__next__` raises it.
        try:
            super().run()
        except BaseException as e:
            self.error = e
            while not self.terminate_event.is_set():
                try:
                    self.output_queue.put(None, timeout=0.5)
                    return
                except queue.Full:
                    pass

    def __next__(self):
        try:
            return super().__next__()
        except StopIteration:
            if self.error is None:
                raise
        raise self.error   # outside the except block: the error keeps its own cause and context

    def run_pipeline(self, b_ix, batch_indices, batch_slot, cuda_event):
        self.failed_batch = b_ix   # stays set when this batch raises
        # In the epoch thread, right before this batch's decode, the only reader of these entries.
        index = self._index_of[batch_indices]
        self._draws()[batch_slot, :len(index), -1] = index
        result = super().run_pipeline(b_ix, batch_indices, batch_slot, cuda_event)
        self.failed_batch = None
        return result


def allocate_once(graph: Graph) -> None:
    """Make FFCV allocate a loader's pipeline buffers on its first epoch only, not on every epoch.

    FFCV 1.0.2's `EpochIterator` asks `Graph.allocate_memory` for new buffers each epoch (pinned, on a CUDA machine):
    the decoder's scratch alone holds `batches_ahead + 2` batches of the largest stored image, 1 GB at 512 px and
    batch 256. The loader runs one epoch at a time, so the next epoch can take the same buffers over.
    """
    allocate = graph.allocate_memory
    buffers: dict[tuple[int, int], Any] = {}

    def allocate_memory(batch_size: int, batches_ahead: int):
        if (batch_size, batches_ahead) not in buffers:
            buffers[batch_size, batches_ahead] = allocate(batch_size, batches_ahead)
        return buffers[batch_size, batches_ahead]

    graph.allocate_memory = allocate_memory
