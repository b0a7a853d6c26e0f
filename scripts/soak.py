#!/usr/bin/env python3
"""Bounded-in-time soak of authz-sidecar behind nginx, all on loopback (run it through scripts/soak.sh).

    python3 scripts/soak.py [--minutes N | --quick] [--concurrency 16] [--workdir DIR] [--keep-work]

    client (asyncio, N keep-alive HTTPS connections per certificate, client1 / client2)
       --mTLS + Bearer--> nginx (deploy/nginx.conf rendered by scripts/stack.py)
           --auth_request--> authz-sidecar (cache ttl 20 s, negative 5 s, max_entries 5000, timeout 500 ms)
               --RFC 7662--> fake AS (tests/integration/conftest.py FakeAuthorizationServer, a subprocess
                             that is SIGKILLed every 30 s and restarted after --outage-seconds)
           --> echo upstream (scripts/echo_upstream.py, a subprocess that keeps no request log)

The fake AS knows 10,000 tokens: ~89 % active, scope system-access, bound (cnf.x5t#S256) to
client1; ~10 % active and unbound; ~1 % unknown to it (answered {"active": false}). Every request
picks a random token and a random certificate (client2 with probability --client2-share), and its
status is checked against the truth:

    must allow  <=>  token active AND (unbound OR the presented certificate is client1)

Wrong decisions (each one fails the run):
    (a) 200 for a request that must be denied (inactive token, or bound token with client2);
    (b) 401/403 for a request that must be allowed (the sidecar must answer 503 on an AS fault);
    (c) 200 whose X-Credential-Jti, as the upstream saw it, is not the token's own (identity mix-up).
A 5xx is never a wrong decision; it is counted "during outages" when the request overlapped
[AS killed, AS listening again + --grace-seconds], otherwise "outside outages" (should be ~0).

Also reported: requests, req/s, sidecar VmRSS (idle, start, middle, end, max), open fds (start
and end under load; the run fails if they grew by more than --max-fd-growth), whether the
sidecar died (fails the run, with its log tail), the sidecar's cache / introspection metrics.

Exit status: 0 pass, 1 fail (wrong decision, sidecar died, fd growth), 2 harness / setup error,
130 interrupted. Everything is started on free 127.0.0.1 ports and stopped by PID at the end.
The work directory (default /tmp/authz-soak-*, logs, timeline.csv, summary.json) is removed after
a passing run unless --keep-work; after a failure it is kept (without the copied binary).
"""
from __future__ import annotations

import argparse
import asyncio
import atexit
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import types
from array import array
import urllib.request
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests" / "integration"))

TOKENS = 10_000
PATH = "/token-mtls/api/"
REQUEST_TIMEOUT = 10.0
EXAMPLES = 8


def import_conftest():
    """tests/integration/conftest.py (FakeAuthorizationServer, Sidecar, Nginx, ...).

    It imports pytest only for decorators; without pytest a minimal stand-in is used."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        stub = types.ModuleType("pytest")

        class Failed(Exception):
            pass

        def fail(msg="", pytrace=True):
            raise Failed(msg)

        def passthrough(*a, **k):
            if len(a) == 1 and callable(a[0]) and not k:
                return a[0]
            return lambda f: f

        stub.fail, stub.fixture, stub.hookimpl = fail, passthrough, passthrough
        stub.exit = lambda msg="", returncode=None: (_ for _ in ()).throw(SystemExit(msg))
        sys.modules["pytest"] = stub
    import conftest
    return conftest


class HarnessError(Exception):
    pass


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# Helper processes (run as `soak.py --serve fake-as|echo ...`)
def serve(kind: str, port: int, tokens_file: "str | None") -> None:
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if kind == "fake-as":
        conftest = import_conftest()
        conftest._QuietServer.request_queue_size = 256     # the sidecar reconnects in bursts
        srv = conftest.FakeAuthorizationServer()
        srv.tokens = json.loads(Path(tokens_file).read_text())
        srv.port = port
        srv.start()
    else:
        from echo_upstream import EchoUpstream

        class QuietEcho(EchoUpstream):
            request_queue_size = 256

            def record(self, rec):      # keep nothing: a soak sends ~10^6 requests
                pass

        QuietEcho(port).start()
    print(f"{kind} listening on 127.0.0.1:{port}", flush=True)
    while True:
        time.sleep(3600)


# --------------------------------------------------------------------------------------------
def proc_rss_kib(pid: int) -> "int | None":
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def proc_fds(pid: int) -> "int | None":
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def mib(kib: "int | None") -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f} MiB"


def fetch_metrics(base: str) -> dict:
    """The sidecar's counters we report, summed over labels we do not split."""
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError as e:
        return {"error": str(e)}
    out: Counter = Counter()
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            v = float(value)
        except ValueError:
            continue
        if name in ("authz_cache_hits_total", "authz_cache_misses_total", "authz_cache_evictions_total",
                    "authz_cache_coalesced_waits_total", "authz_cache_stale_serves_total"):
            out[name] += v
        elif name == "authz_introspection_calls_total":
            outcome = name_labels.split('outcome="', 1)[1].split('"', 1)[0] if 'outcome="' in name_labels else "?"
            out[f"introspection:{outcome}"] += v
        elif name == "authz_decisions_total":
            reason = name_labels.split('reason="', 1)[1].split('"', 1)[0] if 'reason="' in name_labels else "?"
            out[f"decision:{reason}"] += v
    return {k: int(v) for k, v in sorted(out.items())}


