"""``python -m agents.cli`` runs the ``intune`` command."""

from agents.cli.main import main

main(prog_name="intune")
