"""A broken stdout never stops the stop (issue 13, fault 8).

With stdout a FIFO whose reader was killed, two SIGTERMs were ignored and
``/readyz`` stayed 200 (``request_stop`` logged before it recorded the stop,
and the log write raised); closing stdout killed PID 1 and left Caddy and
SpacetimeDB running.  A reader that stops reading made every log write block
the event loop.  Real processes: the entrypoint, the stand-in, real Caddy, and
``cat`` as stdout's reader, killed or stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx

from tests.harness import base_env, wait_for
from tests.reliability.support import FifoRun, flood, get, pid_alive

STOP_TIMEOUT = 10.0


def _env(tmp: Path) -> dict[str, str]:
    return base_env(tmp, POGLY_STOP_TIMEOUT=f"{STOP_TIMEOUT:g}")


def _status(env: dict[str, str]) -> dict[str, Any]:
    response = httpx.get(f"http://{env['POGLY_HEALTH_ADDR']}/status", timeout=5, trust_env=False)
    return dict(response.json())


def _kill_reader(run: FifoRun) -> None:
    run.reader.kill()
    run.reader.wait(10)


def _stop_and_time(run: FifoRun) -> tuple[int, float]:
    started = time.monotonic()
    run.signal(signal.SIGTERM)
    code = run.proc.wait(STOP_TIMEOUT + 10)
    return code, time.monotonic() - started


def test_stdout_reader_killed_keeps_supervising_and_obeys_sigterm(tmp_path: Path) -> None:
    """Not PID 1 (a subreaper): the case where a dead stdout used to kill us and orphan the children."""
    env = _env(tmp_path)
    port = int(env["POGLY_HTTP_PORT"])
    with FifoRun(tmp_path, env) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        before = _status(env)["children"]
        _kill_reader(run)
        for n in range(20):  # access-log lines, each now written into a pipe nobody reads (EPIPE)
            assert asyncio.run(get(port, f"/after-the-reader-{n}"))[0] == 200
        assert run.proc.poll() is None, run.stderr[-10:]
        assert asyncio.run(get(port, "/readyz"))[0] == 200

        # still supervising: a killed Caddy is restarted and readiness comes back
        os.kill(before["caddy"]["pid"], signal.SIGKILL)

        def caddy_restarted() -> bool:
            caddy = _status(env)["children"]["caddy"]
            return caddy["pid"] not in (None, before["caddy"]["pid"]) and caddy["state"] == "ready"

        wait_for(caddy_restarted, 30, "Caddy restarted by the supervisor")
        wait_for(lambda: asyncio.run(get(port, "/readyz"))[0] == 200, 30, "/readyz 200 again")
        after = _status(env)["children"]

        code, took = _stop_and_time(run)
        assert code == 0, run.stderr[-10:]
        assert took < STOP_TIMEOUT, took
        for child in ("caddy", "spacetimedb"):
            assert not pid_alive(after[child]["pid"]), f"{child} left running"
        assert not (tmp_path / "stdb" / "spacetime.pid").exists()  # SpacetimeDB got SIGINT and flushed
    notices = [line for line in run.stderr if "stdout does not take log lines" in line]
    assert len(notices) == 1 and "EPIPE" in notices[0], run.stderr


def test_stdout_reader_killed_pid1_obeys_the_first_sigterm(tmp_path: Path) -> None:
    env = _env(tmp_path)
    port = int(env["POGLY_HTTP_PORT"])
    with FifoRun(tmp_path, env, pid1=True) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        _kill_reader(run)
        assert asyncio.run(get(port, "/after-the-reader"))[0] == 200
        code, took = _stop_and_time(run)  # one SIGTERM: its own log line fails, the stop must not
        assert code == 0 and took < STOP_TIMEOUT, (code, took, run.stderr[-10:])
        assert not (tmp_path / "stdb" / "spacetime.pid").exists()


def test_stdout_reader_stopped_pid1_neither_blocks_caddy_nor_the_stop(tmp_path: Path) -> None:
    """The reader stops reading: the pipe fills, and a blocking write would freeze the event loop."""
    env = _env(tmp_path)
    port = int(env["POGLY_HTTP_PORT"])
    with FifoRun(tmp_path, env, pid1=True) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        run.reader.send_signal(signal.SIGSTOP)
        wait_for(lambda: Path(f"/proc/{run.reader.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T",
                 10, "cat stopped")
        # ~400 access-log lines of ~700 bytes: far more than a pipe (64 KiB) holds
        codes = asyncio.run(flood(port, "/a-path-that-makes-an-access-log-line", concurrency=20, rounds=20))
        assert codes == {200: 400}, codes
        assert asyncio.run(get(port, "/readyz"))[0] == 200
        code, took = _stop_and_time(run)
        assert code == 0 and took < STOP_TIMEOUT, (code, took, run.stderr[-10:])
        assert not (tmp_path / "stdb" / "spacetime.pid").exists()
        run.reader.send_signal(signal.SIGCONT)
    notices = [line for line in run.stderr if "stdout does not take log lines" in line]
    assert len(notices) == 1 and "not being read fast enough" in notices[0], run.stderr


# -- the writer itself, on a real pipe ------------------------------------------------------------------


class _RawFd:
    """Just enough of a stream for LogSink: a descriptor this test opens and closes itself."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _pipe_sink(limit: int = 8192) -> tuple[Any, list[int]]:
    """A LogSink on a pipe's write end, with a pipe standing in for stderr: (sink, [read, write, err_read,
    err_write])."""
    from entrypoint import logs

    read_end, write_end = os.pipe()
    err_read, err_write = os.pipe()
    return logs.LogSink(_RawFd(write_end), pending_limit=limit, notice_fd=err_write), [read_end, write_end,
                                                                                         err_read, err_write]


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _drain(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_log_writes_to_a_full_pipe_never_block_and_say_what_was_dropped() -> None:
    sink, fds = _pipe_sink()
    read_end, _, err_read, _ = fds
    line = json.dumps({"event": "x" * 1000}) + "\n"
    started = time.monotonic()
    for _ in range(200):  # ~200 KB into a 64 KiB pipe nobody reads, with 8 KiB of room for pending
        sink.write(line)
    assert time.monotonic() - started < 5  # did not block (a blocking write would hang here for ever)
    assert sink.dropped > 100 and sink.dead is None
    notice = _drain(err_read).decode()
    assert notice.count("stdout does not take log lines") == 1 and "not being read fast enough" in notice
    got = _drain(read_end)  # the reader catches up
    sink.write(json.dumps({"event": "after"}) + "\n")
    got += _drain(read_end)
    lines = [json.loads(x) for x in got.decode().splitlines()]
    assert all(e["event"] in ("x" * 1000, "after", "logs.dropped") for e in lines)  # whole lines only
    dropped = [e for e in lines if e["event"] == "logs.dropped"]
    assert dropped and dropped[0]["lines"] == sink.dropped and lines[-1]["event"] == "after"
    assert len(lines) - 2 + sink.dropped == 200
    _close(fds)


def test_lines_batched_within_a_loop_callback_never_block_a_full_pipe_either() -> None:
    """Inside the event loop lines wait for the end of the callback (issue 15): the same bounds hold."""
    sink, fds = _pipe_sink()
    read_end, _, err_read, _ = fds
    line = json.dumps({"event": "x" * 1000}) + "\n"

    async def burst() -> float:
        started = time.monotonic()
        for _ in range(200):  # one callback: ~200 KB into a 64 KiB pipe nobody reads, 8 KiB pending room
            sink.write(line)
        took = time.monotonic() - started
        await asyncio.sleep(0)  # the deferred write runs, and takes no more than the pipe has room for
        return took

    assert asyncio.run(burst()) < 5  # did not block
    assert sink.dropped > 100 and sink.dead is None
    assert _drain(err_read).decode().count("not being read fast enough") == 1
    got = _drain(read_end)

    async def after() -> None:
        sink.write(json.dumps({"event": "after"}) + "\n")
        await asyncio.sleep(0)

    asyncio.run(after())
    got += _drain(read_end)
    lines = [json.loads(x) for x in got.decode().splitlines()]  # whole lines only
    assert [e["event"] for e in lines[-2:]] == ["logs.dropped", "after"]
    assert lines[-2]["lines"] == sink.dropped and len(lines) - 2 + sink.dropped == 200
    _close(fds)


def test_log_writes_after_the_reader_is_gone_never_raise() -> None:
    sink, fds = _pipe_sink()
    os.close(fds[0])  # EPIPE from now on (Python ignores SIGPIPE, so no signal kills us)
    for _ in range(3):
        assert sink.write("line\n") == 5
    assert sink.dead is not None and "EPIPE" in sink.dead and sink.dropped == 3
    assert _drain(fds[2]).decode().count("EPIPE") == 1
    _close(fds)

    sink, fds = _pipe_sink()  # stderr gone too: silent, and still no exception
    _close([fds[0], fds[2]])
    sink.write("line\n")
    assert sink.dropped == 1 and sink.dead is not None
    _close(fds)

    sink, fds = _pipe_sink()  # a descriptor that is not open (closed stdout): EBADF
    unused = next(fd for fd in range(1000, 20000) if not _is_open(fd))
    sink.fd = unused
    sink.write("line\n")
    assert sink.dead is not None and "EBADF" in sink.dead
    _close(fds)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
