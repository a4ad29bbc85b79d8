"""The threaded physics step's build cache (``envs.physics``): built with the real C
compiler, loaded only from a directory and a file that are this user's own and that no
one else can write to, and never through a symbolic link (another user's planted
library must not run in this process)."""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile

import pytest

import envs.physics

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX permissions, /proc"),
    pytest.mark.skipif(
        not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")),
        reason="no C compiler",
    ),
]

OTHER_UID = 65534  # nobody: "another user" (the tests run as root, which may chown)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """Nothing built in this process yet; the cache under ``tmp_path/cache``."""
    monkeypatch.setattr(envs.physics, "_library", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def _built(cache) -> list:
    return sorted(cache.glob("step_all-*.so"))


def _a_library(tmp_path, monkeypatch):
    """A genuine build of the library (as a planted copy would be), and its file name."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "elsewhere"))
    envs.physics._build()
    monkeypatch.setattr(envs.physics, "_library", None)
    (library,) = _built(tmp_path / "elsewhere" / "compressm-rl")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return library


def test_the_library_is_built_into_a_private_cache_and_loaded(fresh):
    library = envs.physics._build()
    assert library.step_all(None, None, None, 0, 1, 1) == 1  # the C code runs: no envs
    assert envs.physics._build() is library  # once per process
    cache = fresh / "cache" / "compressm-rl"
    (built,) = _built(cache)
    info = built.lstat()
    assert stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid()
    assert not info.st_mode & 0o022
    assert not cache.stat().st_mode & 0o077  # made 0700
    assert [p.name for p in cache.iterdir()] == [built.name]  # no partial files left
    envs.physics._library = None  # a second process: loads what is there
    assert envs.physics._build().step_all(None, None, None, 0, 1, 1) == 1
    assert _built(cache) == [built] and built.stat().st_ino == info.st_ino


def test_a_cache_directory_that_is_a_symbolic_link_is_not_followed(fresh):
    target = fresh / "target"
    target.mkdir(mode=0o700)
    (fresh / "cache").mkdir()
    (fresh / "cache" / "compressm-rl").symlink_to(target)
    with pytest.raises(OSError, match="symbolic link"):
        envs.physics._build()
    assert list(target.iterdir()) == []  # nothing built or loaded through the link


def test_the_temporary_fallback_is_not_followed_through_a_symbolic_link(fresh, monkeypatch):
    """With no writable cache home: ``$TMPDIR/compressm-rl-UID``, which another user of a
    shared /tmp may have made a link (to a directory they can swap out later)."""
    (fresh / "cache").write_text("a file, not a directory: the cache cannot be made")
    monkeypatch.setenv("XDG_CACHE_HOME", str(fresh / "cache" / "sub"))
    shared = fresh / "tmp"
    shared.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    target = fresh / "target"
    target.mkdir(mode=0o700)
    (shared / f"compressm-rl-{os.getuid()}").symlink_to(target)
    with pytest.raises(OSError, match="symbolic link"):
        envs.physics._build()
    assert list(target.iterdir()) == []
    (shared / f"compressm-rl-{os.getuid()}").unlink()  # without the link: built there
    assert envs.physics._build().step_all(None, None, None, 0, 1, 1) == 1
    assert len(_built(shared / f"compressm-rl-{os.getuid()}")) == 1


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777], ids=oct)
def test_a_cache_directory_others_can_write_to_is_refused(fresh, mode):
    cache = fresh / "cache" / "compressm-rl"
    cache.mkdir(parents=True)
    cache.chmod(mode)
    with pytest.raises(OSError, match="writable by other users"):
        envs.physics._build()
    assert _built(cache) == []


def test_a_cache_directory_of_another_user_is_refused(fresh):
    if os.getuid() != 0:
        pytest.skip("only root can give a directory away")
    cache = fresh / "cache" / "compressm-rl"
    cache.mkdir(parents=True, mode=0o755)
    os.chown(cache, OTHER_UID, -1)
    with pytest.raises(OSError, match="belongs to another user"):
        envs.physics._build()


def test_a_planted_library_of_another_user_is_not_loaded(fresh, monkeypatch):
    """The attack: a working library under the predictable name, owned by someone else."""
    if os.getuid() != 0:
        pytest.skip("only root can give a file away")
    genuine = _a_library(fresh, monkeypatch)
    cache = fresh / "cache" / "compressm-rl"
    cache.mkdir(parents=True, mode=0o700)
    planted = cache / genuine.name
    shutil.copy(genuine, planted)
    os.chown(planted, OTHER_UID, -1)
    planted.chmod(0o755)
    with pytest.raises(OSError, match="belongs to another user"):
        envs.physics._build()
    assert envs.physics._library is None


@pytest.mark.parametrize("mode", [0o777, 0o775], ids=oct)
def test_a_library_others_can_write_to_is_not_loaded(fresh, monkeypatch, mode):
    genuine = _a_library(fresh, monkeypatch)
    cache = fresh / "cache" / "compressm-rl"
    cache.mkdir(parents=True, mode=0o700)
    shutil.copy(genuine, cache / genuine.name)
    (cache / genuine.name).chmod(mode)
    with pytest.raises(OSError, match="writable by other users"):
        envs.physics._build()
    assert envs.physics._library is None


def test_a_library_name_that_is_a_symbolic_link_is_not_loaded(fresh, monkeypatch):
    genuine = _a_library(fresh, monkeypatch)
    cache = fresh / "cache" / "compressm-rl"
    cache.mkdir(parents=True, mode=0o700)
    (cache / genuine.name).symlink_to(genuine)
    with pytest.raises(OSError, match="symbolic link"):
        envs.physics._build()
    assert envs.physics._library is None


def test_a_refused_cache_falls_back_to_stepping_env_by_env_with_the_reason(fresh):
    cache = fresh / "cache" / "compressm-rl"
    cache.mkdir(parents=True)
    cache.chmod(0o777)
    physics, why = envs.physics.parallel_physics([None, None], threads=2)
    if len(os.sched_getaffinity(0)) < 2:
        assert physics is None and "one CPU" in why
    else:
        assert physics is None and "writable by other users" in why and "chmod go-w" in why
