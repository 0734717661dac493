"""Device-synchronised timing, NVML energy and the dense-matmul peak.

Timing (`time_fn`): the first call compiles (its time is kept as
`first_call_s`), `warmup` more calls follow, then `repeats` samples; each
sample dispatches `calls` asynchronous calls and ends with one
`jax.block_until_ready`, so short functions are not dominated by the host round
trip. `calls` is chosen so a sample lasts at least `min_sample_s`. The result is
the median per-call time.

Energy (`measure_energy`): a separate loop of back-to-back calls lasting at
least `duration_s`, while a thread samples the board power through NVML
(`pynvml`, package `nvidia-ml-py`) every `POWER_PERIOD_S`: the instantaneous
power field where the driver has it, else the 1 s-average power, with the SM
clock and the driver's clock-event reasons (power cap, thermal). Energy per
call is the mean sampled power times the loop time divided by the calls
(whole-board energy, idle power included). The NVML total-energy counter's
difference is kept as a cross-check: on the H100 it moved in ~200 J steps over
0.3 s loops (2026-11-23), so it is useless for short loops. Without NVML (no
GPU, no `pynvml`) it returns None.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import dense_bound

POWER_PERIOD_S = 0.005
DENSE_PEAK_SEED = 1234  # inputs of the dense n^3 matmul (`dense_peak`, power_probe)


@dataclasses.dataclass
class Timing:
  """Result of `time_fn` (seconds per call)."""

  median_s: float
  min_s: float
  max_s: float
  samples_s: list[float]
  calls_per_sample: int
  first_call_s: float

  @property
  def spread(self) -> float:
    """(max - min) / median of the samples: the run-to-run noise."""
    return (self.max_s - self.min_s) / self.median_s if self.median_s else 0.0


def run_calls(fn: Callable[..., Any], *args, calls: int) -> float:
  """Seconds for `calls` asynchronous calls of `fn(*args)` ended by one
  `jax.block_until_ready` of the last output."""
  start = time.perf_counter()
  out = None
  for _ in range(calls):
    out = fn(*args)
  jax.block_until_ready(out)
  return time.perf_counter() - start


def time_fn(
    fn: Callable[..., Any],
    *args,
    repeats: int = 5,
    warmup: int = 1,
    min_sample_s: float = 0.02,
    max_calls: int = 200,
    on_first: Callable[[Any], None] | None = None,
) -> Timing:
  """Median time per call of `fn(*args)` after compilation and warm-up.

  Args:
    fn: a function of arrays (normally `jax.jit`-ed) returning a pytree of arrays.
    *args: its arguments.
    repeats: timed samples (the median is reported).
    warmup: untimed calls after the first (compiling) one. The last call before
      the samples sizes them (with `warmup=0` that is the compiling call, so slow
      functions run once per sample); where that asks for several calls per
      sample, one untimed batch of them refines the count.
    min_sample_s: a sample dispatches enough calls to last at least this long.
    max_calls: at most this many calls per sample.
    on_first: called with the first call's output (e.g. to check it) before the
      output is dropped.
  """
  if repeats < 1 or warmup < 0:
    raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats=} {warmup=}")
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  first = last = time.perf_counter() - start
  if on_first is not None:
    on_first(out)
  del out
  for _ in range(warmup):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    last = time.perf_counter() - start
  calls = int(min(max_calls, max(1, math.ceil(min_sample_s / max(last, 1e-7)))))
  if calls > 1:
    # One synchronised call also pays the host round trip: size the samples from a
    # batch of asynchronous calls instead.
    per_call = run_calls(fn, *args, calls=calls) / calls
    calls = int(min(max_calls, max(1, math.ceil(min_sample_s / max(per_call, 1e-7)))))
  samples = [run_calls(fn, *args, calls=calls) / calls for _ in range(repeats)]
  return Timing(
      median_s=statistics.median(samples), min_s=min(samples), max_s=max(samples),
      samples_s=samples, calls_per_sample=calls, first_call_s=first,
  )


def compile_all(jobs: Sequence[tuple[Any, tuple]], workers: int = 1
                ) -> list[tuple[Any, float]]:
  """Ahead-of-time compiles `[(jitted_fn, args)]`, up to `workers` at a time.

  XLA compiles outside the GIL, so threads overlap the compilations. (On a GPU,
  XLA's GEMM autotuning then times candidate kernels while other compilations
  run: `workers=1` keeps it undisturbed.)

  Returns:
    `[(compiled or the exception raised, seconds)]` in the order of `jobs`.
  """
  def one(job):
    fn, args = job
    start = time.perf_counter()
    try:
      compiled = fn.lower(*args).compile()
    except Exception as e:  # noqa: BLE001  (returned to the caller, who reports it)
      compiled = e
    return compiled, time.perf_counter() - start

  if workers <= 1 or len(jobs) <= 1:
    return [one(job) for job in jobs]
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(one, jobs))


def measure_energy(fn: Callable[..., Any], *args, call_s: float,
                   duration_s: float = 0.5, max_calls: int = 20000
                   ) -> dict[str, Any] | None:
  """Joules per call of `fn(*args)` over a loop of at least `duration_s`.

  Args:
    fn: a compiled/jitted function (already warm).
    *args: its arguments.
    call_s: the measured time per call (sizes the loop).
    duration_s: the loop lasts at least this long.
    max_calls: cap on the calls in the loop.

  Returns:
    `{"energy_j_per_call", "source", "mean_power_w", "power_samples",
    "counter_j_per_call", "calls", "loop_s", "clocks"}` (energy = mean sampled
    power x loop time / calls; `clocks` from `PowerSampler.clocks`), or None
    without NVML.
  """
  sampler = PowerSampler()
  if not sampler.available:
    return None
  calls = int(min(max_calls, max(1, math.ceil(duration_s / max(call_s, 1e-7)))))
  with sampler:
    loop_s = run_calls(fn, *args, calls=calls)
  if sampler.mean_w is None:
    return None
  return {"energy_j_per_call": sampler.mean_w * loop_s / calls,
          "source": sampler.source,
          "mean_power_w": sampler.mean_w, "power_samples": len(sampler.readings_w),
          "counter_j_per_call": (None if sampler.energy_j is None
                                 else sampler.energy_j / calls),
          "calls": calls, "loop_s": loop_s, "clocks": sampler.clocks()}


def _nvml():
  """The initialised `pynvml` module, or None where NVML cannot be used."""
  try:
    import pynvml  # pylint: disable=import-outside-toplevel
    pynvml.nvmlInit()
    return pynvml
  except Exception:  # ImportError, or NVMLError without a driver.  # noqa: BLE001
    return None


def nvml_info() -> dict[str, Any] | None:
  """Driver version, GPU name and power limit from NVML, or None."""
  nvml = _nvml()
  if nvml is None:
    return None
  try:
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    info = {"driver": nvml.nvmlSystemGetDriverVersion(),
            "name": nvml.nvmlDeviceGetName(handle)}
    try:
      info["power_limit_w"] = nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000
    except nvml.NVMLError:
      pass
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in info.items()}
  except nvml.NVMLError:
    return None


# NVML field of the instantaneous board power (mW, ~50 Hz refresh on Hopper);
# nvmlDeviceGetPowerUsage is a trailing 1 s average on Ampere and newer.
NVML_FI_DEV_POWER_INSTANT = 186
NVML_CLOCK_SM = 1
# Bits of nvmlDeviceGetCurrentClocksEventReasons (nvml.h, clocksEventReasons).
CLOCK_REASONS = {"power_cap": 0x4 | 0x80, "thermal": 0x20 | 0x40, "hw_slowdown": 0x8}


class PowerSampler:
  """Context manager sampling GPU 0's board power in a background thread.

  It reads the instantaneous power field where the driver has it (`source` is
  then "instant power"), else `nvmlDeviceGetPowerUsage` ("1 s-average power",
  which lags short loops). After exit, `readings_w` holds the samples, `mean_w`
  their mean (None without NVML or samples) and `energy_j` the NVML
  total-energy counter's difference (None if unsupported; the counter moves in
  steps of ~100 ms, so it is only a cross-check for loops of a few seconds).
  `sm_mhz` and `reasons` hold the SM clock and clock-event bits sampled with
  each reading (where the driver reports them); `clocks()` summarises them.
  """

  def __init__(self, period_s: float = POWER_PERIOD_S):
    self.period_s = period_s
    self.readings_w: list[float] = []
    self.sm_mhz: list[int] = []
    self.reasons: list[int] = []
    self.energy_j: float | None = None
    self.source: str | None = None
    self._nvml = _nvml()
    self._handle = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._energy0 = None
    if self._nvml is None:
      return
    try:
      self._handle = self._nvml.nvmlDeviceGetHandleByIndex(0)
    except self._nvml.NVMLError:
      self._nvml = None
      return
    self.source = "instant power" if self._instant_w() is not None else (
        "1 s-average power")

  @property
  def available(self) -> bool:
    return self._nvml is not None

  @property
  def mean_w(self) -> float | None:
    return statistics.fmean(self.readings_w) if self.readings_w else None

  def _instant_w(self) -> float | None:
    try:
      field = getattr(self._nvml, "NVML_FI_DEV_POWER_INSTANT",
                      NVML_FI_DEV_POWER_INSTANT)
      value = self._nvml.nvmlDeviceGetFieldValues(self._handle, [field])[0]
      if value.nvmlReturn != 0:
        return None
      return value.value.uiVal / 1000
    except Exception:  # noqa: BLE001  (old driver or binding: fall back)
      return None

  def read_w(self) -> float | None:
    if self.source == "instant power":
      return self._instant_w()
    try:
      return self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000
    except self._nvml.NVMLError:
      return None

  def _clock_sample(self) -> None:
    nvml, handle = self._nvml, self._handle
    try:
      self.sm_mhz.append(nvml.nvmlDeviceGetClockInfo(handle, NVML_CLOCK_SM))
      reasons = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or (
          nvml.nvmlDeviceGetCurrentClocksThrottleReasons)
      self.reasons.append(int(reasons(handle)))
    except Exception:  # noqa: BLE001  (old driver or binding: no clock data)
      pass

  def clocks(self) -> dict[str, float] | None:
    """Mean / min / max SM clock (MHz) over the samples and the share of
    samples with each `CLOCK_REASONS` bit set, or None without clock samples."""
    if not self.sm_mhz:
      return None
    out: dict[str, float] = {"mean_sm_mhz": statistics.fmean(self.sm_mhz),
                             "min_sm_mhz": min(self.sm_mhz),
                             "max_sm_mhz": max(self.sm_mhz)}
    for name, bits in CLOCK_REASONS.items():
      out[f"{name}_share"] = (sum(1 for r in self.reasons if r & bits) / len(self.reasons)
                              if self.reasons else float("nan"))
    return out

  def _energy_mj(self):
    try:
      return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
    except self._nvml.NVMLError:
      return None

  def _run(self):
    while not self._stop.is_set():
      watts = self.read_w()
      if watts is None:
        return
      self.readings_w.append(watts)
      self._clock_sample()
      self._stop.wait(self.period_s)

  def __enter__(self):
    if self._nvml is not None:
      self._energy0 = self._energy_mj()
      self._thread = threading.Thread(target=self._run, daemon=True)
      self._thread.start()
    return self

  def __exit__(self, *exc):
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      energy1 = self._energy_mj()
      if self._energy0 is not None and energy1 is not None:
        self.energy_j = (energy1 - self._energy0) / 1000
    return False


def dense_peak(n: int, dtype=jnp.bfloat16, **time_kwargs) -> dict[str, float]:
  """TFLOP/s of an `n x n x n` `jnp.dot` on random inputs (the run's matmul peak).

  Returns:
    `{"n": n, "median_s": ..., "tflops": 2 n^3 / median_s / 1e12}`.
  """
  dot, args = dense_bound.dense_program(
      dense_bound.DenseGemm("fwd", "dense", 1, n, n, n), dtype, seed=DENSE_PEAK_SEED)
  timing = time_fn(dot, *args, **time_kwargs)
  return {"n": n, "dtype": jnp.dtype(dtype).name, "median_s": timing.median_s,
          "tflops": 2.0 * n ** 3 / timing.median_s / 1e12, "spread": timing.spread}
