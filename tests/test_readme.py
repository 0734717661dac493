"""The README's test command is the one CI runs."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
  readme = (ROOT / "README.md").read_text()
  commands = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
  test_commands = [c for c in commands if "pytest" in c]
  assert len(test_commands) == 1, commands
  ci = (ROOT / ".ci" / "run").read_text()
  assert test_commands[0].strip() in ci.splitlines()


def test_readme_api_examples_run():
  # The API example, then the two sharding ones (which reuse its names).
  readme = (ROOT / "README.md").read_text()
  api, explicit, shard_map = re.findall(r"```python\n(.*?)\n```", readme, flags=re.S)
  scope = {}
  exec(compile(api, "README.md", "exec"), scope)  # pylint: disable=exec-used
  assert scope["y"].shape == scope["x"].shape
  assert scope["out"].shape == (scope["t"], 2 * scope["f"])
  exec(compile(explicit, "README.md", "exec"), scope)  # pylint: disable=exec-used
  assert scope["grads"][0].shape == scope["x"].shape
  assert int(scope["aux"].tokens_per_expert.sum()) == 2 * scope["t"]
  exec(compile(shard_map, "README.md", "exec"), scope)  # pylint: disable=exec-used
  assert scope["dx"].shape == scope["x"].shape
  assert scope["dparams"].up_kernel.shape == scope["params"].up_kernel.shape
