"""The environment a benchmark ran in, recorded in its JSON beside the numbers: device and driver, library versions,
host facts."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import time

import torch

from byolfast.benchmarks.common import total_memory_mb

def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _dali_version() -> str | None:
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-dali"):
            return f"{dist.version} ({name})"
    return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()


def env_info(device: torch.device, extra: dict | None = None) -> dict:
    """Device, driver, library versions and host facts, for the JSON next to the numbers."""
    from byolfast.train.runtime import cpu_has_native_bf16, git_revision

    info = {
        "device": str(device), "device_name": device_name(device), "device_count": torch.cuda.device_count(),
        "driver": _driver_version() if device.type == "cuda" else None,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "torch": torch.__version__, "torchvision": _dist_version("torchvision"), "dali": _dali_version(),
        "ffcv": _dist_version("ffcv"), "numba": _dist_version("numba"), "python": sys.version.split()[0],
        "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "arch": platform.machine(),
        "torch_threads": torch.get_num_threads(), "cpu_bf16_native": cpu_has_native_bf16(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "total_memory_mb": round(total_memory_mb(device)),
        "git": git_revision(), "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    info.update(extra or {})
    return info
