#!/usr/bin/env python3
"""Render the compose demo's proxy configurations from the deploy files, so there is one source:

    deploy/nginx.conf   -> deploy/compose/nginx.conf
    deploy/envoy.yaml   -> deploy/compose/envoy.yaml

    python3 scripts/compose_configs.py            # (re)write both files
    python3 scripts/compose_configs.py --check    # exit 1 when a committed file is out of date

What differs from the deploy files (everything else is the same text):
  * addresses: compose service names instead of 127.0.0.1 (authz-sidecar:9191, echo:9292), and the
    edge ports the demo publishes (nginx 8443, Envoy 10443) instead of 443;
  * Envoy resolves those names (STRICT_DNS clusters instead of STATIC);
  * nginx logs to stderr/stdout (the container log);
  * nginx hands the client certificate to the sidecar as a one-element x-forwarded-client-cert
    (`Cert="<URL-encoded PEM>"`) instead of X-Client-Cert, so that ONE sidecar, with one set of
    policies (`certificate_header: x-forwarded-client-cert`, `certificate_format: xfcc`), serves
    both proxies: Envoy sends its own sanitised XFCC (forward_client_cert_details: SANITIZE_SET).

Every replaced string must occur exactly once in its deploy file, so an edit there that breaks the
rendering fails loudly (tests/integration/test_packaging.py runs --check). Standard library only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose"

# The compose services and ports these files name (compose.yml and deploy/compose/sidecar.yaml
# must agree; the packaging test checks it).
SIDECAR = ("authz-sidecar", 9191)
UPSTREAM = ("echo", 9292)
NGINX_PORT = 8443
ENVOY_PORT = 10443

_NGINX_CERT_BLOCK = """\
            # The verified client certificate, URL-encoded PEM (policy certificate_header:
            # X-Client-Cert). Set here, so a client-sent X-Client-Cert is overwritten.
            proxy_set_header X-Client-Cert           $ssl_client_escaped_cert;
            proxy_set_header X-Forwarded-Client-Cert "";
"""
_NGINX_CERT_BLOCK_COMPOSE = """\
            # The verified client certificate as a one-element x-forwarded-client-cert,
            # Cert="<URL-encoded PEM>" (compose demo: the sidecar's policies read
            # certificate_header: x-forwarded-client-cert, certificate_format: xfcc, which is also
            # what Envoy sends). Set here, so a client-sent header is overwritten.
            proxy_set_header X-Client-Cert           "";
            proxy_set_header X-Forwarded-Client-Cert 'Cert="$ssl_client_escaped_cert"';
"""

NGINX_REPLACEMENTS = [
    ("listen 443 ssl;", f"listen {NGINX_PORT} ssl;"),
    ("server 127.0.0.1:9191;", f"server {SIDECAR[0]}:{SIDECAR[1]};"),
    ("server 127.0.0.1:9292;", f"server {UPSTREAM[0]}:{UPSTREAM[1]};"),
    ("error_log /var/log/nginx/authz-edge-error.log warn;", "error_log stderr warn;"),
    ("access_log /var/log/nginx/authz-edge-access.log;", "access_log /dev/stdout;"),
    (_NGINX_CERT_BLOCK, _NGINX_CERT_BLOCK_COMPOSE),
]

ENVOY_REPLACEMENTS = [
    ("{ address: 0.0.0.0, port_value: 443 }", f"{{ address: 0.0.0.0, port_value: {ENVOY_PORT} }}"),
    ('"http://127.0.0.1:9191"', f'"http://{SIDECAR[0]}:{SIDECAR[1]}"'),
    ("  - name: authz_sidecar\n    type: STATIC\n",
     "  - name: authz_sidecar\n    type: STRICT_DNS\n    dns_lookup_family: V4_ONLY\n"),
    ("  - name: api_upstream\n    type: STATIC\n",
     "  - name: api_upstream\n    type: STRICT_DNS\n    dns_lookup_family: V4_ONLY\n"),
    ("{ address: 127.0.0.1, port_value: 9191 }", f"{{ address: {SIDECAR[0]}, port_value: {SIDECAR[1]} }}"),
    ("{ address: 127.0.0.1, port_value: 9292 }", f"{{ address: {UPSTREAM[0]}, port_value: {UPSTREAM[1]} }}"),
]

_HEADER = """\
{c} GENERATED from deploy/{src} by scripts/compose_configs.py - do not edit; change deploy/{src}
{c} (or the script) and run `python3 scripts/compose_configs.py`.
{c} The compose demo's copy (compose.yml): compose service names instead of 127.0.0.1 and the demo's
{c} ports; see the script's docstring for every difference. The comments below are deploy/{src}'s.

"""


def _apply(text: str, replacements: list[tuple[str, str]], source: str) -> str:
    for old, new in replacements:
        count = text.count(old)
        if count != 1:
            raise ValueError(f"deploy/{source}: expected exactly one {old!r}, found {count}")
        text = text.replace(old, new)
    return text


def render_nginx() -> str:
    text = (DEPLOY / "nginx.conf").read_text()
    return _HEADER.format(c="#", src="nginx.conf") + _apply(text, NGINX_REPLACEMENTS, "nginx.conf")


def render_envoy() -> str:
    text = (DEPLOY / "envoy.yaml").read_text()
    return _HEADER.format(c="#", src="envoy.yaml") + _apply(text, ENVOY_REPLACEMENTS, "envoy.yaml")


def rendered() -> dict[Path, str]:
    """Target path -> the text it must hold."""
    return {COMPOSE / "nginx.conf": render_nginx(), COMPOSE / "envoy.yaml": render_envoy()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only check that the committed files are up to date")
    a = p.parse_args()
    stale = []
    for path, text in rendered().items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        if a.check:
            stale.append(path.relative_to(REPO))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
    if stale:
        print("out of date (run python3 scripts/compose_configs.py): " + ", ".join(map(str, stale)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
