"""Prometheus for real (issue 16 part 2): the alert rules, the example scrape config and the Grafana
dashboard of deploy/, checked with Debian's `prometheus` package.

  1. `promtool check rules` / `promtool test rules` / `promtool check config` accept
     deploy/prometheus/ (alerts.yaml, alerts.test.yaml, prometheus.yml), and alerts.test.yaml has,
     for every alert, a case where it fires and one where it must not.
  2. A real Prometheus on loopback scrapes, every second, two sidecars: A serves /metrics on its
     admin listener (server.admin_listen) and B on its decision listener (no admin listener), plus
     a port where nothing listens. After a scripted run of decisions (allows, denials of known
     reasons, an AS fault, coalesced waits, JWTs valid and forged, an issuer whose key set cannot be
     fetched) its HTTP API must return the series with exactly the expected labels and values. The
     alert rules of alerts.yaml load there, evaluate without error, and AuthzSidecarDown goes
     pending for the dead target only.
  3. deploy/grafana/authz-sidecar.json: every metric its PromQL uses exists on the live /metrics
     (`up` on the live Prometheus), every query runs on the live Prometheus, and the main panels
     return data.

promtool and prometheus come from the Debian package `prometheus` (scripts/test.sh installs it);
PROMTOOL_BIN and PROMETHEUS_BIN override the paths. Missing binaries fail the tests, they do not
skip them.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from conftest import (_LOGS, ALL_TOKENS, INTROSPECTION_CLIENT_ID, INTROSPECTION_CLIENT_SECRET, REPO,
                      FakeAuthorizationServer, Sidecar, _QuietServer, http_request, policies, stack, stop_process,
                      tail)

PROM_DIR = REPO / "deploy" / "prometheus"
ALERTS = PROM_DIR / "alerts.yaml"
ALERTS_TEST = PROM_DIR / "alerts.test.yaml"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "authz-sidecar.json"
JOB = "authz-sidecar"
WAIT = 20.0   # bound on every wait for Prometheus (scrapes and rule evaluations run every second)


def _binary(env: str, name: str) -> str:
    path = os.environ.get(env) or shutil.which(name) or f"/usr/bin/{name}"
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"{name} not found ({path}): install the Debian package `prometheus` "
                    f"(apt-get install prometheus; scripts/test.sh does) or set {env}", pytrace=False)
    return path


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_binary("PROMTOOL_BIN", "promtool"), *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert:\s*(\S+)\s*$", ALERTS.read_text(), re.M)


# ---------------------------------------------------------------------------------------------
# 1. promtool
def test_promtool_check_rules():
    r = promtool("check", "rules", str(ALERTS.relative_to(REPO)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in r.stdout, r.stdout


def test_promtool_test_rules():
    r = promtool("test", "rules", str(ALERTS_TEST.relative_to(REPO)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout, r.stdout


def test_promtool_check_example_config():
    r = promtool("check", "config", str(PROM_CONFIG.relative_to(REPO)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 1 rule files found" in r.stdout and f"SUCCESS: {len(alert_names())} rules found" in r.stdout
    assert re.search(rf"^\s*- job_name:\s*{JOB}\s*$", PROM_CONFIG.read_text(), re.M), \
        f"alerts.yaml selects job={JOB}: the example must scrape under that name"


def test_every_alert_has_firing_and_quiet_cases():
    names = alert_names()
    assert len(names) == 6 and len(set(names)) == 6, names
    cases = re.findall(r"alertname:\s*(\S+)\s*\n\s*exp_alerts:\s*(\[\])?", ALERTS_TEST.read_text())
    fires = {n for n, empty in cases if not empty}
    quiet = {n for n, empty in cases if empty}
    assert set(names) <= fires, f"no firing case for {set(names) - fires}"
    assert set(names) <= quiet, f"no quiet case for {set(names) - quiet}"
    assert {n for n, _ in cases} <= set(names), "alerts.test.yaml names an alert alerts.yaml does not have"
    for block in re.split(r"^\s*- alert:", ALERTS.read_text(), flags=re.M)[1:]:
        name = block.split()[0]
        assert re.search(r"^\s*for:\s*\d+[smh]\s*$", block, re.M), f"{name}: no `for:`"
        assert re.search(r"^\s*severity:\s*(warning|critical)\s*$", block, re.M), f"{name}: no severity"
        assert re.search(r"^\s*summary:", block, re.M) and re.search(r"^\s*description:", block, re.M), \
            f"{name}: summary and description annotations"


# ---------------------------------------------------------------------------------------------
# 2. A live Prometheus scraping live sidecars
def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


JWT_KEY = ec.generate_private_key(ec.SECP256R1())
_PUB = JWT_KEY.public_key().public_numbers()
JWKS = {"keys": [{"kty": "EC", "kid": "k1", "use": "sig", "crv": "P-256", "x": b64u(_PUB.x.to_bytes(32, "big")),
                  "y": b64u(_PUB.y.to_bytes(32, "big"))}]}


def es256_jwt(iss: str, key=JWT_KEY, sub: str = "svc") -> str:
    header = b64u(json.dumps({"alg": "ES256", "typ": "at+jwt", "kid": "k1"}).encode())
    now = int(time.time())
    payload = b64u(json.dumps({"iss": iss, "aud": "api", "exp": now + 600, "iat": now, "sub": sub,
                               "scope": "system-access"}).encode())
    r, s = decode_dss_signature(key.sign(f"{header}.{payload}".encode(), ec.ECDSA(hashes.SHA256())))
    token = f"{header}.{payload}.{b64u(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
    ALL_TOKENS.add(token)
    return token


class KeySetServer:
    """GET /good/jwks: one ES256 key; anything else (/broken/jwks): 500."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                ok = self.path == "/good/jwks"
                body = json.dumps(JWKS).encode() if ok else b'{"error":"server_error"}'
                self.send_response(200 if ok else 500)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, name="jwks", daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class Prometheus:
    """/usr/bin/prometheus on a free loopback port, its TSDB and log in WORKDIR."""

    def __init__(self, workdir: Path, targets: dict[str, list[str]]):
        binary = _binary("PROMETHEUS_BIN", "prometheus")
        self.port = stack.free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        groups = "".join(f"      - targets: [{', '.join(json.dumps(t) for t in ts)}]\n"
                         f"        labels: {{listener: {listener}}}\n" for listener, ts in targets.items())
        self.config = workdir / "prometheus.yml"
        self.config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {json.dumps(str(ALERTS))}\n"
            f"scrape_configs:\n  - job_name: {JOB}\n    metrics_path: /metrics\n    static_configs:\n{groups}")
        self.log = workdir / "prometheus.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={self.config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=info"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir)
        _LOGS.append(("prometheus", self.log))
        try:
            stack.wait_http(self.base + "/-/ready", timeout=WAIT, proc=self.proc)
        except (TimeoutError, RuntimeError) as e:
            self.stop()
            pytest.fail(f"prometheus did not start: {e}\n{tail(self.log)}", pytrace=False)

    def api(self, path: str, **params) -> dict:
        url = f"{self.base}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=5) as r:
            doc = json.load(r)
        assert doc.get("status") == "success", doc
        return doc["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant query: the result vector."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]

    def values(self, expr: str, *labels: str) -> dict:
        """{(label values...): float} of an instant vector."""
        return {tuple(s["metric"].get(k, "") for k in labels): float(s["value"][1]) for s in self.query(expr)}

    def stop(self):
        stop_process(self.proc)


