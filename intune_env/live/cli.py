"""``intune calibrate`` and ``intune live-sweep``: click commands the ``intune`` group attaches.

A user's fault (bad option value, unwritable output) prints one line and exits 2
(:func:`intune_env.cli.fail`). This module imports nothing above ``intune_env``.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import click

from intune_env.cli import fail as _fail

# The stage order of intune_env.live.pipeline.STAGES, repeated here so that attaching
# these commands to ``intune`` does not import pyarrow (checked by a test).
STAGES = ("read", "batch", "shuffle", "transform", "gpu_load")
N_STAGES = len(STAGES)
_DEFAULT_MAX = "16,4,4,4,4"
#: Largest worker budget or pool: the calibrated scenario's machine holds at most this many
#: CPUs (``simulators.scenario.MAX_CPUS``), so a larger one fails only after the measuring.
MAX_LIVE_CPUS = 1024
#: Largest batch: a Parquet shard holds 64 batches, ~280 MB at this size (one shard is
#: generated and read at a time; 1e11 asked numpy for 46.6 TiB).
MAX_BATCH_SIZE = 16384


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        _fail(f"{what}: expected {N_STAGES} comma-separated integers ({', '.join(STAGES)}), "
              f"got {text!r}")
    if len(vals) != N_STAGES or any(not 1 <= v <= MAX_LIVE_CPUS for v in vals):
        _fail(f"{what}: expected {N_STAGES} integers in 1..{MAX_LIVE_CPUS} "
              f"({', '.join(STAGES)}), got {text!r}")
    return vals


def _writable(path: Path, what: str) -> None:
    if not path.parent.exists() or not path.parent.is_dir():
        _fail(f"{what}: folder {path.parent} does not exist")
    if path.exists() and path.is_dir():
        _fail(f"{what}: {path} is a folder")
    try:  # probed now: the live measurements before the write take minutes
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        _fail(f"{what}: {path.parent} is not writable ({err.strerror})")


def _setup(read_latency_ms: float, gpu_rate: float, cpus: int, max_workers: str,
           memory_budget_mib: float, transform_rounds: int, batch_size: int,
           seed: int) -> Any:
    from intune_env.live.calibrate import LiveSetup

    if not 0 <= read_latency_ms < math.inf:
        _fail(f"--read-latency-ms must be finite and >= 0, got {read_latency_ms}")
    if not 0 < gpu_rate < math.inf:
        _fail(f"--gpu-rate must be finite and > 0, got {gpu_rate}")
    if not N_STAGES <= cpus <= MAX_LIVE_CPUS:
        _fail(f"--cpus must be in {N_STAGES}..{MAX_LIVE_CPUS} (one worker per stage, at most "
              f"a scenario's CPUs), got {cpus}")
    if not 0 < memory_budget_mib < math.inf:
        _fail(f"--memory-budget-mib must be finite and > 0, got {memory_budget_mib}")
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        _fail(f"--batch-size must be in 1..{MAX_BATCH_SIZE}, got {batch_size}")
    if transform_rounds < 0:
        _fail(f"--transform-rounds must be >= 0, got {transform_rounds}")
    return LiveSetup(read_latency_ms=read_latency_ms, gpu_rate=gpu_rate, cpus=cpus,
                     max_workers=_ints(max_workers, "--max-workers"),
                     memory_budget_mib=memory_budget_mib, transform_rounds=transform_rounds,
                     batch_size=batch_size, rows_per_shard=batch_size * 64, seed=seed)


def _common(f: Any) -> Any:
    opts = [
        click.option("--read-latency-ms", type=float, default=20.0, show_default=True,
                     help="Emulated storage latency per read request."),
        click.option("--gpu-rate", type=float, default=250_000.0, show_default=True,
                     help="Samples/s the consumer takes at most."),
        click.option("--cpus", type=int, default=16, show_default=True,
                     help="Worker budget (the env's 'CPUs')."),
        click.option("--max-workers", default=_DEFAULT_MAX, show_default=True,
                     help="Largest pool per stage, comma-separated."),
        click.option("--memory-budget-mib", type=float, default=2048.0, show_default=True),
        click.option("--transform-rounds", type=int, default=4, show_default=True),
        click.option("--batch-size", type=int, default=512, show_default=True),
        click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                     help="Where the Parquet shards are generated once."),
        click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0,
                     show_default=True),
        click.option("--warmup-s", type=float, default=None,
                     help="Seconds to settle after each change."),
        click.option("--measure-s", type=float, default=None,
                     help="Seconds measured per allocation."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _check_times(warmup_s: float | None, measure_s: float | None) -> None:
    if warmup_s is not None and not 0 <= warmup_s < math.inf:
        _fail(f"--warmup-s must be finite and >= 0, got {warmup_s}")
    if measure_s is not None and not 0 < measure_s < math.inf:
        _fail(f"--measure-s must be finite and > 0, got {measure_s}")


@click.command("calibrate")
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True,
              help="Scenario YAML to write.")
@click.option("--quick", is_flag=True, help="Fewer allocations, shorter measurements.")
@click.option("--report", type=click.Path(dir_okay=False), default=None,
              help="Also write every measurement and prediction as JSON.")
@click.option("--holdout", type=int, default=4, show_default=True,
              help="Allocations held out to test the fitted simulator.")
@_common
def calibrate(out: str, quick: bool, report: str | None, holdout: int, read_latency_ms: float,
              gpu_rate: float, cpus: int, max_workers: str, memory_budget_mib: float,
              transform_rounds: int, batch_size: int, data_dir: str | None, seed: int,
              warmup_s: float | None, measure_s: float | None) -> None:
    """Fit a simulator scenario to the live pipeline and report its prediction error."""
    from intune_env.live import calibrate as cal
    from intune_env.live.pipeline import PipelineError

    setup = _setup(read_latency_ms, gpu_rate, cpus, max_workers, memory_budget_mib,
                   transform_rounds, batch_size, seed)
    _check_times(warmup_s, measure_s)
    if holdout < 1:
        _fail(f"--holdout must be >= 1, got {holdout}")
    out_path = Path(out)
    _writable(out_path, "--out")
    if report:
        _writable(Path(report), "--report")

    def show(label: str, m: Any) -> None:
        click.echo(f"  {label:<9}{m.allocation!s:<20}{m.throughput:>10.0f} samples/s  "
                   f"util {' '.join(f'{u:.2f}' for u in m.utilisation)}", err=True)

    try:
        rep = cal.calibrate(setup, quick=quick, warmup_s=warmup_s, measure_s=measure_s,
                            n_holdout=holdout, data_dir=data_dir, progress=show)
    except (ValueError, RuntimeError, PipelineError) as err:
        _fail(str(err))
    header = (f"Written by `intune calibrate`; mean absolute error at {len(rep.holdout)} "
              f"held-out allocations: {rep.mean_abs_error_pct:.1f}%")
    cal.write_scenario(rep.scenario, out_path, header=header)
    if report:
        cal.save_json(rep.to_dict(), report)
    click.echo(rep.table())
    click.echo(f"scenario written to {out_path}")


@click.command("live-sweep")
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True,
              help="Sweep JSON to write (the env's `oracle` accepts it).")
@click.option("--grid", "grid_max", default=None,
              help="Largest workers per stage in the sweep, e.g. 10,2,1,2,1 "
                   "(default: --max-workers).")
@_common
def live_sweep(out: str, grid_max: str | None, read_latency_ms: float, gpu_rate: float,
               cpus: int, max_workers: str, memory_budget_mib: float, transform_rounds: int,
               batch_size: int, data_dir: str | None, seed: int, warmup_s: float | None,
               measure_s: float | None) -> None:
    """Measure every static allocation of a grid live; record the best."""
    from intune_env.live import calibrate as cal
    from intune_env.live.pipeline import PipelineError

    setup = _setup(read_latency_ms, gpu_rate, cpus, max_workers, memory_budget_mib,
                   transform_rounds, batch_size, seed)
    _check_times(warmup_s, measure_s)
    out_path = Path(out)
    _writable(out_path, "--out")
    allocs = cal.grid(setup, _ints(grid_max, "--grid") if grid_max else None)
    if len(allocs) > 400:
        _fail(f"the grid has {len(allocs)} allocations; bound it with --grid (at most 400)")
    click.echo(f"sweeping {len(allocs)} allocations", err=True)

    def show(m: Any) -> None:
        click.echo(f"  {m.allocation!s:<20}{m.throughput:>10.0f} samples/s", err=True)

    try:
        result = cal.sweep(setup, allocs, warmup_s=1.0 if warmup_s is None else warmup_s,
                           measure_s=2.0 if measure_s is None else measure_s,
                           data_dir=data_dir, progress=show)
    except (ValueError, RuntimeError, PipelineError) as err:
        _fail(str(err))
    cal.save_json(result, out_path)
    best = result["best"]
    click.echo(f"best static allocation {best['allocation']}: {best['throughput']:.0f} "
               f"samples/s; written to {out_path}")
