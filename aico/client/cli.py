"""``aico-client``: a command line on top of :mod:`aico.client` (docs/protocols.md §4).

``aico-client request METHOD PATH [--body JSON] [--token T] --state-dir DIR`` connects
to the gateway of DIR the way ``connect()`` does (IPC first, then WebSocket); with
``--cert-dir DIR [--url https://HOST:PORT]`` instead it connects in detached mode (HTTPS,
then WSS, mutual TLS with the paired certificate). It prints the response body on stdout
and the status (and transport) on stderr; the exit status is 0 for a 2xx/3xx answer, 1
for an error answer, 2 when no transport could be reached.

``aico-client login`` (same ``--state-dir`` or ``--cert-dir``/``--url``) asks for the
password (``getpass``, or ``--password-file``), logs in and keeps the token pair in the
client's state (:mod:`aico.client.state`); ``request`` without ``--token`` uses it and
refreshes it when it has expired. Tokens are never printed.

``aico-client pair [--host H --port P] --code CODE --name NAME --out DIR`` pairs this
device (``docs/devices.md``): without ``--host`` it finds a gateway with an open pairing
window over mDNS. Exit status 0 paired, 1 refused (wrong code, no window, …), 2 no
gateway found or reachable.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from aico.client.connect import Client, connect
from aico.client.state import StoredTokens, TokenStore
from aico.client.tls import CertDirError
from aico.client.transports import ClientError, ClientResponse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aico-client", description="Talk to an AICO gateway.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("request", help="send one request and print the answer")
    r.add_argument("method")
    r.add_argument("path")
    r.add_argument("--body", help="JSON request body")
    r.add_argument("--token", default="",
                   help="bearer access token (default: the one stored by aico-client login)")
    _gateway_arguments(r)
    r.add_argument("--timeout", type=float, default=10.0)
    r.add_argument("--transport", choices=["ipc", "ipc-tcp", "websocket", "https", "wss"],
                   action="append", help="only try these transports (repeatable)")
    li = sub.add_parser("login", help="log in and keep the tokens for later requests")
    li.add_argument("--username", help="account name (asked when not given)")
    li.add_argument("--password-file", help="read the password from this file (first line)")
    _gateway_arguments(li)
    li.add_argument("--timeout", type=float, default=10.0)
    _add_pair(sub)
    return p


def _gateway_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--state-dir", help="the gateway's state directory (coupled mode)")
    where.add_argument("--cert-dir", help="the certificate directory from aico-client pair (detached mode)")
    p.add_argument("--url", default="",
                   help="detached mode: https://HOST:PORT of the tls listener (default: from gateway.json)")
    p.add_argument("--client-dir",
                   help="coupled mode: where login keeps tokens (default: the per-user state dir)")


def token_store(args: argparse.Namespace) -> TokenStore:
    """Where ``login`` keeps (and ``request`` finds) the tokens for this gateway."""
    if args.cert_dir:
        return TokenStore.for_cert_dir(args.cert_dir)
    return TokenStore.for_state_dir(args.state_dir, args.client_dir)


async def _open(reactor: Any, args: argparse.Namespace, token: str,
                order: Sequence[str] | None = None) -> Client:
    if args.cert_dir:
        return await connect(reactor, cert_dir=args.cert_dir, url=args.url, token=token,
                             order=order or ("https", "wss"))
    if args.url:
        raise ClientError("--url is for detached mode (with --cert-dir)")
    return await connect(reactor, args.state_dir, token=token,
                         order=order or ("ipc", "ipc-tcp", "websocket"))


async def _call(reactor: Any, args: argparse.Namespace, token: str, method: str, path: str,
                body: Any, order: Sequence[str] | None = None) -> tuple[ClientResponse, str]:
    client = await _open(reactor, args, token, order)
    name = client.transport_name
    try:
        response = await client.request(method, path, body, timeout=args.timeout)
    finally:
        await client.close()
    return response, name


def _problem_text(response: ClientResponse) -> str:
    try:
        problem = response.json() or {}
    except ValueError:
        problem = {}
    return f"{response.status} {problem.get('code', '')}: {problem.get('detail', '')}".rstrip(": ")


async def _refresh(reactor: Any, args: argparse.Namespace, store: TokenStore,
                   tokens: StoredTokens) -> StoredTokens:
    response, _ = await _call(reactor, args, "", "POST", "/api/v1/users/refresh",
                              {"refresh_token": tokens.refresh_token})
    if response.status != 200:
        raise ClientError(f"the stored login could not be refreshed ({_problem_text(response)}); "
                          "run aico-client login again")
    fresh = StoredTokens.from_answer(response.json(), tokens.username, tokens.gateway)
    store.save(fresh)
    return fresh


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
    if args.command == "login":
        if not (args.username and args.password_file):
            err.write("aico-client: login here needs --username and --password-file\n")
            return 2
        return await run_login(reactor, args, read_password(args), out, err)
    return await run_request(reactor, args, out, err)


async def run_request(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        body = json.loads(args.body) if args.body is not None else None
    except ValueError as e:
        err.write(f"aico-client: --body is not JSON: {e}\n")
        return 2
    token, store, stored = args.token, None, None
    try:
        if not token:
            store = token_store(args)
            stored = store.load()
            if stored is not None and stored.expired():
                stored = await _refresh(reactor, args, store, stored)
            token = stored.access_token if stored is not None else ""
        response, name = await _call(reactor, args, token, args.method, args.path, body, args.transport)
        if (store is not None and stored is not None and response.status == 401
                and (response.json() or {}).get("code") == "token_expired"):
            stored = await _refresh(reactor, args, store, stored)  # the clocks disagreed
            response, name = await _call(reactor, args, stored.access_token, args.method, args.path,
                                         body, args.transport)
    except (ClientError, CertDirError, ValueError) as e:
        err.write(f"aico-client: {e}\n")
        return 2
    err.write(f"{response.status} via {name}\n")
    out.write(response.body.decode("utf-8", "replace") + "\n")
    return 0 if response.status < 400 else 1


def read_password(args: argparse.Namespace) -> str:
    """The password for ``login``: ``--password-file`` (first line), else asked with getpass.

    Called before the reactor runs (getpass blocks)."""
    if args.password_file:
        lines = Path(args.password_file).read_text().splitlines()
        return lines[0] if lines else ""
    return getpass.getpass(f"Password for {args.username}: ")


async def run_login(reactor: Any, args: argparse.Namespace, password: str, out: TextIO,
                    err: TextIO) -> int:
    """Log in and keep the token pair; the tokens are never written to *out* or *err*."""
    gateway = args.url or (f"cert-dir {args.cert_dir}" if args.cert_dir else str(args.state_dir))
    try:
        store = token_store(args)
        response, name = await _call(reactor, args, "", "POST", "/api/v1/users/authenticate",
                                     {"username": args.username, "password": password})
    except (ClientError, CertDirError, ValueError) as e:
        err.write(f"aico-client: {e}\n")
        return 2
    if response.status != 200:
        err.write(f"aico-client: login refused: {_problem_text(response)}\n")
        return 1
    tokens = StoredTokens.from_answer(response.json(), args.username, gateway)
    store.save(tokens)
    lifetime = int(response.json().get("expires_in") or 0)
    err.write(f"logged in as {args.username} via {name}; tokens kept in {store.path} "
              f"(access token valid {lifetime} s, refreshed when needed)\n")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    password = ""
    if args.command == "login":
        if not args.username:
            args.username = input("Username: ").strip()
        password = read_password(args)

    def run(reactor: Any) -> Deferred[None]:
        async def go() -> None:
            if args.command == "login":
                code = await run_login(reactor, args, password, sys.stdout, sys.stderr)
            elif args.command == "pair":
                code = await run_pair(reactor, args, sys.stdout, sys.stderr)
            else:
                code = await run_request(reactor, args, sys.stdout, sys.stderr)
            if code:
                raise SystemExit(code)

        return Deferred.fromCoroutine(go())

    react(run)


if __name__ == "__main__":
    main()
