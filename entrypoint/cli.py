"""Command line: ``run`` (default), ``check``, ``render``, ``status``, ``probe``, ``identity``, ``owner``,
``backup``, ``restore``.

Exit codes (README, docs/operations.md): 0 requested stop or success; 78 invalid
configuration; 69 a dependency unavailable past its deadline; a crashed
child's code or 128+signal; 70 internal error; 1 a failed probe; 65 ``owner
set`` on a database that is not a Pogly module; ``backup``/``restore``: 65 invalid
archive, 66 unreadable archive, 69 no supervisor, 73 cannot create the output, 74 I/O
error, 75 try again (busy, pause expired, container still serving).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

from entrypoint.errors import EXIT_CONFIG, EXIT_SOFTWARE, EXIT_UNAVAILABLE
from entrypoint.version import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pogly-entrypoint",
        description="PID 1 of the Pogly container: supervises SpacetimeDB and Caddy. "
        "Configuration comes from the environment (see README).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="start and supervise everything (the default)")
    sub.add_parser("check", help="validate configuration, Caddyfile and OIDC provider; print the settings")
    sub.add_parser("render", help="print the rendered Caddyfile and config.js")
    pi = sub.add_parser("patch-index", help="(image build) make WEB_ROOT/index.html load /config.js")
    pi.add_argument("web_root", help="the built web app, e.g. /usr/share/caddy")
    st = sub.add_parser("status", help="show the running supervisor's status")
    st.add_argument("--json", action="store_true", help="print the raw JSON")
    pr = sub.add_parser("probe", help="exit 0 when ready/live, 1 otherwise (Kubernetes exec probes, HEALTHCHECK)")
    pr.add_argument("which", choices=("ready", "live"))
    pr.add_argument("--timeout", type=float, default=2.0)
    oc = sub.add_parser("oidc-check", help="(internal) one OIDC discovery check of the settings `run` hands over "
                        "as JSON, result as JSON on stdout")
    oc.add_argument("--settings", default="-", metavar="FILE",
                    help="the settings as Settings.to_json() wrote them; - (default): read them from stdin")
    oc.add_argument("--timeout", type=float, help="seconds (default: the settings' OIDC_DISCOVERY_TIMEOUT)")
    ident = sub.add_parser("identity", help="print the SpacetimeDB identity an OIDC subject will have")
    ident.add_argument("--sub", required=True, help="the 'sub' claim")
    ident.add_argument("--issuer", help="the 'iss' claim (default: OIDC_ISSUER)")
    owner = sub.add_parser("owner", help="show or set the owner of the Pogly databases (inside the container)")
    owner_sub = owner.add_subparsers(dest="owner_action", required=True)
    show = owner_sub.add_parser("show", help="each module's owner, how it got there, and its Owner permissions")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.add_argument("--module", help="only this database (one of MODULES)")
    oset = owner_sub.add_parser("set", help="make an identity the one owner of every Pogly module")
    who = oset.add_mutually_exclusive_group(required=True)
    who.add_argument("--sub", help="the OIDC 'sub' claim of the new owner")
    who.add_argument("--identity", help="the new owner's identity: 64 hex digits, optionally 0x-prefixed")
    oset.add_argument("--issuer", help="with --sub: the 'iss' claim (default: OIDC_ISSUER)")
    oset.add_argument("--module", help="only this database (one of MODULES)")
    oset.add_argument("--json", action="store_true", help="print JSON")
    bk = sub.add_parser("backup", help="pause SpacetimeDB for about a second and archive both volumes into one "
                        ".tar.gz (inside the running container); exit 0, 69, 73, 74, 75")
    bk.add_argument("--to", required=True, metavar="PATH",
                    help="the archive to write (mode 0600; via PATH.partial and a rename); - : stdout")
    bk.add_argument("--offline", action="store_true",
                    help="no supervisor runs (container stopped): copy the volumes as they are")
    bk.add_argument("--max-pause", type=float, default=300.0, metavar="SECONDS",
                    help="start SpacetimeDB again after this long whatever happens (default 300; the copy then fails)")
    rs = sub.add_parser("restore", help="put an archive from `backup` back (the container must not be serving); "
                        "exit 0, 65, 66, 74, 75")
    rs.add_argument("archive", help="the .tar.gz written by `pogly-entrypoint backup`")
    rs.add_argument("--discard-old", action="store_true",
                    help="remove the previous contents after a successful restore instead of keeping them in "
                    "<dir>/.pogly-pre-restore-<time>/")
    return parser


def main(argv: list[str], pending: list[tuple[int, float]] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "run"
    if command != "run":
        # __main__ catches SIGTERM/SIGINT early for the supervisor's sake; the
        # short commands want Ctrl-C and SIGTERM to simply end them.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if pending:
            return 128 + pending[0][0]
    try:
        if command == "run":
            return cmd_run(pending if pending is not None else [])
        if command == "check":
            return cmd_check()
        if command == "render":
            return cmd_render()
        if command == "patch-index":
            return cmd_patch_index(args.web_root)
        if command == "status":
            return cmd_status(args.json)
        if command == "probe":
            return cmd_probe(args.which, args.timeout)
        if command == "identity":
            return cmd_identity(args.sub, args.issuer)
        if command == "oidc-check":
            return cmd_oidc_check(args.settings, args.timeout)
        if command == "owner":
            return cmd_owner(args)
        if command in ("backup", "restore"):
            return cmd_backup_restore(args)
    except KeyboardInterrupt:
        return 130
    return EXIT_SOFTWARE


def _settings_or_exit() -> Any:
    from entrypoint import config

    try:
        return config.load()
    except config.ConfigError as exc:
        # Only here: logs imports structlog and, through it, asyncio (~70 ms), which the
        # start path must not wait for (SpacetimeDB is spawned next; tests/test_startup.py).
        from entrypoint import logs

        fmt = os.environ.get("LOG_FORMAT", "auto").strip().lower()
        logs.configure(fmt if fmt in config.LOG_FORMATS else "auto")
        logs.get().error("config.invalid", message=str(exc), exit_code=EXIT_CONFIG,
                         problems=[str(p) for p in exc.problems])
        raise SystemExit(EXIT_CONFIG) from None


def cmd_run(pending: list[tuple[int, float]]) -> int:
    """The container's ``ENTRYPOINT``: the whole order of things is ``entrypoint/startup.py``."""
    settings = _settings_or_exit()
    from entrypoint import startup

    startup.run(settings, pending)


