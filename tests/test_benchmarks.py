"""benchmarks/train_step.py --suite accelerator: its FLOP/MFU arithmetic against hand counts, and
its tiny CPU form end to end (the JSON fields the GPU run prints)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from helpers import make_sites_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location("bench_train_step", REPO / "benchmarks" / "train_step.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module   # its dataclasses look their module up
  spec.loader.exec_module(module)
  yield module
  sys.modules.pop(spec.name, None)


def test_cost_analysis_counts_a_matmul_as_2mnk_and_mfu_divides_by_time_and_peak(bench):
  m, k, n = 24, 40, 8
  fn = jax.jit(lambda a, b: a @ b)
  lowered = fn.lower(jnp.ones((m, k)), jnp.ones((k, n)))
  compiled = lowered.compile()
  assert bench.analysed_flops(compiled.cost_analysis()) == 2 * m * n * k
  flops, _, source = bench.step_flops(lowered, compiled)
  assert (flops, source) == (2 * m * n * k, "compiled")
  # 15,360 FLOPs in 2 ms: 7.68 MFLOP/s, on a 1 GFLOP/s chip 0.768 % of its peak
  assert bench.model_flop_utilisation(flops, 0.002, 1e9) == pytest.approx(0.00768)
  assert bench.model_flop_utilisation(flops, 0.002, None) is None
  # list form (older JAX: one dict per program), and XLA's -1 for "cannot count"
  assert bench.analysed_flops([{"flops": 3.0}, {"flops": -1.0}, {"flops": 4.0}]) == 7.0
  assert bench.analysed_flops({"flops": -1.0}) is None and bench.analysed_flops(None) is None


def test_peak_table_matches_device_kinds_most_specific_first(bench):
  tera = 1e12
  assert bench.device_peak_flops("NVIDIA H200", "bfloat16") == 989.5 * tera
  assert bench.device_peak_flops("NVIDIA H100 80GB HBM3", "float32") == 494.5 * tera   # TF32, SXM
  assert bench.device_peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756.5 * tera
  assert bench.device_peak_flops("NVIDIA A100-SXM4-80GB", "float32") == 156.0 * tera
  assert bench.device_peak_flops("TPU v5 lite", "float32") == 197.0 * tera
  assert bench.device_peak_flops("TPU v5", "bfloat16") == 459.0 * tera
  assert bench.device_peak_flops("cpu", "float32") is None


def test_tiny_accelerator_suite_prints_every_field(bench, tmp_path, capsys):
  root = make_sites_dataset(tmp_path / "data", sites=("A", "B", "C", "D"), cases=2)
  bench.main(["--suite", "accelerator", "--tiny", "--methods", "deepall,mldg,deepall_3d",
              "--dtypes", "float32", "--no-torch", "--peak-tflops", "0.001", "--data-root", str(root)])
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
  by_name = {r["name"]: r for r in lines}
  assert by_name["torch_anchor"]["skipped"] == "--no-torch"
  assert by_name["total"]["tiny"] is True
  measured = ["deepall", "mldg"] + (["deepall_3d"] if bench.unet3d_available() else [])
  if not bench.unet3d_available():
    assert by_name["deepall_3d"]["skipped"] == "models/unet3d.py not available"
  for name in measured:
    r = by_name[name]
    assert r["loss_finite"] and r["dtype"] == "float32" and r["devices"] == 1
    assert r["step_ms"] > 0 and r["compile_s"] > 0 and r["peak_mem_mb"] > 0 and r["step_mem_mb"] > 0
    # both fields are rounded (images/s to 0.1, step_ms to 0.001): the bound is the two roundings
    rounding = 0.05 + r["images_per_s"] * 0.0005 / r["step_ms"] + 1e-9
    assert r["images_per_s"] == pytest.approx(r["images_per_step"] / (r["step_ms"] / 1000), abs=rounding)
    assert r["flops_per_step"] > 0 and r["flops_source"] == "compiled"
    # MFU = FLOPs / step time / peak (0.001 TFLOP/s = 1e9 FLOP/s)
    assert r["mfu"] == pytest.approx(r["flops_per_step"] / (r["step_ms"] / 1000) / 1e9, rel=1e-3)
  assert by_name["deepall"]["images_per_step"] == 4 and by_name["mldg"]["images_per_step"] == 6
  assert by_name["mldg"]["order"] == 2
  per_slice = lambda r: r["step_ms"] / r["images_per_step"]  # noqa: E731
  assert by_name["mldg"]["ratio_to_deepall"] == pytest.approx(
      per_slice(by_name["mldg"]) / per_slice(by_name["deepall"]), rel=1e-2)
  assert by_name["deepall"]["e2e_images_per_s"] > 0
  assert math.isfinite(by_name["total"]["wall_s"])
  print({name: (by_name[name]["compile_s"], by_name[name]["step_ms"]) for name in measured}, by_name["total"]["wall_s"])
