"""The machine a number was measured on: CPU model and the vector flags that change speed and rounding, torch
threads, accelerator. Results go with it, since the same commit gives other numbers on another VM."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni")


def machine_info() -> dict[str, Any]:
    """`{cpu, flags, cores, torch_threads, torch, device}` of this process's machine."""
    cpu, flags = platform.processor() or platform.machine(), []
    info = Path("/proc/cpuinfo")
    if info.is_file():
        text = info.read_text(errors="replace")
        for line in text.splitlines():
            if line.startswith("model name") and ":" in line:
                cpu = line.split(":", 1)[1].strip()
                break
        words = set()
        for line in text.splitlines():
            if line.startswith("flags") and ":" in line:
                words = set(line.split(":", 1)[1].split())
                break
        flags = [f for f in FLAGS if f in words]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "cpu": cpu,
        "flags": flags,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": device,
    }


def machine_line(info: dict[str, Any] | None = None) -> str:
    info = info or machine_info()
    flags = ", ".join(info["flags"]) or "none of " + "/".join(FLAGS)
    return f"{info['cpu']} ({info['cores']} cores; {flags}); torch {info['torch']}, {info['torch_threads']} threads; {info['device']}"
