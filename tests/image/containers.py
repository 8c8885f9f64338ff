"""A container as a user sees it: ``podman run``, its JSON log, its exit code, ``podman stop``."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.harness import wait_for
from tests.image.podman import Podman

# Every name the image test gives a container, pod, volume or image starts with this and the
# session's PID, so a later session can remove what a killed one left behind.
PREFIX = "pogly-test"
SESSION = str(os.getpid())
_SESSION_NAME = re.compile(rf"{PREFIX}-(\d+)-")
# The non-root uid and group the image is run as here and in the Kubernetes overlay.
NON_ROOT_UID, NON_ROOT_GID = 10001, 0


def name(role: str) -> str:
    return f"{PREFIX}-{SESSION}-{role}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(podman: Podman) -> None:
    """Containers, pods and volumes of image-test sessions that no longer run (killed mid-test)."""
    def stale(names: str) -> list[str]:
        out = []
        for line in names.splitlines():
            match = _SESSION_NAME.search(line.strip())
            if match and not _alive(int(match.group(1))):
                out.append(line.strip())
        return out

    for pod in stale(podman("pod", "ps", "--format", "{{.Name}}")):
        podman("pod", "rm", "--force", pod, check=False)
    for ctr in stale(podman("ps", "--all", "--format", "{{.Names}}")):
        podman("rm", "--force", "--volumes", ctr, check=False)
    for volume in stale(podman("volume", "ls", "--format", "{{.Name}}")):
        podman("volume", "rm", "--force", volume, check=False)
    for image in podman("images", "--format", "{{.Repository}}:{{.Tag}}").splitlines():
        repo, _, tag = image.partition(":")
        if repo.startswith(f"localhost/{PREFIX}") and tag.isdigit() and not _alive(int(tag)):
            podman("rmi", "--force", image, check=False)


@dataclass
class Container:
    podman: Podman
    name: str
    port: int | None = None  # the published port on 127.0.0.1, when there is one
    started: float = field(default=0.0)
    run_s: float = field(default=0.0)  # how long `podman run -d` took (creating the container: vfs copies)

    def run(self, *args: str) -> None:
        """``podman run -d --name NAME ARGS`` (ARGS end with the image and its command, if any)."""
        self.started = time.monotonic()
        self.podman("run", "-d", "--name", self.name, *args)
        self.run_s = time.monotonic() - self.started

    def url(self, path: str) -> str:
        assert self.port is not None
        return f"http://127.0.0.1:{self.port}{path}"

    def state(self) -> dict[str, Any]:
        return json.loads(self.podman("inspect", "--format", "{{json .State}}", self.name))

    def logs(self) -> str:
        proc = self.podman.user("podman", "logs", self.name)
        return proc.stdout + proc.stderr

    def events(self) -> list[dict[str, Any]]:
        """The log as events: one JSON object per line (a line that is not one fails the test)."""
        out = []
        for line in self.podman.user("podman", "logs", self.name).stdout.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"{self.name}: log line is not a JSON event: {line!r}") from None
        return out

    def find(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in self.events()
                if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())]

    def one(self, event: str, **fields: Any) -> dict[str, Any]:
        found = self.find(event, **fields)
        assert len(found) == 1, f"{self.name}: expected one {event} {fields or ''}, found {len(found)}"
        return found[0]

    def wait_ready(self, timeout: float = 90.0) -> float:
        """Wait for ``/readyz`` 200 through the published port; seconds since ``run``."""
        last_state_check = 0.0

        def ready() -> bool:
            nonlocal last_state_check
            try:
                if httpx.get(self.url("/readyz"), timeout=2.0).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            if time.monotonic() - last_state_check > 1.0:  # fail fast, with the log, if it died
                last_state_check = time.monotonic()
                state = self.state()
                if not state.get("Running"):
                    raise AssertionError(f"{self.name} exited {state.get('ExitCode')} before it was ready:\n"
                                         f"{self.logs()[-6000:]}")
            return False

        try:
            wait_for(ready, timeout, f"{self.name}: /readyz 200 on 127.0.0.1:{self.port}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()[-6000:]}") from None
        return time.monotonic() - self.started

    def wait_exit(self, timeout: float = 60.0) -> int:
        """``podman wait``: the container's exit code once it has stopped."""
        return int(self.podman("wait", self.name, timeout=timeout))

    def stop(self) -> tuple[float, str]:
        """``podman stop`` with its default timeout (10 s, then SIGKILL); (seconds, podman's stderr)."""
        t0 = time.monotonic()
        proc = self.podman.user("podman", "stop", self.name, timeout=60)
        return time.monotonic() - t0, proc.stderr

    def rm(self) -> None:
        self.podman("rm", "--force", "--volumes", self.name, check=False)  # and its anonymous volumes


def write_env_file(path: Path, values: dict[str, str]) -> Path:
    """An ``--env-file`` (KEY=value per line, no quoting: that is how Docker and podman read it)."""
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path
