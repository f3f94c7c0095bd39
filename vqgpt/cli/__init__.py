"""The face: the ``vqgpt`` command line (``commands``) and ``vqgpt demo`` (``demo``). Nothing imports
this floor but ``python -m vqgpt``."""

from vqgpt.cli.commands import main

__all__ = ["main"]
