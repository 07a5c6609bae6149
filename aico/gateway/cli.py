"""``aico-gateway``: the operator's command line.

Subcommands (``aico-gateway COMMAND --help`` for each):

* ``init [--state-dir DIR] [--config FILE]`` — create what is missing in the state
  directory (see ``docs/state.md``); prints what it created and where the initial admin
  password is, never the password itself.
* ``config check FILE`` — validate a configuration file: prints ``ok`` (exit 0) or the
  error naming the key and the file (exit 2).
* ``user add USERNAME [--role R …] [--password-file F]`` / ``user list`` — users in the
  registry (the password comes from a file or standard input, never the command line);
  ``user unlock USERNAME`` — clear every login lock of an account (audited).
* ``keys rotate`` — a new JWT signing key; the old one verifies until its tokens expire.
* ``pair [--name N] [--minutes M] [--for USER] [--no-wait]`` — open a pairing window
  (closing any other), print its one-time code, the port and the expiry; then wait and
  report how the window ended (Ctrl-C closes it). A running gateway opens its ``pairing``
  listener within a second.
* ``devices list [--json]`` / ``devices revoke DEVICE_ID`` / ``devices rename DEVICE_ID NAME``
  — paired devices (revoke and rename are audited; a running gateway sees them within
  0.25 s and cuts a revoked device's connections, ``docs/devices.md``).
* ``sync join --host H --port P --code CODE [--name N]`` — pair this gateway for sync
  with the one whose pairing window gave CODE (``docs/sync-protocol.md``), running or
  not; a running gateway picks the new peer up within a second.
* ``backup DIR`` — a consistent copy of the state directory while the gateway runs
  (SQLite's online backup for the registry, a manifest with checksums);
  ``restore DIR [--force]`` — into a new or empty state directory, then verified
  (``aico/gateway/backup.py``, ``docs/state.md``).

Adding a subcommand: write ``_add_NAME(subparsers)`` that builds its parser and sets
``handler=`` to a function ``(args, ctx: Context) -> int``, and list it in :data:`_COMMANDS`.
Commands that work on a state directory call :func:`add_state_options` and
:func:`state_paths`, so every command resolves the directory in the same order as the
server (``--state-dir``, ``$AICO_STATE_DIR``, ``[gateway] state_dir``, platform default).

Exit status: 0 success, 1 a failure while doing the work, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from typing import Any, TextIO

from aico.gateway import config as _config
from aico.gateway.state import StateDirError, StatePaths, bootstrap, resolve_state_dir
from aico.gateway.store import SchemaError, SyncDatabase, sync_result
from aico.gateway.users import UserStore, username_problem

__all__ = [
    "ENV_CONFIG",
    "Context",
    "add_state_options",
    "build_parser",
    "load_config",
    "main",
    "state_paths",
]

#: Environment variable naming the config file when ``--config`` is not given.
ENV_CONFIG = "AICO_GATEWAY_CONFIG"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


@dataclass(frozen=True)
class Context:
    """What a command handler may use besides its arguments (injectable for tests)."""

    out: TextIO
    err: TextIO
    env: Mapping[str, str]


Handler = Callable[[argparse.Namespace, Context], int]
_Subparsers = Any  # argparse's _SubParsersAction is private and generic


class _Exit(Exception):
    """Stop the command with *status*, after printing *message* to stderr."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------- shared helpers


def add_state_options(parser: argparse.ArgumentParser) -> None:
    """``--state-dir`` and ``--config``, for every command that works on a state directory."""
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help="state directory (default: $AICO_STATE_DIR, the config's [gateway] state_dir, "
        "or the platform's data directory)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"configuration file (default: ${ENV_CONFIG}, else built-in defaults)",
    )


def load_config(path: str | None, env: Mapping[str, str]) -> _config.Config:
    """The config from *path*, else from ``$AICO_GATEWAY_CONFIG``, else the defaults."""
    path = path or env.get(ENV_CONFIG) or None
    if path is None:
        return _config.Config()
    try:
        return _config.load(path)
    except _config.ConfigError as e:
        raise _Exit(EXIT_USAGE, str(e)) from e


