"""SQL as the publisher: ``POST /v1/database/<name>/sql``, safe literals, rows as dicts.

The publisher owns our databases, so its SQL may run DML and read private
tables; first-boot config and the ownership claim are built on it.  Values
only ever reach a statement through the ``sql_*`` literal helpers, never by
formatting raw text into SQL.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from entrypoint.localhttp import Timeout
from entrypoint.spacetimedb.api import CONNECT_TIMEOUT, REQUEST_TIMEOUT, SpacetimeError, body_text

if TYPE_CHECKING:
    from entrypoint.localhttp import AsyncClient
    from entrypoint.spacetimedb.credentials import Publisher


class SqlError(SpacetimeError):
    """A SQL statement was refused (400: syntax, unknown table, not owner, …)."""

    def __init__(self, database: str, statement: str, status: int, text: str) -> None:
        super().__init__(f"SQL on {database!r} failed ({status}): {text or '(no message)'}", status, text)
        self.database = database
        self.statement = statement


_NO_TABLE = re.compile(r"not a valid table|no such table|table .* (?:does not exist|not found)", re.I)


def is_missing_table(exc: SqlError) -> bool:
    """The statement named a table this database does not have (e.g. not Pogly's module)."""
    return exc.status == 400 and bool(_NO_TABLE.search(exc.text))


def sql_string(value: str) -> str:
    """A SQL string literal: single quotes, embedded quotes doubled.  NUL is refused."""
    if "\x00" in value:
        raise ValueError("SQL string literals cannot contain NUL")
    return "'" + value.replace("'", "''") + "'"


def sql_bool(value: bool) -> str:
    return "true" if value else "false"


def sql_identity(value: str) -> str:
    """An Identity literal (``0x`` + 64 hex) from any accepted spelling; refuses non-identities."""
    from entrypoint.spacetimedb.identity import normalize_hex

    return "0x" + normalize_hex(value)


_WRAPPED = ("__identity__", "__connection_id__", "__timestamp_micros_since_unix_epoch__",
            "__time_duration_micros__")


def _unwrap_cell(value: Any, kind: str | None) -> Any:
    """SATS-JSON special products → plain values; identities as 64 lowercase hex."""
    inner = value
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in _WRAPPED:
        kind, inner = next(iter(value)), next(iter(value.values()))
    elif isinstance(value, list) and len(value) == 1 and (
        kind is not None or (isinstance(value[0], str) and value[0][:2] in ("0x", "0X"))
    ):
        inner = value[0]
    else:
        return value
    if isinstance(inner, str) and inner[:2] in ("0x", "0X"):
        hex_digits = inner[2:].lower()
        # Only a known Identity column is padded to 64 digits; a ConnectionId is 32.
        return hex_digits.rjust(64, "0") if kind == "__identity__" else hex_digits
    return inner


def _column_kind(algebraic_type: Any) -> str | None:
    """``__identity__`` etc. when the column's type is one of SATS's special single-field products."""
    if not isinstance(algebraic_type, dict):
        return None
    product = algebraic_type.get("Product")
    if not isinstance(product, dict):
        return None
    elements = product.get("elements")
    if isinstance(elements, list) and len(elements) == 1:
        name = elements[0].get("name") if isinstance(elements[0], dict) else None
        if isinstance(name, dict):
            name = name.get("some")
        if name in _WRAPPED:
            return str(name)
    return None


def parse_sql_result(payload: Any) -> list[dict[str, Any]]:
    """Rows as dicts from the ``/sql`` answer ``[{"schema": …, "rows": […]}, …]``."""
    rows: list[dict[str, Any]] = []
    results = payload if isinstance(payload, list) else [payload]
    for result in results:
        if not isinstance(result, dict):
            continue
        elements = (result.get("schema") or {}).get("elements") or []
        names: list[str] = []
        kinds: list[str | None] = []
        for index, element in enumerate(elements):
            name = element.get("name") if isinstance(element, dict) else None
            if isinstance(name, dict):
                name = name.get("some")
            names.append(name if isinstance(name, str) else f"col{index}")
            kinds.append(_column_kind(element.get("algebraic_type")) if isinstance(element, dict) else None)
        for row in result.get("rows") or []:
            cells = row if isinstance(row, list) else [row]
            rows.append({
                (names[i] if i < len(names) else f"col{i}"): _unwrap_cell(cell, kinds[i] if i < len(kinds) else None)
                for i, cell in enumerate(cells)
            })
    return rows


async def sql(client: AsyncClient, publisher: Publisher, database: str, statement: str,
              *, timeout: float = REQUEST_TIMEOUT) -> list[dict[str, Any]]:
    """Run one SQL statement as the publisher (the owner: DML and private tables allowed).

    Returns the rows as dicts, Identity cells as 64 lowercase hex.  Any non-2xx
    answer raises ``SqlError`` carrying the server's text; connection errors
    propagate as ``localhttp.TransportError`` (callers poll, they decide about retries).
    """
    response = await client.post(
        f"/v1/database/{database}/sql",
        content=statement.encode("utf-8"),
        headers={**publisher.headers, "Content-Type": "text/plain; charset=utf-8"},
        timeout=Timeout(timeout, connect=CONNECT_TIMEOUT),
    )
    if not response.is_success:
        raise SqlError(database, statement, response.status_code, body_text(response))
    if not response.content.strip():
        return []
    try:
        return parse_sql_result(response.json())
    except ValueError as exc:
        raise SqlError(database, statement, response.status_code, f"unparseable result: {exc}") from None


__all__ = [
    "SqlError", "parse_sql_result", "sql", "sql_bool", "sql_identity", "sql_string",
]
