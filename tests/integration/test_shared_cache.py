"""The cache shared by replicas through Redis (issue 14, DESIGN.md §11), against the real binary:
four sidecar processes, one redis-server and the fake AS, all on 127.0.0.1.

  1. a stream over 1,000 tokens spread across the 4 replicas costs 1,000 AS calls, not 4,000
     (and 4,000 without the shared cache, for comparison);
  2. a purge on one replica reaches the others (and a lookup in flight on another one) within
     milliseconds; purge by digest and purge of everything (epoch) too;
  3. entries written straight into redis that do not open (forged, corrupted, copied from
     another key, plain JSON) are ignored, counted and never overwritten; a genuine entry lives
     no longer than its token and is not served past `exp` even if written back; a replica with
     another seal key simply misses;
  4. the store unreachable (paused or dead) at a purge: 200 with "propagated": false, decisions
     still right;
  5. under bounded load, redis paused (SIGSTOP) 5 s, killed and restarted: no wrong decision,
     p99 below the store timeout + the AS latency (+ slack for this machine), and the shared
     cache fills again after the restart;
  6. check-config shows `cache.shared` without the seal key; a url without a valid key is refused.

The store is Debian's redis-server (scripts/test.sh installs it), spoken to over raw RESP sockets.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import (ALL_TOKENS, INTROSPECTION_CLIENT_ID, INTROSPECTION_CLIENT_SECRET, SIDECAR_BIN,
                      FakeAuthorizationServer, Sidecar, http_request, stop_process, tail, to_yaml, _LOGS)
import stack

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
pytestmark = pytest.mark.skipif(not os.path.exists(REDIS_SERVER),
                                reason="redis-server is not installed (apt-get install -y redis-server redis-tools; "
                                       "scripts/test.sh installs it)")

REPLICAS = 4
STORE_TIMEOUT_MS = 50
DEGRADED_TTL_S = 2
PREFIX = "authz:"
ISSUER = "default"          # the top-level introspection block is the issuer `default`
URI = "/api/x"
POLICIES = [{"name": "api", "match": {"path_prefix": "/api/"}, "required_scopes": ["system-access"]}]
REQUEST_TIMEOUT = 5.0       # every decision request of this module


# ---------------------------------------------------------------------------------------------
# Redis: the server, and a raw RESP client
class RedisError(Exception):
    pass


def _read_line(sock, buf: bytearray) -> bytes:
    while b"\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("redis closed the connection")
        buf.extend(chunk)
    i = buf.index(b"\r\n")
    line = bytes(buf[:i])
    del buf[:i + 2]
    return line


def _read_exact(sock, buf: bytearray, n: int) -> bytes:
    while len(buf) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("redis closed the connection")
        buf.extend(chunk)
    data = bytes(buf[:n])
    del buf[:n]
    return data


def _read_reply(sock, buf: bytearray):
    line = _read_line(sock, buf)
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RedisError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = _read_exact(sock, buf, n + 2)
        return data[:-2]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_reply(sock, buf) for _ in range(n)]
    raise RedisError(f"unexpected RESP line {line!r}")


def _encode(*args) -> bytes:
    out = b"*%d\r\n" % len(args)
    for a in args:
        if isinstance(a, int):
            a = str(a)
        if isinstance(a, str):
            a = a.encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


def redis_cmd(port: int, *args, timeout: float = 2.0):
    """One command on a fresh connection: its reply (str, int, bytes, list or None)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(_encode(*args))
        return _read_reply(sock, bytearray())


