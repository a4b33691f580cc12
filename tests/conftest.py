"""Test setup: fake several CPU devices (as CI does) before JAX initializes, and compile without
XLA's backend optimizations: the suite's arrays are tiny, so compilation dominates its time, and
-O0 halves it (same programs; only rounding-level differences, which no test depends on)."""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=4"
if "--xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One compilation cache per test session, shared by the xdist workers (they inherit the
# environment): the suite compiles the same tiny programs (a DeepAll step, an evaluation pass) in
# many end-to-end tests, and XLA's persistent cache returns the same executable for the same HLO,
# so only the first compiles. A fresh folder each session, so no run depends on an earlier one.
if "MEDGEN_TEST_COMPILATION_CACHE" not in os.environ:
  import atexit
  import shutil
  import tempfile
  os.environ["MEDGEN_TEST_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="medgen_jax_test_xla_cache_")
  # removed by the process that made it (the xdist controller exits after its workers)
  atexit.register(shutil.rmtree, os.environ["MEDGEN_TEST_COMPILATION_CACHE"], ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["MEDGEN_TEST_COMPILATION_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
