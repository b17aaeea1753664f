"""Owners, over real HTTP (issue 10 item 4): a sweep records its owner; a token sees and controls only
its owner's sweeps (404 for reads, so ids do not leak; 403 for actions); an `admin` token sees them all.
Ray and MLflow are unreachable here: what is checked is who gets past the owner check (a 503 from the
backends means the request was let through)."""

from __future__ import annotations

import json

import httpx
import pytest

ALICE = "alice-token-0123456789abcdef-0123456"
BOB = "bob-token-0123456789abcdef-012345678"
ADMIN = "admin-token-0123456789abcdef-01234567"
ALICE_TOO = "alice-second-token-0123456789abcdef-01"
TOKENS = f"alice@{ALICE}:read+submit,bob@{BOB}:read+submit,ops@{ADMIN}:read+admin,alice@{ALICE_TOO}:read"
SPEC = {"name": "owned", "base": {"model": "convnextv2_atto", "dataset": "digits", "epochs": 1, "warmup_epochs": 0},
        "space": {"blr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}}, "num_samples": 1}
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(request, tmp_path_factory, helpers):
    """A server with four tokens (two of them Alice's) and one sweep each for Alice and Bob."""
    from service.db import Database
    from service.models import Sweep
    from service.settings import Settings
    from service.specs import check_spec
    from service.sweeps import new_sweep_id

    tmp = tmp_path_factory.mktemp("owners")
    url = (request.getfixturevalue("postgres_server").new_database("owners") if request.param == "postgresql"
           else f"sqlite:///{tmp / 'convtune.db'}")
    env = {**helpers.service_env(tmp / "data", f"http://127.0.0.1:{helpers.free_port()}",
                                 f"http://127.0.0.1:{helpers.free_port()}"),
           "CONVTUNE_API_TOKENS": TOKENS, "CONVTUNE_DATABASE_URL": url}
    settings = Settings(data_dir=tmp / "data", database_url=url)
    Database(url)  # the schema, before the API and this fixture both open it
    api = helpers.ApiProcess(env, tmp / "api.log").start()
    checked = check_spec(json.loads(json.dumps(SPEC)), settings.data_roots)
    ids = {}
    db = Database(settings.database_url)
    with db.session() as s:
        for owner in ("alice", "bob"):
            ids[owner] = new_sweep_id()
            s.add(Sweep(id=ids[owner], name=f"{owner}-sweep", status="STOPPED", spec_json=checked.canonical_json,
                        spec_hash=checked.spec_hash, owner=owner, attempt=1, ray_job_id=ids[owner]))
        s.commit()
    yield api, ids
    api.kill()


def as_(api, token):
    return httpx.Client(base_url=api.url, timeout=30, headers={"Authorization": f"Bearer {token}"})


@pytest.mark.parametrize(("token", "sees"), [(ALICE, {"alice"}), (ALICE_TOO, {"alice"}), (BOB, {"bob"}),
                                             (ADMIN, {"alice", "bob"})])
def test_the_list_shows_the_callers_sweeps_and_admin_sees_all(world, token, sees):
    api, ids = world
    with as_(api, token) as c:
        page = c.get("/v1/sweeps").json()
    assert {item["owner"] for item in page["items"]} == sees and page["total"] == len(sees)


@pytest.mark.parametrize("path", ["", "/trials", "/logs"])
def test_reading_another_owners_sweep_is_404_and_ones_own_gets_through(world, path):
    api, ids = world
    with as_(api, ALICE) as alice, as_(api, ADMIN) as admin, as_(api, BOB) as bob:
        other = alice.get(f"/v1/sweeps/{ids['bob']}{path}")
        assert other.status_code == 404 and "another owner" not in other.text  # indistinguishable from absent
        assert alice.get(f"/v1/sweeps/sw-000000000000{path}").json()["detail"] == other.json()["detail"].replace(
            ids["bob"], "sw-000000000000")
        for client, sweep in ((alice, ids["alice"]), (bob, ids["bob"]), (admin, ids["bob"])):
            assert client.get(f"/v1/sweeps/{sweep}{path}").status_code in (200, 503)  # past the owner check


@pytest.mark.parametrize("action", ["cancel", "resume"])
def test_acting_on_another_owners_sweep_is_403(world, action):
    api, ids = world
    with as_(api, ALICE) as alice, as_(api, BOB) as bob:
        refused = alice.post(f"/v1/sweeps/{ids['bob']}/{action}", headers=JSON)
        assert refused.status_code == 403 and "another owner" in refused.text
        assert bob.post(f"/v1/sweeps/{ids['bob']}/{action}", headers=JSON).status_code not in (403, 404)


def test_admin_acts_on_any_sweep_and_a_read_token_on_none(world):
    api, ids = world
    with as_(api, ADMIN) as admin, as_(api, ALICE_TOO) as reader:
        assert admin.post(f"/v1/sweeps/{ids['alice']}/resume", headers=JSON).status_code not in (403, 404)
        assert reader.post(f"/v1/sweeps/{ids['alice']}/cancel", headers=JSON).status_code == 403  # no submit scope


def test_tokens_resolve_to_their_named_owner_and_a_refused_submit_creates_nothing(world):
    """Both of Alice's tokens act as "alice" (the owner recorded on her sweeps and the scope of her
    Idempotency-Keys); a submit while Ray is down (503) leaves no row."""
    from service.api.deps import caller_for
    from service.settings import Settings

    settings = Settings(api_tokens=TOKENS, secret_key="x" * 40)
    assert caller_for(settings, ALICE_TOO, frozenset({"read"})).owner == "alice"
    assert caller_for(settings, ADMIN, frozenset({"admin"})).admin
    api, _ = world
    with as_(api, ALICE) as alice:
        assert alice.post("/v1/sweeps", json=SPEC).status_code == 503
        assert alice.get("/v1/sweeps").json()["total"] == 1


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def open_world(request, tmp_path_factory, helpers):
    """Auth off (loopback only): sweeps recorded under tokens earlier and one recorded as `local`."""
    from service.db import Database
    from service.models import Sweep
    from service.settings import Settings
    from service.specs import check_spec
    from service.sweeps import new_sweep_id

    tmp = tmp_path_factory.mktemp("owners-off")
    url = (request.getfixturevalue("postgres_server").new_database("owners_off") if request.param == "postgresql"
           else f"sqlite:///{tmp / 'convtune.db'}")
    env = {**helpers.service_env(tmp / "data", f"http://127.0.0.1:{helpers.free_port()}",
                                 f"http://127.0.0.1:{helpers.free_port()}"), "CONVTUNE_DATABASE_URL": url}
    settings = Settings(data_dir=tmp / "data", database_url=url)
    db = Database(url)
    checked = check_spec(json.loads(json.dumps(SPEC)), settings.data_roots)
    ids = {}
    with db.session() as s:
        for owner in ("local", "alice", "token-0123456789abcdef0123456789abcdef"):
            ids[owner] = new_sweep_id()
            s.add(Sweep(id=ids[owner], name="off-sweep", status="STOPPED", spec_json=checked.canonical_json,
                        spec_hash=checked.spec_hash, owner=owner, attempt=1, ray_job_id=ids[owner]))
        s.commit()
    api = helpers.ApiProcess(env, tmp / "api.log").start()
    yield api, ids
    api.kill()


def test_auth_off_has_one_implicit_owner_who_sees_and_acts_on_every_sweep(open_world):
    api, ids = open_world
    with httpx.Client(base_url=api.url, timeout=30) as local:
        page = local.get("/v1/sweeps").json()
        assert {item["id"] for item in page["items"]} == set(ids.values()) and page["total"] == len(ids)
        for sweep in ids.values():
            for path in ("", "/trials", "/logs"):
                assert local.get(f"/v1/sweeps/{sweep}{path}").status_code in (200, 503)  # past the owner check
            for action in ("cancel", "resume"):
                assert local.post(f"/v1/sweeps/{sweep}/{action}", headers=JSON).status_code not in (401, 403, 404)
        assert local.get("/v1/sweeps/sw-000000000000").status_code == 404
        assert local.post("/v1/sweeps", json=SPEC).status_code == 503  # Ray is down: refused, nothing stored
        assert local.get("/v1/sweeps").json()["total"] == len(ids)
