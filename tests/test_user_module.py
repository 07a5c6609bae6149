"""A module written with the SDK, run with ``aico-module package.module:Class``, served by
the gateway over REST with its schema, capability and health."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aico.bus.runner import RunnerError, module_factory
from aico.gateway.testing.harness import http_client, login, start_gateway
from tests.test_process import Twistd

ROOT = Path(__file__).resolve().parent.parent


class FactoryTests(SynchronousTestCase):
    def test_builtin_names_and_import_paths(self) -> None:
        self.assertEqual(module_factory("health")[0], "health")
        from tests.echomodule import Echo

        name, factory = module_factory("tests.echomodule:Echo")
        self.assertEqual((name, factory), ("echo", Echo))

    def test_bad_specs_are_refused_with_a_reason(self) -> None:
        for spec in ("nope", "tests.echomodule:Missing", "no.such.module:X", "tests.echomodule:NotAModule"):
            self.assertRaises(RunnerError, module_factory, spec)


class UserModuleProcessTests(TestCase):
    timeout = 60

    async def test_user_module_runs_as_a_process_and_is_served(self) -> None:
        gw = await start_gateway(self)
        proto = Twistd()
        process = reactor.spawnProcess(
            proto, sys.executable,
            [sys.executable, "-m", "aico.bus.runner", "tests.echomodule:Echo",
             "--state-dir", str(gw.state_dir.resolve())],
            env={**os.environ, "PYTHONPATH": str(ROOT)}, path=str(ROOT))
        self.addCleanup(lambda: None if proto.ended.called else process.signalProcess("KILL"))
        tokens = await login(http_client(self), gw.base, "admin", gw.admin_password)
        http = http_client(self, token=tokens["access_token"])
        for _ in range(200):
            r = await http.post(gw.base + "/api/v1/echo", json={"text": "hi"})
            body = json.loads(await r.content())
            if r.code == 200:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual((r.code, body), (200, {"echo": "hi", "by": "admin"}),
                         proto.output.decode(errors="replace")[-3000:])
        r = await http.post(gw.base + "/api/v1/echo", json={"txt": "typo"})
        self.assertEqual(r.code, 400)
        await r.content()
        r = await http.get(gw.base + "/api/v1/health")
        health = json.loads(await r.content())
        self.assertEqual(health["modules"]["echo"]["status"], "ok")
        process.signalProcess("TERM")
        self.assertEqual(await proto.ended, 0, proto.output.decode(errors="replace"))