def state_paths(
    args: argparse.Namespace, env: Mapping[str, str]
) -> tuple[StatePaths, _config.Config]:
    """The state directory chosen by *args* (see :func:`add_state_options`) and the config."""
    config = load_config(args.config, env)
    root = resolve_state_dir(args.state_dir, env, config.gateway.state_dir)
    return StatePaths(root), config


# --------------------------------------------------------------------------- init


def _add_init(subparsers: _Subparsers) -> None:
    p = subparsers.add_parser(
        "init",
        help="create the state directory (CA, keys, registry, admin user)",
        description="Create whatever is missing in the state directory; existing files are "
        "never changed, so running it again is safe.",
    )
    add_state_options(p)
    p.set_defaults(handler=_cmd_init)


def _cmd_init(args: argparse.Namespace, ctx: Context) -> int:
    out = ctx.out
    paths, config = state_paths(args, ctx.env)
    try:
        report = bootstrap(paths.root, config.modules.builtin, env=ctx.env)
    except (StateDirError, SchemaError) as e:
        raise _Exit(EXIT_FAILURE, str(e)) from e
    except OSError as e:
        raise _Exit(EXIT_FAILURE, f"{e.filename or paths.root}: {e.strerror}") from e
    print(f"state directory: {paths.root}", file=out)
    if report.created:
        print("created: " + ", ".join(report.created), file=out)
    else:
        print("nothing to create: the state directory is complete", file=out)
    keystore = report.keystore
    print(f"private keys are encrypted with the master secret from {keystore.where}", file=out)
    if keystore.source == "file":
        print("  warning: that file lies beside the keys it protects; move the secret to the\n"
              "  platform keyring (aico-gateway keys master --to-keyring) or to\n"
              "  AICO_MASTER_PASSWORD (docs/security.md, 'Keys at rest')", file=out)
    password_file = report.admin_password_file
    if password_file is not None:
        print(
            f"initial admin password (user 'admin'): in {password_file}\n"
            "  read it, log in, change the password, then delete the file",
            file=out,
        )
    return EXIT_OK


# --------------------------------------------------------------------------- config


def _add_config(subparsers: _Subparsers) -> None:
    p = subparsers.add_parser("config", help="configuration tools")
    sub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = sub.add_parser(
        "check",
        help="validate a configuration file",
        description="Exit 0 and print 'ok' if FILE is valid; otherwise print the problem, "
        "naming the key and the file, and exit 2.",
    )
    check.add_argument("file", metavar="FILE")
    check.set_defaults(handler=_cmd_config_check)


def _cmd_config_check(args: argparse.Namespace, ctx: Context) -> int:
    try:
        _config.load(args.file)
    except _config.ConfigError as e:
        raise _Exit(EXIT_USAGE, str(e)) from e
    print("ok", file=ctx.out)
    return EXIT_OK


# --------------------------------------------------------------------------- user


def _add_user(subparsers: _Subparsers) -> None:
    p = subparsers.add_parser("user", help="manage users in the registry")
    sub = p.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    add = sub.add_parser(
        "add",
        help="create a user",
        description="Create USERNAME with the given roles. The password is read from "
        "--password-file, or from standard input (one line) — never from the command line.",
    )
    add.add_argument("username")
    add.add_argument("--role", action="append", dest="roles", metavar="ROLE",
                     choices=["admin", "user", "device", "service"],
                     help="a role (repeatable; default: user)")
    add.add_argument("--password-file", metavar="FILE",
                     help="read the password from FILE (default: standard input)")
    add_state_options(add)
    add.set_defaults(handler=_cmd_user_add)
    listing = sub.add_parser("list", help="list users (username, roles, disabled)")
    add_state_options(listing)
    listing.set_defaults(handler=_cmd_user_list)
    unlock = sub.add_parser(
        "unlock",
        help="clear every login lock of a user",
        description="Forget USERNAME's failed logins and locks from every source, so the "
        "right password is accepted again at once (also by a running gateway). Recorded in "
        "the audit log as account_unlocked.",
    )
    unlock.add_argument("username")
    add_state_options(unlock)
    unlock.set_defaults(handler=_cmd_user_unlock)


def _open_registry(paths: StatePaths) -> closing[SyncDatabase]:
    """The registry of *paths*, opened for :class:`UserStore` (it must exist already)."""
    if not paths.registry_db.exists():
        raise _Exit(EXIT_FAILURE, f"{paths.registry_db}: no registry; run `aico-gateway init` first")
    try:
        return closing(SyncDatabase(paths.registry_db))
    except SchemaError as e:
        raise _Exit(EXIT_FAILURE, str(e)) from e


