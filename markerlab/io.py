"""Small file helpers: atomic writes, JSON/JSONL I/O, file records, exclusive locks.

Every finished file in a run directory is written to a temporary name in the
same directory and renamed into place, so a killed process never leaves a
half-written file under the final name. A file that cannot be read or written
(missing, not UTF-8, bad JSON, permission, full disk) is a one-line UserError
naming it, and the line where there is one.

    with exclusive_lock(run_dir / ".lock", f"run directory {run_dir}"):
        ...   # a second process gets one line naming this one's pid and command
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import sys
import tempfile
import tomllib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import ProblemsError, UserError

# mkstemp creates owner-only files; give finished files the permissions an
# ordinary open() would (0666 less the umask). Read once, here.
_UMASK = os.umask(0)
os.umask(_UMASK)


def _os_error(path, e: OSError, doing: str) -> UserError:
    return UserError(f"{path}: cannot {doing} ({e.strerror or e})")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temporary file beside `path` (same file system), then rename it over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _os_error(path, e, "write") from None
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _os_error(path, e, "write") from None
        raise
    return path


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A fresh temporary directory in `parent` with the permissions of an ordinary mkdir (mkdtemp's are 0700)."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(tmp, 0o777 & ~_UMASK)
    return tmp


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise _os_error(path, e, "read") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def read_toml(path: str | os.PathLike, what: str, error: type[ProblemsError] = ProblemsError) -> dict:
    """The tables of the TOML file `path`, a `what` ("config", "experiment"); a directory, a
    missing, unreadable or non-UTF-8 file is one UserError line naming it, invalid TOML an `error`."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a TOML {what} file")
    if not path.exists():
        raise UserError(f"{path}: {what} file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise _os_error(path, e, f"read the {what}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise error(str(path), [f"invalid TOML: {e}"]) from None


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records one JSON object a line, atomically; returns the count."""
    lines = [json.dumps(r, ensure_ascii=False, sort_keys=False) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; bad JSON is a UserError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise _os_error(path, e, "read") from None
    with f:
        lineno = 0
        while True:
            try:
                raw = f.readline()
            except OSError as e:
                raise _os_error(path, e, "read") from None
            if not raw:
                break
            lineno += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line: {e.reason})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file; a malformed line is a UserError naming file:line."""
    return [obj for _, obj in iter_jsonl(path)]


def replace_dir(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> None:
    """Move a fully written directory into place, replacing any previous one."""
    final_dir = Path(final_dir)
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp_dir, final_dir)


# --------------------------------------------------------------------------- file records

def file_record(path: str | os.PathLike, lines: bool = False, digest: bool = True) -> dict:
    """{"size", "sha256"[, "lines"]} of a file, in one pass: what a stage records of its outputs.

    `lines` counts non-blank lines (the records of a JSONL file); `digest=False`
    records the size only (for files of many GB that are checked otherwise).
    """
    h, n, size = hashlib.sha256(), 0, 0
    try:
        with open(path, "rb") as f:
            if not digest and not lines:
                return {"size": os.fstat(f.fileno()).st_size}
            chunks = f if lines else iter(lambda: f.read(1 << 20), b"")  # by line only when counting them
            for chunk in chunks:
                size += len(chunk)
                h.update(chunk)
                n += bool(lines and chunk.strip())
    except OSError as e:
        raise _os_error(path, e, "read") from None
    rec = {"size": size}
    if digest:
        rec["sha256"] = h.hexdigest()
    if lines:
        rec["lines"] = n
    return rec


def record_mismatch(path: str | os.PathLike, rec: dict) -> str | None:
    """How the file differs from its record (None when it matches): missing, line count, size or sha256."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    now = file_record(path, lines="lines" in rec, digest="sha256" in rec)
    if "lines" in rec and now["lines"] != rec["lines"]:
        return f"{now['lines']} lines, recorded {rec['lines']}"
    if now["size"] != rec["size"]:
        return f"{now['size']} bytes, recorded {rec['size']}"
    if "sha256" in rec and now["sha256"] != rec["sha256"]:
        return f"sha256 {now['sha256'][:12]}..., recorded {rec['sha256'][:12]}... (same size)"
    return None


# --------------------------------------------------------------------------- locks

@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str):
    """Hold an exclusive flock on `path` (created if needed) for the block.

    The kernel drops the lock when this process ends, however it ends (SIGKILL
    included), so a lock is never left stale. The holder writes its pid and
    command into the file; a second process gets a UserError naming them. Where
    the file cannot be opened for writing (a read-only run directory, whose
    files nobody can change), it is locked read-only, or not at all if absent.
    """
    path = Path(path)
    writable = True
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise _os_error(path, e, "create the lock file") from None
        writable = False
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            yield
            return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
                who = f"pid {holder['pid']} ({holder['command']}, since {holder['since']})"
            except (ValueError, KeyError, TypeError):
                who = "another process"
            raise UserError(f"{what} is in use by {who}; wait for it to finish, or stop it") from None
        if writable:
            me = {"pid": os.getpid(), "command": shlex.join([Path(sys.executable).name, *sys.argv]),
                  "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode("utf-8") + b"\n", 0)
        yield
    finally:
        os.close(fd)
