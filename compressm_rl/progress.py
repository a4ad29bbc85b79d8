"""Training progress for people and for logs: a bar on a terminal, plain periodic lines
(``key=value``, one per line, easy to grep or parse) when the output is a file or a pipe,
as under a cluster scheduler, CI or ``nohup``."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


class LineProgress:
    """``tqdm``'s ``update`` / ``set_postfix`` / ``close``, printed as one line every
    ``interval`` seconds and at the end: ``step=20480/100000 sps=1843 return=182.3``."""

    def __init__(
        self,
        total: int,
        initial: int,
        interval: float = LOG_INTERVAL_S,
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.n, self.interval = total, initial, interval
        self.stream = stream or sys.stderr
        self.fields: dict[str, str] = {}
        self._printed_at = time.monotonic()
        self._printed_n = initial

    def update(self, steps: int) -> None:
        self.n += steps

    def set_postfix(self, **fields) -> None:
        self.fields = {k: str(v) for k, v in fields.items()}
        if time.monotonic() - self._printed_at >= self.interval:
            self._print()

    def close(self) -> None:
        if self.n != self._printed_n:
            self._print()

    def _print(self) -> None:
        extra = "".join(f" {k}={v}" for k, v in self.fields.items())
        self.stream.write(f"step={self.n}/{self.total}{extra}\n")
        self.stream.flush()
        self._printed_at, self._printed_n = time.monotonic(), self.n


def progress(total: int, initial: int, enabled: bool) -> tqdm | LineProgress:
    """A bar when stderr is a terminal, periodic lines otherwise (nothing if disabled)."""
    if enabled and not sys.stderr.isatty():
        return LineProgress(total, initial)
    return tqdm(total=total, initial=initial, unit="step", disable=not enabled, dynamic_ncols=True)
