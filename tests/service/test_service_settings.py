"""Settings from the environment: token scopes, data roots, defaults and the loopback rule."""

from __future__ import annotations

import pytest

from service.settings import Settings, parse_api_tokens

READER, ADMIN, BARE = "reader-token-0001-padded-to-32-chars", "admin-token-00001-padded-to-32-char", "bare-token-000001-padded-to-32-chars"
BASE64 = "c2VjcmV0LXRva2VuLWJ5dGVzLW9mLWxlbmd0aC0zMw=="  # urlsafe/base64 padding must stay in the token


def test_tokens_parse_with_scopes_and_bare_tokens_get_all():
    tokens = parse_api_tokens(f"{READER}:read, {ADMIN}:read+submit,{BARE}")
    assert tokens == {READER: {"read"}, ADMIN: {"read", "submit"}, BARE: {"read", "submit", "admin"}}


def test_tokens_may_name_their_owner():
    from service.settings import parse_token_owners

    raw = f"alice@{READER}:read,{ADMIN}:read+submit+admin,bob.k@{BARE}"
    assert parse_api_tokens(raw) == {READER: {"read"}, ADMIN: {"read", "submit", "admin"},
                                     BARE: {"read", "submit", "admin"}}
    assert parse_token_owners(raw) == {READER: "alice", BARE: "bob.k"}
    with pytest.raises(ValueError, match="owner name"):
        parse_api_tokens(f"bad name@{READER}")


def test_a_base64_token_keeps_its_padding_and_the_older_separator_still_reads():
    assert parse_api_tokens(BASE64) == {BASE64: {"read", "submit", "admin"}}
    assert parse_api_tokens(f"{BASE64}:read") == {BASE64: {"read"}}
    assert parse_api_tokens(f"{READER}=read") == {READER: {"read"}}  # what existing installs have
    assert parse_api_tokens(f"{BASE64}=read") == {BASE64: {"read"}}


@pytest.mark.parametrize("bad, why", [(f"{READER}:delete", "unknown scope"), ("short", "at least 32"),
                                      ("thirty-one-characters-long-tkn:read", "at least 32")])
def test_bad_tokens_are_rejected_with_the_reason(bad, why):
    with pytest.raises(ValueError, match=why):
        parse_api_tokens(bad)


def test_env_defaults_follow_the_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CONVTUNE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CONVTUNE_DATA_ROOTS", f"{tmp_path}/a,{tmp_path}/b")
    monkeypatch.setenv("CONVTUNE_API_TOKENS", f"{READER}:read")
    s = Settings()
    assert s.database_url == f"sqlite:///{tmp_path}/convtune.db"
    assert s.storage_path == str(tmp_path / "ray_results")
    assert s.data_roots == [tmp_path / "a", tmp_path / "b"]
    assert s.api_tokens == {READER: {"read"}}


def test_binding_beyond_loopback_requires_tokens(tmp_path):
    Settings(data_dir=tmp_path, host="127.0.0.1").check_bind()
    with pytest.raises(ValueError, match="CONVTUNE_API_TOKENS"):
        Settings(data_dir=tmp_path, host="0.0.0.0").check_bind()
    Settings(data_dir=tmp_path, host="0.0.0.0", api_tokens=READER).check_bind()


def test_serve_refuses_an_open_bind(monkeypatch, tmp_path, capsys):
    from service.cli import main

    monkeypatch.setenv("CONVTUNE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("CONVTUNE_API_TOKENS", raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "CONVTUNE_API_TOKENS" in capsys.readouterr().err
