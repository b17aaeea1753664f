"""Property-based fuzz of the API from its own OpenAPI schema (schemathesis): no input gives a 5xx.

Runs against the real Ray head, MLflow server and SQLite DB. Valid submissions would start real
training jobs, so `POST /v1/sweeps` gets only invalid (negative) data; its validation path is the
same one `POST /v1/sweeps/validate` runs, which is fuzzed with valid and invalid specs.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

pytestmark = pytest.mark.ray

TOKEN = "fuzz-token-000001-padded-to-32-chars"


@pytest.fixture
def fuzz_app(make_settings):
    from service.app import create_app

    return create_app(make_settings(api_tokens=TOKEN, max_body_bytes=64 * 1024))


def _operations(schema):
    for result in schema.get_all_operations():
        yield result.ok()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_gives_a_server_error(fuzz_app, mode):
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    failures, fuzzed = [], 0
    for op in _operations(schema):
        if mode is GenerationMode.POSITIVE and op.method.upper() == "POST" and op.path == "/v1/sweeps":
            continue  # a valid spec would start a real sweep

        @settings(max_examples=25, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def check(case):
            response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path} -> {response.status_code}: "
                                f"{response.text[:300]} (case: {case.path_parameters} {case.query} "
                                f"{str(case.body)[:300]})")

        try:
            check()
            fuzzed += 1
        except Unsatisfiable:  # e.g. no invalid request exists for a parameterless GET
            continue
    assert fuzzed >= 6, f"only {fuzzed} operations could be fuzzed"
    assert not failures, "\n".join(failures[:10])


# ------------------------------------------------------------------ hostile input (depth, size, numbers,
# aliases, content types): every such body gets a 4xx, never a 5xx, and nothing is stored.

def _nested(depth: int, yaml: bool) -> bytes:
    return (("- " * depth + "x") if yaml else ("[" * depth + "]" * depth)).encode()


def _alias_bomb(levels: int) -> bytes:
    lines = ["name: x", "a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines).encode()


def _hostile_bodies():
    from hypothesis import strategies as st

    json_media = st.sampled_from(["application/json", "application/json; charset=utf-8", "text/json"])
    yaml_media = st.sampled_from(["application/yaml", "application/x-yaml", "text/yaml"])
    number = st.one_of(
        st.integers(min_value=19, max_value=6000).map(lambda n: "9" * n),  # past the digit limit
        st.sampled_from(["1e400", "-1e400", "1e308", "Infinity", "-Infinity", "NaN", ".inf", "-.inf", ".nan"]))
    return st.one_of(
        st.tuples(st.integers(33, 60_000).map(lambda d: _nested(d, yaml=False)), json_media),
        st.tuples(st.integers(33, 60_000).map(lambda d: _nested(d, yaml=True)), yaml_media),
        st.tuples(number.map(lambda n: f'{{"name": "x", "num_samples": {n}}}'.encode()), json_media),
        st.tuples(number.map(lambda n: f"name: x\nspace:\n  blr: {{type: uniform, low: 0, high: {n}}}".encode()),
                  yaml_media),
        st.tuples(st.integers(2, 9).map(_alias_bomb), yaml_media),
        st.tuples(st.just(b"base: &a {x: *a}\n"), yaml_media),
        st.tuples(st.binary(max_size=2048), st.one_of(json_media, yaml_media)),
        st.tuples(st.just(b'{"name": "x"}'), st.sampled_from(["text/plain", "text/html", "multipart/form-data",
                                                              "application/x-www-form-urlencoded", "", "*/*"])),
    )


@pytest.mark.parametrize("path", ["/v1/sweeps/validate", "/v1/sweeps"])
def test_hostile_bodies_get_a_4xx_and_store_nothing(fuzz_app, path):
    from fastapi.testclient import TestClient

    headers = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(fuzz_app, base_url="http://127.0.0.1", client=("127.0.0.1", 50000), headers=headers) as client:
        seen: dict[int, int] = {}

        @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=_hostile_bodies())
        def check(case):
            body, media = case
            resp = client.post(path, content=body, headers={"Content-Type": media} if media else {})
            seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
            assert 400 <= resp.status_code < 500, f"{resp.status_code} for {body[:80]!r} ({media}): {resp.text[:300]}"

        check()
        assert client.get("/v1/sweeps").json()["total"] == 0
    assert set(seen) <= {400, 413, 415, 422}, seen
