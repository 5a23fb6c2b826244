"""Native parsing of untrusted files in a child process (DESIGN §8).

open3d's readers can crash the process (SIGSEGV on an `.obj` of random bytes) or hang instead of
raising. `IsolatedCalls` keeps one warm child process per parent and runs a function of a module
there: a crash or a time-out kills only the child, becomes a `ChildCrashed` / `ChildTimedOut`
error naming the signal or the time, and the next call starts a fresh child. The child is a
plain `python -m operators.data.isolation` process (not a multiprocessing fork or spawn, which
would re-run the parent's main module: a Ray worker's), talking over a pair of pipes; it
imports the heavy modules once, so a call costs a pipe round trip plus pickling its result,
and only a crash pays for a new interpreter.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
from multiprocessing.connection import Connection
from typing import Any

from operators.failures import InfrastructureError

# Modules the child imports before it serves (open3d takes a second to import).
PRELOAD = ["operators.data.assets"]
# How long a child may take to start (interpreter + PRELOAD) before it counts as broken; the
# per-call time limit starts only once it is ready.
STARTUP_TIMEOUT_S = 120.0
_PR_SET_PDEATHSIG = 1


class ChildCrashed(RuntimeError):
    """The child process died while working (a native crash); the message names the signal."""


class ChildTimedOut(RuntimeError):
    """The child did not answer within the time limit and was killed."""


def _die_with_parent(parent: int) -> None:
    """Child: have the kernel kill this process when its parent dies (Linux), so a child stuck
    in a native parse never outlives a killed worker. (The signal follows the parent thread
    that started the child; should that thread end first, the idle child goes and the next
    call starts another.)"""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the closed pipe still ends an idle child
        pass
    if os.getppid() != parent:  # the parent died before the request above took effect
        os._exit(1)


def _serve(requests: Connection, replies: Connection, parent: int, preload: list[str]) -> None:
    """Child: say "ready" once the heavy modules are imported, then run (module, function,
    args) requests until the pipe closes."""
    _die_with_parent(parent)
    for module in preload:
        importlib.import_module(module)
    devnull = os.open(os.devnull, os.O_WRONLY)  # after start-up, native warnings go nowhere
    os.dup2(devnull, 2)
    replies.send("ready")
    while True:
        try:
            module, function, args = requests.recv()
        except (EOFError, OSError):
            return
        try:
            result = getattr(importlib.import_module(module), function)(*args)
            replies.send((True, result))
        except Exception as err:  # sent back and raised in the parent
            try:
                replies.send((False, err))
            except Exception:  # an unpicklable exception: its text is enough
                replies.send((False, RuntimeError(f"{type(err).__name__}: {err}")))


class IsolatedCalls:
    """One warm child process; `call` runs `module.function(*args)` in it with a time limit."""

    def __init__(self, preload: list[str] | None = None,
                 startup_timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        self.preload = list(PRELOAD if preload is None else preload)
        self.startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen | None = None
        self._requests: Connection | None = None
        self._replies: Connection | None = None
        self._lock = threading.Lock()

    def _start(self) -> None:
        """Start a child and wait until it is ready; a child that cannot start (its imports
        fail, it dies or stalls) is an InfrastructureError with the end of its stderr: every
        file would fail alike."""
        request_read, request_write = os.pipe()
        reply_read, reply_write = os.pipe()
        stderr = tempfile.TemporaryFile()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "operators.data.isolation", str(request_read),
                 str(reply_write), str(os.getpid()), *self.preload],
                pass_fds=(request_read, reply_write), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=stderr)
        except BaseException:
            for fd in (request_read, request_write, reply_read, reply_write):
                os.close(fd)
            stderr.close()
            raise
        os.close(request_read)
        os.close(reply_write)
        self._requests, self._replies = Connection(request_write), Connection(reply_read)
        with stderr:
            try:
                ready = self._replies.poll(self.startup_timeout_s) and self._replies.recv()
            except (EOFError, OSError):
                ready = False
            if ready != "ready":
                try:  # it may be exiting on its own: its code says more than our kill
                    self._process.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
                code = self._stop()
                stderr.seek(0)
                last = (stderr.read().decode(errors="replace").strip().splitlines() or [""])[-1]
                raise InfrastructureError(
                    f"the mesh reader's child process did not start ({_describe_exit(code)}"
                    + (f": {last[:300]}" if last else "") + "): check that "
                    f"`{sys.executable} -m operators.data.isolation` can import "
                    f"{', '.join(self.preload)} on the workers, or set assets.isolate / "
                    "render.isolate to false")

    def _stop(self) -> int | None:
        """Kill the child; its exit code (negative: the signal that ended it)."""
        if self._process is None:
            return None
        if self._process.poll() is None:
            self._process.kill()
        code = self._process.wait(timeout=10)
        for conn in (self._requests, self._replies):
            if conn is not None:
                conn.close()
        self._process, self._requests, self._replies = None, None, None
        return code

    def call(self, module: str, function: str, args: tuple, timeout_s: float) -> Any:
        with self._lock:  # one request at a time through the pipes
            if self._process is None or self._process.poll() is not None:
                self._stop()
                self._start()
            assert self._requests is not None and self._replies is not None
            try:
                self._requests.send((module, function, args))
                answered = self._replies.poll(timeout_s)
                ok, value = self._replies.recv() if answered else (None, None)
            except (EOFError, OSError):
                code = self._stop()
                raise ChildCrashed(f"crashed ({_describe_exit(code)})") from None
            if not answered:
                self._stop()
                raise ChildTimedOut(f"timed out after {timeout_s:g} s")
            if not ok:
                raise value
            return value

    def close(self) -> None:
        with self._lock:
            self._stop()


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


_CALLS: IsolatedCalls | None = None
_CALLS_LOCK = threading.Lock()


def isolated_calls() -> IsolatedCalls:
    """This process's warm child (started on first use, reused by every later call)."""
    global _CALLS
    with _CALLS_LOCK:
        if _CALLS is None:
            _CALLS = IsolatedCalls()
        return _CALLS


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])), Connection(int(sys.argv[2])), int(sys.argv[3]),
           sys.argv[4:])
