"""`Retries`: how often and how patiently a failed input is retried."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mctl.exception import InvalidError

if TYPE_CHECKING:
    from mctl.core.spec import RetryPolicy


@dataclass(frozen=True)
class Retries:
    """Retry a failed input up to `max_retries` times, waiting
    `initial_delay * backoff_coefficient ** (attempt - 1)` seconds, at most `max_delay`.

    The bounds and the back-off formula are those of `mctl.core.spec.RetryPolicy`, what the
    control plane applies.
    """

    max_retries: int
    backoff_coefficient: float = 2.0
    initial_delay: float = 1.0
    max_delay: float = 60.0

    def __post_init__(self) -> None:
        self.policy()

    def policy(self) -> RetryPolicy:
        from mctl.core.spec import RetryPolicy, validate_declared

        try:
            return validate_declared(RetryPolicy, vars(self))
        except ValueError as exc:
            raise InvalidError(f"Retries: {exc}.") from None

    @classmethod
    def coerce(cls, value: int | Retries | None) -> Retries | None:
        """`retries=3` means `Retries(max_retries=3, backoff_coefficient=1.0)`, as in Modal."""
        if value is None or isinstance(value, Retries):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(max_retries=value, backoff_coefficient=1.0)
        raise InvalidError(f"retries must be an int or mctl.Retries, not {type(value).__name__}.")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (1-based)."""
        return self.policy().delay(attempt)
