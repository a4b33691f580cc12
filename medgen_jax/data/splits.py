"""Per-site train/val/test case lists, saved as JSON, with a leakage check.

File format (`splits.json`):

    {"version": 1, "seed": 0,
     "sites": {"A": {"train": ["case000", ...], "val": [...], "test": [...]}, ...}}

A case listed in two splits of its site is an error (train/test leakage, the problem users hit
with SIFA's released data). Leave-one-site-out protocols are built on top of a split file:
`leave_one_site_out` trains on the train lists of the other sites, selects models on their val
lists, and tests on *every* case of the held-out site (as SAML and FedDG do). With
`target_adaptation=True` (unsupervised domain adaptation) a held-out site's train+val cases are
instead unlabelled adaptation data ('adapt') and only its test list is tested.
"""

from __future__ import annotations

import json
from typing import Mapping, Sequence

import numpy as np

from medgen_jax.data.errors import DataError, Problem
from medgen_jax.paths import as_path, write_bytes_atomic

SPLIT_NAMES = ("train", "val", "test")

Splits = dict[str, dict[str, list[str]]]  # site -> split name -> case ids


def make_splits(case_ids_by_site: Mapping[str, Sequence[str]], *, val_fraction: float = 0.2,
                test_fraction: float = 0.2, seed: int = 0) -> Splits:
  """Random per-site split. Each site keeps >= 1 training case; val/test get round(n·fraction)
  cases, at least 1 each when the fraction is > 0 and the site has >= 3 cases."""
  splits: Splits = {}
  for site, ids in sorted(case_ids_by_site.items()):
    ids = sorted(ids)
    rng = np.random.default_rng([seed, *site.encode()])
    order = [ids[i] for i in rng.permutation(len(ids))]
    n = len(ids)
    n_val = int(round(n * val_fraction))
    n_test = int(round(n * test_fraction))
    if n >= 3:
      n_val = max(n_val, 1 if val_fraction > 0 else 0)
      n_test = max(n_test, 1 if test_fraction > 0 else 0)
    while n_val + n_test >= n and (n_val or n_test):
      if n_val >= n_test and n_val:
        n_val -= 1
      else:
        n_test -= 1
    splits[site] = {"test": sorted(order[:n_test]), "val": sorted(order[n_test:n_test + n_val]),
                    "train": sorted(order[n_test + n_val:])}
  return splits


def check_splits(splits: Splits, *, source: str = "splits") -> None:
  """Raises DataError if a case appears in two splits of one site, or a split name is unknown."""
  problems = []
  for site, by_split in splits.items():
    unknown = sorted(set(by_split) - set(SPLIT_NAMES))
    if unknown:
      problems.append(Problem(source, f"site {site!r} has unknown split(s) {unknown}",
                              f"use only {list(SPLIT_NAMES)}"))
    seen: dict[str, str] = {}
    for name in SPLIT_NAMES:
      for case in by_split.get(name, []):
        if case in seen:
          problems.append(Problem(source, f"case {site}/{case} is in both {seen[case]!r} and {name!r} "
                                  "(leakage)", "keep each case in exactly one split"))
        seen[case] = name
  if problems:
    raise DataError(problems)


