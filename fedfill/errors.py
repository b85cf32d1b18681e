"""Errors every subcommand may raise, in a module of their own so that no subcommand has to
import the command-line entry point back."""


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2, never a traceback."""
