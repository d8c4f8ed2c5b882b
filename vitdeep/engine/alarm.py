"""The over-smoothing alarm: a rule on the live layer-wise CosSim that training already measures.

Every `--oversmoothing-every` steps the loop measures the last layer's patch CosSim
(`cossim/last`, docs/method.md §1.1) on its fixed probe batch. `--oversmoothing-alarm X` (0 = off)
fires once, at the first measurement where either

- the last `ALARM_WINDOW` measurements all stay above X (the tokens have become alike and stay
  so), or
- they rise at every measurement and by more than `ALARM_RISE` in all, across the last
  `ALARM_WINDOW` measurements (the tokens are becoming alike fast, before they cross X).

A non-finite measurement is no evidence either way: it is skipped. The rule is free of torch; the
loop acts on what it returns (`--oversmoothing-action warn|stop`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: K: the measurements the rule looks back over.
ALARM_WINDOW = 3
#: The rise of the last layer's CosSim across the window that fires the alarm below the threshold.
ALARM_RISE = 0.25
#: Exit code of a run the alarm stopped (`--oversmoothing-action stop`) after saving: neither a
#: failure (1), a usage error (2), nor the signal-stopped 75 that a Slurm script requeues.
EXIT_OVERSMOOTHED = 3


@dataclass
class OversmoothingAlarm:
    """Watches one run's series of last-layer CosSim values; `observe` says when the rule fires."""

    threshold: float
    window: int = ALARM_WINDOW
    rise: float = ALARM_RISE
    history: list[float] = field(default_factory=list)
    fired: bool = False

    def observe(self, cossim: float) -> str | None:
        """Add one measurement; the reason (one sentence) the first time the rule holds, else None."""
        if self.fired or not math.isfinite(cossim):
            return None
        self.history = [*self.history, cossim][-self.window :]
        if len(self.history) < self.window:
            return None
        shown = ", ".join(f"{value:.3f}" for value in self.history)
        if min(self.history) > self.threshold:
            self.fired = True
            return f"the last layer's patch CosSim stayed above {self.threshold:g} for {self.window} measurements ({shown})"
        steps = [b - a for a, b in zip(self.history, self.history[1:])]
        if all(step > 0 for step in steps) and self.history[-1] - self.history[0] > self.rise:
            self.fired = True
            return (f"the last layer's patch CosSim rose by {self.history[-1] - self.history[0]:.3f} (more than {self.rise:g}) "
                    f"over {self.window} measurements ({shown})")
        return None

