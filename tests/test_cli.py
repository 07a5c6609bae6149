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
from aico.gateway.state import StatePaths, bootstrap
from aico.keystore import TEST_KDF

REPO = Path(aico.__file__).resolve().parent.parent


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), stdout=out, stderr=err, environ={"AICO_NO_KEYRING": "1"})
    return status, out.getvalue(), err.getvalue()


class ConfigCheckTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def test_good_file_prints_ok(self) -> None:
        path = self.dir / "good.toml"
        path.write_text("[http]\nport = 0\n[admin]\nport = 0\n")
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
        self.assertIn("created: state_dir, keystore, ca, server_cert, jwt_key", out)
        self.assertIn(f"master secret from {self.root.absolute() / 'master-key'}", out)
        self.assertIn("warning: that file lies beside the keys", out)
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


class KeysAtRestTests(SynchronousTestCase):
    def setUp(self) -> None:
        from aico.gateway import state as state_module
        from aico.gateway.security.passwords import hash_password
        from aico.gateway.testing.memory import CHEAP_HASHER

        self.patch(state_module, "hash_password", lambda pw: hash_password(pw, CHEAP_HASHER))
        self.root = Path(self.mktemp()) / "state"
        bootstrap(self.root, ("health",), kdf=TEST_KDF, env={"AICO_NO_KEYRING": "1"})

    def test_keys_rotate_writes_the_new_key_sealed(self) -> None:
        status, out, err = _run("keys", "rotate", "--state-dir", str(self.root))
        self.assertEqual((status, err), (0, ""), out)
        kid = (self.root / "jwt" / "current").read_text().strip()
        data = (self.root / "jwt" / f"{kid}.pem").read_bytes()
        self.assertTrue(data.startswith(b"-----BEGIN AICO ENCRYPTED KEY-----"))
        self.assertIn(kid, out)

    def test_keys_rotate_with_a_wrong_master_secret_fails_with_one_line(self) -> None:
        (self.root / "master-key").unlink()
        out, err = io.StringIO(), io.StringIO()
        status = main(["keys", "rotate", "--state-dir", str(self.root)], stdout=out, stderr=err,
                      environ={"AICO_NO_KEYRING": "1", "AICO_MASTER_PASSWORD": "wrong"})
        self.assertEqual(status, 1)
        self.assertIn("wrong master secret", err.getvalue())
        self.assertIn(str(self.root / "keystore.json"), err.getvalue())
        self.assertEqual(len(err.getvalue().strip().splitlines()), 1)

    def test_keys_master_to_keyring_moves_the_file_into_the_keyring(self) -> None:
        import keyring

        from tests.test_keystore import FakeKeyring

        fake = FakeKeyring()
        previous = keyring.get_keyring()
        keyring.set_keyring(fake)
        self.addCleanup(keyring.set_keyring, previous)
        text = (self.root / "master-key").read_text().strip()
        out, err = io.StringIO(), io.StringIO()
        status = main(["keys", "master", "--to-keyring", "--state-dir", str(self.root)],
                      stdout=out, stderr=err, environ={})
        self.assertEqual((status, err.getvalue()), (0, ""))
        self.assertIn("moved from", out.getvalue())
        self.assertNotIn(text, out.getvalue())
        self.assertFalse((self.root / "master-key").exists())
        self.assertEqual(fake.entries, {("aico-gateway", str(self.root.absolute())): text})

    def test_keys_master_without_a_usable_keyring_fails_and_keeps_the_file(self) -> None:
        status, _, err = _run("keys", "master", "--to-keyring", "--state-dir", str(self.root))
        self.assertEqual(status, 1)
        self.assertIn("no usable platform keyring", err)
        self.assertTrue((self.root / "master-key").exists())
