"""Tokens bound to tenants (daemon/auth.py) and `flexcache tokens`, on real files:

- add / list / revoke round trip through the real command, the token alone on stdout;
- the file holds hashes, never a token, with mode 0600, and no temporary file is left;
- a revoked token stops identifying within reload_s, without a new Credentials;
- a file that becomes broken or disappears keeps the last good credentials, one warning per change;
- a file unusable at startup, or a bad tenant name, is one sentence (exit 2 from the command);
- certificate identities bind a CN to a tenant; concurrent writers lose no entry;
- the `tokens` verb imports none of the daemon's heavy packages.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flexcache.daemon import auth
from flexcache.daemon.validate import MAX_NAME_CHARS

CLI = [sys.executable, "-m", "flexcache.daemon.cli", "tokens"]
TOKEN = re.compile(r"fct_[A-Za-z0-9_-]{43}")


def run_tokens(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEXCACHE_")}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, env=env)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_add_list_revoke_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    added = run_tokens("add", "--file", str(path), "--tenant", "acme")
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert TOKEN.fullmatch(token) and added.stdout == token + "\n"  # only the token: TOKEN=$(...) works
    admin = run_tokens("add", "--file", str(path), "--admin")
    assert admin.returncode == 0, admin.stderr
    cert = run_tokens("add", "--file", str(path), "--tenant", "acme", "--certificate", "worker-1.acme")
    assert cert.returncode == 0 and not TOKEN.search(cert.stdout + cert.stderr)

    text = path.read_text()
    assert token not in text and admin.stdout.strip() not in text
    assert auth.token_hash(token) in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tokens.yaml.lock", "tokens.yaml"]  # no temp file

    token_id = auth.token_hash(token)[:auth.ID_CHARS]
    listed = run_tokens("list", "--file", str(path))
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["KIND", "ID", "TENANT", "ADMIN", "CREATED"]
    assert lines[1].split()[:4] == ["token", token_id, "acme", "no"]
    assert lines[2].split()[2:4] == ["(all)", "yes"]
    assert lines[3].split()[:4] == ["cert", "worker-1.acme", "acme", "no"]
    assert auth.token_hash(token) not in listed.stdout  # list shows ids, not hashes

    credentials = auth.Credentials(path)
    assert credentials.identify_token(token) == auth.Identity("acme", False, f"token:{token_id}")
    assert credentials.identify_token(admin.stdout.strip()).admin
    assert credentials.identify_certificate("worker-1.acme") == auth.Identity("acme", False, "cert:worker-1.acme")

    revoked = run_tokens("revoke", "--file", str(path), token_id)
    assert revoked.returncode == 0, revoked.stderr
    assert token_id not in run_tokens("list", "--file", str(path)).stdout
    again = run_tokens("revoke", "--file", str(path), token_id)
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "Traceback" not in again.stderr
    assert run_tokens("revoke", "--file", str(path), "worker-1.acme").returncode == 0
    assert [e.kind for e in auth.list_entries(path)] == ["token"]  # the admin token is left


@pytest.mark.parametrize("tenant", ["", "x" * (MAX_NAME_CHARS + 1), "acme/x"])
def test_bad_tenant_name_is_one_sentence_and_exit_2(tmp_path: Path, tenant: str) -> None:
    path = tmp_path / "tokens.yaml"
    result = run_tokens("add", "--file", str(path), "--tenant", tenant)
    assert result.returncode == 2 and result.stdout == ""
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert result.stderr.startswith("flexcache tokens add: ") and "tenant name" in result.stderr
    assert not path.exists()


def test_the_longest_tenant_name_a_namespace_may_carry_is_accepted(tmp_path: Path) -> None:
    token, _ = auth.add_token(tmp_path / "t.yaml", "x" * MAX_NAME_CHARS)
    assert auth.Credentials(tmp_path / "t.yaml").identify_token(token).tenant == "x" * MAX_NAME_CHARS


def test_add_without_tenant_or_file_is_refused(tmp_path: Path) -> None:
    no_tenant = run_tokens("add", "--file", str(tmp_path / "t.yaml"))
    assert no_tenant.returncode == 2 and "--tenant" in no_tenant.stderr
    no_file = run_tokens("add", "--tenant", "acme")
    assert no_file.returncode == 2 and "--file" in no_file.stderr


def test_identity_may_use() -> None:
    tenant = auth.Identity("acme", False, "token:0")
    assert tenant.may_use("acme") and not tenant.may_use("globex") and not tenant.may_use("")
    assert auth.Identity("", True, "token:1").may_use("globex")
    assert auth.Identity("acme", True, "token:2").may_use("globex")


def test_unknown_tokens_identify_nobody(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    token, _ = auth.add_token(path, "acme")
    credentials = auth.Credentials(path)
    for other in ("", "fct_", token + "x", token[:-1], auth.token_hash(token), auth.new_token()):
        assert credentials.identify_token(other) is None
    assert credentials.identify_certificate("") is None and credentials.identify_certificate("nobody") is None
    assert credentials.tenants() == {"acme"}


def test_a_revoked_token_stops_identifying_within_reload_s(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    token, entry = auth.add_token(path, "acme")
    other, _ = auth.add_token(path, "globex")
    credentials = auth.Credentials(path, reload_s=0.2)
    assert credentials.identify_token(token) is not None
    assert auth.revoke(path, entry.id)
    revoked_at = time.monotonic()
    while credentials.identify_token(token) is not None:
        assert time.monotonic() - revoked_at < 2.0, "the revoked token still identifies"
        time.sleep(0.02)
    # Loose for a busy machine (reload_s 0.2, far below the default); the exact schedule of the checks is
    # test_the_file_is_checked_at_most_every_reload_s's, on a clock of its own.
    assert time.monotonic() - revoked_at < 2.0
    assert credentials.identify_token(other).tenant == "globex"  # the others are untouched


def test_the_file_is_checked_at_most_every_reload_s(tmp_path: Path) -> None:
    path, clock = tmp_path / "t.yaml", Clock()
    token, entry = auth.add_token(path, "acme")
    credentials = auth.Credentials(path, reload_s=0.5, clock=clock)  # not the default 1 s: reload_s is used
    auth.revoke(path, entry.id)
    clock.now = 0.45
    assert credentials.identify_token(token) is not None  # not checked yet
    clock.now = 0.5
    assert credentials.identify_token(token) is None
    new, _ = auth.add_token(path, "acme")
    assert credentials.identify_token(new) is None
    assert credentials.check_now() and credentials.identify_token(new) is not None


def test_a_broken_file_keeps_the_old_tokens_and_warns_once_per_change(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    path, clock = tmp_path / "t.yaml", Clock()
    token, _ = auth.add_token(path, "acme")
    credentials = auth.Credentials(path, reload_s=1.0, clock=clock)
    good = path.read_text()
    caplog.set_level(logging.WARNING, logger="flexcache.daemon.auth")
    for broken in ("tokens: [unclosed", "", "tokens:\n  - sha256: nothex\n    tenant: acme\n"):
        path.write_text(broken)
        os.utime(path, ns=(time.time_ns(), time.time_ns() + len(broken)))  # a change whatever the clock's tick
        caplog.clear()
        for _ in range(5):
            clock.now += 1.0
            assert credentials.identify_token(token) == auth.Identity("acme", False,
                                                                      f"token:{auth.token_hash(token)[:12]}")
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert str(path) in warnings[0].getMessage() and warnings[0].exc_info is None
    path.unlink()
    caplog.clear()
    for _ in range(3):
        clock.now += 1.0
        assert credentials.identify_token(token) is not None
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    path.write_text(good.replace("tenant: acme", "tenant: globex"))
    clock.now += 1.0
    assert credentials.identify_token(token).tenant == "globex"  # a good file again takes effect


@pytest.mark.parametrize(("text", "problem"), [
    ("tokens: [unclosed", "is not valid YAML"),
    ("", "is empty"),
    ("- a\n- b\n", "must be a mapping"),
    ("tokens: []\nusers: []\n", "unknown key 'users'"),
    ("tokens: {}\n", "tokens must be a list"),
    ("tokens:\n  - sha256: " + "a" * 63 + "\n    tenant: acme\n", "sha256 must be 64 hex characters"),
    ("tokens:\n  - sha256: " + "a" * 64 + "\n", "tenant name must be a non-empty string"),
    ("certificates:\n  - {cn: w, tenant: acme/x}\n", "contains '/'"),
    ("tokens:\n  - sha256: " + "a" * 64 + "\n    tenant: acme\n    admin: maybe\n", "admin must be true or false"),
    ("tokens:\n  - id: bbbbbbbbbbbb\n    sha256: " + "a" * 64 + "\n    tenant: acme\n", "is not the first 12"),
    ("tokens:\n  - {sha256: " + "a" * 64 + ", tenant: a}\n  - {sha256: " + "a" * 64 + ", tenant: b}\n",
     "appears twice"),
    ("certificates:\n  - {cn: w, tenant: a}\n  - {cn: w, tenant: b}\n", "certificate CN 'w' appears twice"),
    ("certificates:\n  - {tenant: a}\n", "cn must be a non-empty string"),
    ("tokens:\n  - {sha256: " + "a" * 64 + ", tenant: acme, secret: x}\n", "unknown key 'secret'"),
])
def test_a_file_unusable_at_startup_is_one_sentence(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(auth.AuthConfigError) as caught:
        auth.Credentials(path)
    message = str(caught.value)
    assert problem in message and str(path) in message and "\n" not in message


def test_a_missing_file_at_startup_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(auth.AuthConfigError, match=r"cannot read tokens file .*missing\.yaml: No such file"):
        auth.Credentials(tmp_path / "missing.yaml")
    listed = run_tokens("list", "--file", str(tmp_path / "missing.yaml"))
    assert listed.returncode == 2 and listed.stderr.count("\n") == 1


def test_a_hand_written_file_without_ids_and_with_unquoted_timestamps_loads(tmp_path: Path) -> None:
    token = auth.new_token()
    path = tmp_path / "t.yaml"
    path.write_text(f"tokens:\n  - sha256: {auth.token_hash(token).upper()}\n    tenant: acme\n"
                    "    created: 2026-12-01T11:00:00Z\ncertificates:\n")
    identity = auth.Credentials(path).identify_token(token)
    assert identity is not None and identity.writer == f"token:{auth.token_hash(token)[:12]}"


def test_adding_to_an_invalid_file_does_not_overwrite_it(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("tokens: [unclosed")
    result = run_tokens("add", "--file", str(path), "--tenant", "acme")
    assert result.returncode == 2 and "not valid YAML" in result.stderr and result.stdout == ""
    assert path.read_text() == "tokens: [unclosed"


def test_certificate_identities(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    auth.add_certificate(path, "worker-1.acme", "acme")
    auth.add_certificate(path, "ops", "", admin=True)
    with pytest.raises(auth.AuthConfigError, match=r"already binds certificate CN 'worker-1\.acme'"):
        auth.add_certificate(path, "worker-1.acme", "globex")
    with pytest.raises(auth.AuthConfigError, match="only an admin may have none"):
        auth.add_certificate(path, "worker-2", "")
    again = run_tokens("add", "--file", str(path), "--tenant", "globex", "--certificate", "worker-1.acme")
    assert again.returncode == 2 and again.stderr.count("\n") == 1
    credentials = auth.Credentials(path)
    assert credentials.identify_certificate("ops") == auth.Identity("", True, "cert:ops")
    assert credentials.identify_certificate("worker-1.acme").may_use("acme")
    assert not credentials.identify_certificate("worker-1.acme").may_use("globex")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_concurrent_writers_lose_no_entry(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    tokens: list[str] = []

    def add(i: int) -> None:
        tokens.append(auth.add_token(path, f"tenant-{i}")[0])

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    credentials = auth.Credentials(path)
    assert len(auth.list_entries(path)) == 8
    assert all(credentials.identify_token(token) is not None for token in tokens)


def test_a_write_keeps_mode_0600_over_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("tokens: []\n")
    path.chmod(0o644)
    auth.add_token(path, "acme")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_tokens_verb_imports_no_heavy_package(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    auth.add_token(path, "acme")
    heavy = ("rocksdict", "qdrant_client", "qdrant_edge", "prometheus_client", "torch")
    code = ("import sys, contextlib, io\nfrom flexcache.daemon import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    assert cli.main(['tokens', 'list', '--file', {str(path)!r}]) == 0\n"
            f"print(' '.join(m for m in {heavy!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == []
