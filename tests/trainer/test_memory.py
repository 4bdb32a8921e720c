"""trainer.memory: freed tensors leave resident memory once the mmap threshold is fixed."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import sys
import torch
from trainer.memory import return_freed_memory

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

big = torch.ones(4 * 2**20)  # a freed 16 MiB block: glibc's moving threshold would rise past 1 MiB
del big
print(return_freed_memory() if sys.argv[1] == 'fixed' else True)
before = rss_mb()
xs, kept = [], []
for _ in range(200):  # 200 tensors of 1 MiB, written so resident, between small ones that stay
    xs.append(torch.ones(2**18))
    kept.append(torch.ones(64))
during = rss_mb()
del xs
print(during - before, rss_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc: Linux only")
def test_freed_activations_go_back_to_the_system() -> None:
    # A fresh process: the setting is process-wide and a test process has its own history.
    out = run("fixed")
    assert out[0] == "True", "glibc expected on the development machine"
    grown, left = float(out[1]), float(out[2])
    assert grown > 150, f"the tensors were not resident ({grown:.0f} MB)"
    assert left < 30, f"{left:.0f} MB of 200 freed MB still resident"
    # glibc's moving threshold keeps them: what the setting is for.
    assert float(run("moving")[2]) > 150


def run(threshold: str) -> list[str]:
    cmd = [sys.executable, "-c", SCRIPT, threshold]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
