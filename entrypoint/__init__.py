"""pogly-entrypoint: the PID 1 of the self-hosted Pogly container."""

__version__ = "0.1.0"
