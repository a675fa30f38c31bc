"""The one error type for problems a user can fix."""


class PenwrightError(Exception):
    """Bad input or environment. The CLI prints the message on one line and exits 2."""
