"""Child side of the code sandbox (see code.py): run one program against its tests.

Started as `python -I -B _sandbox_runner.py` in a fresh temp dir; reads one JSON payload
from stdin, locks itself down, then reports "<nonce> <test index> <0|1>" lines on a
private copy of stdout. Standard library only; nothing here trusts the program.
"""

import io
import json
import os
import resource
import signal
import sys


class _TestTimeout(BaseException):
    """BaseException, so the program's `except Exception` does not swallow it."""


def _limit(memory_bytes, file_bytes, cpu_s):
    for res, value in ((resource.RLIMIT_AS, memory_bytes), (resource.RLIMIT_FSIZE, file_bytes),
                       (resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_CORE, 0),
                       (resource.RLIMIT_NOFILE, 64)):
        try:
            resource.setrlimit(res, (value, value))
        except (ValueError, OSError):  # e.g. RLIMIT_AS on macOS: keep the other limits
            pass


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.utime",
                "os.truncate", "os.chflags", "os.lchflags", "os.setxattr", "os.removexattr",
                "sqlite3.connect"}
_TWO_PATH_EVENTS = {"os.rename", "os.link", "os.symlink"}
_BLOCKED_EVENTS = {"socket.__new__", "socket.connect", "socket.bind", "socket.sendto",
                   "socket.getaddrinfo", "os.system", "os.exec", "os.fork", "os.forkpty",
                   "os.posix_spawn", "os.spawn", "subprocess.Popen", "os.kill", "os.killpg",
                   "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function",
                   "resource.setrlimit", "resource.prlimit", "pty.spawn", "os.chroot"}
# _posixsubprocess.fork_exec starts processes without an audit event; the others reach C
# code that writes files or calls arbitrary functions without one.
_BLOCKED_MODULES = {"ctypes", "_ctypes", "_posixsubprocess", "_sqlite3", "_dbm", "_gdbm"}


def _guard(root):
    """An audit hook: no network, processes, signals, FFI or writes outside `root`.

    A guard against accidents and naive attempts, not a security boundary: Python code can
    reach the hook's state through introspection. The real boundaries are the rlimits, the
    network namespace (when available) and, at scale, a container around the trainer."""
    root = os.path.realpath(root)

    def inside(path):
        if isinstance(path, int):  # an fd that was opened under this hook already
            return True
        path = os.fsdecode(path)
        real = os.path.realpath(path)
        return real == root or real.startswith(root + os.sep)

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (flags & _WRITE_FLAGS) if isinstance(flags, int) and flags else (
                mode is not None and any(c in str(mode) for c in "wax+"))
            if writing and path is not None and not inside(path):
                raise PermissionError(f"sandbox: no writes outside the work dir: {path}")
        elif event in _PATH_EVENTS:
            if args and not inside(args[0]):
                raise PermissionError(f"sandbox: {event} outside the work dir")
        elif event in _TWO_PATH_EVENTS:
            if not (inside(args[0]) and inside(args[1])) or event == "os.symlink":
                raise PermissionError(f"sandbox: {event} is not allowed")
        elif event in _BLOCKED_EVENTS:
            raise PermissionError(f"sandbox: {event} is not allowed")
        elif event == "import" and args[0].split(".")[0] in _BLOCKED_MODULES:
            raise ImportError(f"sandbox: import of {args[0]} is not allowed")

    sys.addaudithook(hook)


def _on_alarm(signum, frame):
    raise _TestTimeout


def _run(code, namespace, timeout_s, stdin_text=""):
    """exec `code` under a timer with stdin/stdout swapped; returns (ok, stdout text)."""
    out = io.StringIO()
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = io.StringIO(stdin_text), out, io.StringIO()
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        exec(code, namespace)
        ok = True
    except SystemExit as e:
        ok = e.code in (None, 0)
    except BaseException:  # noqa: BLE001 - any failure, timeout included, fails the test
        ok = False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        sys.stdin, sys.stdout, sys.stderr = saved
    return ok, out.getvalue()


def _same_output(got, want):
    def lines(s):
        return [line.rstrip() for line in s.strip("\n").split("\n")]
    return lines(got) == lines(want)


def main():
    payload = json.loads(sys.stdin.read())
    nonce = payload["nonce"]
    report_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # the program's direct fd writes go nowhere
        os.dup2(devnull, fd)
    os.close(devnull)
    signal.signal(signal.SIGALRM, _on_alarm)
    _limit(payload["memory_bytes"], payload["file_bytes"], payload["cpu_s"])
    _guard(os.getcwd())

    def report(i, ok):
        os.write(report_fd, f"{nonce} {i} {int(ok)}\n".encode())

    tests, timeout_s = payload["tests"], payload["timeout_s"]
    try:
        program = compile(payload["program"], "<solution>", "exec")
    except BaseException:  # noqa: BLE001 - a program that does not compile passes nothing
        program = None
    if program is not None and all(isinstance(t, str) for t in tests):
        namespace = {"__name__": "solution"}  # a `__main__` block would wait for stdin
        defined, _ = _run(program, namespace, timeout_s)
        for i, test in enumerate(tests):
            report(i, defined and _run(test, namespace, timeout_s)[0])
    else:  # stdin/stdout pairs: a fresh run of the program per test
        for i, test in enumerate(tests):
            ok = False
            if program is not None and isinstance(test, dict):
                ran, out = _run(program, {"__name__": "__main__"}, timeout_s,
                                str(test.get("input", "")))
                ok = ran and _same_output(out, str(test.get("output", "")))
            report(i, ok)
    os._exit(0)  # skip atexit handlers the program may have registered


if __name__ == "__main__":
    main()
