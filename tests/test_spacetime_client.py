"""The SpacetimeDB-facing modules (spacetime, stdbhttp, publisher, statefile, sqlapi, publish,
modulelogs): pure helpers, the HTTP client against a mock transport, then against the stand-in.

The mock-transport tests pin down behaviour the stand-in cannot easily be
made to show (transient 5xx, unreachable server, every refusal shape); the
stand-in tests prove the whole flow across real restarts on the same volumes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import shutil
import stat
import tomllib
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from entrypoint import localhttp
from entrypoint.config import HostPort, Settings
from entrypoint.errors import Fatal
from entrypoint.spacetimedb import publish
from entrypoint.spacetimedb import server as spacetime
from entrypoint.spacetimedb.api import Backoff, NotOwner, parse_ownership_error
from entrypoint.spacetimedb.credentials import (
    Publisher,
    cli_document,
    ensure_identity,
    link_cli_config,
    read_cli_toml,
    token_identity,
    write_cli_toml,
)
from entrypoint.spacetimedb.identity import from_claims
from entrypoint.spacetimedb.module_logs import follow_module_logs, module_log_event
from entrypoint.spacetimedb.publish import first_boot_statement, publish_all
from entrypoint.spacetimedb.sql import (
    SqlError,
    parse_sql_result,
    sql,
    sql_bool,
    sql_identity,
    sql_string,
)
from entrypoint.spacetimedb.statefile import load_state, module_state, update_module_state
from entrypoint.supervision.status import Status
from tests import stdbhelp
from tests.fixtures.make_wasm import module as make_module

FAST = Backoff(initial=0.005, maximum=0.02, deadline=0.5)
FIXTURE = Path(__file__).parent / "fixtures" / "pogly.wasm"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def fake_token(sub: str | None = None, iss: str = "localhost") -> tuple[str, str]:
    """An unsigned JWT shaped like a local SpacetimeDB token, and its identity."""
    sub = sub or str(uuid.uuid4())
    ident = from_claims(iss, sub)

    def b64(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    payload = {"hex_identity": ident, "sub": sub, "iss": iss, "aud": ["spacetimedb"], "iat": 1, "exp": None}
    return f"{b64({'typ': 'JWT', 'alg': 'ES256'})}.{b64(payload)}.c2lnbmF0dXJl", ident


def make_settings(tmp: Path, addr: HostPort | None = None, **overrides: Any) -> Settings:
    module_dir = tmp / "app"
    if not module_dir.exists():
        module_dir.mkdir(parents=True)
        shutil.copy(FIXTURE, module_dir / "pogly.wasm")
    values: dict[str, Any] = {
        "oidc_issuer": "https://auth.example.com/application/o/pogly/",
        "oidc_client_id": "pogly",
        "data_dir": tmp / "data",
        "config_dir": tmp / "config",
        "module_dir": module_dir,
        "spacetime_addr": addr or HostPort("127.0.0.1", 3000),
        "spacetime_bin": str(stdbhelp.STANDIN),
        "stream_platform": "twitch",
        "stream_name": "o_reilly",
    }
    values.update(overrides)
    (tmp / "config").mkdir(exist_ok=True)
    return Settings(**values)


# ---------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------


def test_command(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, HostPort("127.0.0.1", 3123))
    assert spacetime.command(settings) == [
        str(stdbhelp.STANDIN), "start", "--data-dir", str(tmp_path / "data"),
        "--jwt-key-dir", str(tmp_path / "config"), "--listen-addr", "127.0.0.1:3123",
    ]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("Error: cannot take lock on database; spacetime.pid already exists (owned by pid Some(1234))", 1234),
        ("\x1b[31mError:\x1b[0m cannot take lock on database; spacetime.pid already exists (owned by pid Some(7))",
         7),
        ("Error: cannot take lock on database; spacetime.pid already exists (owned by pid None)", 0),
        ('Error: commitlog directory is locked: failed to lock /stdb/replicas/1/db.lock (existing contents: '
         '"pid=42;timestamp_utc=2026-01-01T00:00:00Z")', 42),
        ("Error: Database is already opened. Path:`/stdb/replicas/1/db.lock`. Error:EWOULDBLOCK", 0),
        ("Starting SpacetimeDB listening on 127.0.0.1:3000", None),
        ("Error: error while taking database lock on spacetime.pid", None),
        ("", None),
    ],
)
def test_parse_lock_error(line: str, expected: int | None) -> None:
    assert spacetime.parse_lock_error(line) == expected


def test_listening_line() -> None:
    line = "2026-01-01T00:00:00Z  INFO crates/standalone/src/subcommands/start.rs:194: " \
           "Starting SpacetimeDB listening on 127.0.0.1:40123"
    assert spacetime.is_listening_line(line)
    assert stdbhelp.listening_addr(line) == HostPort("127.0.0.1", 40123)
    assert stdbhelp.listening_addr("Starting SpacetimeDB listening on [::1]:3000") == HostPort("::1", 3000)
    assert not spacetime.is_listening_line("PG: Starting SpacetimeDB Protocol listening on 127.0.0.1:5432")
    assert not spacetime.is_listening_line("database running in data directory /stdb")


async def _serve_once(answer: bytes) -> tuple[asyncio.AbstractServer, HostPort]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, HostPort("127.0.0.1", port)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", True),
        (b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n", False),
        (b"HTTP/1.1 503 Service Unavailable\r\n\r\n", False),
        (b"garbage\r\n", False),
        (b"", False),
    ],
)
def test_ping(answer: bytes, expected: bool) -> None:
    async def main() -> bool:
        server, addr = await _serve_once(answer)
        async with server:
            return await spacetime.ping(addr, timeout=2.0)

    assert run(main()) is expected


def test_ping_refused_and_silent() -> None:
    async def main() -> tuple[bool, bool]:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        refused = await spacetime.ping(HostPort("127.0.0.1", port), timeout=1.0)

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # never answers

        quiet = await asyncio.start_server(silent, "127.0.0.1", 0)
        async with quiet:
            hung = await spacetime.ping(HostPort("127.0.0.1", quiet.sockets[0].getsockname()[1]), timeout=0.2)
        return refused, hung

    assert run(main()) == (False, False)


def test_check_keys(tmp_path: Path) -> None:
    spacetime.check_keys(tmp_path)  # neither: SpacetimeDB creates both
    (tmp_path / "id_ecdsa").write_text("private")
    with pytest.raises(Fatal) as err:
        spacetime.check_keys(tmp_path)
    assert err.value.exit_code == 78
    assert "id_ecdsa.pub is missing" in err.value.message
    assert err.value.event == "identity.keys_incomplete"
    (tmp_path / "id_ecdsa.pub").write_text("public")
    spacetime.check_keys(tmp_path)
    (tmp_path / "id_ecdsa").unlink()
    with pytest.raises(Fatal) as err:
        spacetime.check_keys(tmp_path)
    assert f"{tmp_path / 'id_ecdsa'} is missing" in err.value.message
    assert (tmp_path / "id_ecdsa.pub").exists()  # never deleted


def test_tighten_key_modes(tmp_path: Path) -> None:
    for name in ("id_ecdsa", "id_ecdsa.pub"):
        (tmp_path / name).write_text("k")
        os.chmod(tmp_path / name, 0o644)
    changed = spacetime.tighten_key_modes(tmp_path)
    assert sorted(p.name for p in changed) == ["id_ecdsa", "id_ecdsa.pub"]
    for name in ("id_ecdsa", "id_ecdsa.pub"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert spacetime.tighten_key_modes(tmp_path) == []


def test_publisher_repr_masks_token() -> None:
    token, ident = fake_token()
    pub = Publisher(ident, token)
    assert token not in repr(pub) and token not in str(pub) and token not in f"{pub!r} {pub}"
    assert ident in repr(pub)
    assert pub.headers == {"Authorization": f"Bearer {token}"}


def test_token_identity() -> None:
    token, ident = fake_token("c609bdb5-0025-4c6d-b2e9-8f28103b35e3")
    assert ident == "c2001574a028244c76a5152554c3cfc1bb6b376e668be5b86314002adf932aee"
    assert token_identity(token) == ident
    with pytest.raises(ValueError):
        token_identity("not-a-jwt")


def test_cli_document_keeps_everything_else(tmp_path: Path) -> None:
    existing = {
        "default_server": "maincloud",
        "web_session_token": 'we"ird\\value\n',
        "server_configs": [
            {"nickname": "maincloud", "host": "maincloud.spacetimedb.com", "protocol": "https"},
            {"nickname": "local", "host": "127.0.0.1:3000", "protocol": "http", "ecdsa_public_key": "PEM"},
        ],
        "extra": {"nested": True, "n": 3},
    }
    doc = cli_document(existing, "tok.en.x", HostPort("0.0.0.0", 3001))
    path = tmp_path / "cli.toml"
    write_cli_toml(path, doc)
    parsed = read_cli_toml(path)
    assert parsed == doc
    assert parsed["default_server"] == "local"
    assert parsed["spacetimedb_token"] == "tok.en.x"
    assert parsed["web_session_token"] == 'we"ird\\value\n'
    local = [s for s in parsed["server_configs"] if s["nickname"] == "local"]
    assert local == [{"nickname": "local", "host": "127.0.0.1:3001", "protocol": "http", "ecdsa_public_key": "PEM"}]
    assert parsed["extra"] == {"nested": True, "n": 3}
    fresh = cli_document({}, "t", HostPort("127.0.0.1", 3000))
    assert fresh["server_configs"] == [{"nickname": "local", "host": "127.0.0.1:3000", "protocol": "http"}]


#: Every kind of value TOML has, as ``tomllib`` reads it: what an operator or a newer CLI may put in cli.toml.
EVERYTHING_TOML = """\
spacetimedb_token = "eyJ.x.y"
plain = 'literal \\ string'
multi = \"\"\"
two lines, "quoted", tab\there\"\"\"
unicode = "Pögly ✓ 🎥 \\u00e9"
control = "bell\\u0007 del\\u007f"
int = -17
hex = 0xff
float = 6.5e-3
inf = inf
yes = true
offset = 2026-05-11T09:30:00.123+02:00
local_datetime = 2026-05-11T09:30:00
date = 2026-05-11
time = 07:32:00.5
mixed = [1, "two", [3.0, false], { inline = "table" }]
empty_array = []
"quoted key" = "ok"
"ü" = "unicode key"

