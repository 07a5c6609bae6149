"""Conflict-free replicated data types as plain JSON, and the three strategies built on them.

Every state here is a JSON-able ``dict`` (it travels in :class:`~aico.sync.interfaces.
ItemState` and is stored as text); every merge is commutative, associative and
idempotent (``tests/test_sync_crdt.py`` checks it with hypothesis), so replicas that
have seen the same writes hold the same state whatever order they saw them in.
Timestamps are HLC text (:mod:`aico.sync.hlc`); the text names its node, so a timestamp
is also a unique *dot* (the event's identity).

The building blocks:

* **LWW register** ``{"hlc", "value"}``: the greater timestamp wins (never a tie: node
  names differ).
* **Multi-value register** ``{"versions": {hlc: version}, "ctx": {node: hlc}}``: each
  version is a concurrent write; *ctx* (a version vector) says which writes of each node
  this state has seen. A write replaces every version it saw; a merge keeps a version
  unless the other side has seen it and dropped it (the causal context does what a
  ``replaces`` set would, without keeping every replaced id forever).
* **OR-set** ``{"elems": {canonical: {"value", "tags"}}, "ctx"}``: add-wins; each add
  is tagged with its timestamp, a remove drops the tags it saw; a concurrent add keeps
  the element.
* **PN counter** ``{"p": {node: "decimal"}, "n": {node: "decimal"}}``: per-node totals of
  increments and decrements, merged by maximum (decimals as text: exact, so
  ``0.1 + 0.2`` reads back ``0.3``).

The strategies (``[sync.collections.NAME] strategy``, docs/sync.md) are item states with
``"s"`` naming the strategy and ``"hlc"`` the greatest timestamp in them:

* ``lww``: a multi-value register read as last-writer-wins; concurrent losers stay in
  ``overwritten`` (newest :data:`OVERWRITTEN_MAX` kept), so no write vanishes silently.
* ``keep-both``: the multi-value register itself; more than one version is a conflict,
  and a write (a client's resolution) replaces every version it saw.
* ``merge``: a JSON object merged field by field: numbers are PN counters (a write's
  difference to the current value is this node's increment), arrays OR-sets (order:
  first added first), other values LWW registers; whether a field exists, and whether
  the item exists, are LWW registers too.

:func:`write`, :func:`merge` and :func:`view` are all the engine uses; :func:`check`
validates a state that came from a peer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from aico.sync.hlc import ClockError, Timestamp, node_of

__all__ = ["DELETE", "OVERWRITTEN_MAX", "STRATEGIES", "StateError", "View", "check",
           "max_hlc", "merge", "view", "write"]

STRATEGIES: Final = ("lww", "merge", "keep-both")
#: How many overwritten (losing) versions an ``lww`` item keeps, newest first.
OVERWRITTEN_MAX = 8


class _Delete:
    def __repr__(self) -> str:
        return "DELETE"


#: Pass as the new value to :func:`write` for a delete (a tombstone).
DELETE: Final = _Delete()


class StateError(ValueError):
    """A state (or a value) that does not fit its strategy."""


def canonical_text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _covered(ts: str, ctx: Mapping[str, str]) -> bool:
    """Whether the state whose causal context is *ctx* has seen event *ts*."""
    return ctx.get(node_of(ts), "") >= ts


def _ctx_merge(a: Mapping[str, str], b: Mapping[str, str]) -> dict[str, str]:
    out = dict(a)
    for node, ts in b.items():
        if ts > out.get(node, ""):
            out[node] = ts
    return out


def _ctx_add(ctx: Mapping[str, str], ts: str) -> dict[str, str]:
    return _ctx_merge(ctx, {node_of(ts): ts})


# ------------------------------------------------------------------ LWW register

def lww_new(value: Any, ts: str) -> dict[str, Any]:
    return {"hlc": ts, "value": value}


def lww_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return a if a["hlc"] >= b["hlc"] else b


# ------------------------------------------------------------------ multi-value register

def _version(value: Any) -> dict[str, Any]:
    return {"deleted": True} if value is DELETE else {"value": value}


def mv_new() -> dict[str, Any]:
    return {"versions": {}, "ctx": {}}


def mv_write(state: Mapping[str, Any], value: Any, ts: str) -> dict[str, Any]:
    """*value* (or :data:`DELETE`) written at *ts* by a node that saw *state*: it
    replaces every version of *state*."""
    return {"versions": {ts: _version(value)}, "ctx": _ctx_add(state["ctx"], ts)}


def mv_merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    va, vb = a["versions"], b["versions"]
    versions = {}
    for ts, v in va.items():
        if ts in vb or not _covered(ts, b["ctx"]):
            versions[ts] = v
    for ts, v in vb.items():
        if ts not in va and not _covered(ts, a["ctx"]):
            versions[ts] = v
    return {"versions": versions, "ctx": _ctx_merge(a["ctx"], b["ctx"])}


# ------------------------------------------------------------------ OR-set

def orset_new() -> dict[str, Any]:
    return {"elems": {}, "ctx": {}}


def orset_add(state: Mapping[str, Any], value: Any, ts: str) -> dict[str, Any]:
    elems = dict(state["elems"])
    key = canonical_text(value)
    old = elems.get(key)
    tags = sorted({*(old["tags"] if old else ()), ts})
    elems[key] = {"value": value, "tags": tags}
    return {"elems": elems, "ctx": _ctx_add(state["ctx"], ts)}


def orset_remove(state: Mapping[str, Any], value: Any) -> dict[str, Any]:
    """Remove *value*: the tags this state has seen go (an add elsewhere that this state
    has not seen keeps the element: add wins)."""
    elems = dict(state["elems"])
    elems.pop(canonical_text(value), None)
    return {"elems": elems, "ctx": dict(state["ctx"])}


def orset_merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    ea, eb = a["elems"], b["elems"]
    elems: dict[str, Any] = {}
    for key in {*ea, *eb}:
        ta = set(ea[key]["tags"]) if key in ea else set()
        tb = set(eb[key]["tags"]) if key in eb else set()
        tags = (ta & tb) | {t for t in ta - tb if not _covered(t, b["ctx"])} \
            | {t for t in tb - ta if not _covered(t, a["ctx"])}
        if tags:
            value = (ea.get(key) or eb[key])["value"]
            elems[key] = {"value": value, "tags": sorted(tags)}
    return {"elems": elems, "ctx": _ctx_merge(a["ctx"], b["ctx"])}


def orset_values(state: Mapping[str, Any]) -> list[Any]:
    """The elements, first added first (ties by their canonical text)."""
    items = sorted(state["elems"].items(), key=lambda kv: (kv[1]["tags"][0], kv[0]))
    return [e["value"] for _, e in items]


# ------------------------------------------------------------------ PN counter

def pn_new() -> dict[str, Any]:
    return {"p": {}, "n": {}}


def _dec(text: str) -> Decimal:
    return Decimal(text)


def pn_add(state: Mapping[str, Any], node: str, amount: Decimal) -> dict[str, Any]:
    """*node* adds *amount* (negative: subtracts)."""
    out = {"p": dict(state["p"]), "n": dict(state["n"])}
    if amount == 0:
        return out
    side = "p" if amount > 0 else "n"
    out[side][node] = str(_dec(out[side].get(node, "0")) + abs(amount))
    return out


def _max_map(a: Mapping[str, str], b: Mapping[str, str]) -> dict[str, str]:
    out = dict(a)
    for node, v in b.items():
        if node not in out or (_dec(v), v) > (_dec(out[node]), out[node]):
            out[node] = v
    return out


def pn_merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    return {"p": _max_map(a["p"], b["p"]), "n": _max_map(a["n"], b["n"])}


def pn_value(state: Mapping[str, Any]) -> Decimal:
    total = Decimal(0)
    for node in sorted(state["p"]):
        total += _dec(state["p"][node])
    for node in sorted(state["n"]):
        total -= _dec(state["n"][node])
    return total


def _number(d: Decimal) -> int | float:
    return int(d) if d == d.to_integral_value() else float(d)


def _as_decimal(value: Any) -> Decimal | None:
    """*value* as a counter's decimal, or ``None`` when it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        d = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


