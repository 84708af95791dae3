"""The pipeline dynamics, written once: one compiled step over a batch of pipelines.

:func:`step` advances ``N`` independent copies of one scenario by one control interval
each. Everything lives in arrays shaped ``(num_envs, n_stages)`` (or ``(num_envs, ...)``),
so the single env calls it with ``N = 1`` and the batched env with ``N`` copies; there
is no other copy of the model in the package. It is plain loops compiled by numba
(``@njit(cache=True)``: the first run in a fresh install compiles for a few seconds and
caches the machine code next to this file; later processes load it).

One interval of one pipeline (the model of ``simulators.pipeline``):

1. the action (0: nothing, ``1..n``: +1 CPU on stage ``a - 1``, ``n+1..2n``: -1 CPU on
   stage ``a - n - 1``) is applied if :func:`move_is_valid`, under the conditions in force
   before this interval;
2. events due by now (``time = steps * dt``) move the pipeline along its chain of
   conditions (tables are per conditions, see ``tables`` below);
3. stage ``i`` may process ``c_i = int(capacity_i(k_i) * share * z_i * dt)`` samples,
   ``share`` the time-slicing factor (:func:`oversubscription_share`) and
   ``z_i = 1 + noise_cv * sqrt(3) * (2u - 1)`` with ``u`` uniform on [0, 1) from the
   counter-based hash :func:`uniform` of (episode seed, step, stage);
4. forward, what each stage can get: ``S_0 = c_0``, ``S_i = min(c_i, b_{i-1} + S_{i-1})``;
   the trainer takes ``G = min(gpu_rate * dt, b_{n-1} + S_{n-1})``; backward, what fits
   downstream: ``P_i = max(0, min(S_i, B_i - b_i + P_{i+1}))`` with ``P_n = G``;
5. buffers ``b_i += P_i - P_{i+1}``; memory ``fixed + sum_i(workers_i(k_i) + b_i *
   element_bytes_i)``, out of memory (sticky) above the capacity;
6. observation (:func:`write_observation`), reward and the action mask of the new state.

Helpers are inlined into :func:`advance` (``inline="always"``: a call passing array structs
costs more than the helper) and remain callable from Python, where ``intune_env.common``
uses them, so the action mask, observation, reward and time-slicing share exist once.

Sample counts are integers (int64), so samples read always equal samples consumed plus
samples in buffers. Noise needs no generator state: a draw is a pure function of its
counters, so sub-env ``i`` of a batch equals a single env with the same episode seed by
construction, whatever the other sub-envs do.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# --- observation bounds (``intune_env.common`` documents and re-exports them) -----------
#: Machines are normalised by this many CPUs in the last observation feature.
CPU_NORM = 128.0
SHARE_MAX = 4.0
MEMORY_MAX = 2.0
FREE_MIN = -4.0
MACHINE_MAX = 8.0

#: Uniform noise on [-1, 1) scaled by this has standard deviation 1.
NOISE_SCALE = 3.0 ** 0.5

# --- column layouts ---------------------------------------------------------------------
#: ``control[e]``: apply ``actions[e]`` then step; step without an action (the first
#: interval after a reset); leave sub-env ``e`` untouched.
ACT, OBSERVE, SKIP = 0, 1, 2
#: Columns of ``state`` (int64, ``(N, N_STATE)``), one row per pipeline.
STEPS, COND, OOM, INVALID, SEED, CONSUMED, MEMORY, SAMPLES_IN, SAMPLES_OUT, BOTTLENECK = \
    range(10)
N_STATE = 10
#: Rows of ``stage_out`` (int64, ``(N, 3, n)``): last interval's capacity ``c_i``,
#: processed ``P_i`` and the output buffer's capacity ``B_i``.
CAPACITY, PROCESSED, BUFFER_CAP = 0, 1, 2
#: Rows of ``stage_f`` (float64, ``(N, 2, n)``): utilisation ``P_i / c_i`` and busy seconds.
UTILISATION, BUSY_S = 0, 1
#: Rows of ``tables`` (int64, ``(C, 3, n, W)``), indexed by conditions, stage and CPUs.
WORKERS, BUFFERS, ELEMENT_BYTES = 0, 1, 2
#: Columns of ``cond_i`` (int64, ``(C, 5)``) and ``cond_f`` (float64, ``(C, 2)``).
CPUS, MEM_CAP, MEM_FIXED, GPU_CAP, FIRST_STEP = range(5)
GPU_RATE, OVERHEAD = 0, 1
#: Entries of ``params`` (float64). ``DIAGNOSTICS`` non-zero: write ``stage_out``,
#: ``stage_f`` and the ``BOTTLENECK`` column (info only; 0 skips ~25 stores per pipeline).
DT, NOISE_CV, W_THROUGHPUT, W_MEMORY, OOM_PENALTY, DIAGNOSTICS = range(6)
N_PARAMS = 6

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_STRIDE = np.uint64(256)  # stages per step in the counter (at most 255 stages)
_TO_UNIT = 2.0 ** -53


@njit(cache=True, inline="always")
def splitmix64(x: np.uint64) -> np.uint64:
    """The splitmix64 finaliser (Steele, Lea, Flood 2014): a bijective 64-bit mix."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@njit(cache=True, inline="always")
