"""Tests of the benchmark suite (`benchmarks/`): cases, baselines, timing, report, run.

CPU only and small: the end-to-end test runs `python -m benchmarks.run` on the
tiny case with one sample and checks that every output file exists and holds
finite numbers.
"""

from __future__ import annotations

import importlib.util
import json
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import reference

from benchmarks import cases, implementations, report, run, timing
from benchmarks import stage_profile as profile

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="the interpret backend needs triton")


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_named_cases_match_the_brief():
  small, mixtral, deepseek = (cases.CASES[n] for n in ("small", "mixtral", "deepseek"))
  assert (small.tokens, small.d_model, small.d_ff, small.experts, small.top_k) == (
      4096, 768, 3072, 8, 2)
  assert (mixtral.tokens, mixtral.d_model, mixtral.d_ff, mixtral.experts,
          mixtral.top_k) == (8192, 4096, 14336, 8, 2)
  assert (deepseek.tokens, deepseek.d_model, deepseek.d_ff, deepseek.experts,
          deepseek.top_k) == (8192, 2048, 1408, 64, 6)
  assert small.flops("fwd") == 2 * 4096 * 2 * 3 * 768 * 3072
  assert small.flops("fwdbwd") == 3 * small.flops("fwd")
  assert deepseek.capacity() == math.ceil(1.25 * 8192 * 6 / 64)
  assert [cases.CASES[n].experts for n in cases.GROUPS["sweep-e"]] == [
      8, 16, 32, 64, 128, 256]
  assert [cases.CASES[n].top_k for n in cases.GROUPS["sweep-k"]] == [1, 2, 4, 8]
  assert [cases.CASES[n].tokens for n in cases.GROUPS["sweep-tokens"]] == [
      1024 * 2 ** i for i in range(6)]
  for name in cases.GROUPS["skewed"]:
    assert cases.CASES[name].routing == "skewed"


def test_select_groups_and_unknown_names():
  names = [c.name for c in cases.select(["main", "small", "sweep-k"])]
  assert names == ["small", "mixtral", "deepseek", "sweep-k1", "sweep-k2", "sweep-k4",
                   "sweep-k8"]
  with pytest.raises(ValueError, match="unknown case 'nope'"):
    cases.select(["nope"])
  with pytest.raises(ValueError, match="top_k"):
    cases.Case("bad", 8, 8, 8, 2, 3)
  with pytest.raises(ValueError, match="mode"):
    cases.CASES["small"].flops("bwd")


def test_inputs_are_random_and_skew_routes_unevenly():
  loads = {}
  for routing in cases.ROUTINGS:
    case = cases.Case("t", 1024, 64, 32, 8, 2, routing=routing)
    x, params = cases.make_inputs(case)
    assert x.shape == (1024, 64) and x.dtype == jnp.bfloat16
    assert params.up_kernel.shape == (8, 64, 64)  # gated: 2f columns
    assert params.down_kernel.shape == (8, 32, 64)
    for a in (x, *params):
      assert float(jnp.std(a.astype(jnp.float32))) > 0
    r = jax.jit(lambda x, w: reference.route(x, w, top_k=2))(x, params.router_kernel)
    loads[routing] = cases.expert_load(r.tokens_per_expert)["max_over_mean"]
  assert loads["learned"] < 1.5 < 2.0 < loads["skewed"], loads
  x_other_seed, _ = cases.make_inputs(case, seed=1)
  assert not bool(jnp.array_equal(x, x_other_seed))


def test_baselines_match_the_reference():
  case = cases.Case("t", 96, 40, 24, 8, 2, routing="skewed")
  x, params = cases.make_inputs(case)

  # The tokamax form with jax.lax.ragged_dot is the dropless reference.
  y, aux = jax.jit(lambda x, p: implementations.sorted_moe(
      x, p, top_k=2, activation="swiglu", ragged_dot=jax.lax.ragged_dot))(x, params)
  y_ref, aux_ref = jax.jit(lambda x, p: reference.moe(
      x, p, top_k=2, activation="swiglu"))(x, params)
  np.testing.assert_array_equal(np.asarray(aux.tokens_per_expert),
                                np.asarray(aux_ref.tokens_per_expert))
  assert _rel(y, y_ref) < 1e-2  # bf16 output; the GEMM precision may differ

  # The bf16 one-hot form is the one-hot reference up to bf16 rounding.
  y, aux = jax.jit(lambda x, p: implementations.einsum_bf16_moe(
      x, p, top_k=2, activation="swiglu", capacity_factor=1.25))(x, params)
  y_ref, aux_ref = jax.jit(lambda x, p: reference.moe(
      x, p, top_k=2, activation="swiglu", capacity_factor=1.25,
      dispatch="one_hot"))(x, params)
  assert int(aux.dropped_count) == int(aux_ref.dropped_count) > 0
  assert _rel(y, y_ref) < 2e-2


