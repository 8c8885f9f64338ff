"""``python -m bench.writer``: the concurrent writer of the stop scenarios, in a process of its own.

Why a process: the harness times a stop by a thread of its own that wakes when
the namespace is reaped.  With the clients as threads of the same interpreter,
that thread first had to win the GIL from four busy HTTP clients (up to the
5 ms switch interval), which added 0–5 ms of the harness's own noise to every
stop measured, the floor's and ours alike.

Clients call the ``insert_item`` reducer in a loop and print every acknowledged
value on its own line (stdout, flushed per line: what was printed was
acknowledged).  SIGTERM ends them; so do ``--max-seconds`` and ``--give-up``
seconds of failures in a row (the server is gone).  The bearer token comes in
the environment (``BENCH_WRITER_BEARER``), never in argv.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import sys
import threading
import time


def client(n: int, port: int, path: str, headers: dict[str, str], stop: threading.Event, deadline: float,
           give_up_s: float, out: threading.Lock) -> None:
    conn: http.client.HTTPConnection | None = None
    failing_since: float | None = None
    i = 0
    while not stop.is_set() and time.monotonic() < deadline:
        value = f"w{n}-{i}"
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("POST", path, body=json.dumps([value]).encode(), headers=headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                with out:
                    sys.stdout.write(value + "\n")
                    sys.stdout.flush()
                failing_since = None
                i += 1
                continue
        except (OSError, http.client.HTTPException):
            if conn is not None:
                conn.close()
            conn = None
        now = time.monotonic()
        failing_since = failing_since or now
        if now - failing_since > give_up_s:
            break
        time.sleep(0.01)
    if conn is not None:
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--module", default="pogly")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--give-up", type=float, default=2.0)
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {os.environ.get('BENCH_WRITER_BEARER', '')}",
               "Content-Type": "application/json"}
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    out = threading.Lock()
    deadline = time.monotonic() + args.max_seconds
    threads = [threading.Thread(target=client, daemon=True,
                                args=(n, args.port, f"/v1/database/{args.module}/call/insert_item", headers, stop,
                                      deadline, args.give_up, out))
               for n in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():  # a timed join, so SIGTERM's handler runs promptly
            thread.join(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
