"""The README's commands name scripts that exist and flags those scripts accept.

Every `python SCRIPT ...` line of the README's bash blocks (continuations joined) is checked
against the script's own `--help`, which also has to exit 0; the accelerator script's flags
against its argument parser. `--config.KEY=VALUE` overrides are config keys, not flags, and are
checked by the config tests.
"""
import functools
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / 'README.md'


def _commands() -> list[str]:
  """The README's bash-block lines, with backslash continuations joined."""
  blocks = re.findall(r'```bash\n(.*?)```', README.read_text(), re.S)
  return [line.strip() for block in blocks for line in block.replace('\\\n', ' ').splitlines()
          if line.strip()]


def _flags_by_script() -> dict[str, set[str]]:
  """{script: the flags the README passes it}, for every command that runs a script."""
  found = {}
  for command in _commands():
    for part in command.split('&&'):
      words = part.split('#')[0].split()
      if words[:1] == ['python'] and words[1:2] and words[1].endswith('.py'):
        script, args = words[1], words[2:]
      elif words[:1] and words[0].endswith('.sh'):
        script, args = words[0], words[1:]
      else:
        continue
      flags = {re.match(r'\[?(--[\w-]+)', arg).group(1) for arg in args
               if re.match(r'\[?--[\w-]+', arg)}
      found.setdefault(script, set()).update(f for f in flags if not f.startswith('--config.'))
  return found


@functools.cache
def _help(script: str) -> str:
  result = subprocess.run([sys.executable, script, '--help'], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_readme_is_short_and_runs_the_main_job_and_the_tests():
  assert README.stat().st_size <= 12 * 1024
  commands = _commands()
  assert commands[0].endswith('python projects/qna_detr/main.py '
                              '--config=configs/qna_detr_toy.py --workdir=workdirs/toy')
  ci = (ROOT / '.ci' / 'run').read_text().strip().splitlines()[-1]
  assert ci.endswith(commands[1]), (ci, commands[1])


def test_the_shell_script_flags_exist():
  scripts = {s: f for s, f in _flags_by_script().items() if s.endswith('.sh')}
  assert scripts
  for script, flags in scripts.items():
    parser = (ROOT / script).read_text()
    assert all(re.search(rf'^\s*{re.escape(flag)}[)=|]', parser, re.M) for flag in flags), flags


@pytest.mark.slow  # One subprocess per script.
@pytest.mark.parametrize('script', sorted(s for s in _flags_by_script() if s.endswith('.py')))
def test_every_flag_the_readme_passes_is_the_scripts(script):
  assert (ROOT / script).is_file(), script
  listed = set(re.findall(r'--(?:\[no\])?([\w-]+)', _help(script)))
  missing = {flag for flag in _flags_by_script()[script] if flag[2:] not in listed}
  assert not missing, f'{script} does not take {sorted(missing)}'
