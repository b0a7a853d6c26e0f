"""Packaging, checked without Docker: Dockerfile, .dockerignore, compose.yml and deploy/compose/,
deploy/kubernetes/.

What it checks:
  * compose.yml parses; every bind-mounted host path and build context exists; the proxies' configs
    in deploy/compose/ are the ones scripts/compose_configs.py renders from deploy/;
  * the service names and ports in deploy/compose/nginx.conf, envoy.yaml and sidecar.yaml agree with
    compose.yml (and with the Dockerfile's EXPOSE and health-check port);
  * the Keycloak realm: the clients, the mTLS client's certificate binding and subject DN (matched
    against client1's certificate), the secrets and issuer the sidecar expects; the demo PKI;
  * the Dockerfile's stages, user, paths and health check, which is also run against a live sidecar;
  * the Kubernetes manifests: probes, ports, Secret and ConfigMap references, security context;
  * the shared cache, off in both: the compose `redis` service and seal key secret, redis.yaml, and the
    commented `cache.shared` blocks of sidecar.yaml and the ConfigMap, which name them and pass
    check-config once uncommented;
  * `authz-sidecar check-config`, `nginx -t` and `envoy --mode validate` accept the files;
  * nginx and Envoy running deploy/compose/'s configs on loopback, with the sidecar running
    deploy/compose/sidecar.yaml against the fake authorization server, allow a token bound to
    client1 and refuse it with client2.
Not checked here (no Docker engine): building the images, starting the containers, Keycloak itself.
"""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from conftest import (_LOGS, INTROSPECTION_CLIENT_ID, INTROSPECTION_CLIENT_SECRET, NGINX_BIN, REPO, SIDECAR_BIN,
                      EdgeClient, stack, stop_process, tail)
import envoy_support
from envoy_support import claims, curl, new_token

try:
    import yaml
except ImportError:  # a venv without PyYAML: Debian's python3-yaml is pure-Python compatible
    sys.path.append("/usr/lib/python3/dist-packages")
    try:
        import yaml
    except ImportError:
        yaml = None

sys.path.insert(0, str(REPO / "scripts"))
import compose_configs  # noqa: E402  (scripts/compose_configs.py)

envoy_bin = envoy_support.envoy_bin   # session fixture (finds or installs Envoy)

COMPOSE_FILE = REPO / "compose.yml"
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE_CERTS = COMPOSE_DIR / "certs"
SIDECAR_YAML = COMPOSE_DIR / "sidecar.yaml"
COMPOSE_NGINX = COMPOSE_DIR / "nginx.conf"
COMPOSE_ENVOY = COMPOSE_DIR / "envoy.yaml"
REALM_JSON = COMPOSE_DIR / "keycloak" / "demo-realm.json"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
NGINX_DOCKERFILE = REPO / "deploy" / "nginx.Dockerfile"
K8S = REPO / "deploy" / "kubernetes"
SERVICES = {"keycloak", "authz-sidecar", "nginx", "envoy", "echo", "redis"}
SEAL_KEY = COMPOSE_DIR / "seal-key"


# ---------------------------------------------------------------------------------------------
# Helpers
def load_yaml(path: Path):
    if yaml is None:
        pytest.skip("PyYAML is not importable (apt-get install python3-yaml, or pip install pyyaml)")
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list:
    if yaml is None:
        pytest.skip("PyYAML is not importable (apt-get install python3-yaml, or pip install pyyaml)")
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def published(service: dict) -> dict[int, int]:
    """Container port -> host port of a compose service's short-syntax `ports`."""
    out = {}
    for spec in service.get("ports") or []:
        parts = str(spec).split(":")
        out[int(parts[-1].split("/")[0])] = int(parts[-2])
    return out


def mounts(service: dict) -> dict[str, Path]:
    """Container path -> host path of a compose service's short-syntax bind mounts."""
    out = {}
    for spec in service.get("volumes") or []:
        host, container = str(spec).split(":")[:2]
        out[container] = (COMPOSE_FILE.parent / host).resolve()
    return out


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        s = line.strip()
        if s.startswith("#") or (not buf and not s):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        instr, _, rest = buf.partition(" ")
        out.append((instr.upper(), rest.strip()))
        buf = ""
    return out


def dockerfile_env(instrs) -> dict[str, str]:
    env = {}
    for instr, rest in instrs:
        if instr == "ENV":
            for m in re.finditer(r"(\w+)=(\S+)", rest):
                env[m.group(1)] = m.group(2)
    return env


def healthcheck_cmd(instrs) -> list[str]:
    [rest] = [r for i, r in instrs if i == "HEALTHCHECK"]
    _, _, cmd = rest.partition(" CMD ")
    return json.loads(cmd)


def cert_subject(name: str) -> str:
    out = subprocess.run(["openssl", "x509", "-in", str(COMPOSE_CERTS / f"{name}.crt"), "-noout", "-subject",
                          "-nameopt", "RFC2253"], capture_output=True, text=True, check=True)
    return out.stdout.strip().removeprefix("subject=").strip()


def uncomment_shared(text: str) -> str:
    """The configuration with its commented `# shared:` block (under `cache:`) uncommented."""
    lines, out, indent = text.splitlines(), [], None
    for line in lines:
        stripped = line.lstrip(" ")
        pad = len(line) - len(stripped)
        if indent is None and stripped == "# shared:":
            indent = pad
            out.append(" " * pad + "shared:")
            continue
        if indent is not None and pad == indent and stripped.startswith("#   "):
            out.append(" " * pad + stripped[2:])
            continue
        if indent is not None:
            indent = -1   # the block ended
        out.append(line)
    assert indent is not None, "no commented `# shared:` block"
    return "\n".join(out) + "\n"


