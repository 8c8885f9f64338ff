"""A stand-in for the SpacetimeDB ``spacetime`` CLI and standalone server.

SpacetimeDB cannot be installed on the machines that run pogly-entrypoint's tests, so this package
reproduces the documented behaviour the supervisor depends on (process contract, locking, signals,
durability, HTTP API, identities and tokens, a Pogly-shaped module).  It is written from the facts in
``/work/shared/reference/spacetimedb.md``; it contains no SpacetimeDB code.

The entry point is ``tests/standin/bin/spacetime`` (a ``#!/bin/sh`` wrapper that ``exec``s
``fake_spacetime.py``), so the supervisor sees exactly one PID, like with the real binary.
"""
