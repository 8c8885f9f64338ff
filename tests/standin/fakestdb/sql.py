"""The subset of SpacetimeDB SQL the supervisor and its tests use (reference §3 "SQL", §6).

Supported, one statement per call:

* ``SELECT * | col, … | COUNT(*) AS n FROM t [WHERE …] [LIMIT n]``
* ``INSERT INTO t [(cols)] VALUES (…)[, (…)]``
* ``UPDATE t SET c = lit[, …] [WHERE …]``
* ``DELETE FROM t [WHERE …]``

``WHERE`` takes ``=``, ``!=``/``<>``, ``<``, ``<=``, ``>``, ``>=``, ``AND``, ``OR`` and parentheses.
Literals: ``'text'`` (``''`` escapes a quote), integers, ``true``/``false``, ``0x…`` and ``X'…'``
(and a plain string for Identity/ConnectionId columns).  Rules that matter to the supervisor are
kept exactly: DML is owner-only, private tables are invisible to non-owners, identity cells are
one-element arrays.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from .common import norm_hex
from .engine import INT_RANGES, Database, DbError, Row, Table, TableDef

_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<xhex>[xX]'[0-9a-fA-F]*')
  | (?P<string>'(?:[^']|'')*')
  | (?P<hex>0[xX][0-9a-fA-F]+)
  | (?P<number>-?\d+)
  | (?P<qident>"(?:[^"]|"")+")
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<sym><>|!=|<=|>=|[*,().=<>;])
    """,
    re.VERBOSE,
)

KEYWORDS = {
    "SELECT", "FROM", "WHERE", "AND", "OR", "INSERT", "INTO", "VALUES", "UPDATE", "SET", "DELETE",
    "TRUE", "FALSE", "LIMIT", "COUNT", "AS", "JOIN", "ORDER", "GROUP", "NULL",
}


@dataclass
class Tok:
    kind: str  # ident, qident, string, number, hex, xhex, sym, kw, eof
    text: str
    value: Any = None


def tokenize(sql: str) -> list[Tok]:
    toks: list[Tok] = []
    pos = 0
    while pos < len(sql):
        m = _TOKEN_RE.match(sql, pos)
        if not m:
            raise DbError(400, f"SQL parse error: unexpected character `{sql[pos]}` at offset {pos}")
        pos = m.end()
        kind = m.lastgroup or ""
        text = m.group()
        if kind == "ws":
            continue
        if kind == "ident" and text.upper() in KEYWORDS:
            toks.append(Tok("kw", text.upper()))
        elif kind == "ident":
            toks.append(Tok("ident", text, text))
        elif kind == "qident":
            toks.append(Tok("ident", text, text[1:-1].replace('""', '"')))
        elif kind == "string":
            toks.append(Tok("string", text, text[1:-1].replace("''", "'")))
        elif kind == "number":
            toks.append(Tok("number", text, int(text)))
        elif kind == "hex":
            toks.append(Tok("hex", text, text[2:].lower()))
        elif kind == "xhex":
            toks.append(Tok("hex", text, text[2:-1].lower()))
        else:
            toks.append(Tok("sym", text))
    toks.append(Tok("eof", "end of input"))
    return toks


@dataclass
class Lit:
    kind: str  # string, number, hex, bool
    text: str
    value: Any


@dataclass
class Col:
    name: str


Expr = Any  # ("and"|"or", Expr, Expr) | ("cmp", op, Col|Lit, Col|Lit)


