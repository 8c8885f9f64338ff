"""Exit codes and the one exception type that ends the supervisor on purpose.

The codes follow BSD ``sysexits.h`` so they mean something to operators who
have never read our docs: 78 configuration, 69 a dependency unavailable, 70 an
internal error.  A crashed child's own code (or 128+signal) is passed through.
"""

from __future__ import annotations

EXIT_UNAVAILABLE = 69
EXIT_SOFTWARE = 70
EXIT_CONFIG = 78


class Fatal(Exception):
    """Stop everything and exit with ``exit_code``; ``message`` says what and how to fix it.

    ``event`` is the log event name operators can search for (docs/operations.md).
    """

    def __init__(self, exit_code: int, message: str, event: str = "entrypoint.fatal", **fields: object) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message
        self.event = event
        self.fields = fields