def _cmd_user_add(args: argparse.Namespace, ctx: Context) -> int:
    from aico.gateway.security.passwords import hash_password

    paths, config = state_paths(args, ctx.env)
    problem = username_problem(args.username)
    if problem is not None:
        raise _Exit(EXIT_USAGE, f"username: {problem}")
    if args.password_file:
        with open(args.password_file, encoding="utf-8") as f:
            password = f.read().strip("\r\n")
    else:
        password = sys.stdin.readline().strip("\r\n")
    if len(password) < config.auth.password_min_length:
        raise _Exit(EXIT_USAGE, f"password: at least {config.auth.password_min_length} characters")
    roles = args.roles or ["user"]
    with _open_registry(paths) as db:
        hashed = hash_password(password)
        created = sync_result(UserStore(db).create(args.username, hashed, tuple(roles)))
    if not created:
        raise _Exit(EXIT_FAILURE, f"user {args.username!r} already exists")
    print(f"created user {args.username} with roles {', '.join(roles)}", file=ctx.out)
    return EXIT_OK


def _cmd_user_list(args: argparse.Namespace, ctx: Context) -> int:
    paths, _ = state_paths(args, ctx.env)
    with _open_registry(paths) as db:
        users = sync_result(UserStore(db).list())
    for user in users:
        flag = "  (disabled)" if user.disabled else ""
        print(f"{user.username}\t{','.join(user.roles)}{flag}", file=ctx.out)
    return EXIT_OK


def _cmd_user_unlock(args: argparse.Namespace, ctx: Context) -> int:
    from twisted.internet import reactor  # its clock only; it never runs here

    from aico.gateway.security.audit import AuditLog

    paths, _ = state_paths(args, ctx.env)
    with _open_registry(paths) as db:
        store = UserStore(db)
        if sync_result(store.get(args.username)) is None:
            raise _Exit(EXIT_FAILURE, f"no user {args.username!r}")
        sources = sync_result(store.unlock(args.username))
        audit = AuditLog(db, reactor, anchor_path=paths.root / "audit-head.json")
        sync_result(audit.append("account_unlocked", "cli",
                                 {"username": args.username, "sources": sources}))
    print(f"unlocked {args.username}: failed logins and locks of {sources} source(s) cleared",
          file=ctx.out)
    return EXIT_OK


# --------------------------------------------------------------------------- keys


def _add_keys(subparsers: _Subparsers) -> None:
    p = subparsers.add_parser("keys", help="JWT signing keys and the master secret")
    sub = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    rotate = sub.add_parser(
        "rotate",
        help="make a new signing key current",
        description="A new Ed25519 key signs new tokens; the previous key keeps verifying "
        "until every token it signed has expired (auth.refresh_ttl). A running gateway "
        "picks the new key up on SIGHUP.",
    )
    add_state_options(rotate)
    rotate.set_defaults(handler=_cmd_keys_rotate)
    master = sub.add_parser(
        "master",
        help="move the master secret that seals the private keys",
        description="--to-keyring stores the master secret (from AICO_MASTER_PASSWORD or the "
        "state directory's master-key file) in the platform keyring and deletes the "
        "master-key file. Nothing is re-encrypted. See docs/security.md.",
    )
    master.add_argument("--to-keyring", action="store_true", required=True,
                        help="move it into the platform keyring")
    add_state_options(master)
    master.set_defaults(handler=_cmd_keys_master)


def _cmd_keys_rotate(args: argparse.Namespace, ctx: Context) -> int:
    import time

    from aico.gateway.security.keys import KeyRing, KeyRingError
    from aico.keystore import KeystoreError, state_keystore

    paths, config = state_paths(args, ctx.env)
    try:
        keystore = state_keystore(paths.root, env=ctx.env)
        ring = KeyRing.load(paths.jwt_dir, keystore)
        old = ring.current_kid
        new = ring.rotate(paths.jwt_dir, time.time(), config.auth.refresh_ttl + config.auth.leeway)
    except (KeyRingError, KeystoreError, OSError) as e:
        raise _Exit(EXIT_FAILURE, f"cannot rotate: {e}") from e
    print(f"new signing key {new}; {old} verifies until its tokens expire\n"
          "send SIGHUP to a running gateway to start signing with it", file=ctx.out)
    return EXIT_OK


