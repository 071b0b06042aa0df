"""Both login schemes against the sandbox: caching, renewal, rotation, single-flight."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from dokstamp_sync.dokstamp import (
    MemoryTokenStore,
    PasswordLogin,
    RedisTokenStore,
    TokenManager,
    auth,
    errors,
)
from dokstamp_sync.sandbox import Faults, ScriptedFault
from testenv import MAIN, TEST_REDIS_URL


def test_password_login_then_calls_reuse_the_token(client, sandbox):
    """A password login happens once; later calls reuse the cached token."""
    client.institutions.page()
    client.institutions.page()
    assert sandbox.sandbox.authority.issued == 1
    assert sandbox.sandbox.stats.by_route["POST /auth/login"] == 1


def test_client_credentials_login(sandbox_b, make_client):
    """The newer scheme logs in through /oauth/token and never through /auth/login."""
    c = make_client(scheme="client")
    assert c.me()["tenant"]["domain"] == MAIN.tenant
    assert sandbox_b.sandbox.stats.by_route["POST /oauth/token"] == 1
    assert sandbox_b.sandbox.stats.by_route["POST /auth/login"] == 0


def test_token_renewed_about_60s_before_expiry(make_client, sandbox):
    """A token with less than 60 s left is renewed before use, while it is still valid."""
    now = [time.time()]
    c = make_client(clock=lambda: now[0])
    c.institutions.page()
    now[0] += 3600 - 61  # 61 s left: still fresh
    c.institutions.page()
    assert c.tokens.renewals == 1
    now[0] += 2  # 59 s left: renew now, via the refresh token
    c.institutions.page()
    assert c.tokens.renewals == 2
    assert sandbox.sandbox.stats.by_route["POST /auth/refresh"] == 1
    assert sandbox.sandbox.stats.by_route["POST /auth/login"] == 1


def test_client_credentials_renewal_requests_a_new_token(sandbox_b, make_client):
    """With no refresh token, renewal asks /oauth/token anew."""
    now = [time.time()]
    c = make_client(scheme="client", clock=lambda: now[0])
    c.institutions.page()
    now[0] += 3600
    c.institutions.page()
    assert sandbox_b.sandbox.stats.by_route["POST /oauth/token"] == 2
    assert sandbox_b.sandbox.stats.by_route["POST /auth/refresh"] == 0


def test_401_renews_once_and_replays_the_call(client, sandbox):
    """A token the server expired early gets one renewal and the call succeeds on replay."""
    client.institutions.page()
    sandbox.sandbox.authority.expire_all()
    inst = client.institutions.create({"name": "After expiry", "country": "Brazil"})
    assert inst["name"] == "After expiry"
    assert sandbox.sandbox.stats.by_route["POST /institutions"] == 2  # 401, then 201
    assert sandbox.sandbox.stats.by_route["POST /auth/refresh"] == 1
    assert len(client.institutions.find(name="After expiry")) == 1


def test_401_after_renewal_is_an_authentication_error(client, sandbox):
    """When the renewed token is refused too, the call fails permanently instead of looping."""
    client.institutions.page()
    sandbox.sandbox.config.token_ttl = 0  # every new token is born expired
    sandbox.sandbox.authority.token_ttl = 0
    sandbox.sandbox.authority.expire_all()
    with pytest.raises(errors.AuthenticationError) as info:
        client.institutions.page()
    assert info.value.status == 401
    assert sandbox.sandbox.stats.by_route["GET /institutions"] == 3  # 200, 401, replayed 401


def test_refresh_token_rotates(client, sandbox):
    """After a refresh the old refresh token is refused by the server (rotation)."""
    client.institutions.page()
    old = client.tokens._load()
    client.tokens.invalidate(old.access_token)
    new = client.tokens._load()
    assert new.refresh_token != old.refresh_token
    r = client.http.post("/auth/refresh", json={"refresh_token": old.refresh_token})
    assert r.status_code == 401
    assert r.json()["message"] == "The refresh token is invalid."


def test_refused_refresh_token_falls_back_to_login(client, sandbox):
    """A spent refresh token (e.g. rotated by the server) leads to a fresh password login."""
    client.institutions.page()
    sandbox.sandbox.authority.refresh.clear()
    sandbox.sandbox.authority.expire_all()
    client.institutions.page()
    assert sandbox.sandbox.stats.by_route["POST /auth/login"] == 2


def test_wrong_password_is_permanent_and_secret_free(make_client, sandbox):
    """Refused credentials raise AuthenticationError that never shows the password."""
    from dokstamp_sync.sandbox import Account

    bad = Account(password="wrong-hunter2")
    c = make_client(account=bad)
    with pytest.raises(errors.AuthenticationError) as info:
        c.institutions.page()
    text = f"{info.value} {info.value!r} {info.value.body} {c.tokens._credentials!r}"
    assert "hunter2" not in text
    assert info.value.path == "/auth/login"
    assert "do not match" in info.value.message


def test_renewal_is_single_flight_across_threads(make_client, sandbox):
    """Eight threads finding no token at once cause exactly one login."""
    store = MemoryTokenStore()
    clients = [make_client(store=store) for _ in range(8)]
    barrier = threading.Barrier(8)

    def call(c):
        barrier.wait()
        c.institutions.page()

    threads = [threading.Thread(target=call, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sandbox.sandbox.authority.issued == 1


_PROCESS = """
import sys, time, redis
from dokstamp_sync.dokstamp import PasswordLogin, RedisTokenStore, TokenManager, build_http_client
url, redis_url, prefix, start = sys.argv[1:5]
http = build_http_client(url)
store = RedisTokenStore(redis.Redis.from_url(redis_url), prefix=prefix)
manager = TokenManager(http, PasswordLogin("admin@demo-university.edu", "sandbox-password"), store)
time.sleep(max(0.0, float(start) - time.time()))  # all processes ask at the same moment
print(manager.token()[:12])
"""


def test_redis_store_shares_one_login_between_processes(sandbox, redis_client, key_prefix):
    """Eight worker processes asking at the same moment, while a login takes 0.5 s, log in
    once through the shared Redis store, and all get that token."""
    sandbox.sandbox.faults.configure(Faults(script=[
        ScriptedFault("POST", "/auth/login", status=200, delay_s=0.5, times=8)]))
    start = str(time.time() + 3.0)
    procs = [subprocess.Popen([sys.executable, "-c", _PROCESS, sandbox.url, TEST_REDIS_URL,
                               key_prefix, start], stdout=subprocess.PIPE, text=True)
             for _ in range(8)]
    outputs = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(outputs) == 1
    assert sandbox.sandbox.authority.issued == 1
    # The token is kept with an expiry, not forever.
    keys = [k for k in redis_client.scan_iter(f"{key_prefix}*") if not k.endswith(b":lock")]
    assert len(keys) == 1
    assert 0 < redis_client.ttl(keys[0]) <= 3600


def test_redis_store_roundtrip(redis_client, key_prefix):
    """The Redis store keeps token, expiry and refresh token, and deletes on request."""
    from dokstamp_sync.dokstamp import CachedToken

    store = RedisTokenStore(redis_client, prefix=key_prefix)
    token = CachedToken("access-x", time.time() + 100, "refresh-y")
    store.set("k", token)
    assert store.get("k") == token
    assert "access-x" not in repr(token)
    store.delete("k")
    assert store.get("k") is None


def test_short_lived_tokens_are_renewed_at_half_life_not_every_call(make_client, sandbox):
    """A 30 s token (shorter than the 60 s margin) is reused until half its life has passed."""
    sandbox.sandbox.authority.token_ttl = 30
    now = [time.time()]
    c = make_client(clock=lambda: now[0])
    for _ in range(5):
        c.institutions.page()
    assert c.tokens.renewals == 1
    now[0] += 16
    c.institutions.page()
    assert c.tokens.renewals == 2


def test_redis_store_failure_is_a_transient_transport_error():
    """An unreachable Redis surfaces as the client's TransportError, not a redis exception."""
    import redis as redis_lib

    store = RedisTokenStore(redis_lib.Redis(host="127.0.0.1", port=1, socket_timeout=1))
    with pytest.raises(errors.TransportError):
        store.get("k")
    with pytest.raises(errors.TransportError), store.lock("k"):
        pass


