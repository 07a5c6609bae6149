"""The operator CLI, in-process and as a real subprocess."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import aico
from aico.gateway.cli import main
from aico.gateway.state import StatePaths

REPO = Path(aico.__file__).resolve().parent.parent


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), stdout=out, stderr=err, environ={})
    return status, out.getvalue(), err.getvalue()


class ConfigCheckTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def test_good_file_prints_ok(self) -> None:
        path = self.dir / "good.toml"
        path.write_text("[http]\nport = 0\n")
        self.assertEqual(_run("config", "check", str(path)), (0, "ok\n", ""))

    def test_bad_file_exits_2_naming_key_and_file(self) -> None:
        path = self.dir / "bad.toml"
        path.write_text('[http]\nport = "eighty"\n')
        status, out, err = _run("config", "check", str(path))
        self.assertEqual(status, 2)
        self.assertEqual(out, "")
        self.assertIn("http.port", err)
        self.assertIn(str(path), err)

    def test_missing_file_exits_2(self) -> None:
        status, _, err = _run("config", "check", str(self.dir / "nope.toml"))
        self.assertEqual(status, 2)
        self.assertIn("nope.toml", err)

    def test_no_command_prints_usage_and_exits_2(self) -> None:
        status, _, err = _run()
        self.assertEqual(status, 2)
        self.assertIn("usage:", err)

    def test_help_exits_0(self) -> None:
        status, out, _ = _run("--help")
        self.assertEqual(status, 0)
        self.assertIn("init", out)
        self.assertIn("config", out)


class InitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp()) / "state"

    def test_init_twice_creates_then_reports_nothing_and_never_prints_password(self) -> None:
        status, out, err = _run("init", "--state-dir", str(self.root))
        self.assertEqual((status, err), (0, ""))
        paths = StatePaths(self.root)
        password = paths.admin_password.read_text().strip()
        self.assertIn("created: state_dir, ca, server_cert, jwt_key", out)
        self.assertIn(str(paths.admin_password), out)
        self.assertNotIn(password, out)

        status, out, err = _run("init", "--state-dir", str(self.root))
        self.assertEqual((status, err), (0, ""))
        self.assertNotIn("created:", out)
        self.assertIn("nothing to create", out)
        self.assertNotIn(password, out)

    def test_init_uses_state_dir_and_modules_from_config(self) -> None:
        config = self.root.parent / "gateway.toml"
        self.root.parent.mkdir(parents=True)
        config.write_text(
            f'[gateway]\nstate_dir = "{self.root}"\n[modules]\nbuiltin = ["health"]\n'
        )
        status, out, _ = _run("init", "--config", str(config))
        self.assertEqual(status, 0)
        self.assertIn("curve/client/health", out)
        self.assertNotIn("curve/client/conversation", out)
        self.assertTrue(StatePaths(self.root).registry_db.exists())

    def test_init_honours_environment(self) -> None:
        config = self.root.parent / "env.toml"
        self.root.parent.mkdir(parents=True)
        config.write_text("[modules]\nbuiltin = []\n")
        out, err = io.StringIO(), io.StringIO()
        env = {"AICO_STATE_DIR": str(self.root), "AICO_GATEWAY_CONFIG": str(config)}
        status = main(["init"], stdout=out, stderr=err, environ=env)
        self.assertEqual(status, 0, err.getvalue())
        self.assertIn(f"state directory: {self.root.absolute()}", out.getvalue())
        self.assertNotIn("curve/client/health", out.getvalue())

    def test_init_with_bad_config_exits_2(self) -> None:
        config = Path(self.mktemp())
        config.write_text("[nope]\n")
        status, _, err = _run("init", "--state-dir", str(self.root), "--config", str(config))
        self.assertEqual(status, 2)
        self.assertIn("nope", err)
        self.assertFalse(self.root.exists())

    def test_init_on_unsafe_directory_exits_1(self) -> None:
        self.root.mkdir(parents=True)
        (self.root / "something").write_text("x")
        os.chmod(self.root, 0o755)
        status, _, err = _run("init", "--state-dir", str(self.root))
        self.assertEqual(status, 1)
        self.assertIn("chmod 700", err)


class SubprocessTests(SynchronousTestCase):
    """The module runs as ``python -m aico.gateway.cli`` (what the console script calls)."""

    def _cli(self, *argv: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("AICO_STATE_DIR", None)
        env.pop("AICO_GATEWAY_CONFIG", None)
        return subprocess.run(
            [sys.executable, "-m", "aico.gateway.cli", *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )

    def test_config_check_and_init_twice(self) -> None:
        d = Path(self.mktemp())
        d.mkdir()
        good, bad = d / "good.toml", d / "bad.toml"
        good.write_text("")
        bad.write_text("[websocket]\nidle_timeout = -1\n")
        r = self._cli("config", "check", str(good))
        self.assertEqual((r.returncode, r.stdout), (0, "ok\n"))
        r = self._cli("config", "check", str(bad))
        self.assertEqual(r.returncode, 2)
        self.assertIn("websocket.idle_timeout", r.stderr)
        self.assertIn(str(bad), r.stderr)

        state = d / "state"
        first = self._cli("init", "--state-dir", str(state))
        self.assertEqual(first.returncode, 0, first.stderr)
        self.assertIn("admin_user", first.stdout)
        password = (state / "initial-admin-password").read_text().strip()
        second = self._cli("init", "--state-dir", str(state))
        self.assertEqual(second.returncode, 0, second.stderr)
        self.assertIn("nothing to create", second.stdout)
        for r in (first, second):
            self.assertNotIn(password, r.stdout + r.stderr)
