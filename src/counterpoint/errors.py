"""User-facing error types.

Anything raised as a :class:`UserError` is a mistake the user can fix (a bad config key, a missing path, an
unreadable checkpoint). The command line prints its one-line message and exits with code 2, without a
traceback. Internal invariants use ``assert`` and surface as ordinary tracebacks, because those are our bugs.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the thing and the fix."""


class DataError(UserError):
    """Data path missing, empty, or in a format no reader understands."""


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete, or not one of ours."""
