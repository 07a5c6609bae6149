"""The configuration loader: typed, frozen, validated, every error naming key and file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from aico.gateway import config as c


class LoadTests(SynchronousTestCase):
    def test_defaults_match_spec_listeners(self) -> None:
        cfg = c.Config()
        self.assertEqual((cfg.http.host, cfg.http.port), ("127.0.0.1", 8771))
        self.assertEqual(cfg.tls.port, 8772)
        self.assertEqual(cfg.admin.port, 8773)
        self.assertEqual(cfg.bus.pub, "tcp://127.0.0.1:5555")
        self.assertEqual(cfg.bus.sub, "tcp://127.0.0.1:5556")
        self.assertEqual(cfg.ipc.fallback, "tcp://127.0.0.1:8775")
        self.assertFalse(cfg.sync.enabled)
        self.assertEqual(cfg.websocket.auth_timeout, 10)
        self.assertEqual(cfg.websocket.idle_timeout, 90)
        self.assertEqual(cfg.limits.body_max, 1024 * 1024)

    def test_values_are_typed_and_frozen(self) -> None:
        cfg = c.from_string("[http]\nport = 0\n[bus]\nrequest_timeout = 2\n")
        self.assertEqual(cfg.http.port, 0)
        self.assertIsInstance(cfg.bus.request_timeout, float)
        with self.assertRaises(dataclasses.FrozenInstanceError):
            cfg.http.port = 1  # type: ignore[misc]

    def test_file_is_named_as_source(self) -> None:
        path = Path(self.mktemp())
        path.write_text("[http]\nport = 9\n")
        self.assertEqual(c.load(path).source, str(path))

    def _error(self, text: str) -> c.ConfigError:
        return self.assertRaises(c.ConfigError, c.from_string, text, "gw.toml")

    def test_unknown_key_is_named(self) -> None:
        e = self._error("[http]\nprot = 1\n")
        self.assertEqual(e.key, "http.prot")
        self.assertIn("gw.toml", str(e))

    def test_unknown_table_is_named(self) -> None:
        self.assertEqual(self._error("[htpp]\nport = 1\n").key, "htpp")

    def test_wrong_type_is_named(self) -> None:
        e = self._error('[http]\nport = "eighty"\n')
        self.assertEqual(e.key, "http.port")
        self.assertIn("integer", str(e))

    def test_bool_is_not_an_integer(self) -> None:
        self.assertEqual(self._error("[http]\nport = true\n").key, "http.port")

    def test_port_range(self) -> None:
        self.assertEqual(self._error("[admin]\nport = 70000\n").key, "admin.port")

    def test_non_loopback_http_needs_allow_remote(self) -> None:
        self.assertEqual(self._error('[http]\nhost = "0.0.0.0"\n').key, "http.host")
        cfg = c.from_string('[http]\nhost = "0.0.0.0"\nallow_remote = true\n')
        self.assertTrue(cfg.http.allow_remote)

    def test_embedded_broker_binds_loopback_only(self) -> None:
        self.assertEqual(self._error('[bus]\npub = "tcp://0.0.0.0:5555"\n').key, "bus.pub")

    def test_literal_choices(self) -> None:
        e = self._error('[sync.collections.notes]\nstrategy = "newest"\n')
        self.assertEqual(e.key, "sync.collections.notes.strategy")

    def test_syntax_error_names_file(self) -> None:
        self.assertIn("gw.toml", str(self._error("[http\n")))

    def test_nan_and_infinity_are_refused(self) -> None:
        self.assertEqual(self._error("[websocket]\nauth_timeout = nan\n").key, "websocket.auth_timeout")
        self.assertEqual(self._error("[bus]\nrequest_timeout = inf\n").key, "bus.request_timeout")

    def test_positive_numbers(self) -> None:
        self.assertEqual(self._error("[bus]\nrequest_timeout = 0\n").key, "bus.request_timeout")

    def test_rate_tiers_merge_with_defaults(self) -> None:
        cfg = c.from_string("[ratelimit.tiers.auth]\nrequests = 3\nper_seconds = 1\nburst = 1\n")
        self.assertEqual(cfg.ratelimit.tiers["auth"].requests, 3)
        self.assertIn("standard", cfg.ratelimit.tiers)

    def test_unknown_builtin_module(self) -> None:
        self.assertEqual(self._error('[modules]\nbuiltin = ["chess"]\n').key, "modules.builtin[0]")

    def test_builtin_module_names_are_the_bus_builtins(self) -> None:
        from aico.bus.builtin import BUILTIN_MODULES

        self.assertEqual(c.BUILTIN_MODULE_NAMES, set(BUILTIN_MODULES))
        self.assertLessEqual(set(c.Config().modules.builtin), c.BUILTIN_MODULE_NAMES)


class ReloadTests(SynchronousTestCase):
    def test_reloadable_and_restart_keys_are_told_apart(self) -> None:
        old = c.Config()
        new = c.from_string("[bus]\nrequest_timeout = 9\n[http]\nport = 1234\n")
        live, restart = c.reloadable_changes(old, new)
        self.assertEqual(live, ["bus.request_timeout"])
        self.assertEqual(restart, ["http.port"])


    def test_reload_takes_live_keys_and_keeps_restart_keys_running(self) -> None:
        old = c.from_string("[http]\nport = 1000\n")
        new = c.from_string("[http]\nport = 2000\n[bus]\nrequest_timeout = 9\n"
                            "[roles]\nuser = [\"users:self\"]\n")
        result = c.reload(old, new)
        self.assertEqual(result.config.http.port, 1000)
        self.assertEqual(result.config.bus.request_timeout, 9.0)
        self.assertEqual(result.config.roles["user"], ("users:self",))
        self.assertEqual(sorted(result.live), ["bus.request_timeout", "roles"])
        self.assertEqual(result.restart, ["http.port"])


class DocsTests(SynchronousTestCase):
    def test_every_key_is_documented(self) -> None:
        doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
        missing = [key for key, _, _ in c.iter_keys() if f"`{key}`" not in doc]
        self.assertEqual(missing, [])
