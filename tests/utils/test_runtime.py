"""The allocator setting must stop large freed blocks from being faulted in again on reuse."""
import os
import subprocess
import sys

import pytest

# Allocates, touches and frees a 64 MiB block a few times and prints the page faults of every
# cycle after the first (the first may grow the heap).
_SCRIPT = """
import resource, sys
import numpy as np
if sys.argv[1] == 'keep':
  from qna_detr.utils import runtime
  if not runtime.keep_freed_memory_on_cpu():
    sys.exit(print('unsupported'))
faults = []
for cycle in range(5):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = np.empty(64 * 2**20, np.uint8)
  block[::4096] = 1
  del block
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[1:]))
"""


def _faults(mode: str) -> int:
  env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}  # conftest's.
  out = subprocess.run([sys.executable, '-c', _SCRIPT, mode], check=True, capture_output=True,
                       text=True, env=env)
  if out.stdout.split()[-1] == 'unsupported':
    pytest.skip('no glibc mallopt here')
  return int(out.stdout.split()[-1])


def test_freed_blocks_are_reused_without_page_faults():
  default, kept = _faults('default'), _faults('keep')
  if default < 64:  # Not glibc's mmap behaviour (or huge pages): nothing to show here.
    pytest.skip(f'the default allocator already reuses freed blocks ({default} faults)')
  assert kept < default / 10, (default, kept)
