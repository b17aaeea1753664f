"""Hostile input and exposure, over real HTTP against `convtune serve` (issue 11).

As in the security review, Ray and MLflow are unreachable: every case here must be answered by the
API itself, with a 4xx naming the problem, never a 5xx, and never by storing or starting anything.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import httpx
import pytest

VALID = {"name": "hostile", "base": {"model": "convnextv2_atto", "dataset": "digits", "epochs": 2},
         "space": {"blr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
         "search": {"algorithm": "random"}, "scheduler": {"type": "fifo"}, "num_samples": 2}
ENDPOINTS = ["/v1/sweeps/validate", "/v1/sweeps"]
TOKEN = "hostile-test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def server(tmp_path_factory, helpers):
    """`convtune serve` with auth off on loopback, Ray and MLflow unreachable."""
    tmp = tmp_path_factory.mktemp("hostile")
    env = helpers.service_env(tmp / "data", f"http://127.0.0.1:{helpers.free_port()}",
                              f"http://127.0.0.1:{helpers.free_port()}")
    proc = helpers.ApiProcess(env, tmp / "api.log").start()
    yield proc
    proc.kill()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def post(http, path, body, media="application/json", **headers):
    return http.post(path, content=body if isinstance(body, bytes) else body.encode(),
                     headers={"Content-Type": media, **headers})


def assert_422(resp, *words):
    assert resp.status_code == 422, resp.text[:500]
    text = resp.text.lower()
    for word in words:
        assert word.lower() in text, f"{word!r} not in {resp.text[:500]}"


def stored_sweeps(http) -> int:
    return http.get("/v1/sweeps").json()["total"]


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize(("body", "media", "words"), [
    ("[" * 50_000 + "]" * 50_000, "application/json", ["nested deeper"]),
    ("- " * 50_000 + "x", "application/yaml", ["nested deeper"]),
    ('{"name": "x", "num_samples": ' + "9" * 5000 + "}", "application/json", ["num_samples", "5000 digits"]),
    ("name: x\nnum_samples: " + "9" * 5000, "application/yaml", ["num_samples", "5000 digits"]),
    ("name: x\nbase: {model: convnextv2_atto}\nspace:\n  blr: {type: uniform, low: 0.1, high: .inf}\n",
     "application/yaml", ["space.blr.high", "finite"]),
    ("name: x\nbase: &a {x: *a}\n", "application/yaml", ["aliases"]),
    ('{"name": "x", "num_samples": 1000000000000000000000000000000}', "application/json", ["num_samples", "31 digits"]),
    ('{"name": "x", "time_budget_s": Infinity}', "application/json", ["time_budget_s", "finite"]),
])
def test_malformed_bodies_get_422_naming_the_problem(http, path, body, media, words):
    before = stored_sweeps(http)
    assert_422(post(http, path, body, media), *words)
    assert stored_sweeps(http) == before


@pytest.mark.parametrize("path", ENDPOINTS)
def test_numbers_past_the_server_caps_are_refused(http, path):
    tpe = {**VALID, "search": {"algorithm": "tpe"}, "num_samples": 10**12}
    assert_422(post(http, path, json.dumps(tpe)), "num_samples")
    tpe["num_samples"] = 5000  # a valid spec, above this server's CONVTUNE_MAX_TRIALS (1000)
    assert_422(post(http, path, json.dumps(tpe)), "at most 1000", "CONVTUNE_MAX_TRIALS")
    huge_cap = {**VALID, "search": {"algorithm": "random", "max_grid_trials": 10**9}}
    assert_422(post(http, path, json.dumps(huge_cap)), "max_grid_trials")
    infinite = {**VALID, "time_budget_s": "Infinity"}  # a string pydantic would turn into inf, stored as null
    assert_422(post(http, path, json.dumps(infinite)), "time_budget_s", "finite")


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("num_samples", [10**30, 2**63, 10**18 + 1])
def test_a_huge_num_samples_with_tpe_gets_422_not_a_database_overflow(http, path, num_samples):
    """A valid TPE spec whose num_samples does not fit SQLite's 64-bit INTEGER (it answered 500)."""
    before = stored_sweeps(http)
    body = json.dumps({**VALID, "search": {"algorithm": "tpe"}}).replace('"num_samples": 2',
                                                                       f'"num_samples": {num_samples}')
    assert str(num_samples) in body
    assert_422(post(http, path, body), "num_samples")
    assert stored_sweeps(http) == before


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize(("field", "json_text", "yaml_text"), [
    ("time_budget_s", "Infinity", ".inf"), ("time_budget_s", "NaN", ".nan"), ("stop_at", "-Infinity", "-.inf"),
    ("stop_at", "NaN", ".NaN")])
