"""keep_freed_memory: a training step's large buffers are reused, not page-faulted in again on every step."""

import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
from attnlab.core.device import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # four 16 MB buffers alive at once, as a quick-profile step's logits, softmax and their gradients
    buffers = [torch.empty(4 * 1024 * 1024).fill_(1.0) for _ in range(4)]
    del buffers
for _ in range(3):  # warm up: the first allocations fault in any case
    step()
before = faults()
for _ in range(10):
    step()
print(faults() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    def page_faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    # With the setting, no 16 MB buffer (4,096 pages of 4 KB) is faulted in again over the 10 steps. Without it,
    # glibc's dynamic thresholds re-fault them on some runs and not on others, so the default is no reference.
    assert page_faults("keep") < 4096
