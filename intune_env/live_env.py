"""``InTuneLive-v0``: the InTune interface on a real, running input pipeline."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import psutil

from intune_env import common
from intune_env.live import config as live
from intune_env.live.config import (
    DEFAULT_MAX_WORKERS,
    DEFAULT_QUEUE_BATCHES,
    N_STAGES,
    STAGES,
    PipelineConfig,
    finite,
)
from intune_env.live.data import Dataset, DatasetSpec, ensure_dataset
from intune_env.live.pipeline import Counters, LivePipeline, tree_rss
from simulators.fileio import InputFileError, echo, read_text_limited
from simulators.pipeline import check_allocation

MIB = 1024**2
GPU = "gpu"
#: Throughput at or above this share of ``gpu_rate`` makes the consumer the bottleneck.
GPU_BOUND = 0.95


def default_worker_budget() -> int:
    """Default ``cpus``: the machine's cores, but at least two workers per stage.

    A worker here is a thread, and the read stage waits on storage latency, so a 2-core
    machine usefully runs many more workers than cores (1 per stage is already 5).
    """
    return max(os.cpu_count() or 1, 2 * N_STAGES)


def default_memory_budget_mib() -> int:
    """``live.config.MEMORY_BUDGET_MIB`` (2 GiB), or half the machine's memory if smaller."""
    total = psutil.virtual_memory().total // MIB
    return int(min(live.MEMORY_BUDGET_MIB, total // 2))


def load_oracle(oracle: Mapping[str, Any] | str | Path | None) -> dict[str, Any] | None:
    """Best static allocation from a live sweep: a mapping, or the JSON a sweep wrote.

    Accepted forms: ``{"throughput": x, "allocation": [...]}``, or a sweep result with
    that mapping under ``"best"``.
    """
    if oracle is None:
        return None
    if isinstance(oracle, str | Path):
        try:  # bounded read (regular file, 1 MB, UTF-8); a sweep JSON is data
            data = json.loads(read_text_limited(oracle, what="sweep JSON"))
        except InputFileError as err:
            raise ValueError(f"oracle: {err}") from None
        except ValueError as err:
            raise ValueError(f"oracle: cannot read sweep JSON {echo(str(oracle))}: "
                             f"{echo(str(err))}") from None
        except RecursionError:  # json.loads of 100,000 nested brackets
            raise ValueError(f"oracle: sweep JSON {echo(str(oracle))} is nested too "
                             f"deeply") from None
        if not isinstance(data, dict):
            raise ValueError(f"oracle: sweep JSON {echo(str(oracle))} must hold an object, "
                             f"got {type(data).__name__}")
    else:
        data = dict(oracle)
    if "best" in data:
        data = data["best"]
    try:
        thr = float(data["throughput"])
        alloc = [int(k) for k in data["allocation"]]
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            "oracle needs 'throughput' and 'allocation' (or a sweep JSON with 'best')"
        ) from None
    if len(alloc) != N_STAGES:
        raise ValueError(f"oracle allocation needs {N_STAGES} values, got {alloc}")
    return {"throughput": thr, "allocation": alloc}


class InTuneLiveEnv(gym.Env[np.ndarray, np.int64]):
    """CPU (worker) allocation across the stages of a live DLRM input pipeline.

    ## Description

    The same task as ``InTune-v0``, on a real pipeline running in this process: Parquet
    shards of Criteo-shaped data are read (with an emulated storage latency), collated
    into batches, shuffled through per-worker shuffle buffers, transformed (``log1p`` on
    dense features, hashing and modulo on categorical ones) and loaded into staging
    tensors that a rate-limited consumer (the "GPU") copies out. Each stage runs in a
    pool of worker threads (or processes, see ``process_stages``); the agent grows and
    shrinks the pools while the pipeline runs, and every step measures what really
    happened during one control interval. See :mod:`intune_env.live.pipeline`.

    A stage's "CPUs" are its worker count. On a small machine the read stage usefully
    holds more workers than there are cores: its workers mostly wait on storage.

    ## Action Space

    ``Discrete(2N + 1)`` with ``N = 5`` stages (read, batch, shuffle, transform,
    gpu_load), from :func:`intune_env.common.action_space`: ``0`` no-op, ``1..N`` add a
    worker to stage ``a - 1``, ``N+1..2N`` remove one from stage ``a - N - 1``. A move
    that would take a stage below 1 worker, above ``max_workers`` or the total above
    ``cpus`` is a no-op and sets ``info["invalid_action"]``.

    ## Observation Space

    ``Box(float32, (3N + 4,))`` from :func:`intune_env.common.observation_space`:
    workers per stage / ``cpus``; measured busy fraction of each stage's workers (time
    not blocked on an empty input or a full output buffer); fill of each stage's output
    buffer; RSS of the process tree / memory budget; delivered throughput / ``gpu_rate``;
    free workers / ``cpus``; ``cpus`` / 128.

    ## Rewards

    :func:`intune_env.common.reward`: ``w_t * throughput / gpu_rate - w_m * memory /
    budget``, or ``-oom_penalty`` when the memory budget is exceeded.

    ## Starting State

    ``reset`` stops any running pipeline, starts a new one with ``initial_allocation``
    (or ``options["allocation"]``) and a seed drawn from the env's generator, and
    returns the observation measured over one control interval.

    ## Episode End

    Terminated when the RSS of the process tree exceeds ``memory_budget_mib`` (checked
    every 50 ms by a monitor thread, which halts the pipeline at once, as an OOM kill
    would; ``info["peak_memory_bytes"]`` is that peak over the last interval, and
    ``info["memory_bytes"]`` the RSS at its end). Truncation is left to
    ``max_episode_steps`` (300 at registration). A failed worker raises
    :class:`intune_env.live.pipeline.PipelineError` from ``step``.

    ## Arguments

    ```python
    gym.make("InTuneLive-v0", control_interval_s=1.0, read_latency_ms=20.0, ...)
    ```

    - ``control_interval_s`` (1.0): wall seconds the pipeline runs per step.
    - ``read_latency_ms`` (20.0): latency added to every read request (remote storage).
    - ``gpu_rate`` (250000): samples/s the consumer takes at most.
    - ``cpus`` (None): worker budget; default ``max(os.cpu_count(), 2 * N)``.
    - ``max_workers`` (None): per-stage maximum, default ``(16, 4, 4, 4, 4)``.
    - ``memory_budget_mib`` (None): enforced RSS budget of the process tree; default
      2048 or half the machine's memory, whichever is smaller. Must be below the
      machine's memory.
    - ``initial_allocation`` (None): workers per stage after reset; default one each.
    - ``data_dir`` (None): where shards are generated once (default
      ``$INTUNE_DATA_DIR`` or ``~/.cache/intune/live``).
    - ``n_shards`` (8), ``rows_per_shard`` (32768), ``batch_size`` (512): dataset shape;
      a read request reads one row group of ``batch_size`` samples.
    - ``data_seed`` (0): seed of the generated data.
    - ``shuffle_buffer`` (2048): samples held by each shuffle worker.
    - ``transform_rounds`` (4): hash-mix rounds per categorical value (transform cost).
    - ``queue_batches`` (None): output buffer capacity of each stage, in batches;
      default ``(8, 8, 8, 8, 4)``.
    - ``process_stages`` (()): stages run in worker processes (``read``, ``batch``,
      ``transform``); threads otherwise.
    - ``reward_weights`` (None): :class:`intune_env.common.RewardWeights` or a mapping.
    - ``oracle`` (None): best static allocation from a live sweep (mapping or the path of
      the sweep JSON); adds ``oracle_throughput`` and ``oracle_allocation`` to ``info``.
    - ``render_mode`` (None or ``"ansi"``).

    ## Version History

    - v0: first version.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(
        self,
        control_interval_s: float = live.CONTROL_INTERVAL_S,
        read_latency_ms: float = live.READ_LATENCY_MS,
        gpu_rate: float = live.GPU_RATE,
        cpus: int | None = None,
        max_workers: Sequence[int] | None = None,
        memory_budget_mib: float | None = None,
        initial_allocation: Sequence[int] | None = None,
        data_dir: str | Path | None = None,
        n_shards: int = live.N_SHARDS,
        rows_per_shard: int = live.ROWS_PER_SHARD,
        batch_size: int = live.BATCH_SIZE,
        data_seed: int = 0,
        shuffle_buffer: int = live.SHUFFLE_BUFFER,
        transform_rounds: int = live.TRANSFORM_ROUNDS,
        queue_batches: Sequence[int] | None = None,
        process_stages: Sequence[str] = (),
        reward_weights: common.RewardWeights | Mapping[str, float] | None = None,
        oracle: Mapping[str, Any] | str | Path | None = None,
        render_mode: str | None = None,
    ) -> None:
        control_interval_s = finite(control_interval_s, "control_interval_s")
        gpu_rate = finite(gpu_rate, "gpu_rate")
        read_latency_ms = finite(read_latency_ms, "read_latency_ms", strict=False)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.n = N_STAGES
        self.stage_names = list(STAGES)
        self.control_interval_s = float(control_interval_s)
        self.cpus = int(cpus) if cpus is not None else default_worker_budget()
        if self.cpus < self.n:
            raise ValueError(f"cpus (worker budget) must be >= {self.n}, one per stage; "
                             f"got {self.cpus}")
        self.max_workers = [int(k) for k in (max_workers or DEFAULT_MAX_WORKERS)]
        machine = psutil.virtual_memory().total
        budget_mib = finite(memory_budget_mib, "memory_budget_mib") \
            if memory_budget_mib is not None else default_memory_budget_mib()
        self.memory_capacity_bytes = int(budget_mib * MIB)
        if not 0 < self.memory_capacity_bytes < machine:
            raise ValueError(f"memory_budget_mib must be > 0 and below the machine's "
                             f"{machine // MIB} MiB, got {budget_mib}")
        if isinstance(reward_weights, Mapping):
            reward_weights = common.RewardWeights(**reward_weights)
        self.weights = reward_weights or common.RewardWeights()
        self.oracle = load_oracle(oracle)
        self.render_mode = render_mode
        self.config = PipelineConfig(
            read_latency_ms=float(read_latency_ms),
            gpu_rate=float(gpu_rate),
            queue_batches=tuple(int(q) for q in (queue_batches or DEFAULT_QUEUE_BATCHES)),
            shuffle_buffer=int(shuffle_buffer),
            transform_rounds=int(transform_rounds),
            max_workers=tuple(self.max_workers),
            process_stages=tuple(process_stages),
            memory_limit_bytes=self.memory_capacity_bytes,
        )
        self.gpu_rate = self.config.gpu_rate
        self.batch_size = int(batch_size)  # samples per batch (the dataset's row group)
        self.initial_allocation = self._valid_allocation(
            initial_allocation if initial_allocation is not None else [1] * self.n,
            "initial_allocation")
        if initial_allocation is not None:
            self._check_memory(self.initial_allocation, "initial_allocation")
        self.dataset: Dataset = ensure_dataset(
            DatasetSpec(n_shards=n_shards, rows_per_shard=rows_per_shard,
                        row_group_size=self.batch_size, seed=data_seed), data_dir)

        self.action_space = common.action_space(self.n)
        self.observation_space = common.observation_space(self.n)
        self._pipeline: LivePipeline | None = None
        self._element_bytes = [0] * self.n
        self._last: dict[str, Any] | None = None
        self._t_reset = time.perf_counter()
        self._terminated = False

    # --- helpers -------------------------------------------------------------------------
    def _valid_allocation(self, allocation: Sequence[int], what: str) -> list[int]:
        alloc = [int(k) for k in allocation]
        if len(alloc) != self.n:
            raise ValueError(f"{what} needs {self.n} values ({', '.join(STAGES)}), got {alloc}")
        for name, k, hi in zip(STAGES, alloc, self.max_workers, strict=True):
            if not 1 <= k <= hi:
                raise ValueError(f"{what}: stage {name!r} has {k} workers; expected 1..{hi}")
        if sum(alloc) > self.cpus:
            raise ValueError(f"{what} uses {sum(alloc)} workers, above the budget of "
                             f"{self.cpus} (cpus)")
        return alloc

    def _check_memory(self, alloc: Sequence[int], what: str) -> None:
        """Refuse a start that cannot fit the memory budget: this process tree's RSS now
        plus what the pipeline holds once warm (:func:`live.memory_need`, the live
        pipeline's memory model: workers, shuffle buffers, stage buffers, staging)."""
        need = live.memory_need(self.config, self.batch_size, alloc, tree_rss())
        if need.total > self.memory_capacity_bytes:
            raise ValueError(
                f"{what} {list(alloc)} needs about {need.total / MIB:.0f} MiB once warm "
                f"({need.describe()}); the memory budget is "
                f"{self.memory_capacity_bytes / MIB:.0f} MiB (memory_budget_mib)")

    @property
    def pipeline(self) -> LivePipeline | None:
        """The running pipeline (None before the first reset and after close)."""
        return self._pipeline

    @property
    def allocation(self) -> list[int]:
        return self._pipeline.allocation if self._pipeline is not None else []

    def _measure(self, invalid: bool) -> tuple[np.ndarray, float, bool, dict[str, Any]]:
        """Run one control interval and turn it into (obs, reward, oom, info)."""
        pipe = self._pipeline
        assert pipe is not None
        c0 = pipe.counters()
        # Sleep the interval, but wake at once if the pipeline halts (OOM or failure).
        pipe.sleep(self.control_interval_s)
        pipe.check()
        c1 = pipe.counters()
        return self._interval(c0, c1, invalid)

    def _interval(self, c0: Counters, c1: Counters, invalid: bool
                  ) -> tuple[np.ndarray, float, bool, dict[str, Any]]:
        pipe = self._pipeline
        assert pipe is not None
        dt = max(c1.time_s - c0.time_s, 1e-9)
        alloc = list(c1.workers) if not pipe.halted else pipe.allocation
        alloc = [max(1, k) for k in alloc]
        throughput = (c1.delivered - c0.delivered) / dt
        busy = [b1 - b0 for b0, b1 in zip(c0.busy_s, c1.busy_s, strict=True)]
        util = [min(1.0, b / (k * dt)) for b, k in zip(busy, alloc, strict=True)]
        processed = [p1 - p0 for p0, p1 in zip(c0.processed, c1.processed, strict=True)]
        for i in range(self.n):
            ds = c1.out_samples[i] - c0.out_samples[i]
            if ds > 0:
                self._element_bytes[i] = round((c1.out_bytes[i] - c0.out_bytes[i]) / ds)
        oom = bool(pipe.oom or c1.peak_memory_bytes > self.memory_capacity_bytes)
        if oom:  # the job has crashed: stop it even if the monitor had not yet sampled
            pipe.halt()
        memory = int(c1.memory_bytes)
        mem_frac = memory / self.memory_capacity_bytes
        thr_frac = throughput / self.gpu_rate
        fill = [lv / cap for lv, cap in zip(c1.buffer_levels, c1.buffer_capacities, strict=True)]
        obs = common.build_observation(alloc, util, fill, mem_frac, thr_frac, self.cpus)
        rew = common.reward(thr_frac, mem_frac, oom, self.weights)
        if throughput >= GPU_BOUND * self.gpu_rate:
            bottleneck = GPU
        else:
            bottleneck = STAGES[int(np.argmax(util))]
        info: dict[str, Any] = {
            "throughput": float(throughput),
            "allocation": list(alloc),
            "memory_bytes": memory,
            "peak_memory_bytes": int(c1.peak_memory_bytes),
            "memory_capacity_bytes": int(self.memory_capacity_bytes),
            "oom": oom,
            "bottleneck_stage": bottleneck,
            "sim_time_s": float(time.perf_counter() - self._t_reset),
            "invalid_action": bool(invalid),
            "stage_names": tuple(STAGES),
            "stage_utilisation": [float(u) for u in util],
            "stage_processed": [int(p) for p in processed],
            "stage_busy_s": [float(b) for b in busy],
            "buffer_levels": [int(b) for b in c1.buffer_levels],
            "buffer_capacities": [int(b) for b in c1.buffer_capacities],
            "element_bytes": tuple(self._element_bytes),
            "cpus_total": int(self.cpus),
            "max_cpus": tuple(self.max_workers),
            "gpu_rate": float(self.gpu_rate),
            "action_mask": common.action_mask(alloc, self.max_workers, self.cpus),
        }
        if self.oracle is not None:
            info["oracle_throughput"] = float(self.oracle["throughput"])
            info["oracle_allocation"] = tuple(self.oracle["allocation"])
        self._last = info
        return obs, float(rew), oom, info

    # --- gymnasium API -------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        alloc = self.initial_allocation
        if options and options.get("allocation") is not None:
            alloc = self._valid_allocation(options["allocation"], 'options["allocation"]')
            self._check_memory(alloc, 'options["allocation"]')
        if self._pipeline is not None:
            self._pipeline.close()
            self._pipeline = None
        pipe_seed = int(self.np_random.integers(2**31 - 1))
        cfg = PipelineConfig(**{**self.config.__dict__, "seed": pipe_seed})
        self._element_bytes = [0] * self.n
        self._terminated = False
        self._t_reset = time.perf_counter()
        self._pipeline = LivePipeline(self.dataset, cfg, alloc)
        obs, _, oom, info = self._measure(invalid=False)
        self._terminated = oom
        return obs, info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        a = common.check_action(action, self.n)
        if self._pipeline is None:
            raise RuntimeError("call reset() before step()")
        pipe = self._pipeline
        stage, delta = common.decode_action(a, self.n)
        alloc = pipe.allocation
        valid = common.move_is_valid(alloc, self.max_workers, self.cpus, stage, delta)
        if delta != 0 and valid and not pipe.halted:
            pipe.resize(stage, alloc[stage] + delta)
        obs, rew, oom, info = self._measure(invalid=not valid)
        self._terminated = self._terminated or oom
        return obs, rew, oom, False, info

    def set_allocation(self, allocation: Sequence[int]) -> None:
        """Resize every pool at once (for tuners such as AUTOTUNE that publish a whole
        configuration); takes effect now, measured by the next :meth:`step`.

        Each stage needs 1..``max_workers`` workers; unlike actions, the total may exceed
        ``cpus`` (the pipeline then simply runs more threads than the budget).
        """
        if self._pipeline is None:
            raise RuntimeError("call reset() before set_allocation()")
        alloc = check_allocation(allocation, self.max_workers, STAGES)
        if not self._pipeline.halted:
            self._pipeline.set_allocation(alloc)

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        info = self._last
        if info is None:
            return "InTuneLive-v0: not started (call reset)\n"
        rows = [f"{'stage':<10}{'workers':>8}{'util':>7}{'done/s':>10}{'buffer':>14}"
                f"{'B/sample':>9}"]
        dt = self.control_interval_s
        for i, name in enumerate(STAGES):
            rows.append(
                f"{name:<10}{info['allocation'][i]:>8}{info['stage_utilisation'][i]:>7.2f}"
                f"{info['stage_processed'][i] / dt:>10.0f}"
                f"{info['buffer_levels'][i]:>7}/{info['buffer_capacities'][i]:<6}"
                f"{info['element_bytes'][i]:>9}"
            )
        rows.append(
            f"throughput {info['throughput']:.0f}/s of gpu_rate {self.gpu_rate:.0f}; "
            f"bottleneck {info['bottleneck_stage']}; memory "
            f"{info['memory_bytes'] / MIB:.0f}/{info['memory_capacity_bytes'] / MIB:.0f} MiB; "
            f"workers {sum(info['allocation'])}/{self.cpus}; t={info['sim_time_s']:.1f}s"
        )
        return "\n".join(rows) + "\n"

    def close(self) -> None:
        if self._pipeline is not None:
            self._pipeline.close()
            self._pipeline = None
        super().close()