def uniform(seed: np.uint64, step: int, stage: int) -> float:
    """Uniform on [0, 1) (53 bits) for (episode seed, step, stage): a counter-based draw.

    SplitMix64's ``m``-th output for ``seed`` is ``splitmix64(seed + m * golden)``, so a
    draw is the ``(256 * step + stage)``-th output of SplitMix64(seed), computed directly.
    """
    counter = np.uint64(step) * _STRIDE + np.uint64(stage)
    # output number ``counter`` of the SplitMix64 generator seeded with ``seed``
    return float(np.int64(splitmix64(seed + counter * _GOLDEN) >> np.uint64(11))) * _TO_UNIT


@njit(cache=True, inline="always")
def oversubscription_share(total: int, cpus: int, overhead: float) -> float:
    """Fraction of its nominal capacity each stage keeps when ``total`` CPUs share ``cpus``.

    Time-slicing gives every thread ``cpus / total`` of a CPU; context switches cost a
    further ``overhead`` per 100% of oversubscription.
    """
    if total <= cpus:
        return 1.0
    return (cpus / total) / (1.0 + overhead * (total / cpus - 1.0))


@njit(cache=True, inline="always")
def move_is_valid(cpus_of_stage: int, max_cpus_of_stage: int, total: int, machine_cpus: int,
                  delta: int) -> bool:
    """Whether ``delta`` CPUs on a stage are accepted: ``1 <= cpus <= max_cpus``, and an
    addition needs a free CPU (``total < machine_cpus``).

    Bitwise, not short-circuit: random actions make branches here unpredictable, and a
    mispredicted branch costs more than the three comparisons."""
    new = cpus_of_stage + delta
    return (((delta < 0) & (new >= 1)) | (delta == 0) |
            ((delta > 0) & (new <= max_cpus_of_stage) & (total < machine_cpus)))


@njit(cache=True, inline="always")
def write_action_mask(out: np.ndarray, e: int, alloc: np.ndarray, total: int,
                      max_cpus: np.ndarray, machine_cpus: int) -> None:
    """Valid actions of row ``e`` of ``alloc`` (``total`` CPUs in all) into row ``e`` of
    ``out`` (bool, ``2n + 1`` wide; see :func:`move_is_valid`). Rows, not views: a view
    costs reference counting."""
    n = alloc.shape[1]
    out[e, 0] = True
    for i in range(n):
        out[e, 1 + i] = move_is_valid(alloc[e, i], max_cpus[i], total, machine_cpus, 1)
        out[e, 1 + n + i] = move_is_valid(alloc[e, i], max_cpus[i], total, machine_cpus, -1)


@njit(cache=True, inline="always")
def write_observation(out: np.ndarray, e: int, alloc: np.ndarray, total: int,
                      utilisation: np.ndarray, fill: np.ndarray, memory_fraction: float,
                      throughput_fraction: float, machine_cpus: int) -> None:
    """The clipped observation (layout in ``intune_env.common``) of row ``e`` of ``alloc``
    (``total`` CPUs in all, per-stage ``utilisation`` and ``fill``) into row ``e`` of
    ``out`` (float32)."""
    n = alloc.shape[1]
    c = float(machine_cpus)
    per_cpu = 1.0 / c  # one division, not one per stage (divisions dominate this function)
    for i in range(n):
        out[e, i] = min(alloc[e, i] * per_cpu, SHARE_MAX)
        out[e, n + i] = min(max(utilisation[i], 0.0), 1.0)
        out[e, 2 * n + i] = min(max(fill[i], 0.0), 1.0)
    out[e, 3 * n] = min(max(memory_fraction, 0.0), MEMORY_MAX)
    out[e, 3 * n + 1] = min(max(throughput_fraction, 0.0), 1.0)
    out[e, 3 * n + 2] = min(max((c - total) * per_cpu, FREE_MIN), 1.0)
    out[e, 3 * n + 3] = min(c / CPU_NORM, MACHINE_MAX)


