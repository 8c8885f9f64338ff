"""The client side of the ``spacetime`` CLI (reference §4), enough for scripts and smoke tests.

Implemented: ``server ping|add|set-default|list``, ``login --server-issued-login|--token|show``,
``logout``, ``publish -b``, ``sql``, ``call``, ``logs``, ``list``, ``delete``.  Uses only the standard
library (urllib), so these commands start fast and never import the server.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import sys
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, NoReturn

from .common import CliError, UsageError, Version, eprintln, println

UNSTABLE = "WARNING: This command is UNSTABLE and subject to breaking changes.\n"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"error: {message}\n\n{self.format_usage().strip()}")


# ---------------------------------------------------------------------------------------------
# cli.toml


@dataclass
class ServerConfig:
    nickname: str
    host: str
    protocol: str
    ecdsa_public_key: str | None = None

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.host}"


@dataclass
class CliConfig:
    path: str
    default_server: str | None = "maincloud"
    spacetimedb_token: str | None = None
    web_session_token: str | None = None
    servers: list[ServerConfig] = field(default_factory=list)

    @classmethod
    def load(cls, path: str) -> CliConfig:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            cfg = cls(path, servers=[
                ServerConfig("maincloud", "maincloud.spacetimedb.com", "https"),
                ServerConfig("local", "127.0.0.1:3000", "http"),
            ])
            cfg.save()
            return cfg
        except tomllib.TOMLDecodeError as err:
            raise CliError(f"failed to parse {path}", str(err)) from None
        servers = [
            ServerConfig(s["nickname"], s["host"], s.get("protocol", "https"), s.get("ecdsa_public_key"))
            for s in data.get("server_configs", [])
        ]
        return cls(path, data.get("default_server"), data.get("spacetimedb_token"), data.get("web_session_token"),
                   servers)

    def save(self) -> None:
        lines: list[str] = []
        for key in ("default_server", "spacetimedb_token", "web_session_token"):
            value = getattr(self, key)
            if value is not None:
                lines.append(f"{key} = {json.dumps(value)}")
        for s in self.servers:
            lines += ["", "[[server_configs]]", f"nickname = {json.dumps(s.nickname)}", f"host = {json.dumps(s.host)}",
                      f"protocol = {json.dumps(s.protocol)}"]
            if s.ecdsa_public_key:
                lines.append(f"ecdsa_public_key = {json.dumps(s.ecdsa_public_key)}")
        eprintln(f"Saving config to {self.path}.")
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "w") as f:
            f.write("\n".join(lines) + "\n")

    def find(self, server: str | None) -> tuple[str, str]:
        """Resolve ``-s``: nickname, host, or URL -> (nickname or "<default>", base URL)."""
        name = server or self.default_server
        if name is None:
            raise CliError("No default server configuration.")
        if "://" in name:
            for s in self.servers:
                if s.url == name.rstrip("/"):
                    return s.nickname, s.url
            return "<default>" if server is None else name, name.rstrip("/")
        for s in self.servers:
            if s.nickname == name or s.host == name:
                return s.nickname, s.url
        raise CliError(
            f"No such saved server configuration: {name}\nAdd a new server configuration with:\n"
            f"\tspacetime server add {name} --url <url>"
        )


def config_path(root_dir: str | None, explicit: str | None) -> str:
    if explicit:
        return explicit
    if root_dir:
        return os.path.join(root_dir, "config", "cli.toml")
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "spacetime", "cli.toml")


# ---------------------------------------------------------------------------------------------
# HTTP


@dataclass
class Reply:
    status: int
    body: bytes
    url: str

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def status_text(self) -> str:
        try:
            return f"{self.status} {HTTPStatus(self.status).phrase}"
        except ValueError:
            return str(self.status)


def request(method: str, url: str, *, token: str | None = None, body: bytes | None = None,
            content_type: str | None = None, stream: bool = False) -> Reply:
    headers = {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if content_type:
        headers["Content-Type"] = content_type
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=None if stream else 30)
    except urllib.error.HTTPError as err:
        return Reply(err.code, err.read(), url)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        cause = f"{reason.strerror} (os error {reason.errno})" if isinstance(reason, OSError) and reason.errno \
            else str(reason)
        raise CliError(f"error sending request for url ({url})", cause) from None
    if stream:
        for raw in resp:
            sys.stdout.write(raw.decode(errors="replace"))
            sys.stdout.flush()
        return Reply(resp.status, b"", url)
    return Reply(resp.status, resp.read(), url)


def http_error(reply: Reply) -> CliError:
    kind = "client error" if reply.status < 500 else "server error"
    return CliError(reply.text, f"HTTP status {kind} ({reply.status_text()}) for url ({reply.url})")


def token_identity(token: str) -> str:
    from .auth import from_claims  # blake3 only; cheap

    try:
        payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    except (ValueError, IndexError):
        raise CliError("the saved token is malformed") from None
    return str(payload.get("hex_identity") or from_claims(payload["iss"], payload["sub"]))


# ---------------------------------------------------------------------------------------------
# commands


class Ctx:
    def __init__(self, root_dir: str | None, cfg_path: str | None) -> None:
        self.cfg = CliConfig.load(config_path(root_dir, cfg_path))
        self.version = Version.from_env()

    def token(self, url: str, anonymous: bool, yes: bool) -> str | None:
        """The saved token; without one, a silent server-issued login (``-y`` or EOF on the prompt)."""
        if anonymous:
            return None
        if self.cfg.spacetimedb_token:
            return self.cfg.spacetimedb_token
        if not yes:
            println("You are not logged in. Would you like to log in with spacetimedb.com? [y/N]")
        reply = request("POST", f"{url}/v1/identity")
        if reply.status != 200:
            raise http_error(reply)
        self.cfg.spacetimedb_token = json.loads(reply.body)["token"]
        self.cfg.save()
        return self.cfg.spacetimedb_token

    def resolve_db(self, url: str, name: str) -> str:
        reply = request("GET", f"{url}/v1/database/{urllib.parse.quote(name)}/identity")
        if reply.status == 404:
            raise CliError(f"the dns resolution of `{name}` failed.")
        if reply.status != 200:
            raise http_error(reply)
        return reply.text.strip()


def _common(p: argparse.ArgumentParser, anonymous: bool = True) -> None:
    p.add_argument("-s", "--server")
    p.add_argument("-y", "--yes", action="store_true")
    if anonymous:
        p.add_argument("--anonymous", action="store_true")


def cmd_server(ctx: Ctx, argv: list[str]) -> int:
    p = _Parser(prog="spacetime server")
    sub = p.add_subparsers(dest="sub", required=True)
    ping = sub.add_parser("ping")
    ping.add_argument("server", nargs="?")
    add = sub.add_parser("add")
    add.add_argument("name")
    add.add_argument("--url", required=True)
    add.add_argument("-d", "--default", action="store_true")
    add.add_argument("--no-fingerprint", action="store_true")
    sd = sub.add_parser("set-default")
    sd.add_argument("server")
    sub.add_parser("list")
    ns = p.parse_args(argv)
    eprintln(UNSTABLE)
    cfg = ctx.cfg
    if ns.sub == "ping":
        _, url = cfg.find(ns.server)
        reply = request("GET", f"{url}/v1/ping")
        if 200 <= reply.status < 300:
            println(f"Server is online: {url}")
        elif reply.status == 404:
            println(f"Server returned 404 (Not Found): {url}")
        else:
            println(f"Server could not be reached ({reply.status_text()}): {url}")
        return 0
    if ns.sub == "add":
        parsed = urllib.parse.urlparse(ns.url)
        host, protocol = parsed.netloc, parsed.scheme or "https"
        if any(s.nickname == ns.name for s in cfg.servers):
            s = next(s for s in cfg.servers if s.nickname == ns.name)
            raise CliError(f"Server nickname {ns.name} already in use: {s.protocol}://{s.host}")
        if any(s.host == host for s in cfg.servers):
            raise CliError(f"Server already configured for host: {host}")
        pem = None
        if not ns.no_fingerprint:
            try:
                reply = request("GET", f"{protocol}://{host}/v1/identity/public-key")
            except CliError:
                reply = None
            if reply is None or reply.status != 200:
                raise CliError(f"Unable to retrieve fingerprint for server: {ns.url}\nIs the server running?\n"
                               "Add a server without retrieving its fingerprint with:\n"
                               f"\tspacetime server add --url {ns.url} --no-fingerprint")
            pem = reply.text
            println(f"For server {ns.url}, got fingerprint:\n{pem}")
        cfg.servers.append(ServerConfig(ns.name, host, protocol, pem))
        if ns.default:
            cfg.default_server = ns.name
        cfg.save()
        println(f"Host: {host}")
        println(f"Protocol: {protocol}")
        return 0
    if ns.sub == "set-default":
        if not any(s.nickname == ns.server or s.host == ns.server for s in cfg.servers):
            raise CliError(f"Cannot set default server to unknown server {ns.server}")
        cfg.default_server = next(s.nickname for s in cfg.servers if ns.server in (s.nickname, s.host))
        cfg.save()
        return 0
    rows = [("***" if s.nickname == cfg.default_server else "", s.host, s.protocol, s.nickname) for s in cfg.servers]
    header = ("DEFAULT", "HOSTNAME", "PROTOCOL", "NICKNAME")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for r in [header, *rows]:
        println(" " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_login(ctx: Ctx, argv: list[str]) -> int:
    if argv[:1] == ["show"]:
        p = _Parser(prog="spacetime login show")
        p.add_argument("--token", action="store_true")
        ns = p.parse_args(argv[1:])
        token = ctx.cfg.spacetimedb_token
        if not token:
            println("You are not logged in. Run `spacetime login` to log in.")
            return 0
        println(f"You are logged in as {token_identity(token)}")
        if ns.token:
            println(f"Your auth token (don't share this!) is {token}")
        return 0
    p = _Parser(prog="spacetime login")
    p.add_argument("--server-issued-login")
    p.add_argument("--token")
    ns = p.parse_args(argv)
    if ns.token:
        ctx.cfg.spacetimedb_token = ns.token
        ctx.cfg.save()
        return 0
    if ns.server_issued_login is None:
        raise CliError("the stand-in cannot do the spacetimedb.com browser login; use --server-issued-login")
    if ctx.cfg.spacetimedb_token:
        println("You are already logged in.\nIf you want to log out, use spacetime logout.")
        return 0
    _, url = ctx.cfg.find(ns.server_issued_login)
    reply = request("POST", f"{url}/v1/identity")
    if reply.status != 200:
        raise http_error(reply)
    ctx.cfg.spacetimedb_token = json.loads(reply.body)["token"]
    ctx.cfg.save()
    println("We have logged in directly to your target server.")
    println("WARNING: This login will NOT work for any other servers.")
    return 0


def cmd_logout(ctx: Ctx, argv: list[str]) -> int:
    _Parser(prog="spacetime logout").parse_args(argv)
    ctx.cfg.spacetimedb_token = None
    ctx.cfg.web_session_token = None
    ctx.cfg.save()
    return 0


def cmd_publish(ctx: Ctx, argv: list[str]) -> int:
    p = _Parser(prog="spacetime publish")
    _common(p)
    p.add_argument("name", nargs="?")
    p.add_argument("-b", "--bin-path")
    p.add_argument("-p", "--project-path", "--module-path")
    p.add_argument("-j", "--js-path")
    p.add_argument("--break-clients", action="store_true")
    p.add_argument("--num-replicas")
    p.add_argument("--build-options")
    if ctx.version.at_least(1, 9):
        p.add_argument("-c", "--delete-data", "--clear-database", nargs="?", const="always", default="never",
                       choices=["always", "on-conflict", "never"])
    else:
        p.add_argument("-c", "--delete-data", action="store_const", const="always", default="never")
    ns = p.parse_args(argv)
    path = ns.bin_path or ns.js_path
    if not path:
        raise CliError("the stand-in cannot build modules: pass -b/--bin-path <module.wasm>")
    if ns.delete_data != "never" and not ns.name:
        raise UsageError("error: --delete-data requires a database name")
    try:
        with open(path, "rb") as f:
            program = f.read()
    except OSError as err:
        raise CliError(f"Failed to read {path}", f"{err.strerror} (os error {err.errno})") from None
    println(f"({'JS' if ns.js_path else 'WASM'}) Skipping build. Instead we are publishing {path}")
    nick, url = ctx.cfg.find(ns.server)
    host = urllib.parse.urlparse(url).hostname or ""
    if host not in ("localhost", "127.0.0.1"):
        println(f"You are about to publish to a non-local server: {host}")
        if not ns.yes:
            raise CliError("Aborting")
    token = ctx.token(url, ns.anonymous, ns.yes)
    println(f"Uploading to {nick} => {url}")
    params: dict[str, str] = {"host_type": "Js" if ns.js_path else "Wasm"}
    if ns.name and ns.delete_data != "always":
        println("Checking for breaking changes...")
        reply = request("POST", f"{url}/v1/database/{urllib.parse.quote(ns.name)}/pre_publish", token=token,
                        body=program)
        if reply.status != 404:
            if not 200 <= reply.status < 300:
                raise CliError(f"Pre-publish check failed with status {reply.status_text()}: {reply.text}")
            plan = json.loads(reply.body)
            println(str(plan.get("migrate_plan", "")))
            params["token"] = str(plan.get("token", ""))
            params["policy"] = "BreakClients" if plan.get("break_clients") or ns.break_clients else "Compatible"
    if ns.delete_data == "always":
        println(f"This will DESTROY the current {ns.name} module, and ALL corresponding data.")
        if ns.yes:
            println("Skipping confirmation due to --yes")
        else:
            println(f"Are you sure you want to proceed? [deleting {ns.name}]")
            raise CliError("Aborting")
        params["clear"] = "true"
    println("Publishing module...")
    query = urllib.parse.urlencode(params)
    if ns.name:
        reply = request("PUT", f"{url}/v1/database/{urllib.parse.quote(ns.name)}?{query}", token=token, body=program)
    else:
        reply = request("POST", f"{url}/v1/database?{query}", token=token, body=program)
    if reply.status == 401 and token:
        raise CliError(f"Identity {token_identity(token)} is not valid for server {url}.\n"
                       "Please log back in with `spacetime logout` and then `spacetime login`.")
    try:
        body = json.loads(reply.body)
    except ValueError:
        body = None
    if not isinstance(body, dict) or "Success" not in body:
        if isinstance(body, dict) and "PermissionDenied" in body:
            raise CliError(f"Permission denied: the name {body['PermissionDenied'].get('name')} is owned by "
                           "another identity")
        raise http_error(reply)
    ok = body["Success"]
    verb = "Created new" if ok["op"] == "created" else "Updated"
    if ok.get("domain"):
        println(f"{verb} database with name: {ok['domain']}, identity: {ok['database_identity']}")
    else:
        println(f"{verb} database with identity: {ok['database_identity']}")
    return 0


def _cell(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str) and value[0].startswith("0x"):
        return value[0]
    return json.dumps(value)


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    println("|".join(f" {h.ljust(w)} " for h, w in zip(headers, widths, strict=True)))
    println("+".join("-" * (w + 2) for w in widths))
    for r in rows:
        println("|".join(f" {c.ljust(w)} " for c, w in zip(r, widths, strict=True)))


def cmd_sql(ctx: Ctx, argv: list[str]) -> int:
    p = _Parser(prog="spacetime sql")
    _common(p)
    p.add_argument("database")
    p.add_argument("query")
    p.add_argument("--confirmed", action="store_true")
    p.add_argument("--interactive", action="store_true")
    ns = p.parse_args(argv)
    eprintln(UNSTABLE)
    _, url = ctx.cfg.find(ns.server)
    token = ctx.token(url, ns.anonymous, ns.yes)
    db = ctx.resolve_db(url, ns.database)
    reply = request("POST", f"{url}/v1/database/{db}/sql", token=token, body=ns.query.encode(),
                    content_type="text/plain")
    if reply.status != 200:
        raise http_error(reply)
    for result in json.loads(reply.body):
        elements = result["schema"]["elements"]
        if not elements:
            println()
            continue
        headers = [(e["name"] or {}).get("some", "") for e in elements]
        print_table(headers, [[_cell(v) for v in row] for row in result["rows"]])
    return 0


def cmd_call(ctx: Ctx, argv: list[str]) -> int:
    p = _Parser(prog="spacetime call")
    _common(p)
    p.add_argument("database")
    p.add_argument("reducer")
    p.add_argument("arguments", nargs="*")
    ns = p.parse_args(argv)
    eprintln(UNSTABLE)
    _, url = ctx.cfg.find(ns.server)
    token = ctx.token(url, ns.anonymous, ns.yes)
    db = ctx.resolve_db(url, ns.database)
    schema = request("GET", f"{url}/v1/database/{db}/schema?version=9")
    params: list[Any] = []
    if schema.status == 200:
        for r in json.loads(schema.body).get("reducers", []):
            if r["name"] == ns.reducer:
                params = r["params"]["elements"]
    args: list[Any] = []
    for i, raw in enumerate(ns.arguments):
        is_string = i < len(params) and "String" in params[i]["algebraic_type"]
        if is_string and not (raw.startswith('"') and raw.endswith('"')):
            args.append(raw)
        else:
            try:
                args.append(json.loads(raw))
            except ValueError:
                args.append(raw)
    reply = request("POST", f"{url}/v1/database/{db}/call/{urllib.parse.quote(ns.reducer)}", token=token,
                    body=json.dumps(args).encode(), content_type="application/json")
    if not 200 <= reply.status < 300:
        raise CliError(f"Response text: {reply.text}")
    return 0


def cmd_logs(ctx: Ctx, argv: list[str]) -> int:
    p = _Parser(prog="spacetime logs")
    _common(p, anonymous=False)
    p.add_argument("database")
    p.add_argument("-n", "--num-lines", type=int)
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--format", choices=["text", "json"], default="text")
    ns = p.parse_args(argv)
    _, url = ctx.cfg.find(ns.server)
    token = ctx.token(url, False, ns.yes)
    db = ctx.resolve_db(url, ns.database)
    q: dict[str, str] = {"follow": "true" if ns.follow else "false"}
    if ns.num_lines is not None:
        q["num_lines"] = str(ns.num_lines)
    elif ns.follow:
        q["num_lines"] = "10"
    reply = _logs_request(f"{url}/v1/database/{db}/logs?{urllib.parse.urlencode(q)}", token, ns.format)
    if reply is not None and reply.status != 200:
        raise CliError(reply.text)
    return 0


def _format_log(line: str, fmt: str) -> str:
    if fmt == "json" or not line.strip():
        return line
    rec = json.loads(line)
    import datetime

    ts = datetime.datetime.fromtimestamp(rec["ts"] / 1e6, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    where = f"{rec.get('filename')}:{rec.get('line_number')}" if rec.get("filename") else ""
    return f"{ts} {rec['level'].upper():>5}: {rec.get('function') or ''} {where}: {rec['message']}\n"


def _logs_request(url: str, token: str | None, fmt: str) -> Reply | None:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        resp = urllib.request.urlopen(req)
    except urllib.error.HTTPError as err:
        return Reply(err.code, err.read(), url)
    except (urllib.error.URLError, OSError) as err:
        raise CliError(f"error sending request for url ({url})", str(getattr(err, "reason", err))) from None
    for raw in resp:
        sys.stdout.write(_format_log(raw.decode(errors="replace"), fmt))
        sys.stdout.flush()
    return None


def cmd_list(ctx: Ctx, argv: list[str]) -> int:
    p = _Parser(prog="spacetime list")
    _common(p, anonymous=False)
    ns = p.parse_args(argv)
    eprintln(UNSTABLE)
    _, url = ctx.cfg.find(ns.server)
    token = ctx.token(url, False, ns.yes)
    assert token is not None
    ident = token_identity(token)
    reply = request("GET", f"{url}/v1/identity/{ident}/databases", token=token)
    if reply.status != 200:
        raise http_error(reply)
    dbs = json.loads(reply.body).get("identities", [])
    if not dbs:
        println(f"No databases found for {ident}.")
        return 0
    println(f"Associated database identities for {ident}:\n")
    print_table(["db_identity"], [[d] for d in dbs])
    return 0


def cmd_delete(ctx: Ctx, argv: list[str]) -> int:
    p = _Parser(prog="spacetime delete")
    _common(p, anonymous=False)
    p.add_argument("database")
    ns = p.parse_args(argv)
    _, url = ctx.cfg.find(ns.server)
    token = ctx.token(url, False, ns.yes)
    db = ctx.resolve_db(url, ns.database)
    reply = request("DELETE", f"{url}/v1/database/{db}", token=token)
    if not 200 <= reply.status < 300:
        raise http_error(reply)
    return 0


COMMANDS = {
    "server": cmd_server, "login": cmd_login, "logout": cmd_logout, "publish": cmd_publish, "sql": cmd_sql,
    "call": cmd_call, "logs": cmd_logs, "list": cmd_list, "delete": cmd_delete,
}


def run_client(cmd: str, argv: list[str], root_dir: str | None, cfg_path: str | None) -> int:
    fn = COMMANDS.get(cmd)
    if fn is None:
        raise UsageError(f"error: unrecognized subcommand '{cmd}'\n\nUsage: spacetime [OPTIONS] <COMMAND>")
    return fn(Ctx(root_dir, cfg_path), argv)
