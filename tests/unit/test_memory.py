"""attnlab.core.memory on glibc, read through mallinfo2: by default a large tensor is a mapping of its own, unmapped
when freed; after keep_freed_memory it lives in the heap and its freed pages stay there for the next one. Each case
runs in a fresh interpreter, whose allocator no earlier test has tuned."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys

import pytest


def has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not (sys.platform.startswith("linux") and has_mallinfo2()),
                                reason="glibc's allocator (mallinfo2: glibc >= 2.33)")

HEAP = """
import ctypes, json, sys, torch
from attnlab.core.memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
kept = keep_freed_memory() if sys.argv[1] == "keep" else None

def mib():  # (bytes in mappings of their own, free bytes kept in the heap), in MiB
    info = libc.mallinfo2()
    return info.hblkhd >> 20, info.fordblks >> 20

tensor = torch.empty(16 << 20).fill_(1.0)  # 64 MiB: above glibc's largest adaptive mmap threshold (32 MiB)
held = mib()
del tensor
print(json.dumps({"kept": kept, "held": held, "freed": mib()}))
"""


def heap(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", HEAP, mode], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def test_after_keep_freed_memory_a_large_tensor_comes_from_the_heap_and_its_freed_pages_stay():
    default, kept = heap("default"), heap("keep")
    assert default["held"][0] >= 64 and default["freed"][0] < 64  # its own mapping, unmapped when freed
    assert default["freed"][1] < 64  # nothing of it kept
    assert kept["kept"] is True
    assert kept["held"][0] < 64  # from the heap
    assert kept["freed"][1] >= 64  # freed, and kept for the next batch's tensor
