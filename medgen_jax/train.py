"""Command line: `python -m medgen_jax.train --config configs/<x>.py --workdir DIR`.

Overrides: `--config.key=value` (e.g. `--config.num_steps=200 --config.data.held_out='("D",)'`).
The config is locked: an unknown key fails with a message naming close matches. Rerunning the
same command resumes from the newest checkpoint in DIR.
"""

from __future__ import annotations

import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from medgen_jax import parallel

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (created; resumed if it exists)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  parallel.initialize_distributed()
  from medgen_jax import train_lib  # after distributed init: it touches devices
  from medgen_jax.data.errors import DataError

  try:
    result = train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (DataError, ValueError, train_lib.TrainingDivergedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if parallel.is_main_process():
    print(result["markdown"])
  return 0


def parse_flags_or_exit(argv) -> list[str]:
  """absl flags parser: a bad override is one clear line and exit code 2, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError, TypeError, ValueError, flags.Error) as e:
    detail = str(e.args[0] if e.args else e)
    close = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', detail)
    if close:
      detail = f'unknown config key "{close.group(2)}"; did you mean "{close.group(1)}"?'
    else:
      detail = " ".join(detail.replace("\\n", " ").split())
    bad = " ".join(a for a in argv[1:] if a.startswith("--config."))
    print(f"error: bad config override {bad}: {detail}", file=sys.stderr)
    sys.exit(2)


def run():
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags_or_exit)


if __name__ == "__main__":
  run()