def test_non_finite_numbers_in_an_otherwise_valid_spec_are_refused(http, path, field, json_text, yaml_text):
    """They used to pass validation and be stored as null (a spec the driver then rejects)."""
    before = stored_sweeps(http)
    as_json = json.dumps(VALID)[:-1] + f', "{field}": {json_text}}}'
    assert_422(post(http, path, as_json), "finite")
    as_yaml = json.dumps(VALID) + "\n"  # JSON is YAML; add the field YAML's way
    as_yaml = as_yaml[:-2] + f', "{field}": {yaml_text}}}\n'
    assert_422(post(http, path, as_yaml, "application/yaml"), field, "finite")
    assert stored_sweeps(http) == before


@pytest.mark.parametrize("path", ENDPOINTS)
def test_alias_amplification_is_refused_not_expanded(http, path):
    laughs = "name: x\na: &a [1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
    assert len(laughs) < 600
    assert_422(post(http, path, laughs, "application/yaml"), "aliases")


@pytest.mark.parametrize("path", ENDPOINTS)
def test_a_grid_is_counted_not_built(http, path):
    names = ["blr", "layer_decay", "drop_path", "smoothing", "weight_decay", "reprob", "color_jitter"]
    space = {n: {"type": "grid", "values": [round(0.05 + 0.05 * i, 2) for i in range(10)]} for n in names}
    spec = {**VALID, "space": space, "search": {"algorithm": "grid"}, "num_samples": 1}
    assert len(json.dumps(spec)) < 1500
    # 10**7 combinations: answered from the product of value counts (building it took 10 s and GBs)
    assert_422(post(http, path, json.dumps(spec)), "10000000")
    # 10**12 combinations could not be built at all (terabytes): only a count answers this one
    more = ["mixup", "cutmix", "mixup_prob", "mixup_switch_prob", "model_ema_decay"]
    space.update({n: {"type": "grid", "values": [round(0.05 + 0.05 * i, 2) for i in range(10)]} for n in more})
    assert len(space) == 12
    assert_422(post(http, path, json.dumps({**spec, "space": space})), "1000000000000")


@pytest.mark.parametrize("path", ENDPOINTS)
def test_when_on_a_base_setting_is_validated(http, path):
    spec = {**VALID, "space": {**VALID["space"], "warmup_epochs": {
        "type": "choice", "values": [0, 1], "when": {"optimizer": "no-such-optimizer"}}}}
    assert_422(post(http, path, json.dumps(spec)), "space.warmup_epochs.when.optimizer")


@pytest.mark.parametrize("path", ENDPOINTS)
def test_mlflow_limits_are_checked_at_submit(http, path):
    assert_422(post(http, path, json.dumps({**VALID, "mlflow_experiment": "e" * 501})), "mlflow_experiment")
    assert_422(post(http, path, json.dumps({**VALID, "description": "d" * 8001})), "description")


