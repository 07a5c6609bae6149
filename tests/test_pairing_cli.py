"""`aico-gateway pair`: opens a window in the registry, prints the code, waits and reports."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from aico.gateway import cli
from aico.gateway.devices.registry import PairingWindowStore
from aico.gateway.security.audit import AuditLog
from aico.gateway.store import SyncDatabase, sync_result


class PairCommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.state = Path(self.mktemp())
        assert cli.main(["init", "--state-dir", str(self.state)], stdout=io.StringIO(),
                        stderr=io.StringIO(), environ={}) == 0
        self.db = SyncDatabase(self.state / "registry.db")
        self.addCleanup(self.db.close)
        self.windows = PairingWindowStore(self.db)

    def pair(self, *argv: str, sleep: Any = None) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        args = cli.build_parser().parse_args(["pair", "--state-dir", str(self.state), *argv])
        try:
            status = cli._cmd_pair(args, cli.Context(out, err, {}), sleep=sleep)
        except cli._Exit as e:
            err.write(e.message)
            status = e.status
        return status, out.getvalue(), err.getvalue()

    def test_no_wait_prints_the_code_port_and_expiry_and_audits_the_opening(self) -> None:
        status, out, _ = self.pair("--no-wait", "--name", "tablet", "--minutes", "2")
        self.assertEqual(status, 0)
        code = re.search(r"pairing code: (\w{4}-\w{4})", out)
        assert code is not None, out
        self.assertIn("pairing port: 127.0.0.1:8776", out)
        self.assertIn("open until:", out)
        [window] = sync_result(self.windows.active())
        self.assertEqual((window.code, window.device_name), (code.group(1).replace("-", ""),
                                                             "tablet"))
        self.assertAlmostEqual(window.expires_at - window.opened_at, 120, delta=1)
        audit = AuditLog(self.db, _Clock())
        [entry] = sync_result(audit.latest(1))
        self.assertEqual(entry.event, "pairing_opened")
        self.assertNotIn(window.code, repr(entry.detail))

    def test_a_second_window_closes_the_first(self) -> None:
        self.pair("--no-wait")
        [first] = sync_result(self.windows.active())
        status, out, _ = self.pair("--no-wait")
        self.assertEqual(status, 0)
        self.assertIn("closed the pairing window", out)
        [second] = sync_result(self.windows.active())
        self.assertNotEqual(first.window_id, second.window_id)

    def test_waiting_reports_the_device_that_paired(self) -> None:
        def device_pairs(_: float) -> None:
            [window] = sync_result(self.windows.active())
            sync_result(self.windows.use(window.window_id, "DEVICE-ID"))

        status, out, _ = self.pair(sleep=device_pairs)
        self.assertEqual(status, 0)
        self.assertIn("paired device DEVICE-ID", out)

    def test_waiting_reports_a_window_closed_by_failures(self) -> None:
        def three_failures(_: float) -> None:
            [window] = sync_result(self.windows.active())
            for _ in range(3):
                sync_result(self.windows.record_failure(window.window_id, 3))

        status, out, _ = self.pair(sleep=three_failures)
        self.assertEqual(status, 1)
        self.assertIn("pairing window closed after 3 failed attempt(s)", out)

    def test_ctrl_c_closes_the_window(self) -> None:
        def interrupted(_: float) -> None:
            raise KeyboardInterrupt

        status, out, _ = self.pair(sleep=interrupted)
        self.assertEqual(status, 1)
        self.assertIn("pairing window closed", out)
        self.assertEqual(sync_result(self.windows.active()), [])

    def test_an_unknown_user_is_a_usage_error(self) -> None:
        status, _, err = self.pair("--no-wait", "--for", "nobody")
        self.assertEqual(status, 2)
        self.assertIn("no user 'nobody'", err)
        self.assertEqual(sync_result(self.windows.active()), [])


class _Clock:
    def seconds(self) -> float:
        import time

        return time.time()
