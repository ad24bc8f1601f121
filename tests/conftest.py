"""Test-session settings: a persistent XLA compilation cache shared by all tests.

Many tests compile the same small programs (the same micro DETR in several runs, in
subprocesses too); the cache turns every repeat into a load. It lives in the system's temp dir,
so later sessions on the same machine start warm; correctness never depends on it.
"""
import os
import tempfile

import jax

CACHE_DIR = os.path.join(tempfile.gettempdir(), 'qna_detr_test_xla_cache')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', CACHE_DIR)  # Inherited by subprocesses.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