def test_a_foreign_host_header_is_refused(http):
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends Host: evil.example."""
    resp = http.get("/v1/sweeps", headers={"Host": "evil.example:8000"})
    assert resp.status_code == 400
    assert http.get("/v1/sweeps", headers={"Host": "localhost"}).status_code == 200


@pytest.mark.parametrize("media", ["text/plain", "text/html", "application/x-www-form-urlencoded",
                                   "multipart/form-data", None])
def test_state_changing_requests_need_a_json_or_yaml_content_type(http, media):
    headers = {"Content-Type": media} if media else {}
    for path in ("/v1/sweeps", "/v1/sweeps/validate", "/v1/sweeps/some-id/cancel"):
        resp = http.post(path, content=json.dumps(VALID).encode(), headers=headers)
        assert resp.status_code == 415, (path, resp.text)
        assert "content-type" in resp.text.lower()


def test_a_foreign_origin_is_refused(http, server):
    before = stored_sweeps(http)
    resp = post(http, "/v1/sweeps", json.dumps(VALID), Origin="http://evil.example")
    assert resp.status_code == 403 and "CONVTUNE_ALLOWED_ORIGINS" in resp.text
    assert stored_sweeps(http) == before
    own = post(http, "/v1/sweeps/validate", json.dumps(VALID), Origin=server.url)
    assert own.status_code == 200, own.text


def test_non_numeric_content_length_gets_400(server):
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/sweeps/validate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: twelve\r\nConnection: close\r\n\r\n{}")
        reply = sock.recv(4096).decode("latin-1")
    assert reply.startswith("HTTP/1.1 400"), reply[:200]


@pytest.mark.parametrize("value", [b"twelve", b"12abc", b"-1", b" "])
def test_non_numeric_content_length_gets_400_from_the_app_itself(tmp_path, value):
    """uvicorn's parsers (h11, httptools) already answer 400 above; servers or clients that hand the header
    through (other ASGI servers, in-process clients) reached `int(...)` in the body limit: a 500."""
    import asyncio

    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(data_dir=tmp_path, ray_address="http://127.0.0.1:9",
                              mlflow_tracking_uri="http://127.0.0.1:9"))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/sweeps/validate", "raw_path": b"/v1/sweeps/validate",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"content-length", value)]}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert start["status"] == 400 and b"Content-Length" in body, (start, body)


def test_cancelling_needs_no_body_but_a_content_type(http):
    resp = http.post("/v1/sweeps/sw-0123456789ab/cancel", headers={"Content-Type": "application/json"})
    assert resp.status_code == 404


def _non_loopback_address() -> str | None:
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    for line in out.splitlines():
        addr = line.split()[3].split("/")[0]
        if not addr.startswith("127."):
            return addr
    return None


def test_auth_off_serves_loopback_clients_only_whatever_the_bind_address(tmp_path, helpers):
    """`uvicorn --factory service.app:create_app --host 0.0.0.0` without tokens (the documented command):
    requests from this machine's own non-loopback address are refused, loopback ones answered."""
    addr = _non_loopback_address()
    if addr is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    port = helpers.free_port()
    env = {**os.environ, **helpers.service_env(tmp_path / "data", f"http://127.0.0.1:{helpers.free_port()}",
                                               f"http://127.0.0.1:{helpers.free_port()}")}
    env["CONVTUNE_ALLOWED_HOSTS"] = "*"  # past the host check, to reach the client-address rule
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app",
                             "--host", "0.0.0.0", "--port", str(port), "--log-level", "warning"],
                            cwd=helpers.REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        helpers.wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200, 60, "uvicorn")
        remote = httpx.get(f"http://{addr}:{port}/v1/sweeps")
        assert remote.status_code == 403 and "loopback" in remote.text
        assert httpx.get(f"http://127.0.0.1:{port}/v1/sweeps").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_readyz_details_only_with_a_token(tmp_path, helpers):
    mlflow_url = f"http://127.0.0.1:{helpers.free_port()}"
    proc = helpers.ApiProcess({**helpers.service_env(tmp_path / "data", f"http://127.0.0.1:{helpers.free_port()}",
                                                     mlflow_url), "CONVTUNE_API_TOKENS": TOKEN},
                              tmp_path / "api.log").start()
    try:
        anonymous = httpx.get(f"{proc.url}/readyz")
        assert anonymous.status_code == 503
        assert mlflow_url not in anonymous.text and "127.0.0.1" not in anonymous.text
        assert anonymous.json()["components"]["mlflow"] == {"ok": False, "detail": "unavailable"}
        insider = httpx.get(f"{proc.url}/readyz", headers={"Authorization": f"Bearer {TOKEN}"})
        assert insider.status_code == 503 and mlflow_url.split("//")[1] in insider.text
    finally:
        proc.kill()


