"""InTuneLive-v0: the shared interface on the live pipeline (tiny, fast configurations)."""

from __future__ import annotations

import json
import threading

import gymnasium as gym
import numpy as np
import psutil
import pytest
from gymnasium.utils.env_checker import check_env

from intune_env import common
from intune_env.live import pipeline as pl
from intune_env.live.pipeline import STAGES, PipelineError, tree_rss
from intune_env.live_env import InTuneLiveEnv

N = len(STAGES)
TEST_ID = "InTuneLiveTiny-v0"
INFO_KEYS = {
    "throughput", "allocation", "memory_bytes", "peak_memory_bytes", "memory_capacity_bytes",
    "oom",
    "bottleneck_stage", "sim_time_s", "invalid_action", "stage_names", "stage_utilisation",
    "stage_processed", "stage_busy_s", "buffer_levels", "buffer_capacities", "element_bytes",
    "cpus_total", "max_cpus", "gpu_rate", "action_mask",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return {
        "control_interval_s": 0.1,
        "read_latency_ms": 2.0,
        "data_dir": str(tmp_path_factory.mktemp("live-env-data")),
        "n_shards": 2,
        "rows_per_shard": 2048,
        "batch_size": 128,
        "shuffle_buffer": 256,
        "cpus": 8,
        "max_workers": (3, 2, 2, 2, 2),
    }


def _no_pipeline_threads() -> bool:
    return not [t for t in threading.enumerate() if t.name.startswith("intune-")]


def test_check_env_is_clean(tiny) -> None:
    if TEST_ID not in gym.registry:
        # A live pipeline is not reproducible step for step: declared nondeterministic.
        gym.register(id=TEST_ID, entry_point="intune_env.live_env:InTuneLiveEnv",
                     max_episode_steps=300, nondeterministic=True)
    env = gym.make(TEST_ID, **tiny)
    try:
        check_env(env.unwrapped)
    finally:
        env.close()
    assert _no_pipeline_threads()


def test_registered_id_makes_the_live_env(tiny) -> None:
    import intune_env  # noqa: F401  (registers the ids)

    env = gym.make("InTuneLive-v0", **tiny)
    try:
        assert isinstance(env.unwrapped, InTuneLiveEnv)
        assert env.action_space == common.action_space(N)
        assert env.observation_space == common.observation_space(N)
    finally:
        env.close()


def test_step_measures_the_running_pipeline(tiny) -> None:
    env = InTuneLiveEnv(**tiny, render_mode="ansi")
    try:
        obs, info = env.reset(seed=1)
        assert set(info) == INFO_KEYS  # no oracle given: no oracle keys
        assert obs in env.observation_space
        infos = [info]
        for a in (1, 1, 0):  # two more readers, then hold
            obs, rew, term, trunc, info = env.step(a)
            infos.append(info)
            assert not term and not trunc
        assert info["allocation"] == [3, 1, 1, 1, 1]
        assert info["throughput"] > 0 and sum(info["stage_processed"]) > 0
        assert all(0.0 <= u <= 1.0 for u in info["stage_utilisation"])
        assert info["stage_names"] == tuple(STAGES)
        assert info["element_bytes"][0] > 100  # a Criteo sample is ~160 bytes
        assert 0 < info["memory_bytes"] < info["memory_capacity_bytes"]
        assert info["bottleneck_stage"] in (*STAGES, "gpu")
        assert info["cpus_total"] == 8 and info["max_cpus"] == (3, 2, 2, 2, 2)
        thr_frac = info["throughput"] / info["gpu_rate"]
        mem_frac = info["memory_bytes"] / info["memory_capacity_bytes"]
        assert rew == pytest.approx(
            common.reward(thr_frac, mem_frac, False, common.RewardWeights()))
        assert np.array_equal(info["action_mask"],
                              common.action_mask([3, 1, 1, 1, 1], [3, 2, 2, 2, 2], 8))
        # fresh containers every call
        assert infos[-1]["allocation"] is not infos[-2]["allocation"]
        text = env.render()
        assert all(name in text for name in STAGES) and "throughput" in text
    finally:
        env.close()
        env.close()
    assert _no_pipeline_threads()


def test_invalid_moves_are_flagged_no_ops_and_bad_actions_raise(tiny) -> None:
    env = InTuneLiveEnv(**tiny)
    try:
        env.reset(seed=0, options={"allocation": [3, 2, 1, 1, 1]})
        _, _, _, _, info = env.step(1 + N)  # read 3 -> 2
        assert not info["invalid_action"] and info["allocation"][0] == 2
        _, _, _, _, info = env.step(3 + N)  # shuffle below 1
        assert info["invalid_action"] and info["allocation"] == [2, 2, 1, 1, 1]
        _, _, _, _, info = env.step(2)  # batch above its max of 2
        assert info["invalid_action"] and info["allocation"] == [2, 2, 1, 1, 1]
        _, _, _, _, info = env.step(1)
        assert not info["invalid_action"] and sum(info["allocation"]) == 8
        _, _, _, _, info = env.step(4)  # budget of 8 workers is full
        assert info["invalid_action"] and sum(info["allocation"]) == 8
        for bad in (-1, 2 * N + 1, 1.5, "x"):
            with pytest.raises(ValueError):
                env.step(bad)
        with pytest.raises(ValueError, match="above the budget"):
            env.reset(options={"allocation": [3, 2, 2, 2, 2]})
        # A whole allocation (AUTOTUNE-style) may exceed the budget, not max_workers.
        env.set_allocation([3, 2, 2, 2, 2])
        _, _, _, _, info = env.step(0)
        assert info["allocation"] == [3, 2, 2, 2, 2] and not info["invalid_action"]
        with pytest.raises(ValueError, match=r"expected 1\.\.3"):
            env.set_allocation([4, 1, 1, 1, 1])
    finally:
        env.close()


def test_exceeding_the_memory_budget_terminates_like_an_oom(tiny) -> None:
    # Budget: what this process uses now plus 48 MiB. Big per-worker shuffle buffers
    # (~270 B a sample, up to ~500 MiB each: room for a baseline that was inflated by a
    # previous test's exiting children) then outgrow it within a few intervals. (An
    # explicit start with these numbers is refused up front; the default start is not.)
    budget = tree_rss() / 2**20 + 48
    cfg = {**tiny, "read_latency_ms": 0.0, "shuffle_buffer": 2_000_000,
           "memory_budget_mib": budget, "control_interval_s": 0.25}
    env = InTuneLiveEnv(**cfg)
    try:
        _, info = env.reset(seed=0)
        weights = common.RewardWeights()
        for _ in range(80):
            _, rew, term, trunc, info = env.step(0)
            if term:
                break
        assert term and info["oom"] and not trunc
        assert rew == -weights.oom_penalty
        assert env.pipeline is not None and env.pipeline.halted
    finally:
        env.close()
    assert _no_pipeline_threads()


def test_memory_budget_must_be_below_the_machine(tiny) -> None:
    machine_mib = psutil.virtual_memory().total / 2**20
    with pytest.raises(ValueError, match="below the machine"):
        InTuneLiveEnv(**{**tiny, "memory_budget_mib": machine_mib * 2})


def test_oracle_from_a_sweep_json(tiny, tmp_path) -> None:
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"best": {"throughput": 1234.5,
                                          "allocation": [2, 1, 1, 1, 1]}}))
    env = InTuneLiveEnv(**tiny, oracle=sweep)
    try:
        _, info = env.reset(seed=0)
        assert info["oracle_throughput"] == 1234.5
        assert info["oracle_allocation"] == (2, 1, 1, 1, 1)
    finally:
        env.close()
    with pytest.raises(ValueError, match="oracle"):
        InTuneLiveEnv(**tiny, oracle={"allocation": [1, 1, 1, 1, 1]})


