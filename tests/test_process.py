"""The gateway as operators run it: the twistd dropin, the tac file, signals, bind errors.

These tests start real ``twistd`` processes on 127.0.0.1 with free ports.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from twisted.application.service import IServiceMaker
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aico.gateway.testing.harness import http_client
from aico.gateway.testing.processes import ProcessOutput
from aico.keystore import TEST_KDF

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")

FREE = """
[http]
port = {http}
[tls]
port = 0
[admin]
port = 0
[bus]
pub = "tcp://127.0.0.1:*"
sub = "tcp://127.0.0.1:*"
request_timeout = {timeout}
[ipc]
fallback = "tcp://127.0.0.1:*"
"""


class PluginTests(SynchronousTestCase):
    def test_dropin_is_found_by_getPlugins(self) -> None:
        makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
        self.assertIn("aico-gateway", makers)
        self.assertEqual(makers["aico-gateway"].module, "aico.gateway.tap")

    def test_no_init_in_twisted_plugins(self) -> None:
        self.assertFalse((ROOT / "twisted" / "__init__.py").exists())
        self.assertFalse((ROOT / "twisted" / "plugins" / "__init__.py").exists())

    def test_dropin_imports_only_twisted(self) -> None:
        source = (ROOT / "twisted" / "plugins" / "aico_gateway.py").read_text()
        imports = [line for line in source.splitlines() if line.startswith(("import", "from"))]
        self.assertTrue(all("twisted" in line for line in imports), imports)


Twistd = ProcessOutput


class ProcessTests(TestCase):
    timeout = 60

    def spawn(self, args: list[str], env: dict[str, str] | None = None) -> Twistd:
        proto = Twistd()
        # Never the keyring of whoever runs the tests; no master password unless given.
        base = {k: v for k, v in os.environ.items() if k != "AICO_MASTER_PASSWORD"}
        full_env = {**base, "AICO_NO_KEYRING": "1", **(env or {})}
        self.transport = reactor.spawnProcess(proto, TWISTD, [TWISTD, *args], env=full_env, path=str(ROOT))
        self.addCleanup(self._kill, proto)
        return proto

    def _kill(self, proto: Twistd) -> Deferred[int] | None:
        if proto.ended.called:
            return None
        self.transport.signalProcess("KILL")
        return proto.ended

    def state(self) -> Path:
        """A state directory bootstrapped here with Argon2 at its cheapest, so the process
        under test starts without hashing at production cost (the bootstrap itself is
        tested in test_state, and its production parameters there too)."""
        from aico.gateway import state as state_module
        from aico.gateway.security.passwords import hash_password
        from aico.gateway.testing.memory import CHEAP_HASHER

        path = Path(os.path.abspath(self.mktemp()))
        self.patch(state_module, "hash_password", lambda pw: hash_password(pw, CHEAP_HASHER))
        state_module.bootstrap(path, ("conversation", "health"), kdf=TEST_KDF,
                               env={"AICO_NO_KEYRING": "1"})
        return path

    def config(self, http: int = 0, timeout: float = 5.0) -> Path:
        path = Path(os.path.abspath(self.mktemp() + ".toml"))
        path.write_text(FREE.format(http=http, timeout=timeout))
        return path

    async def wait_ports(self, state: Path, proto: Twistd) -> dict[str, Any]:
        for _ in range(300):
            if (state / "ports.json").exists():
                return json.loads((state / "ports.json").read_text())  # type: ignore[no-any-return]
            if proto.ended.called:
                self.fail(f"twistd ended early:\n{proto.output.decode(errors='replace')}")
            await deferLater(reactor, 0.05, lambda: None)
        self.fail("ports.json never appeared:\n" + proto.output.decode(errors="replace"))

    async def health(self, ports: dict[str, Any]) -> Any:
        http = http_client(self)
        r = await http.get(f"http://127.0.0.1:{ports['http']['port']}/api/v1/health")
        return r.code, json.loads(await r.content())

    async def test_sigterm_exits_zero_after_serving(self) -> None:
        state = self.state()
        proto = self.spawn(["-n", "--pidfile=", "aico-gateway", "--config", str(self.config()),
                            "--state-dir", str(state)])
        ports = await self.wait_ports(state, proto)
        code, body = await self.health(ports)
        self.assertEqual((code, sorted(body["modules"])), (200, ["conversation", "health"]))
        self.transport.signalProcess("TERM")
        self.assertEqual(await proto.ended, 0, proto.output.decode(errors="replace"))
        self.assertNotIn(b"Traceback", proto.output)

    async def test_sigterm_finishes_in_flight_request(self) -> None:
        from aico.proto.aico.gateway.v1.gateway_pb2 import Route
        from tests.rawmodule import RawModule

        state = self.state()
        proto = self.spawn(["-n", "--pidfile=", "aico-gateway", "--config", str(self.config()),
                            "--state-dir", str(state)])
        ports = await self.wait_ports(state, proto)
        module = RawModule(state, ports["bus"]["pub"], ports["bus"]["sub"],
                           routes=[Route(method="GET", path="/api/v1/slow", topic="slow", public=True)])
        module.authorize(state)
        module.start()
        self.addCleanup(module.stop)
        http = http_client(self)
        url = f"http://127.0.0.1:{ports['http']['port']}/api/v1/slow"
        for _ in range(100):
            r = await http.get(url)
            await r.content()
            if r.code == 200:
                break
            await deferLater(reactor, 0.05, lambda: None)
        module.mode = "stream"
        r = await http.get(url + "?stream=true", unbuffered=True)
        chunks: list[bytes] = []
        import treq

        done = treq.collect(r, chunks.append)
        while not chunks:
            await deferLater(reactor, 0.02, lambda: None)
        self.transport.signalProcess("TERM")
        await deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(proto.ended.called, "the gateway exited with a request in flight")
        module.release.put(None)
        module.release.put(None)
        await done
        lines = [json.loads(x) for x in b"".join(chunks).splitlines() if x]
        self.assertEqual(lines, [{"chunk": 0}, {"chunk": 1}, {"chunk": 2}])
        self.assertEqual(await proto.ended, 0, proto.output.decode(errors="replace"))

    async def test_bind_conflict_exits_nonzero_naming_the_address(self) -> None:
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        self.addCleanup(busy.close)
        port = busy.getsockname()[1]
        state = self.state()
        proto = self.spawn(["-n", "--pidfile=", "aico-gateway", "--config",
                            str(self.config(http=port)), "--state-dir", str(state)])
        code = await proto.ended
        self.assertNotEqual(code, 0)
        self.assertIn(f"127.0.0.1:{port}".encode(), proto.output)
        self.assertFalse((state / "ports.json").exists())

    async def test_a_bus_that_does_not_start_exits_1_with_one_line_naming_it(self) -> None:
        closed = []
        for _ in range(2):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            closed.append(sock.getsockname()[1])
            sock.close()  # nothing listens there
        config = Path(os.path.abspath(self.mktemp() + ".toml"))
        config.write_text(f"""
