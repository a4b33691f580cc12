"""One exception type for bad input data, and the problem record the checker prints.

Every message names the file (or config key) at fault and the fix, so that a researcher with a
folder of 200 volumes from six hospitals can act on it without reading our code.
"""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Problem:
  """One thing wrong with one file (or folder, or config key)."""

  path: str
  message: str
  fix: str

  def __str__(self) -> str:
    message = " ".join(self.message.split())  # library messages may span lines: one per problem
    return f"{self.path}: {message}. Fix: {self.fix}"


class DataError(ValueError):
  """Bad input data. `problems` lists every problem found; the message has one line each."""

  def __init__(self, problems: list[Problem] | Problem):
    if isinstance(problems, Problem):
      problems = [problems]
    self.problems = list(problems)
    super().__init__("\n".join(str(p) for p in self.problems))

  @classmethod
  def single(cls, path: str | os.PathLike, message: str, fix: str) -> "DataError":
    return cls(Problem(str(path), message, fix))


class DataWarning(UserWarning):
  """Data was usable but something was dropped or assumed (e.g. a skipped bad case)."""