class Subscriber:
    """A raw SUBSCRIBE connection (to read the purge channel's messages)."""

    def __init__(self, port: int, channel: str, timeout: float = 3.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.buf = bytearray()
        self.sock.sendall(_encode("SUBSCRIBE", channel))
        reply = _read_reply(self.sock, self.buf)
        assert reply[0] == b"subscribe", reply

    def message(self) -> bytes:
        reply = _read_reply(self.sock, self.buf)
        assert reply[0] == b"message", reply
        return reply[2]

    def close(self):
        self.sock.close()


class RedisServer:
    """redis-server on a free loopback port, no persistence; restartable on the same port."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = stack.free_port()
        self.proc: "subprocess.Popen | None" = None
        self.starts = 0
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.starts += 1
        self.log_path = self.dir / f"redis-{self.starts}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.dir), "--daemonize", "no"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(self.dir))
        _LOGS.append((f"redis #{self.starts}", self.log_path))
        deadline = time.monotonic() + 10
        while True:
            try:
                if redis_cmd(self.port, "PING", timeout=0.5) == "PONG":
                    return
            except (OSError, RedisError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start:\n{tail(self.log_path)}", pytrace=False)
            time.sleep(0.05)

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL (works on a stopped process too); its data is gone (no persistence)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            stop_process(self.proc, timeout=5)

    def cmd(self, *args, timeout: float = 2.0):
        return redis_cmd(self.port, *args, timeout=timeout)


def entry_key(token: str, prefix: str = PREFIX) -> str:
    return f"{prefix}{ISSUER}:{hashlib.sha256(token.encode()).hexdigest()}"


# ---------------------------------------------------------------------------------------------
# The fake AS, with per-token one-shot delays and an optional latency for every call
class DelayedTokens(dict):
    """FakeAuthorizationServer.tokens: the handler reads a token's answer with .get() when the call
    arrives; this one then sleeps (the answer stays what the AS knew on arrival)."""

    def __init__(self):
        super().__init__()
        self.once: dict[str, float] = {}      # token -> delay of its next call only
        self.latency = 0.0                    # added to every call
        self._lock = threading.Lock()

    def get(self, key, default=None):
        value = dict.get(self, key, default)
        with self._lock:
            delay = self.once.pop(key, 0.0) + self.latency
        if delay:
            time.sleep(delay)
        return value


class SharedAS(FakeAuthorizationServer):
    def __init__(self):
        super().__init__()
        self.tokens = DelayedTokens()

    def reset(self) -> None:
        self.mode = "ok"
        self.tokens.once.clear()
        self.tokens.latency = 0.0

    def calls_for(self, tokens) -> int:
        with self._lock:
            return sum(self.calls[t] for t in tokens)


def new_token(prefix: str = "shared") -> str:
    return f"{prefix}-" + secrets.token_urlsafe(24)


def active_claims() -> dict:
    now = int(time.time())
    return {"active": True, "scope": "system-access", "client_id": "shared-client", "exp": now + 900,
            "iat": now - 5, "sub": "svc-" + secrets.token_hex(4)}


INACTIVE = {"active": False}


def bulk_tokens(fake: SharedAS, n_active: int, n_inactive: int, prefix: str) -> dict[str, int]:
    """token -> the status its truth calls for. Only every 25th token goes to ALL_TOKENS (the
    last test of the suite looks for every one of those in every sidecar log)."""
    truth = {}
    for i in range(n_active + n_inactive):
        token = new_token(prefix)
        is_active = i < n_active
        fake.tokens[token] = active_claims() if is_active else dict(INACTIVE)
        if i % 25 == 0:
            ALL_TOKENS.add(token)
        truth[token] = 200 if is_active else 401
    return truth


# ---------------------------------------------------------------------------------------------
# Sidecars
def replica_config(fake: SharedAS, redis: "RedisServer | None", seal_key_file: "Path | None", **shared) -> dict:
    config = {
        "server": {},
        "introspection": {"endpoint": fake.url, "client_id": INTROSPECTION_CLIENT_ID,
                          "client_secret": INTROSPECTION_CLIENT_SECRET, "auth_method": "client_secret_basic",
                          "timeout_ms": 2000},
        # inactive answers live long enough that a stream of a few seconds asks each token once
        "cache": {"ttl_seconds": 60, "negative_ttl_seconds": 60},
        "logging": {"format": "json", "level": "info"},
        "policies": POLICIES,
    }
    if redis is not None:
        config["cache"]["shared"] = {"url": redis.url, "key_prefix": PREFIX, "timeout_ms": STORE_TIMEOUT_MS,
                                     "seal_key_file": str(seal_key_file),
                                     "degraded_ttl_seconds": DEGRADED_TTL_S, **shared}
    return config


def start_replicas(workdir: Path, config: dict, n: int, name: str) -> list[Sidecar]:
    out: list[Sidecar] = []
    try:
        for i in range(n):
            out.append(Sidecar(workdir / f"{name}-{i + 1}", config, name=f"{name}-{i + 1}"))
    except BaseException:
        for sc in out:
            sc.stop()
        raise
    return out


def metrics(sc: Sidecar) -> dict[str, float]:
    resp = http_request(sc.base, "/metrics")
    assert resp.status == 200, resp
    out = {}
    for line in resp.body.decode().splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            try:
                out[series] = float(value)
            except ValueError:
                pass
    return out


def family(m: dict[str, float], name: str) -> float:
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


def total(replicas: list[Sidecar], name: str) -> float:
    return sum(family(metrics(sc), name) for sc in replicas)


def shared_lines(sc: Sidecar) -> str:
    return "\n".join(line for line in http_request(sc.base, "/metrics").body.decode().splitlines()
                     if "shared" in line)


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def subscribed(sc: Sidecar) -> "float | None":
    return metrics(sc).get("authz_shared_cache_subscribed")


def wait_subscribed(replicas: list[Sidecar], timeout: float = 10.0) -> float:
    started = time.monotonic()
    for sc in replicas:
        if not wait_for(lambda: subscribed(sc) == 1, max(0.1, timeout - (time.monotonic() - started)), 0.05):
            pytest.fail(f"{sc.log_path.parent.name}: authz_shared_cache_subscribed is not 1 after {timeout} s:\n"
                        f"{shared_lines(sc)}\nlog:\n{tail(sc.log_path, 15)}", pytrace=False)
    return time.monotonic() - started


def ask(sc: Sidecar, token: str):
    return http_request(sc.base, "/authz", headers={"Authorization": f"Bearer {token}", "X-Original-URI": URI,
                                                    "X-Original-Method": "GET"})


def purge(sc: Sidecar, body: dict):
    return http_request(sc.base, "/admin/cache/purge", method="POST", body=json.dumps(body).encode(),
                        headers={"Content-Type": "application/json"})


class KeepAlive:
    """One thread's keep-alive connections to the replicas."""

    def __init__(self):
        self.conns: dict[int, http.client.HTTPConnection] = {}

    def ask(self, sc: Sidecar, token: str) -> int:
        headers = {"Authorization": f"Bearer {token}", "X-Original-URI": URI, "X-Original-Method": "GET"}
        for attempt in (0, 1):
            conn = self.conns.get(sc.port)
            if conn is None:
                conn = self.conns[sc.port] = http.client.HTTPConnection("127.0.0.1", sc.port, timeout=REQUEST_TIMEOUT)
            try:
                conn.request("GET", "/authz", headers=headers)
                r = conn.getresponse()
                r.read()
                if r.getheader("Connection", "").lower() == "close":
                    conn.close()
                    self.conns.pop(sc.port, None)
                return r.status
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    http.client.CannotSendRequest, http.client.BadStatusLine):
                conn.close()
                self.conns.pop(sc.port, None)
                if attempt:          # a fresh connection failed too
                    raise
        raise AssertionError("unreachable")

    def close(self):
        for c in self.conns.values():
            c.close()


