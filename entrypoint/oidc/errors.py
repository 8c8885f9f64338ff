"""How a provider check fails: permanent (exit 78) or unreachable until the deadline (69 or "unverified").

Shared by ``fetch`` (HTTP answers that are wrong), ``rules`` (documents that
are wrong) and ``check`` (giving up at the deadline).  ``str()`` of each error
is the whole message for the operator: the variable, its value, what is wrong
and the fix.
"""

from __future__ import annotations

from typing import Any

from entrypoint.errors import EXIT_CONFIG, EXIT_UNAVAILABLE


class OidcError(Exception):
    """A provider check failed; ``str()`` is the full message for the operator.

    Attributes:
        reason: a short stable code (e.g. ``issuer_mismatch``, ``hs256_only``,
            ``unreachable``), in the ``oidc-check`` helper's answer and in the
            ``oidc.invalid`` event (docs/operations.md lists them).
        variable: the setting to look at (usually ``OIDC_ISSUER``).
        value: its current value.
        detail: what is wrong, in one sentence.
        fix: what to do about it, or ``None``.
        suggested_value: the exact value to set ``variable`` to, when we know it.
        url: the URL whose answer was wrong, when there is one.
        exit_code: what the entrypoint exits with for this error.
    """

    exit_code: int = EXIT_CONFIG

    def __init__(
        self,
        detail: str,
        *,
        reason: str,
        variable: str = "OIDC_ISSUER",
        value: str | None = None,
        fix: str | None = None,
        suggested_value: str | None = None,
        url: str | None = None,
    ) -> None:
        self.detail = detail
        self.reason = reason
        self.variable = variable
        self.value = value
        self.fix = fix
        self.suggested_value = suggested_value
        self.url = url
        shown = "(unset)" if value is None else repr(value)
        message = f"{variable}={shown}: {detail}"
        if fix:
            message += f". Fix: {fix}"
        super().__init__(message)


class OidcConfigError(OidcError):
    """Permanent: retrying cannot help; the entrypoint exits 78 (EX_CONFIG) before serving."""

    exit_code = EXIT_CONFIG


class OidcUnavailable(OidcError):
    """The provider could not be reached (or kept failing transiently) until the deadline.

    Under ``STRICT_MODE`` the entrypoint exits 69 (EX_UNAVAILABLE); otherwise it
    keeps serving the overlay, reports ``oidc: unverified`` and re-checks in the
    background (``entrypoint/oidc/verdict.py``, each check an ``oidc-check``
    process).

    Extra attributes: ``attempts`` (request rounds made), ``elapsed`` (seconds),
    ``last_error`` (the last transient failure, as text).
    """

    exit_code = EXIT_UNAVAILABLE

    def __init__(self, detail: str, *, attempts: int, elapsed: float, last_error: str, **kwargs: Any) -> None:
        self.attempts = attempts
        self.elapsed = elapsed
        self.last_error = last_error
        super().__init__(detail, reason="unreachable", **kwargs)