def check_config(path: Path, secret: str = "test-secret") -> subprocess.CompletedProcess:
    env = {**os.environ, "AUTHZ_INTROSPECTION_CLIENT_SECRET": secret}
    return subprocess.run([SIDECAR_BIN, "check-config", "--config", str(path)], capture_output=True, text=True,
                          env=env, timeout=60, cwd=REPO)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def sidecar_yaml() -> dict:
    return load_yaml(SIDECAR_YAML)


@pytest.fixture(scope="module")
def realm() -> dict:
    return json.loads(REALM_JSON.read_text())


@pytest.fixture(scope="module")
def k8s() -> dict:
    """The manifests by kind (redis.yaml apart); k8s["Secret"] maps each Secret's name to it."""
    docs: dict = {"Secret": {}}
    for f in ("deployment.yaml", "configmap.yaml", "secret.example.yaml", "service.yaml"):
        for d in load_yaml_all(K8S / f):
            if d["kind"] == "Secret":
                docs["Secret"][d["metadata"]["name"]] = d
            else:
                docs[d["kind"]] = d
    return docs


@pytest.fixture(scope="module")
def k8s_config(k8s) -> dict:
    return yaml.safe_load(k8s["ConfigMap"]["data"]["config.yaml"])


# ---------------------------------------------------------------------------------------------
# compose.yml
def test_compose_parses_with_the_demo_services(services):
    assert set(services) == SERVICES
    assert services["authz-sidecar"]["build"]["dockerfile"] == "Dockerfile"
    assert services["keycloak"]["image"].startswith("quay.io/keycloak/keycloak:")
    assert re.fullmatch(r"envoyproxy/envoy:v1\.\d+-latest", services["envoy"]["image"])
    # Host ports: nginx 8443, Envoy 10443, Keycloak 8080 (+ its HTTPS on 8444, 8443 being nginx's).
    assert published(services["nginx"]) == {compose_configs.NGINX_PORT: 8443}
    assert published(services["envoy"]) == {compose_configs.ENVOY_PORT: 10443}
    assert published(services["keycloak"]) == {8080: 8080, 8443: 8444}
    host_ports = [p for s in services.values() for p in published(s).values()]
    assert len(host_ports) == len(set(host_ports)), f"a host port is published twice: {host_ports}"
    for name, svc in services.items():
        for spec in svc.get("ports") or []:
            assert str(spec).startswith("127.0.0.1:"), f"{name}: {spec} is published beyond the host's loopback"


def test_compose_bind_mounts_and_build_contexts_exist(services):
    for name, svc in services.items():
        for container, host in mounts(svc).items():
            assert host.exists(), f"{name}: bind mount {host} (-> {container}) does not exist"
            assert REPO in host.parents, f"{name}: {host} is outside the repository"
        build = svc.get("build")
        if build:
            context = (COMPOSE_FILE.parent / build["context"]).resolve()
            assert context.is_dir(), f"{name}: build context {context}"
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), f"{name}: Dockerfile in {context}"


def test_compose_proxy_configs_are_rendered_from_deploy():
    for path, text in compose_configs.rendered().items():
        assert path.read_text() == text, (f"{path.relative_to(REPO)} is out of date with deploy/: run "
                                          "python3 scripts/compose_configs.py")


def test_compose_nginx_names_and_ports_agree(services, sidecar_yaml):
    text = COMPOSE_NGINX.read_text()
    upstreams = dict(re.findall(r"^\s*upstream\s+(\w+)\s*\{\s*\n\s*server\s+([\w.-]+:\d+);", text, re.M))
    assert set(upstreams) == {"authz_sidecar", "api_upstream"}
    sidecar_host, sidecar_port = host_port(upstreams["authz_sidecar"])
    api_host, api_port = host_port(upstreams["api_upstream"])
    assert sidecar_host == "authz-sidecar" and sidecar_host in services
    assert sidecar_port == host_port(sidecar_yaml["server"]["listen"])[1]
    assert api_host == "echo" and api_host in services
    echo_cmd = services["echo"]["command"]
    assert echo_cmd[echo_cmd.index("--port") + 1] == str(api_port)
    assert echo_cmd[echo_cmd.index("--host") + 1] == "0.0.0.0"
    [listen] = re.findall(r"^\s*listen\s+(\d+)\s+ssl;", text, re.M)
    assert int(listen) in published(services["nginx"])
    # Everything nginx reads is mounted where it looks.
    nginx_mounts = mounts(services["nginx"])
    for path in re.findall(r"^\s*ssl_(?:certificate|certificate_key|client_certificate)\s+(\S+);", text, re.M):
        assert path in nginx_mounts, f"nginx reads {path}, which compose.yml does not mount"
    cmd = json.loads(next(r for i, r in dockerfile(NGINX_DOCKERFILE) if i == "CMD"))
    conf_path = cmd[cmd.index("-c") + 1]
    assert nginx_mounts[conf_path] == COMPOSE_NGINX
    assert text.count("load_module /usr/lib/nginx/modules/ngx_http_headers_more_filter_module.so;") == 1
    # The certificate reaches the sidecar in the header its policies read.
    assert "proxy_set_header X-Forwarded-Client-Cert 'Cert=\"$ssl_client_escaped_cert\"';" in text


