"""results.md tables on hand-made records: exact numbers (worked out by hand below), HD95 next to
ASD, and the empty-mask note counting each kind with its true consequence."""

from medgen_jax import report


def record(site, case, role, dice, asd, hd95, flag, method="M"):
  return {"method": method, "site": site, "case": case, "role": role, "dice": dice, "asd": asd,
          "hd95": hd95, "flag": flag}


# Two foreground classes (a, b). Site S is held out (unseen), site T is a source site.
RECORDS = [
    record("S", "s1", "unseen", [1.0, 0.5], [0.0, 2.0], [0.0, 4.0], ["both_empty", ""]),
    record("S", "s2", "unseen", [0.0, 0.8], [10.0, 1.0], [10.0, 3.0], ["pred_empty", ""]),
    record("T", "t1", "in-domain", [0.0, 0.9], [6.0, 1.0], [7.0, 1.0], ["ref_empty", ""]),
]


def test_class_table_has_dice_asd_and_hd95_per_class_and_average():
  table = report.class_table(RECORDS[:2], class_names=["a", "b"])
  lines = table.splitlines()
  assert lines[0] == ("| Method | Dice a | Dice b | Dice avg | ASD a (mm) | ASD b (mm) | ASD avg (mm) "
                      "| HD95 a (mm) | HD95 b (mm) | HD95 avg (mm) |")
  # Dice a = (100 + 0) / 2, Dice b = (50 + 80) / 2, avg = (50 + 65) / 2;
  # ASD a = (0 + 10) / 2, b = (2 + 1) / 2, avg = (5 + 1.5) / 2;
  # HD95 a = (0 + 10) / 2, b = (4 + 3) / 2, avg = (5 + 3.5) / 2.
  assert lines[2] == "| M | 50.00 | 65.00 | 57.50 | 5.00 | 1.50 | 3.25 | 5.00 | 3.50 | 4.25 |"
  assert lines[1].count("---|") == 10


def test_empty_mask_note_counts_each_kind_with_its_consequence():
  flags = [["both_empty", "both_empty"], ["both_empty", "pred_empty"], ["pred_empty", "ref_empty"],
           ["", ""]]
  records = [record("S", f"c{i}", "unseen", [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], f)
             for i, f in enumerate(flags)]
  note = report.empty_mask_note(records)
  assert note == ("Empty masks, counted per class-volume pair and kept in every mean: "
                  "3 with prediction and reference both empty (Dice 1, distances 0); "
                  "2 with empty prediction, non-empty reference (Dice 0, distances = image diagonal); "
                  "1 with empty reference, non-empty prediction (Dice 0, distances = image diagonal) "
                  "(see metrics.py).")
  assert note in report.class_table(records, class_names=["a", "b"])
  # Only the kinds present are listed; none at all -> no note.
  table = report.class_table(RECORDS[:2], class_names=["a", "b"])
  assert "1 with prediction and reference both empty (Dice 1, distances 0); " \
         "1 with empty prediction, non-empty reference (Dice 0, distances = image diagonal) " in table
  assert "with empty reference" not in table
  assert report.empty_mask_note([records[-1]]) == ""


def test_without_distances_no_distance_columns_and_note_without_distances():
  records = [{k: v for k, v in r.items() if k not in ("asd", "hd95")} for r in RECORDS[:2]]
  table = report.class_table(records, class_names=["a", "b"])
  lines = table.splitlines()
  assert lines[0] == "| Method | Dice a | Dice b | Dice avg |"
  assert lines[2] == "| M | 50.00 | 65.00 | 57.50 |"
  assert "(Dice 1);" in table and "(Dice 0) (see metrics.py)" in table and "distances" not in table
  markdown = report.markdown_report(records, sites=["S", "T"], class_names=["a", "b"], title="t", notes=[])
  assert "ASD" not in markdown and "HD95" not in markdown


def test_results_markdown_has_hd95_site_table_next_to_asd():
  markdown = report.markdown_report(RECORDS, sites=["S", "T"], class_names=["a", "b"], title="t", notes=[])
  sections = markdown.split("## ")
  titles = [s.splitlines()[0] for s in sections[1:]]
  assert titles == ["Dice (%) per site, mean ± std over volumes (mean over foreground classes)",
                    "ASD (mm) per site", "HD95 (mm) per site", "Per class, unseen site S"]
  hd95 = sections[3]
  # Per-volume HD95 = mean over classes: s1 (0+4)/2 = 2, s2 (10+3)/2 = 6.5, t1 (7+1)/2 = 4.
  # S: mean 4.25, population std 2.25. T: 4 ± 0. Overall over {2, 6.5, 4}: mean 12.5/3 = 4.1667,
  # std sqrt(((2-4.1667)^2 + (6.5-4.1667)^2 + (4-4.1667)^2) / 3) = sqrt(10.1667 / 3) = 1.8409.
  assert "| Method | S (unseen) | T (in-domain) | Overall |" in hd95
  assert "| M | 4.25 ± 2.25 | 4.00 ± 0.00 | 4.17 ± 1.84 |" in hd95
  asd = sections[2]
  # Per-volume ASD: s1 1, s2 5.5, t1 3.5 -> S 3.25 ± 2.25, T 3.50 ± 0.00, Overall 10/3 = 3.33,
  # std sqrt(((1-3.333)^2 + (5.5-3.333)^2 + (3.5-3.333)^2) / 3) = sqrt(10.1667 / 3) = 1.84.
  assert "| M | 3.25 ± 2.25 | 3.50 ± 0.00 | 3.33 ± 1.84 |" in asd
  per_class = sections[4]
  assert "| M | 50.00 | 65.00 | 57.50 | 5.00 | 1.50 | 3.25 | 5.00 | 3.50 | 4.25 |" in per_class
  # The held-out site's table counts only its own flags (t1's ref_empty is in-domain).
  assert "with empty reference" not in per_class and "1 with prediction and reference both empty" in per_class
