"""Subcommands of the ``polycom`` CLI (see :mod:`polycom.cli`)."""
