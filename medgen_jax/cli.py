"""What every absl command line of medgen_jax shares: expected failures are one line, never a
traceback.

* a bad flag or config override: `error: ...` on stderr, exit code 2, before anything runs;
* a required flag left out: `error: --workdir is required. Usage: ...`, exit code 2;
* an expected failure while running (bad data, a refused workdir, a diverged run, a full disk:
  ValueError — DataError included —, OSError and the command's own `expected` types):
  `error: <message>`, exit code 1. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from absl import app, flags, logging


def one_line(detail) -> str:
  """A message on one line (whitespace, literal and real line breaks squashed)."""
  return " ".join(str(detail).replace("\\n", " ").split())


def _flag_error(argv, e) -> str:
  detail = str(e.args[0] if e.args else e)
  close = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', detail)
  if close:
    detail = f'unknown config key "{close.group(2)}"; did you mean "{close.group(1)}"?'
  else:
    # config_flags may embed a whole traceback in its message: its last line says what failed.
    lines = [line for line in str(detail).replace("\\n", "\n").splitlines() if line.strip()]
    detail = one_line(lines[-1] if "Traceback" in detail and lines else detail)
  overrides = " ".join(a for a in argv[1:] if a.startswith("--config."))
  return f"bad config override {overrides}: {detail}" if overrides else detail


def _flag_values(argv, name: str) -> list[str]:
  """The values given for --name (as --name=V or --name V)."""
  values = []
  for i, arg in enumerate(argv[1:], start=1):
    if arg == f"--{name}" and i + 1 < len(argv):
      values.append(argv[i + 1])
    elif arg.startswith(f"--{name}="):
      values.append(arg.split("=", 1)[1])
  return values


def run_cli_main(main, *, usage: str, required=(), expected=(), config_files=()) -> None:
  """`app.run(main)` with the conventions of the module docstring. `config_files`: flags whose
  value is a config file (`path.py[:arg]`), checked to exist before absl loads it."""

  def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)

  def parse(argv):
    missing = [name for name in required if not any(v.strip() for v in _flag_values(argv, name))]
    if missing:
      fail(f"{', '.join('--' + m for m in missing)} {'is' if len(missing) == 1 else 'are'} "
           f"required. Usage: {usage}")
    for name in config_files:
      for value in _flag_values(argv, name):
        path = Path(value.split(":", 1)[0])
        if not path.is_file():
          fail(f"--{name} {value}: {path} does not exist. Fix: give a config file, e.g. configs/quickstart.py")
    try:
      return flags.FLAGS(argv)
    except (KeyError, AttributeError, TypeError, ValueError, OSError, flags.Error) as e:
      fail(_flag_error(argv, e))

  def wrapped(argv):
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
    if len(argv) > 1:
      fail(f"unexpected arguments {argv[1:]}. Usage: {usage}")
    try:
      code = main(argv)
    except (ValueError, OSError, *expected) as e:
      lines = str(e).splitlines() or [type(e).__name__]
      print("error: " + "\n".join(lines), file=sys.stderr)
      code = 1
    sys.exit(code)

  app.run(wrapped, flags_parser=parse)