[nested.deeper."dotted.key"]
x = 1

[empty]

[[server_configs]]
nickname = "local"
host = "127.0.0.1:3000"
protocol = "http"

[[server_configs]]
nickname = "maincloud"
host = "maincloud.spacetimedb.com"
protocol = "https"
tags = ["a", "b"]

[[server_configs.extra]]
deep = "array of tables inside an array of tables"
"""


def test_cli_toml_writes_everything_tomllib_reads(tmp_path: Path) -> None:
    doc = tomllib.loads(EVERYTHING_TOML)
    assert doc["offset"].utcoffset() is not None and isinstance(doc["date"], type(doc["offset"].date()))
    path = tmp_path / "config" / "cli.toml"
    write_cli_toml(path, cli_document(doc, "tok.en.x", HostPort("127.0.0.1", 3000)))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["cli.toml"]  # written through a temp file, renamed
    again = read_cli_toml(path)
    assert again == cli_document(doc, "tok.en.x", HostPort("127.0.0.1", 3000))
    assert again["unicode"] == "Pögly ✓ 🎥 é" and again["time"] == doc["time"]
    assert again["server_configs"][1]["extra"] == [{"deep": "array of tables inside an array of tables"}]
    assert again["nested"]["deeper"]["dotted.key"] == {"x": 1} and again["empty"] == {}


@pytest.mark.parametrize(
    ("status", "text", "caller", "owner", "database"),
    [
        (401, "Identity does not own database, expected: " + "c200" + "a" * 60 + " got: " + "c200" + "b" * 60,
         "c200" + "b" * 60, "c200" + "a" * 60, None),
        (400, "Identity does not own database, expected: " + "c200" + "a" * 60 + " got: " + "c200" + "b" * 60,
         "c200" + "b" * 60, "c200" + "a" * 60, None),
        (500, "Permission denied: `" + "c200" + "b" * 60 + "` does not own database `c200dddddddddddd`",
         "c200" + "b" * 60, None, "c200dddddddddddd"),
        (403, "c200" + "b" * 60 + " is not authorized to perform action on database " + "c200" + "d" * 60
         + ": update database", "c200" + "b" * 60, None, "c200" + "d" * 60),
    ],
)
def test_ownership_error_shapes(status: int, text: str, caller: str, owner: str | None,
                                database: str | None) -> None:
    refusal = parse_ownership_error(status, text)
    assert refusal is not None
    assert (refusal.caller, refusal.owner, refusal.database) == (caller, owner, database)


@pytest.mark.parametrize(
    ("status", "text"),
    [(500, "internal error"), (401, "TokenError(Error(InvalidSignature))"), (403, "forbidden"),
     (400, "Only owners are authorized to run SQL DML statements")],
)
def test_ownership_error_non_matches(status: int, text: str) -> None:
    assert parse_ownership_error(status, text) is None


def test_sql_literals() -> None:
    assert sql_string("O'Reilly") == "'O''Reilly'"
    assert sql_string("'; DROP TABLE Config; --") == "'''; DROP TABLE Config; --'"
    assert sql_string("") == "''"
    assert sql_bool(True) == "true" and sql_bool(False) == "false"
    assert sql_identity("X'" + "C2" * 32 + "'") == "0x" + "c2" * 32
    with pytest.raises(ValueError):
        sql_string("a\x00b")
    with pytest.raises(ValueError):
        sql_identity("'; --")


def test_first_boot_statement_quotes_values(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, stream_name="it's", debug_mode=True)
    assert first_boot_statement(settings) == (
        "UPDATE Config SET StreamingPlatform = 'twitch', StreamName = 'it''s', DebugMode = true, "
        "StrictMode = false, ConfigInit = true WHERE Version = 0"
    )


def test_parse_sql_result_unwraps_identities() -> None:
    ident = "c200" + "1" * 60
    payload = [{
        "schema": {"elements": [
            {"name": {"some": "Version"}, "algebraic_type": {"U32": []}},
            {"name": {"some": "OwnerIdentity"}, "algebraic_type": {"Product": {"elements": [
                {"name": {"some": "__identity__"}, "algebraic_type": {"U256": []}}]}}},
            {"name": {"some": "Conn"}, "algebraic_type": {"Product": {"elements": [
                {"name": {"some": "__connection_id__"}, "algebraic_type": {"U128": []}}]}}},
            {"name": {"none": []}, "algebraic_type": {"Bool": []}},
        ]},
        "rows": [[0, ["0x" + ident.upper()], ["0xABCD"], True]],
        "total_duration_micros": 1, "stats": {"rows_inserted": 0, "rows_deleted": 0, "rows_updated": 0},
    }]
    assert parse_sql_result(payload) == [
        {"Version": 0, "OwnerIdentity": ident, "Conn": "abcd", "col3": True}
    ]


def test_module_log_event_mapping() -> None:
    line = json.dumps({"level": "Warn", "ts": 1730000000000000, "target": "pogly", "filename": "src/lib.rs",
                       "line_number": 12, "function": "say_hello", "message": "Hello, World!"})
    level, message, fields = module_log_event("pogly", line)
    assert (level, message) == ("warning", "Hello, World!")
    assert fields == {"service": "module:pogly", "function": "say_hello", "filename": "src/lib.rs", "line": 12,
                      "target": "pogly", "module_ts": 1730000000000000}
    for raw, mapped in [("Error", "error"), ("Panic", "error"), ("Info", "info"), ("Debug", "debug"),
                        ("Trace", "debug")]:
        assert module_log_event("m", json.dumps({"level": raw, "message": "x"}))[0] == mapped
    assert module_log_event("m", "not json") == ("info", "not json", {"service": "module:m"})


# ---------------------------------------------------------------------------
# Mock SpacetimeDB (a scripted localhttp transport)
# ---------------------------------------------------------------------------


class MockStdb:
    """Just enough of the §3 API for the client's decisions; ``inject`` queues odd answers per route."""

    def __init__(self, version: str = "1.7.0", pogly: bool = True) -> None:
        self.version = version
        self.pogly = pogly
        self.valid: dict[str, str] = {}  # token -> identity
        self.dbs: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.sql_log: list[str] = []
        self.injected: dict[tuple[str, str], list[Callable[[], localhttp.Response]]] = {}
        self.info_has_owner = True

    def inject(self, method: str, path: str, *answers: Callable[[], localhttp.Response]) -> None:
        self.injected.setdefault((method, path), []).extend(answers)

    def issue(self) -> tuple[str, str]:
        token, ident = fake_token()
        self.valid[token] = ident
        return token, ident

    def add_db(self, name: str, owner: str, wasm: bytes = b"") -> str:
        ident = "c200" + hashlib.sha256(name.encode()).hexdigest()[:60]
        row = {"Version": 0, "OwnerIdentity": owner, "StreamingPlatform": "twitch", "StreamName": "bobross",
               "DebugMode": False, "StrictMode": False, "ConfigInit": False}
        self.dbs[name] = {"identity": ident, "owner": owner, "wasm": wasm, "config": row}
        return ident

    def _caller(self, request: localhttp.Request) -> str | bool | None:
        auth = request.headers.get("authorization", "")
        if not auth:
            return None
        ident = self.valid.get(auth.removeprefix("Bearer "))
        return ident if ident else False

    def _not_owner(self, caller: str, db: dict[str, Any], route: str) -> localhttp.Response:
        if self.version != "1.7.0":
            return localhttp.Response(403, text=f"{caller} is not authorized to perform action on database "
                                            f"{db['identity']}: update database")
        if route == "pre_publish":
            return localhttp.Response(401, text=f"Identity does not own database, expected: {db['owner']} "
                                                f"got: {caller}")
        return localhttp.Response(500, text=f"Permission denied: `{caller}` does not own database "
                                        f"`{db['identity'][:16]}`")

    def __call__(self, request: localhttp.Request) -> localhttp.Response:
        path = request.path
        self.requests.append((request.method, path))
        queued = self.injected.get((request.method, path))
        if queued:
            return queued.pop(0)()
        caller = self._caller(request)
        if caller is False:
            return localhttp.Response(401, text="TokenError(Error(InvalidSignature))")
        parts = path.strip("/").split("/")
        if path == "/v1/identity" and request.method == "POST":
            token, ident = self.issue()
            return localhttp.Response(200, json={"identity": ident, "token": token})
        if parts[:2] == ["v1", "identity"] and parts[-1] == "verify":
            if caller is None:
                return localhttp.Response(401)
            return localhttp.Response(204 if caller == parts[2] else 400)
        if parts[:2] != ["v1", "database"]:
            return localhttp.Response(404)
        name, rest = parts[2], parts[3:]
        db = self.dbs.get(name)
        if request.method == "GET" and rest == ["identity"]:
            return localhttp.Response(200, text=db["identity"]) if db else localhttp.Response(404)
        if request.method == "GET" and rest == []:
            if not db:
                return localhttp.Response(404)
            info: dict[str, Any] = {"database_identity": {"__identity__": "0x" + db["identity"]}}
            if self.info_has_owner:
                info["owner_identity"] = {"__identity__": "0x" + db["owner"]}
            return localhttp.Response(200, json=info)
        if request.method == "POST" and rest == ["pre_publish"]:
            if not db:
                return localhttp.Response(404)
            if caller != db["owner"]:
                return self._not_owner(str(caller), db, "pre_publish")
            return localhttp.Response(200, json={"migrate_plan": "", "break_clients": False, "token": "0x00"})
        if request.method == "PUT" and rest == []:
            assert request.params.get("host_type") == "Wasm"
            assert "clear" not in request.params
            if db is None:
                ident = self.add_db(name, str(caller), request.content)
                if not self.pogly:
                    self.dbs[name]["config"] = None
                return localhttp.Response(200, json={"Success": {"domain": name, "database_identity": ident,
                                                             "op": "created"}})
            if caller != db["owner"]:
                return self._not_owner(str(caller), db, "publish")
            db["wasm"] = request.content
            return localhttp.Response(200, json={"Success": {"domain": name, "database_identity": db["identity"],
                                                         "op": "updated"}})
        if request.method == "POST" and rest == ["sql"]:
            return self._sql(db, caller, request.content.decode())
        return localhttp.Response(404)

    def _sql(self, db: dict[str, Any] | None, caller: Any, statement: str) -> localhttp.Response:
        self.sql_log.append(statement)
        if db is None:
            return localhttp.Response(404, text="module not found")
        row = db["config"]
        if row is None:
            return localhttp.Response(400, text="`Config` is not a valid table")
        if statement.startswith("SELECT"):
            names = list(row)
            cells = [["0x" + v] if k == "OwnerIdentity" else v for k, v in row.items()]
            return localhttp.Response(200, json=[{"schema": {"elements": [
                {"name": {"some": n}, "algebraic_type": {"String": []}} for n in names]},
                "rows": [cells]}])
        if caller != db["owner"]:
            return localhttp.Response(400, text="Only owners are authorized to run SQL DML statements")
        for column, literal in re.findall(r"(\w+) = ('(?:[^']|'')*'|true|false)", statement):
            if column != "Version":
                row[column] = (literal[1:-1].replace("''", "'") if literal.startswith("'")
                               else literal == "true")
        return localhttp.Response(200, json=[{"schema": {"elements": []}, "rows": []}])


