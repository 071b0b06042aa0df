"""Settings: the CONTRACT §1 variables, .env support, one-line errors, hidden secrets."""

from __future__ import annotations

import pytest

from dokstamp_sync.config import ConfigError, load_settings, load_store_settings
from dokstamp_sync.dokstamp import ClientCredentials, PasswordLogin, credentials_from_settings

VARS = ("DOKSTAMP_API_URL", "DOKSTAMP_TENANT", "DOKSTAMP_EMAIL", "DOKSTAMP_PASSWORD",
        "DOKSTAMP_CLIENT_ID", "DOKSTAMP_CLIENT_SECRET", "DOKSTAMP_RATE_LIMIT", "REDIS_URL",
        "DATABASE_URL", "DOKSTAMP_SYNC_STREAM", "DOKSTAMP_ISSUE_STYLE", "DOKSTAMP_TIMEOUT")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """Each test starts from an empty environment in an empty folder (no stray .env)."""
    for name in VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def test_defaults_follow_the_contract(monkeypatch):
    """Unset variables take CONTRACT §1's defaults."""
    monkeypatch.setenv("DOKSTAMP_TENANT", "uni")
    monkeypatch.setenv("DOKSTAMP_EMAIL", "a@uni.edu")
    monkeypatch.setenv("DOKSTAMP_PASSWORD", "pw")
    s = load_settings()
    assert s.dokstamp_api_url == "https://api.dokstamp.com"
    assert s.dokstamp_rate_limit == 10
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.database_url == "postgresql+psycopg://postgres@localhost/dokstamp_sync"
    assert s.dokstamp_sync_stream == "dokstamp:events"
    assert s.dokstamp_issue_style == "status"  # auto, resolved for a password login
    assert s.dokstamp_sync_metrics_address == "127.0.0.1"  # /metrics on loopback unless told


def test_dotenv_file_is_read(tmp_path):
    """A .env in the working folder supplies the variables."""
    (tmp_path / ".env").write_text("DOKSTAMP_TENANT=from-file\nDOKSTAMP_CLIENT_ID=cid\n"
                                   "DOKSTAMP_CLIENT_SECRET=csecret\nDOKSTAMP_RATE_LIMIT=25\n")
    s = load_settings()
    assert (s.dokstamp_tenant, s.dokstamp_rate_limit) == ("from-file", 25)
    assert isinstance(credentials_from_settings(s), ClientCredentials)


def test_missing_tenant_is_one_clear_line(monkeypatch):
    """No DOKSTAMP_TENANT: one line naming the variable."""
    monkeypatch.setenv("DOKSTAMP_EMAIL", "a@uni.edu")
    monkeypatch.setenv("DOKSTAMP_PASSWORD", "pw")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value) == "configuration error: DOKSTAMP_TENANT is not set"


def test_missing_credentials_are_one_clear_line(monkeypatch):
    """No credential pair at all, or half a pair, is named in one line."""
    monkeypatch.setenv("DOKSTAMP_TENANT", "uni")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "no DokStamp credentials" in str(info.value)
    assert "\n" not in str(info.value)
    monkeypatch.setenv("DOKSTAMP_EMAIL", "a@uni.edu")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "DOKSTAMP_PASSWORD is not set" in str(info.value)


def test_secrets_never_show(monkeypatch):
    """repr/str of the settings and of the credentials do not contain the secrets."""
    monkeypatch.setenv("DOKSTAMP_TENANT", "uni")
    monkeypatch.setenv("DOKSTAMP_EMAIL", "a@uni.edu")
    monkeypatch.setenv("DOKSTAMP_PASSWORD", "hunter2-password")
    monkeypatch.setenv("DOKSTAMP_CLIENT_ID", "cid")
    monkeypatch.setenv("DOKSTAMP_CLIENT_SECRET", "hunter2-secret")
    s = load_settings()
    creds = credentials_from_settings(s)
    text = f"{s!r} {s} {s.model_dump()} {creds!r}"
    assert "hunter2" not in text
    assert s.dokstamp_password.get_secret_value() == "hunter2-password"


def test_password_login_used_when_only_that_pair_is_set(monkeypatch):
    """Email and password alone select the password login."""
    monkeypatch.setenv("DOKSTAMP_TENANT", "uni")
    monkeypatch.setenv("DOKSTAMP_EMAIL", "a@uni.edu")
    monkeypatch.setenv("DOKSTAMP_PASSWORD", "pw")
    assert isinstance(credentials_from_settings(load_settings()), PasswordLogin)


