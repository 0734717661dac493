"""The README's test command is the one CI runs."""

import pathlib
import re

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
  readme = (ROOT / "README.md").read_text()
  commands = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
  test_commands = [c for c in commands if "pytest" in c]
  assert len(test_commands) == 1, commands
  ci = (ROOT / ".ci" / "run").read_text()
  assert test_commands[0].strip() in ci.splitlines()


def test_readme_api_examples_run():
  # The API example, then the two sharding ones and the expert-parallel one
  # (which reuse its names).
  readme = (ROOT / "README.md").read_text()
  api, explicit, shard_map, expert_parallel = re.findall(
      r"```python\n(.*?)\n```", readme, flags=re.S)
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
  exec(compile(expert_parallel, "README.md", "exec"), scope)  # pylint: disable=exec-used
  want, want_aux = jmoe_moe(scope)
  np.testing.assert_allclose(np.asarray(scope["y_ep"], np.float32),
                             np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)
  assert int(scope["aux_ep"].tokens_per_expert.sum()) == int(want_aux.tokens_per_expert.sum())


def jmoe_moe(scope):
  """`jmoe.moe` on the README's x and params (what the expert-parallel example equals)."""
  import jmoe  # pylint: disable=import-outside-toplevel

  return jmoe.moe(scope["x"], scope["params"], top_k=2)
