"""Ask the kernel to run PID 1 promptly when it wakes, without giving it a larger share of the CPU.

Why: PID 1 wakes for well under a millisecond of work at a time (a signal, a
line from a child, a child's exit, a probe).  While SpacetimeDB and its clients
keep both CPUs busy, the scheduler let each of those wake-ups wait 2–7 ms: in
issue 15's stop timeline, Caddy's "shutdown complete" was read 7 ms after Caddy
printed it, and the stop is a chain of such wake-ups (SIGTERM → Caddy's
SIGTERM → its last line → SpacetimeDB's SIGINT → their exits).

Since Linux 6.12 a ``SCHED_OTHER`` task may ask for its own time slice
(``sched_attr.sched_runtime``, clamped to 0.1–100 ms, no privilege needed).
EEVDF gives a task with a shorter slice an earlier virtual deadline, so it is
picked sooner when it wakes; its weight, hence its share of the CPU, stays
that of nice 0.  ``SCHED_FLAG_RESET_ON_FORK`` puts every child (SpacetimeDB,
Caddy, the helpers) back on the default slice.  Older kernels ignore the field
for ``SCHED_OTHER``; a seccomp profile that refuses ``sched_setattr`` costs
nothing but this.  (``nice -n -5`` would do more, but needs ``CAP_SYS_NICE``,
which containers do not get, and would also raise our share of the CPU.)
"""

from __future__ import annotations

import ctypes
import os
import struct

SLICE_NS = 100_000  # the kernel's minimum (0.1 ms); the default grows with the CPU count (1.4 ms with 2)
SCHED_OTHER = 0
SCHED_FLAG_RESET_ON_FORK = 0x01
# struct sched_attr, SCHED_ATTR_SIZE_VER1 (include/uapi/linux/sched/types.h): size, policy, flags, nice,
# priority, runtime, deadline, period, util_min, util_max.
_ATTR = struct.Struct("=IIQiIQQQII")
_SYSCALL = {"x86_64": (314, 315), "aarch64": (274, 275)}  # sched_setattr, sched_getattr


def prefer_prompt_wakeups(slice_ns: int = SLICE_NS) -> int | None:
    """Ask for a ``slice_ns`` time slice for this process only; the slice now in force, None if unknown.

    Leaves the policy and nice value as they are: nothing is done under a
    real-time policy (``chrt``) or a negative nice value, which reset-on-fork
    would take away from the children.
    """
    numbers = _SYSCALL.get(os.uname().machine)
    if numbers is None or struct.calcsize("P") != 8:  # uname names the kernel: a 32-bit userland has other numbers
        return None
    setattr_nr, getattr_nr = numbers
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        current = ctypes.create_string_buffer(_ATTR.size)
        if libc.syscall(getattr_nr, 0, current, _ATTR.size, 0) != 0:
            return None
        _, policy, flags, nice, *_ = _ATTR.unpack(current.raw)
        if policy != SCHED_OTHER or nice < 0:
            return None
        wanted = _ATTR.pack(_ATTR.size, SCHED_OTHER, flags | SCHED_FLAG_RESET_ON_FORK, nice, 0, slice_ns,
                            0, 0, 0, 0)
        if libc.syscall(setattr_nr, 0, ctypes.create_string_buffer(wanted, _ATTR.size), 0) != 0:
            return None
        if libc.syscall(getattr_nr, 0, current, _ATTR.size, 0) != 0:
            return None
        runtime = _ATTR.unpack(current.raw)[5]
        if not runtime:  # a kernel before 6.12 took the call and ignored the slice: take the flag back too
            original = _ATTR.pack(_ATTR.size, SCHED_OTHER, flags, nice, 0, 0, 0, 0, 0, 0)
            libc.syscall(setattr_nr, 0, ctypes.create_string_buffer(original, _ATTR.size), 0)
            return None
        return int(runtime)
    except (OSError, AttributeError):
        return None
