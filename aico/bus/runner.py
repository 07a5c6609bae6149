"""``aico-module NAME|PACKAGE.MODULE:CLASS --state-dir DIR [--pub ENDPOINT --sub ENDPOINT]``.

Runs one backend module — a built-in one by name, or your own
:class:`~aico.bus.module.BackendModule` subclass by its import path — as a process of
its own: the bus endpoints come from
``STATE_DIR/ports.json`` (written by the gateway once its listeners are up) unless given,
the Curve key pair from ``STATE_DIR/curve/private/NAME.key_secret`` (created, with its
public half in ``curve/modules/``, if missing). The secret file is sealed
(:mod:`aico.keystore`): the master secret is found as the gateway finds it — the platform
keyring, else ``AICO_MASTER_PASSWORD``, else ``STATE_DIR/master-key``. SIGTERM or SIGINT
stops it cleanly.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver

from aico.bus.builtin import BUILTIN_MODULES
from aico.bus.client import BusClient
from aico.bus.curve import CurveLayout, ensure_client
from aico.bus.module import BackendModule
from aico.keystore import KeystoreError, state_keystore

log = Logger(namespace="aico.bus.runner")


class RunnerError(Exception):
    """A start-up problem reported to the operator (exit status 2)."""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="aico-module", description="Run an AICO backend module on the bus."
    )
    parser.add_argument(
        "name",
        help=f"a built-in module ({', '.join(sorted(BUILTIN_MODULES))}) or the import path "
        "of a BackendModule subclass, package.module:Class",
    )
    parser.add_argument("--state-dir", required=True, type=Path, help="the gateway's state dir")
    parser.add_argument("--pub", help="the broker's XSUB endpoint (default: from ports.json)")
    parser.add_argument("--sub", help="the broker's XPUB endpoint (default: from ports.json)")
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=None,
        help="give up when the broker has not answered after this many seconds",
    )
    return parser.parse_args(list(argv))


def bus_endpoints(state_dir: Path, pub: str | None, sub: str | None) -> tuple[str, str]:
    """The (pub, sub) endpoints: given ones win, the rest come from ``ports.json``."""
    if pub and sub:
        return pub, sub
    ports_file = state_dir / "ports.json"
    try:
        ports: Any = json.loads(ports_file.read_text(encoding="utf-8"))
        bus = ports["bus"]
        return pub or str(bus["pub"]), sub or str(bus["sub"])
    except FileNotFoundError as e:
        raise RunnerError(f"{ports_file} does not exist: start the gateway or give --pub/--sub") from e
    except (ValueError, KeyError, TypeError) as e:
        raise RunnerError(f"{ports_file} has no bus endpoints: give --pub/--sub") from e


def module_factory(spec: str) -> tuple[str, Callable[[Any, Any], BackendModule]]:
    """(bus name, factory) of a built-in module name or a ``package.module:Class`` path."""
    if spec in BUILTIN_MODULES:
        return spec, BUILTIN_MODULES[spec]
    if ":" not in spec:
        raise RunnerError(f"unknown module {spec!r}: a built-in name "
                          f"({', '.join(sorted(BUILTIN_MODULES))}) or package.module:Class")
    path, _, attr = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(path), attr)
    except (ImportError, AttributeError) as e:
        raise RunnerError(f"cannot import {spec}: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, BackendModule)):
        raise RunnerError(f"{spec} is not a BackendModule subclass")
    return str(cls.name), cls


async def run(reactor: Any, args: argparse.Namespace) -> None:
    """Start the module and wait until the reactor shuts down (then stop it cleanly)."""
    name, factory = module_factory(args.name)
    broker_public = CurveLayout(args.state_dir).broker_public
    if not broker_public.exists():
        raise RunnerError(f"{broker_public} does not exist: initialise the state dir")
    pub, sub = bus_endpoints(args.state_dir, args.pub, args.sub)
    try:
        # Blocking (Argon2id, once): before the module does anything else.
        layout = CurveLayout(args.state_dir, state_keystore(args.state_dir))
        if ensure_client(layout, name):
            log.info("created the Curve key pair of module {name}", name=name)
        bus = BusClient.from_layout(reactor, layout, name, pub, sub,
                                    start_timeout=args.start_timeout)
    except (KeystoreError, ValueError, OSError) as e:
        raise RunnerError(f"cannot read the module's Curve keys: {e}") from e
    module = factory(bus, reactor)
    done: Deferred[None] = Deferred()

    def shutdown() -> Deferred[None]:
        d = module.stop()
        d.addBoth(lambda _: done.callback(None) if not done.called else None)
        return d

    reactor.addSystemEventTrigger("before", "shutdown", shutdown)
    log.info("module {name}: connecting to {pub} / {sub}", name=name, pub=pub, sub=sub)
    await module.start()
    await done


def main(argv: Sequence[str] | None = None) -> None:
    """The ``aico-module`` console script."""
    from twisted.internet.task import react

    args = parse_args(sys.argv[1:] if argv is None else argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])

    def _main(reactor: Any) -> Deferred[None]:
        d = Deferred.fromCoroutine(run(reactor, args))

        def report(failure: Any) -> None:
            if failure.check(RunnerError):
                log.error("aico-module: {error}", error=str(failure.value))
                raise SystemExit(2)
            failure.raiseException()

        d.addErrback(report)
        return d

    react(_main)


if __name__ == "__main__":
    main()
