"""Whole gateways as separate ``twistd`` processes, for multi-gateway tests.

Federation (issue 13) is tested with several real gateway processes on loopback: each a
:class:`GatewayProcess` with its own state directory (bootstrapped here with the cheap
test KDF and password hasher, so a start costs no Argon2 at production parameters), its own
configuration (every listener on port 0 unless the test says otherwise; ``ports.json``
tells the bound addresses) and the ``aico-gateway`` CLI run against its state directory.
Processes are stopped with SIGTERM (:meth:`GatewayProcess.stop`) or SIGKILL
(:meth:`GatewayProcess.kill`), started again on the same state (:meth:`start`), and always
killed in the test's cleanup.
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from aico.gateway.testing.harness import FREE_PORTS, merge
from aico.keystore import TEST_KDF

__all__ = ["GatewayProcess", "ProcessOutput"]

reactor: Any = _reactor
ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
#: Never the keyring of whoever runs the tests, never an inherited master password.
_ENV = {**{k: v for k, v in os.environ.items() if k != "AICO_MASTER_PASSWORD"},
        "AICO_NO_KEYRING": "1"}


class ProcessOutput(ProcessProtocol):
    """Collects a process's output and tells how it ended (exit code, or -signal)."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        if reason.check(ProcessDone):
            self.ended.callback(0)
        elif reason.check(ProcessTerminated):
            value: Any = reason.value
            self.ended.callback(value.exitCode if value.exitCode is not None
                                else -(value.signal or 0))


def _toml(value: dict[str, Any], prefix: str = "") -> str:
    """A minimal TOML writer for test configurations (tables, scalars, string lists)."""
    scalars = {k: v for k, v in value.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in value.items() if isinstance(v, dict)}
    lines = [f"[{prefix}]"] if prefix and scalars else []
    for key, v in scalars.items():
        lines.append(f"{key} = {json.dumps(v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, table in tables.items():
        name = f"{prefix}.{key}" if prefix else key
        if any(c in key for c in ". "):
            name = f'{prefix}."{key}"' if prefix else f'"{key}"'
        out += _toml(table, name)
    return out


class GatewayProcess:
    """One gateway as ``twistd -n aico-gateway`` on its own state directory."""

    def __init__(self, test: TestCase, name: str, extra: str = "",
                 state_dir: Path | None = None) -> None:
        self.test = test
        self.name = name
        self.root = state_dir or Path(os.path.abspath(test.mktemp()))
        self.state_dir = self.root / "state"
        config = merge(tomllib.loads(FREE_PORTS), tomllib.loads(extra))
        self.config_path = self.root / "gateway.toml"
        self.log_path = self.root / "gateway.log"
        self._proto: ProcessOutput | None = None
        self._transport: Any = None
        self.ports: dict[str, Any] = {}
        if not (self.state_dir / "keystore.json").exists():
            self._bootstrap()
        self.config_path.write_text(_toml(config))
        test.addCleanup(self._cleanup)

    def _bootstrap(self) -> None:
        from aico.gateway import state as state_module
        from aico.gateway.security.passwords import hash_password
        from aico.gateway.testing.memory import CHEAP_HASHER

        self.state_dir.parent.mkdir(parents=True, exist_ok=True)
        self.test.patch(state_module, "hash_password",
                        lambda pw: hash_password(pw, CHEAP_HASHER))
        state_module.bootstrap(self.state_dir, ("conversation", "health"), kdf=TEST_KDF,
                               env=_ENV)

    @property
    def running(self) -> bool:
        return self._proto is not None and not self._proto.ended.called

    @property
    def output(self) -> str:
        """What the process wrote to stdout/stderr (its log goes to :attr:`log_path`)."""
        return self._proto.output.decode(errors="replace") if self._proto else ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def admin_password(self) -> str:
        return (self.state_dir / "initial-admin-password").read_text().strip()

    def url(self, listener: str = "http") -> str:
        address = self.ports[listener]
        return f"http://{address['host']}:{address['port']}"

    async def start(self, timeout: float = 20.0) -> dict[str, Any]:
        """Start the process; fires with ``ports.json`` once the gateway is ready."""
        if self.running:
            raise RuntimeError(f"gateway {self.name} is already running")
        ports_file = self.state_dir / "ports.json"
        if ports_file.exists():
            ports_file.unlink()  # the previous run's: wait for this run's
        proto = ProcessOutput()
        twistd = str(BIN / "twistd")
        self._transport = reactor.spawnProcess(
            proto, twistd,
            [twistd, "-n", "--pidfile=", f"--logfile={self.log_path}", "aico-gateway",
             "--config", str(self.config_path), "--state-dir", str(self.state_dir)],
            env=_ENV, path=str(ROOT))
        self._proto = proto
        waited = 0.0
        while not (ports_file.exists() and ports_file.stat().st_size):
            if proto.ended.called:
                raise AssertionError(f"gateway {self.name} ended while starting:\n"
                                     f"{self.output}\n{self.log()[-4000:]}")
            if waited > timeout:
                raise AssertionError(f"gateway {self.name} not ready in {timeout} s:\n"
                                     f"{self.log()[-4000:]}")
            await deferLater(reactor, 0.05, lambda: None)
            waited += 0.05
        self.ports = json.loads(ports_file.read_text())
        return self.ports

    async def stop(self) -> int:
        """SIGTERM, then the exit status."""
        return await self._signal("TERM")

    async def kill(self) -> int:
        """SIGKILL (nothing flushed, nothing drained), then the exit status."""
        return await self._signal("KILL")

    async def _signal(self, signal: str) -> int:
        if not self.running:
            raise RuntimeError(f"gateway {self.name} is not running")
        assert self._proto is not None
        self._transport.signalProcess(signal)
        return await self._proto.ended

    def _cleanup(self) -> Deferred[int] | None:
        if not self.running:
            return None
        assert self._proto is not None
        self._transport.signalProcess("KILL")
        return self._proto.ended

    async def cli(self, *args: str, timeout: float = 30.0) -> tuple[int, str, str]:
        """Run ``aico-gateway ARGS --state-dir STATE --config CONFIG`` (unless ARGS name
        them: the process's own configuration, so that ``sync join`` knows its ``sync``
        listener and ``pair`` its ``[pairing]``): status, stdout and stderr."""
        argv = list(args)
        if "--state-dir" not in argv:
            argv += ["--state-dir", str(self.state_dir)]
        if "--config" not in argv:
            argv += ["--config", str(self.config_path)]
        out, err, code = await getProcessOutputAndValue(
            str(BIN / "aico-gateway"), argv, env=_ENV, path=str(ROOT), reactor=reactor)
        return code, out.decode(errors="replace"), err.decode(errors="replace")
