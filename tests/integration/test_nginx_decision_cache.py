"""The opt-in nginx cache of decisions (deploy/nginx.conf + policy proxy_cache_seconds): a cached
allow is served again only for the same token, certificate, method, host and URI — never to
another client certificate or another route."""
import re
import time

import pytest

from conftest import (INTROSPECTION_CLIENT_ID, INTROSPECTION_CLIENT_SECRET, REPO, EdgeClient, Nginx, Sidecar,
                      http_request, policies, stack)


def enabled_nginx_conf(workdir) -> "Path":
    """deploy/nginx.conf with its commented-out decision cache switched on (cache in WORKDIR)."""
    text = (REPO / "deploy" / "nginx.conf").read_text()
    text, n1 = re.subn(r"# (proxy_cache_path) /var/cache/nginx/authz ", rf"\1 {workdir}/authz-cache ", text)
    text, n2 = re.subn(r"# (proxy_cache +authz_cache;)", r"\1", text)
    text, n3 = re.subn(r"# (proxy_cache_key +.*;)", r"\1", text)
    text, n4 = re.subn(r"# (proxy_cache_methods GET;)", r"\1", text)
    assert (n1, n2, n3, n4) == (1, 1, 1, 1), "deploy/nginx.conf's opt-in cache block changed shape"
    path = workdir / "nginx-with-cache.conf"
    path.write_text(text)
    return path


def granted(sidecar, policy: str) -> float:
    text = http_request(sidecar.base, "/metrics").body.decode()
    m = re.search(rf'authz_decisions_total{{policy="{policy}",outcome="allow",reason="granted"}} (\S+)', text)
    return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module")
def cached_edge(tmp_path_factory, certs, fake_as, echo):
    work = tmp_path_factory.mktemp("decision-cache")
    pol = policies()
    pol[0]["proxy_cache_seconds"] = 30
    sc = Sidecar(work / "sidecar", {
        "introspection": {"endpoint": fake_as.url, "client_id": INTROSPECTION_CLIENT_ID,
                          "client_secret": INTROSPECTION_CLIENT_SECRET},
        "policies": pol,
    })
    source = enabled_nginx_conf(work)
    original = stack.DEPLOY_NGINX_CONF
    stack.DEPLOY_NGINX_CONF = source
    try:
        ng = Nginx(work / "nginx", certs, sc.port, echo.port)
    finally:
        stack.DEPLOY_NGINX_CONF = original
    yield sc, EdgeClient(ng.port, certs)
    ng.stop()
    sc.stop()


def test_a_cached_allow_never_reaches_another_certificate_or_route(cached_edge, fake_as, certs, echo):
    sc, edge = cached_edge
    token = f"cache-{time.monotonic_ns()}"
    fake_as.add_token(token, {"active": True, "scope": "system-access", "sub": "svc-1", "exp": int(time.time()) + 600,
                              "cnf": {"x5t#S256": stack.thumbprint(certs / "client1.crt")}})
    first = edge.request("/token-mtls/api/items", token=token)
    assert first.status == 200
    asked = granted(sc, "token-mtls")
    for _ in range(5):
        again = edge.request("/token-mtls/api/items", token=token)
        assert again.status == 200
    assert granted(sc, "token-mtls") == asked, "repeats should be answered from nginx's cache"
    # the upstream still gets the credential headers on a cache hit
    assert echo.requests[-1]["headers"].get("x-credential-sub") == "svc-1"

    # another certificate with the same token: not from the cache — refused by the binding check
    stolen = edge.request("/token-mtls/api/items", token=token, cert="client2")
    assert stolen.status == 401
    # another route: asked again, and the admin policy refuses the scope
    assert edge.request("/admin-api/users", token=token).status == 403
    # another URI under the same policy: a new key, so the sidecar decides again
    assert edge.request("/token-mtls/api/other", token=token).status == 200
    assert granted(sc, "token-mtls") == asked + 1
    # denials are not cached: client2 is refused every time, and the sidecar is asked every time
    for _ in range(3):
        assert edge.request("/token-mtls/api/items", token=token, cert="client2").status == 401
