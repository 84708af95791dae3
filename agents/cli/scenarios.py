"""``intune scenarios list|show|generate``."""

from __future__ import annotations

from pathlib import Path

import click

from agents.cli.common import OUT_PATH, SEED, fail, load_scenario_or_fail, out_dir
from simulators import builtin_scenarios, load_scenario
from simulators.fileio import echo
from simulators.scenario import GIB


@click.group("scenarios")
def scenarios() -> None:
    """List, inspect and generate scenarios (built-in names or YAML files)."""


@scenarios.command("list")
def scenarios_list() -> None:
    """The built-in scenarios, one line each."""
    for name in builtin_scenarios():
        sc = load_scenario(name)
        m = sc.machine
        events = f"{len(sc.events)} event{'' if len(sc.events) == 1 else 's'}"
        click.echo(f"{name:<18} {m.cpus:>3} CPUs {m.memory_gib:>5g} GiB  "
                   f"{len(sc.stages)} stages  {events:<9} {echo(sc.description, 4096)}")


@scenarios.command("show")
@click.argument("scenario")
def scenarios_show(scenario: str) -> None:
    """Validate SCENARIO (name or YAML file) and show it with its oracle."""
    from simulators import Conditions, oracle

    sc = load_scenario_or_fail(scenario)
    m = sc.machine
    title = echo(sc.name) + (f": {echo(sc.description, 4096)}" if sc.description else "")
    click.echo(title)
    click.echo(f"machine: {m.cpus} CPUs, {m.memory_gib:g} GiB ({m.base_memory_gib:g} GiB base), "
               f"GPU consumes {m.gpu_rate:,.0f} samples/s; interval {sc.control_interval_s:g} s, "
               f"noise cv {sc.noise_cv:g}")
    cond = Conditions.initial(sc)
    best = oracle(cond)
    click.echo(f"{'stage':<12}{'kind':<8}{'rate/cpu':>10}{'max':>5}{'cap':>10}"
               f"{'MiB/cpu':>9}{'KiB/el':>8}{'buffer':>8}{'oracle':>8}")
    for i, st in enumerate(sc.stages):
        cap = "-" if st.bandwidth_cap is None else f"{st.bandwidth_cap:,.0f}"
        click.echo(f"{st.name:<12}{echo(st.kind):<8}{st.rate_per_cpu:>10,.0f}{st.max_cpus:>5}{cap:>10}"
                   f"{st.worker_memory_mib:>9g}{st.element_kib:>8g}{st.buffer:>8}"
                   f"{best.allocation[i]:>8}")
    for st in sc.stages:  # what the table has no column for, where it is set
        extra = [f"{k} {v:g}" for k, v in (("contention", st.contention),
                                            ("buffer_per_cpu", st.buffer_per_cpu),
                                            ("state_mib", st.state_mib)) if v]
        extra += [f"{k}={v:g}" for k, v in st.params.items()]
        if extra:
            click.echo(f"  {st.name}: {', '.join(extra)}")
    click.echo(f"oracle: {best.throughput:,.0f} samples/s with {sum(best.allocation)} threads "
               f"on {m.cpus} CPUs, {best.memory_bytes / GIB:.1f} GiB worst case")
    for ev in sorted(sc.events, key=lambda e: e.at_s):  # in time order, as the simulator
        cond = cond.apply(ev)
        after = oracle(cond)
        change = ", ".join(f"{k}={v}" for k, v in ev.model_dump(exclude_none=True).items())
        click.echo(f"event {change}: oracle {after.throughput:,.0f} samples/s "
                   f"with {list(after.allocation)}")


@scenarios.command("generate")
@click.option("--count", type=int, required=True, help="how many scenarios")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="generator seed (same seed, same files)")
@click.option("--out", "out_path", type=OUT_PATH, required=True,
              help="folder for the YAML files")
def scenarios_generate(count: int, seed: int, out_path: Path) -> None:
    """Write COUNT random, valid DLRM pipeline scenarios as YAML files under OUT."""
    if not 1 <= count <= 100_000:
        fail(f"--count must be between 1 and 100000, got {count}")
    try:
        from simulators.generate import write_scenarios
    except ImportError as err:
        fail(f"scenario generator is not available ({err})")
    with out_dir(out_path):  # removed again, if still empty, when writing fails
        paths = write_scenarios(count, seed, out_path)
    names = "" if not paths else (f" ({paths[0].name})" if len(paths) == 1
                                  else f" ({paths[0].name} ... {paths[-1].name})")
    click.echo(f"wrote {len(paths)} scenario{'' if len(paths) == 1 else 's'} to "
               f"{echo(str(out_path))}{names}")
