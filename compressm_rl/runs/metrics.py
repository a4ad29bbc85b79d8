"""``metrics.csv``: one row per PPO iteration."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from compressm_rl.runs.files import atomic_write_text

METRICS = "metrics.csv"


class MetricsLog:
    """Append-only CSV of per-iteration metrics (header written once)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / METRICS

    def append(self, row: dict) -> None:
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def read(self) -> list[dict]:
        """The complete rows; a torn last line (a process killed mid-append) is left out."""
        if not self.path.exists():
            return []
        text = self.path.read_text()
        if not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
        rows = list(csv.DictReader(io.StringIO(text)))
        return [r for r in rows if None not in r.values() and None not in r]

    def truncate_after(self, global_step: int) -> None:
        """Drop rows logged after the checkpoint a resumed run restarts from."""
        rows = [r for r in self.read() if int(r["global_step"]) <= global_step]
        if not rows:
            self.path.unlink(missing_ok=True)
            return
        header = list(rows[0])
        lines = [",".join(header)] + [",".join(str(r[k]) for k in header) for r in rows]
        atomic_write_text(self.path, "\n".join(lines) + "\n")
