"""The WebSocket session's state machine, transition by transition (no sockets, no reactor).

The machine (``aico.gateway.adapters.websocket.SessionMachine``) declares the states of
docs/protocols.md §1.3: connecting → anonymous → authenticated ⇄ auth_lost → closed.
Events it does not declare for a state are *refused* with ``automat.NoTransition`` and
leave the state as it was; once closed, the late events a closing socket can still meet
(``token_accepted``, ``token_ended``, ``closed``) are *ignored* and answered ``False``.
"""

from __future__ import annotations

from automat import NoTransition
from twisted.trial.unittest import SynchronousTestCase

from aico.gateway.adapters.websocket import SessionInputs, WebSocketSession, session_machine
from aico.gateway.errors import TokenExpired

STATES = ("connecting", "anonymous", "authenticated", "auth_lost", "closed")
EVENTS = ("opened", "token_accepted", "token_ended", "closed")

#: Events that lead from a new machine to each state.
PATHS: dict[str, tuple[str, ...]] = {
    "connecting": (),
    "anonymous": ("opened",),
    "authenticated": ("opened", "token_accepted"),
    "auth_lost": ("opened", "token_accepted", "token_ended"),
    "closed": ("opened", "closed"),
}

#: (state, event) → (what the event returns, the state after it). Anything not listed
#: is refused with NoTransition.
TRANSITIONS: dict[tuple[str, str], tuple[object, str]] = {
    ("connecting", "opened"): (None, "anonymous"),
    ("connecting", "closed"): (False, "closed"),
    ("anonymous", "token_accepted"): (True, "authenticated"),
    ("anonymous", "closed"): (True, "closed"),
    ("authenticated", "token_accepted"): (True, "authenticated"),
    ("authenticated", "token_ended"): (True, "auth_lost"),
    ("authenticated", "closed"): (True, "closed"),
    ("auth_lost", "token_accepted"): (True, "authenticated"),
    ("auth_lost", "closed"): (True, "closed"),
    ("closed", "token_accepted"): (False, "closed"),
    ("closed", "token_ended"): (False, "closed"),
    ("closed", "closed"): (False, "closed"),
}

#: state → (may_handle_frames, is_closed, auth_timer_applies)
ANSWERS = {
    "connecting": (False, False, False),
    "anonymous": (True, False, True),
    "authenticated": (True, False, False),
    "auth_lost": (True, False, True),
    "closed": (False, True, False),
}


def machine_in(state: str) -> SessionInputs:
    m = session_machine()
    for event in PATHS[state]:
        getattr(m, event)()
    assert m.state_name() == state, (state, m.state_name())
    return m


class InitialStateTests(SynchronousTestCase):
    def test_a_new_machine_is_connecting(self) -> None:
        self.assertEqual(session_machine().state_name(), "connecting")

    def test_machines_are_independent(self) -> None:
        a, b = session_machine(), session_machine()
        a.opened()
        self.assertEqual((a.state_name(), b.state_name()), ("anonymous", "connecting"))


class LegalTransitionTests(SynchronousTestCase):
    """Each transition of docs/protocols.md §1.3, one at a time."""

    def test_opened_connecting_to_anonymous(self) -> None:
        m = machine_in("connecting")
        self.assertIsNone(m.opened())
        self.assertEqual(m.state_name(), "anonymous")

    def test_token_accepted_anonymous_to_authenticated(self) -> None:
        m = machine_in("anonymous")
        self.assertIs(m.token_accepted(), True)
        self.assertEqual(m.state_name(), "authenticated")

    def test_token_accepted_again_stays_authenticated(self) -> None:
        m = machine_in("authenticated")
        self.assertIs(m.token_accepted(), True)
        self.assertEqual(m.state_name(), "authenticated")

    def test_token_ended_authenticated_to_auth_lost(self) -> None:
        m = machine_in("authenticated")
        self.assertIs(m.token_ended(), True)
        self.assertEqual(m.state_name(), "auth_lost")

    def test_token_accepted_auth_lost_to_authenticated(self) -> None:
        m = machine_in("auth_lost")
        self.assertIs(m.token_accepted(), True)
        self.assertEqual(m.state_name(), "authenticated")

    def test_closed_before_opening_says_it_never_opened(self) -> None:
        m = machine_in("connecting")
        self.assertIs(m.closed(), False)
        self.assertEqual(m.state_name(), "closed")

    def test_closed_from_each_open_state_says_it_was_open(self) -> None:
        for state in ("anonymous", "authenticated", "auth_lost"):
            m = machine_in(state)
            self.assertIs(m.closed(), True, state)
            self.assertEqual(m.state_name(), "closed", state)

    def test_a_whole_session(self) -> None:
        m = session_machine()
        seen = [m.state_name()]
        m.opened()
        seen.append(m.state_name())
        for event in ("token_accepted", "token_ended", "token_accepted", "closed"):
            getattr(m, event)()
            seen.append(m.state_name())
        self.assertEqual(seen, ["connecting", "anonymous", "authenticated", "auth_lost",
                                "authenticated", "closed"])


