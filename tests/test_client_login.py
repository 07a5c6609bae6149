"""``aico-client login``: tokens kept 0600 in the client's state, used and refreshed by
``request`` — detached (a real mutual-TLS test server, tests/test_client_detached.py) and
coupled (the real gateway of ``start_gateway``)."""

from __future__ import annotations

import getpass
import io
import json
import stat
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from aico.client import cli
from aico.client.cli import parser, run_login, run_request
from aico.client.state import StoredTokens, TokenStore
from aico.gateway.devices.ca import DeviceCA
from aico.gateway.testing.harness import start_gateway
from tests.realtime import Realtime, reactor
from tests.test_client_detached import DetachedServer, paired_dir


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class DetachedLoginTests(TestCase):
    timeout = 30

    async def setUp(self) -> None:
        rt = await Realtime(self, bus=False).start()
        ca = DeviceCA.create()
        self.server = DetachedServer(self, rt, ca)
        self.users = self.server.users
        self.certs = paired_dir(Path(self.mktemp()), ca, self.server.cert,
                                tls_port=self.server.port_number)
        self.where = ["--url", self.server.url, "--cert-dir", str(self.certs)]

    async def login(self, password: str) -> tuple[int, str]:
        secret = Path(self.mktemp())
        secret.write_text(password + "\n")
        args = parser().parse_args(["login", "--username", "alice", "--password-file", str(secret),
                                    *self.where])
        out, err = io.StringIO(), io.StringIO()
        code = await run_login(reactor, args, cli.read_password(args), out, err)
        return code, out.getvalue() + err.getvalue()

    async def request(self, *extra: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        args = parser().parse_args(["request", "GET", "/api/v1/users/me", *self.where, *extra])
        code = await run_request(reactor, args, out, err)
        return code, out.getvalue(), err.getvalue()

    async def test_login_keeps_the_tokens_0600_in_the_cert_dir_and_request_uses_them(self) -> None:
        code, printed = await self.login("correct horse")
        self.assertEqual(code, 0, printed)
        path = self.certs / "tokens.json"
        self.assertEqual(mode(path), 0o600)
        stored = json.loads(path.read_text())
        self.assertEqual(stored["username"], "alice")
        self.assertIn(stored["access_token"], self.users.access)
        for secret in (stored["access_token"], stored["refresh_token"]):
            self.assertNotIn(secret, printed)
        self.assertNotIn(stored["access_token"], repr(TokenStore(path).load()))

        code, out, err = await self.request()
        self.assertEqual((code, json.loads(out)["username"]), (0, "alice"), err)
        self.assertEqual(self.users.seen_bearers, [stored["access_token"]])
        self.assertEqual(self.users.refreshes, 0)

    async def test_request_refreshes_a_stored_token_that_has_expired(self) -> None:
        await self.login("correct horse")
        store = TokenStore.for_cert_dir(self.certs)
        old = store.load()
        assert old is not None
        store.save(StoredTokens(old.access_token, old.refresh_token, 0.0, "alice", old.gateway))
        code, _, err = await self.request()
        self.assertEqual(code, 0, err)
        new = store.load()
        assert new is not None
        self.assertEqual(self.users.refreshes, 1)
        self.assertNotEqual(new.access_token, old.access_token)
        self.assertGreater(new.expires_at, 0)
        self.assertEqual(self.users.seen_bearers, [new.access_token])
        self.assertEqual(mode(store.path), 0o600)

    async def test_request_refreshes_and_retries_once_when_the_gateway_says_token_expired(self) -> None:
        await self.login("correct horse")
        store = TokenStore.for_cert_dir(self.certs)
        old = store.load()
        assert old is not None
        self.users.access[old.access_token] = 0.0  # the gateway's clock says: expired
        code, out, err = await self.request()
        self.assertEqual((code, json.loads(out)["username"]), (0, "alice"), err)
        self.assertEqual(self.users.refreshes, 1)
        self.assertEqual(len(self.users.seen_bearers), 2)

    async def test_a_refused_login_keeps_nothing(self) -> None:
        code, printed = await self.login("wrong")
        self.assertEqual(code, 1)
        self.assertIn("invalid_credentials", printed)
        self.assertFalse((self.certs / "tokens.json").exists())

    async def test_an_explicit_token_wins_over_the_stored_one(self) -> None:
        await self.login("correct horse")
        code, _, _ = await self.request("--token", "not-a-token")
        self.assertEqual(code, 1)
        self.assertEqual(self.users.seen_bearers, ["not-a-token"])

    def test_the_password_is_asked_with_getpass_without_a_password_file(self) -> None:
        prompts: list[str] = []

        def ask(prompt: str = "") -> str:
            prompts.append(prompt)
            return "typed"

        self.patch(getpass, "getpass", ask)
        args = parser().parse_args(["login", "--username", "alice", *self.where])
        self.assertEqual(cli.read_password(args), "typed")
        self.assertEqual(prompts, ["Password for alice: "])


class CoupledLoginTests(TestCase):
    timeout = 60

    async def test_login_against_the_real_gateway_keeps_tokens_in_the_client_dir(self) -> None:
        gw = await start_gateway(self)
        client_dir = Path(self.mktemp())
        secret = Path(self.mktemp())
        secret.write_text(gw.admin_password + "\n")
        where = ["--state-dir", str(gw.state_dir), "--client-dir", str(client_dir)]
        args = parser().parse_args(["login", "--username", "admin", "--password-file", str(secret),
                                    *where])
        out, err = io.StringIO(), io.StringIO()
        code = await run_login(reactor, args, cli.read_password(args), out, err)
        self.assertEqual(code, 0, err.getvalue())
        store = TokenStore.for_state_dir(gw.state_dir, client_dir)
        self.assertTrue(store.path.is_relative_to(client_dir))
        self.assertEqual((mode(store.path), mode(store.path.parent)), (0o600, 0o700))
        tokens = store.load()
        assert tokens is not None
        self.assertNotIn(tokens.access_token, out.getvalue() + err.getvalue())

        out, err = io.StringIO(), io.StringIO()
        args = parser().parse_args(["request", "GET", "/api/v1/users/me", *where])
        code = await run_request(reactor, args, out, err)
        self.assertEqual(code, 0, err.getvalue())
        me: dict[str, Any] = json.loads(out.getvalue())
        self.assertEqual(me["username"], "admin")
        self.assertEqual(err.getvalue(), "200 via ipc\n")