def _cmd_keys_master(args: argparse.Namespace, ctx: Context) -> int:
    from aico.keystore import KeystoreError, move_master_to_keyring

    paths, _ = state_paths(args, ctx.env)
    try:
        before = move_master_to_keyring(paths.root, env=ctx.env)
    except (KeystoreError, OSError) as e:
        raise _Exit(EXIT_FAILURE, f"cannot move the master secret: {e}") from e
    if before.source == "keyring":
        print("the master secret is already in the platform keyring", file=ctx.out)
    else:
        print(f"the master secret moved from {before.where} to the platform keyring", file=ctx.out)
        if before.source == "env":
            print("AICO_MASTER_PASSWORD is no longer needed", file=ctx.out)
    return EXIT_OK


# --------------------------------------------------------------------------- pair


def _add_pair(subparsers: _Subparsers) -> None:
    p = subparsers.add_parser(
        "pair",
        help="open a pairing window and print its one-time code",
        description="Open a pairing window (any other open window closes: one code works at "
        "a time). A running gateway opens its pairing listener while the window is open. "
        "The device runs `aico-client pair --code CODE …`. Without --no-wait the command "
        "waits and reports how the window ended; Ctrl-C closes the window.",
    )
    p.add_argument("--name", help="the name the paired device gets (default: the name it asks for)")
    p.add_argument("--minutes", type=float, help="how long the window stays open "
                   "(default: [pairing] window_minutes, 5)")
    p.add_argument("--for", dest="paired_for", metavar="USER",
                   help="the user the device is paired for")
    p.add_argument("--no-wait", action="store_true", help="print the code and return at once")
    add_state_options(p)
    p.set_defaults(handler=_cmd_pair)


def _cmd_pair(args: argparse.Namespace, ctx: Context, *,
              sleep: Callable[[float], None] | None = None) -> int:
    import time

    from twisted.internet import reactor  # its clock only; it never runs here

    from aico.gateway.devices.pairing import format_code
    from aico.gateway.devices.registry import PairingWindowStore, new_code
    from aico.gateway.security.audit import AuditLog

    paths, config = state_paths(args, ctx.env)
    minutes = args.minutes if args.minutes is not None else config.pairing.window_minutes
    if not 0 < minutes <= 24 * 60:
        raise _Exit(EXIT_USAGE, "--minutes: expected more than 0 and at most 1440")
    if not config.pairing.enabled:
        raise _Exit(EXIT_USAGE, "pairing is turned off ([pairing] enabled = false)")
    with _open_registry(paths) as db:
        if args.paired_for and sync_result(UserStore(db).get(args.paired_for)) is None:
            raise _Exit(EXIT_USAGE, f"--for: no user {args.paired_for!r}")
        windows = PairingWindowStore(db)
        for old in sync_result(windows.active()):
            sync_result(windows.close(old.window_id))
            print(f"closed the pairing window opened at "
                  f"{_local_time(old.opened_at)} (one window at a time)", file=ctx.out)
        window = sync_result(windows.open(seconds=minutes * 60, opened_by="cli",
                                          device_name=args.name, paired_for=args.paired_for,
                                          code=new_code()))
        audit = AuditLog(db, reactor, anchor_path=paths.root / "audit-head.json")
        sync_result(audit.append("pairing_opened", "cli", {
            "window_id": window.window_id, "device_name": window.device_name,
            "paired_for": window.paired_for, "expires_at": window.expires_at}))
        port = config.pairing.port or "(picked by the gateway)"
        print(f"pairing code: {format_code(window.code)}\n"
              f"pairing port: {config.pairing.host}:{port}\n"
              f"open until:   {_local_time(window.expires_at)}\n"
              f"on the device: aico-client pair --host HOST --port {port} "
              f"--code {format_code(window.code)} --name NAME --out DIR", file=ctx.out)
        if args.no_wait:
            return EXIT_OK
        ctx.out.flush()
        pause = sleep or time.sleep
        try:
            while True:
                now = sync_result(windows.get(window.window_id))
                if now is None or now.state != "open" or not now.is_open(time.time()):
                    break
                pause(0.5)
        except KeyboardInterrupt:
            sync_result(windows.close(window.window_id))
            print("pairing window closed", file=ctx.out)
            return EXIT_FAILURE
    state = now.state if now is not None else "gone"
    if now is not None and state == "used":
        print(f"paired device {now.device_id}", file=ctx.out)
        return EXIT_OK
    if now is not None and state == "open":
        state = "expired"
    failures = f" after {now.failures} failed attempt(s)" if now is not None and now.failures else ""
    print(f"pairing window {state}{failures}; no device paired", file=ctx.out)
    return EXIT_FAILURE