class ClosedIsFinalTests(SynchronousTestCase):
    """Late news for a closed session is ignored (answered False), never acted on."""

    def test_token_accepted_after_closed_is_ignored(self) -> None:
        m = machine_in("closed")
        self.assertIs(m.token_accepted(), False)
        self.assertEqual(m.state_name(), "closed")

    def test_token_ended_after_closed_is_ignored(self) -> None:
        m = machine_in("closed")
        self.assertIs(m.token_ended(), False)
        self.assertEqual(m.state_name(), "closed")

    def test_closed_twice_is_ignored(self) -> None:
        m = machine_in("closed")
        self.assertIs(m.closed(), False)
        self.assertEqual(m.state_name(), "closed")

    def test_opened_after_closed_is_refused(self) -> None:
        m = machine_in("closed")
        self.assertRaises(NoTransition, m.opened)
        self.assertEqual(m.state_name(), "closed")


class RefusedTransitionTests(SynchronousTestCase):
    """Events a state does not declare raise NoTransition and change nothing."""

    def test_opened_twice_is_refused(self) -> None:
        m = machine_in("anonymous")
        self.assertRaises(NoTransition, m.opened)
        self.assertEqual(m.state_name(), "anonymous")

    def test_token_accepted_before_opening_is_refused(self) -> None:
        m = machine_in("connecting")
        self.assertRaises(NoTransition, m.token_accepted)
        self.assertEqual(m.state_name(), "connecting")

    def test_token_ended_without_a_token_is_refused(self) -> None:
        for state in ("connecting", "anonymous", "auth_lost"):
            m = machine_in(state)
            self.assertRaises(NoTransition, m.token_ended)
            self.assertEqual(m.state_name(), state)

    def test_the_whole_table(self) -> None:
        """Every (state, event) pair: the declared ones as in TRANSITIONS, the rest refused."""
        for state in STATES:
            for event in EVENTS:
                m = machine_in(state)
                expected = TRANSITIONS.get((state, event))
                if expected is None:
                    with self.assertRaises(NoTransition, msg=(state, event)):
                        getattr(m, event)()
                    self.assertEqual(m.state_name(), state, (state, event))
                else:
                    result, after = expected
                    self.assertEqual(getattr(m, event)(), result, (state, event))
                    self.assertEqual(m.state_name(), after, (state, event))


class QuestionTests(SynchronousTestCase):
    """Every state answers every question, and asking never changes the state."""

    def test_answers(self) -> None:
        for state, (frames, closed, auth_timer) in ANSWERS.items():
            m = machine_in(state)
            self.assertEqual(
                (m.may_handle_frames(), m.is_closed(), m.auth_timer_applies()),
                (frames, closed, auth_timer), state)
            self.assertEqual(m.state_name(), state)


class SessionUsesTheMachineTests(SynchronousTestCase):
    """WebSocketSession reports the machine's state (no socket, no factory needed)."""

    def test_a_new_session_is_connecting(self) -> None:
        session = WebSocketSession()
        self.assertEqual(session.session_state, "connecting")
        self.assertFalse(session._machine.may_handle_frames())

    def test_closing_a_session_that_never_opened(self) -> None:
        session = WebSocketSession()
        session._closed()  # never opened: the connection manager is not told
        self.assertEqual(session.session_state, "closed")
        session._closed()
        self.assertEqual(session.session_state, "closed")

    def test_a_closed_session_ignores_the_end_of_its_token(self) -> None:
        session = WebSocketSession()
        session._closed()
        session.auth_ended(TokenExpired("expired"))
        self.assertEqual((session.session_state, session.lost), ("closed", None))

    def test_session_state_is_read_only(self) -> None:
        session = WebSocketSession()
        with self.assertRaises(AttributeError):
            session.session_state = "authenticated"  # type: ignore[misc]
