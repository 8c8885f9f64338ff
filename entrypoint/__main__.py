"""Process entry: install signal handlers before anything else.

A signal sent to PID 1 before it has a handler is discarded by the kernel, so
the window between exec and these lines is the only time a SIGTERM can be
lost.  Only ``os``, ``signal`` and ``sys`` are imported before the handlers
exist; everything heavy comes after.  Signals caught here are replayed into
the supervisor once its event loop runs.
"""

import signal
import sys
import time

# (signal number, time.monotonic() when it came): the stop budget counts from the signal.
PENDING: list[tuple[int, float]] = []


def _early(signum: int, _frame: object) -> None:
    PENDING.append((signum, time.monotonic()))


for _sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(_sig, _early)


def main() -> None:
    from entrypoint.cli import main as cli_main

    sys.exit(cli_main(sys.argv[1:], PENDING))


if __name__ == "__main__":
    main()
