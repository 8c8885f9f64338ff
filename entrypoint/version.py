"""The package version: one place, read by pyproject.toml (dynamic version), ``--version`` and the logs."""

__version__ = "0.1.0"
