"""Wiring: ``makeService`` from options, every route carries its schemas, JSON logs."""

from __future__ import annotations

import gc
import io
import json
import os
from pathlib import Path

from twisted.application.service import IService
from twisted.internet import reactor
from twisted.logger import Logger, globalLogPublisher, textFileLogObserver
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aico.gateway import composition, logs, tap
from aico.gateway.service import GatewayService
from aico.gateway.testing.harness import http_client, start_gateway
from aico.gateway.testing.waiting import eventually


class MakeServiceTests(SynchronousTestCase):
    def test_make_service_builds_from_a_config_file_and_state_dir(self) -> None:
        cfg = Path(self.mktemp() + ".toml")
        cfg.write_text('[http]\nport = 0\n[admin]\nport = 0\n[bus]\npub = "tcp://127.0.0.1:*"\nsub = "tcp://127.0.0.1:*"\n')
        state = Path(os.path.abspath(self.mktemp()))
        options = tap.Options()
        options.parseOptions(["--config", str(cfg), "--state-dir", str(state)])
        service = tap.makeService(options)
        self.assertIsInstance(service, GatewayService)
        self.assertTrue(IService.providedBy(service))
        self.assertEqual(service.parts.config.http.port, 0)
        self.assertEqual(service.reload.config_path, str(cfg))
        self.assertTrue((state / "initial-admin-password").exists())

    def test_the_service_tree_holds_every_part_in_start_order(self) -> None:
        state = Path(os.path.abspath(self.mktemp()))
        options = tap.Options()
        options.parseOptions(["--state-dir", str(state)])
        service = tap.makeService(options)
        self.assertEqual([c.name for c in service], [
            "cpu-pool", "security", "broker", "bus", "directory", "modules", "connections",
            "listeners", "pairing", "jobs", "ports-file"])
        self.assertEqual([c.name for c in service.child("modules")], ["conversation", "health"])
        self.assertEqual([c.name for c in service.child("modules", "conversation")],
                         ["module", "heartbeat"])
        self.assertEqual([c.name for c in service.child("listeners")], ["http", "tls", "ipc", "admin"])
        self.assertEqual(sorted(c.name for c in service.child("jobs")),
                         ["ipc-peer-sweep", "ratelimit-sweep", "registry-watch", "token-prune"])

    def test_the_mdns_advertiser_comes_last_when_a_listener_is_on_the_lan(self) -> None:
        cfg = Path(self.mktemp() + ".toml")
        cfg.write_text('[pairing]\nhost = "0.0.0.0"\n')
        options = tap.Options()
        options.parseOptions(["--config", str(cfg), "--state-dir",
                              str(Path(os.path.abspath(self.mktemp())))])
        service = tap.makeService(options)
        self.assertEqual([c.name for c in service][-3:], ["jobs", "ports-file", "mdns"])

    def test_listeners_and_modules_follow_the_config(self) -> None:
        cfg = Path(self.mktemp() + ".toml")
        cfg.write_text('[http]\nenabled = false\n[tls]\nenabled = false\n[admin]\nenabled = false\n[ipc]\nendpoint = ""\n[bus]\n'
                       'embedded_broker = false\n[modules]\nin_process = false\n')
        options = tap.Options()
        options.parseOptions(["--config", str(cfg), "--state-dir",
                              str(Path(os.path.abspath(self.mktemp())))])
        service = tap.makeService(options)
        names = [c.name for c in service]
        self.assertNotIn("broker", names)
        self.assertEqual([c.name for c in service.child("modules")], [])
        self.assertEqual([c.name for c in service.child("listeners")], ["ipc"])
        self.assertEqual(service.child("listeners", "ipc").listener.endpoints, {})

    def test_bad_config_is_a_usage_error_naming_key_and_file(self) -> None:
        cfg = Path(self.mktemp() + ".toml")
        cfg.write_text("[bus]\nrequest_timeout = -1\n")
        options = tap.Options()
        from twisted.python.usage import UsageError

        e = self.assertRaises(UsageError, options.parseOptions, ["--config", str(cfg)])
        self.assertIn("bus.request_timeout", str(e))
        self.assertIn(str(cfg), str(e))


class JsonLogTests(SynchronousTestCase):
    def test_json_observer_writes_one_json_object_per_event_with_fields(self) -> None:
        out = io.StringIO()
        self.patch(logs.sys, "stdout", out)
        made = logs.json_observer()
        log = Logger(namespace="test", observer=made)
        log.info("request {request_id} answered {status}", request_id="r-1", status=200)
        (line,) = out.getvalue().splitlines()
        event = json.loads(line)
        self.assertEqual((event["request_id"], event["status"], event["log_namespace"]), ("r-1", 200, "test"))


class SettleHeapTests(TestCase):
    """The twistd gateway freezes its startup heap once ready (docs/performance.md,
    "Tail latency"): full collections no longer walk ~90,000 startup objects."""

    def test_make_service_asks_for_a_settled_heap_and_other_gateways_do_not(self) -> None:
        options = tap.Options()
        options.parseOptions(["--state-dir", os.path.abspath(self.mktemp())])
        self.assertTrue(tap.makeService(options).settle_heap)
        self.assertFalse(GatewayService.settle_heap)

    def test_settle_heap_moves_the_live_objects_out_of_the_collectors_reach(self) -> None:
        self.addCleanup(gc.unfreeze)
        gc.unfreeze()
        self.assertEqual(gc.get_freeze_count(), 0)
        composition.settle_heap()
        self.assertGreater(gc.get_freeze_count(), 1000)

    async def test_once_ready_twistds_text_log_formats_access_lines_directly(self) -> None:
        observer = textFileLogObserver(io.StringIO())
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.patch(GatewayService, "settle_heap", True)
        self.patch(composition, "settle_heap", lambda: None)
        gw = await start_gateway(self)
        self.assertIsInstance(observer.formatEvent, logs.AccessLineFormat)
        buffered = observer._outFile
        self.assertIsInstance(buffered, logs.TurnBufferedFile)
        self.addCleanup(reactor.removeSystemEventTrigger, buffered.trigger)
        # A request's access line reaches the text log by the end of the reactor turn.
        response = await http_client(self).get(gw.base + "/api/v1/health")
        await response.content()
        await eventually(lambda: "/api/v1/health" in buffered.out.getvalue())
        self.assertIn("[aico.access#info]", buffered.out.getvalue())

    async def test_the_heap_is_settled_only_after_the_gateway_announced_ready(self) -> None:
        calls: list[bool] = []
        self.patch(GatewayService, "settle_heap", True)
        self.patch(composition, "settle_heap", lambda: calls.append(True))
        gw = await start_gateway(self)
        self.assertTrue((gw.state_dir / "ports.json").exists())
        self.assertEqual(calls, [True])
