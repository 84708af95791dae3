"""The PNGs of ``OUT/plots/`` (matplotlib, Agg backend, written atomically).

- ``learning_<scenario>.png``: fraction of the oracle over simulated time per agent
  (mean across seeds, smoothed over 10 steps, with a 95% bootstrap band);
- ``allocation_<scenario>.png``: CPUs per stage over time for the first seed, one panel
  per agent on a shared y scale, with the machine size and the oracle's total;
- ``summary.png``: final fraction of the oracle per scenario and agent (IQM, 95% CI).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agents.compare.grid import _safe
from agents.compare.metrics import BOOTSTRAP_SEED, TARGET
from simulators.fileio import write_bytes_atomic


def _save_fig(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    write_bytes_atomic(path, buf.getvalue())


def _smooth(m: np.ndarray, w: int) -> np.ndarray:
    """Trailing moving average over ``w`` steps (per row)."""
    if m.shape[1] < 2 or w <= 1:
        return m
    c = np.cumsum(np.pad(m, ((0, 0), (1, 0))), axis=1)
    out = np.empty_like(m)
    for j in range(m.shape[1]):
        lo = max(0, j + 1 - w)
        out[:, j] = (c[:, j + 1] - c[:, lo]) / (j + 1 - lo)
    return out


def _learning(plt: Any, sc: str, present: list[str], traces: dict[tuple[str, str, int],
              dict[str, Any]], colours: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    top = 1.0
    for ag in present:
        runs = [v for k, v in sorted(traces.items()) if k[0] == sc and k[1] == ag]
        n = max(max(r["n_steps"], len(r["fraction"])) for r in runs)
        dt = runs[0]["dt"]
        t0 = runs[0]["time_s"][0] if runs[0]["time_s"] else dt
        t = t0 + dt * np.arange(n)
        m = np.zeros((len(runs), n))  # after a crash the job produces nothing: 0
        for i, r in enumerate(runs):
            f = np.array([0.0 if x is None else x for x in r["fraction"]])
            m[i, :len(f)] = f
        m = _smooth(m, 10)
        mean = m.mean(axis=0)
        top = max(top, float(mean.max()) if mean.size else 0.0)
        ax.plot(t, mean, label=f"{ag} ({len(runs)} seeds)", color=colours[ag], lw=1.4)
        if len(runs) > 1:
            rng = np.random.default_rng(BOOTSTRAP_SEED)
            idx = rng.integers(0, len(runs), size=(500, len(runs)))
            boots = m[idx].mean(axis=1)
            lo, hi = np.quantile(boots, [0.025, 0.975], axis=0)
            ax.fill_between(t, lo, hi, color=colours[ag], alpha=0.2, lw=0)
    ax.axhline(TARGET, color="grey", ls=":", lw=1, label=f"{TARGET:.0%} of oracle")
    ax.set(xlabel="simulated time (s)", ylabel="throughput / oracle throughput",
           title=f"{sc}: fraction of the oracle over time (mean over seeds, 95% CI band)",
           ylim=(-0.02, top * 1.04))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    _save_fig(fig, path)
    plt.close(fig)


def _allocation(plt: Any, sc: str, present: list[str], traces: dict[tuple[str, str, int],
                dict[str, Any]], path: Path) -> None:
    fig, axes = plt.subplots(len(present), 1, figsize=(9, 1.9 * len(present) + 0.8),
                             sharex=True, sharey=True, squeeze=False)
    ymax = 1.0
    handles: list[Any] = []
    for ax, ag in zip(axes[:, 0], present, strict=True):
        first = min(k[2] for k in traces if k[0] == sc and k[1] == ag)
        r = traces[(sc, ag, first)]
        alloc = np.array(r["allocation"], dtype=float)
        if alloc.size:
            ax.stackplot(r["time_s"], alloc.T, labels=r["stage_names"], alpha=0.85)
            ymax = max(ymax, float(alloc.sum(axis=1).max()))
            if r.get("cpus_total"):
                ax.plot(r["time_s"], r["cpus_total"], color="k", lw=1, label="machine CPUs")
                ymax = max(ymax, float(max(r["cpus_total"])))
            if r.get("oracle_allocation"):
                tot = np.sum(r["oracle_allocation"], axis=1)
                ax.plot(r["time_s"], tot, color="k", ls="--", lw=1, label="oracle total")
                ymax = max(ymax, float(tot.max()))
            if not handles:
                handles = ax.get_legend_handles_labels()  # type: ignore[assignment]
        if len(r["time_s"]) < r["n_steps"]:  # the episode ended early: out of memory
            end = r["time_s"][-1] if r["time_s"] else 0.0
            ax.text(0.5, 0.5, f"out of memory at {end:.0f} s: the job produced nothing "
                    f"after", transform=ax.transAxes, ha="center", va="center", fontsize=9,
                    color="firebrick")
        # stacked workers can exceed the machine (time-slicing): they are threads
        ax.set_ylabel("threads")
        ax.set_title(f"{ag} (seed {first})", fontsize=9, loc="left")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_ylim(0, ymax * 1.05)
    if handles:
        fig.legend(*handles, loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=8,
                   frameon=False, title="stage")
    axes[-1, 0].set_xlabel("simulated time (s)")
    fig.suptitle(f"{sc}: threads per stage over time (shared y scale)")
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)


def _summary(plt: Any, summary: list[dict[str, Any]], scenarios: Sequence[str],
             agents: Sequence[str], colours: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.3 * len(scenarios) * len(agents)
                                                  + 2.0)), 4.5))
    width = 0.8 / max(1, len(agents))
    top = 0.0
    seeds = sorted({s["n_seeds"] for s in summary})
    for j, ag in enumerate(agents):
        xs, ys, err = [], [], [[], []]
        for i, sc in enumerate(scenarios):
            s = next((s for s in summary if s["scenario"] == sc and s["agent"] == ag), None)
            if s is None:
                continue
            xs.append(i + (j - (len(agents) - 1) / 2) * width)
            ys.append(s["final_fraction_iqm"])
            lo, hi = s["final_fraction_ci95"]
            err[0].append(max(0.0, ys[-1] - lo))
            err[1].append(max(0.0, hi - ys[-1]))
            top = max(top, hi, ys[-1])
            if s["oom_rate"] > 0:
                ax.text(xs[-1], max(ys[-1], hi) + 0.02, f"OOM {s['oom_rate']:.0%}",
                        rotation=90, ha="center", va="bottom", fontsize=7)
        if xs:
            ax.bar(xs, ys, width, yerr=err, label=ag, color=colours[ag], capsize=2)
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.set_xticks(range(len(scenarios)), list(scenarios), rotation=20, ha="right")
    n_seeds = "/".join(str(n) for n in seeds)
    ax.set(ylabel="final fraction of oracle", ylim=(0, max(1.0, top) * 1.08),
           title=f"Final throughput as a fraction of the oracle (last 20% of the episode; "
                 f"IQM over {n_seeds} seeds, 95% bootstrap CI)")
    ax.title.set_fontsize(10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    _save_fig(fig, path)
    plt.close(fig)


def plot_files(scenarios: Sequence[str]) -> list[str]:
    """Names of the PNGs :func:`make_plots` may write for ``scenarios`` (checked up front)."""
    return [f"{kind}_{_safe(sc)}.png" for sc in scenarios
            for kind in ("learning", "allocation")] + ["summary.png"]


def make_plots(plot_dir: Path, traces: dict[tuple[str, str, int], dict[str, Any]],
               summary: list[dict[str, Any]], scenarios: Sequence[str],
               agents: Sequence[str]) -> list[Path]:
    """Learning curves and allocations per scenario, and a summary bar chart (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    colours = {a: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(agents)}
    for sc in scenarios:
        present = [a for a in agents if any(k[0] == sc and k[1] == a for k in traces)]
        if not present:
            continue
        path = plot_dir / f"learning_{_safe(sc)}.png"
        _learning(plt, sc, present, traces, colours, path)
        written.append(path)
        path = plot_dir / f"allocation_{_safe(sc)}.png"
        _allocation(plt, sc, present, traces, path)
        written.append(path)
    if summary:
        path = plot_dir / "summary.png"
        _summary(plt, summary, scenarios, agents, colours, path)
        written.append(path)
    return written