def _local_time(ts: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


# --------------------------------------------------------------------------- devices


def _add_devices(subparsers: _Subparsers) -> None:
    p = subparsers.add_parser("devices", help="paired devices (detached mode)")
    sub = p.add_subparsers(dest="devices_command", metavar="ACTION", required=True)
    listing = sub.add_parser("list", help="list paired devices (ID, name, trust, state)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    add_state_options(listing)
    listing.set_defaults(handler=_cmd_devices_list)
    revoke = sub.add_parser(
        "revoke",
        help="revoke a device",
        description="Revoke DEVICE_ID: a running gateway refuses its next handshake and "
        "closes its open connections within a second. Recorded in the audit log as "
        "device_revoked.",
    )
    revoke.add_argument("device_id", metavar="DEVICE_ID")
    add_state_options(revoke)
    revoke.set_defaults(handler=_cmd_devices_revoke)
    rename = sub.add_parser("rename", help="rename a device (audited as device_renamed)")
    rename.add_argument("device_id", metavar="DEVICE_ID")
    rename.add_argument("name", metavar="NAME")
    add_state_options(rename)
    rename.set_defaults(handler=_cmd_devices_rename)


def _device_id_arg(text: str) -> str:
    from aico.gateway.devices.ca import DeviceIDError, format_device_id, parse_device_id

    try:
        return format_device_id(parse_device_id(text.strip()))
    except DeviceIDError as e:
        raise _Exit(EXIT_USAGE, f"device ID {text!r}: {e}") from e


def _cmd_devices_list(args: argparse.Namespace, ctx: Context) -> int:
    import json
    import time

    from aico.gateway.devices.registry import DeviceStore

    paths, _ = state_paths(args, ctx.env)
    with _open_registry(paths) as db:
        devices = sync_result(DeviceStore(db).list())
    for d in devices:
        if args.json:
            print(json.dumps(d.public(), sort_keys=True), file=ctx.out)
            continue
        state = "revoked" if d.revoked else "active"
        seen = (time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(d.last_seen))
                if d.last_seen else "never")
        print(f"{d.device_id}\t{d.name}\t{d.trust}\t{state}\tpaired for "
              f"{d.paired_for or '-'}\tlast seen {seen}", file=ctx.out)
    if not devices and not args.json:
        print("no paired devices", file=ctx.out)
    return EXIT_OK


def _audit_cli(db: SyncDatabase, paths: StatePaths, event: str, details: dict[str, Any]) -> None:
    from twisted.internet import reactor  # its clock only; it never runs here

    from aico.gateway.security.audit import AuditLog

    audit = AuditLog(db, reactor, anchor_path=paths.root / "audit-head.json")
    sync_result(audit.append(event, "cli", details))


def _cmd_devices_revoke(args: argparse.Namespace, ctx: Context) -> int:
    from aico.gateway.devices.registry import DeviceStore

    device_id = _device_id_arg(args.device_id)
    paths, _ = state_paths(args, ctx.env)
    with _open_registry(paths) as db:
        store = DeviceStore(db)
        device = sync_result(store.get(device_id))
        if device is None:
            raise _Exit(EXIT_FAILURE, f"no device {device_id}")
        if not sync_result(store.revoke(device_id)):
            raise _Exit(EXIT_FAILURE, f"device {device_id} ({device.name}) was revoked already")
        _audit_cli(db, paths, "device_revoked", {"device_id": device_id, "name": device.name})
    print(f"revoked {device_id} ({device.name}); a running gateway closes its connections "
          "within a second", file=ctx.out)
    return EXIT_OK


def _cmd_devices_rename(args: argparse.Namespace, ctx: Context) -> int:
    from aico.gateway.devices.registry import DeviceStore

    device_id = _device_id_arg(args.device_id)
    name = args.name.strip()
    if not name or len(name) > 64 or any(not ch.isprintable() for ch in name):
        raise _Exit(EXIT_USAGE, "name: 1-64 printable characters")
    paths, _ = state_paths(args, ctx.env)
    with _open_registry(paths) as db:
        store = DeviceStore(db)
        device = sync_result(store.get(device_id))
        if device is None or not sync_result(store.rename(device_id, name)):
            raise _Exit(EXIT_FAILURE, f"no device {device_id}")
        _audit_cli(db, paths, "device_renamed",
                   {"device_id": device_id, "old_name": device.name, "name": name})
    print(f"renamed {device_id}: {device.name} -> {name}", file=ctx.out)
    return EXIT_OK


# --------------------------------------------------------------------------- sync


def _add_sync(subparsers: _Subparsers) -> None:
    p = subparsers.add_parser("sync", help="sync with this person's other gateways")
    sub = p.add_subparsers(dest="sync_command", metavar="ACTION", required=True)
    j = sub.add_parser(
        "join",
        help="pair this gateway for sync with another one",
        description="Pair this gateway for sync with the gateway whose pairing window gave "
        "CODE (run `aico-gateway pair` there). Both gateways then hold a client certificate "
        "from the other's CA and list each other as sync peers; a running gateway picks "
        "the new peer up without a restart.",
    )
    j.add_argument("--host", required=True, help="the other gateway's address")
    j.add_argument("--port", required=True, type=int, help="its pairing port")
    j.add_argument("--code", required=True, help="the pairing code it showed")
    j.add_argument("--name", help="this gateway's name there (default: aico-gateway HOSTNAME)")
    j.add_argument("--timeout", type=float, default=30.0, help="seconds to give up after (30)")
    add_state_options(j)
    j.set_defaults(handler=_cmd_sync_join)


def _cmd_sync_join(args: argparse.Namespace, ctx: Context) -> int:
    import json
    import socket

    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    from aico.gateway.devices.ca import DeviceCA
    from aico.sync.join import JoinFailed, join

    if not 0 < args.port < 65536:
        raise _Exit(EXIT_USAGE, "--port: expected 1-65535")
    paths, config = state_paths(args, ctx.env)
    try:
        paths = bootstrap(paths.root, config.modules.builtin, env=ctx.env).paths
        ca = DeviceCA.load(paths.ca_cert, paths.ca_key, paths.sealer)
    except (StateDirError, SchemaError, ValueError, OSError) as e:
        raise _Exit(EXIT_FAILURE, f"cannot open the state directory {paths.root}: {e}") from e
    sync_address: dict[str, Any] | None = None
    if config.sync.enabled:
        sync_address = {"host": config.sync.host, "port": config.sync.port}
        try:  # a running gateway: the port it really listens on
            running = json.loads(paths.ports_json.read_text(encoding="utf-8")).get("sync")
            if isinstance(running, dict):
                sync_address = {"host": config.sync.host, "port": running.get("port")}
        except (OSError, ValueError):
            pass
    name = (args.name or f"aico-gateway {socket.gethostname()}")[:64]
    outcome: list[Any] = []
    with _open_registry(paths) as db:
        def go() -> None:
            d = Deferred.fromCoroutine(join(
                reactor, ca=ca, keystore=paths.sealer, db=db, host=args.host, port=args.port,
                code=args.code, name=name, node_id=ca.fingerprint, sync_address=sync_address,
                timeout=args.timeout))
            d.addBoth(outcome.append)
            d.addBoth(lambda _: reactor.stop())

        reactor.callWhenRunning(go)
        reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]
        result = outcome[0] if outcome else None
        if result is None or hasattr(result, "value"):
            error = getattr(result, "value", None)
            reason = error.reason if isinstance(error, JoinFailed) else str(error)
            raise _Exit(EXIT_FAILURE, f"sync join failed: {reason}")
        _audit_cli(db, paths, "sync_peer_added", {"peer_id": result.peer_id,
                                                  "name": result.name, "host": result.host,
                                                  "port": result.port})
    print(f"joined {result.name} ({result.peer_id})\n"
          f"its sync listener: {result.host}:{result.port or '(none: it dials this gateway)'}\n"
          f"this gateway there: {result.our_device_id}", file=ctx.out)
    return EXIT_OK


