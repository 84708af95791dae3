"""``runs.csv``, ``summary.json`` and ``summary.md`` (all written atomically)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agents.compare.grid import RUN_COLUMNS
from agents.compare.metrics import BOOTSTRAP_SEED, N_BOOTSTRAP
from simulators.fileio import write_json_atomic, write_text_atomic

#: What the columns of ``summary.md`` mean (printed under the tables).
LEGEND = (
    "Columns: **final fraction** = throughput / oracle throughput, averaged over the last "
    "20% of each episode, interquartile mean (IQM) across seeds; **95% CI** = percentile "
    "bootstrap of that IQM; **OOM rate** = share of seeds whose job ran out of memory "
    "(it then produces nothing, counted as 0); **t90** = median simulated seconds until "
    "throughput stays >= 0.9 of the oracle ('never' if it does not for most seeds); "
    "**memory** = the pipeline's memory in use / the memory available to it "
    "(``memory_bytes / memory_capacity_bytes`` of the env's info), averaged over the "
    "steps that ran (above 1.00 the job runs out of memory); **x autotune** = final "
    "throughput relative to AUTOTUNE on the same seeds ('-': AUTOTUNE was not run or "
    "produced nothing, e.g. it ran out of memory)."
)


def run_row(res: dict[str, Any]) -> dict[str, Any]:
    """The ``runs.csv`` row of a result (trace left out)."""
    return {c: res.get(c) for c in RUN_COLUMNS}


def write_runs_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(RUN_COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in RUN_COLUMNS})
    write_text_atomic(path, buf.getvalue())


def write_summary(out: Path, summary: list[dict[str, Any]], scenarios: Sequence[str],
                  agents: Sequence[str], rows: list[dict[str, Any]]) -> None:
    """``summary.json`` and ``summary.md``."""
    meta = {"metric": "final_fraction = mean throughput/oracle over the last 20% of the "
                      "episode", "statistic": "interquartile mean across seeds",
            "ci": f"95% percentile bootstrap, {N_BOOTSTRAP} resamples, seed {BOOTSTRAP_SEED}",
            "memory": "mean memory in use / machine memory capacity over the episode",
            "ratio_to_autotune": "mean final throughput / autotune's, same seeds"}
    write_json_atomic(out / "summary.json", {"scenarios": list(scenarios),
                                             "agents": list(agents), "n_runs": len(rows),
                                             "about": meta, "rows": summary})
    lines = ["# intune compare: summary", "", f"{len(rows)} runs.", ""]
    for sc in scenarios:
        srows = [s for s in summary if s["scenario"] == sc]
        if not srows:
            continue
        lines += [f"## {sc}", "",
                  "| agent | seeds | final fraction (IQM) | 95% CI | OOM rate | t90 (s) "
                  "| memory | x autotune |",
                  "|---|---:|---:|---|---:|---:|---:|---:|"]
        for s in srows:
            lo, hi = s["final_fraction_ci95"]
            t90 = "never" if s["median_time_to_90_s"] is None \
                else f"{s['median_time_to_90_s']:.0f}"
            ratio = "-" if s["throughput_ratio_to_autotune"] is None \
                else f"{s['throughput_ratio_to_autotune']:.2f}"
            lines.append(f"| {s['agent']} | {s['n_seeds']} | {s['final_fraction_iqm']:.3f} | "
                         f"[{lo:.3f}, {hi:.3f}] | {s['oom_rate']:.2f} | {t90} | "
                         f"{s['mean_memory_fraction']:.2f} | {ratio} |")
        lines.append("")
    lines += [LEGEND, ""]
    write_text_atomic(out / "summary.md", "\n".join(lines))
