"""``metrics.csv``: one row per PPO iteration."""

from __future__ import annotations

import csv
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
        if not self.path.exists():
            return []
        with self.path.open() as f:
            return list(csv.DictReader(f))

    def truncate_after(self, global_step: int) -> None:
        """Drop rows logged after the checkpoint a resumed run restarts from."""
        rows = [r for r in self.read() if int(r["global_step"]) <= global_step]
        if not rows:
            self.path.unlink(missing_ok=True)
            return
        header = list(rows[0])
        lines = [",".join(header)] + [",".join(str(r[k]) for k in header) for r in rows]
        atomic_write_text(self.path, "\n".join(lines) + "\n")