def test_worker_exception_surfaces_from_step(tiny, monkeypatch) -> None:
    def broken(item, params, cache):
        raise RuntimeError("transform exploded")

    monkeypatch.setitem(pl.STAGE_FUNCS, "transform", broken)
    env = InTuneLiveEnv(**tiny)
    try:
        with pytest.raises(PipelineError, match="transform exploded"):
            env.reset(seed=0)
            env.step(0)
    finally:
        env.close()
        env.close()
    assert _no_pipeline_threads()


def test_process_workers_are_gone_after_close(tiny) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    env = InTuneLiveEnv(**tiny, process_stages=("transform",))
    try:
        env.reset(seed=0)
        env.step(4)  # a second transform worker process
        pids = env.pipeline.worker_pids()
        assert len(pids) == 2
    finally:
        env.close()
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after <= before
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in pids)


@pytest.mark.parametrize("arg", ["gpu_rate", "control_interval_s", "read_latency_ms",
                                 "memory_budget_mib"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), "abc"])
def test_numeric_arguments_must_be_finite(tiny, arg: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{arg} must be a"):
        InTuneLiveEnv(**{**tiny, arg: value})
    assert _no_pipeline_threads()


def test_explicit_start_that_cannot_fit_the_budget_is_refused(tiny) -> None:
    # Three shuffle workers holding 10**6 samples each need ~770 MiB: over a 600 MiB budget.
    big = {**tiny, "shuffle_buffer": 10**6, "memory_budget_mib": 600.0}
    with pytest.raises(ValueError, match=r"initial_allocation \[1, 1, 2, 1, 1\] needs about "
                                         r"\d+ MiB once warm \(base \d+ MiB, workers .*shuffle "
                                         r"\d+ MiB.*memory budget is 600 MiB"):
        InTuneLiveEnv(**big, initial_allocation=[1, 1, 2, 1, 1])
    env = InTuneLiveEnv(**big)  # the default start is not refused
    try:
        with pytest.raises(ValueError, match=r'options\["allocation"\] .* needs about'):
            env.reset(seed=0, options={"allocation": [1, 1, 2, 1, 1]})
        assert env.pipeline is None  # nothing started
    finally:
        env.close()


def test_the_start_check_counts_worker_processes_not_only_shuffle_buffers(tiny) -> None:
    # Small shuffle buffers; two transform workers as processes (an interpreter each)
    # do not fit 40 MiB above what this process uses: refused before anything starts.
    cfg = {**tiny, "process_stages": ("transform",), "memory_budget_mib":
           tree_rss() / 2**20 + 40}
    with pytest.raises(ValueError, match=r"needs about \d+ MiB once warm .*workers 6\d MiB"):
        InTuneLiveEnv(**cfg, initial_allocation=[1, 1, 1, 2, 1])
    assert _no_pipeline_threads()
    # the same allocation as threads fits: only the process workers' memory differs
    threads = InTuneLiveEnv(**{**cfg, "process_stages": ()}, initial_allocation=[1, 1, 1, 2, 1])
    threads.close()


def test_memory_need_is_the_pipelines_own_model(tiny) -> None:
    """The start check and the pipeline share one model: its preallocated staging slots,
    buffer capacities and per-sample sizes are the ones the pipeline really has."""
    from intune_env.live.config import (
        SAMPLE_BYTES,
        STAGING_SAMPLE_BYTES,
        PipelineConfig,
        memory_need,
        staging_slots,
    )
    from intune_env.live.data import DatasetSpec, ensure_dataset
    from intune_env.live.pipeline import LivePipeline

    cfg = PipelineConfig(max_workers=tiny["max_workers"], shuffle_buffer=256,
                         process_stages=("batch",))
    ds = ensure_dataset(DatasetSpec(n_shards=2, rows_per_shard=2048, row_group_size=128),
                        tiny["data_dir"])
    with LivePipeline(ds, cfg, [1, 1, 1, 1, 1]) as pipe:
        slots = len(pipe._slots) + 1  # + the consumer's device tensor
        batch = pipe.buffers[1].get(lambda: False)  # the batch stage's output, row-major
        assert pipe.counters().buffer_capacities == tuple(q * 128 for q in cfg.queue_batches)
    assert slots == staging_slots(cfg) + 1
    assert batch.nbytes == 128 * SAMPLE_BYTES
    need = memory_need(cfg, 128, [2, 1, 3, 1, 1], base_bytes=5)
    assert need.base == 5 and need.shuffle == 3 * 256 * SAMPLE_BYTES
    assert need.staging == slots * 128 * STAGING_SAMPLE_BYTES
    assert need.buffers == sum(cfg.queue_batches[:-1]) * 128 * SAMPLE_BYTES
    assert need.workers == 8 * 128 * SAMPLE_BYTES + 32 * 2**20  # one batch process
    assert need.total == sum((need.base, need.workers, need.shuffle, need.buffers,
                              need.staging))


def test_live_defaults_have_one_source() -> None:
    """gpu_rate, control interval and budgets: every entry point reads live.config."""
    import inspect

    from intune_env.live import calibrate as cal
    from intune_env.live import cli
    from intune_env.live import config as live

    env_defaults = {k: p.default for k, p in
                    inspect.signature(InTuneLiveEnv.__init__).parameters.items()}
    setup = cal.LiveSetup()
    assert pl.PipelineConfig().gpu_rate == setup.gpu_rate == env_defaults["gpu_rate"] \
        == live.GPU_RATE
    assert setup.control_interval_s == env_defaults["control_interval_s"] \
        == live.CONTROL_INTERVAL_S
    assert setup.read_latency_ms == env_defaults["read_latency_ms"] == live.READ_LATENCY_MS
    assert setup.memory_budget_mib == live.MEMORY_BUDGET_MIB
    assert tuple(setup.max_workers) == live.DEFAULT_MAX_WORKERS
    options = {p.name: p.default for p in cli.calibrate.params}
    assert options["gpu_rate"] == live.GPU_RATE
    assert options["memory_budget_mib"] == live.MEMORY_BUDGET_MIB
    assert cli.STAGES == live.STAGES


@pytest.mark.parametrize(("content", "expected"), [
    ("[1, 2]", "must hold an object"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (b"\xff\xfe\x00", "not UTF-8"),
    ("{not json", "cannot read sweep JSON"),
    (None, "regular file"),  # a FIFO: must not hang
])
def test_oracle_file_faults_are_one_line(tiny, tmp_path, content, expected) -> None:
    import os

    path = tmp_path / "sweep.json"
    if content is None:
        os.mkfifo(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=expected) as err:
        InTuneLiveEnv(**tiny, oracle=str(path))
    assert "\n" not in str(err.value) and len(str(err.value)) < 300
