"""workers/heap.py: a forward's intermediates reuse their memory instead of coming back as page
faults, and `trim` gives memory back only beyond its slack. Run in a child process: the policy is
the process's malloc's, and the fault counts must be the child's own."""

import subprocess
import sys
import textwrap

import pytest

from flexorch.workers.heap import Heap

pytestmark = pytest.mark.skipif(Heap()._libc is None, reason="glibc's malloc only")

BLOCK = 8 << 20  # a mid-sized intermediate: above glibc's default mmap threshold, below ours


def _child(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


FAULTS_OF_REUSE = f"""
    import resource
    import torch
    from flexorch.workers.heap import Heap

    heap = Heap()
    configured = {{configure}} and heap.configure()
    def cycle():  # a forward's pattern: intermediates of several sizes, freed in another order
        a, b = torch.ones({BLOCK} // 4), torch.ones({BLOCK} // 2)
        del a
        c = torch.ones({BLOCK} // 4)
        del b, c
    for _ in range(2):
        cycle()
        heap.trim() if configured else None  # a shard boundary
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        cycle()
        heap.trim() if configured else heap._libc.malloc_trim(0)
    print(configured, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_configured_heap_reuses_intermediates_across_shards():
    configured, faults = _child(FAULTS_OF_REUSE.replace("{configure}", "True")).split()
    assert configured == "True"
    pages = BLOCK // 4096
    assert int(faults) < pages  # 20 cycles of 4 MB + 2 MB + 2 MB, all reused: hardly a page faulted


def test_unconfigured_heap_refaults_what_it_trimmed():
    """The baseline the policy is measured against: glibc's defaults with a trim per shard fault every
    cycle's blocks anew (so the test above can fail)."""
    configured, faults = _child(FAULTS_OF_REUSE.replace("{configure}", "False")).split()
    assert configured == "False"
    assert int(faults) > 10 * BLOCK // 4096


def test_trim_keeps_its_slack_and_gives_back_the_rest():
    out = _child(f"""
        import torch
        from flexorch.workers.heap import Heap

        heap = Heap()
        assert heap.configure()
        blocks = [torch.ones({BLOCK} // 4) for _ in range(6)]  # 48 MB from the heap
        del blocks
        free = heap.free_bytes()
        kept = heap.trim(slack=free + 1)  # within the slack: nothing done
        given = heap.trim(slack=0)
        print(free >= 6 * {BLOCK}, kept, given, heap.free_bytes() < free)
    """)
    assert out == "True False True True"
