"""``supervision/`` is generic: it imports the shared root (config, errors, logs, fsutil), never a domain package.

Read from the source, imports inside functions and ``TYPE_CHECKING`` blocks
included: a domain import anywhere in supervision would tie the loop to one
child again.
"""

from __future__ import annotations

import ast
from pathlib import Path

import entrypoint.supervision

DOMAINS = ("entrypoint.spacetimedb", "entrypoint.web", "entrypoint.oidc")


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_supervision_imports_no_domain_package() -> None:
    package = Path(entrypoint.supervision.__file__).parent
    modules = sorted(package.glob("*.py"))
    assert len(modules) >= 6
    offending = {path.name: sorted(n for n in imported(path) if n.startswith(DOMAINS)) for path in modules}
    assert {name: found for name, found in offending.items() if found} == {}
