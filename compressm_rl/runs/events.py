"""``compression.json``: every reduction decision of a run, one ``ReductionEvent`` each."""

from __future__ import annotations

import json
from pathlib import Path

from compressm_rl.compression import ReductionEvent
from compressm_rl.runs.files import atomic_write_text

EVENTS = "compression.json"


class EventLog:
    """The run's reduction events as a JSON list, rewritten atomically on every change."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / EVENTS

    def read(self) -> list[ReductionEvent]:
        if not self.path.exists():
            return []
        try:
            records = json.loads(self.path.read_text())
            return [ReductionEvent.from_dict(r) for r in records]
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(
                f"{self.path} is corrupt or not a compressm-rl event log ({err}); "
                "delete it to drop the run's compression history"
            ) from err

    def append(self, events: list[ReductionEvent]) -> None:
        self._write(self.read() + list(events))

    def drop_from(self, step: int) -> None:
        """Forget the in-training events at ``step`` or later: a run resumed from a
        checkpoint at ``step`` redoes those reductions and records them again (a reduction
        at step S runs after the checkpoint at S). Post-training events describe the
        checkpoint itself and stay."""
        if self.path.exists():
            self._write([e for e in self.read() if e.step < step or e.post_training])

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def _write(self, events: list[ReductionEvent]) -> None:
        atomic_write_text(self.path, json.dumps([e.to_dict() for e in events], indent=1))
