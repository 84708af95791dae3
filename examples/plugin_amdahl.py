"""A stage-model plugin: an Amdahl's-law transform, usable from scenario files and the CLI.

A fraction ``s`` of each batch's work is serial (a global lock, a Python-level merge), so
more CPUs help less and less: ``capacity(k) = rate_per_cpu / (s + (1 - s) / k)``.

A scenario file never loads code by itself; ask for the plugin on the command line::

    intune --plugin examples/plugin_amdahl.py scenarios show examples/amdahl_scenario.yaml
    intune --plugin examples/plugin_amdahl.py compare --scenarios examples/amdahl_scenario.yaml \\
        --agents even,qlearning --seeds 1 --out runs/amdahl

An installed package can offer the same module as an entry point instead (loaded at
startup), in its ``pyproject.toml``::

    [project.entry-points."intune.plugins"]
    amdahl = "mypkg.plugin_amdahl"
"""

from __future__ import annotations

from simulators import StageModel, register_stage_model


@register_stage_model
class AmdahlStage(StageModel):
    """capacity(k) = rate_per_cpu / (s + (1 - s) / k), s = params["serial_fraction"]."""

    kind = "amdahl"
    param_names = ("serial_fraction",)

    @classmethod
    def check_params(cls, params: dict[str, float]) -> None:
        """The serial fraction must lie in [0, 1] (0: linear, 1: one CPU's worth)."""
        super().check_params(params)
        s = params["serial_fraction"]
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"kind 'amdahl': serial_fraction must be in [0, 1], got {s}")

    def capacity(self, cpus: int) -> float:
        s = self.params["serial_fraction"]
        return self.rate_per_cpu / (s + (1.0 - s) / cpus)