def save_splits(path, splits: Splits, *, seed: int | None = None) -> None:
  check_splits(splits, source=str(path))
  payload = {"version": 1, "seed": seed, "sites": splits}
  write_bytes_atomic(path, (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode())


def load_splits(path) -> Splits:
  path = as_path(path)
  try:
    payload = json.loads(path.read_text())
    splits = {site: {name: list(ids) for name, ids in by_split.items()}
              for site, by_split in payload["sites"].items()}
  except FileNotFoundError:
    raise DataError.single(path, "split file does not exist", "create it with make_splits/save_splits "
                           "or leave data.split_file empty to generate one") from None
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise DataError.single(path, f"is not a valid split file ({type(e).__name__}: {e})",
                           'write {"version": 1, "sites": {"<site>": {"train": [...], "val": [...], "test": [...]}}}') from None
  check_splits(splits, source=str(path))
  return splits


def check_splits_match_cases(splits: Splits, case_ids_by_site: Mapping[str, Sequence[str]], *,
                             source: str) -> None:
  """Every case named in the split file must exist in the dataset (and its site too)."""
  problems = []
  for site, by_split in splits.items():
    if site not in case_ids_by_site:
      continue  # a split file may cover more sites than a run selects
    existing = set(case_ids_by_site[site])
    for name, ids in by_split.items():
      missing = sorted(set(ids) - existing)
      if missing:
        problems.append(Problem(source, f"{site} {name} lists case(s) {missing} that are not in the dataset",
                                "regenerate the split file or restore the cases"))
  for site in case_ids_by_site:
    if site not in splits:
      problems.append(Problem(source, f"site {site!r} is not in the split file",
                              "regenerate the split file (delete it) or drop the site"))
  if problems:
    raise DataError(problems)


def check_same_cases(started_with: Mapping[str, Sequence[str]], case_ids_by_site: Mapping[str, Sequence[str]],
                     *, source: str) -> None:
  """The data of a resumed (or re-evaluated) run must hold the cases it started with: a site or
  case added or removed since then is refused instead of silently changing the experiment."""
  problems = []
  fix = "restore the dataset as it was, or train again in a new --workdir"
  for site in sorted(set(started_with) | set(case_ids_by_site)):
    before, now = set(started_with.get(site, ())), set(case_ids_by_site.get(site, ()))
    if site not in case_ids_by_site:
      problems.append(Problem(source, f"site {site!r} of this run is gone from the data", fix))
    elif site not in started_with:
      problems.append(Problem(source, f"site {site!r} was added to the data since this run started", fix))
    else:
      if now - before:
        problems.append(Problem(source, f"site {site!r} now holds case(s) {sorted(now - before)} that were "
                                "not there when this run started", fix))
      if before - now:
        problems.append(Problem(source, f"site {site!r} lost case(s) {sorted(before - now)} since this run "
                                "started", fix))
  if problems:
    raise DataError(problems)


def leave_one_site_out(sites: Sequence[str]) -> list[dict]:
  """[{'held_out': s, 'sources': [others]}] for each site s, in order."""
  return [{"held_out": s, "sources": [t for t in sites if t != s]} for s in sites]


def protocol_cases(splits: Splits, *, sources: Sequence[str], held_out: Sequence[str] = (),
                   target_adaptation: bool = False) -> dict[str, dict[str, list[str]]]:
  """Case lists of one protocol: {'train': {site: ids}, 'val': {...}, 'test': {...}, 'adapt': {...}}.

  Sources contribute their train and val lists and their own test list (in-domain test).
  Held-out (target) sites never contribute to 'train' or 'val' (model selection on 'val' never
  sees a target case):
  * `target_adaptation=False` (domain generalization): all of a held-out site's cases are test
    cases; 'adapt' is empty.
  * `target_adaptation=True` (unsupervised domain adaptation): its train+val cases are 'adapt'
    (unlabelled adaptation data: their images may be trained on, their labels never) and its
    test list is 'test'. `make_splits` splits each site on its own (its generator is seeded by
    the seed and the site name only), so these are the very cases a run with the target as a
    source tests in-domain: UDA and supervised-target results are measured on the same cases.
  """
  overlap = set(sources) & set(held_out)
  if overlap:
    raise DataError.single(f"data.held_out={sorted(overlap)}", "a site cannot be both source and held out",
                           "remove it from data.sites or from data.held_out")
  out: dict[str, dict[str, list[str]]] = {"train": {}, "val": {}, "test": {}, "adapt": {}}
  for site in sources:
    for name in SPLIT_NAMES:
      out[name][site] = list(splits[site].get(name, []))
  for site in held_out:
    if target_adaptation:
      out["adapt"][site] = sorted(list(splits[site].get("train", [])) + list(splits[site].get("val", [])))
      out["test"][site] = list(splits[site].get("test", []))
    else:
      out["test"][site] = sorted(sum((list(splits[site].get(n, [])) for n in SPLIT_NAMES), []))
  return out
