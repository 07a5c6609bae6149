"""``aico-client``: a command line on top of :mod:`aico.client` (docs/protocols.md §4).

``aico-client request METHOD PATH [--body JSON] [--token T] --state-dir DIR`` connects
to the gateway of DIR the way ``connect()`` does (IPC first, then WebSocket), prints the
response body on stdout and the status (and transport) on stderr; the exit status is 0
for a 2xx/3xx answer, 1 for an error answer, 2 when no transport could be reached.
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
    return p


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
            code = await run_request(reactor, args, sys.stdout, sys.stderr)
            if code:
                raise SystemExit(code)

        return Deferred.fromCoroutine(go())

    react(run)


if __name__ == "__main__":
    main()
