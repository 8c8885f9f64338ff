"""Command-line parsing for the ``spacetime`` stand-in (reference §1 and §4).

``spacetime [--root-dir R] [--config-path F] <command> …``.  For ``start`` the real CLI prepends
``start --data-dir <data_dir> --jwt-key-dir <cli_config_dir>`` to the user's arguments, so explicit
flags win because the last occurrence of a flag wins; argparse's ``store`` gives the same rule.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import NoReturn

from .common import CliError, UsageError, Version, eprintln, println


class _Parser(argparse.ArgumentParser):
    """argparse with clap's exit code (2) and ``error:`` prefix for usage errors."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments: "):
            message = f"unexpected argument '{message.split(': ', 1)[1].split()[0]}' found"
        raise UsageError(f"error: {message}\n\n{self.format_usage().strip()}\n\nFor more information, try '--help'.")


def xdg_dir(env: str, fallback: str) -> str:
    base = os.environ.get(env) or os.path.join(os.path.expanduser("~"), fallback)
    return os.path.join(base, "spacetime")


def default_paths(root_dir: str | None) -> tuple[str, str]:
    """(data dir, cli config dir) per ``crates/paths``: XDG defaults, or ``R/data`` / ``R/config``."""
    if root_dir:
        return os.path.join(root_dir, "data"), os.path.join(root_dir, "config")
    return os.path.join(xdg_dir("XDG_DATA_HOME", ".local/share"), "data"), xdg_dir("XDG_CONFIG_HOME", ".config")


def _pg_port(text: str) -> int:
    if not text.isdigit() or not 1024 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not in 1024..=65535")
    return int(text)


def _start_parser(version: Version) -> _Parser:
    p = _Parser(prog="spacetimedb-standalone start", allow_abbrev=False,
                description="Starts a standalone SpacetimeDB instance (stand-in)")
    p.add_argument("-l", "--listen-addr", default="0.0.0.0:3000",
                   help="The address and port where SpacetimeDB should listen for connections "
                        "(default 0.0.0.0:3000)")
    p.add_argument("--data-dir", help="The path to the data directory for the database")
    p.add_argument("--jwt-key-dir", help=argparse.SUPPRESS)
    p.add_argument("--jwt-pub-key-path", help="The path to the public jwt key for verifying identities")
    p.add_argument("--jwt-priv-key-path", help="The path to the private jwt key for issuing identities")
    p.add_argument("--in-memory", action="store_true", help="Keep all state in memory (lost on exit)")
    p.add_argument("--pg-port", type=_pg_port, help="Port for the PostgreSQL wire protocol (not emulated)")
    p.add_argument("--enable-tracy", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--page_pool_max_size", help=argparse.SUPPRESS)
    if version.at_least(1, 12):
        p.add_argument("--non-interactive", action="store_true", help="Fail immediately if the port is in use")
    return p


def cmd_start(argv: list[str], root_dir: str | None) -> int:
    from .start import StartArgs, run_start

    version = Version.from_env()
    data_dir, config_dir = default_paths(root_dir)
    edition = "standalone"
    rest: list[str] = []
    i = 0
    while i < len(argv):  # `spacetime start --edition X` is consumed by the CLI, not the server
        a = argv[i]
        if a == "--edition" and i + 1 < len(argv):
            edition = argv[i + 1]
            i += 2
            continue
        if a.startswith("--edition="):
            edition = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    if edition != "standalone":
        raise CliError(f"the {edition} edition is not available in the stand-in")
    ns = _start_parser(version).parse_args(["--data-dir", data_dir, "--jwt-key-dir", config_dir, *rest])
    if bool(ns.jwt_pub_key_path) != bool(ns.jwt_priv_key_path):
        missing = "--jwt-priv-key-path <JWT_PRIV_KEY_PATH>" if ns.jwt_pub_key_path else \
            "--jwt-pub-key-path <JWT_PUB_KEY_PATH>"
        raise UsageError(f"error: the following required arguments were not provided:\n  {missing}")
    args = StartArgs(
        data_dir=ns.data_dir,
        listen_addr=ns.listen_addr,
        jwt_key_dir=ns.jwt_key_dir,
        jwt_pub_key_path=ns.jwt_pub_key_path,
        jwt_priv_key_path=ns.jwt_priv_key_path,
        in_memory=ns.in_memory,
        pg_port=ns.pg_port,
        non_interactive=getattr(ns, "non_interactive", False),
    )
    exe = os.environ.get("STANDIN_EXE") or os.path.abspath(sys.argv[0])
    return run_start(args, os.path.join(os.path.dirname(exe), "spacetimedb-standalone"))


def print_version(exe: str) -> int:
    v = Version.from_env()
    println(f"spacetime Path: {exe}")
    println("Commit: standin")
    println(f"spacetimedb tool version {v}; spacetimedb-lib version {v};")
    return 0


USAGE = """\
Usage: spacetime [OPTIONS] <COMMAND>

Commands (stand-in subset):
  start      Start a local SpacetimeDB instance
  publish    Publish a module (-b <wasm>)
  sql        Run a SQL query
  call       Call a reducer
  logs       Print a database's logs
  list       List databases owned by the current identity
  delete     Delete a database
  login      Manage the saved login (--server-issued-login, --token, show)
  logout     Forget the saved login
  server     Manage servers (ping, add, set-default, list)
  version    Print the version

Options:
  --root-dir <ROOT_DIR>
  --config-path <CONFIG_PATH>
  -h, --help
  -V, --version"""


def main(argv: list[str]) -> int:
    # SIGINT is only handled once the server is serving; before that it kills, like the real binary.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    exe = os.environ.get("STANDIN_EXE") or os.path.abspath(sys.argv[0])
    root_dir: str | None = None
    config_path: str | None = None
    i = 0
    try:
        while i < len(argv):
            a = argv[i]
            if a in ("--root-dir", "--config-path"):
                if i + 1 >= len(argv):
                    raise UsageError(f"error: a value is required for '{a} <{a[2:].upper().replace('-', '_')}>'")
                if a == "--root-dir":
                    root_dir = argv[i + 1]
                else:
                    config_path = argv[i + 1]
                i += 2
            elif a.startswith("--root-dir="):
                root_dir = a.split("=", 1)[1]
                i += 1
            elif a.startswith("--config-path="):
                config_path = a.split("=", 1)[1]
                i += 1
            else:
                break
        rest = argv[i:]
        if not rest or rest[0] in ("-h", "--help", "help"):
            println(USAGE)
            return 0 if rest else 2
        cmd, args = rest[0], rest[1:]
        if cmd in ("-V", "--version", "version"):
            return print_version(exe)
        if cmd == "start":
            return cmd_start(args, root_dir)
        from .client import run_client

        return run_client(cmd, args, root_dir, config_path)
    except UsageError as err:
        eprintln(str(err))
        return 2
    except CliError as err:
        eprintln(err.render())
        return err.code