[http]
port = 0
[tls]
port = 0
[admin]
port = 0
[ipc]
fallback = "tcp://127.0.0.1:*"
[bus]
embedded_broker = false
pub = "tcp://127.0.0.1:{closed[0]}"
sub = "tcp://127.0.0.1:{closed[1]}"
start_timeout = 0.5
""")
        state = self.state()
        proto = self.spawn(["-n", "--pidfile=", "aico-gateway", "--config", str(config),
                            "--state-dir", str(state)])
        self.assertEqual(await proto.ended, 1, proto.output.decode(errors="replace"))
        lines = [line for line in proto.output.decode(errors="replace").splitlines()
                 if "could not start" in line]
        self.assertEqual(len(lines), 1, proto.output.decode(errors="replace"))
        self.assertIn("aico-gateway could not start: bus: BusStartError: the message bus at "
                      f"tcp://127.0.0.1:{closed[0]} / tcp://127.0.0.1:{closed[1]} did not answer "
                      "within 0.5 s", lines[0])
        self.assertFalse((state / "ports.json").exists())

    async def test_a_state_file_that_cannot_be_written_exits_1_naming_it(self) -> None:
        state = self.state()
        (state / "ports.json").mkdir()  # ports.json cannot be replaced by a file
        proto = self.spawn(["-n", "--pidfile=", "aico-gateway", "--config", str(self.config()),
                            "--state-dir", str(state)])
        self.assertEqual(await proto.ended, 1, proto.output.decode(errors="replace"))
        output = proto.output.decode(errors="replace")
        (line,) = [x for x in output.splitlines() if "could not start" in x]
        self.assertIn("could not start: ports-file:", line)
        self.assertIn(str(state / "ports.json"), line)

    async def test_a_corrupt_key_exits_1_with_one_line_naming_the_file(self) -> None:
        state = self.state()
        kid = (state / "jwt" / "current").read_text().strip()
        (state / "jwt" / f"{kid}.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n")
        proto = self.spawn(["-n", "--pidfile=", "aico-gateway", "--config", str(self.config()),
                            "--state-dir", str(state)])
        self.assertEqual(await proto.ended, 1, proto.output.decode(errors="replace"))
        output = proto.output.decode(errors="replace")
        (line,) = [x for x in output.splitlines() if "cannot load" in x]
        self.assertIn(f"{kid}.pem", line)
        self.assertNotIn("Traceback", output)
        self.assertFalse((state / "ports.json").exists())

    async def test_a_fresh_state_directory_starts_unattended_without_a_master_password(
            self) -> None:
        # What `make run` does on a fresh clone: no keyring, no AICO_MASTER_PASSWORD.
        state = Path(os.path.abspath(self.mktemp()))
        proto = self.spawn(["-n", "--pidfile=", "aico-gateway", "--config", str(self.config()),
                            "--state-dir", str(state)])
        ports = await self.wait_ports(state, proto)
        code, _ = await self.health(ports)
        self.assertEqual(code, 200)
        meta = json.loads((state / "keystore.json").read_text())
        self.assertEqual((meta["t"], meta["m"], meta["p"]), (3, 65536, 4))  # production KDF
        self.assertTrue((state / "master-key").exists())
        self.assertTrue((state / "ca" / "ca.key").read_bytes().startswith(
            b"-----BEGIN AICO ENCRYPTED KEY-----"))
        self.assertIn(f"the master key {state / 'master-key'} lies beside the keys".encode(),
                      proto.output)
        self.transport.signalProcess("TERM")
        self.assertEqual(await proto.ended, 0)

    async def test_a_wrong_master_password_exits_1_with_one_line_naming_the_file(self) -> None:
        state = self.state()
        text = (state / "master-key").read_text().strip()
        (state / "master-key").unlink()
        proto = self.spawn(["-n", "--pidfile=", "aico-gateway", "--config", str(self.config()),
                            "--state-dir", str(state)], env={"AICO_MASTER_PASSWORD": text + "x"})
        self.assertEqual(await proto.ended, 1, proto.output.decode(errors="replace"))
        output = proto.output.decode(errors="replace")
        (line,) = [x for x in output.splitlines() if "aico-gateway: cannot" in x]
        self.assertIn(str(state / "keystore.json"), line)
        self.assertIn("wrong master secret", line)
        self.assertNotIn("Traceback", output)
        self.assertNotIn(text, output)

    async def test_a_swapped_key_file_exits_1_with_one_line_naming_it(self) -> None:
        state = self.state()
        kid = (state / "jwt" / "current").read_text().strip()
        (state / "jwt" / f"{kid}.pem").write_bytes((state / "tls" / "server.key").read_bytes())
        proto = self.spawn(["-n", "--pidfile=", "aico-gateway", "--config", str(self.config()),
                            "--state-dir", str(state)])
        self.assertEqual(await proto.ended, 1, proto.output.decode(errors="replace"))
        output = proto.output.decode(errors="replace")
        (line,) = [x for x in output.splitlines() if "aico-gateway: cannot" in x]
        self.assertIn(str(state / "jwt" / f"{kid}.pem"), line)
        self.assertIn("swapped", line)
        self.assertNotIn("Traceback", output)

    async def test_tac_file_starts_the_same_service(self) -> None:
        state = self.state()
        proto = self.spawn(["-ny", "tac/aico-gateway.tac", "--pidfile="],
                           env={"AICO_STATE_DIR": str(state), "AICO_GATEWAY_CONFIG": str(self.config()),
                                "AICO_LOG": "json"})
        ports = await self.wait_ports(state, proto)
        code, body = await self.health(ports)
        self.assertEqual(code, 200)
        self.assertIn("conversation", body["modules"])

        def access_lines() -> list[Any]:
            events = [json.loads(line) for line in proto.output.splitlines()
                      if line.startswith(b"{")]
            return [e for e in events if e.get("log_namespace") == "aico.access"]

        from aico.gateway.testing.waiting import eventually

        (line,) = await eventually(access_lines)
        self.assertEqual((line["method"], line["path"], line["status"], line["transport"]),
                         ("GET", "/api/v1/health", 200, "http"))
        self.transport.signalProcess("TERM")
        self.assertEqual(await proto.ended, 0)

    async def test_sighup_reloads_reloadable_keys(self) -> None:
        state = self.state()
        config = self.config(timeout=5.0)
        proto = self.spawn(["-n", "--pidfile=", "aico-gateway", "--config", str(config),
                            "--state-dir", str(state)])
        await self.wait_ports(state, proto)
        config.write_text(FREE.format(http=0, timeout=2.5) + "\n[limits]\nbody_max = 10\n")
        self.transport.signalProcess("HUP")
        for _ in range(100):
            if b"config reloaded" in proto.output:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertIn(b"bus.request_timeout", proto.output)
        self.assertIn(b"limits.body_max", proto.output)
        config.write_text("[http]\nport = 'bad'\n")
        self.transport.signalProcess("HUP")
        for _ in range(100):
            if b"reload refused" in proto.output:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertIn(b"http.port", proto.output)
        self.transport.signalProcess("TERM")
        self.assertEqual(await proto.ended, 0)

    async def test_builtin_module_as_a_separate_process_serves_the_gateway(self) -> None:
        state = self.state()
        config = self.config()
        config.write_text(config.read_text() + "\n[modules]\nin_process = false\n")
        proto = self.spawn(["-n", "--pidfile=", "aico-gateway", "--config", str(config),
                            "--state-dir", str(state)])
        ports = await self.wait_ports(state, proto)
        module = Twistd()
        module_process = reactor.spawnProcess(
            module, sys.executable,
            [sys.executable, "-m", "aico.bus.runner", "conversation", "--state-dir", str(state)],
            env={**os.environ, "AICO_NO_KEYRING": "1"}, path=str(ROOT))
        http = http_client(self)
        base = f"http://127.0.0.1:{ports['http']['port']}"
        from aico.gateway.testing.harness import login

        tokens = await login(http, base, "admin", (state / "initial-admin-password").read_text().strip())
        auth = {"Authorization": f"Bearer {tokens['access_token']}"}
        for _ in range(200):
            r = await http.post(base + "/api/v1/conversations/messages", json={"message": "out of process"},
                                headers=auth)
            body = json.loads(await r.content())
            if r.code == 200:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual((r.code, body.get("reply")), (200, "out of process"))
        _, health = await self.health(ports)
        self.assertEqual(health["modules"]["conversation"]["status"], "ok")
        module_process.signalProcess("TERM")
        self.assertEqual(await module.ended, 0, module.output.decode(errors="replace"))
        self.transport.signalProcess("TERM")
        self.assertEqual(await proto.ended, 0)

    async def test_invalid_config_refused_before_anything_starts(self) -> None:
        bad = Path(os.path.abspath(self.mktemp() + ".toml"))
        bad.write_text("[http]\nprot = 1\n")
        state = Path(os.path.abspath(self.mktemp()))
        proto = self.spawn(["-n", "--pidfile=", "aico-gateway", "--config", str(bad),
                            "--state-dir", str(state)])
        self.assertNotEqual(await proto.ended, 0)
        self.assertIn(b"http.prot", proto.output)
        self.assertIn(str(bad).encode(), proto.output)
        self.assertFalse(state.exists())

    async def test_a_non_loopback_admin_host_stops_the_gateway_before_it_binds(self) -> None:
        cfg = Path(os.path.abspath(self.mktemp() + ".toml"))
        cfg.write_text('[admin]\nhost = "0.0.0.0"\nport = 0\n')
        state = Path(os.path.abspath(self.mktemp()))
        proto = self.spawn(["-n", "--pidfile=", "aico-gateway", "--config", str(cfg),
                            "--state-dir", str(state)])
        self.assertNotEqual(await proto.ended, 0)
        self.assertIn(b"admin.host", proto.output)
        self.assertIn(b"allow_remote", proto.output)
        self.assertFalse((state / "ports.json").exists())
