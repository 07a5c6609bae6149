"""An ``sslyze`` scan of the tls listener: only TLS 1.3 is accepted, and the server's
certificate chain is valid for our device CA.

sslyze pins an older ``cryptography`` and ``nassl``, so it lives in a venv of its own,
``.venv-sslyze`` (``make .venv-sslyze``; ``make test`` builds it first) and runs as a
subprocess. Set ``AICO_SSLYZE_PYTHON`` to use another interpreter that has sslyze.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from aico.gateway.testing.harness import start_gateway
from tests import tlshelp

ROOT = Path(__file__).resolve().parents[1]


def sslyze_python() -> str:
    python = os.environ.get("AICO_SSLYZE_PYTHON") or str(ROOT / ".venv-sslyze" / "bin" / "python")
    if not Path(python).exists():
        raise AssertionError(f"{python} is missing: run `make .venv-sslyze` (make test does)")
    return python


class SslyzeTests(TestCase):
    timeout = 120

    async def test_sslyze_sees_only_tls_1_3_and_a_chain_valid_for_our_ca(self) -> None:
        gw = await start_gateway(self)
        work = Path(self.mktemp())
        host, port = gw.tls_address
        scanner = await tlshelp.pair(gw, "scanner", work)
        ca = tlshelp.ca_file(gw, work)
        out = work / "scan.json"
        argv = [sslyze_python(), "-m", "sslyze", "--quiet", f"--json_out={out}",
                "--cert", str(scanner.cert_path), "--key", str(scanner.key_path),
                "--sslv2", "--sslv3", "--tlsv1", "--tlsv1_1", "--tlsv1_2", "--tlsv1_3",
                "--certinfo", "--certinfo_ca_file", str(ca), f"{host}:{port}"]
        done = await deferToThread(subprocess.run, argv, capture_output=True, text=True,
                                   timeout=100, check=False)
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        report = json.loads(out.read_text())
        (result,) = report["server_scan_results"]
        self.assertEqual(result["connectivity_status"], "COMPLETED", result.get("connectivity_error_trace"))
        scan = result["scan_result"]
        accepted = {name: bool(scan[name]["result"]["accepted_cipher_suites"])
                    for name in ("ssl_2_0_cipher_suites", "ssl_3_0_cipher_suites",
                                 "tls_1_0_cipher_suites", "tls_1_1_cipher_suites",
                                 "tls_1_2_cipher_suites", "tls_1_3_cipher_suites")}
        self.assertEqual(accepted, {"ssl_2_0_cipher_suites": False, "ssl_3_0_cipher_suites": False,
                                    "tls_1_0_cipher_suites": False, "tls_1_1_cipher_suites": False,
                                    "tls_1_2_cipher_suites": False, "tls_1_3_cipher_suites": True})
        (deployment,) = scan["certificate_info"]["result"]["certificate_deployments"]
        ours = [v for v in deployment["path_validation_results"]
                if v["trust_store"]["path"] == str(ca)]
        self.assertEqual(len(ours), 1, deployment["path_validation_results"])
        self.assertTrue(ours[0]["was_validation_successful"], ours[0])