def test_fwdbwd_step_differentiates_x_and_every_parameter():
  case = cases.Case("t", 32, 16, 8, 4, 2)
  x, params = cases.make_inputs(case)
  dy = implementations.make_cotangent(case)
  step, names = implementations.make_step(
      implementations.IMPLS["ref-sorted"].make(case), "fwdbwd")
  assert names == ("x", "params", "dy")
  loss, (dx, dparams) = step(x, params, dy)
  assert np.isfinite(float(loss))
  for g, a in zip((dx, *dparams), (x, *params)):
    assert g.shape == a.shape
    assert float(jnp.abs(g.astype(jnp.float32)).max()) > 0
  with pytest.raises(ValueError, match="mode"):
    implementations.make_step(lambda x, p: None, "bwd")


def test_time_fn_counts_calls_and_checks_first_output():
  calls = []
  seen = []

  def fn(a):
    calls.append(1)
    return a + 1

  t = timing.time_fn(fn, jnp.ones(3), repeats=3, warmup=2, min_sample_s=0.0,
                     on_first=seen.append)
  assert len(calls) == 1 + 2 + 3 * t.calls_per_sample
  assert t.calls_per_sample == 1 and len(t.samples_s) == 3
  assert 0 < t.min_s <= t.median_s <= t.max_s
  assert float(seen[0][0]) == 2.0
  with pytest.raises(ValueError, match="repeats"):
    timing.time_fn(fn, jnp.ones(3), repeats=0)
  if importlib.util.find_spec("pynvml") is None:
    assert timing.measure_energy(fn, jnp.ones(3), call_s=1e-3) is None


class _FakeNvml:
  """The few pynvml calls `timing.PowerSampler` makes, at a constant 250 W."""

  NVML_FI_DEV_POWER_INSTANT = 186

  class NVMLError(Exception):
    pass

  class _Field:
    nvmlReturn = 0

    class value:  # noqa: N801  (mirrors the ctypes union)
      uiVal = 250_000

  def __init__(self):
    self.energy_mj = 0

  def nvmlDeviceGetHandleByIndex(self, index):  # noqa: N802
    return index

  def nvmlDeviceGetFieldValues(self, handle, fields):  # noqa: N802
    assert fields == [186]
    return [self._Field()]

  def nvmlDeviceGetTotalEnergyConsumption(self, handle):  # noqa: N802
    self.energy_mj += 1000
    return self.energy_mj

  def nvmlDeviceGetClockInfo(self, handle, clock):  # noqa: N802
    assert clock == 1  # NVML_CLOCK_SM
    self.clock_reads = getattr(self, "clock_reads", 0) + 1
    return 1400 if self.clock_reads % 2 else 1600

  def nvmlDeviceGetCurrentClocksEventReasons(self, handle):  # noqa: N802
    return 0x4 if self.clock_reads % 2 else 0x0  # power cap on odd samples


