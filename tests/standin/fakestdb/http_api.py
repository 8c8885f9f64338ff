"""The HTTP and WebSocket API under ``/v1`` (reference §3, §5, §9), served by aiohttp.

Only ``AppRunner``/``SockSite`` are used, never ``web.run_app``: run_app installs SIGTERM handling,
and the real server has none (SIGTERM must kill the process, returncode -15).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import WSMsgType, web

from . import sql, wire
from .auth import MALFORMED, AuthFailure, Caller, ServerKeys, TokenValidator, parse_token
from .common import Version, norm_hex, now_micros
from .engine import Database, DbError, Store

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TEXT_PROTOCOL = "v1.json.spacetimedb"
BIN_PROTOCOL = "v1.bsatn.spacetimedb"
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _text(status: int, text: str = "") -> web.Response:
    return web.Response(status=status, text=text)


class Api:
    def __init__(self, store: Store, keys: ServerKeys, version: Version) -> None:
        self.store = store
        self.keys = keys
        self.version = version
        self.validator = TokenValidator(keys)
        self.started = time.time()
        self.requests = 0

    # -- app -----------------------------------------------------------------------------------

    def build(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=1 << 31)
        r = app.router
        r.add_get("/v1/ping", self.ping)
        r.add_get("/v1/health", self.health)
        r.add_get("/v1/metrics", self.metrics)
        r.add_get("/v1/prometheus/sd_config", self.sd_config)
        r.add_post("/v1/identity", self.create_identity)
        r.add_get("/v1/identity/public-key", self.public_key)
        r.add_post("/v1/identity/websocket-token", self.websocket_token)
        r.add_get("/v1/identity/{id}/verify", self.verify_identity)
        r.add_get("/v1/identity/{id}/databases", self.identity_databases)
        r.add_post("/v1/database", self.publish_new)
        r.add_put("/v1/database/{name}", self.publish_named)
        r.add_get("/v1/database/{name}", self.db_info)
        r.add_delete("/v1/database/{name}", self.db_delete)
        r.add_post("/v1/database/{name}/pre_publish", self.pre_publish)
        r.add_get("/v1/database/{name}/identity", self.db_identity)
        r.add_get("/v1/database/{name}/names", self.get_names)
        r.add_post("/v1/database/{name}/names", self.add_name)
        r.add_put("/v1/database/{name}/names", self.set_names)
        r.add_get("/v1/database/{name}/schema", self.schema)
        r.add_get("/v1/database/{name}/subscribe", self.subscribe)
        r.add_post("/v1/database/{name}/call/{reducer}", self.call)
        r.add_post("/v1/database/{name}/sql", self.sql)
        r.add_get("/v1/database/{name}/logs", self.logs)
        r.add_get("/v1/database/{name}/unstable/timestamp", self.timestamp)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """CORS (any origin, like the real permissive layer), error mapping, identity headers."""
        self.requests += 1
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return web.Response(
                status=200,
                headers={
                    "Access-Control-Allow-Origin": "*",
                    "Access-Control-Allow-Methods": request.headers["Access-Control-Request-Method"],
                    "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", "*"),
                    "Access-Control-Max-Age": "86400",
                },
            )
        try:
            resp = await handler(request)
        except AuthFailure as err:
            resp = _text(err.status, err.text)
        except DbError as err:
            resp = _text(err.status, err.text)
        except web.HTTPException as exc:
            if exc.status in (404, 405):  # router misses: the real server answers with an empty body
                resp = _text(exc.status)
            else:
                raise
        if not resp.prepared:
            resp.headers["Access-Control-Allow-Origin"] = "*"
            resp.headers["Access-Control-Expose-Headers"] = "*"
            caller: Caller | None = request.get("caller")
            if caller is not None and request.path.startswith("/v1/database"):
                resp.headers["spacetime-identity"] = caller.identity
                resp.headers["spacetime-identity-token"] = caller.token
        return resp

    # -- auth ----------------------------------------------------------------------------------

    @staticmethod
    def _token_from(request: web.Request) -> str | None:
        header = request.headers.get("Authorization")
        if header is not None:
            scheme, _, value = header.strip().partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise AuthFailure(400, MALFORMED)
            return value.strip()
        return request.query.get("token") or None

    async def _auth_optional(self, request: web.Request) -> Caller | None:
        token = self._token_from(request)
        if token is None:
            return None
        caller = await self.validator.validate(token)
        request["caller"] = caller
        return caller

    async def _auth_or_anonymous(self, request: web.Request) -> Caller:
        """``/v1/database/*``: no token means a fresh anonymous identity (returned in headers)."""
        caller = await self._auth_optional(request)
        if caller is None:
            ident, token = self.keys.mint_local()
            parsed = parse_token(token)
            caller = Caller(ident, token, parsed.payload_json, parsed.payload, anonymous=True)
            request["caller"] = caller
        return caller

    async def _auth_required(self, request: web.Request) -> Caller:
        caller = await self._auth_optional(request)
        if caller is None:
            raise AuthFailure(401, "Authorization required")
        return caller

    def _not_owner(self, caller: Caller, db: Database, action: str, route: str) -> DbError:
        """The owner error of the emulated version (§3 "Non-owner update")."""
        if self.version.at_least(1, 9):
            return DbError(
                403, f"{caller.identity} is not authorized to perform action on database {db.identity}: {action}"
            )
        if route == "pre_publish":
            return DbError(401, f"Identity does not own database, expected: {db.owner} got: {caller.identity}")
        if route == "logs":
            return DbError(400, f"Identity does not own database, expected: {db.owner} got: {caller.identity}")
        return DbError(500, f"Permission denied: `{caller.identity}` does not own database `{db.identity[:16]}`")

    def _db(self, request: web.Request) -> Database:
        name = request.match_info["name"]
        ident = norm_hex(name, 32)
        db = self.store.resolve(ident or name)
        if db is None:
            raise DbError(404, "No such database." if ident else "")
        db.ensure_loaded()
        return db

    # -- misc routes ---------------------------------------------------------------------------

    async def ping(self, request: web.Request) -> web.StreamResponse:
        if os.environ.get("STANDIN_PING_HANG"):  # test switch: accept, read the request, never answer
            await asyncio.Event().wait()
        await self._auth_optional(request)
        return _text(200)

    async def health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"package_name": "spacetimedb-client-api", "version": str(self.version), "nodes": [0],
             "schedulable": True},
            dumps=_dumps,
        )

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        clients = sum(len(d.connections) for d in self.store.databases.values())
        body = (
            "# HELP spacetime_num_databases Number of databases on this node\n"
            "# TYPE spacetime_num_databases gauge\n"
            f"spacetime_num_databases {len(self.store.databases)}\n"
            "# HELP spacetime_worker_connected_clients Number of connected WebSocket clients\n"
            "# TYPE spacetime_worker_connected_clients gauge\n"
            f"spacetime_worker_connected_clients {clients}\n"
            "# HELP standin_http_requests_total HTTP requests served by the stand-in\n"
            "# TYPE standin_http_requests_total counter\n"
            f"standin_http_requests_total {self.requests}\n"
        )
        return web.Response(body=body.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def sd_config(self, request: web.Request) -> web.StreamResponse:
        return web.json_response([{"targets": ["node:80"], "labels": {}}], dumps=_dumps)

    async def timestamp(self, request: web.Request) -> web.StreamResponse:
        self._db(request)
        return web.json_response({"timestamp": {"__timestamp_micros_since_unix_epoch__": now_micros()}},
                                 dumps=_dumps)

    # -- identity routes -----------------------------------------------------------------------

    async def create_identity(self, request: web.Request) -> web.StreamResponse:
        ident, token = self.keys.mint_local()
        return web.json_response({"identity": ident, "token": token}, dumps=_dumps)

    async def public_key(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self.keys.public_pem,
                            headers={"Content-Type": "application/pem-certificate-chain"})

    async def websocket_token(self, request: web.Request) -> web.StreamResponse:
        caller = await self._auth_required(request)
        return web.json_response({"token": self.keys.resign_short_lived(caller)}, dumps=_dumps)

    async def verify_identity(self, request: web.Request) -> web.StreamResponse:
        ident = norm_hex(request.match_info["id"], 32)
        if ident is None:
            return _text(400, "Invalid identity")
        caller = await self._auth_optional(request)
        if caller is None:
            return _text(401)
        return _text(204) if caller.identity == ident else _text(400)

    async def identity_databases(self, request: web.Request) -> web.StreamResponse:
        ident = norm_hex(request.match_info["id"], 32)
        if ident is None:
            return _text(400, "Invalid identity")
        return web.json_response({"identities": self.store.owned_by(ident)}, dumps=_dumps)

    # -- publish -------------------------------------------------------------------------------

    @staticmethod
    def _publish_params(request: web.Request) -> tuple[str, bool]:
        q = request.query
        host_type = q.get("host_type", "Wasm")
        if host_type not in ("Wasm", "Js"):
            raise DbError(400, f"Failed to deserialize query string: unknown variant `{host_type}`, "
                               "expected `Wasm` or `Js`")
        policy = q.get("policy", "Compatible")
        if policy not in ("Compatible", "BreakClients"):
            raise DbError(400, f"Failed to deserialize query string: unknown variant `{policy}`, "
                               "expected `Compatible` or `BreakClients`")
        clear = q.get("clear", "false")
        if clear not in ("true", "false"):
            raise DbError(400, "Failed to deserialize query string: clear: provided string was not `true` or `false`")
        return host_type, clear == "true"

    def _success(self, db: Database, domain: str | None, op: str) -> web.Response:
        return web.json_response(
            {"Success": {"domain": domain, "database_identity": db.identity, "op": op}}, dumps=_dumps
        )

    async def publish_new(self, request: web.Request) -> web.StreamResponse:
        caller = await self._auth_or_anonymous(request)
        host_type, _ = self._publish_params(request)
        if await _publish_faults(request):
            return _text(500)
        program = await request.read()
        db = self.store.create_database(caller.identity, None, host_type, program)
        return self._success(db, None, "created")

    async def publish_named(self, request: web.Request) -> web.StreamResponse:
        caller = await self._auth_or_anonymous(request)
        host_type, clear = self._publish_params(request)
        name = request.match_info["name"]
        if await _publish_faults(request):
            return _text(500)
        program = await request.read()
        ident = norm_hex(name, 32)
        db = self.store.resolve(ident or name)
        if db is None:
            if ident is not None:
                raise DbError(404, "No such database.")
            if not _NAME_RE.match(name):
                raise DbError(400, f"invalid database name `{name}`")
            db = self.store.create_database(caller.identity, name, host_type, program)
            return self._success(db, name, "created")
        if caller.identity != db.owner:
            raise self._not_owner(caller, db, "reset database" if clear else "update database", "publish")
        if clear:
            self.store.reset_database(db, caller.identity, program)
        else:
            self.store.update_database(db, program)
        return self._success(db, None if ident else name, "updated")

    async def pre_publish(self, request: web.Request) -> web.StreamResponse:
        caller = await self._auth_or_anonymous(request)
        name = request.match_info["name"]
        ident = norm_hex(name, 32)
        db = self.store.resolve(ident or name)
        if db is None:
            return _text(404)
        if caller.identity != db.owner:
            raise self._not_owner(caller, db, "update database", "pre_publish")
        program = await request.read()
        new_hash = hashlib.sha256(program).hexdigest()
        plan = (
            "No changes to the module's schema." if new_hash == db.program_hash
            else "Updating module: the schema is compatible (stand-in: automatic migration)."
        )
        token = hashlib.sha256(f"{db.identity}:{caller.identity}:{new_hash}".encode()).hexdigest()
        return web.json_response({"migrate_plan": plan, "break_clients": False, "token": f"0x{token}"},
                                 dumps=_dumps)

    # -- database routes -----------------------------------------------------------------------

    async def db_info(self, request: web.Request) -> web.StreamResponse:
        db = self._db(request)
        program = db.initial_program.lstrip("0") or "0"
        return web.json_response(
            {
                "database_identity": {"__identity__": f"0x{db.identity}"},
                "owner_identity": {"__identity__": f"0x{db.owner}"},
                "host_type": {db.host_type: []},
                "initial_program": f"0x{program}",
            },
            dumps=_dumps,
        )

    async def db_delete(self, request: web.Request) -> web.StreamResponse:
        caller = await self._auth_or_anonymous(request)
        db = self._db(request)
        if caller.identity != db.owner:
            raise self._not_owner(caller, db, "delete database", "delete")
        self.store.delete_database(db)
        return _text(200)

    async def db_identity(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        ident = norm_hex(name, 32)
        db = self.store.resolve(ident or name)
        if db is None:
            return _text(404)
        return _text(200, db.identity)

    async def get_names(self, request: web.Request) -> web.StreamResponse:
        db = self._db(request)
        return web.json_response({"names": db.names}, dumps=_dumps)

    async def add_name(self, request: web.Request) -> web.StreamResponse:
        caller = await self._auth_or_anonymous(request)
        db = self._db(request)
        if caller.identity != db.owner:
            raise self._not_owner(caller, db, "rename database", "names")
        new = (await request.text()).strip()
        if not _NAME_RE.match(new):
            raise DbError(400, f"invalid database name `{new}`")
        if new in self.store.names and self.store.names[new] != db.identity:
            return web.json_response({"PermissionDenied": {"name": new}}, status=401, dumps=_dumps)
        if new not in db.names:
            self.store.set_names(db, [*db.names, new])
        return web.json_response({"Success": {"domain": new, "database_result": db.identity}}, dumps=_dumps)

    async def set_names(self, request: web.Request) -> web.StreamResponse:
        caller = await self._auth_or_anonymous(request)
        db = self._db(request)
        if caller.identity != db.owner:
            raise self._not_owner(caller, db, "rename database", "names")
        try:
            names = json.loads(await request.text())
        except ValueError:
            raise DbError(400, "expected a JSON array of names") from None
        if not isinstance(names, list) or not all(isinstance(n, str) and _NAME_RE.match(n) for n in names):
            raise DbError(400, "expected a JSON array of valid names")
        self.store.set_names(db, names)
        return web.json_response({"Success": None}, dumps=_dumps)

    async def schema(self, request: web.Request) -> web.StreamResponse:
        db = self._db(request)
        tables = [
            {
                "name": t.tdef.name,
                "columns": [{"name": c, "algebraic_type": sql.algebraic_type(ty)} for c, ty in t.tdef.columns],
                "primary_key": [t.tdef.col_index(t.tdef.primary_key)] if t.tdef.primary_key else [],
                "table_access": {"Public": []} if t.tdef.public else {"Private": []},
            }
            for t in db.tables.values()
            if not t.tdef.name.startswith("st_")
        ]
        reducers = [
            {
                "name": name,
                "params": {"elements": [{"name": {"some": p}, "algebraic_type": sql.algebraic_type(ty)}
                                        for p, ty in params]},
                "lifecycle": {"none": []},
            }
            for name, params in db.reducers().items()
        ]
        return web.json_response(
            {"typespace": {"types": []}, "tables": tables, "reducers": reducers, "types": [],
             "misc_exports": [], "row_level_security": []},
            dumps=_dumps,
        )

    async def sql(self, request: web.Request) -> web.StreamResponse:
        caller = await self._auth_or_anonymous(request)
        db = self._db(request)
        text = await request.text()
        started = time.perf_counter()
        result = sql.execute(db, text, caller.identity)
        micros = int((time.perf_counter() - started) * 1_000_000)
        return web.json_response([result], dumps=_dumps,
                                 headers={"spacetime-execution-duration-micros": str(micros)})

    async def call(self, request: web.Request) -> web.StreamResponse:
        caller = await self._auth_or_anonymous(request)
        db = self._db(request)
        if request.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            return _text(415, "Expected request with `Content-Type: application/json`")
        reducer = request.match_info["reducer"]
        try:
            args = json.loads(await request.text())
        except ValueError as err:
            raise DbError(400, f"invalid arguments for reducer {reducer}: {err}") from None
        started = time.perf_counter()
        db.call_reducer(reducer, args, caller.identity)
        micros = int((time.perf_counter() - started) * 1_000_000)
        return web.Response(status=200, headers={"spacetime-energy-used": "0",
                                                 "spacetime-execution-duration-micros": str(micros)})

    async def logs(self, request: web.Request) -> web.StreamResponse:
        caller = await self._auth_or_anonymous(request)
        db = self._db(request)
        if caller.identity != db.owner:
            raise self._not_owner(caller, db, "view module logs", "logs")
        raw_n = request.query.get("num_lines")
        num_lines: int | None = None
        if raw_n is not None:
            if not raw_n.isdigit():
                raise DbError(400, "Failed to deserialize query string: num_lines: invalid digit found in string")
            num_lines = int(raw_n)
        follow = request.query.get("follow", "false") == "true"
        # read the backlog and subscribe in one synchronous step, so no line can fall in between
        lines = db.read_logs(num_lines)
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        if follow:
            db.log_followers.add(queue)
        resp = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "application/x-ndjson",
                "Cache-Control": "no-cache",
                "Access-Control-Allow-Origin": "*",
                "spacetime-identity": caller.identity,
                "spacetime-identity-token": caller.token,
            },
        )
        try:
            await resp.prepare(request)
            if lines:
                await resp.write(b"".join(lines))
            while follow:
                line = await queue.get()
                if line is None:
                    break
                await resp.write(line)
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            db.log_followers.discard(queue)
        return resp

    # -- websocket -----------------------------------------------------------------------------

    async def subscribe(self, request: web.Request) -> web.StreamResponse:
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        chosen = next((p for p in offered if p in (TEXT_PROTOCOL, BIN_PROTOCOL)), None)
        if chosen is None:
            return _text(400, "no valid protocol selected")
        caller = await self._auth_or_anonymous(request)
        db = self._db(request)
        raw_cid = request.query.get("connection_id")
        cid = norm_hex(raw_cid, 16) if raw_cid else None
        if raw_cid and cid is None:
            return _text(400, "Invalid connection_id")
        if cid is None or cid == "0" * 32:
            cid = secrets.token_hex(16)
        if cid in db.connections:
            return _text(400, f"connection id {cid} is already connected")
        ws = web.WebSocketResponse(protocols=(chosen,), heartbeat=15.0, max_msg_size=0)
        conn = _Connection(ws)
        with db.transaction() as tx:
            db.connect(tx, caller.identity, cid, caller.payload_json)
        db.connections[cid] = conn
        binary = chosen == BIN_PROTOCOL
        try:
            await ws.prepare(request)
            await _send(ws, wire.identity_token(binary, caller.identity, caller.token, cid))
            async for msg in ws:
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    await self._on_message(ws, db, caller, cid, binary, msg.data)
                elif msg.type == WSMsgType.ERROR:
                    break
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            # a kicked connection (database deleted/reset) was already removed: nothing to undo
            if db.connections.get(cid) is conn and self.store.databases.get(db.identity) is db:
                del db.connections[cid]
                with db.transaction() as tx:
                    db.disconnect(tx, caller.identity, cid)
        return ws

    async def _on_message(self, ws: web.WebSocketResponse, db: Database, caller: Caller, cid: str, binary: bool,
                          data: bytes | str) -> None:
        """Answer the client messages minimally (see README: no live subscription updates)."""
        try:
            variant, fields = wire.decode_client_message(data)
        except (ValueError, UnicodeDecodeError):
            return
        started = time.perf_counter()
        if variant == "Subscribe":
            request_id = int(fields.get("request_id", 0))
            tables = []
            try:
                for q in fields.get("query_strings", []):
                    tables.append(sql.result_rows_for_subscription(db, str(q), caller.identity))
            except DbError as err:
                await _send(ws, _subscription_error(binary, request_id, err.text))
                return
            micros = int((time.perf_counter() - started) * 1_000_000)
            await _send(ws, wire.initial_subscription(binary, request_id, tables, micros))
        elif variant == "CallReducer":
            reducer = str(fields.get("reducer", ""))
            raw_args = fields.get("args", b"")
            request_id = int(fields.get("request_id", 0))
            error: str | None = None
            try:
                if isinstance(raw_args, bytes | bytearray):
                    nparams = len(db.reducers().get(reducer, []))
                    args: Any = wire.decode_bsatn_string_args(bytes(raw_args), nparams)
                else:
                    args = json.loads(raw_args) if isinstance(raw_args, str) else raw_args
                db.call_reducer(reducer, args, caller.identity)
            except (DbError, ValueError) as err:
                error = err.text if isinstance(err, DbError) else str(err)
            if error is None and int(fields.get("flags", 0)) == 1:
                return
            micros = int((time.perf_counter() - started) * 1_000_000)
            await _send(ws, wire.transaction_update(
                binary, error=error, timestamp_us=now_micros(), caller=caller.identity, connection_id=cid,
                reducer=reducer, args=raw_args if isinstance(raw_args, bytes | str) else json.dumps(raw_args),
                request_id=request_id, micros=micros,
            ))


def _once(switch: str) -> bool:
    """A test switch whose value is a marker file: fires once, the first time (it creates the file)."""
    marker = os.environ.get(switch)
    if not marker:
        return False
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return False
    return True


async def _publish_faults(request: web.Request) -> bool:
    """Test switches on a publish (``POST``/``PUT /v1/database``), each once per marker file.

    ``STANDIN_PUBLISH_CUT``: read part of the uploaded module, then drop the connection (no answer).
    ``STANDIN_PUBLISH_DIE``: read part of the upload, then die of SIGKILL (nothing flushed, pidfile left).
    """
    cut, die = _once("STANDIN_PUBLISH_CUT"), _once("STANDIN_PUBLISH_DIE")
    if not (cut or die):
        return False
    await request.content.read(4)
    if die:
        os.kill(os.getpid(), signal.SIGKILL)
    if request.transport is not None:
        request.transport.abort()
    return True  # the caller answers nothing: the connection is gone and nothing is published


class _Connection:
    """Handle on an open WebSocket, so database delete/reset can drop its clients."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self._closing: asyncio.Task[bool] | None = None

    def kick(self) -> None:
        self._closing = asyncio.ensure_future(self.ws.close(code=1001, message=b"database gone"))


def _subscription_error(binary: bool, request_id: int, text: str) -> bytes | str:
    if binary:
        w = wire.Writer().u8(0).u8(7).u64(0).u8(0).u32(request_id).u8(1).u8(1).string(text)
        return bytes(w.buf)
    return _dumps({"SubscriptionError": {"total_host_execution_duration_micros": 0, "request_id": request_id,
                                         "query_id": None, "table_id": None, "error": text}})


async def _send(ws: web.WebSocketResponse, payload: bytes | str) -> None:
    if isinstance(payload, bytes):
        await ws.send_bytes(payload)
    else:
        await ws.send_str(payload)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