def test_invalid_value_is_reported_without_its_value(monkeypatch):
    """A bad rate limit is reported by name."""
    monkeypatch.setenv("DOKSTAMP_TENANT", "uni")
    monkeypatch.setenv("DOKSTAMP_EMAIL", "a@uni.edu")
    monkeypatch.setenv("DOKSTAMP_PASSWORD", "pw")
    monkeypatch.setenv("DOKSTAMP_RATE_LIMIT", "-5")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).startswith("configuration error: DOKSTAMP_RATE_LIMIT")


def test_blank_credential_pair_counts_as_unset(tmp_path):
    """The .env.example style (unused pair left as NAME=) selects the other pair."""
    (tmp_path / ".env").write_text("DOKSTAMP_TENANT=uni\nDOKSTAMP_EMAIL=\nDOKSTAMP_PASSWORD=\n"
                                   "DOKSTAMP_CLIENT_ID=cid\nDOKSTAMP_CLIENT_SECRET=sec\n")
    assert isinstance(credentials_from_settings(load_settings()), ClientCredentials)


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql+psycopg://u:p%40ss@db:5432/x", "postgresql+psycopg://u:***@db:5432/x"),
    ("postgresql+psycopg://u:p@ss@db/x", "postgresql+psycopg://u:***@db/x"),
    ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
    ("redis://h:6379/0?password=s3cret&db=2", "redis://h:6379/0?password=***&db=2"),
    ("postgresql+psycopg://u@db/x?sslmode=require&password=s3cret&sslpassword=k3y",
     "postgresql+psycopg://u@db/x?sslmode=require&password=***&sslpassword=***"),
    ("rediss://u:s3cret@h/0?PASSWORD=again", "rediss://u:***@h/0?PASSWORD=***"),
    ("sqlite:////tmp/store.db", "sqlite:////tmp/store.db"),
    ("postgresql+psycopg://postgres@localhost/db", "postgresql+psycopg://postgres@localhost/db"),
])
def test_redact_url_hides_every_password(url, shown):
    """A URL's password is hidden wherever it is: user:password@ (with @ or %40 in it) and
    password-like query parameters (psycopg's password/sslpassword, redis-py's password);
    a URL without one is shown as it is."""
    from dokstamp_sync.config import redact_url

    assert redact_url(url) == shown


def test_a_database_url_without_a_driver_is_one_clear_line(monkeypatch):
    """DATABASE_URL=postgres://... (Heroku's spelling) or an unknown scheme: a ConfigError
    naming DATABASE_URL and the form to write, never the URL (it may hold a password)."""
    monkeypatch.setenv("DATABASE_URL", "postgres://u:s3cret@db/x")
    with pytest.raises(ConfigError) as exc:
        load_store_settings()
    assert str(exc.value).startswith("configuration error: DATABASE_URL: the scheme postgres://")
    assert "s3cret" not in str(exc.value)
    monkeypatch.setenv("DATABASE_URL", "mysqlx://u:s3cret@db/x")
    with pytest.raises(ConfigError, match="is not one SQLAlchemy knows"):
        load_store_settings()


def test_the_change_guard_defaults_follow_contract_6(monkeypatch):
    """Unset, the guard's settings are CONTRACT §6's: a 1 h window, 10 % of a kind's active
    mappings and at least 20, a 60 s settle delay (tests set 0 in sandbox_settings, never
    production); a threshold above 100 % is refused with a one-line error."""
    from dokstamp_sync.guard import GuardPolicy

    for name in ("DOKSTAMP_SYNC_GUARD_WINDOW", "DOKSTAMP_SYNC_GUARD_THRESHOLD",
                 "DOKSTAMP_SYNC_GUARD_MIN", "DOKSTAMP_SYNC_GUARD_DELAY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DOKSTAMP_TENANT", "uni")
    monkeypatch.setenv("DOKSTAMP_EMAIL", "a@uni.edu")
    monkeypatch.setenv("DOKSTAMP_PASSWORD", "pw")
    assert GuardPolicy.from_settings(load_settings()) == GuardPolicy(
        window=3600.0, threshold=10.0, minimum=20, delay=60.0)
    monkeypatch.setenv("DOKSTAMP_SYNC_GUARD_THRESHOLD", "150%")
    with pytest.raises(ConfigError, match="DOKSTAMP_SYNC_GUARD_THRESHOLD"):
        load_settings()