# --------------------------------------------------------------------------- backup


def _add_backup(subparsers: _Subparsers) -> None:
    p = subparsers.add_parser(
        "backup",
        help="copy the state directory into DIR (consistent while the gateway runs)",
        description="Copy the state directory into DIR, which must be new or empty: the "
        "registry with SQLite's online backup, every key file as it is (sealed), and "
        "backup-manifest.json with SHA-256 checksums. master-key is included only when "
        "the master secret lives in that file. See docs/state.md.",
    )
    p.add_argument("target", metavar="DIR")
    add_state_options(p)
    p.set_defaults(handler=_cmd_backup)
    r = subparsers.add_parser(
        "restore",
        help="restore a backup DIR into the state directory, then verify it",
        description="Check DIR against its manifest, copy it into the state directory "
        "(which must be new or empty unless --force; stop the gateway first) and verify "
        "the copy: checksums, the registry's integrity and its audit chain.",
    )
    r.add_argument("source", metavar="DIR")
    r.add_argument("--force", action="store_true",
                   help="restore into a non-empty state directory, replacing its files")
    add_state_options(r)
    r.set_defaults(handler=_cmd_restore)


def _cmd_backup(args: argparse.Namespace, ctx: Context) -> int:
    from pathlib import Path

    from aico.gateway.backup import BackupError, backup

    paths, _ = state_paths(args, ctx.env)
    try:
        report = backup(paths.root, Path(args.target).absolute(), version=_gateway_version())
    except BackupError as e:
        raise _Exit(EXIT_FAILURE, str(e)) from e
    except OSError as e:
        raise _Exit(EXIT_FAILURE, f"{e.filename or args.target}: {e.strerror}") from e
    print(f"backup of {paths.root} in {report.target}: {len(report.files)} files, "
          "manifest backup-manifest.json", file=ctx.out)
    if report.master_key_included:
        print("  it holds master-key, the secret that opens its keys: keep it encrypted "
              "and as private as the state directory", file=ctx.out)
    else:
        print("  the master secret (platform keyring or AICO_MASTER_PASSWORD) is not in it: "
              "keep it apart, a restore needs it", file=ctx.out)
    return EXIT_OK


