"""attnlab.core.memory on glibc, read through mallinfo2: by default a large tensor is a mapping of its own, unmapped
when freed; after keep_freed_memory it lives in the heap and its freed pages stay there for the next one. Each case
runs in a fresh interpreter, whose allocator no earlier test has tuned."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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
kept = keep_freed_memory() if sys.argv[1] in ("keep", "train") else None
if sys.argv[1] == "train":  # then the train loop's set-up, which sets it again on the CPU
    import tempfile
    from pathlib import Path
    from attnlab.core.params import load_params
    from attnlab.training import loop
    from benchmarks.common import synthetic_tokens
    folder = Path(tempfile.mkdtemp())
    params = load_params(sys.argv[2], {"model": {"d_model": 16, "n_layers": 1, "n_heads": 4, "d_ff": 32,
                                                 "seq_len": 16}, "tokenizer": {"vocab_size": 384},
                                       "train": {"device": "cpu", "max_tokens": 4096, "batch_size": 4},
                                       "attention": {"seq_len_filter": [4, 8]}})
    loop.set_up(params, loop.TrainPaths.under(folder / "run", synthetic_tokens(folder / "tokens", 384, 4096, 16, 0)))

def mib():  # (bytes in mappings of their own, free bytes kept in the heap), in MiB
    info = libc.mallinfo2()
    return info.hblkhd >> 20, info.fordblks >> 20

tensor = torch.empty(16 << 20).fill_(1.0)  # 64 MiB: above glibc's largest adaptive mmap threshold (32 MiB)
held = mib()
del tensor
print(json.dumps({"kept": kept, "held": held, "freed": mib()}))
"""


def heap(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", HEAP, mode, str(ROOT / "params.yaml")], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_after_keep_freed_memory_a_large_tensor_comes_from_the_heap_and_its_freed_pages_stay():
    default, kept = heap("default"), heap("keep")
    assert default["held"][0] >= 64 and default["freed"][0] < 64  # its own mapping, unmapped when freed
    assert default["freed"][1] < 64  # nothing of it kept
    assert kept["kept"] is True
    assert kept["held"][0] < 64  # from the heap
    assert kept["freed"][1] >= 64  # freed, and kept for the next batch's tensor


def test_the_train_loop_keeps_the_stages_allocator_setting():
    """keep_freed_memory, then the loop's set-up (as `make bench` runs it): a large tensor still comes from the
    heap afterwards (a second, lower mmap threshold set by the loop would map it, and page-fault it anew every
    step, as it did to the bench's reference GPT and its 537 MB logits)."""
    trained = heap("train")
    assert trained["kept"] is True
    assert trained["held"][0] < 64 and trained["freed"][1] >= 64
