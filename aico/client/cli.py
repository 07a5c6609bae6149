"""``aico-client``: a command line on top of :mod:`aico.client` (docs/protocols.md §4).

``aico-client request METHOD PATH [--body JSON] [--token T] --state-dir DIR`` connects
to the gateway of DIR the way ``connect()`` does (IPC first, then WebSocket), prints the
response body on stdout and the status (and transport) on stderr; the exit status is 0
for a 2xx/3xx answer, 1 for an error answer, 2 when no transport could be reached.

``aico-client pair [--host H --port P] --code CODE --name NAME --out DIR`` pairs this
device (``docs/devices.md``): without ``--host`` it finds a gateway with an open pairing
window over mDNS. Exit status 0 paired, 1 refused (wrong code, no window, …), 2 no
gateway found or reachable.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from aico.client.connect import connect
from aico.client.transports import ClientError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aico-client", description="Talk to an AICO gateway.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("request", help="send one request and print the answer")
    r.add_argument("method")
    r.add_argument("path")
    r.add_argument("--body", help="JSON request body")
    r.add_argument("--token", default="", help="bearer access token")
    r.add_argument("--state-dir", required=True, help="the gateway's state directory (coupled mode)")
    r.add_argument("--timeout", type=float, default=10.0)
    r.add_argument("--transport", choices=["ipc", "ipc-tcp", "websocket"], action="append",
                   help="only try these transports (repeatable)")
    _add_pair(sub)
    return p


def _add_pair(sub: Any) -> None:
    p = sub.add_parser("pair", help="pair this device with a gateway (one-time code)")
    p.add_argument("--host", help="the gateway's address (default: find it over mDNS)")
    p.add_argument("--port", type=int, help="the pairing port (default: from mDNS, else 8776)")
    p.add_argument("--code", required=True, help="the code `aico-gateway pair` printed")
    p.add_argument("--name", required=True, help="this device's name")
    p.add_argument("--out", required=True, help="directory for device.pem, device.key, ca.pem, "
                   "gateway.json")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds for the whole pairing")
    p.add_argument("--browse-timeout", type=float, default=5.0,
                   help="seconds to look for the gateway over mDNS")
    p.add_argument("--interface", action="append", default=[],
                   help="interface address to browse mDNS on (repeatable; default: all)")


async def run_pair(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from twisted.internet.error import ConnectError

    from aico.client.pairing import PairingFailed, pair

    host, port = args.host, args.port
    if host is None:
        from aico.client.discovery import browse

        found = [g for g in await browse(reactor, args.browse_timeout, args.interface)
                 if g.pairing_open and g.pairing_port and g.addresses]
        if not found:
            err.write("aico-client: no gateway with an open pairing window found over mDNS; "
                      "give --host and --port\n")
            return 2
        gateway = found[0]
        host, port = gateway.addresses[0], port or gateway.pairing_port
        err.write(f"found gateway {gateway.name!r} at {host}:{port}\n")
    try:
        result = await pair(reactor, host, port or 8776, args.code, args.name, args.out,
                            timeout=args.timeout)
    except PairingFailed as e:
        err.write(f"aico-client: pairing failed: {e}\n")
        return 1
    except FileExistsError as e:
        err.write(f"aico-client: {e}\n")
        return 2
    except (ConnectError, OSError) as e:
        err.write(f"aico-client: cannot reach the gateway at {host}:{port}: {e}\n")
        return 2
    out.write(f"paired as {result.name} ({result.device_id})\n"
              f"gateway fingerprint {result.gateway_fingerprint}\n"
              f"certificate directory {args.out}\n")
    return 0


async def run(reactor: Any, argv: Sequence[str], out: TextIO | None = None,
              err: TextIO | None = None) -> int:
    """Run one command in a running reactor; returns the exit status (tests call this)."""
    args = parser().parse_args(argv)
    out, err = out or sys.stdout, err or sys.stderr
    if args.command == "pair":
        return await run_pair(reactor, args, out, err)
    return await run_request(reactor, args, out, err)


async def run_request(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        body = json.loads(args.body) if args.body is not None else None
    except ValueError as e:
        err.write(f"aico-client: --body is not JSON: {e}\n")
        return 2
    order = args.transport or ("ipc", "ipc-tcp", "websocket")
    try:
        client = await connect(reactor, args.state_dir, token=args.token, order=order)
    except ClientError as e:
        err.write(f"aico-client: {e}\n")
        return 2
    name = client.transport_name
    try:
        response = await client.request(args.method, args.path, body, timeout=args.timeout)
    except ClientError as e:
        err.write(f"aico-client: {e}\n")
        return 2
    finally:
        await client.close()
    err.write(f"{response.status} via {name}\n")
    out.write(response.body.decode("utf-8", "replace") + "\n")
    return 0 if response.status < 400 else 1


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    def run(reactor: Any) -> Deferred[None]:
        async def go() -> None:
            run_command = run_pair if args.command == "pair" else run_request
            code = await run_command(reactor, args, sys.stdout, sys.stderr)
            if code:
                raise SystemExit(code)

        return Deferred.fromCoroutine(go())

    react(run)


if __name__ == "__main__":
    main()