class Parser:
    def __init__(self, sql: str) -> None:
        self.toks = tokenize(sql)
        self.i = 0

    def peek(self) -> Tok:
        return self.toks[self.i]

    def next(self) -> Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def error(self, expected: str) -> DbError:
        return DbError(400, f"SQL parse error: expected {expected}, found `{self.peek().text}`")

    def accept_kw(self, kw: str) -> bool:
        if self.peek().kind == "kw" and self.peek().text == kw:
            self.i += 1
            return True
        return False

    def expect_kw(self, kw: str) -> None:
        if not self.accept_kw(kw):
            raise self.error(kw)

    def accept_sym(self, sym: str) -> bool:
        if self.peek().kind == "sym" and self.peek().text == sym:
            self.i += 1
            return True
        return False

    def expect_sym(self, sym: str) -> None:
        if not self.accept_sym(sym):
            raise self.error(f"`{sym}`")

    def ident(self) -> str:
        tok = self.peek()
        if tok.kind != "ident":
            raise self.error("an identifier")
        self.i += 1
        return str(tok.value)

    def column_ref(self) -> str:
        name = self.ident()
        if self.accept_sym("."):
            name = self.ident()  # qualified `t.col`: single-table queries only
        return name

    def literal(self) -> Lit:
        tok = self.next()
        if tok.kind in ("string", "number", "hex"):
            return Lit(tok.kind, tok.text, tok.value)
        if tok.kind == "kw" and tok.text in ("TRUE", "FALSE"):
            return Lit("bool", tok.text.lower(), tok.text == "TRUE")
        self.i -= 1
        raise self.error("a literal")

    def operand(self) -> Col | Lit:
        if self.peek().kind == "ident":
            return Col(self.column_ref())
        return self.literal()

    def expr(self) -> Expr:
        left = self.and_expr()
        while self.accept_kw("OR"):
            left = ("or", left, self.and_expr())
        return left

    def and_expr(self) -> Expr:
        left = self.cmp()
        while self.accept_kw("AND"):
            left = ("and", left, self.cmp())
        return left

    def cmp(self) -> Expr:
        if self.accept_sym("("):
            inner = self.expr()
            self.expect_sym(")")
            return inner
        left = self.operand()
        tok = self.peek()
        if tok.kind != "sym" or tok.text not in ("=", "!=", "<>", "<", "<=", ">", ">="):
            raise self.error("a comparison operator")
        self.i += 1
        op = "!=" if tok.text == "<>" else tok.text
        return ("cmp", op, left, self.operand())

    def end(self) -> None:
        self.accept_sym(";")
        if self.peek().kind != "eof":
            if self.peek().kind == "kw" and self.peek().text in ("JOIN", "ORDER", "GROUP"):
                raise DbError(400, f"Unsupported SQL: `{self.peek().text}` is not supported by the stand-in")
            raise self.error("end of statement")

    # -- statements ----------------------------------------------------------------------------

    def statement(self) -> tuple[str, dict[str, Any]]:
        tok = self.peek()
        if tok.kind != "kw" or tok.text not in ("SELECT", "INSERT", "UPDATE", "DELETE"):
            raise DbError(400, f"Unsupported SQL: statement must start with SELECT, INSERT, UPDATE or DELETE, "
                               f"found `{tok.text}`")
        self.i += 1
        if tok.text == "SELECT":
            return "select", self.select()
        if tok.text == "INSERT":
            return "insert", self.insert()
        if tok.text == "UPDATE":
            return "update", self.update()
        return "delete", self.delete()

    def select(self) -> dict[str, Any]:
        proj: Any
        if self.accept_sym("*"):
            proj = "*"
        elif self.accept_kw("COUNT"):
            self.expect_sym("(")
            self.expect_sym("*")
            self.expect_sym(")")
            self.expect_kw("AS")
            proj = ("count", self.ident())
        else:
            first = self.ident()
            proj = ("*" if self.accept_sym("*") else [self.ident()]) if self.accept_sym(".") else [first]
            while isinstance(proj, list) and self.accept_sym(","):
                proj.append(self.column_ref())
        self.expect_kw("FROM")
        table = self.ident()
        if self.accept_kw("AS") or self.peek().kind == "ident":
            self.ident()
        where = self.expr() if self.accept_kw("WHERE") else None
        limit = None
        if self.accept_kw("LIMIT"):
            tok = self.next()
            if tok.kind != "number" or tok.value < 0:
                raise self.error("a row count")
            limit = tok.value
        self.end()
        return {"table": table, "proj": proj, "where": where, "limit": limit}

    def insert(self) -> dict[str, Any]:
        self.expect_kw("INTO")
        table = self.ident()
        cols: list[str] | None = None
        if self.accept_sym("("):
            cols = [self.ident()]
            while self.accept_sym(","):
                cols.append(self.ident())
            self.expect_sym(")")
        self.expect_kw("VALUES")
        rows: list[list[Lit]] = []
        while True:
            self.expect_sym("(")
            vals = [self.literal()]
            while self.accept_sym(","):
                vals.append(self.literal())
            self.expect_sym(")")
            rows.append(vals)
            if not self.accept_sym(","):
                break
        self.end()
        return {"table": table, "cols": cols, "rows": rows}

    def update(self) -> dict[str, Any]:
        table = self.ident()
        self.expect_kw("SET")
        sets: list[tuple[str, Lit]] = []
        while True:
            col = self.column_ref()
            self.expect_sym("=")
            sets.append((col, self.literal()))
            if not self.accept_sym(","):
                break
        where = self.expr() if self.accept_kw("WHERE") else None
        self.end()
        return {"table": table, "sets": sets, "where": where}

    def delete(self) -> dict[str, Any]:
        self.expect_kw("FROM")
        table = self.ident()
        where = self.expr() if self.accept_kw("WHERE") else None
        self.end()
        return {"table": table, "where": where}


