"""Which device to compute on: auto = CUDA, then Apple MPS, then CPU; an absent explicit device is an error.
Also what the device offers (native bf16) and how the CPU allocator should behave for training."""

from __future__ import annotations

import ctypes

import torch

from attnlab.core.errors import ConfigError


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """auto: CUDA, then Apple MPS, then CPU. An explicit device that is not available is a ConfigError."""
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("mps") if mps_ok else torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("train.device", f"{name!r} asked for, but CUDA is not available on this machine")
        index = int(name.split(":")[1]) if ":" in name else local_rank
        if index >= torch.cuda.device_count():
            raise ConfigError("train.device", f"{name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device("cuda", index)
    if name == "mps" and not mps_ok:
        raise ConfigError("train.device", "'mps' asked for, but Apple MPS is not available on this machine")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 runs natively: CUDA that supports it, or a CPU with the avx512_bf16 or amx_bf16 flags.
    Elsewhere (e.g. CPUs without those flags) bf16 is emulated, far slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return cpu_flags_have_bf16(f.read().split())
    except OSError:  # not Linux: no way to tell here, assume emulated
        return False


def cpu_flags_have_bf16(flags) -> bool:
    """Whether a CPU with these /proc/cpuinfo flags has bf16 arithmetic (AVX-512 BF16 or AMX)."""
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper limit on 64-bit
TRIM_THRESHOLD = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Training on the CPU: let glibc's malloc keep freed blocks for reuse instead of handing them back to the OS.

    Each step allocates and frees the same large tensors (logits and their gradient: batch x seq_len x vocab
    floats, 16 MB at the quick profile). By default glibc serves such blocks with mmap, or trims them off the
    heap when freed, so every step page-faults them in again: profiled as aten::fill_ and first-touch time, ~20%
    of a quick-profile step (docs/performance.md). Blocks up to 32 MB then come from the heap, which keeps up to
    1 GB of free memory. Memory held stays at the step's peak. glibc (Linux) only: elsewhere a no-op, False.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mmap_ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
    trim_ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(mmap_ok and trim_ok)
