"""Writing into a run directory safely: atomic writes, the training lock, and results
kept beside the checkpoint they measured."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

LOCK = ".lock"


class RunDirectoryBusy(OSError):
    """Another process is training in this run directory."""


@contextmanager
def locked_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock for the ``with`` block (released when the block
    ends or the process dies: no stale locks). POSIX only: elsewhere nothing is locked."""
    with open(Path(run_dir) / LOCK, "w") as handle:
        try:
            import fcntl
        except ImportError:
            yield
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirectoryBusy(
                f"another process is training in {run_dir}; wait for it or stop it first"
            ) from None
        yield


# What a training process writes into its run directory (the lock holder's files only:
# `export` and `report` write there without the lock).
TRAINER_FILES = ("checkpoint.pt", "config.yaml", "metrics.csv", "compression.json", "hsv_*.png")


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete the temporary files of a trainer's writes that a killed process left half
    done (``atomic_write`` names them ``.NAME.*.tmp``); call while holding the lock."""
    for name in TRAINER_FILES:
        for tmp in Path(run_dir).glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


# What this tool writes into a run directory, all told: the trainer's files, the report,
# and `export`'s and `bench --out-dir`'s default outputs. `--overwrite` removes these and
# nothing else: a file the tool did not write is never deleted.
RUN_OUTPUTS = (
    *TRAINER_FILES,
    "report.md",
    "learning_curve.png",
    "policy.onnx",
    "latency.md",
    "latency.json",
    "latency_hist.png",
)
C_EXPORT_DIR = "policy_c"  # removed only while it holds a C export's policy.c


def clear_run_dir(run_dir: Path) -> list[Path]:
    """Delete the files this tool wrote in ``run_dir`` (``RUN_OUTPUTS``, and the default C
    export directory) and nothing else; call while holding the lock, on a directory known
    to hold a run (``runs.config.check_replaceable``). Returns what was removed."""
    run_dir = Path(run_dir)
    removed = []
    for pattern in RUN_OUTPUTS:
        for path in sorted(run_dir.glob(pattern)):
            if path.is_file() or path.is_symlink():
                path.unlink()
                removed.append(path)
    c_export = run_dir / C_EXPORT_DIR
    if c_export.is_dir() and not c_export.is_symlink() and (c_export / "policy.c").is_file():
        shutil.rmtree(c_export)
        removed.append(c_export)
    return removed


def atomic_write(
    path: Path,
    write: Callable[[BinaryIO], object],
    verify: Callable[[Path], object] | None = None,
) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file in the same directory,
    then rename it over ``path``: a process killed mid-write leaves the old file intact.
    ``verify(temporary path)``, if given, runs on the complete file before the rename; if
    it raises, ``path`` is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_dir(
    path: Path,
    files: dict[str, bytes],
    verify: Callable[[Path], object] | None = None,
    owned: Callable[[Path], bool] = lambda existing: False,
) -> None:
    """Write ``files`` (name -> bytes) as the directory ``path``, all or nothing.

    The files go into a temporary sibling directory; ``verify(that directory)`` runs on
    the complete set; then it takes ``path``'s place (the previous directory is removed
    only after the new one is in place). A ``path`` that exists must satisfy
    ``owned(path)`` (e.g. hold a previous export), so unrelated data is never replaced.
    """
    path = Path(path)
    if path.exists() and not (path.is_dir() and owned(path)):
        raise FileExistsError(
            f"{path} exists and is not a previous export of this kind; choose another --out "
            f"or remove it"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = tmp.with_suffix(".old")
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        if verify is not None:
            verify(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)  # put the previous export back
        raise
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """A matplotlib figure as a PNG, written atomically (a killed run leaves no 0-byte plot)."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def checkpoint_stamp(run_dir: Path) -> list[int]:
    """The run's ``checkpoint.pt`` as a kept result's key names it: size and mtime (ns).
    Training on rewrites it, so results of an older checkpoint are not re-read."""
    stat = (Path(run_dir) / "checkpoint.pt").stat()
    return [stat.st_size, stat.st_mtime_ns]


def read_kept(path: Path, key: dict) -> Any | None:
    """The result kept in ``path`` (``keep``) under ``key``; None if there is none, it
    was kept under another key, or the file is unreadable (half written by a process
    killed before atomic writes, or edited: measured again, never half-read)."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("key") != json.loads(json.dumps(key)):
        return None  # the key compared as it reads back (tuples as lists)
    return saved.get("result")


def keep(path: Path, key: dict, result: Any) -> None:
    """Keep the JSON-able ``result`` in ``path`` under ``key``, atomically."""
    atomic_write_text(Path(path), json.dumps({"key": key, "result": result}, indent=1) + "\n")


def kept(path: Path, key: dict, compute: Callable[[], Any]) -> Any:
    """The result kept in ``path`` under ``key``, else ``compute()``, kept there."""
    result = read_kept(path, key)
    if result is None:
        result = compute()
        keep(path, key, result)
    return result
