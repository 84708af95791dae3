"""Live tuning benchmark: calibrate, pretrain in simulation, sweep live, deploy live.

    .venv/bin/python benchmarks/live_tuning.py [--out runs/live] [--deploy-s 300]

On this machine (2 cores), in an I/O-latency-bound configuration (20 ms per read request
of 512 samples, so one reader delivers at most ~25k samples/s and readers scale far past
the core count until the CPU-bound stages and the GIL saturate):

1. ``calibrate`` the simulator against the live pipeline (scenario YAML + held-out error);
2. pretrain the Q-learning agent in that calibrated simulation, starting from the shipped
   table (``agents/pretrained/qtable.json``);
3. exhaustive live sweep of the static allocations of a bounded grid; the best few are
   re-measured longer, and the best re-measured mean is the reference ("best static");
4. deploy each tuner live for ``--deploy-s`` seconds from one worker per stage: the
   pretrained Q-learning agent (learning online, as InTune deploys it) and the AUTOTUNE-like
   tuner; report the fraction of best static reached (mean of the last 60 s) and the time
   until the 10-s trailing mean first reaches 0.9 of best static.

Results go to ``OUT/results.json`` and a markdown table on stdout. Not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import intune_env  # noqa: E402, F401  (registers the envs)
from agents.autotune import AutotuneAgent  # noqa: E402
from agents.base import Agent, apply, run_episode  # noqa: E402
from agents.qlearning import QLearningAgent  # noqa: E402
from intune_env.live import calibrate as cal  # noqa: E402
from intune_env.live_env import InTuneLiveEnv  # noqa: E402

# The live defaults (intune_env.live.config: gpu_rate, control interval, read latency,
# memory budget) on a smaller worker budget and pools, so the 2-core benchmark machine
# has a best split to find.
SETUP = cal.LiveSetup(cpus=12, max_workers=(8, 2, 2, 2, 2), seed=0)
START = [1, 1, 1, 1, 1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def calibrate_step(out: Path, data_dir: str | None) -> Path:
    path = out / "calibrated.yaml"
    rep = cal.calibrate(SETUP, quick=False, warmup_s=1.0, measure_s=2.0, n_holdout=5,
                        data_dir=data_dir,
                        progress=lambda label, m: log(f"calibrate {label} {m.allocation} "
                                                      f"{m.throughput:.0f}/s"))
    cal.write_scenario(rep.scenario, path, header=(
        f"benchmarks/live_tuning.py; held-out mean abs error {rep.mean_abs_error_pct:.1f}%"))
    cal.save_json(rep.to_dict(), out / "calibration.json")
    print(rep.table())
    return path


def pretrain(scenario: Path, out: Path, episodes: int, seed: int) -> Path:
    """Fine-tune the shipped table in the calibrated simulation."""
    agent = QLearningAgent(pretrained=True, seed=seed, epsilon=(0.3, 0.02, episodes * 150),
                           safe_exploration=False)
    env = gym.make("InTune-v0", scenario=str(scenario), start_allocation="min")
    rng = np.random.default_rng(seed)
    fracs = []
    for ep in range(episodes):
        start = [int(rng.integers(1, hi + 1)) for hi in SETUP.max_workers]
        while sum(start) > SETUP.cpus:
            start[int(np.argmax(start))] -= 1
        trace = run_episode(env, agent, seed=seed + ep, max_steps=200,
                            options={"allocation": start})
        fracs.append(float(np.nanmean(trace.fraction[-50:])))
    env.close()
    log(f"pretrain: {episodes} simulated episodes, last 10 mean fraction of the "
        f"simulated oracle {np.mean(fracs[-10:]):.3f}")
    path = agent.save(out / "qtable-calibrated.json")
    return path


def sweep_step(out: Path, data_dir: str | None, grid_max: list[int], warmup_s: float,
               measure_s: float, top: int, remeasure_s: float) -> dict[str, Any]:
    allocs = cal.grid(SETUP, grid_max)
    log(f"sweep: {len(allocs)} allocations x {warmup_s + measure_s:g} s")
    res = cal.sweep(SETUP, allocs, warmup_s=warmup_s, measure_s=measure_s, data_dir=data_dir,
                    progress=lambda m: log(f"sweep {m.allocation} {m.throughput:.0f}/s"))
    ranked = sorted(res["results"], key=lambda r: -r["throughput"])[:top]
    # The max of many noisy measurements is biased upward: re-measure the leaders,
    # interleaved (three rounds), and take the best mean as the reference.
    again: dict[tuple[int, ...], list[float]] = {tuple(r["allocation"]): [] for r in ranked}
    for _ in range(3):
        ms = cal.measure(SETUP, [list(a) for a in again], warmup_s=warmup_s,
                         measure_s=remeasure_s, data_dir=data_dir)
        for m in ms:
            again[tuple(m.allocation)].append(m.throughput)
    means = {a: float(np.mean(v)) for a, v in again.items()}
    best = max(means, key=means.__getitem__)
    res["remeasured"] = [{"allocation": list(a), "throughputs": v, "mean": means[a]}
                         for a, v in again.items()]
    res["best"] = {"throughput": means[best], "allocation": list(best)}
    cal.save_json(res, out / "sweep.json")
    log(f"best static {list(best)}: {means[best]:.0f}/s")
    return res


def deploy(agent: Agent, name: str, best: dict[str, Any], seconds: float,
           data_dir: str | None) -> dict[str, Any]:
    kwargs = SETUP.env_kwargs()
    env = InTuneLiveEnv(**kwargs, oracle=best, data_dir=data_dir)
    # Other processes share the 2 cores; record how busy the machine was.
    load0 = os.getloadavg()[0]
    t: list[float] = []
    thr: list[float] = []
    allocs: list[list[int]] = []
    try:
        obs, info = env.reset(seed=0, options={"allocation": START})
        agent.reset(obs, info)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            choice = agent.act(obs, info)
            nobs, rew, term, trunc, ninfo = env.step(apply(env, choice))
            agent.observe(obs, choice, float(rew), nobs, ninfo, term, trunc)
            t.append(time.perf_counter() - t0)
            thr.append(float(ninfo["throughput"]))
            allocs.append(list(ninfo["allocation"]))
            obs, info = nobs, ninfo
            if term:
                log(f"{name}: out of memory at {t[-1]:.0f} s")
                break
    finally:
        env.close()
    run = {"agent": name, "throughput": thr, "time_s": t, "allocation": allocs,
           "load_average_1m": [load0, os.getloadavg()[0]]}
    run.update(summarise(run, float(best["throughput"])))
    return run


def summarise(run: dict[str, Any], best: float) -> dict[str, Any]:
    """Fractions of best static: last 60 s, and from first reaching 0.9 to the end."""
    frac = np.asarray(run["throughput"]) / best
    tt = np.asarray(run["time_s"])
    last = frac[tt >= tt[-1] - 60.0]
    trailing = np.array([frac[max(0, i - 9):i + 1].mean() for i in range(len(frac))])
    hit = np.flatnonzero(trailing >= 0.9)
    return {
        "seconds": float(tt[-1]),
        "steps": len(frac),
        "fraction_last_60s": float(last.mean()),
        "fraction_after_0.9": float(frac[hit[0]:].mean()) if len(hit) else None,
        "time_to_0.9_s": float(tt[hit[0]]) if len(hit) else None,
        "final_allocation": run["allocation"][-1],
        "workers_final": int(sum(run["allocation"][-1])),
    }


def print_table(results: dict[str, Any]) -> None:
    best = results["best_static"]
    print(f"\nBest static allocation (exhaustive live sweep of {results['sweep_size']} "
          f"allocations, leaders re-measured): {best['allocation']} at "
          f"{best['throughput']:.0f} samples/s. Simulator calibration error at held-out "
          f"allocations: {results.get('calibration_error_pct', float('nan')):.1f}%.\n")
    print("| tuner | fraction of best static, last 60 s | from reaching 0.9 to the end | "
          "time to 0.9 (10-s mean) | final allocation (workers) | load avg 1 min |")
    print("|---|---|---|---|---|---|")
    for r in results["runs"]:
        s = summarise(r, float(best["throughput"]))
        tt = "never" if s["time_to_0.9_s"] is None else f"{s['time_to_0.9_s']:.0f} s"
        after = "-" if s["fraction_after_0.9"] is None else f"{s['fraction_after_0.9']:.3f}"
        load = r.get("load_average_1m", [float("nan")] * 2)
        print(f"| {r['agent']} | {s['fraction_last_60s']:.3f} | {after} | {tt} | "
              f"{s['final_allocation']} ({s['workers_final']}) | "
              f"{load[0]:.1f} -> {load[1]:.1f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/live")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--deploy-s", type=float, default=300.0)
    ap.add_argument("--pretrain-episodes", type=int, default=60)
    ap.add_argument("--grid", default="8,2,2,2,2",
                    help="largest workers per stage in the exhaustive sweep")
    ap.add_argument("--warmup-s", type=float, default=1.0)
    ap.add_argument("--measure-s", type=float, default=2.0)
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--remeasure-s", type=float, default=3.0)
    ap.add_argument("--reuse", action="store_true",
                    help="reuse calibrated.yaml and sweep.json from --out if present")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table-only", action="store_true",
                    help="print the table of OUT/results.json and exit")
    args = ap.parse_args()
    if args.table_only:
        results = json.loads((Path(args.out) / "results.json").read_text())
        cal_json = Path(args.out) / "calibration.json"
        if "calibration_error_pct" not in results and cal_json.exists():
            results["calibration_error_pct"] = json.loads(cal_json.read_text())[
                "mean_abs_error_pct"]
        print_table(results)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid_max = [int(v) for v in args.grid.split(",")]

    t_start = time.perf_counter()
    scenario = out / "calibrated.yaml"
    if not (args.reuse and scenario.exists()):
        scenario = calibrate_step(out, args.data_dir)
    table = pretrain(scenario, out, args.pretrain_episodes, args.seed)
    sweep_path = out / "sweep.json"
    if args.reuse and sweep_path.exists():
        sweep = json.loads(sweep_path.read_text())
    else:
        sweep = sweep_step(out, args.data_dir, grid_max, args.warmup_s, args.measure_s,
                           args.top, args.remeasure_s)
    best = sweep["best"]

    runs = []
    for name, agent in (
        ("qlearning (calibrated sim, deployed live)",
         QLearningAgent.load(table, seed=args.seed)),
        ("autotune (max_parallelism)", AutotuneAgent()),
    ):
        log(f"deploying {name} for {args.deploy_s:g} s")
        r = deploy(agent, name, best, args.deploy_s, args.data_dir)
        log(f"{name}: {r['fraction_last_60s']:.3f} of best static, 0.9 at "
            f"{r['time_to_0.9_s']} s, final {r['final_allocation']}")
        runs.append(r)

    cal_json = out / "calibration.json"
    cal_err = json.loads(cal_json.read_text())["mean_abs_error_pct"] if cal_json.exists() \
        else float("nan")
    results = {"setup": asdict(SETUP), "best_static": best,
               "calibration_error_pct": cal_err,
               "sweep_size": len(sweep["results"]), "runs": runs,
               "wall_s": time.perf_counter() - t_start}
    cal.save_json(results, out / "results.json")
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