# ---------------------------------------------------------------------------------------------
# typing and serialization

_IDENTITY_TYPE = {"Product": {"elements": [{"name": {"some": "__identity__"}, "algebraic_type": {"U256": []}}]}}
_CONN_TYPE = {"Product": {"elements": [{"name": {"some": "__connection_id__"}, "algebraic_type": {"U128": []}}]}}


def algebraic_type(ty: str) -> dict[str, Any]:
    if ty == "Identity":
        return _IDENTITY_TYPE
    if ty == "ConnectionId":
        return _CONN_TYPE
    return {ty: []}


def cell_json(ty: str, value: Any) -> Any:
    """SATS-JSON of a cell: Identity/ConnectionId are products, i.e. one-element arrays."""
    if ty in ("Identity", "ConnectionId"):
        return [f"0x{value}"]
    return value


def type_display(ty: str) -> str:
    if ty == "Identity":
        return "(__identity__: U256)"
    if ty == "ConnectionId":
        return "(__connection_id__: U128)"
    return ty


def coerce(lit: Lit, ty: str) -> Any:
    def bad() -> DbError:
        return DbError(400, f"The literal expression `{lit.text}` cannot be parsed as type `{type_display(ty)}`")

    if ty in INT_RANGES:
        if lit.kind != "number":
            raise bad()
        lo, hi = INT_RANGES[ty]
        if not lo <= lit.value <= hi:
            raise bad()
        return lit.value
    if ty == "String":
        if lit.kind != "string":
            raise bad()
        return lit.value
    if ty == "Bool":
        if lit.kind != "bool":
            raise bad()
        return lit.value
    if ty in ("Identity", "ConnectionId"):
        nbytes = 32 if ty == "Identity" else 16
        if lit.kind in ("hex", "string"):
            norm = norm_hex(str(lit.value), nbytes)
            if norm is not None:
                return norm
        raise bad()
    raise bad()


def _lit_value(lit: Lit) -> Any:
    return lit.value


# ---------------------------------------------------------------------------------------------
# execution


def _resolve_table(db: Database, name: str, is_owner: bool) -> Table:
    table = db.tables.get(name)
    if table is None or (not table.tdef.public and not is_owner):
        raise DbError(400, f"`{name}` is not a valid table")
    return table


def _col_type(tdef: TableDef, name: str) -> tuple[int, str]:
    try:
        idx = tdef.col_index(name)
    except KeyError:
        raise DbError(400, f"`{name}` is not in scope: table `{tdef.name}` has no such column") from None
    return idx, tdef.columns[idx][1]


def _compile_where(tdef: TableDef, expr: Expr) -> Any:
    """Turn a WHERE tree into a row predicate, coercing literals to their column's type up front."""
    if expr is None:
        return lambda row: True
    if expr[0] in ("and", "or"):
        left = _compile_where(tdef, expr[1])
        right = _compile_where(tdef, expr[2])
        if expr[0] == "and":
            return lambda row: left(row) and right(row)
        return lambda row: left(row) or right(row)
    _, op, a, b = expr
    col_ty = None
    for side in (a, b):
        if isinstance(side, Col):
            col_ty = _col_type(tdef, side.name)[1]

    def getter(side: Col | Lit) -> Any:
        if isinstance(side, Col):
            idx = _col_type(tdef, side.name)[0]
            return lambda row: row[idx]
        value = coerce(side, col_ty) if col_ty else _lit_value(side)
        return lambda row: value

    ga, gb = getter(a), getter(b)
    if col_ty in ("Bool", "Identity", "ConnectionId") and op not in ("=", "!="):
        raise DbError(400, f"Unsupported comparison `{op}` for type `{type_display(col_ty)}`")
    ops = {
        "=": lambda x, y: x == y,
        "!=": lambda x, y: x != y,
        "<": lambda x, y: x < y,
        "<=": lambda x, y: x <= y,
        ">": lambda x, y: x > y,
        ">=": lambda x, y: x >= y,
    }
    fn = ops[op]
    return lambda row: fn(ga(row), gb(row))


