"""Process-group set-up under torchrun, resolved once at start-up, and small typed helpers."""
from __future__ import annotations

import datetime
import hashlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0, setting: str = "train.device") -> torch.device:
    """`auto` -> cuda:<local_rank> when CUDA is present, else cpu; `cuda` -> cuda:<local_rank>. A name that is no
    usable device is a ConfigError naming `setting`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    from byolfast.train.config import ConfigError
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{setting}={name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{setting}={name!r}: byolfast runs on cpu or cuda (auto picks cuda when present)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{setting}={name!r} but no CUDA device is available: use {setting}=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{setting}={name!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def init_distributed(device_name: str, backend: str = "auto", timeout_s: int = 600) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else a single process.

    The timeout bounds every collective, so a rank that dies makes the others fail with an error instead of waiting
    forever (with NCCL, async error handling turns the timeout into an exception).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cuda" and local_world > 1 and device.index != local_rank:
        from byolfast.train.config import ConfigError
        raise ConfigError(f"train.device={device_name!r} puts every rank of this node on one GPU: under torchrun use "
                          "train.device=cuda or auto (each rank takes the GPU of its LOCAL_RANK)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
        log.info("process group: backend=%s rank=%d/%d local_rank=%d", backend, rank, world, local_rank)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device)


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= get_world_size()
    return t


def weights_digest(module: torch.nn.Module, buffers: bool = True) -> str:
    """A hash of every parameter, and with `buffers` every buffer, of `module` (host sync: call on check steps
    only)."""
    h = hashlib.sha256()
    tensors = module.state_dict() if buffers else dict(module.named_parameters())
    for k, v in tensors.items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_weights_agree(module: torch.nn.Module, step: int, buffers: bool = True) -> None:
    """Raise when ranks hold different weights (they must: DDP syncs gradients, the EMA is deterministic).

    `buffers=False` leaves out the BatchNorm statistics, which legitimately differ across ranks with per-rank BN
    (`model.bn=local`)."""
    if get_world_size() == 1:
        return
    digest = weights_digest(module, buffers)
    digests: list = [None] * get_world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"step {step}: weights differ across ranks (digests {digests}); "
                           "this is a bug or a hardware fault, the run cannot continue")


class FlagAgreement:
    """The ranks' agreement on a flag (a pending preemption) without stalling the device queue.

    Each `exchange` starts a MAX all-reduce of this rank's flag and returns the result of the one started at the
    previous call, which has long finished: every rank reads the same value at the same call, so all ranks act at
    one step, one exchange interval later than a blocking all-reduce would. On CUDA the result comes back through
    pinned memory and an event, so reading it never waits for the queued training work (an all-reduce followed by
    `.item()` would drain the whole queue); on the CPU (gloo) the reduction runs on gloo's threads.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._pending = None   # (work, device value, pinned host copy, event) of the exchange in flight

    def exchange(self, local: bool) -> bool:
        agreed = self.finish()
        if not agreed:
            value = torch.full((1,), int(local), dtype=torch.int32, device=self.device)
            work = dist.all_reduce(value, op=dist.ReduceOp.MAX, async_op=True)
            host = event = None
            if self.device.type == "cuda":
                work.wait()   # NCCL: the current stream waits for the reduction, the host does not
                host = torch.empty(1, dtype=torch.int32, pin_memory=True)
                host.copy_(value, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            self._pending = (work, value, host, event)
        return agreed

    def finish(self) -> bool:
        """Wait for the exchange in flight, if any, and return its result (every rank must call this together)."""
        if self._pending is None:
            return False
        work, value, host, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
            return bool(host.item())
        work.wait()
        return bool(value.item())


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
