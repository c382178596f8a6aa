"""The CPU allocator's setting (cifarkit/fit/allocator.py): a large block freed and asked for again
comes back without page faults once malloc keeps freed memory, and with one per page without."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

FAULTS = """
import json, resource, sys, torch
from cifarkit.fit.allocator import keep_freed_memory
done = keep_freed_memory(sys.argv[1] == "keep")
faults = []
for _ in range(16):  # a training step's pattern: the same large tensor allocated, written and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(10_000_000)  # 40 MB, above glibc's largest mmap threshold
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"done": done, "faults": faults}))
"""


def faults(setting: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", FAULTS, setting], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_kept_memory_is_reused_without_page_faults() -> None:
    kept, ceiling = faults("keep"), faults("ceiling")
    assert kept["done"] and ceiling["done"]
    pages = 40_000_000 // 4096
    assert all(f > pages // 2 for f in ceiling["faults"]), ceiling  # every step maps and zeroes it again
    assert min(kept["faults"][-4:]) < pages // 20 and sum(kept["faults"][-4:]) < pages, kept  # the heap holds it
