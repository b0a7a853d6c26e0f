#!/usr/bin/env python3
"""Shared helpers for running the authz-sidecar stack on loopback.

Used by scripts/demo.sh (through the command line below) and by the pytest harness in
tests/integration (by import), so there is one copy of the logic that turns deploy/nginx.conf
into a config nginx can run from a work directory.

    python3 scripts/stack.py render-nginx --workdir DIR --certs DIR \
        --nginx-port N --sidecar-port N --upstream-port N      # prints the rendered config's path
    python3 scripts/stack.py wait-port 127.0.0.1:9191 [--timeout S]
    python3 scripts/stack.py wait-http http://127.0.0.1:9191/healthz [--timeout S]
    python3 scripts/stack.py free-port
    python3 scripts/stack.py thumbprint FILE.pem              # RFC 8705 x5t#S256

Standard library only.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import os
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEPLOY_NGINX_CONF = REPO / "deploy" / "nginx.conf"
HEADERS_MORE_MODULE = "/usr/lib/nginx/modules/ngx_http_headers_more_filter_module.so"

# Strings of deploy/nginx.conf that a rendered copy replaces. Each must occur exactly once, so a
# change to the deploy file that breaks rendering fails loudly instead of running the wrong config.
_DEPLOY_CERTS = {
    "server_crt": "/etc/authz-sidecar/certs/server.crt",
    "server_key": "/etc/authz-sidecar/certs/server.key",
    "ca_crt": "/etc/authz-sidecar/certs/ca.crt",
}
_DEPLOY_LISTEN = "listen 443 ssl;"
_DEPLOY_SIDECAR = "server 127.0.0.1:9191;"
_DEPLOY_UPSTREAM = "server 127.0.0.1:9292;"
_DEPLOY_PID = "pid /run/nginx-authz-edge.pid;"
_DEPLOY_ERROR_LOG = "error_log /var/log/nginx/authz-edge-error.log warn;"
_DEPLOY_ACCESS_LOG = "access_log /var/log/nginx/authz-edge-access.log;"
_DEPLOY_WORKERS = "worker_processes auto;"
_DEPLOY_HTTP = "\nhttp {\n"


def _replace_once(text: str, old: str, new: str) -> str:
    count = text.count(old)
    if count != 1:
        raise ValueError(f"deploy/nginx.conf: expected exactly one {old!r}, found {count}")
    return text.replace(old, new)


def _cert_paths(certs: "str | os.PathLike[str] | dict[str, str]") -> dict[str, str]:
    if isinstance(certs, dict):
        return {k: str(Path(certs[k]).resolve()) for k in _DEPLOY_CERTS}
    d = Path(certs).resolve()
    return {"server_crt": str(d / "server.crt"), "server_key": str(d / "server.key"), "ca_crt": str(d / "ca.crt")}


def render_nginx_conf(workdir, ports: dict[str, int], certs, *, source: "Path | None" = None,
                      name: str = "nginx.conf") -> Path:
    """Write a runnable copy of deploy/nginx.conf under WORKDIR and return its path.

    ports: {"nginx": listen port on 127.0.0.1, "sidecar": ..., "upstream": ...}
    certs: a directory made by scripts/mkcerts.sh, or {"server_crt", "server_key", "ca_crt"}.
    The copy runs in the foreground (daemon off, so the caller owns nginx's PID), keeps its pid
    file, logs and temp files in WORKDIR, and runs its worker as root when started by root (the
    work dir may sit in a directory other users cannot enter).
    Start it with: nginx -e WORKDIR/logs/error.log -c CONF
    """
    work = Path(workdir).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    (work / "temp").mkdir(parents=True, exist_ok=True)
    text = Path(source or DEPLOY_NGINX_CONF).read_text()
    paths = _cert_paths(certs)
    for key, deploy_path in _DEPLOY_CERTS.items():
        text = _replace_once(text, deploy_path, paths[key])
    text = _replace_once(text, _DEPLOY_LISTEN, f"listen 127.0.0.1:{int(ports['nginx'])} ssl;")
    text = _replace_once(text, _DEPLOY_SIDECAR, f"server 127.0.0.1:{int(ports['sidecar'])};")
    text = _replace_once(text, _DEPLOY_UPSTREAM, f"server 127.0.0.1:{int(ports['upstream'])};")
    text = _replace_once(text, _DEPLOY_PID, f"pid {work}/nginx.pid;")
    text = _replace_once(text, _DEPLOY_ERROR_LOG, f"error_log {work}/logs/error.log info;")
    text = _replace_once(text, _DEPLOY_ACCESS_LOG, f"access_log {work}/logs/access.log;")
    head = ["# rendered from deploy/nginx.conf by scripts/stack.py - do not edit", "daemon off;"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        head.append("user root;")
    text = _replace_once(text, _DEPLOY_WORKERS, "\n".join(head) + "\nworker_processes 1;")
    temps = "".join(
        f"    {d}_temp_path {work}/temp/{d};\n"
        for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = _replace_once(text, _DEPLOY_HTTP, _DEPLOY_HTTP + temps)
    if not Path(HEADERS_MORE_MODULE).exists():
        raise FileNotFoundError(f"{HEADERS_MORE_MODULE} is missing: apt-get install libnginx-mod-http-headers-more-filter")
    out = work / name
    out.write_text(text)
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float = 20.0, proc=None) -> None:
    """Wait until HOST:PORT accepts connections; raise TimeoutError (or RuntimeError if PROC died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before {host}:{port} opened")
        time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} did not open within {timeout} s")


def wait_http(url: str, timeout: float = 20.0, proc=None, cafile: "str | None" = None) -> None:
    """Wait until URL answers 200."""
    ctx = ssl.create_default_context(cafile=cafile) if url.startswith("https") else None
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1, context=ctx) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer 200 within {timeout} s ({last})")


def thumbprint(pem_path) -> str:
    """RFC 8705 §3.1 x5t#S256: base64url(SHA-256(DER)) without padding."""
    der = ssl.PEM_cert_to_DER_cert(Path(pem_path).read_text())
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def _main(argv: "list[str] | None" = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render-nginx", help="render deploy/nginx.conf into a work dir")
    r.add_argument("--workdir", required=True)
    r.add_argument("--certs", required=True, help="directory made by scripts/mkcerts.sh")
    r.add_argument("--nginx-port", type=int, required=True)
    r.add_argument("--sidecar-port", type=int, required=True)
    r.add_argument("--upstream-port", type=int, required=True)
    w = sub.add_parser("wait-port")
    w.add_argument("hostport")
    w.add_argument("--timeout", type=float, default=20.0)
    h = sub.add_parser("wait-http")
    h.add_argument("url")
    h.add_argument("--timeout", type=float, default=20.0)
    h.add_argument("--cafile")
    sub.add_parser("free-port")
    t = sub.add_parser("thumbprint")
    t.add_argument("pem")
    a = p.parse_args(argv)
    try:
        if a.cmd == "render-nginx":
            print(render_nginx_conf(a.workdir, {"nginx": a.nginx_port, "sidecar": a.sidecar_port,
                                                "upstream": a.upstream_port}, a.certs))
        elif a.cmd == "wait-port":
            host, _, port = a.hostport.rpartition(":")
            wait_port(host or "127.0.0.1", int(port), a.timeout)
        elif a.cmd == "wait-http":
            wait_http(a.url, a.timeout, cafile=a.cafile)
        elif a.cmd == "free-port":
            print(free_port())
        elif a.cmd == "thumbprint":
            print(thumbprint(a.pem))
    except (OSError, ValueError, TimeoutError, RuntimeError) as e:
        print(f"stack.py {a.cmd}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
