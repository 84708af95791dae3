"""The ``intune`` click group: plugins first, then one subcommand, errors as one line.

Every subcommand runs inside :class:`BoundaryGroup`, which turns a user's fault that
escapes a command (a bad file, a full disk, a name too long for the file system) into one
``intune: error: ...`` line and exit 2, and Ctrl-C into ``intune: interrupted`` (130).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from typing import Any

import click

from agents import __version__
from agents.cli.agents_cmd import agents_cmd
from agents.cli.common import USER_ERRORS, fail, show_path
from agents.cli.compare_cmd import compare
from agents.cli.run import run_cmd
from agents.cli.scenarios import scenarios
from agents.cli.train_eval import eval_cmd, train
from agents.plugins import PluginError, load_entry_point_plugins, load_plugins
from intune_env.live.cli import calibrate, live_sweep


def os_error_line(err: OSError) -> str:
    """``FILE: what went wrong`` for an I/O error, without a traceback."""
    what = err.strerror or type(err).__name__
    if err.errno == errno.ENOSPC:
        what += " (the disk is full)"
    return f"{show_path(err.filename)}: {what}" if err.filename else what


class BoundaryGroup(click.Group):
    """A group whose subcommands fail with one line instead of a traceback."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        """Click's entry, with usage errors as one line (click prints a usage block)."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as err:  # bare `intune`: the help text
            err.show()
            sys.exit(err.exit_code)
        except click.UsageError as err:
            where = err.ctx.command_path if err.ctx is not None else "intune"
            fail(f"{err.format_message()} (`{where} --help` lists the options)")
        except click.ClickException as err:
            err.show()
            sys.exit(err.exit_code)
        except click.Abort:  # Ctrl-C or end of input outside a command
            click.echo("intune: interrupted", err=True)
            sys.exit(130)
        # --help and --version end with their exit code; commands return None.
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except USER_ERRORS as err:
            fail(str(err))
        except BrokenPipeError:  # the reader left (`intune run | head`): stop quietly
            # Python's documented recipe: later flushes of stdout go to /dev/null.
            with contextlib.suppress(OSError, ValueError):  # stdout may have no descriptor
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except OSError as err:
            fail(os_error_line(err))
        except KeyboardInterrupt:
            click.echo("intune: interrupted", err=True)
            sys.exit(130)


@click.group(cls=BoundaryGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="intune")
@click.option("--plugin", "plugins", multiple=True, metavar="MODULE_OR_FILE.py",
              help="import user code that registers stage models or agents (repeatable; "
                   "it runs with your permissions). Scenario files never load code.")
@click.option("--no-entry-points", is_flag=True,
              help="do not load plugins installed packages declare (group intune.plugins)")
def main(plugins: tuple[str, ...], no_entry_points: bool) -> None:
    """InTune: RL for CPU allocation across the stages of DLRM input pipelines."""
    try:
        if not no_entry_points:
            load_entry_point_plugins()
        load_plugins(plugins)
    except PluginError as err:
        fail(str(err))


main.add_command(scenarios)
main.add_command(run_cmd)
main.add_command(agents_cmd)
main.add_command(train)
main.add_command(eval_cmd)
main.add_command(compare)
main.add_command(calibrate)
main.add_command(live_sweep)
