"""launch/*.sh: every script is valid bash (`bash -n`), passes shellcheck where it is installed,
and every --flag it gives `python -m medgen_jax.train` or `python -m medgen_jax.sweep` is a flag of
that command line (the train CLI's absl flags, `--config.KEY` overrides naming keys of
config.base_config(), the sweep's argparse parser), also inside quoted remote commands
(`gcloud ... ssh --command "..."`, `srun bash -c '...'`)."""

import shlex
import shutil
import subprocess
from pathlib import Path

import ml_collections
import pytest

LAUNCH = Path(__file__).resolve().parent.parent / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
MODULES = ("medgen_jax.train", "medgen_jax.sweep")
SEPARATORS = {";", ";;", "&", "&&", "|", "||", "|&"}


def cli_commands(text: str) -> list[tuple[str, list[str]]]:
  """[(module, the words after `-m module` up to the end of that shell command)] for every
  `python -m medgen_jax.{train,sweep}` in the shell text, recursing into quoted strings that hold
  such a command. Comments are ignored; a line break or `; && || | &` ends a command."""
  text = text.replace("\\\n", " ").replace("\n", "\n; ")   # continuations; line ends end commands
  lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  tokens = list(lexer)
  found = []
  for i, token in enumerate(tokens):
    if token == "-m" and i + 1 < len(tokens) and tokens[i + 1] in MODULES:
      words = []
      for word in tokens[i + 2:]:
        if word in SEPARATORS:
          break
        words.append(word)
      found.append((tokens[i + 1], words))
    elif token not in MODULES and any(m in token for m in MODULES):
      found += cli_commands(token)   # a quoted command: ssh --command "...", bash -c '...'
  return found


def _config_key_exists(key: str) -> bool:
  from medgen_jax.config import base_config

  node = base_config()
  for name in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      return False
    node = node[name]
  return True


def unknown_flags(module: str, words: list[str]) -> list[str]:
  """The --flags among `words` that `python -m module` does not define."""
  flags_given = [w for w in words if w.startswith("--") and len(w) > 2]
  names = [w[2:].split("=", 1)[0] for w in flags_given]
  bad = []
  if module == "medgen_jax.train":
    import importlib

    from absl import flags

    importlib.import_module("medgen_jax.train")   # defines the train CLI's flags
    defined = flags.FLAGS
    for word, name in zip(flags_given, names):
      if name.startswith("config."):
        ok = _config_key_exists(name[len("config."):])
      else:
        ok = name in defined or (name.startswith("no") and name[2:] in defined
                                 and defined[name[2:]].boolean)
      if not ok:
        bad.append(word)
  else:
    from medgen_jax import sweep

    options = sweep.build_parser()._option_string_actions
    bad = [word for word, name in zip(flags_given, names) if f"--{name}" not in options]
  return bad


def test_there_are_launch_scripts():
  names = {p.name for p in SCRIPTS}
  assert {"tpu_pod.sh", "slurm_gpu.sh", "local_gpu.sh"} <= names, names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_bash(script):
  result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_shellcheck(script):
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
  result = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_flags_are_flags_of_the_cli(script):
  commands = cli_commands(script.read_text())
  assert commands, f"{script.name} runs neither python -m medgen_jax.train nor medgen_jax.sweep"
  for module, words in commands:
    assert unknown_flags(module, words) == [], f"{script.name}: {module} {' '.join(words)}"


def test_the_flag_check_finds_misspelled_flags_where_scripts_put_them():
  text = r'''#!/usr/bin/env bash
# a comment: python -m medgen_jax.train --in-a-comment
python -m medgen_jax.train --config c.py --workdri w --config.num_steps=3 --alsologtostderr
gcloud compute tpus tpu-vm ssh x --worker=all \
  --command "cd m && MEDGEN_JAX_DISTRIBUTED=1 python3 -m medgen_jax.train --config $c --workdir $w --config.num_stepz=3" --zone=z
srun bash -c 'exec python -m medgen_jax.train --config "$1" --workdir "$2" --procss_id "$SLURM_PROCID" "${@:3}"' _ a b
python -m medgen_jax.sweep --config c --held_out A --workdir w --shard "$i/$n" && echo --zone
python -m medgen_jax.train --config c --workdir w --num_processes 2 --process_id 0 --coordinator_address h:1 &
'''
  commands = cli_commands(text)
  assert [m for m, _ in commands] == ["medgen_jax.train"] * 3 + ["medgen_jax.sweep", "medgen_jax.train"]
  assert [unknown_flags(m, words) for m, words in commands] == [
      ["--workdri"], ["--config.num_stepz=3"], ["--procss_id"], ["--held_out"], []]
