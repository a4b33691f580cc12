"""sweep --num-sources: the number-of-source-sites study (medgen_jax/num_sources.py): which runs,
their folders, the table's cells, the sample of combinations, methods that need more sites."""

import itertools
import json

import numpy as np
import pytest

from helpers import make_sites_dataset
from medgen_jax import sweep, train_lib

TINY = """
from medgen_jax.config import base_config
def get_config(arg=None):
  c = base_config()
  c.method = arg or "deepall"
  c.data.root = {root!r}
  c.data.in_plane_shape = (16, 16)
  c.model.base_features = 4
  c.model.depth = 2
  c.batch_size = 6
  c.num_steps = 2
  c.eval_every = 2
  c.checkpoint.every = 2
  c.eval.distances = False
  return c
"""


def fake_dice(sources, seed):
  """Held-out Dice (fraction) of a fake run: grows with k; site B adds 0.05; the seed 0.01."""
  return 0.2 + 0.1 * len(sources) + 0.05 * ("B" in sources) + 0.01 * seed


@pytest.fixture
def study(tmp_path, monkeypatch):
  root = make_sites_dataset(tmp_path / "toy", sites=("A", "B", "C", "D"), cases=3)
  config_file = tmp_path / "tiny.py"
  config_file.write_text(TINY.format(root=str(root)))
  seen = []

  def fake_train(config, workdir):
    held = config.data.held_out[0]
    sources = [s for s in config.data.sites if s != held]
    seen.append((config.method, tuple(config.data.sites), held, config.seed, workdir))
    d = fake_dice(sources, config.seed)
    records = [{"method": config.method, "site": held, "case": "c0", "role": "unseen", "dice": [d, d]},
               {"method": config.method, "site": sources[0], "case": "c0", "role": "in-domain", "dice": [0.0, 0.0]}]
    workdir.mkdir(parents=True)   # a finished run, as the trainer leaves it
    (workdir / "config.json").write_text(config.to_json())
    (workdir / "results.json").write_text(json.dumps({"selection": config.eval.selection, "records": records}))
    return {"records": records}

  monkeypatch.setattr(train_lib, "train_and_evaluate", fake_train)
  return config_file, seen


def test_every_combination_each_k_and_the_table(tmp_path, study):
  config_file, seen = study
  workdir = tmp_path / "s"
  assert sweep.main(["--config", str(config_file), "--held-out", "A,B", "--num-sources", "1,3", "--seeds", "2",
                     "--workdir", str(workdir)]) == 0
  # per held-out site: the 3 single sites + the 3 remaining together, 2 seeds each
  assert len(seen) == 2 * (3 + 1) * 2
  assert ("deepall", ("A", "C"), "A", 1, workdir / "tiny" / "A" / "k1_C" / "seed1") in seen
  assert ("deepall", ("A", "B", "C", "D"), "B", 0, workdir / "tiny" / "B" / "k3_A+C+D" / "seed0") in seen
  markdown = (workdir / "num_sources.md").read_text()
  # held out A, k = 1: sources {B}, {C}, {D} x seeds {0, 1}, in %
  values = [100 * fake_dice([s], seed) for s in "BCD" for seed in (0, 1)]
  cell_a1 = f"{np.mean(values):.2f} ± {np.std(values):.2f} (n=6)"
  values_b1 = [100 * fake_dice([s], seed) for s in "ACD" for seed in (0, 1)]   # no B among B's sources
  cell_a3 = f"{100 * fake_dice('BCD', 0) + 0.5:.2f} ± 0.50 (n=2)"
  assert f"| deepall | A | {cell_a1} | {cell_a3} |" in markdown
  average_k1 = (np.mean(values) + np.mean(values_b1)) / 2
  assert f"| deepall | Average | {average_k1:.2f} |" in markdown
  rows = (workdir / "num_sources.csv").read_text().splitlines()
  assert rows[0] == "config,method,held_out,k,sources,seed,unseen_dice"
  assert "tiny,deepall,A,3,B+C+D,1,56.0000" in rows and len(rows) == 1 + 16
  assert (workdir / "num_sources.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # finished runs are read back, not trained again, and give the same table
  seen.clear()
  assert sweep.main(["--config", str(config_file), "--held-out", "A,B", "--num-sources", "1,3", "--seeds", "2",
                     "--workdir", str(workdir)]) == 0
  assert seen == [] and (workdir / "num_sources.md").read_text() == markdown


def test_sampled_combinations_and_methods_that_need_more_sites(tmp_path, study, capsys):
  config_file, seen = study
  workdir = tmp_path / "s"
  argv = ["--config", str(config_file), "--config", f"{config_file}:mldg", "--held-out", "A", "--num-sources", "all",
          "--combinations", "2", "--combination-seed", "5", "--seeds", "1", "--workdir", str(workdir)]
  assert sweep.main(argv) == 0
  deepall = [s[1] for s in seen if s[0] == "deepall"]
  # k = 1 and k = 2 each have 3 combinations of B, C, D: 2 are sampled; k = 3 has one
  for k in (1, 2):
    picked = [sites for sites in deepall if len(sites) == k + 1]
    assert len(picked) == 2 and len(set(picked)) == 2
    assert all(tuple(s for s in sites if s != "A") in itertools.combinations("BCD", k) for sites in picked)
  assert len([s for s in deepall if len(s) == 4]) == 1
  # MLDG's episode has 2 + 1 domains: only k = 3 is run, and the table says why
  assert [s[1] for s in seen if s[0] == "mldg"] == [("A", "B", "C", "D")]
  markdown = (workdir / "num_sources.md").read_text()
  assert "tiny_mldg needs at least 3 source sites: k=1 not run" in markdown
  assert "| mldg | A | — | — | " in markdown
  # the same seed draws the same sample (every run already finished); another seed another one
  seen.clear()
  assert sweep.main(argv) == 0 and seen == []
  assert sweep.main(argv[:2] + argv[4:-2] + ["--workdir", str(tmp_path / "t")]) == 0
  assert sorted(s[1] for s in seen) == sorted(deepall)   # deepall alone, same seed: same sample
  seen.clear()
  samples = set()
  for seed in range(6):
    assert sweep.main(argv[:2] + argv[4:-4] + ["--combination-seed", str(seed), "--seeds", "1",
                                              "--workdir", str(tmp_path / f"u{seed}")]) == 0
    samples.add(tuple(sorted(s[1] for s in seen if len(s[1]) == 2)))
    seen.clear()
  assert len(samples) > 1


def test_bad_num_sources_arguments(tmp_path, study, capsys):
  config_file, _ = study
  base = ["--config", str(config_file), "--workdir", str(tmp_path / "s")]
  assert sweep.main(base + ["--num-sources", "4"]) == 1
  assert "--num-sources 4: give numbers of source sites between 1 and 3" in capsys.readouterr().err
  assert sweep.main(base + ["--num-sources", "1", "--combinations", "zero"]) == 1
  assert "--combinations zero: must be 'all' or a positive number" in capsys.readouterr().err
  assert sweep.main(base + ["--num-sources", "1", "--uda"]) == 2
  assert "choose one" in capsys.readouterr().err
  assert sweep.main(["--config", f"{config_file}:intra_site", "--workdir", str(tmp_path / "s"), "--num-sources", "1"]) == 1
  assert "intra_site trains on the held-out site itself" in capsys.readouterr().err
