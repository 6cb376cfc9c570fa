"""User-facing errors.

A `UserError` is a mistake in what the user gave us (a file, a field, a flag). The CLI prints
it as one line and exits non-zero, with no traceback. Anything else is a bug and keeps its
traceback.
"""


from bertscale.exitcodes import BAD_INPUT_EXIT_CODE


class UserError(Exception):
    """Bad input: the message names the file, field or rank and what is wrong."""

    exit_code = BAD_INPUT_EXIT_CODE


class ConfigError(UserError):
    """A recipe or override names an unknown field or holds a bad value."""