def cmd_check() -> int:
    import asyncio

    settings = _settings_or_exit()
    from entrypoint import logs

    logs.configure("console" if sys.stdout.isatty() else "json", settings.debug_mode, stream=sys.stderr,
                   level=settings.log_level)
    print(json.dumps({"settings": settings.public_view()}, indent=2))
    return asyncio.run(_check(settings))


async def _check(settings: Any) -> int:
    import asyncio

    from entrypoint.oidc import check as oidc
    from entrypoint.oidc.errors import OidcConfigError, OidcUnavailable
    from entrypoint.supervision.process import Reaper, run_capture
    from entrypoint.web import caddy, webapp
    from entrypoint.web import config_js as webconfig

    reaper = Reaper()
    reaper.install(asyncio.get_running_loop())
    code = 0
    try:
        import tempfile
        from dataclasses import replace
        from pathlib import Path

        with tempfile.TemporaryDirectory(prefix="pogly-check-") as tmp:
            scratch = replace(settings, run_dir=Path(tmp))
            path = caddy.write(scratch, caddy.render(scratch))
            webconfig.write_config_js(scratch)

            async def runner(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, bytes, bytes]:
                return await run_capture(argv, env, timeout, reaper)

            try:
                await caddy.validate(scratch, path, runner)
                print("Caddyfile: valid")
            except caddy.CaddyConfigError as exc:
                print(f"Caddyfile: INVALID\n{exc}")
                code = EXIT_CONFIG
            except TimeoutError:
                print(f"Caddyfile: NOT CHECKED: `caddy validate` did not finish within {caddy.VALIDATE_TIMEOUT:g} s "
                      f"(CADDY_BIN={settings.caddy_bin}); check that binary by hand")
                code = EXIT_UNAVAILABLE
        build = webapp.detect(settings.web_root)
        print(f"Web build: {build.verdict} ({build.reason})")
        problem = webapp.problem(settings, build)
        if problem is not None:
            print(f"  {'INVALID under STRICT_MODE' if settings.strict_mode else 'WARNING'}: {problem}")
            if settings.strict_mode:
                code = code or EXIT_CONFIG
        if not settings.oidc_enabled:
            print("OIDC provider: disabled (OIDC_ISSUER and OIDC_CLIENT_ID are empty: anonymous mode, nothing "
                  "to check, no redirect URIs to register; `pogly-entrypoint owner set` gives a database an owner)")
            return code
        print("Redirect URIs to register at the provider:")
        for uri in oidc.redirect_uris(settings):
            print(f"  {uri}")
        note = oidc.redirect_uris_note(settings)
        if note:
            print(f"  note: {note}")
        try:
            report = await oidc.check_provider(settings)
            print(f"OIDC provider: verified ({report.issuer})")
            for note in report.notes:
                print(f"  note: {note}")
        except OidcConfigError as exc:
            print(f"OIDC provider: INVALID\n{exc}")
            code = code or EXIT_CONFIG
        except OidcUnavailable as exc:
            print(f"OIDC provider: UNREACHABLE\n{exc}")
            code = code or EXIT_UNAVAILABLE
    finally:
        reaper.uninstall()
    return code