def test_compose_envoy_names_and_ports_agree(services, sidecar_yaml):
    conf = load_yaml(COMPOSE_ENVOY)
    res = conf["static_resources"]
    endpoints = {}
    for cluster in res["clusters"]:
        [lb] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        sock = lb["endpoint"]["address"]["socket_address"]
        endpoints[cluster["name"]] = (sock["address"], sock["port_value"])
        assert cluster["type"] in ("STRICT_DNS", "LOGICAL_DNS"), "compose service names need a DNS cluster"
    assert endpoints["authz_sidecar"] == ("authz-sidecar", host_port(sidecar_yaml["server"]["listen"])[1])
    echo_cmd = services["echo"]["command"]
    assert endpoints["api_upstream"] == ("echo", int(echo_cmd[echo_cmd.index("--port") + 1]))
    for host, _ in endpoints.values():
        assert host in services
    [listener] = res["listeners"]
    assert listener["address"]["socket_address"]["port_value"] in published(services["envoy"])
    assert conf["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    ext_authz = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_authz")["typed_config"]
    uri = urllib.parse.urlsplit(ext_authz["http_service"]["server_uri"]["uri"])
    assert (uri.hostname, uri.port) == endpoints["authz_sidecar"]
    assert ext_authz["http_service"]["server_uri"]["cluster"] == "authz_sidecar"
    allowed = [p["exact"].lower() for p in ext_authz["allowed_headers"]["patterns"] if "exact" in p]
    assert "x-forwarded-client-cert" in allowed
    # Every file Envoy reads is mounted, and so is the config it is started with.
    envoy_mounts = mounts(services["envoy"])
    files = re.findall(r"filename:\s*(\S+?)\s*[},]", COMPOSE_ENVOY.read_text())
    assert len(files) == 3
    for f in files:
        assert f in envoy_mounts, f"envoy reads {f}, which compose.yml does not mount"
    cmd = services["envoy"]["command"]
    assert envoy_mounts[cmd[cmd.index("-c") + 1]] == COMPOSE_ENVOY


def test_compose_sidecar_config_agrees_with_compose_and_realm(services, sidecar_yaml, realm):
    svc = services["authz-sidecar"]
    assert mounts(svc)["/etc/authz-sidecar/config.yaml"] == SIDECAR_YAML
    instrs = dockerfile(DOCKERFILE)
    assert dockerfile_env(instrs)["AUTHZ_CONFIG"] == "/etc/authz-sidecar/config.yaml"
    server = sidecar_yaml["server"]
    listen_host, listen_port = host_port(server["listen"])
    admin_host, admin_port = host_port(server["admin_listen"])
    assert listen_host == admin_host == "0.0.0.0", "in its own container the sidecar must listen beyond loopback"
    exposed = {int(p) for i, r in instrs if i == "EXPOSE" for p in r.split()}
    assert {listen_port, admin_port} <= exposed
    assert int(dockerfile_env(instrs)["AUTHZ_HEALTH_PORT"]) == admin_port, "the image's HEALTHCHECK port"
    assert admin_port in published(svc)
    # The authorization server: keycloak's plain-http port inside the compose network.
    intro = sidecar_yaml["introspection"]
    url = urllib.parse.urlsplit(intro["endpoint"])
    assert url.hostname == "keycloak" and url.hostname in services
    assert url.port in published(services["keycloak"])
    assert url.scheme == "http" and intro["insecure"] is True, "plain http to keycloak needs insecure: true"
    assert url.path == f"/realms/{realm['realm']}/protocol/openid-connect/token/introspect"
    assert intro.get("client_secret") is None and intro.get("client_secret_file") is None, "the secret comes from the environment"
    clients = {c["clientId"]: c for c in realm["clients"]}
    assert clients[intro["client_id"]]["secret"] == env_of(svc)["AUTHZ_INTROSPECTION_CLIENT_SECRET"]
    # The issuer Keycloak writes into tokens: KC_HOSTNAME, fixed, + /realms/<realm>.
    kc_env = env_of(services["keycloak"])
    assert intro["expected_issuer"] == kc_env["KC_HOSTNAME"].rstrip("/") + f"/realms/{realm['realm']}"
    # Both proxies send the certificate as x-forwarded-client-cert; the policies read exactly that.
    for policy in sidecar_yaml["policies"]:
        assert policy["certificate_header"].lower() == "x-forwarded-client-cert", policy["name"]
        assert policy["certificate_format"] == "xfcc", policy["name"]
    token_mtls = next(p for p in sidecar_yaml["policies"] if p["name"] == "token-mtls")
    scopes = {s["name"] for s in realm["clientScopes"]}
    assert set(token_mtls["required_scopes"]) <= scopes


def test_compose_sidecar_config_passes_check_config():
    out = check_config(SIDECAR_YAML, secret="introspection-secret")
    assert out.returncode == 0, out.stderr
    assert "introspection-secret" not in out.stdout + out.stderr
    assert "<redacted>" in out.stdout


def test_compose_sidecar_config_needs_insecure_for_plain_http(tmp_path):
    text = SIDECAR_YAML.read_text()
    assert text.count("\n  insecure: true\n") == 1
    bad = tmp_path / "sidecar.yaml"
    bad.write_text(text.replace("\n  insecure: true\n", "\n"))
    out = check_config(bad)
    assert out.returncode == 1 and "insecure" in out.stderr, out