def test_logs_follow_with_the_server_down_prints_one_line(helpers):
    url = f"http://127.0.0.1:{helpers.free_port()}"
    out = subprocess.run([sys.executable, "-m", "service.cli", "logs", "some-sweep", "-f", "--api", url],
                         capture_output=True, text=True, timeout=60, cwd=helpers.REPO)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot reach the convtune API" in lines[0], out.stderr


@pytest.mark.parametrize("path", ENDPOINTS)
def test_paths_resolve_inside_the_roots_and_errors_never_show_a_link_target(http, server, tmp_path, path):
    """A link inside the root pointing out, and a file not made yet whose folder lies outside, are refused;
    the answer names the field and the path as written, never where the link points."""
    from pathlib import Path

    root = Path(server.env["CONVTUNE_DATA_DIR"]) / "data"
    (root / "models").mkdir(parents=True, exist_ok=True)
    hidden = tmp_path / "hidden-place-behind-the-link"
    hidden.mkdir()
    link = root / f"link-{path.rsplit('/', 1)[-1]}"
    link.symlink_to(hidden)
    before = stored_sweeps(http)
    for checkpoint, words in [(f"{link}/best.pth", ["base.checkpoint", "links outside", str(link)]),
                              (str(link), ["base.checkpoint", "outside the allowed data roots"]),
                              (f"{tmp_path}/not-made-yet/best.pth", ["base.checkpoint", "outside", str(tmp_path)])]:
        spec = {**VALID, "base": {**VALID["base"], "checkpoint": checkpoint}}
        resp = post(http, path, json.dumps(spec))
        assert_422(resp, *words)
        assert hidden.name not in resp.text
    # a file not made yet, in a folder not made yet, under the root: past the path check (submit: Ray is down)
    spec = {**VALID, "base": {**VALID["base"], "checkpoint": f"{root}/models/new/best.pth"}}
    assert post(http, path, json.dumps(spec)).status_code == (200 if path.endswith("validate") else 503)
    assert stored_sweeps(http) == before


BASE64_TOKEN = "c2VjcmV0LXRva2VuLWJ5dGVzLW9mLWxlbmd0aC0zMw=="  # padding '=' is part of the token


@pytest.fixture(scope="module")
def token_server(tmp_path_factory, helpers):
    """`convtune serve` with two tokens: a bare one (every scope) and a padded base64 one with read only."""
    tmp = tmp_path_factory.mktemp("tokens")
    env = {**helpers.service_env(tmp / "data", f"http://127.0.0.1:{helpers.free_port()}",
                                 f"http://127.0.0.1:{helpers.free_port()}"),
           "CONVTUNE_API_TOKENS": f"{TOKEN},{BASE64_TOKEN}:read"}
    proc = helpers.ApiProcess(env, tmp / "api.log").start()
    yield proc
    proc.kill()