def cmd_render() -> int:
    settings = _settings_or_exit()
    from entrypoint.web import caddy
    from entrypoint.web import config_js as webconfig

    try:
        caddyfile = caddy.render(settings)
    except caddy.CaddyConfigError as exc:
        print(f"Caddyfile: cannot render\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    print("# ---- Caddyfile ----")
    print(caddyfile)
    print("// ---- config.js ----")
    print(webconfig.render_config_js(settings))
    return 0


def cmd_patch_index(web_root: str) -> int:
    """At image build (Dockerfile): ``index.html`` loads ``/config.js``, so a read-only root needs no write
    at start.  0 when it does (now or already), 1 when it cannot (no ``index.html``, not writable)."""
    from pathlib import Path

    from entrypoint import logs
    from entrypoint.web import config_js as webconfig

    logs.configure("json", stream=sys.stderr)
    return 0 if webconfig.ensure_index_loads_config(Path(web_root)) else 1


def _health_addr() -> Any:
    """``POGLY_HEALTH_ADDR`` alone, through its row of the configuration table: these commands run beside
    the supervisor, so the rest of the environment may be incomplete (``kubectl exec`` shells, probes)."""
    from entrypoint import config

    try:
        return config.read("POGLY_HEALTH_ADDR")
    except config.ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def cmd_probe(which: str, timeout: float) -> int:
    from entrypoint.web.health import main_probe

    return main_probe(_health_addr(), which, timeout)  # type: ignore[arg-type]


def cmd_status(as_json: bool) -> int:
    import asyncio

    from entrypoint.web.health import HealthError, fetch_status

    addr = _health_addr()
    try:
        data = asyncio.run(fetch_status(addr))
    except (OSError, HealthError) as exc:
        print(f"no supervisor answers on {addr} ({exc}); is pogly-entrypoint running? "
              "(set POGLY_HEALTH_ADDR if it listens elsewhere)", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        print(format_status(data))
    return 0 if data.get("ready") else 1


def format_status(data: dict[str, Any]) -> str:
    lines = [f"ready: {'yes' if data.get('ready') else 'no'}"]
    for reason in data.get("not_ready", []):
        lines.append(f"  not ready: {reason}")
    lines.append(f"oidc: {data.get('oidc')}")
    web = data.get("webapp") or {}
    lines.append(f"web app: {web.get('verdict', '-')}" + (f" ({web['reason']})" if web.get("reason") else ""))
    lines.append(f"publisher identity: {data.get('publisher_identity') or '-'}")
    lines.append("children:")
    for name, child in data.get("children", {}).items():
        uptime = child.get("uptime_s")
        lines.append(f"  {name:<12} {child.get('state'):<9} pid={child.get('pid') or '-'} "
                     f"restarts={child.get('restarts')} uptime={uptime if uptime is not None else '-'}s"
                     + (f" last_exit={child['last_exit']}" if child.get("last_exit") else ""))
    lines.append("modules:")
    for name, mod in data.get("modules", {}).items():
        lines.append(f"  {name}: database={mod.get('database_identity') or '-'} "
                     f"publish={mod.get('publish_result')} hash={(mod.get('published_hash') or '-')[:16]}")
        lines.append(f"    ownership={mod.get('ownership')} owner={mod.get('owner_identity') or '-'}"
                     + (f" via {mod['claimed_by']}" if mod.get("claimed_by") else ""))
    return "\n".join(lines)


def cmd_oidc_check(source: str, timeout: float | None) -> int:
    """One discovery check in a process of its own (see ``entrypoint/oidc/verdict.py`` for why).

    The settings come as JSON (``Settings.to_json()``) in the file ``source``
    or on stdin (``-``), so the helper checks exactly what the supervisor
    resolved instead of re-reading the environment.  Progress events go to
    stderr as JSON lines, which the supervisor relays into its own log; the
    verdict is one JSON object on stdout; the exit code is 0, 78 (the
    provider's answer is wrong), 69 (no usable answer in time) or 70 (no
    settings were handed over: a bug, or a person who wanted ``check``).
    """
    import asyncio
    from dataclasses import replace
    from pathlib import Path

    from entrypoint import logs
    from entrypoint.config import Settings

    try:
        if source == "-" and sys.stdin.isatty():  # a person at a terminal: say what to do instead of waiting
            raise ValueError("stdin is a terminal")
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
        settings = Settings.from_json(json.loads(text))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        where = "stdin" if source == "-" else source
        print(json.dumps({"ok": False, "reason": "bad_input",
                          "message": f"oidc-check reads the settings as JSON from {where} ({exc}); it is run by "
                                     "`pogly-entrypoint run`: use `pogly-entrypoint check` to check the provider "
                                     "by hand"}))
        return EXIT_SOFTWARE
    from entrypoint.oidc import check as oidc
    from entrypoint.oidc.errors import OidcError

    logs.configure("json", settings.debug_mode, stream=sys.stderr, level=settings.log_level)
    if not settings.oidc_enabled:  # OIDC off: the supervisor never asks; answer plainly if a person does
        print(json.dumps({"ok": True, "disabled": True,
                          "message": "OIDC_ISSUER and OIDC_CLIENT_ID are empty (OIDC off): nothing to check"}))
        return 0
    if timeout is not None:
        settings = replace(settings, oidc_discovery_timeout=timeout)
    try:
        report = asyncio.run(oidc.check_provider(settings))
    except OidcError as exc:
        print(json.dumps({"ok": False, "reason": exc.reason, "message": str(exc)}))
        return exc.exit_code
    print(json.dumps({"ok": True, "report": report.to_json()}))
    return 0


def cmd_identity(sub: str, issuer: str | None) -> int:
    from entrypoint import config
    from entrypoint.spacetimedb.identity import from_claims

    if not issuer:
        try:
            issuer = config.read("OIDC_ISSUER")
        except config.ConfigError as exc:
            print(f"{exc}\ngive --issuer or fix OIDC_ISSUER", file=sys.stderr)
            return EXIT_CONFIG
    if not issuer:
        print("give --issuer or set OIDC_ISSUER (it is empty or unset: with OIDC off there is no default "
              "issuer)", file=sys.stderr)
        return EXIT_CONFIG
    print(from_claims(issuer, sub))
    return 0


def cmd_backup_restore(args: argparse.Namespace) -> int:
    """``backup`` / ``restore``: see entrypoint/spacetimedb/backup.py (exit 0, 65, 66, 69, 73, 74, 75, 78)."""
    from pathlib import Path

    from entrypoint import config
    from entrypoint.spacetimedb import backup

    try:
        places = backup.Places.from_env()
    except config.ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "backup":
        if not 0 < args.max_pause <= 3600:
            print("pogly-entrypoint backup: --max-pause: seconds, above 0 and at most 3600", file=sys.stderr)
            return 2  # a usage error, as argparse reports them
        return backup.backup(places, args.to, offline=args.offline, max_pause=args.max_pause, err=sys.stderr)
    return backup.restore(places, Path(args.archive), discard_old=args.discard_old, out=sys.stdout, err=sys.stderr)


def cmd_owner(args: argparse.Namespace) -> int:
    """``owner show|set``: see entrypoint/owner_admin.py (exit 0, 65 not Pogly, 69, 70, 78)."""
    settings = _settings_or_exit()
    from entrypoint.spacetimedb.owner_admin import main as owner_main

    return owner_main(settings, args.owner_action, as_json=args.json, module=args.module,
                      sub=getattr(args, "sub", None), issuer=getattr(args, "issuer", None),
                      identity=getattr(args, "identity", None))