def drive(replicas: list[Sidecar], items: list[tuple[str, int]], threads: int = 8) -> list[tuple]:
    """Asks every (token, replica index) of ITEMS, spread over THREADS keep-alive clients.
    Returns (token, replica index, status or the exception's repr, seconds)."""
    results: list[tuple] = []

    def work(part):
        client = KeepAlive()
        try:
            for token, r in part:
                t = time.monotonic()
                try:
                    status = client.ask(replicas[r], token)
                except Exception as e:   # noqa: BLE001 - recorded, checked by the caller
                    status = repr(e)
                results.append((token, r, status, time.monotonic() - t))
        finally:
            client.close()

    workers = [threading.Thread(target=work, args=(items[k::threads],), daemon=True) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert not any(w.is_alive() for w in workers), "a client thread hung"
    return results


def p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[max(0, math.ceil(0.99 * len(s)) - 1)]


# ---------------------------------------------------------------------------------------------
# Fixtures: one redis-server, one fake AS and four replicas sharing the cache, for the module
@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def shared_as():
    srv = SharedAS().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def seal_key(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("seal") / "seal.key"
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis, shared_as, seal_key):
    replicas = start_replicas(tmp_path_factory.mktemp("shared"), replica_config(shared_as, redis, seal_key),
                              REPLICAS, "sidecar-shared")
    try:
        wait_subscribed(replicas)
        yield replicas
    finally:
        for sc in replicas:
            sc.stop()


@pytest.fixture(autouse=True)
def _reset_as(request):
    yield
    if "shared_as" in request.fixturenames:
        request.getfixturevalue("shared_as").reset()


def healthy(redis: RedisServer, replicas: list[Sidecar]) -> None:
    """After a test that stopped redis: redis answering and every replica subscribed again."""
    if redis.proc.poll() is not None:
        redis.start()
    else:
        redis.resume()
    wait_subscribed(replicas, timeout=15)


# ---------------------------------------------------------------------------------------------
# 1. One AS call per token across the replicas
def stream(truth: dict[str, int]) -> list[list[tuple[str, int]]]:
    """Four passes over the tokens; pass p asks token i on replica (i + p) % 4, so every token is
    asked once on every replica, and never on two replicas at the same time."""
    tokens = list(truth)
    return [[(t, (i + p) % REPLICAS) for i, t in enumerate(tokens)] for p in range(REPLICAS)]


def run_stream(replicas, truth) -> tuple[list[tuple], float]:
    results = []
    started = time.monotonic()
    for n, items in enumerate(stream(truth)):
        results += drive(replicas, items)
        if n == 0:
            time.sleep(0.3)   # writes to the store may follow the answers
    return results, time.monotonic() - started


def check_answers(results, truth) -> list[tuple]:
    return [r for r in results if r[2] != truth[r[0]]]


def test_a_stream_over_1000_tokens_costs_1000_as_calls_not_4000(cluster, shared_as, redis):
    truth = bulk_tokens(shared_as, 900, 100, "stream")
    names = ("authz_shared_cache_hits_total", "authz_shared_cache_writes_total", "authz_shared_cache_errors_total",
             "authz_shared_cache_unopenable_total")
    before = {n: total(cluster, n) for n in names}
    results, seconds = run_stream(cluster, truth)
    wrong = check_answers(results, truth)
    assert not wrong, f"{len(wrong)} wrong answers, e.g. {wrong[:5]}"
    calls = shared_as.calls_for(truth)
    hits, writes, errors, unopenable_ = (total(cluster, n) - before[n] for n in names)
    print(f"\nshared cache: {len(results)} requests over {len(truth)} tokens on {REPLICAS} replicas in "
          f"{seconds:.1f} s -> {calls} AS calls; store hits {hits:.0f}, writes {writes:.0f}, errors {errors:.0f}, "
          f"unopenable {unopenable_:.0f}; "
          f"p99 {p99([r[3] for r in results]) * 1000:.1f} ms")
    # Exactly one AS call per token, unless the store failed a lookup (a store answer slower than
    # timeout_ms is a miss: on a busy machine a few are), and each such failure is counted.
    assert calls >= len(truth)
    assert unopenable_ == 0, "entries this cluster wrote did not open (a reply matched to the wrong request?)"
    assert calls - len(truth) <= errors, \
        f"{calls} AS calls for {len(truth)} tokens asked on {REPLICAS} replicas each, only {errors:.0f} store errors"
    assert calls <= 1.1 * len(truth), \
        f"{calls} AS calls for {len(truth)} tokens asked on {REPLICAS} replicas each ({errors:.0f} store errors: " \
        f"is the machine so busy that redis answers later than {STORE_TIMEOUT_MS} ms?)"
    assert hits + (calls - len(truth)) >= len(truth) * (REPLICAS - 1), f"store hits {hits}"
    assert writes >= len(truth) - errors, f"store writes {writes}"
    # the entries are sealed: no claim is readable in the store
    sample = next(iter(truth))
    value = redis.cmd("GET", entry_key(sample))
    assert value is not None and len(value) >= 12 + 16 and b"system-access" not in value and b"active" not in value
    assert 0 < redis.cmd("PTTL", entry_key(sample)) <= 60_000


def test_without_the_shared_cache_each_replica_asks_the_as(shared_as, tmp_path):
    replicas = start_replicas(tmp_path, replica_config(shared_as, None, None), REPLICAS, "sidecar-unshared")
    try:
        truth = bulk_tokens(shared_as, 900, 100, "unshared")
        results, seconds = run_stream(replicas, truth)
        wrong = check_answers(results, truth)
        assert not wrong, f"{len(wrong)} wrong answers, e.g. {wrong[:5]}"
        calls = shared_as.calls_for(truth)
        print(f"\nno shared cache: {len(results)} requests over {len(truth)} tokens on {REPLICAS} replicas in "
              f"{seconds:.1f} s -> {calls} AS calls; p99 {p99([r[3] for r in results]) * 1000:.1f} ms")
        assert calls == len(truth) * REPLICAS
    finally:
        for sc in replicas:
            sc.stop()


# ---------------------------------------------------------------------------------------------
# 2. Purges reach every replica
def poll_until_401(sc: Sidecar, token: str, since: float, timeout: float = 3.0) -> tuple[float, list[int]]:
    """Asks SC until it answers 401: (ms from SINCE to that answer, the statuses seen before)."""
    before = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = ask(sc, token).status
        if status == 401:
            return (time.monotonic() - since) * 1000, before
        before.append(status)
        time.sleep(0.002)
    return float("inf"), before


def in_thread(fn):
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:   # noqa: BLE001 - reported by the caller
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def test_a_purge_on_one_replica_reaches_the_others_and_a_lookup_in_flight(cluster, shared_as, redis):
    r1, r2, r3, r4 = cluster
    token = shared_as.add_token(new_token("purge"), active_claims())
    # cached on replicas 1 (from the AS), 2 and 4 (from the store)
    assert ask(r1, token).status == 200
    assert wait_for(lambda: redis.cmd("EXISTS", entry_key(token)) == 1, 2), "the answer was not written to the store"
    assert ask(r2, token).status == 200 and ask(r4, token).status == 200
    assert shared_as.calls[token] == 1, "replicas 2 and 4 should have found the answer in the store"
    # replica 3 does not find it in the store: its lookup goes to the AS, which takes 1 s to answer
    assert redis.cmd("DEL", entry_key(token)) == 1
    shared_as.tokens.once[token] = 1.0
    lag0 = [metrics(sc) for sc in cluster]
    a, a_box = in_thread(lambda: (time.monotonic(), ask(r3, token), time.monotonic()))
    assert wait_for(lambda: shared_as.calls[token] == 2, 3, 0.005), "replica 3's AS call did not start"
    time.sleep(0.05)
    shared_as.tokens[token] = dict(INACTIVE)              # revoked at the AS ...
    sent = time.monotonic()
    purged = purge(r1, {"token": token})                  # ... and purged on replica 1 during the call
    answered = time.monotonic()
    assert purged.status == 200, purged
    assert a.is_alive(), "replica 3's lookup ended before the purge: the AS was not slow enough"
    body = purged.json()
    assert body == {"purged": 1, "propagated": True, "receivers": REPLICAS}, body
    assert ask(r1, token).status == 401
    polls = {}
    threads = {n: in_thread(lambda sc=sc: poll_until_401(sc, token, answered)) for n, sc in
               ((2, r2), (3, r3), (4, r4))}
    for n, (t, box) in threads.items():
        t.join(10)
        assert "error" not in box, box
        polls[n] = box["value"]
    a.join(10)
    assert not a.is_alive() and "error" not in a_box, a_box
    a_start, a_resp, a_end = a_box["value"]
    print(f"\npurge answered in {(answered - sent) * 1000:.1f} ms; first 401 after the purge answer: " +
          ", ".join(f"replica {n} {ms:.1f} ms (before: {before})" for n, (ms, before) in polls.items()) +
          f"; replica 3's request in flight: {a_resp.status} after {(a_end - a_start) * 1000:.0f} ms")
    lags = []
    for before, sc in zip(lag0, cluster):
        after = metrics(sc)
        n = family(after, "authz_shared_cache_broadcast_lag_seconds_count") - \
            family(before, "authz_shared_cache_broadcast_lag_seconds_count")
        s = family(after, "authz_shared_cache_broadcast_lag_seconds_sum") - \
            family(before, "authz_shared_cache_broadcast_lag_seconds_sum")
        lags.append(f"{s / n * 1000:.1f} ms" if n else "-")
    print("broadcast lag per replica (its metric): " + ", ".join(lags))
    assert a_resp.status == 401, f"replica 3 allowed on the AS's answer from before the purge: {a_resp}"
    for n, (ms, before) in polls.items():
        assert ms < 500, f"replica {n} still allowed the purged token {ms:.0f} ms after the purge answered: {before}"
    assert shared_as.calls[token] >= 3
    # the store holds a tombstone, which the late pre-purge answer did not replace
    assert redis.cmd("GET", entry_key(token)) == b"tombstone"
    assert 0 < redis.cmd("PTTL", entry_key(token)) <= 30_000
    for sc in cluster:
        assert ask(sc, token).status == 401


def test_purge_by_digest_and_purge_of_everything_reach_every_replica(cluster, shared_as, redis):
    r1, r2, r3, r4 = cluster
    d_token = shared_as.add_token(new_token("digest"), active_claims())
    all_token = shared_as.add_token(new_token("all"), active_claims())
    kept = shared_as.add_token(new_token("kept"), active_claims())
    for t in (d_token, all_token):
        for sc in cluster:
            assert ask(sc, t).status == 200
    assert ask(r1, kept).status == 200                   # in the store, under the epoch before the purge
    assert wait_for(lambda: redis.cmd("EXISTS", entry_key(kept)) == 1, 2)
    assert shared_as.calls_for([d_token, all_token, kept]) == 3

    sub = Subscriber(redis.port, PREFIX + "purge")
    try:
        shared_as.tokens[d_token] = dict(INACTIVE)
        digest = hashlib.sha256(d_token.encode()).hexdigest()
        resp = purge(r2, {"token_sha256": digest})
        answered = time.monotonic()
        assert resp.status == 200 and resp.json() == {"purged": 1, "propagated": True,
                                                      "receivers": REPLICAS + 1}, resp
        msg = sub.message().decode()
        kind, hexdigest, sent_ms = msg.split(" ")
        assert (kind, hexdigest) == ("d", digest) and abs(int(sent_ms) - time.time() * 1000) < 5000, msg
        times = {n: poll_until_401(sc, d_token, answered) for n, sc in ((1, r1), (3, r3), (4, r4))}
        print(f"\npurge by digest: first 401 after the answer: " +
              ", ".join(f"replica {n} {ms:.1f} ms" for n, (ms, _) in times.items()))
        assert all(ms < 500 for ms, _ in times.values()), times

        epoch0 = int(redis.cmd("GET", PREFIX + "epoch") or 0)
        shared_as.tokens[all_token] = dict(INACTIVE)
        resp = purge(r4, {"all": True})
        answered = time.monotonic()
        body = resp.json()
        assert resp.status == 200 and body.get("propagated") is True and body.get("receivers") == REPLICAS + 1, resp
        kind, sent_ms = sub.message().decode().split(" ")
        assert kind == "a" and abs(int(sent_ms) - time.time() * 1000) < 5000
        assert int(redis.cmd("GET", PREFIX + "epoch")) == epoch0 + 1
        times = {n: poll_until_401(sc, all_token, answered) for n, sc in ((1, r1), (2, r2), (3, r3))}
        print("purge of everything: first 401 after the answer: " +
              ", ".join(f"replica {n} {ms:.1f} ms" for n, (ms, _) in times.items()))
        assert all(ms < 500 for ms, _ in times.values()), times
    finally:
        sub.close()
    # an entry written under the older epoch is not served: replica 2 asks the AS again
    assert ask(r2, kept).status == 200
    assert shared_as.calls[kept] == 2, "an entry from before the purge of everything was served"


# ---------------------------------------------------------------------------------------------
# 3. Entries that do not open
def unopenable(sc: Sidecar) -> float:
    return family(metrics(sc), "authz_shared_cache_unopenable_total")


def test_forged_and_corrupted_entries_are_ignored_counted_and_left_alone(cluster, shared_as, redis):
    r1, r2, r3, r4 = cluster
    good = shared_as.add_token(new_token("good"), active_claims())
    assert ask(r1, good).status == 200
    assert wait_for(lambda: redis.cmd("EXISTS", entry_key(good)) == 1, 2)
    sealed = redis.cmd("GET", entry_key(good))
    assert sealed is not None and len(sealed) >= 28

    corrupted = bytearray(sealed)
    corrupted[len(corrupted) // 2] ^= 0x01
    forgeries = {
        "copied from an active token's key": sealed,
        "plain JSON": json.dumps({"active": True, "scope": "system-access", "exp": int(time.time()) + 600}).encode(),
        "random bytes": secrets.token_bytes(80),
        "too short": b"x",
        "one bit flipped": bytes(corrupted),
        "nonce only": sealed[:12],
        "truncated tag": sealed[:-1],
    }
    before = unopenable(r2)
    calls0 = shared_as.total_calls
    for what, value in forgeries.items():
        victim = shared_as.add_token(new_token("forged"), dict(INACTIVE))   # the AS says: inactive
        assert redis.cmd("SET", entry_key(victim), value, "PX", 60_000) == "OK"
        resp = ask(r2, victim)
        assert resp.status == 401, f"{what}: an entry written into redis decided the request: {resp}"
        assert shared_as.calls[victim] == 1, f"{what}: the AS was not asked"
        assert redis.cmd("GET", entry_key(victim)) == value, f"{what}: the entry was overwritten or deleted"
    counted = unopenable(r2) - before
    print(f"\nforged entries: {len(forgeries)} written, {counted:.0f} counted unopenable, "
          f"{shared_as.total_calls - calls0} AS calls")
    assert counted >= len(forgeries), shared_lines(r2)

    # a corrupted entry of an active token: a miss, the AS answers, the entry is left as it is
    victim = shared_as.add_token(new_token("corrupt"), active_claims())
    assert ask(r1, victim).status == 200
    assert wait_for(lambda: redis.cmd("EXISTS", entry_key(victim)) == 1, 2)
    broken = bytearray(redis.cmd("GET", entry_key(victim)))
    broken[-3] ^= 0x80
    assert redis.cmd("SET", entry_key(victim), bytes(broken), "KEEPTTL") == "OK"
    before = unopenable(r3)
    assert ask(r3, victim).status == 200
    assert shared_as.calls[victim] == 2
    assert unopenable(r3) - before >= 1
    assert redis.cmd("GET", entry_key(victim)) == bytes(broken)

    # junk on the purge channel is not a purge and does not break the subscription
    for junk in (b"", b"d", b"d nothex 1", b"x 1 2", b"a", b"d " + b"f" * 64, secrets.token_bytes(40)):
        redis.cmd("PUBLISH", PREFIX + "purge", junk)
    time.sleep(0.2)
    for sc in cluster:
        assert sc.proc.poll() is None
        assert subscribed(sc) == 1
        assert ask(sc, good).status == 200


def test_a_genuine_entry_lives_no_longer_than_its_token_and_is_not_served_past_exp(cluster, shared_as, redis):
    r1, r2, r3, r4 = cluster
    token = new_token("exp")
    shared_as.add_token(token, {**active_claims(), "exp": int(time.time()) + 3})
    assert ask(r1, token).status == 200
    assert wait_for(lambda: redis.cmd("EXISTS", entry_key(token)) == 1, 2)
    assert 0 < redis.cmd("PTTL", entry_key(token)) <= 3000, "the entry outlives the token's exp"
    sealed = redis.cmd("GET", entry_key(token))
    assert ask(r2, token).status == 200 and shared_as.calls[token] == 1
    time.sleep(max(0.0, shared_as.tokens[token]["exp"] + 0.5 - time.time()))
    # written back with a long PX after exp: a genuine entry, but its token has expired
    assert redis.cmd("SET", entry_key(token), sealed, "PX", 60_000) == "OK"
    resp = ask(r3, token)
    assert resp.status == 401, f"an entry of an expired token was served from the store: {resp}"


def test_a_replica_with_another_seal_key_simply_misses(cluster, shared_as, redis, tmp_path):
    r1, r2, r3, r4 = cluster
    other_key = tmp_path / "other.key"
    other_key.write_text(secrets.token_hex(32) + "\n")
    known = shared_as.add_token(new_token("sealed"), active_claims())
    assert ask(r1, known).status == 200
    assert wait_for(lambda: redis.cmd("EXISTS", entry_key(known)) == 1, 2)
    value = redis.cmd("GET", entry_key(known))
    odd = Sidecar(tmp_path / "odd", replica_config(shared_as, redis, other_key), name="sidecar-shared-other-key")
    try:
        wait_subscribed([odd])
        before = unopenable(odd)
        assert ask(odd, known).status == 200
        assert shared_as.calls[known] == 2, "the replica with another key should have asked the AS"
        assert unopenable(odd) - before >= 1
        assert redis.cmd("GET", entry_key(known)) == value, "the other replica overwrote the entry"
        # the other way round: what it writes, the others cannot open
        fresh = shared_as.add_token(new_token("sealed"), active_claims())
        assert ask(odd, fresh).status == 200
        assert wait_for(lambda: redis.cmd("EXISTS", entry_key(fresh)) == 1, 2)
        theirs = redis.cmd("GET", entry_key(fresh))
        before = unopenable(r2)
        assert ask(r2, fresh).status == 200
        assert shared_as.calls[fresh] == 2
        assert unopenable(r2) - before >= 1
        assert redis.cmd("GET", entry_key(fresh)) == theirs
        inactive = shared_as.add_token(new_token("sealed"), dict(INACTIVE))
        assert ask(odd, inactive).status == 401 and ask(r3, inactive).status == 401
    finally:
        odd.stop()


# ---------------------------------------------------------------------------------------------
# 4. The store unreachable
def test_store_unreachable_at_a_purge_is_200_not_propagated_and_decisions_stay_right(cluster, shared_as, redis):
    r1, r2, r3, r4 = cluster
    good = shared_as.add_token(new_token("down"), active_claims())
    bad = shared_as.add_token(new_token("down"), dict(INACTIVE))
    revoked = shared_as.add_token(new_token("down"), active_claims())
    for sc in cluster:
        assert ask(sc, good).status == 200 and ask(sc, revoked).status == 200 and ask(sc, bad).status == 401
    try:
        # paused: the purge waits at most about the store timeout
        redis.pause()
        t = time.monotonic()
        resp = purge(r1, {"token": good})
        ms = (time.monotonic() - t) * 1000
        print(f"\npurge with redis paused: {resp.status} {resp.body!r} in {ms:.0f} ms")
        assert resp.status == 200 and resp.json() == {"purged": 1, "propagated": False}, resp
        assert ms < 1000
        for sc in cluster:
            assert ask(sc, good).status == 200 and ask(sc, bad).status == 401
        # dead: refused at once
        redis.kill()
        shared_as.tokens[revoked] = dict(INACTIVE)
        t = time.monotonic()
        resp = purge(r1, {"token": revoked})
        killed_purged = time.monotonic()
        ms = (killed_purged - t) * 1000
        print(f"purge with redis dead: {resp.status} {resp.body!r} in {ms:.0f} ms")
        assert resp.status == 200 and resp.json() == {"purged": 1, "propagated": False}, resp
        assert ms < 1000
        assert ask(r1, revoked).status == 401
        # the others lost their subscription: their copies live at most degraded_ttl_seconds
        late = {n: poll_until_401(sc, revoked, killed_purged, timeout=DEGRADED_TTL_S + 5)[0]
                for n, sc in ((2, r2), (3, r3), (4, r4))}
        print("unpropagated purge, redis dead: first 401 on the other replicas after " +
              ", ".join(f"replica {n} {ms:.0f} ms" for n, ms in late.items()) +
              f" (degraded_ttl_seconds {DEGRADED_TTL_S})")
        assert all(ms < (DEGRADED_TTL_S + 2.5) * 1000 for ms in late.values()), late
        for sc in cluster:
            assert subscribed(sc) == 0
        # decisions with the store down: right, never 401/503 because of the store
        fresh_good = shared_as.add_token(new_token("down"), active_claims())
        fresh_bad = shared_as.add_token(new_token("down"), dict(INACTIVE))
        for sc in cluster:
            for tok, want in ((good, 200), (bad, 401), (fresh_good, 200), (fresh_bad, 401), (revoked, 401)):
                assert ask(sc, tok).status == want, (sc.log_path.parent.name, tok[:10], want)
        assert total(cluster, "authz_shared_cache_errors_total") > 0, shared_lines(r1)
        http_ok = http_request(r1.base, "/readyz")
        print(f"/readyz with the store dead: {http_ok.status}")
    finally:
        healthy(redis, cluster)
    # once back, a purge is propagated again
    resp = purge(r3, {"token": good})
    assert resp.status == 200 and resp.json().get("propagated") is True, resp


# ---------------------------------------------------------------------------------------------
# 5. Redis paused, killed and restarted under load
def store_fault_lines(sc: Sidecar) -> int:
    """SC's JSON log lines about the store failing (those with an `authz.shared.cause` of a store fault)."""
    n = 0
    for line in sc.log_path.read_text(errors="replace").splitlines():
        if '"authz.shared.cause"' in line:
            try:
                cause = json.loads(line).get("authz.shared.cause")
            except ValueError:
                continue
            n += cause in ("timeout", "connect", "refused", "protocol")
    return n


def test_store_paused_killed_and_restarted_under_load(cluster, shared_as, redis):
    truth = bulk_tokens(shared_as, 100, 100, "fault")
    tokens = list(truth)
    shared_as.tokens.latency = as_latency = 0.010
    rate_per_thread, n_threads = 35.0, 8          # about 280 requests/s across the 4 replicas
    records: list[tuple] = []                     # (sent at, seconds, replica, token, status)
    stop = threading.Event()

    def work(seed: int):
        rng = random.Random(seed)
        client = KeepAlive()
        t0 = time.monotonic() + rng.random() / rate_per_thread
        i = 0
        try:
            while not stop.is_set():
                due = t0 + i / rate_per_thread
                now = time.monotonic()
                if due > now:
                    time.sleep(due - now)
                i += 1
                token, r = rng.choice(tokens), rng.randrange(REPLICAS)
                sent = time.monotonic()
                try:
                    status = client.ask(cluster[r], token)
                except Exception as e:   # noqa: BLE001 - a wrong decision, reported below
                    status = repr(e)
                records.append((sent, time.monotonic() - sent, r, token, status))
        finally:
            client.close()

    workers = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(n_threads)]
    m0 = [metrics(sc) for sc in cluster]
    start = time.monotonic()
    for w in workers:
        w.start()
    marks = {}
    try:
        time.sleep(2.0)
        marks["paused"] = time.monotonic()
        redis.pause()
        time.sleep(3.0)
        paused_subscribed = [subscribed(sc) for sc in cluster]
        time.sleep(2.0)
        marks["killed"] = time.monotonic()
        redis.kill()
        time.sleep(0.5)
        redis.start()
        marks["restarted"] = time.monotonic()
        resubscribe_s = wait_subscribed(cluster, timeout=15)
        marks["resubscribed"] = time.monotonic()
        hits_at_resubscribe = total(cluster, "authz_shared_cache_hits_total")
        time.sleep(3.0)
    finally:
        stop.set()
        for w in workers:
            w.join(REQUEST_TIMEOUT + 5)
        if redis.proc.poll() is None:
            redis.resume()          # (if something failed while it was paused)
    end = time.monotonic()
    assert not any(w.is_alive() for w in workers), "a client thread hung"

    wrong = [r for r in records if r[4] != truth[r[3]]]
    lat = [r[1] for r in records]

    def phase(a, b):
        return [r[1] for r in records if a <= r[0] < b]

    phases = {"before": phase(start, marks["paused"]), "paused": phase(marks["paused"], marks["killed"]),
              "dead/restart": phase(marks["killed"], marks["resubscribed"]),
              "after": phase(marks["resubscribed"], end)}
    after = [r for r in records if r[0] >= marks["resubscribed"] + 0.2]
    asked_after = {r[3] for r in after}
    in_store = sum(1 for t in asked_after if redis.cmd("EXISTS", entry_key(t)) == 1)
    m1 = [metrics(sc) for sc in cluster]
    hits_since_resubscribe = sum(family(m, "authz_shared_cache_hits_total") for m in m1) - hits_at_resubscribe

    def delta(name):
        return sum(family(b, name) - family(a, name) for a, b in zip(m0, m1))

    unreachable_lines = [store_fault_lines(sc) for sc in cluster]
    bound_ms = STORE_TIMEOUT_MS + as_latency * 1000 + 100
    print(f"\nfault run: {len(records)} requests in {end - start:.1f} s ({len(records) / (end - start):.0f}/s), "
          f"{len(wrong)} wrong; p99 {p99(lat) * 1000:.1f} ms (bound {bound_ms:.0f} ms = store timeout "
          f"{STORE_TIMEOUT_MS} + AS latency {as_latency * 1000:.0f} + 100 slack); per phase: " +
          ", ".join(f"{k} n={len(v)} p99={p99(v) * 1000:.1f} ms max={max(v, default=0) * 1000:.1f} ms"
                    for k, v in phases.items()))
    print(f"subscribed while paused: {paused_subscribed}; resubscribed {resubscribe_s:.2f} s after the restart; "
          f"tokens asked after it: {len(asked_after)}, in the store: {in_store}; store hits since: "
          f"{hits_since_resubscribe:.0f}; over the run: store hits {delta('authz_shared_cache_hits_total'):.0f}, "
          f"errors {delta('authz_shared_cache_errors_total'):.0f}, writes {delta('authz_shared_cache_writes_total'):.0f}; "
          f"AS calls {shared_as.calls_for(tokens)}; store fault log lines per replica {unreachable_lines}")
    assert not wrong, f"{len(wrong)} wrong decisions, e.g. {wrong[:5]}"
    assert p99(lat) * 1000 < bound_ms, f"p99 {p99(lat) * 1000:.1f} ms"
    assert paused_subscribed == [0] * REPLICAS, "a replica did not notice the paused store (PING unanswered 1 s)"
    assert delta("authz_shared_cache_errors_total") > 0
    assert all(unreachable_lines), f"a replica logged no store fault: {unreachable_lines}"
    assert all(n < 50 for n in unreachable_lines), f"the store fault log is not rate-limited: {unreachable_lines}"
    # the shared cache fills again after the restart
    assert asked_after and in_store >= 0.95 * len(asked_after), (in_store, len(asked_after))
    assert hits_since_resubscribe > 0, "no store hit after the restart: the shared cache did not refill"


# ---------------------------------------------------------------------------------------------
# 6. Configuration
def test_check_config_shows_the_shared_cache_but_not_the_seal_key(tmp_path, shared_as, redis, seal_key):
    config = replica_config(shared_as, redis, seal_key)
    config["server"] = {"listen": "127.0.0.1:9191"}
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(config) + "\n")
    out = subprocess.run([SIDECAR_BIN, "check-config", "--config", str(path)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "shared:" in out.stdout and redis.url in out.stdout and str(seal_key) in out.stdout, out.stdout
    assert seal_key.read_text().strip() not in out.stdout + out.stderr, "the seal key was printed"

    def refused(shared_patch: dict, key_text: "str | None" = None) -> subprocess.CompletedProcess:
        cfg = replica_config(shared_as, redis, seal_key)
        cfg["server"] = {"listen": "127.0.0.1:9191"}
        if key_text is not None:
            bad_key = tmp_path / "bad.key"
            bad_key.write_text(key_text)
            cfg["cache"]["shared"]["seal_key_file"] = str(bad_key)
        for k, v in shared_patch.items():
            if v is None:
                cfg["cache"]["shared"].pop(k, None)
            else:
                cfg["cache"]["shared"][k] = v
        p = tmp_path / "bad.yaml"
        p.write_text(to_yaml(cfg) + "\n")
        return subprocess.run([SIDECAR_BIN, "check-config", "--config", str(p)], capture_output=True, text=True,
                              timeout=30)

    out = refused({"seal_key_file": None})
    assert out.returncode == 1 and "seal_key_file" in out.stderr, (out.returncode, out.stderr)
    short = secrets.token_hex(10)    # 20 bytes raw, 10 as hex, 15 as base64: 32 under no reading
    out = refused({}, key_text=short + "\n")
    assert out.returncode == 1 and "seal_key_file" in out.stderr, (out.returncode, out.stderr)
    assert short not in out.stdout + out.stderr, "a rejected seal key was echoed"


# ---------------------------------------------------------------------------------------------
# DPoP: a proof consumed at one replica is refused at every other (DESIGN.md §11, RFC 9449 §11.1)
def _dpop_key_and_jkt():
    from cryptography.hazmat.primitives.asymmetric import ec
    from jose_support import b64u, jwk_int
    key = ec.generate_private_key(ec.SECP256R1())
    numbers = key.public_key().public_numbers()
    jwk = {"kty": "EC", "crv": "P-256", "x": jwk_int(numbers.x, 32), "y": jwk_int(numbers.y, 32)}
    canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True)
    return key, jwk, b64u(hashlib.sha256(canonical.encode()).digest())


def _dpop_proof(key, jwk: dict, token: str, host: str) -> str:
    from jose_support import b64u, compact
    claims = {"jti": secrets.token_urlsafe(18), "htm": "GET", "htu": f"https://{host}{URI}", "iat": int(time.time()),
              "ath": b64u(hashlib.sha256(token.encode()).digest())}
    return compact({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk}, claims, key, "ES256")


def _ask_dpop(sc: Sidecar, token: str, proof: str, host: str):
    return http_request(sc.base, "/authz", headers={"Authorization": f"DPoP {token}", "DPoP": proof, "Host": host,
                                                    "X-Forwarded-Proto": "https", "X-Original-URI": URI,
                                                    "X-Original-Method": "GET"})


def test_a_dpop_proof_used_at_one_replica_is_refused_at_the_others(cluster, shared_as, redis):
    key, jwk, thumb = _dpop_key_and_jkt()
    token = shared_as.add_token(new_token("dpop"), {**active_claims(), "cnf": {"jkt": thumb}})
    host = "api.example"
    proof = _dpop_proof(key, jwk, token, host)
    first = _ask_dpop(cluster[0], token, proof, host)
    assert first.status == 200, first
    # The same proof at each other replica: a replay, refused there too.
    for sc in cluster[1:]:
        again = _ask_dpop(sc, token, proof, host)
        assert again.status == 401, f"a replayed proof was accepted at another replica: {again}"
        assert "invalid_dpop_proof" in (again.headers.get("WWW-Authenticate") or "")
    # A fresh proof is accepted anywhere.
    for sc in cluster:
        assert _ask_dpop(sc, token, _dpop_proof(key, jwk, token, host), host).status == 200
    # The store holds the consumed pairs (hashed), with a lifetime of the proof window only.
    keys = [k for k in redis.cmd("KEYS", PREFIX + "dpop:*")]
    assert len(keys) >= 5
    assert all(0 < redis.cmd("PTTL", k) <= 600_000 for k in keys)