@njit(cache=True, inline="always")
def reward_value(throughput_fraction: float, memory_fraction: float, oom: bool,
                 w_throughput: float, w_memory: float, oom_penalty: float) -> float:
    """``w_t * throughput/gpu_rate - w_m * memory/capacity``; ``-oom_penalty`` on a crash."""
    if oom:
        return -oom_penalty
    return w_throughput * throughput_fraction - w_memory * memory_fraction


@njit(cache=True)
def advance(lo: int, hi: int, actions: np.ndarray, control: np.ndarray, k: np.ndarray,
            b: np.ndarray, st: np.ndarray, stage_out: np.ndarray, stage_f: np.ndarray,
            obs: np.ndarray, reward: np.ndarray, mask: np.ndarray, capacity: np.ndarray,
            tables: np.ndarray, cond_i: np.ndarray, cond_f: np.ndarray, max_cpus: np.ndarray,
            params: np.ndarray) -> None:
    """One control interval of pipelines ``lo <= e < hi`` with ``control[e] != SKIP``
    (steps 1-6 of the module docstring; actions already checked): the dynamics, written
    once, called by both drivers, :func:`step` (all rows) and :func:`step_parallel` (one
    chunk per task). A plain call (its cost is paid once per call, not per pipeline), so
    the loop and its scratch arrays exist once.
    """
    n = k.shape[1]
    n_cond = cond_i.shape[0]
    dt, spread = params[DT], params[NOISE_CV] * NOISE_SCALE
    diag = params[DIAGNOSTICS] != 0.0
    c = np.empty(n, np.int64)
    supply = np.empty(n, np.int64)
    util = np.empty(n)
    fill = np.empty(n)
    # 3's noise first, for all rows at once: a loop of pure arithmetic over contiguous
    # arrays, which the compiler vectorises (a few times cheaper than one draw at a time)
    m = hi - lo
    z = np.ones((n, m))
    if spread != 0.0:
        seeds = np.empty(m, np.uint64)
        step_of = np.empty(m, np.int64)
        for r in range(m):
            seeds[r] = np.uint64(st[lo + r, SEED])
            step_of[r] = st[lo + r, STEPS]
        for i in range(n):
            for r in range(m):
                z[i, r] = 1.0 + spread * (2.0 * uniform(seeds[r], step_of[r], i) - 1.0)
    # Rows are indexed as [e, i], never taken as views (a view costs reference counting).
    for e in range(lo, hi):
        if control[e] == SKIP:
            continue
        j = st[e, COND]
        total = 0
        for i in range(n):
            total += k[e, i]
        # 1. the action, under the conditions before this interval's events
        # (selects, not branches: random actions would make branches unpredictable)
        a = actions[e]
        act = (control[e] == ACT) & (a != 0)
        add = a <= n
        i = (a - 1 if add else a - n - 1) if act else 0
        delta = 1 if add else -1
        ok = act & move_is_valid(k[e, i], max_cpus[i], total, cond_i[j, CPUS], delta)
        d = delta if ok else 0
        k[e, i] += d
        total += d
        st[e, INVALID] = act & (not ok)
        # 2. events due by now
        steps = st[e, STEPS]
        while j + 1 < n_cond and cond_i[j + 1, FIRST_STEP] <= steps:
            j += 1
        st[e, COND] = j
        cpus = cond_i[j, CPUS]
        # 3. capacity this interval: time-slicing and counter-based noise
        share = oversubscription_share(total, cpus, cond_f[j, OVERHEAD])
        for i in range(n):
            c[i] = int(capacity[j, i, k[e, i]] * share * z[i, e - lo] * dt)
        # 4. forward pass (what each stage can get), then backward (what fits downstream)
        supply[0] = c[0]
        for i in range(1, n):
            supply[i] = min(c[i], b[e, i - 1] + supply[i - 1])
        g = min(cond_i[j, GPU_CAP], b[e, n - 1] + supply[n - 1])
        # 5. buffers and memory
        mem = cond_i[j, MEM_FIXED]
        nxt = g
        for i in range(n - 1, -1, -1):
            ki, bi = k[e, i], b[e, i]  # locals: the compiler cannot tell that stores miss them
            cap_b = tables[j, BUFFERS, i, ki]
            p = max(0, min(supply[i], cap_b - bi + nxt))
            bi += p - nxt
            b[e, i] = bi
            nxt = p
            mem += tables[j, WORKERS, i, ki] + bi * tables[j, ELEMENT_BYTES, i, 0]
            util[i] = u = p / c[i] if c[i] > 0 else 1.0  # a stage that can do nothing: busy
            fill[i] = bi / cap_b if cap_b > 0 else 1.0  # no room: always full
            if diag:
                stage_out[e, CAPACITY, i] = c[i]
                stage_out[e, PROCESSED, i] = p
                stage_out[e, BUFFER_CAP, i] = cap_b
                stage_f[e, UTILISATION, i] = u
                stage_f[e, BUSY_S, i] = u * ki * dt
        if mem > cond_i[j, MEM_CAP]:
            st[e, OOM] = 1
        st[e, STEPS] = steps + 1
        st[e, CONSUMED] = g
        st[e, MEMORY] = mem
        st[e, SAMPLES_IN] += nxt
        st[e, SAMPLES_OUT] += g
        if diag:
            least = 0
            for i in range(1, n):
                if c[i] < c[least]:
                    least = i
            st[e, BOTTLENECK] = -1 if cond_i[j, GPU_CAP] <= c[least] else least
        # 6. what the agent sees
        m = mem / cond_i[j, MEM_CAP]
        t = (g / dt) / cond_f[j, GPU_RATE]
        write_observation(obs, e, k, total, util, fill, m, t, cpus)
        reward[e] = 0.0 if control[e] == OBSERVE else reward_value(
            t, m, st[e, OOM] != 0, params[W_THROUGHPUT], params[W_MEMORY], params[OOM_PENALTY])
        write_action_mask(mask, e, k, total, max_cpus, cpus)