# ---------------------------------------------------------------------------------------------
# Keycloak and the demo PKI
def test_keycloak_service(services):
    kc = services["keycloak"]
    assert kc["command"][0] == "start-dev" and "--import-realm" in kc["command"]
    kc_mounts = mounts(kc)
    assert kc_mounts["/opt/keycloak/data/import/demo-realm.json"] == REALM_JSON
    env = env_of(kc)
    assert env["KC_HTTPS_CLIENT_AUTH"] == "request"
    for key, name in [("KC_HTTPS_CERTIFICATE_FILE", "server.crt"), ("KC_HTTPS_CERTIFICATE_KEY_FILE", "server.key"),
                      ("KC_TRUSTSTORE_PATHS", "ca.crt")]:
        assert kc_mounts[env[key]] == COMPOSE_CERTS / name, key
    # KC_HOSTNAME is where clients get their tokens: the host port published for Keycloak's HTTPS.
    hostname = urllib.parse.urlsplit(env["KC_HOSTNAME"])
    assert hostname.scheme == "https" and hostname.port == published(kc)[8443]
    assert env["KC_HOSTNAME_BACKCHANNEL_DYNAMIC"] == "true"
    san = subprocess.run(["openssl", "x509", "-in", str(COMPOSE_CERTS / "server.crt"), "-noout", "-ext",
                          "subjectAltName"], capture_output=True, text=True, check=True).stdout
    assert f"DNS:{hostname.hostname}" in san


def test_realm_json(realm):
    assert realm["realm"] == "demo" and realm["enabled"] is True
    scopes = {s["name"]: s for s in realm["clientScopes"]}
    assert scopes["system-access"]["protocol"] == "openid-connect"
    assert scopes["system-access"]["attributes"]["include.in.token.scope"] == "true"
    # Listing clientScopes suppresses Keycloak's built-ins: the sub claim needs 'basic' declared.
    assert any(m["protocolMapper"] == "oidc-sub-mapper" for m in scopes["basic"]["protocolMappers"])
    clients = {c["clientId"]: c for c in realm["clients"]}
    assert set(clients) == {"system-client-mtls", "introspection-client"}
    mtls = clients["system-client-mtls"]
    assert mtls["publicClient"] is False and mtls["serviceAccountsEnabled"] is True
    assert mtls["clientAuthenticatorType"] == "client-x509"
    assert mtls["attributes"]["tls.client.certificate.bound.access.tokens"] == "true"
    assert "system-access" in mtls["defaultClientScopes"]
    for scope in mtls["defaultClientScopes"] + mtls["optionalClientScopes"]:
        assert scope in scopes, f"system-client-mtls names the undeclared scope {scope}"
    intro = clients["introspection-client"]
    assert intro["publicClient"] is False and intro["clientAuthenticatorType"] == "client-secret"
    assert intro["secret"] == "introspection-secret"


def test_realm_subject_dn_matches_client1_only(realm):
    mtls = next(c for c in realm["clients"] if c["clientId"] == "system-client-mtls")
    assert mtls["attributes"]["x509.allow.regex.pattern.comparison"] == "true"
    pattern = re.compile(mtls["attributes"]["x509.subjectdn"])
    client1 = cert_subject("client1")
    assert client1 == "CN=client1,O=Example Org"
    # Keycloak matches the whole string (Matcher.matches) against X509Certificate.getSubjectDN().getName(),
    # which separates the RDNs with ", "; RFC 2253 form too, for good measure.
    for form in (client1, client1.replace(",", ", ")):
        assert pattern.fullmatch(form), f"{pattern.pattern!r} does not match {form!r}"
    for other in ("client2", "rogue"):
        subject = cert_subject(other)
        for form in (subject, subject.replace(",", ", ")):
            assert not pattern.fullmatch(form), f"{pattern.pattern!r} also matches {form!r}"


