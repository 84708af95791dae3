"""Shared fixtures: small scenarios that tests can reason about."""

from __future__ import annotations

from typing import Any

import pytest


def small_scenario(**machine: Any) -> dict[str, Any]:
    """A 3-stage, 6-CPU pipeline whose oracle is easy to check by hand."""
    m = {"cpus": 6, "memory_gib": 8.0, "base_memory_gib": 1.0, "gpu_rate": 100000.0}
    m.update(machine)
    return {
        "name": "small",
        "machine": m,
        "noise_cv": 0.0,
        "stages": [
            {"name": "read", "rate_per_cpu": 20000, "max_cpus": 4, "worker_memory_mib": 100,
             "element_kib": 0.25, "buffer": 2048},
            {"name": "shuffle", "rate_per_cpu": 90000, "max_cpus": 1, "buffer": 4096},
            {"name": "transform", "rate_per_cpu": 15000, "max_cpus": 6,
             "worker_memory_mib": 500, "element_kib": 0.2, "buffer": 2048,
             "buffer_per_cpu": 256},
        ],
    }


@pytest.fixture
def small() -> dict[str, Any]:
    return small_scenario()