def eventually(fn, what: str, timeout: float = WAIT):
    """Call FN until it returns without AssertionError (bounded); then re-raise its last failure."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except AssertionError as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not so after {timeout:.0f} s: {e}") from None
            time.sleep(0.25)


def ask(sc: Sidecar, token: str, uri: str) -> int:
    return http_request(sc.base, "/authz", headers={"Authorization": f"Bearer {token}", "X-Original-URI": uri,
                                                    "X-Original-Method": "GET"}).status


# What the scripted run leaves on sidecar A: (policy, outcome, reason) -> count (non-zero series only).
EXPECTED_DECISIONS_A = {
    ("token-mtls", "allow", "granted"): 8,       # 5 sequential (1 miss, 4 hits) + 3 concurrent (1 miss, 2 waits)
    ("jwt-api", "allow", "granted"): 2,          # two JWTs verified with good-idp's key
    ("token-mtls", "deny", "inactive"): 3,       # three tokens the AS does not know
    ("admin", "deny", "insufficient_scope"): 2,  # a known token without the admin scope (cache hits)
    ("none", "deny", "no_policy"): 1,
    ("jwt-api", "deny", "jwt_invalid"): 1,       # a JWT signed by another key
    ("token-mtls", "fault", "as_fault"): 1,      # the AS answers 500
    ("jwt-broken", "fault", "as_fault"): 1,      # broken-idp's key set answers 500
}
EXPECTED_AS_CALLS_A = {"active": 2, "inactive": 3, "fault_status_5xx": 1}
EXPECTED_DECISIONS_B = {("token-mtls", "allow", "granted"): 2, ("token-mtls", "deny", "inactive"): 1}


class Live:
    pass


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    work = tmp_path_factory.mktemp("prometheus")
    fake = FakeAuthorizationServer().start()
    keys = KeySetServer()
    started: list = []
    try:
        introspection = {"endpoint": fake.url, "client_id": INTROSPECTION_CLIENT_ID,
                         "client_secret": INTROSPECTION_CLIENT_SECRET, "timeout_ms": 3000}
        admin_port = stack.free_port()
        admin = f"http://127.0.0.1:{admin_port}"
        a = Sidecar(work, name="sidecar-a", health_base=admin, config={
            "server": {"admin_listen": f"127.0.0.1:{admin_port}"},
            "introspection": introspection,
            "issuers": [
                {"name": "good-idp", "issuer": keys.base + "/good", "jwks_uri": keys.base + "/good/jwks",
                 "audiences": ["api"]},
                {"name": "broken-idp", "issuer": keys.base + "/broken", "jwks_uri": keys.base + "/broken/jwks",
                 "audiences": ["api"]},
            ],
            "cache": {"ttl_seconds": 60, "negative_ttl_seconds": 30},
            "policies": policies() + [
                {"name": "jwt-api", "match": {"path_prefix": "/jwt-api/"}, "issuers": ["good-idp"],
                 "required_scopes": ["system-access"]},
                {"name": "jwt-broken", "match": {"path_prefix": "/jwt-broken/"}, "issuers": ["broken-idp"]},
            ],
        })
        started.append(a)
        b = Sidecar(work, name="sidecar-b", config={"introspection": introspection, "cache": {"ttl_seconds": 60},
                                                      "policies": policies()})
        started.append(b)
        dead = f"127.0.0.1:{stack.free_port()}"   # nothing listens there
        prom = Prometheus(work, {"admin": [f"127.0.0.1:{admin_port}"],
                                 "decision": [f"127.0.0.1:{b.port}", dead]})
        started.append(prom)

        live = Live()
        live.prom, live.a, live.b, live.admin = prom, a, b, admin
        live.inst_a, live.inst_b, live.inst_dead = f"127.0.0.1:{admin_port}", f"127.0.0.1:{b.port}", dead

        # One scrape of the zero-initialised counters first, so that rate() and increase() see the run.
        eventually(lambda: _assert_up(prom, {live.inst_a: 1.0, live.inst_b: 1.0, dead: 0.0}), "first scrape")

        # ---- the scripted run, sidecar A
        stamp = time.monotonic_ns()
        good = fake.add_token(f"prom-good-{stamp}", {"active": True, "scope": "system-access",
                                                     "exp": int(time.time()) + 600})
        assert [ask(a, good, "/token-mtls/x") for _ in range(5)] == [200] * 5
        for i in range(3):
            unknown = f"prom-unknown-{stamp}-{i}"
            ALL_TOKENS.add(unknown)
            assert ask(a, unknown, "/token-mtls/x") == 401
        assert [ask(a, good, "/admin-api/x") for _ in range(2)] == [403, 403]
        assert ask(a, good, "/nowhere") == 403
        fake.mode = "500"
        try:
            assert ask(a, fake.add_token(f"prom-fault-{stamp}", {"active": True}), "/token-mtls/x") == 503
        finally:
            fake.mode = "ok"
        # three requests for one new token while the AS is slow: one AS call, two coalesced waits
        slow = fake.add_token(f"prom-slow-{stamp}", {"active": True, "scope": "system-access",
                                                     "exp": int(time.time()) + 600})
        fake.mode, fake.delay = "slow", 1.0
        try:
            with ThreadPoolExecutor(3) as pool:
                assert list(pool.map(lambda _: ask(a, slow, "/token-mtls/x"), range(3))) == [200] * 3
        finally:
            fake.mode = "ok"
        assert ask(a, es256_jwt(keys.base + "/good", sub="one"), "/jwt-api/x") == 200
        assert ask(a, es256_jwt(keys.base + "/good", sub="two"), "/jwt-api/x") == 200
        assert ask(a, es256_jwt(keys.base + "/good", key=ec.generate_private_key(ec.SECP256R1())), "/jwt-api/x") == 401
        assert ask(a, es256_jwt(keys.base + "/broken"), "/jwt-broken/x") == 503
        # ---- sidecar B
        assert [ask(b, good, "/token-mtls/x") for _ in range(2)] == [200, 200]
        unknown_b = f"prom-unknown-b-{stamp}"
        ALL_TOKENS.add(unknown_b)
        assert ask(b, unknown_b, "/token-mtls/x") == 401

        live.metrics_a = http_request(admin, "/metrics").body.decode()
        yield live
    finally:
        for proc in reversed(started):
            proc.stop()
        keys.stop()
        fake.stop()


def _assert_up(prom: Prometheus, expected: dict):
    assert prom.values(f'up{{job="{JOB}"}}', "instance") == {(k,): v for k, v in expected.items()}


def test_prometheus_scrapes_both_listeners(live):
    """A on its admin listener, B on its decision listener; the target where nothing listens is down."""
    _assert_up(live.prom, {live.inst_a: 1.0, live.inst_b: 1.0, live.inst_dead: 0.0})
    targets = live.prom.api("targets")["activeTargets"]
    by_instance = {t["labels"]["instance"]: t for t in targets}
    assert by_instance[live.inst_a]["labels"]["listener"] == "admin"
    assert by_instance[live.inst_b]["labels"]["listener"] == "decision"
    assert by_instance[live.inst_a]["health"] == "up" and by_instance[live.inst_b]["health"] == "up"
    assert by_instance[live.inst_dead]["health"] == "down"
    # the admin listener is the only one of A serving /metrics
    assert http_request(live.a.base, "/metrics").status == 404


def test_decision_series_labels_and_values(live):
    prom, a = live.prom, live.inst_a

    def decisions_a():
        got = prom.values(f'authz_decisions_total{{job="{JOB}", instance="{a}"}} > 0', "policy", "outcome", "reason")
        assert got == {k: float(v) for k, v in EXPECTED_DECISIONS_A.items()}

    eventually(decisions_a, "authz_decisions_total of sidecar A")
    by_outcome = prom.values(f'sum by (outcome) (authz_decisions_total{{instance="{a}"}})', "outcome")
    assert by_outcome == {("allow",): 10.0, ("deny",): 7.0, ("fault",): 2.0}
    # every series carries the scrape labels, and only the documented ones
    sample = prom.query(f'authz_decisions_total{{instance="{a}", outcome="allow", policy="jwt-api"}}')[0]["metric"]
    assert set(sample) == {"__name__", "job", "instance", "listener", "policy", "outcome", "reason"}, sample
    assert sample["job"] == JOB and sample["listener"] == "admin"
    # the sidecars' counters are zero-initialised: a reason that never happened is there with 0
    assert prom.values(f'authz_decisions_total{{instance="{a}", policy="admin", outcome="deny", reason="expired"}}',
                       "reason") == {("expired",): 0.0}

    def decisions_b():
        got = prom.values(f'authz_decisions_total{{instance="{live.inst_b}"}} > 0', "policy", "outcome", "reason")
        assert got == {k: float(v) for k, v in EXPECTED_DECISIONS_B.items()}
        assert prom.query(f'authz_decisions_total{{instance="{live.inst_b}"}}')[0]["metric"]["listener"] == "decision"

    eventually(decisions_b, "authz_decisions_total of sidecar B (decision listener)")


def test_as_cache_and_jwt_series(live):
    prom, a = live.prom, live.inst_a

    def check():
        assert prom.values(f'authz_introspection_calls_total{{instance="{a}"}} > 0', "outcome") == \
            {(k,): float(v) for k, v in EXPECTED_AS_CALLS_A.items()}
        calls = sum(EXPECTED_AS_CALLS_A.values())
        assert prom.values(f'authz_introspection_duration_seconds_count{{instance="{a}"}}') == {(): float(calls)}
        buckets = prom.values(f'authz_introspection_duration_seconds_bucket{{instance="{a}"}}', "le")
        assert buckets[("+Inf",)] == calls and len(buckets) >= 10, buckets
        assert all(buckets[k] <= buckets[("+Inf",)] for k in buckets)
        # the slow AS call took >= 1 s: it is above the 0.5 s bucket
        assert buckets[("0.5",)] <= calls - 1, buckets
        # lookups: 4 + 2 hits for the known token; misses: 6 AS calls + 4 JWTs (2 valid, 1 forged, 1 broken-idp)
        assert prom.values(f'authz_cache_hits_total{{instance="{a}"}}') == {(): 6.0}
        assert prom.values(f'authz_cache_misses_total{{instance="{a}"}}') == {(): 10.0}
        assert prom.values(f'authz_cache_coalesced_waits_total{{instance="{a}"}}') == {(): 2.0}
        assert prom.values(f'authz_jwt_verifications_total{{instance="{a}"}}', "issuer", "outcome") == {
            ("good-idp", "valid"): 2.0, ("good-idp", "invalid"): 1.0,
            ("broken-idp", "valid"): 0.0, ("broken-idp", "invalid"): 0.0}
        fetches = prom.values(f'authz_jwks_fetches_total{{instance="{a}"}}', "issuer", "outcome")
        assert fetches[("good-idp", "ok")] == 1 and fetches[("good-idp", "error")] == 0, fetches
        assert fetches[("broken-idp", "ok")] == 0 and fetches[("broken-idp", "error")] >= 1, fetches
        # no issuer label on the cache and AS series: they add up every issuer
        assert "issuer" not in prom.query(f'authz_cache_hits_total{{instance="{a}"}}')[0]["metric"]

    eventually(check, "AS, cache and JWT series of sidecar A")


def test_alert_rules_load_and_evaluate(live):
    names = alert_names()

    def check():
        groups = live.prom.api("rules", type="alert")["groups"]
        assert [g["file"] for g in groups] == [str(ALERTS)], groups
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        assert sorted(rules) == sorted(names)
        for name, r in rules.items():
            assert r["health"] == "ok", (name, r.get("lastError"))
            assert r["lastEvaluation"] and not r["lastEvaluation"].startswith("0001"), (name, "not evaluated yet")
            assert r["duration"] > 0, (name, "no for:")
            assert r["labels"].get("severity") in ("warning", "critical"), name
            assert r["annotations"].get("summary") and r["annotations"].get("description"), name

    eventually(check, "the rules of alerts.yaml in the live Prometheus")


def test_sidecar_down_alert_pending_for_the_dead_target_only(live):
    def check():
        alerts = live.prom.api("alerts")["alerts"]
        down = [x for x in alerts if x["labels"]["alertname"] == "AuthzSidecarDown"]
        assert [(x["labels"]["instance"], x["state"]) for x in down] == [(live.inst_dead, "pending")], down
        assert down[0]["labels"]["severity"] == "critical" and down[0]["labels"]["job"] == JOB
        assert down[0]["annotations"]["summary"] == f"authz-sidecar {live.inst_dead} is down"

    eventually(check, "AuthzSidecarDown pending for the dead target")


# ---------------------------------------------------------------------------------------------
# 3. The Grafana dashboard
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}
SYNTHETIC = {"up"}   # made by Prometheus itself, not on /metrics: checked on the live Prometheus


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets (rows included) and variable queries."""
    doc = json.loads(DASHBOARD.read_text())
    exprs = []

    def walk(panels):
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(doc["panels"])
    for v in doc["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q.strip())
            assert m, f"variable {v['name']}: {q}"
            exprs.append(m.group(1))
    return exprs


def metric_names(expr: str) -> set[str]:
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                      # string literals
    e = re.sub(r"\{[^}]*\}", " ", e)                                   # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)                                  # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)   # label lists
    e = re.sub(r"\$\{?\w+\}?", " ", e)                                 # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", e):
        word, call = m.group(1), m.group(2)
        if not call and word.lower() not in PROMQL_WORDS:
            names.add(word)
    return names


def grafana_to_promql(expr: str) -> str:
    return (expr.replace("$__rate_interval", "1m").replace("$__range", "5m").replace("$__interval", "15s")
            .replace('"$job"', '".*"').replace('"$instance"', '".*"').replace('"$policy"', '".*"'))


def test_dashboard_shape():
    doc = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = [p for p in doc["panels"] if p["type"] != "row"]
    titles = {p["title"] for p in panels}
    for t in ("Decisions by outcome", "Denials and faults by reason", "AS latency (introspection calls)",
              "Cache hit ratio", "Cache lookups and single-flight", "Top denied policies",
              "JWT verifications by issuer and outcome", "JWKS fetches by issuer and outcome"):
        assert t in titles, t
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
    assert len({p["id"] for p in doc["panels"]}) == len(doc["panels"])


def test_dashboard_metrics_exist_on_live_metrics(live):
    used = set().union(*(metric_names(e) for e in dashboard_queries()))
    # the extraction found what the dashboard is about (so the check below is not vacuous)
    assert {"authz_decisions_total", "authz_introspection_duration_seconds_bucket", "authz_introspection_calls_total",
            "authz_cache_hits_total", "authz_cache_misses_total", "authz_cache_coalesced_waits_total",
            "authz_jwt_verifications_total", "authz_jwks_fetches_total"} <= used, used
    exposed = {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{| )", live.metrics_a, re.M)}
    missing = sorted(n for n in used - SYNTHETIC if n not in exposed)
    assert not missing, f"the dashboard queries metrics that GET /metrics does not have: {missing}"
    for name in used & SYNTHETIC:
        assert live.prom.query(f'{name}{{job="{JOB}"}}'), name


def test_dashboard_queries_run_on_live_prometheus(live):
    results = {}
    for expr in dashboard_queries():
        results[expr] = live.prom.query(grafana_to_promql(expr))   # asserts status success (it parses)

    def panel_values(title: str, *labels: str) -> dict:
        doc = json.loads(DASHBOARD.read_text())
        panel = next(p for p in doc["panels"] if p["title"] == title)
        return live.prom.values(grafana_to_promql(panel["targets"][0]["expr"]), *labels)

    def check():
        outcomes = panel_values("Decisions by outcome", "outcome")
        assert set(outcomes) == {("allow",), ("deny",), ("fault",)} and all(v > 0 for v in outcomes.values()), outcomes
        top = panel_values("Top denied policies", "policy")
        assert set(top) == {("token-mtls",), ("admin",), ("none",), ("jwt-api",)}, top
        assert max(top, key=top.get) == ("token-mtls",), top
        p50 = panel_values("AS latency (introspection calls)")
        assert len(p50) == 1 and list(p50.values())[0] > 0, p50
        jwt = panel_values("JWT verifications by issuer and outcome", "issuer", "outcome")
        assert jwt[("good-idp", "valid")] > 0 and jwt[("good-idp", "invalid")] > 0, jwt

    eventually(check, "the dashboard's panels on the live Prometheus")
