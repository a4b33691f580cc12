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

from absl import app, flags, logging


def _one_line(detail: str) -> str:
  return " ".join(str(detail).replace("\\n", " ").split())


def _flag_error(argv, e) -> str:
  detail = str(e.args[0] if e.args else e)
  close = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', detail)
  if close:
    detail = f'unknown config key "{close.group(2)}"; did you mean "{close.group(1)}"?'
  else:
    detail = _one_line(detail)
  overrides = " ".join(a for a in argv[1:] if a.startswith("--config."))
  return f"bad config override {overrides}: {detail}" if overrides else detail


def run_cli_main(main, *, usage: str, required=(), expected=()) -> None:
  """`app.run(main)` with the conventions of the module docstring."""

  def parse(argv):
    given = {a.split("=", 1)[0].lstrip("-") for a in argv[1:] if a.startswith("--")}
    missing = [name for name in required if name not in given]
    if missing:
      print(f"error: {', '.join('--' + m for m in missing)} {'is' if len(missing) == 1 else 'are'} "
            f"required. Usage: {usage}", file=sys.stderr)
      sys.exit(2)
    try:
      return flags.FLAGS(argv)
    except (KeyError, AttributeError, TypeError, ValueError, OSError, flags.Error) as e:
      print(f"error: {_flag_error(argv, e)}", file=sys.stderr)
      sys.exit(2)

  def wrapped(argv):
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
    if len(argv) > 1:
      print(f"error: unexpected arguments {argv[1:]}. Usage: {usage}", file=sys.stderr)
      sys.exit(2)
    try:
      code = main(argv)
    except (ValueError, OSError, *expected) as e:
      lines = str(e).splitlines() or [type(e).__name__]
      print("error: " + "\n".join(lines), file=sys.stderr)
      code = 1
    sys.exit(code)

  app.run(wrapped, flags_parser=parse)
