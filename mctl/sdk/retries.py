"""`Retries`: how often and how patiently a failed input is retried."""

from __future__ import annotations

from dataclasses import dataclass

from mctl.exception import InvalidError


@dataclass(frozen=True)
class Retries:
    """Retry a failed input up to `max_retries` times, waiting
    `initial_delay * backoff_coefficient ** (attempt - 1)` seconds, at most `max_delay`."""

    max_retries: int
    backoff_coefficient: float = 2.0
    initial_delay: float = 1.0
    max_delay: float = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_retries, int) or not 0 <= self.max_retries <= 10:
            raise InvalidError(f"Retries(max_retries={self.max_retries!r}) must be an int from 0 to 10.")
        if not 1.0 <= self.backoff_coefficient <= 10.0:
            raise InvalidError("Retries backoff_coefficient must be between 1.0 and 10.0.")
        if not 0 <= self.initial_delay <= 60:
            raise InvalidError("Retries initial_delay must be between 0 and 60 seconds.")
        if not 1 <= self.max_delay <= 60:
            raise InvalidError("Retries max_delay must be between 1 and 60 seconds.")

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
        return min(self.initial_delay * self.backoff_coefficient ** (attempt - 1), self.max_delay)