def client_for(mock: MockStdb) -> localhttp.AsyncClient:
    return localhttp.AsyncClient(base_url="http://127.0.0.1:3000", transport=mock)


def tree_digest(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Checksum of every file under ``root`` (paths starting with ``skip`` left out)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not str(p.relative_to(root)).startswith(skip)}


# The server's own diagnostic log grows with every request; it is not data.
SERVER_LOG = ("logs/",)


# ---------------------------------------------------------------------------
# ensure_identity (mock)
# ---------------------------------------------------------------------------


def test_identity_first_start_then_reuse(tmp_path: Path) -> None:
    mock = MockStdb()
    settings = make_settings(tmp_path)
    home = tmp_path / "home"

    async def main() -> tuple[Publisher, Publisher]:
        async with client_for(mock) as client:
            first = await ensure_identity(settings, client, home=home, backoff=FAST)
            second = await ensure_identity(settings, client, home=home, backoff=FAST)
            return first, second

    with capture_logs() as logs:
        first, second = run(main())
    assert first == second
    assert [r for r in mock.requests if r == ("POST", "/v1/identity")] == [("POST", "/v1/identity")]
    assert ("GET", f"/v1/identity/{first.identity}/verify") in mock.requests
    cli = settings.config_dir / "cli.toml"
    assert stat.S_IMODE(cli.stat().st_mode) == 0o600
    doc = tomllib.loads(cli.read_text())
    assert doc["default_server"] == "local"
    assert doc["spacetimedb_token"] == first.token
    assert doc["server_configs"] == [{"nickname": "local", "host": "127.0.0.1:3000", "protocol": "http"}]
    link = home / ".config" / "spacetime"
    assert link.is_symlink() and link.resolve() == settings.config_dir.resolve()
    events = [e["event"] for e in logs]
    assert events.count("identity.created") == 1 and events.count("identity.reused") == 1
    assert first.token not in json.dumps(logs, default=str)


