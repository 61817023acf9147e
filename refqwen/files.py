"""Reading untrusted files and writing outputs safely (see docs/security.md).

Every file refqwen opens comes from somewhere it does not control, so before reading it we check
that it is a regular file (a named pipe would block forever, /dev/zero would never end) and that
small text files (config.json, tokenizer_config.json, templates, indexes) have a sane size. Outputs
are written under a recognisable temporary name beside the target, renamed at the end; a run killed
before the end leaves a partial that the next run for the same target removes.
"""

import json
import os
import re
import shutil
import signal
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

from refqwen.errors import RefqwenError

MAX_JSON_BYTES = 64 * 1024 ** 2  # config.json is ~1 KB, tokenizer_config.json ~10 KB, an index ~100 KB
MAX_TEXT_BYTES = 16 * 1024 ** 2  # a chat template is a few KB


def check_regular_file(path, what: str = "file") -> Path:
    """`path` if it is an existing regular file (symbolic links followed); else a RefqwenError."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise RefqwenError(f"{path}: no such {what}") from None
    except OSError as e:
        raise RefqwenError(f"{path}: cannot read this {what}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a named pipe" if stat.S_ISFIFO(mode) else \
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"
        raise RefqwenError(f"{path}: expected a regular {what}, found {kind}")
    return path


def read_bytes(path, what: str = "file", limit: int = MAX_TEXT_BYTES) -> bytes:
    path = check_regular_file(path, what)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)  # never more than the limit, even if the file grows meanwhile
    except OSError as e:
        raise RefqwenError(f"{path}: cannot read this {what}: {e.strerror}") from None
    if len(data) > limit:
        raise RefqwenError(f"{path}: {what} larger than {limit // 1024 ** 2} MiB; refusing to read it")
    return data


def read_text(path, what: str = "file", limit: int = MAX_TEXT_BYTES) -> str:
    try:
        return read_bytes(path, what, limit).decode("utf-8")
    except UnicodeDecodeError as e:
        raise RefqwenError(f"{path}: {what} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def parse_json(text: str | bytes, source: str):
    """json.loads with every failure (syntax, encoding, nesting too deep) as one RefqwenError."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RefqwenError(f"{source}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise RefqwenError(f"{source}: not UTF-8 JSON ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise RefqwenError(f"{source}: JSON nested too deeply") from None


def read_json(path, what: str = "JSON file", limit: int = MAX_JSON_BYTES, expect=dict):
    """A small JSON file, checked to be a regular file under `limit` bytes whose top level is `expect`."""
    value = parse_json(read_text(path, what, limit), str(path))
    if expect is not None and not isinstance(value, expect):
        raise RefqwenError(f"{path}: expected a JSON {'object' if expect is dict else expect.__name__}, "
                           f"found {type(value).__name__}")
    return value


# ---- writing ------------------------------------------------------------------------------

def partial_prefix(out: Path) -> str:
    """The name prefix of refqwen's temporary output for `out`: `.NAME.partial-PID-`."""
    return f".{out.name}.partial-{os.getpid()}-"


_PARTIAL = re.compile(r"\.(?P<name>.+)\.partial-(?P<pid>\d+)-[A-Za-z0-9_]+")


def clean_stale_partials(out: Path) -> list[Path]:
    """Remove temporary outputs for `out` left by earlier refqwen runs that were killed (their process
    is gone). Only names refqwen itself makes (`.NAME.partial-PID-XXXX`) beside `out` are touched."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for entry in out.parent.iterdir():
        m = _PARTIAL.fullmatch(entry.name)
        if not m or m["name"] != out.name or _alive(int(m["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def follow_umask(path: Path) -> None:
    """tempfile creates private files (0600) and folders (0700); give the output the permissions any
    other tool would (0666 / 0777 less the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    mode = 0o777 if path.is_dir() else 0o666
    os.chmod(path, mode & ~mask)
    if path.is_dir():
        for child in path.rglob("*"):
            os.chmod(child, (0o777 if child.is_dir() else 0o666) & ~mask)


@contextmanager
def sigterm_as_interrupt():
    """While writing, SIGTERM (what `kill` and service managers send) raises KeyboardInterrupt like
    Ctrl-C, so the writers' cleanup runs. Only in the main thread, where Python can install handlers."""
    try:
        previous = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def write_errors(out: Path):
    """OSError while writing (disk full, read-only folder, no permission) -> one RefqwenError naming `out`."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e)
        raise RefqwenError(f"{out}: cannot write the output: {reason}; nothing was written") from None


@contextmanager
def atomic_output_file(out: Path):
    """A temporary path beside `out` to write; on success it follows the umask and replaces `out` whole.
    On any error or SIGTERM it is removed, and a write error is one RefqwenError; partials left by a killed
    run of the same output are removed first."""
    with write_errors(out), sigterm_as_interrupt():
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_partials(out)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=partial_prefix(out))
        os.close(fd)
        try:
            yield Path(tmp)
            follow_umask(Path(tmp))
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