def _cmd_restore(args: argparse.Namespace, ctx: Context) -> int:
    from pathlib import Path

    from aico.gateway.backup import BackupError, restore

    paths, _ = state_paths(args, ctx.env)
    try:
        report = restore(Path(args.source).absolute(), paths.root, force=args.force)
    except BackupError as e:
        raise _Exit(EXIT_FAILURE, str(e)) from e
    except OSError as e:
        raise _Exit(EXIT_FAILURE, f"{e.filename or args.source}: {e.strerror}") from e
    print(f"restored {len(report.files)} files into {report.target}; verified: checksums, "
          f"registry integrity, audit chain ({report.audit_entries} entries)", file=ctx.out)
    for note in report.notes:
        print(f"  note: {note}", file=ctx.out)
    return EXIT_OK


def _gateway_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aico-gateway")
    except PackageNotFoundError:
        return "0+unknown"


# --------------------------------------------------------------------------- main

#: Every subcommand's registration function, in ``--help`` order.
_COMMANDS: tuple[Callable[[_Subparsers], None], ...] = (
    _add_init, _add_config, _add_user, _add_keys, _add_pair, _add_devices, _add_sync,
    _add_backup)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aico-gateway",
        description="Operate an aico-gateway: state directory, users, devices, config.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in _COMMANDS:
        register(subparsers)
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Run the CLI with *argv* (default ``sys.argv[1:]``); returns the exit status.

    *stdout*, *stderr* and *environ* default to the process's own.
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    env = environ if environ is not None else os.environ
    parser = build_parser()
    try:
        # argparse writes --help and usage errors to sys.stdout/sys.stderr itself.
        with redirect_stdout(out), redirect_stderr(err):
            args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed by argparse
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(err)
        return EXIT_USAGE
    try:
        return handler(args, Context(out, err, env))
    except _Exit as e:
        print(f"aico-gateway: {e.message}", file=err)
        return e.status


if __name__ == "__main__":
    sys.exit(main())
