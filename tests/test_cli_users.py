"""``aico-gateway user add/list`` and ``keys rotate``, and a running gateway picking up a
rotated key on SIGHUP while tokens signed with the old key stay valid."""

from __future__ import annotations

import io
import json
from pathlib import Path

import jwt
from twisted.trial.unittest import TestCase

from aico.gateway.cli import main
from aico.gateway.state import bootstrap
from aico.gateway.testing.harness import http_client, login, start_gateway


def run(*argv: str, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    import sys

    old = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        code = main(list(argv), stdout=out, stderr=err, environ={})
    finally:
        sys.stdin = old
    return code, out.getvalue(), err.getvalue()


class UserCommandTests(TestCase):
    def setUp(self) -> None:
        self.state = Path(self.mktemp())
        bootstrap(self.state, ["conversation"])

    def test_user_add_then_list(self) -> None:
        code, out, _ = run("user", "add", "grace", "--role", "user", "--role", "device",
                           "--state-dir", str(self.state), stdin="a-very-good-password\n")
        self.assertEqual(code, 0)
        self.assertNotIn("a-very-good-password", out)
        code, out, _ = run("user", "list", "--state-dir", str(self.state))
        self.assertEqual(code, 0)
        self.assertIn("grace\tuser,device", out)
        self.assertIn("admin\tadmin", out)

    def test_duplicate_and_weak_passwords_are_refused(self) -> None:
        run("user", "add", "heidi", "--state-dir", str(self.state), stdin="a-very-good-password\n")
        code, _, err = run("user", "add", "heidi", "--state-dir", str(self.state), stdin="another-good-one\n")
        self.assertEqual((code, "already exists" in err), (1, True))
        code, _, err = run("user", "add", "ivan", "--state-dir", str(self.state), stdin="short\n")
        self.assertEqual((code, "password" in err), (2, True))


class KeyRotationTests(TestCase):
    timeout = 60

    async def test_rotated_key_signs_after_sighup_and_old_tokens_stay_valid(self) -> None:
        gw = await start_gateway(self)
        anon = http_client(self)
        old = await login(anon, gw.base, "admin", gw.admin_password)
        old_kid = jwt.get_unverified_header(old["access_token"])["kid"]
        code, out, _ = run("keys", "rotate", "--state-dir", str(gw.state_dir))
        self.assertEqual(code, 0, out)
        await gw.service.reload()  # what SIGHUP does
        await gw.parts.reload_keys()  # type: ignore[union-attr]
        new = await login(anon, gw.base, "admin", gw.admin_password)
        new_kid = jwt.get_unverified_header(new["access_token"])["kid"]
        self.assertNotEqual(new_kid, old_kid)
        for token in (old["access_token"], new["access_token"]):
            r = await anon.get(gw.base + "/api/v1/users/me", headers={"Authorization": f"Bearer {token}"})
            self.assertEqual(r.code, 200)
            await r.content()
        r = await anon.get(gw.base + "/.well-known/jwks.json")
        kids = {k["kid"] for k in json.loads(await r.content())["keys"]}
        self.assertEqual(kids, {old_kid, new_kid})