def test_tokens_in_the_shared_redis_cache_are_encrypted(make_client, sandbox, redis_client,
                                                        key_prefix):
    """CONTRACT §1 (secrets never stored): Redis holds ciphertext only; the same credentials
    read it back, other credentials cannot."""
    store = RedisTokenStore(redis_client, prefix=key_prefix)
    c = make_client(store=store)
    c.institutions.page()
    token = c.tokens._load()
    raw = b"".join(redis_client.get(k) or b"" for k in redis_client.scan_iter(f"{key_prefix}*"))
    assert token.access_token.encode() not in raw
    assert token.refresh_token.encode() not in raw
    again = make_client(store=store)  # another process, same credentials: no new login
    again.institutions.page()
    assert sandbox.sandbox.authority.issued == 1
    rotated = TokenManager(c.http, PasswordLogin(MAIN.email, "a-rotated-password"), store)
    assert rotated.key == c.tokens.key  # same cache entry...
    assert rotated._load() is None  # ...unreadable without the right secret: it renews


def test_a_process_reads_the_shared_token_once_not_per_request(client, sandbox, monkeypatch):
    """Calls within the memo's time reuse the token this process read (no shared-cache read,
    no decryption per request); once the memo has aged the shared cache is read again, so a
    token another process renewed is picked up; a 401 reads it at once."""
    tokens = client.tokens
    reads: list[str] = []
    real = tokens._store.get

    def counted(key: str) -> object:
        reads.append(key)
        return real(key)

    monkeypatch.setattr(tokens._store, "get", counted)
    for _ in range(5):
        client.institutions.page()
    # the first call read it twice (before and under the renewal's lock) and logged in; the
    # four others reused it
    assert len(reads) == 2
    assert sandbox.sandbox.authority.issued == 1
    monkeypatch.setattr(auth, "MEMO_SECONDS", 0.0)  # the memo aged
    client.institutions.page()
    assert len(reads) == 3
    monkeypatch.setattr(auth, "MEMO_SECONDS", 3600.0)
    sandbox.sandbox.authority.expire_all()  # the server refuses the token this process holds
    client.institutions.page()
    assert sandbox.sandbox.stats.by_route["POST /auth/refresh"] == 1  # renewed once, replayed
    client.institutions.page()
    assert sandbox.sandbox.stats.by_route["GET /institutions"] == 9  # 8 answered, one 401