@njit(cache=True)
def step(actions: np.ndarray, control: np.ndarray, alloc: np.ndarray, buffers: np.ndarray,
         state: np.ndarray, stage_out: np.ndarray, stage_f: np.ndarray, obs: np.ndarray,
         reward: np.ndarray, mask: np.ndarray, capacity: np.ndarray, tables: np.ndarray,
         cond_i: np.ndarray, cond_f: np.ndarray, max_cpus: np.ndarray,
         params: np.ndarray) -> int:
    """One control interval of every pipeline ``e`` with ``control[e] != SKIP``.

    Per-pipeline arrays (updated in place): ``alloc``, ``buffers`` (``(N, n)``), ``state``
    (:data:`N_STATE` columns), outputs ``stage_out``, ``stage_f``, ``obs``, ``reward``,
    ``mask``. Model (read only): ``capacity[j, i, k]`` samples/s and ``tables[j, :, i, k]``
    of stage ``i`` with ``k`` CPUs under conditions ``j``, ``cond_i``/``cond_f`` per
    conditions, ``max_cpus`` and ``params``. Returns -1, or the index of the first
    action outside ``0..2n`` (then nothing has changed).
    """
    num_envs, n = alloc.shape
    for e in range(num_envs):
        if control[e] == ACT and not 0 <= actions[e] <= 2 * n:
            return e
    advance(0, num_envs, actions, control, alloc, buffers, state, stage_out, stage_f, obs,
            reward, mask, capacity, tables, cond_i, cond_f, max_cpus, params)
    return -1


#: Pipelines per task of :func:`step_parallel` (each task has its own scratch arrays).
CHUNK = 128


@njit(cache=True, parallel=True)
def step_parallel(actions: np.ndarray, control: np.ndarray, alloc: np.ndarray,
                  buffers: np.ndarray, state: np.ndarray, stage_out: np.ndarray,
                  stage_f: np.ndarray, obs: np.ndarray, reward: np.ndarray, mask: np.ndarray,
                  capacity: np.ndarray, tables: np.ndarray, cond_i: np.ndarray,
                  cond_f: np.ndarray, max_cpus: np.ndarray, params: np.ndarray) -> int:
    """:func:`step` with chunks of :data:`CHUNK` pipelines spread over numba's threads
    (``prange``; ``numba.set_num_threads`` / ``NUMBA_NUM_THREADS`` bound them).

    Bit-identical to :func:`step`: pipelines share nothing (each writes only its own
    rows; noise is a pure function of its counters) and the arithmetic is the same
    :func:`advance`, without fastmath. Compiled on first use only.
    """
    num_envs, n = alloc.shape
    for e in range(num_envs):
        if control[e] == ACT and not 0 <= actions[e] <= 2 * n:
            return e
    chunks = (num_envs + CHUNK - 1) // CHUNK
    if chunks == 1:  # one task: no threads to start
        advance(0, num_envs, actions, control, alloc, buffers, state, stage_out, stage_f, obs,
                reward, mask, capacity, tables, cond_i, cond_f, max_cpus, params)
        return -1
    for t in prange(chunks):
        advance(t * CHUNK, min(num_envs, (t + 1) * CHUNK), actions, control, alloc, buffers,
                state, stage_out, stage_f, obs, reward, mask, capacity, tables, cond_i, cond_f,
                max_cpus, params)
    return -1
