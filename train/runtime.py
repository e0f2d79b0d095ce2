"""Start-up decisions made once per process: threads, precision, cudnn/TF32 flags, seeds, the run folder."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def setup_logging(is_main: bool = True, level: int = logging.INFO) -> None:
    """Plain `logging` to stderr; non-main ranks only report warnings."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(level if is_main else logging.WARNING)


def configure_torch(device: torch.device, num_threads: int = 0) -> None:
    """Fast, still-faithful kernel choices for the device.

    `num_threads > 0` sets torch's CPU threads; 0 keeps torch's default, every core, shared with the loader workers
    rather than leaving cores to them, since their work is light next to the model's. `byol bench --what e2e
    train.num_threads=N` measures whether another count pays on a given machine.
    """
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True           # fixed shapes: let cuDNN pick the fastest algorithms
        torch.backends.cuda.matmul.allow_tf32 = True    # fp32 parts (the loss, the EMA) may use TF32
        torch.backends.cudnn.allow_tf32 = True


def cpu_has_native_bf16() -> bool:
    """True when oneDNN has bf16 kernels for this CPU (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 on GPUs that support it and on CPUs with native bf16, else fp16 (older GPUs) or fp32."""
    if precision != "auto":
        if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
            log.warning("train.precision=bf16 on a CPU without native bf16 (%s): bf16 is emulated and can be many "
                        "times slower than fp32; consider train.precision=auto or fp32",
                        torch.backends.cpu.get_cpu_capability())
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """The autocast context of `train.precision` (bf16/fp16), or nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def git_revision() -> str:
    """The source tree's git commit (with `-dirty` when modified), or `unknown` outside a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_run_info(run_dir: Path, config: dict, extra: dict | None = None) -> None:
    """The resolved config (YAML) and the environment (git revision, versions, command line) of the run."""
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    info = {"git": git_revision(), "torch": torch.__version__, "python": sys.version.split()[0],
            "argv": sys.argv, "cuda": torch.version.cuda,
            "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    info.update(extra or {})
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2))
