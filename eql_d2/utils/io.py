"""Writes that are never seen half done: the data goes to a temporary sibling that replaces
the target with one rename, so a reader (or a run killed mid-write) sees the old file or the
new one, never a truncated one."""

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile

__all__ = ["PARTIAL_SUFFIX", "atomic_write", "atomic_directory", "read_json", "write_json_atomic"]

# Temporary names are "<target>.partial-<pid>"; files with this marker are never complete.
PARTIAL_SUFFIX = ".partial"


def _partial_name(path: str) -> str:
    return f"{path}{PARTIAL_SUFFIX}-{os.getpid()}"


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", *, fsync: bool = False):
    """Open a temporary file for writing; on a clean exit it replaces `path` (one rename).

    On an exception the temporary file is removed and `path` keeps its old content.
    `fsync` flushes the data to disk before the rename (checkpoints: a crash of the machine
    right after the rename must not leave an empty file under the final name).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = _partial_name(path)
    try:
        with open(tmp, mode) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_json(path: str, what: str = "JSON file"):
    """The parsed content of `path`; FileNotFoundError naming `what` and the path when it is
    absent, ValueError naming the path when it is not valid JSON."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def write_json_atomic(path: str, obj, **dump_kwargs) -> None:
    """Write `obj` as JSON so that `path` either keeps its old content or is complete."""
    with atomic_write(path) as f:
        json.dump(obj, f, **dump_kwargs)


@contextlib.contextmanager
def atomic_directory(path: str):
    """Yield a temporary sibling folder to fill; on a clean exit it replaces `path`.

    An existing `path` is moved aside first and deleted after the new folder is in place, so
    at every moment `path` is either absent, the old folder or the complete new one. On an
    exception the temporary folder is removed.
    """
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{name}{PARTIAL_SUFFIX}-", dir=parent)
    try:
        yield tmp
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f"{name}{PARTIAL_SUFFIX}-old-", dir=parent)
            os.replace(path, os.path.join(old, name))
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_script(path: str, name: str = ""):
    """The Python script at `path` as a module, for scripts that are files rather than
    modules of a package (``train_net.py``, ``tools/``, ``benchmarks/``); `name` defaults to
    the file's base name. The module is not added to ``sys.modules``."""
    name = name or os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