def test_existing_home_config_is_left_alone(tmp_path: Path) -> None:
    home = tmp_path / "home"
    own = home / ".config" / "spacetime"
    own.mkdir(parents=True)
    (own / "cli.toml").write_text('default_server = "maincloud"\n')
    assert link_cli_config(tmp_path / "config", home) is False
    assert not own.is_symlink() and (own / "cli.toml").read_text() == 'default_server = "maincloud"\n'


def test_unwritable_home_is_not_fatal(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".config").write_text("a file where a directory should be")
    with capture_logs() as logs:
        assert link_cli_config(tmp_path / "config", home) is False
    assert logs[-1]["event"] == "identity.cli_link_failed"


def test_rejected_token_is_fatal_78_and_touches_nothing(tmp_path: Path) -> None:
    mock = MockStdb()
    settings = make_settings(tmp_path)
    token, ident = fake_token()  # not known to the server: as if the keys were replaced
    cli = settings.config_dir / "cli.toml"
    write_cli_toml(cli, cli_document({}, token, settings.spacetime_addr))
    (settings.config_dir / "id_ecdsa").write_text("new private key")
    (settings.config_dir / "id_ecdsa.pub").write_text("new public key")
    mock.add_db("pogly", ident)
    before = tree_digest(tmp_path)

    async def main() -> None:
        async with client_for(mock) as client:
            await ensure_identity(settings, client, home=tmp_path / "home", backoff=FAST)

    with pytest.raises(Fatal) as err:
        run(main())
    assert err.value.exit_code == 78
    assert err.value.event == "identity.token_rejected"
    message = err.value.message
    assert ident in message and "InvalidSignature" in message
    assert "id_ecdsa" in message and "id_ecdsa.pub" in message and "restore" in message
    assert "re-sign" in message and "database 'pogly' is owned by " + ident in message
    assert token not in message
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("value", ["5", "true", "[\"eyJ\"]", "{ jwt = \"eyJ\" }"])
def test_a_token_that_is_not_a_string_is_fatal_78_and_the_file_kept(tmp_path: Path, value: str) -> None:
    # `spacetimedb_token = 5` is a damaged file, not "no token yet": minting a new identity over it would
    # silently orphan every database the original token owns.
    settings = make_settings(tmp_path)
    cli = settings.config_dir / "cli.toml"
    cli.parent.mkdir(parents=True, exist_ok=True)
    cli.write_text(f"spacetimedb_token = {value}\n")
    before = tree_digest(tmp_path)

    async def main() -> None:
        async with client_for(MockStdb()) as client:
            await ensure_identity(settings, client, home=tmp_path / "home", backoff=FAST)

    with pytest.raises(Fatal) as err:
        run(main())
    assert err.value.exit_code == 78 and err.value.event == "identity.token_invalid"
    assert str(cli) in err.value.message and "not a token string" in err.value.message
    assert tree_digest(tmp_path) == before


