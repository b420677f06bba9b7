"""The one exception type users see. The CLI prints its message on one line and exits non-zero."""


class SoraError(Exception):
    """A problem the user can act on: the message says what was wrong, what was expected, what to try."""
