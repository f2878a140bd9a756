"""The one error type for bad user input.

Entry points catch :class:`UserError` and print its message as a single line (no traceback)
and exit non-zero; everything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input from a user: the message names the bad value and what would be valid."""
