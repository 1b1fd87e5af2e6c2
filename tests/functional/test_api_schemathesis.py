"""Schemathesis over the broker's own OpenAPI document, in process against the app (no server),
as an administrator (bearer API token), as a plain user and with no credentials at all.

Every operation gets generated calls that fit its schema (positive) and calls that do not
(negative); each answer goes through all of schemathesis's checks: no server error, the
status documented, the content type and the body as documented, bad input refused, good input
not refused. With no credentials, every route but sign-in and the public ones must refuse:
401, the 400/413/422 a body gets that is not JSON or past the size cap, read before anyone
is asked who calls, or the CSRF check's 403 for a cookie with no Origin; never an answer.
With a valid token, no call is refused as unsigned. The administrator's run, whose calls
write the most, is repeated on PostgreSQL.
CI runs at least ``CASES_PER_ROLE`` calls per role (100 locally, unless CI=true), derandomized
so that a failure shows again on the next run; every operation is tried and every failure
listed before the test fails.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from deskpool.broker.accounts import AccountService
from deskpool.drivers.registry import forget_fake_hosts
from tests.broker_world import BrokerWorld, make_world

if TYPE_CHECKING:
    from tests.pg_server import PostgresServer

IN_CI = os.environ.get("CI", "").lower() == "true"
CASES_PER_ROLE = 1000 if IN_CI else 100
# Routes anyone may call: sign-in, health and readiness, metrics (its own token, unset here),
# the portal's pages and their static files.
PUBLIC = ("/api/v1/auth/login", "/healthz", "/readyz", "/metrics")
# Names a fuzzer will not hit by chance: its calls must not sign the test's own users out.
ADMIN, USER = "schemathesis-admin-4c1d", "schemathesis-user-9e2b"
URI_MAX = 1024  # HostCreate.uri's max_length

counted: Counter[str] = Counter()


@contextmanager
def fuzzed_world(tmp_path: Path, database_url: str | None = None) -> Iterator[BrokerWorld]:
    w = make_world(tmp_path, database_url=database_url)
    w.pool("lab")
    w.user(USER, entitled_to=("lab",))
    w.user(ADMIN, admin=True)
    w.fill()
    try:
        yield w
    finally:
        w.ctx.close()
        forget_fake_hosts()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerWorld]:
    with fuzzed_world(Path(tmp_path_factory.mktemp("schemathesis"))) as w:
        yield w


@pytest.fixture(scope="module")
def pg_world(tmp_path_factory: pytest.TempPathFactory,
             postgres: PostgresServer) -> Iterator[BrokerWorld]:
    url = postgres.create_database("schemathesis")
    with fuzzed_world(Path(tmp_path_factory.mktemp("schemathesis-pg")), url) as w:
        yield w


@pytest.fixture(scope="module")
def schema(world: BrokerWorld) -> Any:
    return schema_of(world)


@pytest.fixture(scope="module")
def pg_schema(pg_world: BrokerWorld) -> Any:
    return schema_of(pg_world)


def schema_of(world: BrokerWorld) -> Any:
    world.client()  # builds the world's one app
    assert world._app is not None
    config = schemathesis.config.SchemathesisConfig.from_dict({"checks": {
        # A call that fits the schema may still name a pool or user that does not exist
        # (404), clash with what exists (409) or not make sense as a whole, e.g. a spare
        # above the max (400); the error body names what was wrong. Sign-in locks out after
        # too many failures, whatever the input (429).
        "positive_data_acceptance": {"expected-statuses": ["2xx", 400, 401, 403, 404, 409,
                                                           429]},
        # A body past the 1 MiB cap is refused too, before its content is read (413).
        "negative_data_rejection": {"expected-statuses": [400, 401, 403, 404, 405, 406, 409,
                                                          413, 415, 422, 428, 429]},
        # Its "ignored auth" check re-sends a call without the credentials the document's
        # security schemes name, but keeps the headers this test passes itself, so a valid
        # token reads as ignored. The anonymous role asserts the same thing directly: every
        # protected route refuses a call with no credentials at all (see run_operation).
        "ignored_auth": {"enabled": False},
    }})
    found = schemathesis.openapi.from_asgi("/openapi.json", world._app, config=config)

    @found.hook
    def map_body(context: Any, body: Any) -> Any:
        """A host's URI is only ever a fake hypervisor: a generated qemu+ssh:// one would
        have the test dial out. The shorter scheme must not make a URI that broke the
        length bound a valid one."""
        if (context.operation is not None and context.operation.path == "/api/v1/admin/hosts"
                and isinstance(body, dict) and isinstance(body.get("uri"), str)
                and not body["uri"].startswith("fake://")):
            uri = "fake://" + body["uri"].partition("://")[2]
            if len(body["uri"]) > URI_MAX > len(uri):  # a URI too long stays too long
                uri = uri.ljust(len(body["uri"]), "x")
            body = {**body, "uri": uri}
        return body

    return found


def is_public(path: str) -> bool:
    return path in PUBLIC or not path.startswith("/api/")


def operations(schema: Any) -> list[Any]:
    return [result.ok() for result in schema.get_all_operations()]


def run_operation(operation: Any, mode: GenerationMode, headers: dict[str, str], role: str,
                  max_examples: int, fresh_token: Any, tally: str) -> None:
    """Up to ``max_examples`` calls of one operation in one mode; raises what it finds.
    (Hypothesis raises Unsatisfiable when no call can break a schema, e.g. one whose only
    input is any string.)"""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                     HealthCheck.data_too_large, HealthCheck.large_base_example])
    def check(case: Any) -> None:
        counted[tally] += 1
        sent = headers
        if operation.path == "/api/v1/auth/logout" and role != "anonymous":
            sent = {"authorization": f"Bearer {fresh_token(role)}"}  # it signs its token out
        response = case.call_and_validate(headers=sent)
        seen = f"{case.as_curl_command(headers=sent)} answered {response.status_code}: " \
               f"{response.text[:300]}"
        if role == "anonymous" and not is_public(operation.path):
            # Refused: 401, or a body that is not even JSON, which FastAPI reads (422)
            # before it asks who is calling, or one past the size cap (413), or a made-up
            # session cookie on a state-changing call with no Origin, which the CSRF check
            # refuses before the cookie is looked up (403).
            assert response.status_code in (401, 403, 400, 413, 422), \
                f"without credentials: {seen}"
        if role != "anonymous" and operation.path != "/api/v1/auth/login":
            assert response.status_code != 401, f"a valid token refused: {seen}"

    check()


def roles(world: BrokerWorld) -> dict[str, dict[str, str]]:
    return {"admin": {"authorization": f"Bearer {world.tokens[ADMIN]}"},
            "user": {"authorization": f"Bearer {world.tokens[USER]}"},
            "anonymous": {}}


@pytest.mark.parametrize("role", ["admin", "user", "anonymous"])
def test_schemathesis_finds_nothing(role: str, world: BrokerWorld, schema: Any) -> None:
    fuzz(role, world, schema, tally=role)


def test_schemathesis_finds_nothing_as_admin_on_postgresql(pg_world: BrokerWorld,
                                                           pg_schema: Any) -> None:
    """The admin, whose calls write the most, again on PostgreSQL: its stricter types and
    constraints (text without NUL, integer ranges, foreign keys checked at once) must turn
    every bad value into a refusal at the edge too, never a server error."""
    fuzz("admin", pg_world, pg_schema, tally="admin on postgresql")


def fuzz(role: str, world: BrokerWorld, schema: Any, tally: str) -> None:
    ops = operations(schema)
    assert ops, "the OpenAPI document lists no operation"
    headers = roles(world)[role]

    def fresh_token(role: str) -> str:
        name = ADMIN if role == "admin" else USER
        return AccountService(world.ctx).issue_api_token(name, "logout").token

    # Operations without input give one distinct call each; the rest make up the number.
    per_operation = max(5, math.ceil(CASES_PER_ROLE / len(ops) / 2 * 1.6))
    found: list[str] = []
    for operation in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            # Every operation is tried, so that one run shows every problem.
            try:
                run_operation(operation, mode, headers, role, per_operation, fresh_token,
                              tally)
            except Unsatisfiable:
                continue  # e.g. no call breaks a schema whose only input is any string
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # schemathesis's failures are exception groups
                found.append(f"{operation.label} ({mode.value}): {exc}")
    assert not found, f"{len(found)} operations failed as {role}:\n\n" + "\n\n".join(found)
    # The test's own users still sign in: no generated call took their tokens away.
    me = world.client()
    assert me.get("/api/v1/me", headers=roles(world)["admin"]).status_code == 200
    print(f"schemathesis: {counted[tally]} calls as {tally} over {len(ops)} operations")
    assert counted[tally] >= CASES_PER_ROLE, f"only {counted[tally]} calls as {tally}"


