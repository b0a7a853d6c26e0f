"""Operations of the real binary: live reload (SIGHUP and file change), invalid configuration
rejected, separate admin listener, JSON logs without tokens, graceful exit on SIGTERM."""
import json
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import (INTROSPECTION_CLIENT_ID, INTROSPECTION_CLIENT_SECRET, Sidecar, http_request, policies,
                      stop_process, to_yaml)
import stack


def base_config(fake_as, **extra) -> dict:
    config = {
        "introspection": {"endpoint": fake_as.url, "client_id": INTROSPECTION_CLIENT_ID,
                          "client_secret": INTROSPECTION_CLIENT_SECRET, "timeout_ms": 1000},
        "cache": {"ttl_seconds": 60},
        "logging": {"format": "json", "level": "info"},
        "policies": policies(),
    }
    config.update(extra)
    return config


def ask(sc: Sidecar, token: str, uri: str = "/token-mtls/api/"):
    return http_request(sc.base, "/authz", headers={"Authorization": f"Bearer {token}", "X-Original-URI": uri,
                                                    "X-Original-Method": "GET"})


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def write(sc: Sidecar, config: dict) -> None:
    config = dict(config)
    config["server"] = {**config.get("server", {}), "listen": f"127.0.0.1:{sc.port}"}
    tmp = sc.config_path.with_suffix(".tmp")
    tmp.write_text(to_yaml(config) + "\n")
    os.replace(tmp, sc.config_path)


@pytest.fixture
def unbound_token(fake_as):
    token = f"ops-{time.monotonic_ns()}"
    fake_as.add_token(token, {"active": True, "scope": "system-access", "exp": int(time.time()) + 600})
    return token


def test_sighup_reload_swaps_policies_and_keeps_the_cache(tmp_path, fake_as, unbound_token):
    sc = Sidecar(tmp_path, base_config(fake_as))
    try:
        assert ask(sc, unbound_token).status == 200
        calls = fake_as.calls[unbound_token]
        config = base_config(fake_as)
        config["policies"][0]["required_scopes"] = ["something-else"]
        write(sc, config)
        sc.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: ask(sc, unbound_token).status == 403), "reload did not apply the new policy"
        assert fake_as.calls[unbound_token] == calls, "the cache should be kept: same AS and credentials"
        # the new policy is in force a moment before the reload is logged
        assert wait_for(lambda: "configuration reloaded" in sc.log_path.read_text())
        assert '"authz.cache":"kept"' in sc.log_path.read_text()
    finally:
        sc.stop()


def test_file_change_reload_and_invalid_configuration_rejected(tmp_path, fake_as, unbound_token):
    sc = Sidecar(tmp_path, base_config(fake_as))
    try:
        assert ask(sc, unbound_token).status == 200
        # An invalid file: rejected, logged, the running configuration stays.
        sc.config_path.write_text("policies: [\n")
        assert wait_for(lambda: "configuration rejected" in sc.log_path.read_text())
        assert ask(sc, unbound_token).status == 200
        assert http_request(sc.base, "/healthz").status == 200
        # A valid change is picked up without a signal; a new AS endpoint drops the cache.
        config = base_config(fake_as)
        config["introspection"]["timeout_ms"] = 900
        config["policies"][0]["required_scopes"] = ["something-else"]
        write(sc, config)
        assert wait_for(lambda: ask(sc, unbound_token).status == 403)
        assert wait_for(lambda: '"authz.cache":"dropped"' in sc.log_path.read_text())
    finally:
        sc.stop()


def test_admin_listener_apart_from_decisions(tmp_path, fake_as, unbound_token):
    admin_port = stack.free_port()
    admin = f"http://127.0.0.1:{admin_port}"
    sc = Sidecar(tmp_path, base_config(fake_as, server={"admin_listen": f"127.0.0.1:{admin_port}"}), health_base=admin)
    try:
        assert http_request(admin, "/healthz").status == 200
        assert http_request(admin, "/readyz").status == 200
        assert ask(sc, unbound_token).status == 200
        metrics = http_request(admin, "/metrics")
        assert metrics.status == 200
        assert b'authz_decisions_total{policy="token-mtls",outcome="allow",reason="granted"}' in metrics.body
        # the decision listener does not serve admin paths, and the admin one no decisions
        assert http_request(sc.base, "/metrics").status == 404
        assert http_request(sc.base, "/healthz").status == 404
        assert http_request(sc.base, "/admin/cache/purge", method="POST", body=b'{"all":true}').status == 404
        assert http_request(admin, "/authz", headers={"X-Original-URI": "/token-mtls/"}).status == 404
        purged = http_request(admin, "/admin/cache/purge", method="POST", body=json.dumps({"token": unbound_token}).encode())
        assert purged.status == 200 and json.loads(purged.body) == {"purged": 1}
    finally:
        sc.stop()


def test_json_logs_one_line_per_denial_and_no_token(tmp_path, fake_as, unbound_token):
    sc = Sidecar(tmp_path, base_config(fake_as))
    try:
        assert ask(sc, unbound_token).status == 200
        assert ask(sc, "not-a-known-token").status == 401
        assert ask(sc, unbound_token, uri="/admin-api/x").status == 403
        time.sleep(0.2)
        lines = [json.loads(line) for line in sc.log_path.read_text().splitlines() if line.startswith("{")]
        denials = [line for line in lines if line.get("message") == "denied"]
        assert {d["authz.reason"] for d in denials} >= {"inactive", "insufficient_scope"}
        assert all(len(d["authz.token"]) == 8 for d in denials)
        assert not any(line.get("message") == "allowed" for line in lines), "allows are logged at debug only"
        text = sc.log_path.read_text()
        assert unbound_token not in text and "not-a-known-token" not in text
        assert INTROSPECTION_CLIENT_SECRET not in text
    finally:
        sc.stop()


def test_sigterm_exits_promptly_and_cleanly(tmp_path, fake_as):
    sc = Sidecar(tmp_path, base_config(fake_as))
    started = time.monotonic()
    sc.proc.send_signal(signal.SIGTERM)
    code = sc.proc.wait(timeout=10)
    assert code == 0
    assert time.monotonic() - started < 5
