"""Result tables laid out like the talk's: rows are methods, columns are sites and overall.

Input: per-volume records `{'method', 'site', 'case', 'role', 'dice': [per class], 'asd': [...],
'hd95': [...], 'flag': [...]}` (classes 1..C-1, from metrics.score_volume). A volume's score is
the mean over its foreground classes; tables give mean ± std over volumes, in % for Dice and mm
for distances. `role` is 'in-domain' (a source site's own test cases) or 'unseen' (a held-out
site). Distance tables (ASD and HD95, per site and per class) appear when the records have them.
Empty-mask cases are counted per kind under each per-class table, never dropped: both empty =
Dice 1 and distances 0; an empty prediction or an empty reference = Dice 0 and distances = the
image diagonal (metrics.py).
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict

import numpy as np

METRICS = ("dice", "asd", "hd95")


def mean_dice(records) -> float:
  """Mean over volumes of the mean foreground-class Dice (the selection metric)."""
  return float(np.mean([np.mean(r["dice"]) for r in records])) if records else float("nan")


def _fmt(values, scale=1.0, digits=2) -> str:
  if not len(values):
    return "—"
  values = np.asarray(values, np.float64) * scale
  return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def group(records, *keys):
  out = defaultdict(list)
  for r in records:
    out[tuple(r[k] for k in keys)].append(r)
  return out


def site_table(records, *, sites, metric: str = "dice") -> str:
  """Rows: methods; columns: each site and Overall.

  A site's header says 'unseen' or 'in-domain' when that holds for every method; otherwise (the
  Separate cross-site matrix) cells where the site was the model's own are marked †.
  """
  methods = list(dict.fromkeys(r["method"] for r in records))
  roles = group(records, "site")
  scale = 100.0 if metric == "dice" else 1.0

  def header(site):
    site_roles = {r["role"] for r in roles.get((site,), [])}
    return f"{site} ({site_roles.pop()})" if len(site_roles) == 1 else site

  mixed = any(len({r["role"] for r in roles.get((s,), [])}) > 1 for s in sites)
  cols = ["Method"] + [header(s) for s in sites] + ["Overall"]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  by_key = group(records, "method", "site")
  for method in methods:
    cells = [method]
    pooled = []
    for site in sites:
      rs = by_key.get((method, site), [])
      per_case = [np.mean(r[metric]) for r in rs]
      pooled += per_case
      own = mixed and rs and rs[0]["role"] == "in-domain"
      cells.append(_fmt(per_case, scale) + (" †" if own else ""))
    cells.append(_fmt(pooled, scale))
    lines.append("| " + " | ".join(cells) + " |")
  if mixed:
    lines.append("\n† the model's own site (in-domain test volumes); other cells are unseen sites.")
  return "\n".join(lines)


# The empty-mask kinds of metrics.empty_flag and what metrics.score_volume scores for each.
EMPTY_KINDS = {
    "both_empty": ("prediction and reference both empty", "Dice 1", "distances 0"),
    "pred_empty": ("empty prediction, non-empty reference", "Dice 0", "distances = image diagonal"),
    "ref_empty": ("empty reference, non-empty prediction", "Dice 0", "distances = image diagonal"),
}


def _has_distances(records) -> bool:
  return bool(records) and all("asd" in r and "hd95" in r for r in records)


def empty_mask_note(records) -> str:
  """One sentence counting the class-volume pairs of each empty-mask kind ('' when none)."""
  counts = {kind: 0 for kind in EMPTY_KINDS}
  for r in records:
    for flag in r["flag"]:
      if flag:
        counts[flag] = counts.get(flag, 0) + 1
  distances = _has_distances(records)
  parts = []
  for kind, (what, dice, distance) in EMPTY_KINDS.items():
    if counts[kind]:
      consequence = f"{dice}, {distance}" if distances else dice
      parts.append(f"{counts[kind]} with {what} ({consequence})")
  parts += [f"{n} flagged {kind!r} (unknown kind)" for kind, n in counts.items() if kind not in EMPTY_KINDS]
  if not parts:
    return ""
  return ("Empty masks, counted per class-volume pair and kept in every mean: " + "; ".join(parts)
          + " (see metrics.py).")


def class_table(chosen, *, class_names) -> str:
  """Rows: methods; columns: Dice per class + average, then ASD and HD95 per class + average
  (SIFA layout), the distance columns only when the records have distances."""
  methods = list(dict.fromkeys(r["method"] for r in chosen))
  distances = _has_distances(chosen)
  header = ["Method"] + [f"Dice {c}" for c in class_names] + ["Dice avg"]
  if distances:
    for name in ("ASD", "HD95"):
      header += [f"{name} {c} (mm)" for c in class_names] + [f"{name} avg (mm)"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for method in methods:
    rs = [r for r in chosen if r["method"] == method]
    cells = [method]
    for metric, scale in (("dice", 100.0),) + ((("asd", 1.0), ("hd95", 1.0)) if distances else ()):
      values = np.array([r[metric] for r in rs], np.float64) * scale
      cells += [f"{values[:, k].mean():.2f}" for k in range(values.shape[1])] + [f"{values.mean():.2f}"]
    lines.append("| " + " | ".join(cells) + " |")
  note = empty_mask_note(chosen)
  if note:
    lines.append("\n" + note)
  return "\n".join(lines)


def markdown_report(records, *, sites, class_names, title: str, notes: list[str]) -> str:
  held_out = [s for s in sites
              if all(r["role"] == "unseen" for r in records if r["site"] == s)
              and any(r["site"] == s for r in records)]
  parts = [f"# {title}", "", *[f"- {n}" for n in notes], "",
           "## Dice (%) per site, mean ± std over volumes (mean over foreground classes)", "",
           site_table(records, sites=sites, metric="dice"), ""]
  if _has_distances(records):
    parts += ["## ASD (mm) per site", "", site_table(records, sites=sites, metric="asd"), "",
              "## HD95 (mm) per site", "",
              site_table(records, sites=sites, metric="hd95"), ""]
  for site in held_out:
    parts += [f"## Per class, unseen site {site}", "",
              class_table([r for r in records if r["site"] == site], class_names=class_names), ""]
  if not held_out:
    unseen = [r for r in records if r["role"] == "unseen"]
    if unseen:
      parts += ["## Per class, each model on the sites it was not trained on", "",
                class_table(unseen, class_names=class_names), ""]
  return "\n".join(parts)


def records_csv(records) -> str:
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow(["method", "site", "role", "case", "class_index", "dice", "asd_mm", "hd95_mm", "flag"])
  for r in records:
    for k, dice in enumerate(r["dice"]):
      writer.writerow([r["method"], r["site"], r["role"], r["case"], k + 1, f"{dice:.6f}",
                       f"{r['asd'][k]:.6f}" if "asd" in r else "", f"{r['hd95'][k]:.6f}" if "hd95" in r else "",
                       r["flag"][k]])
  return buffer.getvalue()