# ------------------------------------------------------------------ strategies


@dataclass(frozen=True)
class View:
    """What a client sees of an item."""

    deleted: bool
    hlc: str
    value: Any = None
    #: keep-both: every concurrent version while there is more than one (each
    #: ``{"value", "hlc", "origin"}``, or ``{"deleted": true, …}`` for a concurrent delete).
    versions: list[dict[str, Any]] | None = None
    #: lww: the versions that lost, newest first (at most :data:`OVERWRITTEN_MAX`).
    overwritten: list[dict[str, Any]] = field(default_factory=list)

    @property
    def conflict(self) -> bool:
        return self.versions is not None


def _entry(ts: str, version: Mapping[str, Any]) -> dict[str, Any]:
    if version.get("deleted"):
        return {"value": None, "hlc": ts, "origin": node_of(ts), "deleted": True}
    return {"value": version["value"], "hlc": ts, "origin": node_of(ts)}


def _top_overwritten(entries: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    by_ts = {e["hlc"]: dict(e) for e in entries}
    return [by_ts[ts] for ts in sorted(by_ts, reverse=True)[:OVERWRITTEN_MAX]]


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise StateError(f"unknown strategy {strategy!r} (expected one of {', '.join(STRATEGIES)})")


def write(strategy: str, current: Mapping[str, Any] | None, new: Any, ts: str) -> dict[str, Any]:
    """The state after a local write of *new* (a JSON value, or :data:`DELETE`) at *ts*
    by a node holding *current* (``None``: no state yet). A state of another strategy is
    started over."""
    _check_strategy(strategy)
    if current is not None and current.get("s") != strategy:
        current = None
    if strategy == "merge":
        return _merge_write(current, new, ts)
    mv = current if current is not None else mv_new()
    hlc = max(ts, str(mv.get("hlc", "")))
    out: dict[str, Any] = {"s": strategy, "hlc": hlc, **mv_write(mv, new, ts)}
    if strategy == "lww":
        old = current or {}
        versions = old.get("versions", {})
        winner = max(versions) if versions else None
        # Versions this write replaced without the client having seen them (it saw
        # only the winner) are kept as overwritten.
        losers = [_entry(t, v) for t, v in versions.items() if t != winner]
        out["overwritten"] = _top_overwritten([*old.get("overwritten", []), *losers])
    return out


def merge(strategy: str, a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """The merge of two states of one item (commutative, associative, idempotent)."""
    _check_strategy(strategy)
    if a.get("s") != b.get("s"):
        # A collection whose strategy changed: the newer state wins whole.
        newer = a if (str(a.get("hlc", "")), str(a.get("s"))) > (str(b.get("hlc", "")),
                                                                  str(b.get("s"))) else b
        return dict(newer)
    strategy = str(a.get("s"))
    hlc = max(a["hlc"], b["hlc"])
    if strategy == "merge":
        return _merge_merge(a, b)
    out: dict[str, Any] = {"s": strategy, "hlc": hlc, **mv_merge(a, b)}
    if strategy == "lww":
        out["overwritten"] = _top_overwritten([*a["overwritten"], *b["overwritten"]])
    return out


def view(state: Mapping[str, Any]) -> View:
    """What a client sees of *state*."""
    strategy = state.get("s")
    hlc = state["hlc"]
    if strategy == "merge":
        return _merge_view(state)
    versions = state["versions"]
    if strategy == "lww":
        winner = max(versions)
        losers = [_entry(t, v) for t, v in versions.items() if t != winner]
        overwritten = _top_overwritten([*state["overwritten"], *losers])
        top = versions[winner]
        if top.get("deleted"):
            return View(deleted=True, hlc=winner, overwritten=overwritten)
        return View(deleted=False, hlc=winner, value=top["value"], overwritten=overwritten)
    # keep-both
    if len(versions) == 1:
        (ts, top), = versions.items()
        if top.get("deleted"):
            return View(deleted=True, hlc=ts)
        return View(deleted=False, hlc=ts, value=top["value"])
    entries = [_entry(t, versions[t]) for t in sorted(versions)]
    return View(deleted=False, hlc=hlc, versions=entries)


def max_hlc(state: Mapping[str, Any]) -> str:
    """The greatest timestamp in *state*."""
    return str(state["hlc"])


def is_deleted(state: Mapping[str, Any]) -> bool:
    return view(state).deleted


# ------------------------------------------------------------------ the merge strategy
# state: {"s": "merge", "hlc", "alive": LWW(bool), "fields": {name: field}}
# field: {"kind": LWW("counter" | "set" | "value" | "absent"),
#         "counter"?: PN counter, "set"?: OR-set, "value"?: LWW}

def _kind_of(value: Any) -> str:
    if _as_decimal(value) is not None:
        return "counter"
    if isinstance(value, list):
        return "set"
    return "value"


def _field_view(f: Mapping[str, Any]) -> tuple[bool, Any]:
    kind = f["kind"]["value"]
    if kind == "counter":
        return True, _number(pn_value(f["counter"]))
    if kind == "set":
        return True, orset_values(f["set"])
    if kind == "value":
        return True, f["value"]["value"]
    return False, None


def _merge_write(current: Mapping[str, Any] | None, new: Any, ts: str) -> dict[str, Any]:
    node = node_of(ts)
    fields: dict[str, Any] = dict(current["fields"]) if current else {}
    hlc = max(ts, str(current["hlc"])) if current else ts
    if new is DELETE:
        return {"s": "merge", "hlc": hlc, "alive": lww_new(False, ts), "fields": fields}
    if not isinstance(new, dict):
        raise StateError("this collection's strategy is merge: the value must be a JSON "
                         "object (its fields are merged one by one)")
    for name, value in new.items():
        old = fields.get(name)
        f: dict[str, Any] = dict(old) if old else {"kind": lww_new("absent", "")}
        kind = _kind_of(value)
        changed = f["kind"]["value"] != kind
        if kind == "counter":
            counter = f.get("counter") or pn_new()
            delta = _as_decimal(value)
            assert delta is not None
            delta -= pn_value(counter)
            if delta:
                f["counter"] = pn_add(counter, node, delta)
                changed = True
            else:
                f["counter"] = counter
        elif kind == "set":
            s = f.get("set") or orset_new()
            want = {canonical_text(v): v for v in value}
            have = {canonical_text(v): v for v in orset_values(s)}
            for key in have.keys() - want.keys():
                s = orset_remove(s, have[key])
                changed = True
            for key in want.keys() - have.keys():
                s = orset_add(s, want[key], ts)
                changed = True
            f["set"] = s
        elif changed or canonical_text(f["value"]["value"]) != canonical_text(value):
            f["value"] = lww_new(value, ts)
            changed = True
        if changed:
            f["kind"] = lww_new(kind, ts)
        fields[name] = f
    for name, f in list(fields.items()):
        if name not in new and f["kind"]["value"] != "absent":
            fields[name] = {**f, "kind": lww_new("absent", ts)}
    return {"s": "merge", "hlc": hlc, "alive": lww_new(True, ts), "fields": fields}


_SLOTS = {"counter": pn_merge, "set": orset_merge, "value": lww_merge}


def _merge_merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    fa, fb = a["fields"], b["fields"]
    fields: dict[str, Any] = {}
    for name in {*fa, *fb}:
        if name not in fa or name not in fb:
            fields[name] = dict(fa.get(name) or fb[name])
            continue
        x, y = fa[name], fb[name]
        f = {"kind": lww_merge(x["kind"], y["kind"])}
        for slot, fn in _SLOTS.items():
            if slot in x and slot in y:
                f[slot] = fn(x[slot], y[slot])
            elif slot in x or slot in y:
                f[slot] = x.get(slot) or y[slot]
        fields[name] = f
    return {"s": "merge", "hlc": max(a["hlc"], b["hlc"]),
            "alive": lww_merge(a["alive"], b["alive"]), "fields": fields}


def _merge_view(state: Mapping[str, Any]) -> View:
    if not state["alive"]["value"]:
        return View(deleted=True, hlc=state["hlc"])
    value = {}
    for name in sorted(state["fields"]):
        present, v = _field_view(state["fields"][name])
        if present:
            value[name] = v
    return View(deleted=False, hlc=state["hlc"], value=value)


# ------------------------------------------------------------------ checking peers' states

def _ts(value: Any, where: str) -> str:
    try:
        Timestamp.parse(value)
    except ClockError as e:
        raise StateError(f"{where}: {e}") from None
    return str(value)


def _map(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise StateError(f"{where}: expected an object")
    return value


def _check_ctx(ctx: Any, where: str) -> None:
    for node, ts in _map(ctx, where).items():
        if node_of(_ts(ts, where)) != node:
            raise StateError(f"{where}: {ts!r} is not a timestamp of {node!r}")


def _check_versions(versions: Any, where: str) -> None:
    for ts, v in _map(versions, where).items():
        _ts(ts, where)
        v = _map(v, f"{where}[{ts}]")
        if not (v.get("deleted") is True or "value" in v):
            raise StateError(f"{where}[{ts}]: a version has a value or is deleted")


def _check_lww(reg: Any, where: str, empty_ok: bool = False) -> None:
    reg = _map(reg, where)
    if "value" not in reg:
        raise StateError(f"{where}: a register has a value")
    if not (empty_ok and reg.get("hlc") == ""):
        _ts(reg.get("hlc"), where)


def check(state: Any) -> None:
    """Raise :class:`StateError` unless *state* has the shape of a strategy's state (a
    state from a peer is checked before it is merged or stored)."""
    state = _map(state, "state")
    strategy = state.get("s")
    _check_strategy(str(strategy))
    _ts(state.get("hlc"), "state.hlc")
    try:
        if strategy == "merge":
            _check_lww(state["alive"], "state.alive")
            for name, f in _map(state["fields"], "state.fields").items():
                f = _map(f, f"fields.{name}")
                _check_lww(f["kind"], f"fields.{name}.kind", empty_ok=True)
                if f["kind"]["value"] not in ("counter", "set", "value", "absent"):
                    raise StateError(f"fields.{name}.kind: unknown kind")
                if "counter" in f:
                    for side in ("p", "n"):
                        for v in _map(f["counter"][side], f"fields.{name}.counter").values():
                            if not isinstance(v, str) or not Decimal(v).is_finite():
                                raise StateError(f"fields.{name}.counter: {v!r} is not a number")
                if "set" in f:
                    _check_ctx(f["set"]["ctx"], f"fields.{name}.set.ctx")
                    for key, e in _map(f["set"]["elems"], f"fields.{name}.set").items():
                        if not e["tags"] or key != canonical_text(e["value"]):
                            raise StateError(f"fields.{name}.set: malformed element")
                        for t in e["tags"]:
                            _ts(t, f"fields.{name}.set")
                if "value" in f:
                    _check_lww(f["value"], f"fields.{name}.value")
                if f["kind"]["value"] != "absent" and f["kind"]["value"] not in f:
                    raise StateError(f"fields.{name}: no {f['kind']['value']} for its kind")
            return
        _check_versions(state["versions"], "state.versions")
        if not state["versions"]:
            raise StateError("state.versions: empty")
        _check_ctx(state["ctx"], "state.ctx")
        if strategy == "lww":
            if not isinstance(state["overwritten"], list):
                raise StateError("state.overwritten: expected a list")
            for e in state["overwritten"]:
                _ts(_map(e, "state.overwritten")["hlc"], "state.overwritten")
    except (KeyError, TypeError, AttributeError, InvalidOperation, IndexError) as e:
        raise StateError(f"malformed {strategy} state ({type(e).__name__}: {e})") from None