def test_invalid_cli_toml_is_fatal_and_kept(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    cli = settings.config_dir / "cli.toml"
    cli.write_text("spacetimedb_token = \n[[broken")

    async def main() -> None:
        async with client_for(MockStdb()) as client:
            await ensure_identity(settings, client, home=tmp_path / "home", backoff=FAST)

    with pytest.raises(Fatal) as err:
        run(main())
    assert err.value.exit_code == 78
    assert cli.read_text() == "spacetimedb_token = \n[[broken"


def test_transient_errors_are_retried(tmp_path: Path) -> None:
    mock = MockStdb()
    settings = make_settings(tmp_path)
    mock.inject("POST", "/v1/identity", lambda: localhttp.Response(503, text="starting"),
                lambda: (_ for _ in ()).throw(localhttp.ConnectError("refused")))

    async def main() -> Publisher:
        async with client_for(mock) as client:
            return await ensure_identity(settings, client, home=tmp_path / "home", backoff=FAST)

    with capture_logs() as logs:
        pub = run(main())
    assert pub.identity in mock.valid.values()
    assert [e["event"] for e in logs].count("spacetime.retrying") == 2


def test_unreachable_is_fatal_69(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)

    def refuse(request: localhttp.Request) -> localhttp.Response:
        raise localhttp.ConnectError("connection refused", request=request)

    async def main() -> None:
        async with localhttp.AsyncClient(base_url="http://127.0.0.1:9", transport=refuse) as c:
            await ensure_identity(settings, c, home=tmp_path / "home", backoff=FAST)

    with pytest.raises(Fatal) as err:
        run(main())
    assert err.value.exit_code == 69
    assert "unreachable" in err.value.message


# ---------------------------------------------------------------------------
# publish_all (mock)
# ---------------------------------------------------------------------------


def _publish(mock: MockStdb, settings: Settings, publisher: Publisher,
             status: Status | None = None) -> Status:
    status = status or Status()

    async def main() -> None:
        async with client_for(mock) as client:
            await publish_all(settings, status, client, publisher, backoff=FAST)

    run(main())
    return status


def test_publish_create_skip_update(tmp_path: Path) -> None:
    mock = MockStdb()
    settings = make_settings(tmp_path, modules=("pogly", "second"), stream_name="o_reilly", strict_mode=True)
    pub = Publisher(*reversed(mock.issue()))

    with capture_logs() as logs:
        status = _publish(mock, settings, pub)
    wasm = (settings.module_dir / "pogly.wasm").read_bytes()
    digest = hashlib.sha256(wasm).hexdigest()
    for name in ("pogly", "second"):
        info = status.module(name)
        assert (info.publish_result, info.serving, info.published_hash) == ("created", True, digest)
        assert info.database_identity == mock.dbs[name]["identity"]
        assert mock.dbs[name]["config"] == {
            "Version": 0, "OwnerIdentity": pub.identity, "StreamingPlatform": "twitch", "StreamName": "o_reilly",
            "DebugMode": False, "StrictMode": True, "ConfigInit": True}
    state_file = settings.config_dir / "pogly-entrypoint.json"
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    state = json.loads(state_file.read_text())
    assert state["version"] == 1
    assert state["modules"]["pogly"] == {"hash": digest, "database_identity": mock.dbs["pogly"]["identity"],
                                         "first_boot_config_applied": True, "first_boot_config": "applied"}
    assert [e["event"] for e in logs].count("config.first_boot_applied") == 2

    # restart, nothing changed: no PUT, no SQL
    mock.requests.clear()
    mock.sql_log.clear()
    status = _publish(mock, settings, pub)
    assert status.module("pogly").publish_result == "unchanged"
    assert not [r for r in mock.requests if r[0] == "PUT"] and mock.sql_log == []

    # owner changes the config afterwards; a new release publishes an update and leaves it alone
    mock.dbs["pogly"]["config"]["StreamName"] = "changed_by_owner"
    (settings.module_dir / "pogly.wasm").write_bytes(make_module(extra="release 2"))
    status = _publish(mock, settings, pub)
    assert status.module("pogly").publish_result == "updated"
    assert mock.dbs["pogly"]["config"]["StreamName"] == "changed_by_owner"
    assert mock.sql_log == []
    assert sorted(r for r in mock.requests if r[0] == "PUT") == [("PUT", "/v1/database/pogly"),
                                                             ("PUT", "/v1/database/second")]


def test_update_failure_keeps_the_old_module_but_is_not_ready(tmp_path: Path) -> None:
    mock = MockStdb()
    settings = make_settings(tmp_path)
    pub = Publisher(*reversed(mock.issue()))
    _publish(mock, settings, pub)
    old_hash = json.loads((settings.config_dir / "pogly-entrypoint.json").read_text())["modules"]["pogly"]["hash"]
    (settings.module_dir / "pogly.wasm").write_bytes(make_module(extra="broken release"))
    mock.inject("PUT", "/v1/database/pogly",
                lambda: localhttp.Response(400, text="Error: incompatible schema change: column removed"))
    with capture_logs() as logs:
        status = _publish(mock, settings, pub)
    info = status.module("pogly")
    assert info.serving is True  # the previous module still runs inside SpacetimeDB
    assert info.publish_result == "failed: 400: Error: incompatible schema change: column removed"
    assert info.published_hash == old_hash
    # ... but the container is not ready: /readyz 503 is what `flux --wait` and rollouts see.
    assert [r for r in status.not_ready() if r.startswith("module ")] == [
        "module pogly: update failed: 400: Error: incompatible schema change: column removed"]
    failed = [e for e in logs if e["event"] == "publish.failed"]
    assert len(failed) == 1 and failed[0]["log_level"] == "error"
    assert "incompatible schema change" in failed[0]["server_message"]
    assert "not ready" in failed[0]["message"]
    # the state still holds the old hash, so the next start retries the update
    state = json.loads((settings.config_dir / "pogly-entrypoint.json").read_text())
    assert state["modules"]["pogly"]["hash"] == old_hash


def test_update_failure_after_retries_is_not_ready(tmp_path: Path) -> None:
    mock = MockStdb()
    settings = make_settings(tmp_path)
    pub = Publisher(*reversed(mock.issue()))
    _publish(mock, settings, pub)
    (settings.module_dir / "pogly.wasm").write_bytes(make_module(extra="v2"))
    mock.inject("PUT", "/v1/database/pogly", *[lambda: localhttp.Response(502, text="bad gateway")] * 10_000)
    status = _publish(mock, settings, pub)
    assert status.module("pogly").serving is True
    assert status.module("pogly").publish_result.startswith("failed: ")
    assert any(r.startswith("module pogly: update failed: ") for r in status.not_ready())


def test_first_publish_failure_is_fatal(tmp_path: Path) -> None:
    mock = MockStdb()
    settings = make_settings(tmp_path)
    pub = Publisher(*reversed(mock.issue()))
    mock.inject("PUT", "/v1/database/pogly", lambda: localhttp.Response(400, text="invalid wasm: bad magic"))
    with pytest.raises(Fatal) as err:
        _publish(mock, settings, pub)
    assert err.value.exit_code == 70
    assert err.value.event == "publish.first_failed"
    assert "invalid wasm: bad magic" in err.value.message

    mock.inject("PUT", "/v1/database/pogly", *[lambda: localhttp.Response(503, text="overloaded")] * 10_000)
    with pytest.raises(Fatal) as err:
        _publish(mock, settings, pub)
    assert err.value.exit_code == 69


def test_transient_publish_error_is_retried(tmp_path: Path) -> None:
    mock = MockStdb()
    settings = make_settings(tmp_path)
    pub = Publisher(*reversed(mock.issue()))
    mock.inject("PUT", "/v1/database/pogly", lambda: localhttp.Response(503, text="busy"))
    status = _publish(mock, settings, pub)
    assert status.module("pogly").publish_result == "created"


def test_missing_wasm_is_fatal_78(tmp_path: Path) -> None:
    mock = MockStdb()
    settings = make_settings(tmp_path, module_dir=tmp_path / "empty")
    pub = Publisher(*reversed(mock.issue()))
    with pytest.raises(Fatal) as err:
        _publish(mock, settings, pub)
    assert err.value.exit_code == 78
    assert "POGLY_MODULE_DIR" in err.value.message and str(tmp_path / "empty" / "pogly.wasm") in err.value.message
    assert not [r for r in mock.requests if r[0] == "PUT"]


@pytest.mark.parametrize("version", ["1.7.0", "1.9.0"])
@pytest.mark.parametrize("route", ["info", "pre_publish", "put"])
def test_not_owner_is_fatal_78_with_both_identities(tmp_path: Path, version: str, route: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    mock = MockStdb(version)
    settings = make_settings(tmp_path)
    _, owner = mock.issue()
    pub = Publisher(*reversed(mock.issue()))
    mock.add_db("pogly", owner)
    if route != "info":
        mock.info_has_owner = False
    if route == "put":
        async def inconclusive(*args: Any, **kwargs: Any) -> None:
            return None

        monkeypatch.setattr(publish, "_check_owner", inconclusive)
    with pytest.raises(Fatal) as err:
        _publish(mock, settings, pub)
    assert err.value.exit_code == 78
    assert err.value.event == "publish.not_owner"
    message = err.value.message
    assert pub.identity in message
    if route == "info" or (route == "pre_publish" and version == "1.7.0"):
        assert owner in message and err.value.fields["owner_identity"] == owner
    assert "restore the config volume" in message and "--delete-data" in message
    assert not [r for r in mock.requests if r[0] == "PUT" and route != "put"]


def test_first_boot_config_not_pogly(tmp_path: Path) -> None:
    mock = MockStdb(pogly=False)
    settings = make_settings(tmp_path)
    pub = Publisher(*reversed(mock.issue()))
    with capture_logs() as logs:
        status = _publish(mock, settings, pub)
    assert status.module("pogly").publish_result == "created"
    skipped = [e for e in logs if e["event"] == "config.first_boot_skipped"]
    assert skipped and "not a Pogly module" in skipped[0]["reason"]
    assert json.loads((settings.config_dir / "pogly-entrypoint.json").read_text())["modules"]["pogly"][
        "first_boot_config"] == "not-pogly"


def test_first_boot_config_resumed_after_crash(tmp_path: Path) -> None:
    """Created, then the process died before the Config UPDATE: the next start completes it."""
    mock = MockStdb()
    settings = make_settings(tmp_path)
    pub = Publisher(*reversed(mock.issue()))
    wasm = (settings.module_dir / "pogly.wasm").read_bytes()
    ident = mock.add_db("pogly", pub.identity, wasm)
    update_module_state(settings.config_dir, "pogly", hash=hashlib.sha256(wasm).hexdigest(),
                        database_identity=ident, first_boot_config_applied=False)
    status = _publish(mock, settings, pub)
    assert status.module("pogly").publish_result == "unchanged"
    assert mock.dbs["pogly"]["config"]["ConfigInit"] is True
    assert mock.dbs["pogly"]["config"]["StreamName"] == "o_reilly"


def test_first_boot_config_never_overrides_initialised_row(tmp_path: Path) -> None:
    mock = MockStdb()
    settings = make_settings(tmp_path)
    pub = Publisher(*reversed(mock.issue()))
    wasm = (settings.module_dir / "pogly.wasm").read_bytes()
    ident = mock.add_db("pogly", pub.identity, wasm)
    mock.dbs["pogly"]["config"].update(ConfigInit=True, StreamName="onboarded")
    update_module_state(settings.config_dir, "pogly", hash=hashlib.sha256(wasm).hexdigest(),
                        database_identity=ident, first_boot_config_applied=False)
    _publish(mock, settings, pub)
    assert mock.dbs["pogly"]["config"]["StreamName"] == "onboarded"
    assert not [s for s in mock.sql_log if s.startswith("UPDATE")]


def test_lost_state_first_boot_config_is_derived_from_the_database(tmp_path: Path) -> None:
    """No state file (its write after the creation was lost): the database's ConfigInit decides.

    Replaces ``test_state_without_flag_never_applies_config``, which encoded issue 13's fault 3: a
    database whose state write was lost stayed with onboarding open, so the first stranger to call
    Pogly's ``SetConfig`` became its owner.
    """
    mock = MockStdb()
    settings = make_settings(tmp_path)
    pub = Publisher(*reversed(mock.issue()))
    mock.add_db("pogly", pub.identity, b"old")
    with capture_logs() as logs:
        _publish(mock, settings, pub)  # no state: update, and the database says onboarding is open
    assert mock.dbs["pogly"]["config"]["ConfigInit"] is True
    assert mock.dbs["pogly"]["config"]["StreamName"] == "o_reilly"
    repaired = [e for e in logs if e["event"] == "config.first_boot_applied"]
    assert repaired and repaired[0]["repaired"] is True and repaired[0]["log_level"] == "warning"
    assert module_state(settings.config_dir, "pogly")["first_boot_config_applied"] is True
    mock.sql_log.clear()
    _publish(mock, settings, pub)  # unchanged, and recorded as done for this database: no query
    assert mock.sql_log == []


def test_lost_state_never_touches_an_initialised_config(tmp_path: Path) -> None:
    mock = MockStdb()
    settings = make_settings(tmp_path)
    pub = Publisher(*reversed(mock.issue()))
    mock.add_db("pogly", pub.identity, b"old")
    mock.dbs["pogly"]["config"].update(ConfigInit=True, StreamName="onboarded")
    _publish(mock, settings, pub)
    assert mock.dbs["pogly"]["config"]["StreamName"] == "onboarded"
    assert not [s for s in mock.sql_log if s.startswith("UPDATE")]
    assert module_state(settings.config_dir, "pogly")["first_boot_config"] == "already-initialised"


def test_corrupt_state_file_is_kept_aside(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    (config / "pogly-entrypoint.json").write_text("{not json")
    assert load_state(config) == {"version": 1, "modules": {}}
    aside = list(config.glob("pogly-entrypoint.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == "{not json"


def test_update_module_state_keeps_foreign_keys(tmp_path: Path) -> None:
    update_module_state(tmp_path, "pogly", ownership={"claimed": True})
    update_module_state(tmp_path, "pogly", hash="h")
    assert module_state(tmp_path, "pogly") == {"ownership": {"claimed": True}, "hash": "h"}


def test_sql_error_carries_server_text() -> None:
    mock = MockStdb()
    token, ident = mock.issue()
    mock.add_db("pogly", "c200" + "9" * 60)

    async def main() -> None:
        async with client_for(mock) as client:
            await sql(client, Publisher(ident, token), "pogly",
                      "UPDATE Config SET StreamName = 'x' WHERE Version = 0")

    with pytest.raises(SqlError) as err:
        run(main())
    assert err.value.status == 400
    assert "Only owners are authorized to run SQL DML statements" in str(err.value)


# ---------------------------------------------------------------------------
# follow_module_logs (mock)
# ---------------------------------------------------------------------------


def test_follow_module_logs_reconnects_and_stops(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    token, ident = fake_token()
    pub = Publisher(ident, token)
    stop = asyncio.Event()
    seen: list[localhttp.Request] = []
    lines = [
        {"level": "Info", "ts": 1, "target": "pogly", "filename": "src/lib.rs", "line_number": 72,
         "function": "init", "message": "[Init] Server successfully started!"},
        {"level": "Panic", "ts": 2, "filename": "src/lib.rs", "line_number": 9, "function": "boom",
         "message": "it broke", "trace": "frames"},
    ]

    def handler(request: localhttp.Request) -> localhttp.Response:
        seen.append(request)
        if len(seen) == 1:
            raise localhttp.ConnectError("SpacetimeDB restarting", request=request)
        if len(seen) == 2:
            return localhttp.Response(403, text=f"{ident} is not authorized to perform action on database x: "
                                            "view module logs")
        if len(seen) == 3:
            body = "\n".join(json.dumps(line) for line in lines) + "\n"
            return localhttp.Response(200, content=body.encode(), headers={"content-type": "application/x-ndjson"})
        stop.set()  # the third connection's lines were consumed before this reconnect
        return localhttp.Response(200, content=b"")

    async def main() -> None:
        async with localhttp.AsyncClient(base_url="http://x", transport=handler) as client:
            await asyncio.wait_for(
                follow_module_logs(settings, client, pub, "pogly", stop=stop, backoff=FAST), 10)

    with capture_logs() as logs:
        run(main())
    assert seen[0].params["num_lines"] == "0" and seen[0].params["follow"] == "true"
    assert seen[0].headers["authorization"] == f"Bearer {token}"
    module_events = [e for e in logs if e.get("service") == "module:pogly"]
    assert [(e["event"], e["log_level"]) for e in module_events] == [
        ("[Init] Server successfully started!", "info"), ("it broke", "error")]
    assert module_events[0]["function"] == "init" and module_events[0]["line"] == 72
    assert module_events[1]["trace"] == "frames"
    assert [e["event"] for e in logs].count("module_logs.denied") == 1


def test_follow_module_logs_cancels_cleanly(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    token, ident = fake_token()
    connected = asyncio.Event()

    async def main() -> None:
        async def endless() -> AsyncIterator[bytes]:
            connected.set()
            await asyncio.Event().wait()
            yield b""

        def handler(request: localhttp.Request) -> localhttp.Response:
            return localhttp.Response(200, stream=endless())

        async with localhttp.AsyncClient(base_url="http://x", transport=handler) as client:
            task = asyncio.create_task(
                follow_module_logs(settings, client, Publisher(ident, token), "pogly"))
            await connected.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    with capture_logs() as logs:
        run(main())
    assert not [e for e in logs if e.get("exc_info") or e["log_level"] == "error"]


# ---------------------------------------------------------------------------
# Against the stand-in
# ---------------------------------------------------------------------------



async def _boot(settings: Settings, home: Path, status: Status | None = None
                ) -> tuple[Publisher, Status]:
    """What the supervisor does once SpacetimeDB is ready: identity, then publish."""
    status = status or Status()
    async with localhttp.AsyncClient(base_url=settings.spacetime_addr.url) as client:
        spacetime.tighten_key_modes(settings.config_dir)
        publisher = await ensure_identity(settings, client, home=home, backoff=FAST)
        status.publisher_identity = publisher.identity
        await publish_all(settings, status, client, publisher, backoff=FAST)
    return publisher, status


def test_standin_three_restarts_keep_one_identity(tmp_path: Path) -> None:
    home = tmp_path / "home"
    identities, db_ids, results = set(), set(), []
    for boot in range(3):
        with stdbhelp.StandIn(tmp_path / "data", tmp_path / "config") as server:
            settings = make_settings(tmp_path, server.addr, modules=("pogly", "second"))
            spacetime.check_keys(settings.config_dir)
            publisher, status = run(_boot(settings, home))
            identities.add(publisher.identity)
            db_ids.add(tuple(status.module(m).database_identity for m in settings.modules))
            results.append(tuple(status.module(m).publish_result for m in settings.modules))
            assert {m: status.module(m).serving for m in settings.modules} == {"pogly": True, "second": True}
            if boot == 0:
                for name in ("id_ecdsa", "id_ecdsa.pub", "cli.toml", "pogly-entrypoint.json"):
                    assert stat.S_IMODE((settings.config_dir / name).stat().st_mode) == 0o600, name
    assert len(identities) == 1
    assert len(db_ids) == 1
    assert results == [("created", "created"), ("unchanged", "unchanged"), ("unchanged", "unchanged")]
    assert (home / ".config" / "spacetime").resolve() == (tmp_path / "config").resolve()

    # a new release of the module: the fourth start publishes an update to the same database
    (tmp_path / "app" / "pogly.wasm").write_bytes(make_module(extra="release 2"))
    with stdbhelp.StandIn(tmp_path / "data", tmp_path / "config") as server:
        settings = make_settings(tmp_path, server.addr, modules=("pogly", "second"))
        publisher, status = run(_boot(settings, home))
    assert publisher.identity in identities
    assert (status.module("pogly").publish_result, status.module("second").publish_result) == ("updated",
                                                                                               "updated")
    assert (status.module("pogly").database_identity, status.module("second").database_identity) in db_ids


def test_standin_cli_toml_is_what_the_cli_reads(tmp_path: Path) -> None:
    """The official CLI (the stand-in's `sql`) run with our cli.toml acts as the publisher."""
    with stdbhelp.StandIn(tmp_path / "data", tmp_path / "config") as server:
        settings = make_settings(tmp_path, server.addr)
        run(_boot(settings, tmp_path / "home"))
        explicit = stdbhelp.cli(["--config-path", str(settings.config_dir / "cli.toml"), "sql", "pogly",
                                 "SELECT StreamName FROM Config"])
        # and through the ~/.config/spacetime link, as `kubectl exec … spacetime sql` would
        env = {k: v for k, v in os.environ.items() if k != "XDG_CONFIG_HOME"}
        env["HOME"] = str(tmp_path / "home")
        linked = stdbhelp.cli(["sql", "pogly", "UPDATE Config SET StreamName = 'via_link' WHERE Version = 0"],
                              env=env, clean_env=True)
        readback = stdbhelp.cli(["sql", "pogly", "SELECT StreamName FROM Config"], env=env, clean_env=True)
    assert explicit.returncode == 0, explicit.stderr
    assert '"o_reilly"' in explicit.stdout
    assert linked.returncode == 0, linked.stderr  # DML: only the owner may, so this is the publisher
    assert '"via_link"' in readback.stdout


def test_standin_key_swap_is_fatal_and_data_untouched(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with stdbhelp.StandIn(tmp_path / "data", tmp_path / "config") as server:
        settings = make_settings(tmp_path, server.addr)
        original, _ = run(_boot(settings, home))
    # the operator "fixes" something by replacing the keys: a second installation's key pair
    other = tmp_path / "other-config"
    with stdbhelp.StandIn(tmp_path / "other-data", other):
        pass
    for name in ("id_ecdsa", "id_ecdsa.pub"):
        shutil.copy(other / name, tmp_path / "config" / name)
    with stdbhelp.StandIn(tmp_path / "data", tmp_path / "config") as server:
        before = tree_digest(tmp_path / "data", SERVER_LOG)
        assert any("replicas" in path for path in before)
        settings = make_settings(tmp_path, server.addr)
        with pytest.raises(Fatal) as err:
            run(_boot(settings, home))
        assert tree_digest(tmp_path / "data", SERVER_LOG) == before
    assert err.value.exit_code == 78
    assert err.value.event == "identity.token_rejected"
    assert original.identity in err.value.message
    assert "id_ecdsa" in err.value.message and "InvalidSignature" in err.value.message
    assert err.value.fields["database_owners"] == {"pogly": original.identity}
    assert original.token not in err.value.message


@pytest.mark.parametrize("version", ["1.7.0", "1.9.0"])
def test_standin_config_volume_swap_is_fatal_with_both_identities(tmp_path: Path, version: str) -> None:
    """A different config volume (its own keys and token): the database belongs to someone else."""
    home = tmp_path / "home"
    with stdbhelp.StandIn(tmp_path / "data", tmp_path / "config", version=version) as server:
        original, _ = run(_boot(make_settings(tmp_path, server.addr), home))
    newcomer_dir = tmp_path / "config-2"
    newcomer_dir.mkdir()
    with stdbhelp.StandIn(tmp_path / "data", newcomer_dir, version=version) as server:
        before = tree_digest(tmp_path / "data", SERVER_LOG)
        settings = make_settings(tmp_path, server.addr, config_dir=newcomer_dir)
        with pytest.raises(Fatal) as err:
            run(_boot(settings, home))
        assert tree_digest(tmp_path / "data", SERVER_LOG) == before
    newcomer = token_identity(tomllib.loads((newcomer_dir / "cli.toml").read_text())["spacetimedb_token"])
    assert newcomer != original.identity
    assert err.value.exit_code == 78 and err.value.event == "publish.not_owner"
    assert original.identity in err.value.message and newcomer in err.value.message
    assert "--delete-data" in err.value.message


@pytest.mark.parametrize("version", ["1.7.0", "1.9.0"])
def test_standin_refusal_shapes_are_recognised(tmp_path: Path, version: str) -> None:
    """Every route that refuses a non-owner answers in a shape parse_ownership_error knows."""
    with stdbhelp.StandIn(tmp_path / "data", tmp_path / "config", version=version) as server:
        settings = make_settings(tmp_path, server.addr)
        owner, _ = run(_boot(settings, tmp_path / "home"))
        wasm = FIXTURE.read_bytes()

        async def refusals() -> tuple[list[NotOwner | None], dict[str, str]]:
            async with localhttp.AsyncClient(base_url=server.addr.url, timeout=10) as client:
                stranger = (await client.post("/v1/identity")).json()
                auth = {"Authorization": f"Bearer {stranger['token']}"}
                answers = [
                    await client.put("/v1/database/pogly", params={"host_type": "Wasm"}, content=wasm,
                                     headers=auth),
                    await client.post("/v1/database/pogly/pre_publish", params={"host_type": "Wasm"},
                                      content=wasm, headers=auth),
                    await client.get("/v1/database/pogly/logs", params={"num_lines": "1"}, headers=auth),
                ]
                return [parse_ownership_error(r.status_code, r.text) for r in answers], stranger

        parsed, stranger = run(refusals())
    assert all(p is not None for p in parsed), parsed
    assert all(p.caller == stranger["identity"] for p in parsed if p)
    if version == "1.7.0":
        assert parsed[1].owner == owner.identity and parsed[2].owner == owner.identity


@pytest.mark.parametrize("version", ["1.7.0", "1.9.0"])
def test_standin_not_owner_through_each_route(tmp_path: Path, version: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """publish_all stops with 78 whichever answer reveals the foreign owner (info, pre_publish, PUT)."""
    with stdbhelp.StandIn(tmp_path / "data", tmp_path / "config", version=version) as server:
        settings = make_settings(tmp_path, server.addr)
        owner, _ = run(_boot(settings, tmp_path / "home"))
        (settings.module_dir / "pogly.wasm").write_bytes(make_module(extra="newer"))

        async def attempt() -> Fatal:
            async with localhttp.AsyncClient(base_url=server.addr.url, timeout=10) as client:
                data = (await client.post("/v1/identity")).json()
                stranger = Publisher(data["identity"], data["token"])
                with pytest.raises(Fatal) as err:
                    await publish_all(settings, Status(), client, stranger, backoff=FAST)
                assert stranger.identity in err.value.message
                return err.value

        via_info = run(attempt())
        assert owner.identity in via_info.message

        async def no_owner(*args: Any, **kwargs: Any) -> None:
            return None

        monkeypatch.setattr(publish, "database_owner", no_owner)
        via_pre = run(attempt())
        assert via_pre.event == "publish.not_owner"
        if version == "1.7.0":
            assert owner.identity in via_pre.message

        monkeypatch.setattr(publish, "_check_owner", no_owner)
        via_put = run(attempt())
        assert via_put.event == "publish.not_owner" and via_put.exit_code == 78


def test_standin_first_boot_config_once_owner_change_survives(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with stdbhelp.StandIn(tmp_path / "data", tmp_path / "config") as server:
        settings = make_settings(tmp_path, server.addr, stream_platform="kick", stream_name="it-s_me",
                                 debug_mode=True, strict_mode=True)
        publisher, _ = run(_boot(settings, home))

        async def read_and_change() -> list[dict[str, Any]]:
            async with localhttp.AsyncClient(base_url=server.addr.url) as client:
                rows = await sql(client, publisher, "pogly", "SELECT * FROM Config WHERE Version = 0")
                await sql(client, publisher, "pogly",
                          "UPDATE Config SET StreamName = 'owner''s choice' WHERE Version = 0")
                return rows

        rows = run(read_and_change())
    assert rows[0]["StreamingPlatform"] == "kick" and rows[0]["StreamName"] == "it-s_me"
    assert rows[0]["DebugMode"] is True and rows[0]["StrictMode"] is True and rows[0]["ConfigInit"] is True
    assert rows[0]["OwnerIdentity"] == publisher.identity

    with stdbhelp.StandIn(tmp_path / "data", tmp_path / "config") as server:
        settings = make_settings(tmp_path, server.addr, stream_platform="kick", stream_name="it-s_me",
                                 debug_mode=True, strict_mode=True)
        with capture_logs() as logs:
            publisher, status = run(_boot(settings, home))

        async def read() -> list[dict[str, Any]]:
            async with localhttp.AsyncClient(base_url=server.addr.url) as client:
                return await sql(client, publisher, "pogly", "SELECT * FROM Config WHERE Version = 0")

        rows = run(read())
    assert status.module("pogly").publish_result == "unchanged"
    assert rows[0]["StreamName"] == "owner's choice"
    assert not [e for e in logs if e["event"].startswith("config.first_boot")]


def test_standin_module_log_line_becomes_event(tmp_path: Path) -> None:
    with stdbhelp.StandIn(tmp_path / "data", tmp_path / "config") as server:
        settings = make_settings(tmp_path, server.addr)
        publisher, _ = run(_boot(settings, tmp_path / "home"))

        async def main() -> None:
            stop = asyncio.Event()
            following = asyncio.Event()
            seen = asyncio.Event()

            def watch(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
                if event.get("event") == "module_logs.following":
                    following.set()
                if event.get("service") == "module:pogly" and event.get("event") == "hello from the test":
                    seen.set()
                return event

            structlog.configure(processors=[watch, *structlog.get_config()["processors"]])
            async with localhttp.AsyncClient(base_url=server.addr.url) as client:
                task = asyncio.create_task(
                    follow_module_logs(settings, client, publisher, "pogly", stop=stop, backoff=FAST))
                await asyncio.wait_for(following.wait(), 10)
                answer = await client.post("/v1/database/pogly/call/log_message",
                                           json=["Warn", "hello from the test"], headers=publisher.headers)
                assert answer.status_code == 200, answer.text
                await asyncio.wait_for(seen.wait(), 10)
                stop.set()
                await asyncio.wait_for(task, 10)

        with capture_logs() as logs:
            run(main())
    events = [e for e in logs if e.get("service") == "module:pogly"]
    assert events and events[-1]["event"] == "hello from the test"
    assert events[-1]["log_level"] == "warning" and events[-1]["function"] == "log_message"


def test_standin_log_follower_survives_a_restart(tmp_path: Path) -> None:
    """SpacetimeDB restarts under the follower: it reconnects by itself and keeps copying lines."""

    async def main(first: stdbhelp.StandIn, settings: Settings, publisher: Publisher) -> None:
        stop = asyncio.Event()
        connections: asyncio.Queue[int] = asyncio.Queue()
        seen = asyncio.Event()
        count = 0

        def watch(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
            nonlocal count
            if event.get("event") == "module_logs.following":
                count += 1
                connections.put_nowait(count)
            if event.get("service") == "module:pogly" and event.get("event") == "after restart":
                seen.set()
            return event

        structlog.configure(processors=[watch, *structlog.get_config()["processors"]])
        async with localhttp.AsyncClient(base_url=first.addr.url) as client:
            task = asyncio.create_task(
                follow_module_logs(settings, client, publisher, "pogly", stop=stop, backoff=FAST))
            assert await asyncio.wait_for(connections.get(), 10) == 1
            await asyncio.to_thread(first.stop)
            second = stdbhelp.StandIn(tmp_path / "data", tmp_path / "config", listen=str(first.addr))
            await asyncio.to_thread(second.start)
            try:
                assert await asyncio.wait_for(connections.get(), 10) == 2
                answer = await client.post("/v1/database/pogly/call/log_message", json=["Info", "after restart"],
                                           headers=publisher.headers)
                assert answer.status_code == 200, answer.text
                await asyncio.wait_for(seen.wait(), 10)
            finally:
                stop.set()
                await asyncio.wait_for(task, 10)
                await asyncio.to_thread(second.stop)

    with stdbhelp.StandIn(tmp_path / "data", tmp_path / "config") as first:
        settings = make_settings(tmp_path, first.addr)
        publisher, _ = run(_boot(settings, tmp_path / "home"))
        with capture_logs() as logs:
            run(main(first, settings, publisher))
    assert [e for e in logs if e.get("event") == "after restart"]


@pytest.mark.parametrize(("module", "wanted"), [("pogly", "Put pogly.wasm in"),
                                               ("overlay2", "Put overlay2.wasm or the shared pogly.wasm in")])
def test_a_missing_module_file_is_78_naming_the_file_to_put_there(tmp_path: Path, module: str, wanted: str) -> None:
    from entrypoint.spacetimedb.publish import _read_wasm

    settings = make_settings(tmp_path)
    (settings.module_dir / "pogly.wasm").unlink()
    with pytest.raises(Fatal) as caught:
        _read_wasm(settings, module)
    assert caught.value.exit_code == 78 and caught.value.event == "publish.module_missing"
    assert wanted in caught.value.message and f"POGLY_MODULE_DIR={settings.module_dir}" in caught.value.message
    assert "pogly.wasm or pogly.wasm" not in caught.value.message
