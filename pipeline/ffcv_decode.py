"""Seeded per-sample crop and flip inside FFCV's compiled pipeline.

FFCV 1.0.2 seeds only its sample order: its crop (`get_random_crop`) and flip draw from numba's per-thread
`np.random`, which numba seeds from OS entropy. `SeededCropFlipDecoder` does the decode, the crop and the flip in one
compiled loop and re-seeds numba's generator per sample from `(seed, rank, epoch, view, index)` right before its draws,
`index` being the sample's global index, not its position in the beton (`byol convert` stores the samples shuffled):
the draws do not depend on the storage order. `SeededEpochIterator` writes the epoch's seed into the decoder's buffer
before FFCV's epoch thread starts, and each batch's global indices before that batch is decoded (compiled code cannot
see a Python attribute change without a 13-31 s recompilation, and FFCV hands a decoder only the positions).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

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
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.loader import Loader
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.state import State

from pipeline.sharding import mix_seed, rank_seed

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
def _flip_columns(img: np.ndarray) -> None:
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


class SeededCropFlipDecoder(RandomResizedCropRGBImageDecoder):
    """FFCV's decode + random resized crop, plus the horizontal flip, every draw seeded per sample.

    Args:
        output_size: (height, width) of the crops.
        scale, ratio: the crop's area fraction and aspect-ratio ranges (as `RandomResizedCropRGBImageDecoder`).
        flip_p: probability of a horizontal flip.

    The decoder's third buffer holds, per batch slot, `(view seed, global index)` of each sample: the seed is written
    before the epoch starts, the indices before each batch (`SeededEpochIterator`).
    """

    def __init__(self, output_size: tuple[int, int], scale: Sequence[float], ratio: Sequence[float], flip_p: float):
        super().__init__(output_size, scale=tuple(scale), ratio=tuple(ratio))
        self.flip_p = float(flip_p)

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        state, (out, temp) = super().declare_state_and_memory(previous_state)
        return state, (out, temp, AllocationQuery((2,), np.dtype("<i8")))

    def generate_code(self):
        # FFCV's ResizedCropRGBImageDecoder.generate_code, with the seeded draws and the flip.
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        draw = crop_flip_params
        flip_columns = _flip_columns
        scale = np.array(self.scale, dtype=np.float64)
        ratio = np.array(self.ratio, dtype=np.float64)
        flip_p = self.flip_p

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage, draws = my_storage
            for dst_ix in my_range(len(batch_indices)):
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
                i, j, h, w, flip = draw(draws[dst_ix, 0], draws[dst_ix, 1], height, width, scale, ratio, flip_p)
                resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
                if flip:
                    flip_columns(destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class SeededEpochIterator(EpochIterator):
    """FFCV's epoch thread over the beton positions `order`, filling each seeded decoder's buffer: the view seed
    after allocation and before the thread starts (EpochIterator.__init__ allocates the epoch's buffers, then calls
    start()), and the global indices `index_of[positions]` of each batch in its slot right before it is decoded."""

    def __init__(self, loader: Loader, order: np.ndarray, seeds: dict[int, int], index_of: np.ndarray):
        self._seeds = seeds
        self._index_of = index_of
        super().__init__(loader, order)

    def start(self) -> None:
        for node_id, value in self._seeds.items():
            self.memory_allocations["operation"][node_id][2][..., 0] = value
        super().start()

    def run_pipeline(self, b_ix, batch_indices, batch_slot, cuda_event):
        # In the epoch thread, right before this batch's decode, the only reader of these entries.
        index = self._index_of[batch_indices]
        for node_id in self._seeds:
            self.memory_allocations["operation"][node_id][2][batch_slot, :len(index), 1] = index
        return super().run_pipeline(b_ix, batch_indices, batch_slot, cuda_event)
