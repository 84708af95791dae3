"""Worker processes load the parent's plugins; a dead Ray address fails fast."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from conftest import small_scenario

from agents.compare import CompareError, run_compare

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = textwrap.dedent('''
    """A user's plugin: one agent, registered on import."""
    from agents import registry
    from agents.static import EvenAgent


    def plug_even(env, seed, model_path=None):
        """The even split, from a plugin."""
        return EvenAgent()


    registry.register_agent("plug-even", plug_even)
''')


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    p = tmp_path / "my_plugin.py"
    p.write_text(PLUGIN)
    return p


def test_worker_initializer_loads_plugins(plugin: Path) -> None:
    code = textwrap.dedent(f"""
        import os
        from agents import registry
        from agents.compare.executors import _worker_init
        assert "plug-even" not in registry.known_agents()
        _worker_init(os.getppid(), [{str(plugin)!r}], None)
        assert "plug-even" in registry.known_agents()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_plugin_agent_in_parallel_compare(tmp_path: Path, plugin: Path) -> None:
    script = textwrap.dedent(f"""
        from agents.plugins import load_plugins
        from agents.compare import run_compare
        load_plugins([{str(plugin)!r}])
        res = run_compare({str(tmp_path / 's.yaml')!r}, "plug-even,even", 2,
                          {str(tmp_path / 'o')!r}, duration_s=20.0, jobs=2, progress=False,
                          plots=False)
        assert not res.failed, res.failed
        a = [r["final_fraction"] for r in res.rows if r["agent"] == "plug-even"]
        b = [r["final_fraction"] for r in res.rows if r["agent"] == "even"]
        assert len(a) == 2 and a == b, (a, b)
        print("ok")
    """)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(small_scenario()))
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_ray_dead_address_fails_fast(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    sc = tmp_path / "s.yaml"
    sc.write_text(yaml.safe_dump(small_scenario()))
    t0 = time.monotonic()
    with pytest.raises(CompareError, match=r"--address 127\.0\.0\.1:1: no Ray cluster"):
        run_compare(str(sc), "even", 1, tmp_path / "o", duration_s=20.0, executor="ray",
                    address="127.0.0.1:1", progress=False, plots=False)
    assert time.monotonic() - t0 < 30
