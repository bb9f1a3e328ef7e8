"""Run `bsm-relay` management commands in one long-lived helper process.

Each command is still `bsm_relay.relay.cli.main(argv)` in a separate process from the tests,
exactly what the console script runs; only the interpreter start-up and imports (about a
second per call on this machine) are paid once instead of for every call.  `serve` is never
run here: the relay under test always runs as its own `bsm-relay serve` process.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

_WORKER = r'''
import contextlib, io, json, os, sys
from bsm_relay.relay.cli import main
for line in sys.stdin:
    req = json.loads(line)
    out, err = io.StringIO(), io.StringIO()
    os.chdir(req["cwd"])
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(req["argv"])
        except SystemExit as exc:          # argparse errors
            rc = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
            rc = 99
    sys.__stdout__.write(json.dumps({"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}) + "\n")
    sys.__stdout__.flush()
'''


class CliWorker:
    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None

    def _start(self) -> subprocess.Popen[str]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True, env=self._env,
                                          cwd=str(Path(__file__).parent))
        return self._proc

    def run(self, argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
        with self._lock:
            proc = self._start()
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd)}) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"the CLI worker died running {argv}")
            res = json.loads(line)
            return subprocess.CompletedProcess(["bsm-relay", *argv], res["rc"], res["stdout"], res["stderr"])

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()


_workers: dict[tuple[tuple[str, str], ...], CliWorker] = {}


def worker_for(env: dict[str, str]) -> CliWorker:
    # pytest sets PYTEST_CURRENT_TEST per test: it must not make a new worker for every test.
    env = {k: v for k, v in env.items() if k != "PYTEST_CURRENT_TEST"}
    key = tuple(sorted(env.items()))
    if key not in _workers:
        _workers[key] = CliWorker(env)
    return _workers[key]


@atexit.register
def _close_all() -> None:
    for w in _workers.values():
        w.close()


__all__ = ["CliWorker", "worker_for", "os"]
