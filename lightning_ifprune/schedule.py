"""When pruning happens during fit, and how much each round keeps.

Two schedules, validated at construction: *rounds* at the start of epochs spread from
``start_epoch`` to ``end_epoch``, each keeping ``target ** (i / rounds)`` (``geometric``) or
``1 - (1 - target) * i / rounds`` (``linear``) of the original; or *progressive* steps,
``channels_per_step`` channels every ``every_n_steps`` optimizer steps (the reference's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SPLITS = ("geometric", "linear")


def check_int(name: str, value: Any, low: int) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an int ≥ ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")


@dataclass(frozen=True)
class PruningSchedule:
    """A validated round or progressive schedule (see the module docstring)."""

    start_epoch: int = 0
    end_epoch: int | None = None
    rounds: int = 1
    split: str = "geometric"
    every_n_steps: int | None = None
    channels_per_step: int = 1

    def __post_init__(self) -> None:
        check_int("start_epoch", self.start_epoch, 0)
        check_int("rounds", self.rounds, 1)
        check_int("channels_per_step", self.channels_per_step, 1)
        if self.end_epoch is None:
            object.__setattr__(self, "end_epoch", self.start_epoch + self.rounds - 1)
        check_int("end_epoch", self.end_epoch, self.start_epoch)
        if self.every_n_steps is not None:
            check_int("every_n_steps", self.every_n_steps, 1)
        elif self.end_epoch - self.start_epoch + 1 < self.rounds:
            raise ValueError(f"rounds={self.rounds} do not fit in epochs {self.start_epoch}..{self.end_epoch}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")

    @property
    def progressive(self) -> bool:
        """Whether channels go a few at a time every ``every_n_steps`` steps."""
        return self.every_n_steps is not None

    def round_epochs(self) -> list[int]:
        """Epochs whose start triggers a round (round schedule)."""
        if self.rounds == 1:
            return [self.start_epoch]
        span = self.end_epoch - self.start_epoch
        return [self.start_epoch + round(i * span / (self.rounds - 1)) for i in range(self.rounds)]

    def round_target(self, i: int, target: float) -> float:
        """Fraction kept after round ``i`` (1-based) on the way to ``target``."""
        if self.split == "geometric":
            return target ** (i / self.rounds)
        return 1 - (1 - target) * i / self.rounds

    def step_due(self, epoch: int, global_step: int, steps_done: int) -> bool:
        """Whether a progressive step is due at ``global_step`` (``steps_done`` already taken)."""
        if not self.progressive or epoch < self.start_epoch or global_step == 0:
            return False
        return global_step % self.every_n_steps == 0 and steps_done * self.every_n_steps < global_step

    def overrun(self, max_epochs: int | None) -> str | None:
        """Why this schedule cannot finish within ``max_epochs`` (None: it can, or no limit)."""
        if max_epochs is None or max_epochs < 0:
            return None
        if self.progressive:
            if self.start_epoch < max_epochs:
                return None
            return f"progressive pruning from start_epoch={self.start_epoch} never runs within max_epochs={max_epochs}"
        epochs = self.round_epochs()
        if epochs[-1] < max_epochs:
            return None
        return (
            f"pruning rounds at epochs {epochs} (start_epoch={self.start_epoch}, end_epoch={self.end_epoch}) "
            f"do not all run within max_epochs={max_epochs}"
        )

    def last_epoch(self) -> int:
        """The last epoch in which the round schedule prunes."""
        return self.end_epoch