class Window:
    """One AS outage: killed at .start, listening again at .end (None while down)."""

    __slots__ = ("start", "end")

    def __init__(self, start: float):
        self.start, self.end = start, None


# --------------------------------------------------------------------------------------------
class Soak:
    def __init__(self, args):
        self.args = args
        self.conftest = import_conftest()
        self.stack = self.conftest.stack
        self.rng = random.Random(args.seed)
        self.procs: list = []           # (label, Popen) of everything we started, stopped in reverse
        self.as_proc: "subprocess.Popen | None" = None
        self.workdir: "Path | None" = None
        self.sidecar = None
        self.nginx = None
        self.failed_reasons: list[str] = []
        self.interrupted = False
        self.closing = False
        self.sidecar_died = False
        self.harness_error: "str | None" = None
        # statistics
        self.total = 0
        self.status = Counter()
        self.by_case = Counter()                # (kind, cert, status)
        self.wrong = 0
        self.wrong_examples: list[dict] = []
        self.fivexx_during = 0
        self.fivexx_outside = 0
        self.fivexx_outside_examples: list[dict] = []
        self.req_during = 0
        self.req_outside = 0
        self.unexpected = Counter()             # statuses that are neither right nor a wrong decision
        self.unexpected_examples: list[dict] = []
        self.transport_errors = Counter()
        self.connections_opened = 0
        self.closed_after = Counter()           # status -> responses that ended the keep-alive connection
        self.timeline: dict[int, Counter] = {}
        self.latency: dict[tuple, array] = {}   # (status, during outage) -> latencies in ms
        self.windows: list[Window] = []
        self.samples: list[tuple[float, "int | None", "int | None"]] = []   # (t, rss KiB, fds)

    # ---------------------------------------------------------------- setup
    def register(self, label: str, proc) -> None:
        self.procs.append((label, proc))

    def pick_binary(self) -> Path:
        if os.environ.get("AUTHZ_SIDECAR_BIN"):
            candidates = [Path(os.environ["AUTHZ_SIDECAR_BIN"])]
        else:
            candidates = [REPO / ".build" / "release" / "authz-sidecar", REPO / ".build" / "debug" / "authz-sidecar"]
        dest = self.workdir / "bin" / "authz-sidecar"
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Copy it: others may relink .build/ at any time, which must not change (or kill) the
        # process under test. Retry once if the copy caught a half-written file.
        for src in candidates:
            for _ in range(3):
                if not (src.is_file() and os.access(src, os.X_OK)):
                    break
                shutil.copy2(src, dest)
                try:
                    v = subprocess.run([str(dest), "--version"], capture_output=True, text=True, timeout=30)
                    if v.returncode == 0:
                        built = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(src.stat().st_mtime))
                        log(f"sidecar binary: {src} (version {v.stdout.strip()}, built {built}), copied to {dest}")
                        return dest
                except (OSError, subprocess.TimeoutExpired):
                    pass
                time.sleep(3)
        raise HarnessError(f"no working authz-sidecar binary among {', '.join(map(str, candidates))}")

    def make_tokens(self, thumb1: str) -> None:
        now = int(time.time())
        exp = now + int(self.args.minutes * 60) + 3600
        kinds = ["unknown"] * (TOKENS // 100) + ["unbound"] * (TOKENS // 10)
        kinds += ["bound"] * (TOKENS - len(kinds))
        self.rng.shuffle(kinds)
        table, tokens, markers = {}, [], []
        for i, kind in enumerate(kinds):
            tok = f"soak{i:05d}-{secrets.token_urlsafe(24)}"
            jti = f"soak-jti-{i:05d}"
            tokens.append(f"Bearer {tok}".encode())
            markers.append(f'"x-credential-jti": "{jti}"'.encode())
            if kind == "unknown":
                continue        # the AS answers {"active": false}
            c = {"active": True, "scope": "system-access", "client_id": "soak-client", "token_type": "Bearer",
                 "sub": f"svc-{i:05d}", "jti": jti, "iat": now - 5, "exp": exp}
            if kind == "bound":
                c["cnf"] = {"x5t#S256": thumb1}
            table[tok] = c
        self.kinds, self.tokens, self.markers, self.table = kinds, tokens, markers, table
        self.tokens_file = self.workdir / "as-tokens.json"
        self.tokens_file.write_text(json.dumps(table))
        log(f"tokens: {TOKENS} ({kinds.count('bound')} bound to client1, {kinds.count('unbound')} unbound, "
            f"{kinds.count('unknown')} unknown to the AS)")

    def start_helper(self, kind: str, port: int) -> subprocess.Popen:
        logf = open(self.workdir / f"{kind}.log", "ab")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", kind, "--port", str(port)]
        if kind == "fake-as":
            cmd += ["--tokens-file", str(self.tokens_file)]
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        logf.close()
        self.register(kind, proc)
        if self.closing:            # teardown already ran (a restart racing the end of the run)
            self.conftest.stop_process(proc)
            raise HarnessError("stopping")
        self.stack.wait_port("127.0.0.1", port, timeout=30, proc=proc)
        return proc

    def setup(self) -> None:
        a = self.args
        self.workdir = Path(a.workdir).resolve() if a.workdir else Path(tempfile.mkdtemp(prefix="authz-soak-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        log(f"work dir: {self.workdir}")
        certs = self.workdir / "certs"
        r = subprocess.run(["bash", str(REPO / "scripts" / "mkcerts.sh"), str(certs)], capture_output=True,
                           text=True, timeout=180)
        if r.returncode != 0:
            raise HarnessError(f"mkcerts.sh failed:\n{r.stdout}{r.stderr}")
        self.certs = certs
        binary = self.pick_binary()
        self.conftest.SIDECAR_BIN = str(binary)      # conftest.Sidecar reads this global
        thumb1 = self.stack.thumbprint(certs / "client1.crt")
        self.make_tokens(thumb1)

        self.as_port = self.stack.free_port()
        self.as_proc = self.start_helper("fake-as", self.as_port)
        self.echo_port = self.stack.free_port()
        self.start_helper("echo", self.echo_port)

        c = self.conftest
        config = {
            "introspection": {
                "endpoint": f"http://127.0.0.1:{self.as_port}/introspect",
                "client_id": c.INTROSPECTION_CLIENT_ID,
                "client_secret": c.INTROSPECTION_CLIENT_SECRET,
                "auth_method": "client_secret_basic",
                "timeout_ms": 500,
            },
            "cache": {"ttl_seconds": 20, "negative_ttl_seconds": 5, "max_entries": 5000,
                      "stale_if_error_seconds": 0},
            "logging": {"level": a.log_level},
            "policies": c.policies("X-Client-Cert"),
        }
        try:
            self.sidecar = c.Sidecar(self.workdir / "sidecar", config)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:      # conftest reports start-up failures with pytest.fail
            raise HarnessError(f"sidecar did not start: {e}") from None
        self.register("sidecar", self.sidecar.proc)
        try:
            self.nginx = c.Nginx(self.workdir / "nginx", certs, self.sidecar.port, self.echo_port)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:
            raise HarnessError(f"nginx did not start: {e}") from None
        self.register("nginx", self.nginx.proc)
        self.sc_pid = self.sidecar.proc.pid
        log(f"fake AS :{self.as_port} (PID {self.as_proc.pid}), echo :{self.echo_port}, "
            f"sidecar :{self.sidecar.port} (PID {self.sc_pid}), nginx :{self.nginx.port} (PID {self.nginx.proc.pid})")
        log(f"sidecar config: {self.sidecar.config_path}")

        self.ssl = {}
        for name in ("client1", "client2"):
            ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
            ctx.load_cert_chain(str(certs / f"{name}.crt"), str(certs / f"{name}.key"))
            self.ssl[name] = ctx

    # ---------------------------------------------------------------- the truth
    def must_allow(self, idx: int, cert: str) -> bool:
        kind = self.kinds[idx]
        return kind == "unbound" or (kind == "bound" and cert == "client1")

    def in_outage(self, t0: float, t1: float) -> bool:
        grace = self.args.grace_seconds
        for w in self.windows[-3:]:
            if w.start < t1 and (w.end is None or t0 < w.end + grace):
                return True
        return False

    def since_restart(self, t: float) -> str:
        ends = [w.end for w in self.windows if w.end is not None and w.end <= t]
        return f"{t - ends[-1]:.2f} s after the last AS restart" if ends else "before any AS outage"

    def example(self, idx, cert, status, body, t0, t1, why) -> dict:
        tok = self.tokens[idx][len(b"Bearer "):]
        return {"t": round(t0 - self.t_start, 3), "latency_ms": round((t1 - t0) * 1000, 1), "why": why,
                "token_index": idx, "kind": self.kinds[idx], "cert": cert, "status": status,
                "authz.token": hashlib.sha256(tok).hexdigest()[:8], "token": tok.decode(),
                "as_answer": self.table.get(tok.decode(), {"active": False}),
                "during_outage": self.in_outage(t0, t1), "when": self.since_restart(t0),
                "body": body[:200].decode(errors="replace")}

    def judge(self, idx: int, cert: str, status: int, body: bytes, t0: float, t1: float) -> None:
        self.total += 1
        self.status[status] += 1
        self.by_case[(self.kinds[idx], cert, status)] += 1
        sec = int(t1 - self.t_start)
        tl = self.timeline.get(sec)
        if tl is None:
            tl = self.timeline[sec] = Counter()
        tl[status] += 1
        during = self.in_outage(t0, t1)
        if during:
            self.req_during += 1
            tl["during_outage"] += 1
        else:
            self.req_outside += 1
        lat = self.latency.get((status, during))
        if lat is None:
            lat = self.latency[(status, during)] = array("f")
        lat.append((t1 - t0) * 1000)
        allow = self.must_allow(idx, cert)
        why = None
        if status == 200:
            if not allow:
                why = "(a) 200 for a request that must be denied"
            elif self.markers[idx] not in body:
                why = "(c) 200 but the upstream did not get this token's X-Credential-Jti"
        elif status in (401, 403):
            if allow:
                why = f"(b) {status} for a request that must be allowed"
            elif status != 401:
                self.unexpected[status] += 1
                if len(self.unexpected_examples) < EXAMPLES:
                    self.unexpected_examples.append(self.example(idx, cert, status, body, t0, t1, "deny, but not 401"))
        elif status >= 500:
            if during:
                self.fivexx_during += 1
            else:
                self.fivexx_outside += 1
                if len(self.fivexx_outside_examples) < EXAMPLES:
                    self.fivexx_outside_examples.append(self.example(idx, cert, status, body, t0, t1, "5xx outside outages"))
        else:
            self.unexpected[status] += 1
            if len(self.unexpected_examples) < EXAMPLES:
                self.unexpected_examples.append(self.example(idx, cert, status, body, t0, t1, "unexpected status"))
        if why:
            self.wrong += 1
            if len(self.wrong_examples) < EXAMPLES:
                ex = self.example(idx, cert, status, body, t0, t1, why)
                self.wrong_examples.append(ex)
                log(f"  WRONG DECISION: {json.dumps(ex)}")

    # ---------------------------------------------------------------- load
    async def http_get(self, conn, auth: bytes) -> tuple[int, bytes, bool]:
        reader, writer = conn
        writer.write(b"GET " + PATH.encode() + b" HTTP/1.1\r\nHost: localhost\r\nAuthorization: " + auth + b"\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, chunked, close = None, False, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value:
                chunked = True
            elif name == b"connection" and value == b"close":
                close = True
        if chunked:
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    break
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            body = b"".join(parts)
        elif length is not None:
            body = await reader.readexactly(length)
        else:
            body = await reader.read()
            close = True
        return status, body, close

    @staticmethod
    def close(conn) -> None:
        if conn is not None:
            try:
                conn[1].transport.abort()
            except Exception:
                pass

    async def worker(self, wid: int) -> None:
        rng = random.Random((self.args.seed or 0) * 1000 + wid)
        conns = {"client1": None, "client2": None}
        n = len(self.tokens)
        share2 = self.args.client2_share
        try:
            while self.running:
                idx = rng.randrange(n)
                cert = "client2" if rng.random() < share2 else "client1"
                conn = conns[cert]
                if conn is None:
                    try:
                        conn = await asyncio.wait_for(
                            asyncio.open_connection("127.0.0.1", self.nginx.port, ssl=self.ssl[cert],
                                                    server_hostname="localhost"), REQUEST_TIMEOUT)
                    except (OSError, asyncio.TimeoutError, ssl.SSLError) as e:
                        self.transport_errors[f"connect: {type(e).__name__}"] += 1
                        await asyncio.sleep(0.2)
                        continue
                    conns[cert] = conn
                    self.connections_opened += 1
                t0 = time.monotonic()
                try:
                    status, body, close = await asyncio.wait_for(self.http_get(conn, self.tokens[idx]), REQUEST_TIMEOUT)
                except asyncio.TimeoutError:
                    self.transport_errors["timeout"] += 1
                    self.close(conn)
                    conns[cert] = None
                    continue
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ssl.SSLError, ValueError) as e:
                    # e.g. nginx closed an idle keep-alive connection just as we reused it
                    self.transport_errors[type(e).__name__] += 1
                    self.close(conn)
                    conns[cert] = None
                    continue
                t1 = time.monotonic()
                self.judge(idx, cert, status, body, t0, t1)
                if close:
                    self.closed_after[status] += 1
                    self.close(conn)
                    conns[cert] = None
        finally:
            for c in conns.values():
                self.close(c)

    # ---------------------------------------------------------------- chaos and monitoring
    def restart_as(self) -> None:
        last = None
        for _ in range(3):
            try:
                self.as_proc = self.start_helper("fake-as", self.as_port)
                return
            except (TimeoutError, RuntimeError, OSError) as e:
                last = e
                time.sleep(0.5)
        raise HarnessError(f"the fake AS could not be restarted on port {self.as_port}: {last}")

    async def chaos(self) -> None:
        a = self.args
        loop = asyncio.get_running_loop()
        k = 0
        while self.running:
            at = self.t_start + a.first_outage + k * a.outage_period
            if at + a.outage_seconds + a.grace_seconds + 2 > self.t_end:
                return
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            if not self.running:
                return
            w = Window(time.monotonic())
            self.windows.append(w)
            old = self.as_proc
            os.kill(old.pid, signal.SIGKILL)
            await loop.run_in_executor(None, old.wait)
            self.procs = [(l, p) for (l, p) in self.procs if p is not old]
            await asyncio.sleep(a.outage_seconds)
            try:
                await loop.run_in_executor(None, self.restart_as)
            except HarnessError as e:
                self.harness_error = str(e)
                self.running = False
                return
            w.end = time.monotonic()
            log(f"  [{w.start - self.t_start:6.1f}s] AS outage #{k + 1}: killed, listening again after "
                f"{w.end - w.start:.2f} s (PID {self.as_proc.pid})")
            k += 1

    def sample(self, now: float) -> None:
        self.samples.append((now - self.t_start, proc_rss_kib(self.sc_pid), proc_fds(self.sc_pid)))

    def check_processes(self) -> None:
        if self.sidecar.proc.poll() is not None and not self.interrupted:
            self.sidecar_died = True
            self.running = False
            log(f"  SIDECAR DIED (exit status {self.sidecar.proc.returncode}) at "
                f"{time.monotonic() - self.t_start:.1f} s")
        elif self.nginx.proc.poll() is not None and not self.interrupted:
            self.harness_error = f"nginx exited ({self.nginx.proc.returncode}):\n{self.conftest.tail(self.nginx.error_log)}"
            self.running = False
        for label, p in self.procs:
            if label == "echo" and p.poll() is not None and not self.interrupted:
                self.harness_error = f"the echo upstream exited ({p.returncode})"
                self.running = False

    def progress(self, now: float, last: list) -> None:
        el = now - self.t_start
        rate = (self.total - last[1]) / max(1e-9, now - last[0])
        last[0], last[1] = now, self.total
        _, rss, fds = self.samples[-1]
        as_state = "down" if self.windows and self.windows[-1].end is None else "up"
        log(f"[{el:6.1f}s] requests {self.total} ({rate:.0f}/s) | wrong {self.wrong} | 5xx during outages "
            f"{self.fivexx_during}, outside {self.fivexx_outside} | transport errors "
            f"{sum(self.transport_errors.values())} | sidecar RSS {mib(rss)}, fds {fds} | AS {as_state}, "
            f"outages {len(self.windows)}")

    async def monitor(self) -> None:
        a = self.args
        last = [self.t_start, 0]
        next_progress = self.t_start + a.progress_seconds
        self.mark = {}
        marks = {"start": self.t_start + a.start_sample_seconds, "middle": self.t_start + self.duration / 2}
        while self.running:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            self.check_processes()
            if not self.running:
                break
            self.sample(now)
            for name, at in marks.items():
                if name not in self.mark and now >= at:
                    self.mark[name] = self.samples[-1]
            if now >= self.t_end:
                self.mark["end"] = self.samples[-1]
                self.running = False
            if now >= next_progress or not self.running:
                self.progress(now, last)
                next_progress += a.progress_seconds

    async def run_load(self) -> None:
        loop = asyncio.get_running_loop()

        def on_signal(signame):
            log(f"{signame}: stopping")
            self.interrupted = True
            self.running = False

        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(s, on_signal, s.name)
        self.idle = (proc_rss_kib(self.sc_pid), proc_fds(self.sc_pid))
        self.duration = self.args.minutes * 60
        self.running = True
        self.t_start = time.monotonic()
        self.t_end = self.t_start + self.duration
        log(f"load: {self.args.concurrency} workers x (client1, client2) keep-alive connections for "
            f"{self.duration:.0f} s; AS killed every {self.args.outage_period:.0f} s (first at "
            f"{self.args.first_outage:.0f} s) for {self.args.outage_seconds:.0f} s; sidecar idle RSS "
            f"{mib(self.idle[0])}, fds {self.idle[1]}")
        workers = [asyncio.ensure_future(self.worker(i)) for i in range(self.args.concurrency)]
        chaos = asyncio.ensure_future(self.chaos())
        await self.monitor()
        self.t_stop = time.monotonic()
        done, pending = await asyncio.wait(workers + [chaos], timeout=REQUEST_TIMEOUT + 5)
        for t in pending:
            t.cancel()
        for t in done:
            if not t.cancelled() and t.exception() is not None and not isinstance(t.exception(), asyncio.CancelledError):
                raise t.exception()

    # ---------------------------------------------------------------- report
    def report(self) -> int:
        a = self.args
        el = max(1e-9, self.t_stop - self.t_start)
        after_idle = (proc_rss_kib(self.sc_pid), proc_fds(self.sc_pid)) if not self.sidecar_died else (None, None)
        metrics = fetch_metrics(self.sidecar.base) if not self.sidecar_died else {}
        rss = {k: (v[1] if v else None) for k, v in ((m, self.mark.get(m)) for m in ("start", "middle", "end"))}
        fds = {k: (v[2] if v else None) for k, v in ((m, self.mark.get(m)) for m in ("start", "end"))}
        rss_max = max((s[1] for s in self.samples if s[1] is not None), default=None)
        fds_max = max((s[2] for s in self.samples if s[2] is not None), default=None)
        te = sum(self.transport_errors.values())

        log("")
        log("=" * 100)
        log(f"soak summary ({el:.0f} s of load, {a.concurrency} workers, sidecar {self.conftest.SIDECAR_BIN})")
        log(f"  requests          {self.total} ({self.total / el:.0f} req/s); statuses "
            + ", ".join(f"{k}: {v}" for k, v in sorted(self.status.items())))
        cases = Counter()
        for (kind, cert, st), v in self.by_case.items():
            cases[(kind, cert, st)] += v
        log("  by case           " + "; ".join(f"{k}/{c} {s}: {v}" for (k, c, s), v in sorted(cases.items())))
        log(f"  wrong decisions   {self.wrong}")
        if self.wrong_examples:
            try:
                sidecar_log = Path(self.sidecar.log_path).read_text(errors="replace").splitlines()
            except OSError:
                sidecar_log = []
        for ex in self.wrong_examples:
            log(f"      {json.dumps(ex)}")
            seen = [ln for ln in sidecar_log if f"authz.token={ex['authz.token']}" in ln
                    or f'"authz.token":"{ex["authz.token"]}"' in ln]
            for ln in seen[-3:]:
                log(f"        sidecar log: {ln}")
        log(f"  AS outages        {len(self.windows)} (down "
            + ", ".join(f"{w.end - w.start:.1f}" for w in self.windows if w.end) + " s)")
        log(f"  5xx during outages {self.fivexx_during} of {self.req_during} requests overlapping an outage "
            f"(+{a.grace_seconds:.0f} s grace)")
        log(f"  5xx outside       {self.fivexx_outside} of {self.req_outside}")
        for ex in self.fivexx_outside_examples:
            log(f"      {json.dumps(ex)}")
        if self.unexpected:
            log(f"  unexpected (not wrong) statuses {dict(self.unexpected)}")
            for ex in self.unexpected_examples:
                log(f"      {json.dumps(ex)}")
        def pct(values, q):
            return values[min(len(values) - 1, int(q * len(values)))]

        lat_lines = []
        for (st, during), arr in sorted(self.latency.items()):
            v = sorted(arr)
            lat_lines.append(f"{st} {'during' if during else 'outside'} outages: n={len(v)} min {v[0]:.1f} p50 {pct(v, .5):.1f} "
                             f"p99 {pct(v, .99):.1f} max {v[-1]:.1f}")
        log("  latency ms        " + "\n                    ".join(lat_lines))
        log(f"  transport errors  {te} {dict(self.transport_errors) if te else ''}")
        log(f"  client connections {self.connections_opened} opened; closed by nginx after: "
            + (", ".join(f"{k}: {v}" for k, v in sorted(self.closed_after.items())) or "none"))
        log(f"  sidecar RSS       idle {mib(self.idle[0])}, start {mib(rss['start'])}, middle {mib(rss['middle'])}, "
            f"end {mib(rss['end'])}, max {mib(rss_max)}, idle after {mib(after_idle[0])}")
        log(f"  sidecar fds       idle {self.idle[1]}, start {fds['start']}, end {fds['end']}, max {fds_max}, "
            f"idle after {after_idle[1]}")
        log(f"  sidecar restarts  {1 if self.sidecar_died else 0}")
        if metrics:
            log(f"  sidecar metrics   {json.dumps(metrics)}")

        fail = []
        if self.wrong:
            fail.append(f"{self.wrong} wrong decision(s)")
        if self.sidecar_died:
            fail.append(f"the sidecar died (exit status {self.sidecar.proc.returncode})")
            lines = self.conftest.tail(self.sidecar.log_path, 100000).splitlines()
            notable = [ln for ln in lines if " info authz:" not in ln and '"level":"info"' not in ln]
            log(f"--- sidecar log ({self.sidecar.log_path}): last lines other than info ---")
            log("\n".join(notable[-40:]))
            log("--- last lines ---\n" + "\n".join(lines[-10:]))
        if fds["start"] is not None and fds["end"] is not None and fds["end"] - fds["start"] > a.max_fd_growth:
            fail.append(f"sidecar fds grew from {fds['start']} to {fds['end']} (> {a.max_fd_growth})")
        warnings = []
        if self.req_outside and self.fivexx_outside > 0.005 * self.req_outside:
            warnings.append(f"5xx outside outages is {100 * self.fivexx_outside / self.req_outside:.2f} % (expected ~0)")
        if rss["middle"] and rss["end"] and rss["end"] > rss["middle"] * 1.25 + 16 * 1024:
            warnings.append(f"RSS grew from {mib(rss['middle'])} (middle) to {mib(rss['end'])} (end): no plateau?")
        if metrics and not metrics.get("authz_cache_evictions_total"):
            warnings.append("the cache evicted nothing (max_entries 5000 < 10000 tokens should evict)")
        for w in warnings:
            log(f"  WARNING: {w}")
        harness = self.harness_error
        if not harness and not self.interrupted and self.total < 100:
            harness = f"only {self.total} requests completed"

        summary = {
            "seconds": round(el, 1), "requests": self.total, "req_per_s": round(self.total / el, 1),
            "statuses": {str(k): v for k, v in self.status.items()}, "wrong_decisions": self.wrong,
            "wrong_examples": self.wrong_examples, "outages": len(self.windows),
            "fivexx_during_outages": self.fivexx_during, "requests_during_outages": self.req_during,
            "fivexx_outside_outages": self.fivexx_outside, "requests_outside_outages": self.req_outside,
            "fivexx_outside_examples": self.fivexx_outside_examples, "transport_errors": dict(self.transport_errors),
            "client_connections_opened": self.connections_opened,
            "closed_by_nginx_after_status": {str(k): v for k, v in self.closed_after.items()},
            "unexpected_statuses": {str(k): v for k, v in self.unexpected.items()},
            "rss_kib": {"idle": self.idle[0], **rss, "max": rss_max, "idle_after": after_idle[0]},
            "fds": {"idle": self.idle[1], **fds, "max": fds_max, "idle_after": after_idle[1]},
            "sidecar_died": self.sidecar_died, "metrics": metrics, "failures": fail, "warnings": warnings,
            "harness_error": harness,
        }
        (self.workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        with open(self.workdir / "timeline.csv", "w") as f:
            sts = sorted({k for c in self.timeline.values() for k in c if isinstance(k, int)})
            f.write("second," + ",".join(map(str, sts)) + ",during_outage,rss_kib,fds\n")
            samp = {int(t): (r, d) for t, r, d in self.samples}
            for sec in sorted(self.timeline):
                c = self.timeline[sec]
                r, d = samp.get(sec, ("", ""))
                f.write(f"{sec}," + ",".join(str(c.get(s, 0)) for s in sts) + f",{c.get('during_outage', 0)},{r},{d}\n")

        if self.interrupted:
            log("RESULT: INTERRUPTED")
            return 130
        if fail:
            log("RESULT: FAIL - " + "; ".join(fail))
            return 1
        if harness:
            log(f"RESULT: HARNESS ERROR - {harness}")
            return 2
        log("RESULT: PASS" + (f" (with {len(warnings)} warning(s))" if warnings else ""))
        return 0

    # ---------------------------------------------------------------- teardown
    def teardown(self) -> None:
        self.closing = True
        for label, p in reversed(self.procs):
            try:
                self.conftest.stop_process(p)
            except Exception as e:      # keep stopping the others
                log(f"could not stop {label} (PID {p.pid}): {e}")
        self.procs = []
        if self.sidecar is not None and not self.sidecar_died:
            rc = self.sidecar.proc.returncode
            if rc not in (0, None):
                log(f"  note: the sidecar exited with status {rc} on SIGTERM")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="duration of the load (default 10)")
    p.add_argument("--quick", action="store_true", help="1-minute run (same as --minutes 1)")
    p.add_argument("--concurrency", type=int, default=16, help="client workers (default 16)")
    p.add_argument("--client2-share", type=float, default=0.1,
                   help="share of requests presenting client2's certificate (default 0.1)")
    p.add_argument("--outage-period", type=float, default=30.0, help="seconds between AS kills (default 30)")
    p.add_argument("--first-outage", type=float, default=15.0, help="first AS kill, seconds into the load (default 15)")
    p.add_argument("--outage-seconds", type=float, default=5.0, help="how long the AS stays down (default 5)")
    p.add_argument("--grace-seconds", type=float, default=2.0, help="outage grace after the AS is back (default 2)")
    p.add_argument("--progress-seconds", type=float, default=30.0, help="progress line interval (default 30)")
    p.add_argument("--start-sample-seconds", type=float, default=10.0,
                   help="when the 'start' RSS/fd sample is taken, under load (default 10)")
    p.add_argument("--max-fd-growth", type=int, default=50, help="fail if fds grow by more (default 50)")
    p.add_argument("--log-level", default="info", help="sidecar logging.level (default info)")
    p.add_argument("--seed", type=int, default=None, help="random seed for tokens and requests")
    p.add_argument("--workdir", help="work directory (default: a new /tmp/authz-soak-*)")
    p.add_argument("--keep-work", action="store_true", help="keep the work directory after a passing run")
    p.add_argument("--serve", choices=["fake-as", "echo"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--tokens-file", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.serve:
        serve(a.serve, a.port, a.tokens_file)
        return 0
    if a.quick:
        a.minutes = 1.0
    if a.minutes <= 0 or a.concurrency < 1:
        p.error("--minutes and --concurrency must be positive")
    if a.seed is None:
        a.seed = random.randrange(1 << 30)
    log(f"authz-sidecar soak: {a.minutes:g} min, seed {a.seed}")

    soak = Soak(a)
    atexit.register(soak.teardown)

    def on_setup_signal(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_setup_signal)
    rc = 2
    try:
        soak.setup()
        asyncio.run(soak.run_load())
        for s in (signal.SIGTERM, signal.SIGHUP):      # asyncio.run restored the defaults
            signal.signal(s, on_setup_signal)
        rc = soak.report()
    except HarnessError as e:
        log(f"RESULT: HARNESS ERROR - {e}")
        rc = 2
    except KeyboardInterrupt:
        log("RESULT: INTERRUPTED")
        rc = 130
    finally:
        soak.teardown()
        if soak.workdir is not None:
            shutil.rmtree(soak.workdir / "bin", ignore_errors=True)     # the 100+ MB binary copy
            if rc == 0 and not a.keep_work:
                shutil.rmtree(soak.workdir, ignore_errors=True)
            else:
                log(f"logs kept in {soak.workdir} (sidecar/sidecar.log, nginx/logs/, summary.json, timeline.csv)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
