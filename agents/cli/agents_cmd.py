"""``intune agents``: every agent name with one line about it."""

from __future__ import annotations

import importlib

import click

from agents import registry


def _first_line(obj: object) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


def _fallback_description(name: str) -> str:
    # Used only where the registry does not describe its agents itself.
    if name in registry.SB3_AGENTS:
        return f"Stable-Baselines3 {name} policy; needs a trained model (--model)"
    native = getattr(registry, "_NATIVE", {})
    if name in native:
        module, attr, _ = native[name]
        try:
            return _first_line(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError) as err:
            return f"(not available: {err})"
    factory = getattr(registry, "_EXTRA", {}).get(name)
    return _first_line(factory) or f"registered by {getattr(factory, '__module__', '?')}"


def agent_descriptions() -> dict[str, str]:
    """Agent name -> one line, from the registry when it offers descriptions."""
    described = getattr(registry, "agent_descriptions", None)
    if described is not None:
        return dict(described())
    return {name: _fallback_description(name) for name in registry.known_agents()}


@click.command("agents")
def agents_cmd() -> None:
    """The agents `--agent`/`--agents` accept, one line each (plugins included)."""
    items = agent_descriptions()
    width = max(map(len, items), default=0) + 2
    for name, line in items.items():
        click.echo(f"{name:<{width}}{line or '(no description)'}")
