"""`data.dali`: the DALI backend's settings, which check their own ranges (`problems`)."""
from __future__ import annotations

from dataclasses import dataclass

DECODERS = ("mixed", "cpu")


@dataclass
class DaliConfig:
    """Settings of the DALI backend.

    Args:
        num_threads: CPU threads of the DALI pipeline.
        decoder: `mixed` (nvJPEG on the GPU; falls back to `cpu` with a warning when no GPU is present) or `cpu`.
        random_crop_decoder: decode each view's crop window separately (`decoders.image_slice`) instead of decoding
            once and cropping twice. Off by default: each partial decode still parses the compressed data up to its
            window, so two of them need not beat one whole decode; `byol bench --what loader` and `byol tune`
            measure whether it pays on your machine.
        exact_hue: torchvision's hue (an exact HSV shift in DALI arithmetic) rather than DALI's `fn.hsv`, whose hue
            differs from torchvision's by more than the shift itself; it costs more than `fn.hsv` where the graph
            ops run.
        cpu_kernels: where images are augmented on the CPU, run colour jitter and grayscale as one operator of
            per-pixel numba kernels (`pipeline.cpu_augment`, exact hue included) instead of DALI's per-op graph (the
            GPU's); the same draws, rounded once instead of after every op.
        prefetch_queue_depth: batches DALI prepares ahead.
        hw_decoder_load: share of JPEG decoding given to the hardware decoder (A100/H100), 0..1.
        build_ahead: batches before an epoch's end at which the next epoch's pipeline is built and primed in a
            background thread, so that the epoch starts without the build's stall; 0 builds each epoch's pipeline
            when the epoch starts. For that many batches two pipelines hold their buffers.
    """

    num_threads: int = 4
    decoder: str = "mixed"
    random_crop_decoder: bool = False
    exact_hue: bool = True
    cpu_kernels: bool = True
    prefetch_queue_depth: int = 2
    hw_decoder_load: float = 0.65
    build_ahead: int = 8

    def problems(self) -> list[tuple[str, str, object]]:
        """`(key, what is allowed, value)` of each setting out of range, keys relative to the section."""
        checks = [(self.decoder in DECODERS, "decoder", " or ".join(DECODERS), self.decoder),
                  (self.num_threads >= 1, "num_threads", ">= 1", self.num_threads),
                  (0.0 <= self.hw_decoder_load <= 1.0, "hw_decoder_load", "[0, 1]", self.hw_decoder_load),
                  (self.prefetch_queue_depth >= 1, "prefetch_queue_depth", ">= 1", self.prefetch_queue_depth),
                  (self.build_ahead >= 0, "build_ahead", ">= 0", self.build_ahead)]
        return [(key, allowed, value) for ok, key, allowed, value in checks if not ok]
