"""The deployment files in ``deploy/`` (docs/deploy.md): the systemd units pass
``systemd-analyze verify`` with the paths pointed at this checkout, their command lines
are ones the gateway and the module runner accept, and the logrotate snippet matches
the unit's log file."""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import TestCase

from aico.bus.runner import parse_args as module_args
from aico.gateway.tap import Options

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
UNITS = ("aico-gateway.service", "aico-module@.service")


def read_unit(name: str) -> configparser.RawConfigParser:
    """A unit file read as INI (strict: no duplicate sections; repeated keys allowed as
    systemd allows them, the last one kept)."""
    parser = configparser.RawConfigParser(strict=False, interpolation=None,
                                          comment_prefixes=("#", ";"), delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / name).read_text(), source=name)
    return parser


def local_copy(name: str, directory: Path, instance: str = "") -> Path:
    """The unit with its install paths pointed at this checkout's executables."""
    text = (DEPLOY / name).read_text()
    text = text.replace("/opt/aico-gateway/.venv/bin/", f"{BIN}/")
    target = directory / (name.replace("@.", f"@{instance}.") if instance else name)
    target.write_text(text)
    return target


class UnitFileTests(TestCase):
    def test_units_pass_systemd_analyze_verify_without_a_warning(self) -> None:
        analyze = shutil.which("systemd-analyze")
        self.assertIsNotNone(analyze, "systemd-analyze is missing: `make test` installs "
                             "Debian's systemd package where it is missing")
        assert analyze is not None
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        files = [local_copy("aico-gateway.service", directory),
                 local_copy("aico-module@.service", directory, "conversation")]
        result = subprocess.run(
            [analyze, "verify", "--man=no", *map(str, files)], capture_output=True,
            text=True, timeout=60, cwd=directory, env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})
        self.assertEqual(result.returncode, 0, result.stderr)
        ours = [line for line in result.stderr.splitlines()
                if any(f.name in line for f in files)]
        self.assertEqual(ours, [], "systemd-analyze warns about our units")

    def test_every_unit_has_the_sections_and_keys_it_needs(self) -> None:
        for name in UNITS:
            unit = read_unit(name)
            self.assertEqual(unit.sections(), ["Unit", "Service", "Install"], name)
            for key in ("ExecStart", "User", "Restart", "KillSignal", "UMask"):
                self.assertTrue(unit.get("Service", key, fallback=""), f"{name}: {key}")
        gateway = read_unit("aico-gateway.service")
        self.assertEqual(gateway.get("Service", "ExecReload"), "/bin/kill -HUP $MAINPID")
        self.assertEqual(gateway.get("Service", "StateDirectoryMode"), "0700")

    def test_the_gateway_unit_runs_twistd_in_the_foreground_with_options_it_accepts(
            self) -> None:
        argv = shlex.split(read_unit("aico-gateway.service").get("Service", "ExecStart"))
        self.assertTrue(argv[0].endswith("/twistd"))
        self.assertIn("--nodaemon", argv)
        self.assertIn("--pidfile=", argv)
        tap = argv.index("aico-gateway")
        config = Path(self.mktemp())
        config.write_text("")
        options = [a if a != "/etc/aico-gateway/gateway.toml" else str(config)
                   for a in argv[tap + 1:]]
        parsed = Options()
        parsed.parseOptions(options)
        self.assertEqual(parsed["state-dir"], "/var/lib/aico-gateway")

    def test_the_module_template_runs_the_module_runner_with_options_it_accepts(self) -> None:
        argv = shlex.split(read_unit("aico-module@.service").get("Service", "ExecStart"))
        self.assertTrue(argv[0].endswith("/aico-module"))
        self.assertTrue((BIN / "aico-module").exists())
        args = module_args([a.replace("${AICO_MODULE}", "conversation") for a in argv[1:]])
        self.assertEqual((args.name, str(args.state_dir)),
                         ("conversation", "/var/lib/aico-gateway"))

    def test_logrotate_snippet_truncates_the_file_the_unit_appends_to(self) -> None:
        text = (DEPLOY / "aico-gateway.logrotate").read_text()
        lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
        lines = [line for line in lines if line]
        self.assertEqual(lines[0], "/var/log/aico-gateway/gateway.log {")
        self.assertEqual(lines[-1], "}")
        self.assertIn("copytruncate", lines)
        unit = (DEPLOY / "aico-gateway.service").read_text()
        self.assertIn("StandardOutput=append:/var/log/aico-gateway/gateway.log", unit)

    def test_deploy_doc_reaches_the_admin_site_through_an_ssh_tunnel(self) -> None:
        doc = (ROOT / "docs" / "deploy.md").read_text()
        self.assertIn("ssh -L 8773:127.0.0.1:8773 ", doc)
        for name in (*UNITS, "aico-gateway.logrotate"):
            self.assertIn(f"deploy/{name}", doc)
