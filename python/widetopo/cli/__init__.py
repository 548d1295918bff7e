"""The `widetopo` command line: one module per command."""
from widetopo.cli.commands import main

__all__ = ["main"]