def test_measure_energy_integrates_sampled_power(monkeypatch):
  monkeypatch.setattr(timing, "_nvml", _FakeNvml)
  fn = jax.jit(lambda a: a * 2)
  out = timing.measure_energy(fn, jnp.ones(8), call_s=1e-3, duration_s=0.05)
  assert out["source"] == "instant power" and out["power_samples"] >= 1
  assert out["mean_power_w"] == pytest.approx(250.0)
  assert out["energy_j_per_call"] == pytest.approx(250.0 * out["loop_s"] / out["calls"])
  assert out["calls"] == 50 and out["counter_j_per_call"] == pytest.approx(1 / 50)
  clocks, n = out["clocks"], out["power_samples"]
  assert clocks["min_sm_mhz"] == 1400 and clocks["max_sm_mhz"] == (1600 if n > 1 else 1400)
  assert clocks["power_cap_share"] == pytest.approx(((n + 1) // 2) / n)
  assert clocks["thermal_share"] == 0


def test_power_probe_measures_each_program(monkeypatch):
  """`benchmarks.power_probe` times the dense matmul and each value x mode
  (tiny case, interpreter); without NVML the power columns are NaN."""
  from benchmarks import power_probe  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(timing, "_nvml", lambda: None)
  result = power_probe.main(["--case", "tiny", "--var", "JMOE_ROUTER_SCALE",
                             "--values", "up;down", "--rounds", "1", "--seconds", "0.01",
                             "--idle-s", "0", "--cool-s", "0.01", "--dense-n", "64",
                             "--backend", "interpret"])
  assert list(result) == ["dense 64^3"] + [
      f"JMOE_ROUTER_SCALE={v} {m}" for v in ("up", "down") for m in ("fwd", "fwd+bwd")]
  for row in result.values():
    assert row["ms"] > 0 and row["TFLOP/s"] > 0 and np.isnan(row["W"])
  with pytest.raises(ValueError, match="--modes"):
    power_probe.main(["--case", "tiny", "--modes", "bwd", "--dense-n", "0"])


def test_dense_bound_gemms_do_the_ffn_flops():
  """The six dense GEMMs of `benchmarks.dense_bound` do the FFN's flops:
  6 t k d f forward and twice that backward, also with uneven experts."""
  from benchmarks import dense_bound  # pylint: disable=import-outside-toplevel

  t, d, f, e, top_k = 8192, 2048, 1408, 64, 6
  gemms = dense_bound.ffn_gemms(t, d, f, e, top_k)
  assert [g.name for g in gemms] == ["up", "down", "dh", "dx", "dW_up", "dW_down"]
  fwd = sum(g.flops for g in gemms if g.phase == "fwd")
  bwd = sum(g.flops for g in gemms if g.phase == "bwd")
  assert fwd == 6.0 * t * top_k * d * f and bwd == 2 * fwd
  ms = {g.name: float(i + 1) for i, g in enumerate(gemms)}
  assert dense_bound.phase_sums(ms, gemms) == {"fwd": 3.0, "fwd+bwd": 21.0}
  # Weight-gradient operands are row-major [e, rows / e, .] and the product
  # matches a float32 einsum of the same operands.
  fn, (a, b) = dense_bound.dense_program(dense_bound.DenseGemm("bwd", "dW_up", 3, 16, 8, 24))
  assert a.shape == (3, 8, 16) and b.shape == (3, 8, 24)
  want = jnp.einsum("ekm,ekn->emn", a.astype(jnp.float32), b.astype(jnp.float32))
  got = fn(a, b).astype(jnp.float32)
  assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-2


def test_power_probe_dense_bound_sums_the_gemms(monkeypatch):
  """`power_probe --dense-bound` times the case's six GEMMs and reports, per
  mode, their summed ms beside the FFN's (tiny case, interpreter)."""
  from benchmarks import power_probe  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(timing, "_nvml", lambda: None)
  result = power_probe.main(["--case", "tiny", "--dense-bound", "--rounds", "1",
                             "--seconds", "0.01", "--idle-s", "0", "--cool-s", "0.01",
                             "--dense-n", "0", "--backend", "interpret"])
  names = ["up", "down", "dh", "dx", "dW_up", "dW_down"]
  assert list(result) == [f"dense-bound {n}" for n in names] + [
      "default fwd", "default fwd+bwd", "bound"]
  ms = {n: result[f"dense-bound {n}"]["ms"] for n in names}
  bound = result["bound"]
  assert bound["fwd"]["dense GEMMs ms"] == pytest.approx(ms["up"] + ms["down"])
  assert bound["fwd+bwd"]["dense GEMMs ms"] == pytest.approx(sum(ms.values()))
  assert bound["fwd"]["default"] == result["default fwd"]["ms"]
  assert bound["fwd+bwd"]["default"] == result["default fwd+bwd"]["ms"]
  assert bound["fwd"]["target ms"] is None


def test_compile_all_returns_programs_and_errors_in_order():
  good = jax.jit(lambda a: a * 2)
  bad = jax.jit(lambda a: a @ a)  # rank-1 @ rank-1 is fine; a 3-vector with [2] fails
  results = timing.compile_all([(good, (jnp.ones(3),)), (bad, (jnp.ones((3, 2)),)),
                                (good, (jnp.ones(4),))], workers=2)
  assert [type(c).__name__ for c, _ in results][1] == "TypeError"
  assert float(results[2][0](jnp.ones(4))[0]) == 2.0
  assert all(seconds >= 0 for _, seconds in results)


def test_targets_report_ratio_and_missed():
  results = {
      "cases": [{"name": "small", "target_ms": {"fwd": 0.3, "fwdbwd": 1.0}},
                {"name": "deepseek", "target_ms": {}}],
      "results": [
          {"case": "small", "impl": "jmoe", "mode": "fwd", "status": "ok",
           "median_ms": 0.6},
          {"case": "small", "impl": "jmoe", "mode": "fwdbwd", "status": "ok",
           "median_ms": 0.5},
          {"case": "small", "impl": "ref-sorted", "mode": "fwd", "status": "ok",
           "median_ms": 3.0},
          {"case": "deepseek", "impl": "jmoe", "mode": "fwdbwd", "status": "ok",
           "median_ms": 1.0, "memory_compiled": {"peak": 3 * 2 ** 30}},
          {"case": "deepseek", "impl": "ref-einsum", "mode": "fwdbwd", "status": "ok",
           "median_ms": 9.0, "memory_compiled": {"peak": 8 * 2 ** 30}},
      ],
      "memory_process": [],
  }
  rows = {r["what"]: r for r in report.targets(results)}
  assert rows["small fwd time"]["ratio"] == pytest.approx(2.0)
  assert rows["small fwd time"]["met"] is False
  assert rows["small fwdbwd time"]["met"] is True
  mem = next(r for w, r in rows.items() if "peak memory" in w)
  assert mem["target"] == pytest.approx(4.0) and mem["measured"] == pytest.approx(3.0)
  assert mem["met"] is True and "x ref-einsum" in mem["what"]
  results["results"][-1]["impl"] = "ref-einsum-bf16"  # the fallback baseline
  mem = next(r for r in report.targets(results) if "peak memory" in r["what"])
  assert mem["ratio"] == pytest.approx(0.75) and "ref-einsum-bf16" in mem["what"]
  report.add_speedups(results)
  assert results["results"][2]["jmoe_speedup"] == pytest.approx(5.0)


def test_dense_bound_rows_set_target_and_jmoe_beside_the_bound():
  results = {
      "cases": [{"name": "deepseek", "target_ms": {"fwd": 1.6, "fwdbwd": 5.0},
                 "dense_bound": {"gemms": {}, "fwd": 1.2, "fwdbwd": 3.8}},
                {"name": "sweep-e8", "target_ms": {}}],
      "results": [_row("deepseek", "jmoe", "fwd", 1.7),
                  {**_row("deepseek", "jmoe", "fwdbwd", 9.0), "status": "error"}],
  }
  rows = report.dense_bound_rows(results)
  assert rows == [
      {"case": "deepseek", "mode": "fwd", "dense_ms": 1.2, "target_ms": 1.6,
       "jmoe_ms": 1.7},
      {"case": "deepseek", "mode": "fwdbwd", "dense_ms": 3.8, "target_ms": 5.0,
       "jmoe_ms": None}]
  text = "\n".join(report._dense_bound_section(results))  # pylint: disable=protected-access
  assert "| deepseek | fwd | 1.2 | 1.6 | 1.33 | 1.7 | 1.42 |" in text
  assert "| deepseek | fwdbwd | 3.8 | 5 | 1.32 | - | - |" in text


def _row(case, impl, mode, ms):
  return {"case": case, "impl": impl, "mode": mode, "status": "ok", "median_ms": ms}


def test_grouping_cost_sizes_padding_and_ratios():
  """The group sizes of each variant keep the rows; padded rows count each
  group's last tile; the ratios split routed / dense into their factors."""
  from benchmarks import grouping_cost  # pylint: disable=import-outside-toplevel

  counts = [130, 0, 64, 63]
  assert grouping_cost.group_sizes(counts, "routed").tolist() == counts
  assert grouping_cost.group_sizes(counts, "uniform").tolist() == [64, 64, 64, 65]
  assert grouping_cost.group_sizes(counts, "one_group").tolist() == [257]
  with pytest.raises(ValueError, match="variant"):
    grouping_cost.group_sizes(counts, "sorted")
  # Tiles of 64 rows: 3 + 0 + 1 + 1 = 5 tiles = 320 rows for 257.
  assert grouping_cost.padded_rows(counts, 64) == pytest.approx(320 / 257 - 1)
  r = grouping_cost.ratios({"routed": 6.0, "uniform": 5.0, "one_group": 4.0}, 2.0)
  assert r == {"kernel": 2.0, "weights": 1.25, "padding": 1.2, "total": 3.0}
  assert r["kernel"] * r["weights"] * r["padding"] == pytest.approx(r["total"])
  assert grouping_cost.ratios({"routed": 6.0}, None)["total"] is None


def test_grouping_cost_program_multiplies_each_group_by_its_weights():
  from benchmarks import dense_bound  # pylint: disable=import-outside-toplevel
  from benchmarks import grouping_cost  # pylint: disable=import-outside-toplevel

  gemm = dense_bound.DenseGemm("fwd", "up", 1, 40, 16, 24)
  sizes = np.array([7, 0, 33], np.int32)
  fn, (a, b, s) = grouping_cost.grouped_program(gemm, sizes, jnp.float32, "reference")
  assert a.shape == (40, 16) and b.shape == (3, 16, 24) and s.tolist() == sizes.tolist()
  a_np, b_np = np.asarray(a), np.asarray(b)
  want = np.concatenate([a_np[:7] @ b_np[0], a_np[7:] @ b_np[2]])
  np.testing.assert_allclose(np.asarray(fn(a, b, s)), want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="forward-shaped"):
    grouping_cost.grouped_program(dense_bound.DenseGemm("bwd", "dW_up", 2, 8, 8, 8),
                                  sizes, jnp.float32, "reference")


def test_grouping_cost_rows_and_section():
  results = {"cases": [
      {"name": "deepseek", "dense_bound": {"gemms": {"up": 0.8, "down": 0.4}},
       "grouping_cost": {"gemms": {"up": {"routed": 0.96, "uniform": 0.87,
                                          "one_group": 0.83},
                                   "down": {"routed": 0.52, "uniform": 0.49,
                                            "one_group": 0.46}},
                         "padded_rows": 0.083, "block_m": 128}},
      {"name": "small"}]}
  rows = report.grouping_cost_rows(results)
  assert [(r["case"], r["gemm"]) for r in rows] == [("deepseek", "up"), ("deepseek", "down")]
  assert rows[0]["total"] == pytest.approx(0.96 / 0.8)
  assert rows[1]["padding"] == pytest.approx(0.52 / 0.49)
  text = "\n".join(report._grouping_cost_section(results))  # pylint: disable=protected-access
  assert "## What grouping costs" in text and "8.3% (128-row tiles)" in text
  assert report._grouping_cost_section({"cases": [{"name": "x"}]}) == []  # pylint: disable=protected-access


def test_best_other_finds_the_fastest_other_at_every_point():
  results = {
      "cases": [{"name": "a"}, {"name": "b"}, {"name": "c"}],
      "results": [
          _row("a", "jmoe", "fwd", 1.0), _row("a", "slow", "fwd", 9.0),
          _row("a", "fast", "fwd", 2.0),
          _row("b", "jmoe", "fwd", 3.0), _row("b", "fast", "fwd", 2.0),
          {"case": "b", "impl": "slow", "mode": "fwd", "status": "error"},
          _row("c", "jmoe", "fwd", 1.0),  # nothing else measured: no point
      ],
      "memory_process": [],
  }
  versus = report.best_other(results)
  assert [(v["case"], v["impl"]) for v in versus] == [("a", "fast"), ("b", "fast")]
  assert versus[0]["ratio"] == pytest.approx(0.5)
  assert versus[0]["others"] == ["fast", "slow"] and versus[1]["others"] == ["fast"]
  row = next(r for r in report.targets(results) if "best other" in r["what"])
  assert row["measured"] == pytest.approx(1.5) and row["met"] is False
  assert "worst of 2" in row["what"] and "b fwd vs fast" in row["what"]
  results["results"][3]["median_ms"] = 2.0  # a tie counts as at least as fast
  row = next(r for r in report.targets(results) if "best other" in r["what"])
  assert row["met"] is True
  assert report.over_error_bound(results) == []
  results["results"][1]["rel_err_vs_oracle"] = 3e-2
  results["results"][2]["rel_err_vs_oracle"] = 5e-3
  assert report.over_error_bound(results) == [
      "slow a fwd: rel err 3.0e-02 is over the 0.01 bf16 bound (largest-error output or "
      "gradient against ref-sorted)"]
  section = "\n".join(report._best_other_section(results))  # pylint: disable=protected-access
  assert "| b | fwd | fast | 2 | 2 | 1.000 | fast |" in section


def test_noisy_rows_are_flagged_in_targets_notes_and_per_point():
  # Session 21's 1k-token forward: median 0.803 ms, fastest sample 0.611.
  results = {
      "cases": [{"name": "a"}, {"name": "b"}],
      "results": [
          dict(_row("a", "jmoe", "fwd", 0.803), min_ms=0.611),
          dict(_row("a", "fast", "fwd", 0.684), min_ms=0.680),
          dict(_row("b", "jmoe", "fwd", 1.0), min_ms=0.84),  # 1.19x: not noisy
          dict(_row("b", "fast", "fwd", 2.0), min_ms=1.9),
          _row("b", "old", "fwdbwd", 2.0),  # no min_ms (older results): not noisy
      ],
      "memory_process": [], "notes": [],
  }
  assert [report.is_noisy(r) for r in results["results"]] == [True, False, False, False,
                                                              False]
  assert report.noisy(results) == [
      "jmoe a fwd: median 0.803 ms is 1.31x its fastest sample (0.611 ms; over 1.2x): "
      "noisy, time it again alone before trusting it"]
  assert [v["noisy"] for v in report.best_other(results)] == [True, False]
  row = next(r for r in report.targets(results) if "best other" in r["what"])
  assert row["met"] is False and "a fwd vs fast; noisy samples, see the notes" in row["what"]
  section = "\n".join(report._best_other_section(results))  # pylint: disable=protected-access
  assert "| 1.174 (noisy) |" in section and "| 0.500 |" in section
  results["results"][0]["median_ms"] = 0.7  # 1.15x its fastest: trusted
  row = next(r for r in report.targets(results) if "best other" in r["what"])
  assert "noisy" not in row["what"] and report.noisy(results) == []


def _stand_in_tokamax(monkeypatch, ragged_dot):
  """Makes `implementations` import a module with this `ragged_dot` as tokamax
  (not installed by CI); returns that module."""
  fake = types.SimpleNamespace(ragged_dot=ragged_dot)
  real_import = implementations.importlib.import_module
  monkeypatch.setattr(implementations.importlib, "import_module",
                      lambda name: fake if name == "tokamax" else real_import(name))
  return fake


def test_tokamax_form_asks_for_operand_dtype_products(monkeypatch):
  """The tokamax implementation calls `tokamax.ragged_dot` without a float32
  output type (its VJP then feeds a float32 cotangent to a bf16 kernel) and with
  the implementation `tokamax_implementation` picks; a stand-in module records
  the calls (tokamax is not installed by CI)."""
  seen = []

  def fake_ragged_dot(lhs, rhs, group_sizes, **kwargs):
    seen.append(kwargs)
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)

  _stand_in_tokamax(monkeypatch, fake_ragged_dot)
  case = cases.Case("t", 64, 32, 24, 4, 2)
  x, params = cases.make_inputs(case)
  y, _ = jax.jit(implementations.IMPLS["tokamax"].make(case))(x, params)
  y_ref, _ = jax.jit(implementations.IMPLS["ref-sorted"].make(case))(x, params)
  assert seen and all(k == {"implementation": implementations.tokamax_implementation()}
                      for k in seen)
  assert implementations.tokamax_implementation() is None  # CPU: tokamax's choice
  assert _rel(y, y_ref) < 1e-2


@needs_triton
def test_tokamax_probe_runs_with_a_stand_in(monkeypatch, capsys):
  """`benchmarks/offline/tokamax_probe.py` (run on the H100 where tokamax was
  carried) on the tiny case, with `jax.lax.ragged_dot` standing in for tokamax."""
  from benchmarks.offline import tokamax_probe  # pylint: disable=import-outside-toplevel

  fake = _stand_in_tokamax(
      monkeypatch, lambda lhs, rhs, sizes, **kw: jax.lax.ragged_dot(lhs, rhs, sizes))
  tokamax_probe.ragged_dot_alone(fake, 64, 16, 24, 4)
  tokamax_probe.moe_gradients("tiny")
  out = capsys.readouterr().out
  assert "ragged_dot m=64 k=16 n=24 g=4 implementation=None: rel err" in out
  for name in ("tokamax", "jmoe"):
    line = next(l for l in out.splitlines() if f"fwd+bwd {name} vs ref-sorted" in l)
    errs = [float(part.split()[-1]) for part in line.split(": ")[1].split(", ")]
    assert len(errs) == 4 and all(0 < e < 2e-2 for e in errs), line


def test_merge_joins_parts_and_rejects_overlaps(tmp_path):
  from benchmarks import merge  # pylint: disable=import-outside-toplevel

  parts = []
  for name in ("tiny", "tiny-skewed"):
    out = tmp_path / name
    run.main(["--preset", "cpu", "--cases", name, "--impls", "ref-sorted,ref-einsum",
              "--modes", "fwd", "--repeats", "1", "--profile-cases", "",
              "--no-plots", "--out", str(out)])
    parts.append(str(out))
  joined = merge.main([*parts, "--out", str(tmp_path / "joined"), "--no-plots"])
  assert [c["name"] for c in joined["cases"]] == ["tiny", "tiny-skewed"]
  assert {r["case"] for r in joined["results"]} == {"tiny", "tiny-skewed"}
  assert len(joined["meta"]["parts"]) == 2
  assert all(r.get("jmoe_speedup") is None for r in joined["results"])  # no jmoe
  text = (tmp_path / "joined" / "report.md").read_text()
  assert "Joined from 2 runs" in text and "--cases tiny-skewed" in text
  saved = json.loads((tmp_path / "joined" / "results.json").read_text())
  assert len(saved["results"]) == len(joined["results"]) == 4
  with pytest.raises(ValueError, match="case 'tiny' is in both"):
    merge.merge([merge.load(parts[0]), merge.load(parts[0])])
  other = merge.load(parts[1])
  other["meta"]["device_kind"] = "NVIDIA H100"
  with pytest.raises(ValueError, match="device_kind"):
    merge.merge([merge.load(parts[0]), other])


@needs_triton
def test_jmoe_stages_reproduce_the_fused_op():
  case = cases.Case("t", 16, 24, 40, 4, 2)
  x, params = cases.make_inputs(case)
  stages, checks = profile.jmoe_stages(case, x, params, "interpret")
  assert [s.name for s in stages][:4] == ["router", "align/permute", "up GEMM",
                                          "down GEMM + combine"]
  assert set(checks) == {"y", "dx", "d_weights", "d_up", "d_down"}
  assert max(checks.values()) <= 1e-6, checks
  rows = profile.profile(stages, repeats=1, warmup=0)
  assert all(r["fwd_s"] is None or r["fwd_s"] > 0 for r in rows)
  assert any(r["bwd_s"] for r in rows)


def _all_finite(obj, path="results"):
  if isinstance(obj, float):
    assert math.isfinite(obj), path
  elif isinstance(obj, dict):
    for k, v in obj.items():
      _all_finite(v, f"{path}.{k}")
  elif isinstance(obj, list):
    for i, v in enumerate(obj):
      _all_finite(v, f"{path}[{i}]")


def test_run_writes_json_markdown_and_plots(tmp_path):
  impls = "ref-sorted,ref-einsum" + (
      ",jmoe" if importlib.util.find_spec("triton") is not None else "")
  out = tmp_path / "bench"
  results = run.main(["--preset", "cpu", "--cases", "tiny", "--impls", impls,
                      "--repeats", "1", "--profile-cases", "tiny", "--profile-impls",
                      "ref-sorted", "--out", str(out)])
  for name in ("results.json", "report.md", "speedup.png", "tflops.png", "memory.png",
               "profile.png"):
    path = out / name
    assert path.is_file() and path.stat().st_size > 0, name
    if name.endswith(".png"):
      assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  saved = json.loads((out / "results.json").read_text())
  _all_finite(saved)
  rows = [r for r in saved["results"] if r["status"] == "ok"]
  measured = {(r["impl"], r["mode"]) for r in rows}
  for impl in impls.split(","):
    for mode in ("fwd", "fwdbwd"):
      assert (impl, mode) in measured, (impl, mode, saved["notes"])
  for r in rows:
    assert r["median_ms"] > 0 and r["tflops"] > 0 and r["tokens_per_s"] > 0
    assert r["memory_compiled"]["peak"] > 0
    if r["impl"] == "jmoe":
      assert r["rel_err_vs_oracle"] < 2e-2  # bf16
      assert "jmoe_speedup" not in r
    elif "jmoe" in impls:
      assert r["jmoe_speedup"] > 0
  assert saved["dense_peak"]["tflops"] > 0
  assert saved["cases"][0]["utilisation"]["max_over_mean"] >= 1
  bound = saved["cases"][0]["dense_bound"]
  assert list(bound["gemms"]) == ["up", "down", "dh", "dx", "dW_up", "dW_down"]
  assert bound["fwd"] == pytest.approx(bound["gemms"]["up"] + bound["gemms"]["down"])
  assert bound["fwdbwd"] == pytest.approx(sum(bound["gemms"].values()))
  if "jmoe" in impls:
    cost = saved["cases"][0]["grouping_cost"]
    assert set(cost["gemms"]) == {"up", "down"}
    for ms in cost["gemms"].values():
      assert set(ms) == {"routed", "uniform", "one_group"} and min(ms.values()) > 0
    assert 0 <= cost["padded_rows"] < 1
  assert [p["stage"] for p in saved["profile"]] == [
      "router", "align/permute", "up GEMM", "down GEMM + combine"]
  md = (out / "report.md").read_text()
  assert "python -m benchmarks.run --preset cpu" in md
  sections = ["## Method", "## Implementations", "## Results", "## Memory",
              "## Per-stage profile", "## Dense-GEMM bound", "speedup.png"]
  if "jmoe" in impls:
    sections.append("## What grouping costs (forward GEMMs)")
  for section in sections:
    assert section in md, section
  assert results["meta"]["slug"] == "cpu"


def test_routing_twin_reuses_compiled_programs_and_limits_apply(tmp_path):
  results = run.main(["--preset", "cpu", "--cases", "cpu", "--impls", "ref-sorted",
                      "--repeats", "1", "--profile-cases", "tiny", "--profile-impls",
                      "ref-sorted", "--ragged-dot-vjp-max-bytes", "1", "--no-plots",
                      "--out", str(tmp_path)])
  skipped = [r for r in results["results"] if r["mode"] == "fwdbwd"]
  assert len(skipped) == 2 and all(r["status"] == "skipped" for r in skipped)
  assert "ragged_dot's VJP" in skipped[0]["reason"]
  assert [p["bwd_ms"] for p in results["profile"]] == [None] * 4
  assert all(p["fwd_ms"] > 0 for p in results["profile"])
  rows = {r["case"]: r for r in results["results"] if r["mode"] == "fwd"}
  assert rows["tiny"]["compile_s"] > 0 and "compiled_with" not in rows["tiny"]
  assert rows["tiny-skewed"]["compile_s"] == 0
  assert rows["tiny-skewed"]["compiled_with"] == "tiny"
  loads = {c["name"]: c["utilisation"]["max_over_mean"] for c in results["cases"]}
  assert loads["tiny-skewed"] > loads["tiny"]


def test_run_rejects_unknown_names(capsys):
  for argv in (["--cases", "nope"], ["--impls", "nope"], ["--modes", "bwd"],
               ["--profile-impls", "ref-einsum"]):
    with pytest.raises(SystemExit):
      run.main(argv)
  assert "unknown" in capsys.readouterr().err


def test_sweep_configs_runs_under_the_interpreter(tmp_path):
  """`benchmarks/sweep_configs.py` (the H100 tile sweep) on the tiny case: every
  stage times its default (marked) and the candidates without failing."""
  import json  # pylint: disable=import-outside-toplevel

  from benchmarks import sweep_configs  # pylint: disable=import-outside-toplevel

  out = tmp_path / "sweep.json"
  assert sweep_configs.main(["--cases", "tiny", "--reps", "1", "--backend", "interpret",
                             "--stages", "act_bwd,dW_up,dW_down",
                             "--json", str(out)]) == 0
  rows = json.loads(out.read_text())
  stages = {r["stage"] for r in rows}
  assert stages == {"act_bwd", "dW_up", "dW_down"}
  for stage in stages:
    mine = [r for r in rows if r["stage"] == stage]
    assert sum(r["default"] for r in mine) == 1, stage
    assert all(r["ms"] > 0 for r in mine)
  modes = {r["config"].split()[-1] for r in rows if r["stage"] == "dW_down"}
  assert modes == {"prescale", "pregather_b", "kernel"}


def test_ab_env_times_each_value_of_a_switch():
  """`benchmarks.ab_env` compiles one variant per value and reports a median
  for each value and mode (tiny case, interpreter)."""
  from benchmarks import ab_env  # pylint: disable=import-outside-toplevel

  result = ab_env.main(["--case", "tiny", "--var", "JMOE_ROUTER_SCALE",
                        "--values", "up,down", "--rounds", "1", "--reps", "1",
                        "--backend", "interpret"])
  assert set(result) == {"up fwd", "up fwd+bwd", "down fwd", "down fwd+bwd"}
  assert all(ms > 0 for ms in result.values())


def test_one_call_runs_forward_and_backward_once(capsys):
  """`benchmarks.one_call` (the ncu target) runs one expert_ffn fwd+bwd per case."""
  from benchmarks import one_call  # pylint: disable=import-outside-toplevel

  assert one_call.main(["--cases", "tiny", "--backend", "interpret"]) == 0
  assert "# tiny: one expert_ffn forward+backward ran" in capsys.readouterr().out


def test_explicit_split_times_both_inputs():
  """`benchmarks.explicit_split` times jmoe.moe on unsplit and explicitly split
  tokens (tiny case, interpreter, one CPU device)."""
  from benchmarks import explicit_split  # pylint: disable=import-outside-toplevel

  result = explicit_split.main(["--case", "tiny", "--rounds", "1", "--reps", "1",
                                "--backend", "interpret"])
  assert set(result) == {"unsplit fwd", "unsplit fwd+bwd", "split fwd", "split fwd+bwd"}
  assert all(ms > 0 for ms in result.values())


def test_expert_parallel_times_both_layers():
  """`benchmarks.expert_parallel` times jmoe.moe and moe_expert_parallel
  (tiny case, interpreter, one CPU device)."""
  from benchmarks import expert_parallel  # pylint: disable=import-outside-toplevel

  result = expert_parallel.main(["--case", "tiny", "--rounds", "1", "--reps", "1",
                                 "--backend", "interpret"])
  assert set(result) == {"moe fwd", "moe fwd+bwd", "expert-parallel fwd",
                         "expert-parallel fwd+bwd"}
  assert all(ms > 0 for ms in result.values())
