"""Packaging: every package ships, the dropin is listed, generated code is fresh."""

from __future__ import annotations

import configparser
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from aico.dev.genproto import main as genproto

ROOT = Path(__file__).resolve().parent.parent


class PackagingTests(SynchronousTestCase):
    def packages(self) -> set[str]:
        cfg = configparser.ConfigParser()
        cfg.read(ROOT / "setup.cfg")
        return {p.strip() for p in cfg["options"]["packages"].split() if p.strip()}

    def test_every_package_under_aico_is_listed_and_every_listed_one_exists(self) -> None:
        on_disk = {
            ".".join(p.parent.relative_to(ROOT).parts)
            for p in (ROOT / "aico").rglob("__init__.py")
        }
        listed = self.packages()
        self.assertEqual(sorted(on_disk - listed), [])
        missing = [p for p in listed if p != "twisted.plugins" and not (ROOT / p.replace(".", "/") / "__init__.py").exists()]
        self.assertEqual(missing, [])

    def test_twisted_plugins_is_listed_explicitly(self) -> None:
        self.assertIn("twisted.plugins", self.packages())

    def test_generated_protobuf_code_is_fresh(self) -> None:
        self.assertEqual(genproto(["--check", str(ROOT / "proto"), str(ROOT / "aico" / "proto")]), 0)
