"""Spawning, relaying, reaping and stopping real child processes."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import sys

from entrypoint import logs
from entrypoint.supervision.process import Child, ChildSpec, LineFramer, Reaper, run_capture


def frame(chunks: list[bytes], max_line: int = 10) -> list[tuple[bytes, bool]]:
    out: list[tuple[bytes, bool]] = []
    framer = LineFramer(lambda raw, trunc: out.append((raw, trunc)), max_line)
    for chunk in chunks:
        framer.feed(chunk)
    framer.close()
    return out


def test_framer_splits_across_chunks_and_flushes_partial_last_line() -> None:
    assert frame([b"ab", b"c\nde", b"f\ng"]) == [(b"abc", False), (b"def", False), (b"g", False)]


def test_framer_truncates_long_lines_with_bounded_memory() -> None:
    out = frame([b"x" * 7, b"y" * 30, b"z" * 5 + b"\nok\n"])
    assert out == [(b"xxxxxxxyyy", True), (b"ok", False)]


def test_framer_long_line_in_one_chunk() -> None:
    assert frame([b"a" * 25 + b"\nb\n"]) == [(b"a" * 10, True), (b"b", False)]


def test_decode_line_handles_invalid_utf8_ansi_and_marks_truncation() -> None:
    assert logs.decode_line(b"\xff\xfeok \x1b[31mred\x1b[0m") == "\ufffd\ufffdok red"
    assert logs.decode_line(b"abc", truncated=True).endswith(logs.TRUNCATED)


async def _collect(argv: list[str], sig: int = signal.SIGTERM, grace: float = 5.0):
    lines: list[tuple[str, bytes, bool]] = []
    reaper = Reaper()
    reaper.install(asyncio.get_running_loop())
    child = Child(ChildSpec("t", argv, dict(os.environ), sig, grace), reaper,
                  lambda s, raw, t: lines.append((s, raw, t)))
    child.start()
    return reaper, child, lines


def test_child_gets_default_signals_empty_mask_and_devnull_stdin() -> None:
    async def main() -> bytes:
        reaper = Reaper()
        reaper.install(asyncio.get_running_loop())
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # must not leak
        try:
            code, out, _ = await run_capture(
                ["/bin/sh", "-c", "grep -E '^Sig(Blk|Ign)' /proc/self/status; readlink /proc/self/fd/0;"
                 " ps -o pgid= -p $$; echo $$"],
                dict(os.environ), 10, reaper)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
            reaper.uninstall()
        assert code == 0
        return out

    out = asyncio.run(main()).decode().split("\n")
    assert out[0].split() == ["SigBlk:", "0000000000000000"]
    # Signals 32 and 33 are glibc's internal NPTL signals: posix_spawn's child
    # helper leaves them ignored and a program's libc re-arms them; every real
    # signal (1-31 and the usable real-time ones) must be at its default.
    assert int(out[1].split()[1], 16) & ~0x180000000 == 0
    assert out[2] == "/dev/null"
    assert out[3].strip() == out[4].strip()  # its own process group


def test_relay_survives_invalid_utf8_huge_line_partial_line_and_burst() -> None:
    script = (
        "import sys\n"
        "w = sys.stdout.buffer.write\n"
        "w(b'bad \\xff\\xfe bytes\\n')\n"
        "w(b'L' * (1 << 20) + b'\\n')\n"
        "w(b''.join(b'line %d\\n' % i for i in range(100000)))\n"
        "w(b'partial-no-newline')\n"
    )

    async def main() -> tuple[int, list[tuple[str, bytes, bool]]]:
        reaper, child, lines = await _collect([sys.executable, "-c", script])
        code = await child.wait()
        reaper.uninstall()
        return code, lines

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, lines = asyncio.run(main())
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert code == 0
    assert lines[0] == ("stdout", b"bad \xff\xfe bytes", False)
    assert lines[1] == ("stdout", b"L" * logs.MAX_LINE, True)
    numbered = [raw for _, raw, _ in lines[2:-1]]
    assert numbered == [b"line %d" % i for i in range(100000)]  # nothing lost, in order
    assert lines[-1] == ("stdout", b"partial-no-newline", False)  # flushed before exit is reported
    assert grown_kb < 64 * 1024  # the 1 MiB line was never held whole more than once


async def _armed_child(script: str, sig: int, grace: float, reaper: Reaper) -> Child:
    """A shell child that prints ``armed`` once its trap is set; returns when that line arrived."""
    armed = asyncio.Event()
    child = Child(ChildSpec("t", ["/bin/sh", "-c", script + "; echo armed; while :; do sleep 0.05; done"],
                            dict(os.environ), sig, grace), reaper, lambda s, raw, t: armed.set())
    child.start()
    await asyncio.wait_for(armed.wait(), 10)
    return child


def test_stop_sends_the_stop_signal_to_the_group_and_kills_after_grace() -> None:
    async def main() -> tuple[tuple[int, bool], tuple[int, bool]]:
        reaper = Reaper()
        reaper.install(asyncio.get_running_loop())
        polite = await _armed_child("trap 'exit 7' INT", signal.SIGINT, 5, reaper)
        stubborn = await _armed_child("trap '' TERM", signal.SIGTERM, 0.3, reaper)
        r1 = await polite.stop(5)
        r2 = await stubborn.stop(0.3)
        reaper.uninstall()
        return r1, r2

    (code1, killed1), (code2, killed2) = asyncio.run(main())
    assert (code1, killed1) == (7, False)  # its own SIGINT handler ran: the stop signal reached it
    assert killed2 and code2 == -signal.SIGKILL


def test_force_event_skips_the_grace() -> None:
    async def main() -> tuple[int, bool, float]:
        reaper = Reaper()
        reaper.install(asyncio.get_running_loop())
        child = await _armed_child("trap '' TERM", signal.SIGTERM, 60, reaper)
        force = asyncio.Event()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        loop.call_soon(force.set)
        code, killed = await child.stop(60, force)
        reaper.uninstall()
        return code, killed, loop.time() - t0

    code, killed, took = asyncio.run(main())
    assert killed and code == -signal.SIGKILL and took < 30


def test_spawn_failure_raises_oserror() -> None:
    async def main() -> None:
        reaper = Reaper()
        reaper.install(asyncio.get_running_loop())
        child = Child(ChildSpec("x", ["/nonexistent/binary"], {}, signal.SIGTERM, 1), reaper, lambda *a: None)
        try:
            child.start()
        except OSError as exc:
            assert exc.errno is not None
        else:
            raise AssertionError("spawn of a missing binary must fail")
        finally:
            reaper.uninstall()

    asyncio.run(main())


def test_child_spawned_before_the_loop_keeps_its_exit_status() -> None:
    """spacetimedb.server.prespawn: the child may even be dead before the reaper exists."""
    from entrypoint.supervision.spawn import spawn

    pid, out_fd, err_fd = spawn(["/bin/sh", "-c", "echo early; exit 5"], dict(os.environ))
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # dead (a zombie) before any loop exists

    async def main() -> tuple[int, list[bytes], int]:
        reaper = Reaper(expected=(pid,))
        reaper.install(asyncio.get_running_loop())  # reaps the zombie: must not count it as an orphan
        lines: list[bytes] = []
        child = Child(ChildSpec("early", ["unused"], {}, signal.SIGTERM, 1), reaper,
                      lambda s, raw, t: lines.append(raw), lambda *_: (pid, out_fd, err_fd))
        child.start()
        code = await child.wait()
        reaper.uninstall()
        return code, lines, reaper.orphans_reaped

    assert asyncio.run(main()) == (5, [b"early"], 0)
