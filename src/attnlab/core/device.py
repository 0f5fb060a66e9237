"""Which device to compute on: auto = CUDA, then Apple MPS, then CPU; an absent explicit device is an error.
Also what the device offers (native bf16)."""

from __future__ import annotations

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
