"""Single sign-on at hand-over (``SessionStarter``), against a scripted guest agent."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from deskpool.broker.desktop_session import (
    SESSION_HOOK,
    SessionDidNotStart,
    SessionStarter,
    parse_status,
)
from deskpool.config import Settings
from deskpool.domain.accounts import FIRST_UID, AccountRefused
from deskpool.domain.errors import AgentUnavailable, DriverError, Unavailable
from deskpool.domain.users import Identity
from deskpool.drivers.agent import GuestAgent
from deskpool.services.context import ServiceContext


class ScriptedAgent:
    """Answers ``session-hook`` calls from a script of (exit code, stdout) per subcommand."""

    def __init__(self, *, hook: bool | None = True, start: tuple[int, str] = (0, "starting"),
                 checks: list[int] | None = None, wait: int = 2) -> None:
        self.hook = hook
        self.start = start
        self.checks = list(checks or [0])
        self.wait = wait  # 2: usage, a hook from before ``wait`` (the broker polls check)
        self.calls: list[list[str]] = []
        self.timeouts: list[float] = []

    def read_file(self, path: str, *, max_bytes: int = 0) -> bytes:
        assert path == SESSION_HOOK
        if self.hook is None:
            raise AgentUnavailable("silent")
        if not self.hook:
            raise DriverError("No such file or directory")
        return b"#!/bin/sh\n"

    def exec_capture(self, argv: list[str], timeout_s: float = 30.0) -> tuple[int, str, str]:
        self.calls.append(argv)
        self.timeouts.append(timeout_s)
        assert argv[:2] == ["/bin/sh", SESSION_HOOK]
        if argv[2] == "start":
            return self.start[0], self.start[1], "boom" if self.start[0] else ""
        if argv[2] == "wait":
            if self.wait == -1:
                raise DriverError("sh in VM did not finish")
            return self.wait, "", "usage" if self.wait == 2 else ""
        code = self.checks.pop(0) if len(self.checks) > 1 else self.checks[0]
        if code == -1:
            raise AgentUnavailable("busy")
        return code, "", ""


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[ServiceContext]:
    c = ServiceContext(Settings(data_dir=tmp_path / "data"))
    yield c
    c.close()


def starter(ctx: ServiceContext, **kw: Any) -> SessionStarter:
    return SessionStarter(ctx, poll_s=1.0, clock=lambda: 0.0, sleep=lambda _s: None, **kw)


def who(name: str) -> Identity:
    return Identity(name=name, display_name=f"{name.title()} Example", source="local")


def agent(a: ScriptedAgent) -> GuestAgent:
    return cast(GuestAgent, a)


def test_the_hook_is_looked_for_once_per_version(ctx: ServiceContext) -> None:
    s, version = starter(ctx), uuid.uuid4()
    assert s.has_hook(agent(ScriptedAgent(hook=True)), version)
    assert s.has_hook(agent(ScriptedAgent(hook=False)), version)  # kept, not asked again
    assert not s.has_hook(agent(ScriptedAgent(hook=False)), uuid.uuid4())
    with pytest.raises(AgentUnavailable):  # silence is no answer
        s.has_hook(agent(ScriptedAgent(hook=None)), uuid.uuid4())


def test_accounts_get_stable_uids(ctx: ServiceContext) -> None:
    s = starter(ctx)
    assert s.account_for(who("Alice@corp.example")) == ("alice", FIRST_UID)
    assert s.account_for(who("bob")) == ("bob", FIRST_UID + 1)
    assert s.account_for(who("Alice@corp.example")) == ("alice", FIRST_UID)
    with pytest.raises(AccountRefused, match=r"already user 'Alice@corp\.example'"):
        s.account_for(who("CORP\\alice"))
    with pytest.raises(AccountRefused, match="system account"):
        s.account_for(who("root"))


def test_sign_in_starts_the_session_and_waits_for_it(ctx: ServiceContext) -> None:
    a = ScriptedAgent(checks=[1, -1, 0])  # -1: the busy guest's agent answers late
    starter(ctx).sign_in(agent(a), who("alice"), "alice", FIRST_UID)
    assert a.calls[0] == ["/bin/sh", SESSION_HOOK, "start", "alice", str(FIRST_UID),
                          "Alice Example"]
    assert [c[2] for c in a.calls] == ["start", "wait", "check", "check", "check"]


def test_the_guest_waits_for_the_session_itself(ctx: ServiceContext) -> None:
    a = ScriptedAgent(wait=0)
    starter(ctx).sign_in(agent(a), who("alice"), "alice", FIRST_UID, timeout_s=40)
    assert [c[2:] for c in a.calls[1:]] == [["wait", "alice", "40"]]
    assert a.timeouts[1] > 40  # the agent waits a little longer than the guest does


def test_a_session_the_guest_gave_up_on_did_not_start(ctx: ServiceContext) -> None:
    with pytest.raises(SessionDidNotStart, match="did not start within 7 s"):
        starter(ctx).sign_in(agent(ScriptedAgent(wait=1)), who("alice"), "alice", FIRST_UID,
                             timeout_s=7)


def test_a_silent_wait_falls_back_to_polling(ctx: ServiceContext) -> None:
    a = ScriptedAgent(wait=-1, checks=[0])
    starter(ctx).sign_in(agent(a), who("alice"), "alice", FIRST_UID)
    assert [c[2] for c in a.calls] == ["start", "wait", "check"]


def test_a_running_session_is_not_started_again(ctx: ServiceContext) -> None:
    a = ScriptedAgent(start=(0, "running\n"))
    starter(ctx).sign_in(agent(a), who("alice"), "alice", FIRST_UID)
    assert [c[2] for c in a.calls] == ["start"]


def test_a_session_that_never_runs_times_out(ctx: ServiceContext) -> None:
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    s = SessionStarter(ctx, timeout_s=5, poll_s=1.0, clock=lambda: now[0], sleep=sleep)
    with pytest.raises(Unavailable, match="did not start within 5 s"):
        s.sign_in(agent(ScriptedAgent(checks=[1])), who("alice"), "alice", FIRST_UID)


def test_hook_failures_are_told_apart(ctx: ServiceContext) -> None:
    with pytest.raises(AccountRefused, match="system account there"):
        starter(ctx).sign_in(agent(ScriptedAgent(start=(4, ""))), who("games2"), "games2",
                             FIRST_UID)
    with pytest.raises(Unavailable, match="session hook failed"):
        starter(ctx).sign_in(agent(ScriptedAgent(start=(3, ""))), who("alice"), "alice",
                             FIRST_UID)


def test_the_pools_timeout_overrides_the_starters(ctx: ServiceContext) -> None:
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    s = SessionStarter(ctx, timeout_s=150, poll_s=1.0, clock=lambda: now[0], sleep=sleep)
    with pytest.raises(SessionDidNotStart, match="did not start within 7 s"):
        s.sign_in(agent(ScriptedAgent(checks=[1])), who("alice"), "alice", FIRST_UID,
                  timeout_s=7)
    assert 7 <= now[0] < 9


STATUS = ('{"sessions":[{"id":"3","user":"sam","uid":10000,"type":"x11","class":"user",'
          '"state":"active","active":true,"remote":false,"service":"lightdm-autologin",'
          '"display":":0","idle_hint":false,"idle_since_us":0,"locked":false,'
          '"x_idle_ms":1234},{"id":"5","user":"sam","uid":10000,"type":"tty","class":"user",'
          '"state":"closing","active":false,"remote":false,"service":"login","display":"",'
          '"idle_hint":true,"idle_since_us":1733480000000000,"locked":false,'
          '"x_idle_ms":null}]}\n')


def test_status_is_read_into_sessions() -> None:
    x11, tty = parse_status(STATUS)
    assert (x11.user, x11.uid, x11.type, x11.display, x11.x_idle_ms) == (
        "sam", 10_000, "x11", ":0", 1234)
    assert x11.live and x11.graphical and x11.active and not x11.locked
    assert not tty.live and not tty.graphical and tty.x_idle_ms is None
    assert parse_status('{"sessions":[]}') == []


@pytest.mark.parametrize("text, why", [
    ("", "Expecting value"),
    ('{"users": []}', "'sessions'"),
    ('{"sessions": {}}', "not a list"),
    ('{"sessions": [{"id": "3"}]}', "'user'"),
    (STATUS.replace('"uid":10000', '"uid":"10000"', 1), "uid is not int"),
    (STATUS.replace('"x_idle_ms":1234', '"x_idle_ms":true'), "x_idle_ms is not an int"),
])
def test_an_unreadable_status_is_a_driver_error_naming_why(text: str, why: str) -> None:
    with pytest.raises(DriverError, match="unreadable answer") as caught:
        parse_status(text)
    assert why in str(caught.value)


def test_a_directory_users_numbers_make_their_account(ctx: ServiceContext) -> None:
    erin = Identity(name="erin", display_name="Erin Posix", source="ldap", uid=20001, gid=5000)
    s = starter(ctx)
    assert s.account_for(erin) == ("erin", 20001)
    a = ScriptedAgent()
    s.sign_in(agent(a), erin, "erin", 20001)
    # The primary group differs from the uid: it goes as the hook's 4th argument.
    assert a.calls[0] == ["/bin/sh", SESSION_HOOK, "start", "erin", "20001", "Erin Posix",
                          "5000"]
    with pytest.raises(AccountRefused, match="below 1000"):
        s.account_for(Identity(name="frank", display_name="F", source="ldap", uid=500))
    with pytest.raises(AccountRefused, match="already user 'erin'"):
        s.account_for(Identity(name="gus", display_name="G", source="ldap", uid=20001))


def test_a_local_users_hook_call_keeps_three_arguments(ctx: ServiceContext) -> None:
    s = starter(ctx)
    account, uid = s.account_for(who("alice"))
    a = ScriptedAgent()
    s.sign_in(agent(a), who("alice"), account, uid)
    assert a.calls[0] == ["/bin/sh", SESSION_HOOK, "start", "alice", str(FIRST_UID),
                          "Alice Example"]


def test_a_profile_and_its_exclusions_go_before_the_account(ctx: ServiceContext) -> None:
    s = starter(ctx)
    account, uid = s.account_for(who("alice"))
    a = ScriptedAgent()
    s.sign_in(agent(a), who("alice"), account, uid, profile_serial="dp-0123",
              profile_exclusions=("Scratch space", ".local/share/Trash"))
    assert a.calls[0] == ["/bin/sh", SESSION_HOOK, "start", "--profile", "dp-0123",
                          "--exclude", "Scratch space", "--exclude", ".local/share/Trash",
                          "alice", str(FIRST_UID), "Alice Example"]
    b = ScriptedAgent()  # no profile: nothing to keep out of it
    s.sign_in(agent(b), who("alice"), account, uid, profile_exclusions=("x",))
    assert "--exclude" not in b.calls[0]