def test_demo_pki_verifies_and_is_not_about_to_expire():
    for name in ("server", "client1", "client2"):
        out = subprocess.run(["openssl", "verify", "-CAfile", str(COMPOSE_CERTS / "ca.crt"),
                              str(COMPOSE_CERTS / f"{name}.crt")], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    out = subprocess.run(["openssl", "verify", "-CAfile", str(COMPOSE_CERTS / "ca.crt"),
                          str(COMPOSE_CERTS / "rogue.crt")], capture_output=True, text=True)
    assert out.returncode != 0
    for crt in sorted(COMPOSE_CERTS.glob("*.crt")):
        out = subprocess.run(["openssl", "x509", "-in", str(crt), "-noout", "-checkend", str(30 * 86400)],
                             capture_output=True, text=True)
        assert out.returncode == 0, f"{crt.name} expires within 30 days: regenerate (deploy/compose/certs/README.md)"
    for key in sorted(COMPOSE_CERTS.glob("*.key")):
        assert key.stat().st_mode & 0o044 == 0o044, f"{key.name}: the containers' non-root users must read it (chmod 644)"


# ---------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore
def test_dockerfile():
    instrs = dockerfile(DOCKERFILE)
    args = dict(re.match(r"(\w+)=(\S+)", r).groups() for i, r in instrs if i == "ARG" and "=" in r)
    froms = [r for i, r in instrs if i == "FROM"]
    assert froms == ["${SWIFT_IMAGE} AS build", "${RUNTIME_IMAGE}"]
    assert re.fullmatch(r"swift:6\.\d+(\.\d+)?-bookworm", args["SWIFT_IMAGE"])
    assert args["RUNTIME_IMAGE"] == "debian:bookworm-slim"
    runs = " ".join(r for i, r in instrs if i == "RUN")
    assert "swift build -c release --product authz-sidecar --static-swift-stdlib" in runs
    assert re.search(r'\.executable\(name: "authz-sidecar"', (REPO / "Package.swift").read_text())
    assert re.search(r"useradd .*--uid 10001 .*authz", runs)
    assert "ca-certificates" in runs and "curl" not in re.findall(r"\S+", runs)
    assert [r for i, r in instrs if i == "USER"] == ["10001:10001"]
    assert any(i == "COPY" and r.endswith("/usr/local/bin/authz-sidecar") for i, r in instrs)
    env = dockerfile_env(instrs)
    assert env["AUTHZ_CONFIG"] == "/etc/authz-sidecar/config.yaml"
    exposed = {int(p) for i, r in instrs if i == "EXPOSE" for p in r.split()}
    assert exposed == {9191, 9192, 9090}
    assert int(env["AUTHZ_HEALTH_PORT"]) in exposed
    cmd = healthcheck_cmd(instrs)
    assert cmd[0] == "bash" and "/healthz" in cmd[-1] and "${AUTHZ_HEALTH_PORT" in cmd[-1]
    assert [json.loads(r) for i, r in instrs if i == "ENTRYPOINT"] == [["authz-sidecar"]]
    assert [json.loads(r) for i, r in instrs if i == "CMD"] == [["serve"]]


def test_dockerignore_lets_in_only_what_the_build_copies():
    lines = [s.strip() for s in DOCKERIGNORE.read_text().splitlines() if s.strip() and not s.startswith("#")]
    assert lines[0] == "*", "allowlist: everything is ignored first"
    let_in = {s[1:].rstrip("/") for s in lines if s.startswith("!")}
    assert let_in == {"Package.swift", "Package.resolved", "Sources", "Tests"}
    for pattern in ("**/.build", "**/.venv*", "**/demo-work", "**/tmp"):
        assert pattern in lines
    copied = set()
    for instr, rest in dockerfile(DOCKERFILE):
        if instr == "COPY" and not rest.startswith("--from"):
            # "Package.resolve[d]": a glob that lets the build go on without the (gitignored) file
            copied.update(s.replace("[d]", "d").removeprefix("./").rstrip("/") for s in rest.split()[:-1])
    assert copied == let_in, "the build context holds exactly what the Dockerfile copies"


@pytest.fixture(scope="module")
def loopback_sidecar(tmp_path_factory, fake_as):
    """The sidecar running deploy/compose/sidecar.yaml on loopback ports, against the fake AS."""
    work = tmp_path_factory.mktemp("packaging-sidecar")
    config = load_yaml(SIDECAR_YAML)
    listen, admin = stack.free_port(), stack.free_port()
    config["server"]["listen"] = f"127.0.0.1:{listen}"
    config["server"]["admin_listen"] = f"127.0.0.1:{admin}"
    assert config["introspection"]["client_id"] == INTROSPECTION_CLIENT_ID
    config["introspection"]["endpoint"] = fake_as.url
    path = work / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    log = work / "sidecar.log"
    env = {**os.environ, "AUTHZ_INTROSPECTION_CLIENT_SECRET": INTROSPECTION_CLIENT_SECRET}
    with open(log, "wb") as out:
        proc = subprocess.Popen([SIDECAR_BIN, "serve", "--config", str(path)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
    _LOGS.append(("compose sidecar", log))
    try:
        stack.wait_http(f"http://127.0.0.1:{admin}/healthz", timeout=20, proc=proc)
    except (TimeoutError, RuntimeError) as e:
        stop_process(proc)
        pytest.fail(f"the sidecar did not start on {path}: {e}\n{tail(log)}", pytrace=False)
    yield {"listen": listen, "admin": admin, "issuer": config["introspection"]["expected_issuer"]}
    stop_process(proc)


def test_dockerfile_healthcheck_command_works(loopback_sidecar):
    cmd = healthcheck_cmd(dockerfile(DOCKERFILE))

    def run(port: int) -> int:
        env = {**os.environ, "AUTHZ_HEALTH_PORT": str(port)}
        return subprocess.run(cmd, env=env, capture_output=True, timeout=10).returncode

    assert run(loopback_sidecar["admin"]) == 0
    assert run(loopback_sidecar["listen"]) != 0, "/healthz is on the admin listener only: 404 must be unhealthy"
    assert run(stack.free_port()) != 0, "nothing listening must be unhealthy"


# ---------------------------------------------------------------------------------------------
# Kubernetes
def _port(container: dict, ref) -> int:
    if isinstance(ref, int):
        return ref
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == ref)


def test_kubernetes_manifests(k8s, k8s_config):
    assert set(k8s) == {"Deployment", "ConfigMap", "Secret", "Service"}
    dep = k8s["Deployment"]
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    assert set(containers) == {"nginx", "authz-sidecar"}
    sc = containers["authz-sidecar"]
    admin_host, admin_port = host_port(k8s_config["server"]["admin_listen"])
    assert admin_host == "0.0.0.0", "the kubelet probes the pod IP"
    assert host_port(k8s_config["server"]["listen"]) == ("127.0.0.1", 9191)
    # deploy/nginx.conf, as is, talks to that listener.
    assert "server 127.0.0.1:9191;" in (REPO / "deploy" / "nginx.conf").read_text()
    assert _port(sc, sc["livenessProbe"]["httpGet"]["port"]) == admin_port
    assert sc["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert _port(sc, sc["readinessProbe"]["httpGet"]["port"]) == admin_port
    assert sc["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert admin_port in [p["containerPort"] for p in sc["ports"]]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(admin_port)
    # Secret -> AUTHZ_INTROSPECTION_CLIENT_SECRET; the ConfigMap -> /etc/authz-sidecar/config.yaml.
    env = {e["name"]: e for e in sc["env"]}
    ref = env["AUTHZ_INTROSPECTION_CLIENT_SECRET"]["valueFrom"]["secretKeyRef"]
    secret = k8s["Secret"][ref["name"]]
    assert ref["key"] in secret["stringData"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    # server.admin_token_file: a key of a Secret mounted (read-only) in that file's directory,
    # readable by the sidecar's group only (fsGroup + mode 0440)
    token_file = Path(k8s_config["server"]["admin_token_file"])
    [admin_mount] = [m for m in sc["volumeMounts"] if m["mountPath"] == str(token_file.parent)]
    admin_volume = volumes[admin_mount["name"]]["secret"]
    assert admin_mount["readOnly"] is True
    assert token_file.name in k8s["Secret"][admin_volume["secretName"]]["stringData"]
    assert admin_volume["defaultMode"] == 0o440 and pod["spec"]["securityContext"]["fsGroup"] == 10001
    # The shared cache's seal key and store password: optional references, so that the pods start
    # without that Secret while cache.shared is off.
    [seal_mount] = [m for m in sc["volumeMounts"] if m["mountPath"] == "/etc/authz-sidecar/secrets"]
    seal_volume = volumes[seal_mount["name"]]["secret"]
    assert seal_mount["readOnly"] is True and seal_volume["optional"] is True and seal_volume["defaultMode"] == 0o440
    assert seal_volume["items"] == [{"key": "seal-key", "path": "seal-key"}]
    password = env["AUTHZ_CACHE_SHARED_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert password["name"] == seal_volume["secretName"] and password["optional"] is True
    assert {"seal-key", password["key"]} <= set(k8s["Secret"][seal_volume["secretName"]]["stringData"])
    assert "shared" not in k8s_config["cache"], "the shared cache is off by default"
    assert set(k8s["Secret"]) == {ref["name"], admin_volume["secretName"], seal_volume["secretName"]}
    [mount] = [m for m in sc["volumeMounts"] if volumes[m["name"]].get("configMap", {}).get("name")
               == k8s["ConfigMap"]["metadata"]["name"]]
    config_path = env["AUTHZ_CONFIG"]["value"]
    assert mount["mountPath"] == "/etc/authz-sidecar" == str(Path(config_path).parent)
    assert Path(config_path).name in k8s["ConfigMap"]["data"]
    assert config_path == dockerfile_env(dockerfile(DOCKERFILE))["AUTHZ_CONFIG"]
    # Resources and security context.
    assert sc["resources"] == {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}
    sec = sc["securityContext"]
    assert sec["runAsNonRoot"] is True and sec["readOnlyRootFilesystem"] is True
    assert sec["allowPrivilegeEscalation"] is False and sec["capabilities"]["drop"] == ["ALL"]
    assert sec["runAsUser"] == 10001 and f"{sec['runAsUser']}:{sec['runAsGroup']}" in \
        [r for i, r in dockerfile(DOCKERFILE) if i == "USER"]
    # The Service reaches nginx.
    svc = k8s["Service"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    for port in svc["spec"]["ports"]:
        assert _port(containers["nginx"], port["targetPort"]) == 443
    assert re.search(r"^\s*listen 443 ssl;", (REPO / "deploy" / "nginx.conf").read_text(), re.M)
    # deploy/nginx.conf sends X-Client-Cert: the ConfigMap's policies read it.
    for policy in k8s_config["policies"]:
        assert policy["certificate_header"] == "X-Client-Cert", policy["name"]


def test_kubernetes_configmap_passes_check_config(k8s, tmp_path):
    path = tmp_path / "config.yaml"
    text = k8s["ConfigMap"]["data"]["config.yaml"]
    # the admin token file is a mounted Secret in the pod: stand one in for it here
    token_file = tmp_path / "admin-token"
    token_file.write_text("test-admin-token\n")
    deployed = "admin_token_file: /etc/authz-sidecar-admin/token"
    assert text.count(deployed) == 1, "server.admin_token_file is not the mounted Secret's file"
    path.write_text(text.replace(deployed, f"admin_token_file: {token_file}"))
    out = check_config(path)
    assert out.returncode == 0, out.stderr
    assert "test-admin-token" not in out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------
# The proxies' compose configs, run on loopback
_NGINX_BACK_TO_DEPLOY = [   # compose string -> the deploy string stack.render_nginx_conf() replaces
    (f"listen {compose_configs.NGINX_PORT} ssl;", "listen 443 ssl;"),
    ("server authz-sidecar:9191;", "server 127.0.0.1:9191;"),
    ("server echo:9292;", "server 127.0.0.1:9292;"),
    ("error_log stderr warn;", "error_log /var/log/nginx/authz-edge-error.log warn;"),
    ("access_log /dev/stdout;", "access_log /var/log/nginx/authz-edge-access.log;"),
]


def render_compose_nginx(work: Path, ports: dict) -> Path:
    text = COMPOSE_NGINX.read_text()
    for old, new in _NGINX_BACK_TO_DEPLOY:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    src = work / "compose-nginx.src.conf"
    src.write_text(text)
    return stack.render_nginx_conf(work, ports, COMPOSE_CERTS, source=src)


def render_compose_envoy(work: Path, ports: dict) -> Path:
    text = COMPOSE_ENVOY.read_text()
    replacements = [(f"/etc/authz-sidecar/certs/{n}", str(COMPOSE_CERTS / n)) for n in ("server.crt", "server.key", "ca.crt")]
    replacements += [
        (f"{{ address: 0.0.0.0, port_value: {compose_configs.ENVOY_PORT} }}", f"{{ address: 127.0.0.1, port_value: {ports['listen']} }}"),
        ("{ address: 127.0.0.1, port_value: 9901 }", f"{{ address: 127.0.0.1, port_value: {ports['admin']} }}"),
        ("{ address: authz-sidecar, port_value: 9191 }", f"{{ address: 127.0.0.1, port_value: {ports['sidecar']} }}"),
        ('"http://authz-sidecar:9191"', f'"http://127.0.0.1:{ports["sidecar"]}"'),
        ("{ address: echo, port_value: 9292 }", f"{{ address: 127.0.0.1, port_value: {ports['upstream']} }}"),
    ]
    for old, new in replacements:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    out = work / "compose-envoy.yaml"
    out.write_text(text)
    return out


def test_compose_nginx_conf_passes_nginx_t(tmp_path):
    conf = render_compose_nginx(tmp_path, {"nginx": stack.free_port(), "sidecar": 9191, "upstream": 9292})
    out = subprocess.run([NGINX_BIN, "-t", "-e", str(tmp_path / "logs" / "error.log"), "-c", str(conf)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


def test_compose_envoy_yaml_passes_envoy_validate(envoy_bin, tmp_path):
    # The compose service names stay: validation does not resolve them.
    text = COMPOSE_ENVOY.read_text()
    for n in ("server.crt", "server.key", "ca.crt"):
        text = text.replace(f"/etc/authz-sidecar/certs/{n}", str(COMPOSE_CERTS / n))
    conf = tmp_path / "envoy.yaml"
    conf.write_text(text)
    out = envoy_support.validate(envoy_bin, conf)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.fixture(scope="module")
def compose_nginx(tmp_path_factory, loopback_sidecar, echo):
    work = tmp_path_factory.mktemp("packaging-nginx")
    port = stack.free_port()
    conf = render_compose_nginx(work, {"nginx": port, "sidecar": loopback_sidecar["listen"], "upstream": echo.port})
    error_log = work / "logs" / "error.log"
    check = subprocess.run([NGINX_BIN, "-t", "-e", str(error_log), "-c", str(conf)], capture_output=True, text=True,
                           timeout=30)
    if check.returncode != 0:
        pytest.fail(f"nginx -t rejected {conf}:\n{check.stderr}", pytrace=False)
    with open(work / "logs" / "nginx.stdout", "wb") as out:
        proc = subprocess.Popen([NGINX_BIN, "-e", str(error_log), "-c", str(conf)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    _LOGS.append(("compose nginx error.log", error_log))
    try:
        stack.wait_port("127.0.0.1", port, timeout=15, proc=proc)
    except (TimeoutError, RuntimeError) as e:
        stop_process(proc)
        pytest.fail(f"nginx did not start: {e}\n{tail(error_log)}", pytrace=False)
    yield port
    stop_process(proc)


@pytest.fixture(scope="module")
def compose_envoy(tmp_path_factory, envoy_bin, loopback_sidecar, echo):
    work = tmp_path_factory.mktemp("packaging-envoy")
    ports = {"listen": stack.free_port(), "admin": stack.free_port(), "sidecar": loopback_sidecar["listen"],
             "upstream": echo.port}
    conf = render_compose_envoy(work, ports)
    log = work / "envoy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([envoy_bin, "-c", str(conf), "--disable-hot-restart", "--concurrency", "1",
                                 "--log-level", "warn", "--drain-time-s", "0"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    _LOGS.append(("compose envoy", log))
    try:
        stack.wait_http(f"http://127.0.0.1:{ports['admin']}/ready", timeout=30, proc=proc)
        stack.wait_port("127.0.0.1", ports["listen"], timeout=30, proc=proc)
    except (TimeoutError, RuntimeError) as e:
        stop_process(proc)
        pytest.fail(f"envoy did not start: {e}\n{tail(log)}", pytrace=False)
    yield ports["listen"]
    stop_process(proc)


def _bound_token(fake_as, issuer: str, **extra) -> str:
    return fake_as.add_token(new_token(), claims(COMPOSE_CERTS, iss=issuer, **extra))


def test_compose_nginx_with_the_compose_sidecar(compose_nginx, loopback_sidecar, fake_as, echo):
    edge = EdgeClient(compose_nginx, COMPOSE_CERTS)
    token = _bound_token(fake_as, loopback_sidecar["issuer"])
    r = edge.request("/token-mtls/hello", token=token, cert="client1")
    assert r.status == 200, r
    seen = echo.requests[-1]["headers"]
    assert seen["x-credential-client-id"] == "system-client-mtls"
    assert "x-forwarded-client-cert" not in seen and "x-client-cert" not in seen
    assert edge.request("/token-mtls/hello", token=token, cert="client2").status == 401   # bound to client1
    assert edge.request("/admin-api/x", token=token, cert="client1").status == 403        # no admin scope
    unbound = fake_as.add_token(new_token(), claims(COMPOSE_CERTS, iss=loopback_sidecar["issuer"], bound_to=None))
    assert edge.request("/token-mtls/hello", token=unbound, cert="client1").status == 401  # require_bound_token
    other_issuer = _bound_token(fake_as, "https://elsewhere.example/realms/demo")
    assert edge.request("/token-mtls/hello", token=other_issuer, cert="client1").status == 401  # expected_issuer


def test_compose_envoy_with_the_compose_sidecar(compose_envoy, loopback_sidecar, fake_as, echo):
    token = _bound_token(fake_as, loopback_sidecar["issuer"])
    status, _, body = curl(compose_envoy, COMPOSE_CERTS, "/token-mtls/hello", token=token, cert="client1")
    assert status == 200, body
    assert json.loads(body)["headers"]["x-credential-client-id"] == "system-client-mtls"
    assert curl(compose_envoy, COMPOSE_CERTS, "/token-mtls/hello", token=token, cert="client2")[0] == 401
    assert curl(compose_envoy, COMPOSE_CERTS, "/admin-api/x", token=token, cert="client1")[0] == 403



# ---------------------------------------------------------------------------------------------
# The shared cache (off by default in both deployments)
def test_compose_shared_cache_store_and_seal_key(services, compose, sidecar_yaml):
    redis = services["redis"]
    assert re.fullmatch(r"(redis|valkey/valkey):[\w.-]+", redis["image"])
    assert redis["profiles"] == ["shared-cache"], "the store starts only with --profile shared-cache"
    assert not redis.get("ports"), "the store is for the sidecars only, on the compose network"
    cmd = redis["command"]
    assert cmd[cmd.index("--save") + 1] == "" and cmd[cmd.index("--appendonly") + 1] == "no"
    assert cmd[cmd.index("--maxmemory-policy") + 1].startswith("volatile-"), "the epoch key has no expiry"
    assert "redis" not in (services["authz-sidecar"].get("depends_on") or {}), "the sidecar starts without its store"
    assert services["authz-sidecar"]["secrets"] == ["seal-key"]
    key_file = (COMPOSE_FILE.parent / compose["secrets"]["seal-key"]["file"]).resolve()
    assert key_file == SEAL_KEY
    assert len(base64.b64decode(SEAL_KEY.read_text().strip(), validate=True)) == 32
    assert "shared" not in sidecar_yaml["cache"], "the shared cache is off in the demo as shipped"
    shared = yaml.safe_load(uncomment_shared(SIDECAR_YAML.read_text()))["cache"]["shared"]
    url = urllib.parse.urlsplit(shared["url"])
    assert (url.scheme, url.hostname, url.port) == ("redis", "redis", 6379)
    assert shared["seal_key_file"] == "/run/secrets/seal-key"


def test_compose_shared_cache_block_passes_check_config(tmp_path):
    path = tmp_path / "sidecar.yaml"
    path.write_text(uncomment_shared(SIDECAR_YAML.read_text()).replace("/run/secrets/seal-key", str(SEAL_KEY)))
    out = check_config(path, secret="introspection-secret")
    assert out.returncode == 0, out.stderr
    assert "shared" in out.stdout and SEAL_KEY.read_text().strip() not in out.stdout + out.stderr


def test_kubernetes_redis_example(k8s, k8s_config, tmp_path):
    docs = {d["kind"]: d for d in load_yaml_all(K8S / "redis.yaml")}
    assert set(docs) == {"Deployment", "Service", "NetworkPolicy"}
    dep, svc, policy = docs["Deployment"], docs["Service"], docs["NetworkPolicy"]
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    [c] = pod["spec"]["containers"]
    assert re.fullmatch(r"(redis|valkey/valkey):[\w.-]+", c["image"])
    args = c["args"]
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"
    assert args[args.index("--maxmemory-policy") + 1].startswith("volatile-")
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    secret_ref = {e["name"]: e for e in c["env"]}["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert secret_ref["key"] in k8s["Secret"][secret_ref["name"]]["stringData"]
    # The edge pods reach it; the NetworkPolicy admits them (and only them).
    edge_labels = k8s["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    [rule] = policy["spec"]["ingress"]
    assert rule["from"][0]["podSelector"]["matchLabels"].items() <= edge_labels.items()
    # The ConfigMap's commented block names this Service and the mounted seal key, and passes
    # check-config once uncommented (with the seal key and the admin token stood in for).
    text = k8s["ConfigMap"]["data"]["config.yaml"]
    shared = yaml.safe_load(uncomment_shared(text))["cache"]["shared"]
    url = urllib.parse.urlsplit(shared["url"])
    [port] = svc["spec"]["ports"]
    assert (url.scheme, url.hostname, url.port) == ("redis", svc["metadata"]["name"], port["port"])
    assert _port(c, port["targetPort"]) == 6379
    assert shared["seal_key_file"] == "/etc/authz-sidecar/secrets/seal-key"
    seal = tmp_path / "seal-key"
    seal.write_text(k8s["Secret"][secret_ref["name"]]["stringData"]["seal-key"] + "\n")
    token_file = tmp_path / "admin-token"
    token_file.write_text("test-admin-token\n")
    path = tmp_path / "config.yaml"
    path.write_text(uncomment_shared(text).replace("/etc/authz-sidecar/secrets/seal-key", str(seal))
                    .replace("admin_token_file: /etc/authz-sidecar-admin/token", f"admin_token_file: {token_file}"))
    out = check_config(path)
    assert out.returncode == 0, out.stderr
