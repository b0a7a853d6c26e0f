"""The proxy side of reliability (issue: faults, hostile input): pipelining, clients that
disconnect or trickle, oversized requests, 10,000 concurrent keep-alive connections — the
sidecar keeps answering, leaks no descriptors and returns to its memory baseline."""
import os
import resource
import selectors
import socket
import time

import pytest

from conftest import INTROSPECTION_CLIENT_ID, INTROSPECTION_CLIENT_SECRET, Sidecar, http_request, policies


def config(fake_as, **server) -> dict:
    return {
        "server": server,
        "introspection": {"endpoint": fake_as.url, "client_id": INTROSPECTION_CLIENT_ID,
                          "client_secret": INTROSPECTION_CLIENT_SECRET, "timeout_ms": 1000},
        "policies": policies(),
    }


def server_connections(port: int) -> int:
    """Sockets on the sidecar's side of its listening port that are not closed yet (anything
    but LISTEN and TIME_WAIT): a connection the sidecar failed to close shows up here."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].split(":")[1], 16)
            if local_port == port and fields[3] not in ("0A", "06"):
                count += 1
    return count


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def read_responses(sock: socket.socket, count: int, timeout: float = 5.0) -> list[int]:
    """Reads `count` HTTP responses (Content-Length framed) and returns their statuses."""
    sock.settimeout(timeout)
    data = b""
    statuses = []
    while len(statuses) < count:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return statuses
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        statuses.append(int(lines[0].split()[1]))
        length = next((int(l.split(b":")[1]) for l in lines[1:] if l.lower().startswith(b"content-length:")), 0)
        while len(rest) < length:
            rest += sock.recv(65536)
        data = rest[length:]
    return statuses


@pytest.fixture
def token(fake_as):
    t = f"robust-{time.monotonic_ns()}"
    fake_as.add_token(t, {"active": True, "scope": "system-access", "exp": int(time.time()) + 600})
    return t


def authz(token: "str | None", uri: str = "/token-mtls/api/") -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET /authz HTTP/1.1\r\nHost: x\r\nX-Original-URI: {uri}\r\n{auth}\r\n".encode()


def test_pipelined_requests_answer_in_order(tmp_path, fake_as, token):
    sc = Sidecar(tmp_path, config(fake_as))
    try:
        with socket.create_connection(("127.0.0.1", sc.port)) as s:
            s.sendall(authz(None) + authz(token) + authz("unknown-token") + authz(token, "/admin-api/x"))
            assert read_responses(s, 4) == [401, 200, 401, 403]
    finally:
        sc.stop()


def test_client_disconnects_mid_request_and_mid_decision(tmp_path, fake_as, token):
    sc = Sidecar(tmp_path, config(fake_as))
    try:
        for _ in range(50):
            with socket.create_connection(("127.0.0.1", sc.port)) as s:
                s.sendall(b"GET /authz HTTP/1.1\r\nHost: x\r\nAuthoriz")  # half a request, then gone
        fake_as.mode, fake_as.delay = "slow", 0.5
        try:
            for i in range(20):
                with socket.create_connection(("127.0.0.1", sc.port)) as s:
                    s.sendall(authz(f"{token}-gone-{i}"))  # the decision waits for the AS; we leave
        finally:
            time.sleep(0.8)
            fake_as.mode = "ok"
        assert http_request(sc.base, "/healthz").status == 200
        # the AS may still be working off the slow backlog on a busy machine: a 503 (fault) is
        # acceptable for a moment, a denial never
        answers = []
        for _ in range(10):
            with socket.create_connection(("127.0.0.1", sc.port)) as s:
                s.sendall(authz(token))
                answers += read_responses(s, 1)
            if answers[-1] != 503:
                break
            time.sleep(0.5)
        assert answers[-1] == 200 and set(answers) <= {200, 503}, answers
        # every connection the clients dropped is closed on the sidecar's side too
        for _ in range(50):
            if server_connections(sc.port) == 0:
                break
            time.sleep(0.1)
        assert server_connections(sc.port) == 0
        assert sc.proc.poll() is None
    finally:
        sc.stop()


def seconds_until_closed(sock: socket.socket, chunks, interval: float) -> "float | None":
    """Sends `chunks` one at a time, `interval` s apart, until the peer closes the connection;
    returns the seconds that took, or None if it stayed open."""
    started = time.monotonic()
    for chunk in chunks:
        try:
            sock.sendall(chunk)
            sock.setblocking(False)
            try:
                if sock.recv(1) == b"":
                    return time.monotonic() - started
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - started
        time.sleep(interval)
    return None


def test_slow_clients_are_cut_off_at_the_idle_timeout(tmp_path, fake_as):
    sc = Sidecar(tmp_path, config(fake_as, idle_timeout_seconds=2))
    try:
        with socket.create_connection(("127.0.0.1", sc.port)) as s:
            s.settimeout(10)
            # one byte every 0.25 s: a complete head would take ~20 s
            closed_after = seconds_until_closed(s, (bytes([b]) for b in authz(None)), 0.25)
        assert closed_after is not None and closed_after < 5, f"closed after {closed_after}"
        # an idle keep-alive connection is closed too
        with socket.create_connection(("127.0.0.1", sc.port)) as s:
            s.sendall(authz(None))
            assert read_responses(s, 1) == [401]
            s.settimeout(5)
            t0 = time.monotonic()
            assert s.recv(1) == b""
            assert 1.5 < time.monotonic() - t0 < 4.5
    finally:
        sc.stop()


HOSTILE = [
    # headers over max_header_bytes (16 KiB): refused as invalid_request, never reaching the AS
    (b"GET /authz HTTP/1.1\r\nHost: x\r\nX-Original-URI: /token-mtls/\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n", {401}),
    (b"GET /authz HTTP/1.1\r\nHost: x\r\nX-Original-URI: /token-mtls/\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(3000)) + b"\r\n", {401}),
    # a huge path: the HTTP parser's own limit answers first
    (b"GET /authz/" + b"p" * 200_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", {400, 401, 431}),
    # unknown paths and methods
    (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", {404}),
    # a method the HTTP parser does not know is a 400 (nginx's subrequest is always a GET)
    (b"BREW /authz HTTP/1.1\r\nHost: x\r\nX-Original-URI: /token-mtls/\r\n\r\n", {400}),
    # not HTTP at all
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64), {400, None}),
]
HOSTILE_IDS = ["headers-over-max_header_bytes", "3000-headers", "200KB-path", "unknown-path", "unknown-method", "tls-hello"]


@pytest.mark.parametrize("request_bytes, allowed", HOSTILE, ids=HOSTILE_IDS)
def test_hostile_requests_to_the_sidecar(tmp_path_factory, fake_as, request_bytes, allowed):
    sc = Sidecar(tmp_path_factory.mktemp("hostile"), config(fake_as))
    try:
        before = fake_as.total_calls
        with socket.create_connection(("127.0.0.1", sc.port)) as s:
            try:
                s.sendall(request_bytes)
                statuses = read_responses(s, 1)
            except (ConnectionResetError, BrokenPipeError):
                statuses = []
        assert (statuses[0] if statuses else None) in allowed
        assert fake_as.total_calls == before
        assert http_request(sc.base, "/healthz").status == 200
    finally:
        sc.stop()


def open_and_close(port: int, pid: int, request: bytes, base_fds: int, count: int = 10_000):
    """Opens `count` keep-alive connections at once, each asking one decision; checks every one
    got 200 and that the sidecar held them all; closes them and waits for its descriptors to
    return to `base_fds`. Returns (peak fds, peak RSS KiB, RSS KiB after)."""
    sel = selectors.DefaultSelector()
    socks = []
    # Connected in batches, each accepted before the next is opened: 10,000 SYNs at once overflow
    # any listen backlog, and the kernel then resets the odd connection whose SYN cookie fails
    # (TcpExtSyncookiesFailed), which says nothing about the sidecar.
    batch = 500
    for first in range(0, count, batch):
        for _ in range(min(batch, count - first)):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            socks.append(s)
            sel.register(s, selectors.EVENT_WRITE, {"sent": False, "buf": b""})
        accept_deadline = time.monotonic() + 10
        while fds(pid) < base_fds + len(socks) * 0.98 and time.monotonic() < accept_deadline:
            time.sleep(0.01)
    ok, pending = 0, count
    deadline = time.monotonic() + 60
    while pending and time.monotonic() < deadline:
        for key, events in sel.select(timeout=1):
            s, state = key.fileobj, key.data
            if events & selectors.EVENT_WRITE and not state["sent"]:
                try:
                    s.send(request)
                except BlockingIOError:
                    continue
                state["sent"] = True
                sel.modify(s, selectors.EVENT_READ, state)
            elif events & selectors.EVENT_READ:
                chunk = s.recv(4096)
                state["buf"] += chunk
                if b"\r\n\r\n" in state["buf"] or not chunk:
                    ok += state["buf"].startswith(b"HTTP/1.1 200")
                    sel.unregister(s)
                    pending -= 1
    peak_fds, peak_rss = fds(pid), rss_kib(pid)
    assert ok == count, f"{ok} of {count} answered 200"
    assert peak_fds >= base_fds + count * 0.95, "the connections should all be open at once"
    for s in socks:
        s.close()
    sel.close()
    for _ in range(100):
        if fds(pid) <= base_fds + 5:
            break
        time.sleep(0.1)
    assert fds(pid) <= base_fds + 5, f"descriptors: base {base_fds}, peak {peak_fds}, after {fds(pid)}"
    return peak_fds, peak_rss, rss_kib(pid)


def test_ten_thousand_keepalive_connections(tmp_path, fake_as, token):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 12_000:
        pytest.fail(f"10,000 connections need a descriptor limit above 12,000 (hard limit {hard})")
    # the test process and the sidecar (which inherits it) each hold one end of every connection
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 30_000, hard))
    sc = Sidecar(tmp_path, config(fake_as))  # inherits the raised limit
    try:
        assert http_request(sc.base, "/authz", headers={"Authorization": f"Bearer {token}", "X-Original-URI": "/token-mtls/"}).status == 200
        pid = sc.proc.pid
        base_fds, base_rss = fds(pid), rss_kib(pid)
        waves = [open_and_close(sc.port, pid, authz(token), base_fds) for _ in range(2)]
        after_rss = rss_kib(pid)
        (peak_fds1, peak_rss1, rss1), (peak_fds2, peak_rss2, rss2) = waves
        print(f"\n10k connections, two waves: fds {base_fds} -> {peak_fds1} -> {base_fds}, {peak_fds2} -> {fds(pid)}; "
              f"RSS KiB {base_rss} -> {peak_rss1} -> {rss1}; {peak_rss2} -> {rss2}")
        # The allocator keeps freed pages for reuse, so RSS stays near the first peak instead of
        # dropping to the baseline; what must not happen is growth: a second wave of 10,000
        # connections reuses that memory (no per-connection leak).
        assert peak_rss2 <= peak_rss1 + (peak_rss1 - base_rss) * 0.1 + 8 * 1024
        assert after_rss <= peak_rss1 + 8 * 1024
        assert sc.proc.poll() is None
    finally:
        sc.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def read_response(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, dict, bytes]:
    """One response: its status line, headers (lower-case names) and Content-Length body."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response head: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode()] = value.strip().decode()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside a body"
        rest += chunk
    assert len(rest) == length, f"bytes after the body: {rest[length:]!r}"
    return lines[0], headers, rest


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_head_answer_has_its_length_but_no_body(tmp_path, fake_as, token):
    sc = Sidecar(tmp_path, config(fake_as))
    try:
        with socket.create_connection(("127.0.0.1", sc.port)) as s:
            s.sendall(authz(None).replace(b"GET ", b"HEAD ", 1))
            s.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                data += s.recv(65536)
            head, _, rest = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 401 "), head
            assert int(next(l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:"))) > 0
            assert rest == b""
            # the next answer on the connection starts right there: no body bytes were sent
            s.sendall(authz(token))
            status, headers, _ = read_response(s)
            assert status.startswith(b"HTTP/1.1 200 "), status
            assert headers["x-credential-scope"] == "system-access"
    finally:
        sc.stop()


def test_http10_close_and_keep_alive(tmp_path, fake_as, token):
    sc = Sidecar(tmp_path, config(fake_as))
    try:
        request = authz(token).replace(b"HTTP/1.1", b"HTTP/1.0", 1)
        with socket.create_connection(("127.0.0.1", sc.port)) as s:
            s.sendall(request)
            status, headers, _ = read_response(s)
            assert status.startswith(b"HTTP/1.0 200 "), status
            assert headers["connection"] == "close"
            assert closed_by_peer(s)
        with socket.create_connection(("127.0.0.1", sc.port)) as s:
            keep = request.replace(b"Host: x\r\n", b"Host: x\r\nConnection: keep-alive\r\n")
            for _ in range(2):
                s.sendall(keep)
                status, headers, _ = read_response(s)
                assert status.startswith(b"HTTP/1.0 200 "), status
                assert headers["connection"] == "keep-alive"
        # HTTP/1.1 with Connection: close
        with socket.create_connection(("127.0.0.1", sc.port)) as s:
            s.sendall(authz(token).replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n"))
            status, headers, _ = read_response(s)
            assert status.startswith(b"HTTP/1.1 200 ") and headers["connection"] == "close"
            assert closed_by_peer(s)
    finally:
        sc.stop()


def test_garbage_behind_a_request_gets_400_then_close(tmp_path, fake_as, token):
    sc = Sidecar(tmp_path, config(fake_as))
    try:
        with socket.create_connection(("127.0.0.1", sc.port)) as s:
            s.sendall(authz(None) + b"\x00\x01 NOT HTTP\r\n\r\n")  # answered at once, then the 400
            assert read_responses(s, 2) == [401, 400]
            assert closed_by_peer(s)
        # behind a decision that waits for the AS: that one is answered, then the connection closes
        fake_as.mode, fake_as.delay = "slow", 0.3
        with socket.create_connection(("127.0.0.1", sc.port)) as s:
            s.sendall(authz(f"{token}-new") + b"\x00\x01 NOT HTTP\r\n\r\n")
            status, headers, _ = read_response(s)
            assert status.startswith(b"HTTP/1.1 401 "), status  # unknown token: inactive
            assert headers["connection"] == "close"
            assert closed_by_peer(s)
        assert http_request(sc.base, "/healthz").status == 200
    finally:
        fake_as.mode = "ok"
        sc.stop()


def test_pipelining_behind_a_slow_decision_is_bounded(tmp_path, fake_as, token):
    sc = Sidecar(tmp_path, config(fake_as))
    fake_as.mode, fake_as.delay = "slow", 0.5
    try:
        with socket.create_connection(("127.0.0.1", sc.port)) as s:
            # a few behind a miss wait their turn and are answered in order
            s.sendall(authz(f"{token}-miss") + authz(None) + authz(None, "/admin-api/x"))
            assert read_responses(s, 3) == [401, 401, 401]
        with socket.create_connection(("127.0.0.1", sc.port)) as s:
            # hundreds behind a miss: the connection is cut off, the sidecar carries on
            s.sendall(authz(f"{token}-miss2") + authz(None) * 300)
            try:
                answered = read_responses(s, 301)
            except ConnectionResetError:  # closed with requests unread: the kernel resets
                answered = []
            assert len(answered) < 301
        fake_as.mode = "ok"
        with socket.create_connection(("127.0.0.1", sc.port)) as s:
            s.sendall(authz(token))
            assert read_responses(s, 1) == [200]
    finally:
        fake_as.mode = "ok"
        sc.stop()


def test_graceful_shutdown_closes_idle_connections_and_finishes_busy_ones(tmp_path, fake_as, token):
    import signal
    sc = Sidecar(tmp_path, config(fake_as))
    try:
        idle = socket.create_connection(("127.0.0.1", sc.port))
        idle.sendall(authz(None))
        assert read_responses(idle, 1) == [401]
        fake_as.mode, fake_as.delay = "slow", 0.6
        busy = socket.create_connection(("127.0.0.1", sc.port))
        busy.sendall(authz(token))  # a miss: waits ~0.6 s for the AS (timeout_ms is 1000)
        time.sleep(0.3)
        sc.proc.send_signal(signal.SIGTERM)
        assert closed_by_peer(idle, timeout=3)
        status, headers, _ = read_response(busy)
        assert status.startswith(b"HTTP/1.1 200 "), status
        assert headers["connection"] == "close"
        assert closed_by_peer(busy)
        assert sc.proc.wait(timeout=10) == 0
        idle.close()
        busy.close()
    finally:
        fake_as.mode = "ok"
        sc.stop()


def test_a_trickled_body_is_cut_off_at_the_idle_timeout(tmp_path, fake_as):
    """The idle timeout covers the whole request: a client that sends a head and then dribbles
    its body cannot hold a connection (or a graceful shutdown) open."""
    sc = Sidecar(tmp_path, config(fake_as, idle_timeout_seconds=2))
    try:
        with socket.create_connection(("127.0.0.1", sc.port)) as s:
            s.sendall(b"POST /authz HTTP/1.1\r\nHost: x\r\nX-Original-URI: /token-mtls/\r\nContent-Length: 1000\r\n\r\n")
            # one byte every 0.1 s: the body would take 100 s
            closed_after = seconds_until_closed(s, (b"a" for _ in range(80)), 0.1)
        assert closed_after is not None and closed_after < 5, f"closed after {closed_after}"
        # a request behind a slow AS is not cut off by the idle timeout of a shorter wait
        fake_as.mode, fake_as.delay = "slow", 0.5
        with socket.create_connection(("127.0.0.1", sc.port)) as s:
            s.sendall(authz(None) + authz("slow-unknown-token"))
            assert read_responses(s, 2) == [401, 401]
    finally:
        fake_as.mode = "ok"
        sc.stop()