def _result(elements: list[dict[str, Any]], rows: list[Any], started: float, ins: int = 0, dele: int = 0,
            upd: int = 0) -> dict[str, Any]:
    return {
        "schema": {"elements": elements},
        "rows": rows,
        "total_duration_micros": int((time.perf_counter() - started) * 1_000_000),
        "stats": {"rows_inserted": ins, "rows_deleted": dele, "rows_updated": upd},
    }


def split_statements(sql: str) -> list[str]:
    parts: list[str] = []
    buf: list[str] = []
    in_str = False
    for ch in sql:
        if ch == "'":
            in_str = not in_str
        if ch == ";" and not in_str:
            parts.append("".join(buf))
            buf = []
            continue
        buf.append(ch)
    parts.append("".join(buf))
    return [p for p in parts if p.strip()]


def execute(db: Database, sql: str, caller: str) -> dict[str, Any]:
    """Run one statement for ``caller``; return the single result object of the HTTP response."""
    started = time.perf_counter()
    stmts = split_statements(sql)
    if not stmts:
        raise DbError(400, "SQL parse error: empty query")
    if len(stmts) > 1:
        raise DbError(400, "Unsupported SQL: only one statement per request is supported")
    parser = Parser(stmts[0])
    kind, st = parser.statement()
    is_owner = caller == db.owner
    if kind != "select" and not is_owner:
        raise DbError(400, "Only owners are authorized to run SQL DML statements")
    table = _resolve_table(db, st["table"], is_owner)
    tdef = table.tdef
    pred = _compile_where(tdef, st.get("where"))

    if kind == "select":
        matched = [row for row in table.rows.values() if pred(row)]
        if st["limit"] is not None:
            matched = matched[: st["limit"]]
        proj = st["proj"]
        if isinstance(proj, tuple):
            elements = [{"name": {"some": proj[1]}, "algebraic_type": {"U64": []}}]
            return _result(elements, [[len(matched)]], started)
        cols = [c for c, _ in tdef.columns] if proj == "*" else proj
        idx_ty = [_col_type(tdef, c) for c in cols]
        elements = [
            {"name": {"some": c}, "algebraic_type": algebraic_type(ty)} for c, (_, ty) in zip(cols, idx_ty, strict=True)
        ]
        rows = [[cell_json(ty, row[i]) for i, ty in idx_ty] for row in matched]
        return _result(elements, rows, started)

    if tdef.name.startswith("st_"):
        raise DbError(400, f"`{tdef.name}` is a system table and cannot be modified")

    with db.transaction() as tx:
        if kind == "insert":
            cols = st["cols"] or [c for c, _ in tdef.columns]
            for c in cols:
                _col_type(tdef, c)
            for vals in st["rows"]:
                if len(vals) != len(cols):
                    raise DbError(400, f"INSERT has {len(vals)} values but {len(cols)} columns")
                row: Row = []
                for cname, cty in tdef.columns:
                    if cname in cols:
                        row.append(coerce(vals[cols.index(cname)], cty))
                    elif cname == tdef.autoinc:
                        row.append(0)
                    else:
                        raise DbError(400, f"INSERT into `{tdef.name}` is missing a value for column `{cname}`")
                tx.insert(table, row)
        elif kind == "update":
            sets = [(_col_type(tdef, c)[0], coerce(lit, _col_type(tdef, c)[1])) for c, lit in st["sets"]]
            for rowid, row in list(table.rows.items()):
                if pred(row):
                    new = list(row)
                    for idx, value in sets:
                        new[idx] = value
                    tx.update(table, rowid, new)
        else:
            for rowid, row in list(table.rows.items()):
                if pred(row):
                    tx.delete(table, rowid)
    return _result([], [], started, tx.inserted, tx.deleted, tx.updated)


def result_rows_for_subscription(db: Database, query: str, caller: str) -> tuple[Table, list[Row]]:
    """Rows matching a subscription query (``SELECT * FROM t [WHERE …]``), raw (not JSON-encoded)."""
    parser = Parser(query)
    kind, st = parser.statement()
    if kind != "select" or st["proj"] != "*":
        raise DbError(400, "Subscriptions only support `SELECT * FROM table [WHERE ...]`")
    table = _resolve_table(db, st["table"], caller == db.owner)
    pred = _compile_where(table.tdef, st["where"])
    return table, [row for row in table.rows.values() if pred(row)]