def test_a_base64_tokens_padding_is_part_of_the_token(token_server):
    def call(method, path, token):
        return httpx.request(method, f"{token_server.url}{path}", headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/json"}, content=json.dumps(VALID))

    assert call("GET", "/v1/sweeps", BASE64_TOKEN).status_code == 200
    assert call("GET", "/v1/sweeps", BASE64_TOKEN.rstrip("=")).status_code == 401
    refused = call("POST", "/v1/sweeps/validate", BASE64_TOKEN)  # ":read" was read as its scopes
    assert refused.status_code == 403 and "submit" in refused.text
    assert call("POST", "/v1/sweeps/validate", TOKEN).status_code == 200  # past auth


@pytest.mark.parametrize("tokens", ["short-token:read", f"{TOKEN},thirty-one-characters-long-tkn"])
def test_serve_refuses_tokens_under_32_characters_in_one_line(tmp_path, helpers, tokens):
    env = {**os.environ, **helpers.service_env(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9"),
           "CONVTUNE_API_TOKENS": tokens, "CONVTUNE_PORT": str(helpers.free_port())}
    out = subprocess.run([sys.executable, "-m", "service.cli", "serve"], capture_output=True, text=True,
                         timeout=60, cwd=helpers.REPO, env=env)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "CONVTUNE_API_TOKENS" in lines[0] and "at least 32 characters" in lines[0], out.stderr


def _cli(helpers, *args, **env):
    full = {k: v for k, v in os.environ.items() if k != "CONVTUNE_API_TOKEN"}
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=helpers.REPO, env={**full, **env}, stdin=subprocess.DEVNULL)


def test_the_cli_reads_its_token_from_the_environment(token_server, helpers):
    missing = "sw-0123456789ab"
    with_env = _cli(helpers, "status", missing, "--api", token_server.url, CONVTUNE_API_TOKEN=TOKEN)
    assert with_env.returncode == 1 and "HTTP 404" in with_env.stderr, with_env.stderr
    without = _cli(helpers, "status", missing, "--api", token_server.url)  # off a terminal: no prompt
    assert without.returncode == 1 and "HTTP 401" in without.stderr, without.stderr
    flag = _cli(helpers, "status", missing, "--api", token_server.url, "--token", TOKEN)
    assert "HTTP 404" in flag.stderr


def test_the_cli_documents_that_a_token_flag_shows_in_ps(helpers):
    for command in ("submit", "status", "logs", "cancel"):
        text = " ".join(_cli(helpers, command, "--help").stdout.split())
        assert "--token" in text and "`ps`" in text and "CONVTUNE_API_TOKEN" in text, (command, text)


@pytest.mark.parametrize("args", [["status"], ["logs", "-f"]], ids=["status", "logs-follow"])
def test_the_cli_prompts_for_a_token_on_a_terminal_without_echoing_it(token_server, helpers, args):
    import fcntl
    import pty
    import termios

    master, slave = pty.openpty()

    def controlling_terminal():  # the pty becomes the child's /dev/tty, where getpass prompts
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    env = {k: v for k, v in os.environ.items() if k != "CONVTUNE_API_TOKEN"}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", args[0], "sw-0123456789ab", *args[1:], "--api",
                             token_server.url], cwd=helpers.REPO, env=env, stdin=slave, stdout=slave,
                            stderr=slave, preexec_fn=controlling_terminal)  # noqa: PLW1509 - one syscall pair
    os.close(slave)
    seen = b""

    def read_until(marker: bytes) -> bool:
        nonlocal seen
        try:
            seen += os.read(master, 4096)
        except OSError:  # the child closed the terminal
            return True
        return marker in seen

    try:
        helpers.wait_until(lambda: read_until(b"API token for"), 60, "the token prompt", interval=0)
        os.write(master, TOKEN.encode() + b"\n")
        helpers.wait_until(lambda: read_until(b"HTTP 404"), 60, "the answer with the token", interval=0)
        assert proc.wait(timeout=60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        os.close(master)
    text = seen.decode(errors="replace")
    assert TOKEN not in text  # not echoed
    assert "Traceback" not in text and "HTTP 401" not in text, text
