"""Trainer-loop throughput: slices/s of `train_lib.train_and_evaluate` itself (host loop, batch
building, device transfer and the step), not of the step alone (that is train_step.py).

    python benchmarks/trainer_loop.py [--steps 240] [--log-every 40] [--batch 12] [--size 80]
                                      [--method deepall] [--repeats 2] [--json]

Trains the quick start's CPU-sized model on brain-sites (generated under data/brain-sites if
missing) in a fresh temporary workdir, with evaluation and checkpointing only at the end, and
reports the median over log intervals (the first, which holds the compilation, excluded) of the
`slices_per_s` the trainer logs to metrics.jsonl, plus the loop's wall time. Run it from any
commit to compare loops (it only uses `train_and_evaluate` and metrics.jsonl).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medgen_jax import train_lib  # noqa: E402
from medgen_jax.config import base_config, cpu_sized_brain  # noqa: E402


def measure(args) -> dict:
  config = cpu_sized_brain(base_config(), num_steps=args.steps)
  config.method = args.method
  config.data.root = str(REPO / "data" / "brain-sites")
  config.data.held_out = ("D",)
  config.data.in_plane_shape = (args.size, args.size)
  config.batch_size = args.batch
  config.log_every = args.log_every
  config.eval_every = args.steps
  config.checkpoint.every = args.steps
  config.eval.distances = False
  config.progress_bar = False
  config.lock()
  with tempfile.TemporaryDirectory() as workdir:
    tic = time.perf_counter()
    train_lib.train_and_evaluate(config, workdir)
    wall = time.perf_counter() - tic
    records = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  # The first logged interval holds the compilation (older trainers logged it, this one leaves
  # the key out): dropped either way.
  rates = [r["slices_per_s"] for r in records if r["kind"] == "train" and "slices_per_s" in r][1:]
  return {"method": args.method, "batch": args.batch, "size": args.size, "steps": args.steps,
          "slices_per_s": statistics.median(rates), "slices_per_s_all": rates, "wall_s": wall}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=240)
  parser.add_argument("--log-every", type=int, default=40)
  parser.add_argument("--batch", type=int, default=12)
  parser.add_argument("--size", type=int, default=80)
  parser.add_argument("--method", default="deepall")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args()
  for _ in range(args.repeats):
    result = measure(args)
    if args.json:
      print(json.dumps(result), flush=True)
    else:
      print(f"{result['method']} batch {result['batch']} x {result['size']}²: "
            f"{result['slices_per_s']:.1f} slices/s (median of {len(result['slices_per_s_all'])} "
            f"log intervals), loop wall {result['wall_s']:.1f} s", flush=True)


if __name__ == "__main__":
  main()
