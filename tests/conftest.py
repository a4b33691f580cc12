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
