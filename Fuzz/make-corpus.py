#!/usr/bin/env python3
"""Regenerates the seed corpora in Fuzz/corpus/ (committed; run only to change them).

Certificates are made with openssl in a temporary directory, so the certificate seeds differ
between runs; everything else is fixed text. Usage: python3 Fuzz/make-corpus.py
"""
import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
FIXTURES = os.path.join(HERE, "..", "Tests", "Fixtures")

# FuzzCertificate's selector byte: format index + 6 * element index.
FORMATS = ["auto", "pem-urlencoded", "pem", "der-base64", "xfcc", "rfc9440"]
ELEMENTS = ["only", "first", "last"]


def selector(fmt, element="only"):
    return bytes([FORMATS.index(fmt) + 6 * ELEMENTS.index(element)])


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(tmp):
    """A small CA, and client certificates of the key types proxies forward."""
    conf = os.path.join(tmp, "ext.cnf")
    with open(conf, "w") as f:
        f.write("[ext]\nsubjectAltName=URI:spiffe://cluster.local/ns/default/sa/client,DNS:client.example\n"
                "extendedKeyUsage=clientAuth\n")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca.key",
            "-out", "ca.pem", "-days", "3650", "-subj", "/CN=Fuzz CA", cwd=tmp)
    certs = {}
    for name, key in [("ec256", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]),
                      ("ec384", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"]),
                      ("ed25519", ["-newkey", "ed25519"]),
                      ("rsa2048", ["-newkey", "rsa:2048"])]:
        openssl("req", "-new", *key, "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/C=DE/O=Fuzz, Inc./CN={name} client \\\"quoted\\\"", cwd=tmp)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "365", "-extfile", conf, "-extensions", "ext", "-out", f"{name}.pem", cwd=tmp)
        certs[name] = open(os.path.join(tmp, f"{name}.pem")).read()
    certs["ca"] = open(os.path.join(tmp, "ca.pem")).read()
    return certs


def der_of(pem):
    body = pem.split("-----BEGIN CERTIFICATE-----")[1].split("-----END CERTIFICATE-----")[0]
    return base64.b64decode("".join(body.split()))


def nginx_escape(pem):
    # $ssl_client_escaped_cert: every character outside RFC 3986 unreserved percent-encoded.
    return urllib.parse.quote(pem, safe="-._~")


def certificate_corpus(certs):
    t = "FuzzCertificate"
    for name in ["ec256", "rsa2048", "ed25519", "ec384"]:
        pem = certs[name]
        der = der_of(pem)
        b64 = base64.b64encode(der).decode()
        escaped = nginx_escape(pem)
        sha = hashlib.sha256(der).hexdigest()
        write(t, f"{name}-nginx-escaped", selector("pem-urlencoded") + escaped.encode())
        write(t, f"{name}-pem", selector("pem") + pem.encode())
        write(t, f"{name}-der-base64", selector("der-base64") + b64.encode())
        write(t, f"{name}-rfc9440", selector("rfc9440") + f":{b64}:".encode())
        xfcc = (f'By=spiffe://cluster.local/ns/default/sa/sidecar;Hash={sha};Cert="{escaped}";'
                f'Subject="CN={name} client \\"quoted\\",O=Fuzz\\, Inc.,C=DE";'
                f'URI=spiffe://cluster.local/ns/default/sa/client;DNS=client.example')
        write(t, f"{name}-xfcc-envoy", selector("xfcc") + xfcc.encode())
        if name == "ec256":
            write(t, f"{name}-auto-nginx-escaped", selector("auto") + escaped.encode())
            write(t, f"{name}-auto-pem-spaces", selector("auto") + pem.replace("\n", " ").encode())
            write(t, f"{name}-auto-der-base64url", selector("auto") + base64.urlsafe_b64encode(der).rstrip(b"="))
            write(t, f"{name}-auto-rfc9440", selector("auto") + f":{b64}:".encode())
            write(t, f"{name}-auto-xfcc-cert-only", selector("auto") + f'Cert="{escaped}"'.encode())
            write(t, f"{name}-xfcc-hash-only", selector("xfcc") + f"Hash={sha}".encode())
            two = (f'By=spiffe://front;Hash={sha};URI=spiffe://client,'
                   f'By=spiffe://back;Hash={hashlib.sha256(der_of(certs["ca"])).hexdigest()};URI=spiffe://front')
            write(t, f"{name}-xfcc-two-first", selector("xfcc", "first") + two.encode())
            write(t, f"{name}-xfcc-two-last", selector("xfcc", "last") + two.encode())
            write(t, f"{name}-xfcc-two-only", selector("xfcc", "only") + two.encode())
            write(t, f"{name}-xfcc-chain", selector("xfcc", "first") + (
                f'Hash={sha};Cert="{escaped}";Chain="{escaped}{nginx_escape(certs["ca"])}"').encode())
            # hostile variants
            write(t, "two-pem-blocks", selector("pem") + (pem + certs["ca"]).encode())
            write(t, "pem-private-key", selector("pem") + b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n")
            write(t, "pem-truncated", selector("pem") + pem[: len(pem) // 2].encode())
            write(t, "pem-data-after-end", selector("auto") + (pem + "trailing").encode())
            write(t, "pem-end-mismatch", selector("pem") + pem.replace("END CERTIFICATE", "END CERTIFICATX").encode())
            write(t, "urlenc-bad-escape", selector("pem-urlencoded") + escaped[:40].encode() + b"%zz" + escaped[40:80].encode())
            write(t, "urlenc-truncated-escape", selector("auto") + escaped[:100].encode() + b"%4")
            write(t, "der-truncated", selector("der-base64") + base64.b64encode(der[:-5]))
            write(t, "der-trailing-byte", selector("der-base64") + base64.b64encode(der + b"\x00"))
            write(t, "rfc9440-unterminated", selector("rfc9440") + f":{b64}".encode())
            write(t, "xfcc-subject-with-cert", selector("xfcc") + (
                f'By=spiffe://x;Subject="CN=a;Cert=\\"{escaped[:60]}\\",O=b";Hash={sha}').encode())
            write(t, "xfcc-hash-bad", selector("auto") + b"Hash=468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de68")
    # Minimal DER outlines: SEQUENCE { SEQUENCE {}, SEQUENCE {}, BIT STRING }
    minimal = bytes.fromhex("3009" "3000" "3000" "030100")
    write(t, "der-minimal-outline", selector("der-base64") + base64.b64encode(minimal))
    write(t, "der-indefinite-length", selector("der-base64") + base64.b64encode(bytes.fromhex("3080300030000301000000")))
    write(t, "der-long-form-length", selector("der-base64") + base64.b64encode(bytes.fromhex("30820009" "3000" "3000" "030100")))
    write(t, "der-nested", selector("der-base64") + base64.b64encode(bytes.fromhex("30" + "0f" + "300d" + "300b" + "3009" + "3007" + "3005" + "3003" + "3001" + "05") ))
    write(t, "der-public-key", selector("der-base64") + base64.b64encode(bytes.fromhex(
        "302a300506032b6570032100" + "11" * 32)))
    write(t, "empty", selector("auto"))
    write(t, "blank", selector("auto") + b" \t ")
    write(t, "colon", selector("auto") + b":")
    write(t, "colons", selector("rfc9440") + b"::")
    write(t, "fixture-client1", selector("auto") + nginx_escape(open(os.path.join(FIXTURES, "client1.pem")).read()).encode())


def bearer_corpus():
    t = "FuzzBearer"
    seeds = {
        "simple": "Bearer mF_9.B5f-4.1JqM",
        "jwt": "Bearer eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4iLCJpYXQiOjE1MTYyMzkwMjJ9.POstGetfAytaZS82wHcjoTyoqhMyxXiWdR7Nn7A29DNSl0EiXLdwJ6xC6AfgZWF1bOsS_TxYL",
        "lowercase": "bearer abc",
        "uppercase": "BEARER abc",
        "padding": "Bearer abc==",
        "padding-only": "Bearer ==",
        "padding-inside": "Bearer ab=c",
        "two-tokens": "Bearer abc def",
        "tabs": "Bearer\t\tabc\t ",
        "leading-blanks": " \tBearer abc",
        "no-token": "Bearer",
        "no-token-blank": "Bearer   ",
        "basic": "Basic dXNlcjpwYXNzd29yZA==",
        "dpop": "DPoP Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU",
        "bearer-no-space": "Bearerabc",
        "bearer-comma": "Bearer abc,Bearer def",
        "bearer-quoted": 'Bearer "abc"',
        "bearer-utf8": "Bearer t\u00f6ken",
        "bearer-nul": "Bearer ab\x00c",
        "bearer-crlf": "Bearer abc\r\n",
        "all-chars": "Bearer AZaz09-._~+/==",
        "several-headers": "Bearer abc\nBearer abc",
        "several-mixed": "Basic Zm9vOmJhcg==\nBearer abc",
        "several-none": "Basic Zm9vOmJhcg==\nNegotiate YIIG",
        "empty": "",
        "max-length": "Bearer " + "a" * 8192,
        "over-max-length": "Bearer " + "a" * 8193,
        "header-too-long": "Bearer " + "b" * 8192 + " " * 70,
    }
    for name, value in seeds.items():
        write(t, name, value)


ENVOY_HASH = "468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688"


def xfcc_corpus(certs):
    t = "FuzzXFCC"
    escaped = nginx_escape(certs["ec256"])
    seeds = {
        # Envoy's documentation examples
        "envoy-doc-1": f'By=http://frontend.lyft.com;Hash={ENVOY_HASH};Subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client";URI=http://testclient.lyft.com',
        "envoy-doc-2": f"By=http://frontend.lyft.com;Hash={ENVOY_HASH};URI=http://testclient.lyft.com,By=http://backend.lyft.com;Hash=9ba61d6425303443c0748a02dd8de688468ed33be74eee6556d90c0149c1309e;URI=http://frontend.lyft.com",
        "envoy-doc-3": f'By=http://frontend.lyft.com;Hash={ENVOY_HASH};Subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client";URI=http://testclient.lyft.com;DNS=lyft.com;DNS=www.lyft.com',
        "istio": f'By=spiffe://cluster.local/ns/default/sa/productpage;Hash={ENVOY_HASH};Subject="";URI=spiffe://cluster.local/ns/default/sa/sleep',
        "cert": f'By=spiffe://x;Hash={ENVOY_HASH};Cert="{escaped}";Subject="CN=client"',
        "nginx-cert-only": f'Cert="{escaped}"',
        "subject-escapes": 'Hash=00;Subject="CN=a \\"b\\",O=c\\,d;e=f\\\\g"',
        "subject-fake-cert": 'By=x;Subject="CN=x;Cert=evil,Hash=00";Hash=11',
        "unquoted-spaces": " By = spiffe://x ; Hash = ab ",
        "trailing-semicolon": "By=x;Hash=ab;",
        "trailing-comma": "By=x;Hash=ab,",
        "empty-element": "By=x,,By=y",
        "duplicate-hash": "Hash=ab;Hash=cd",
        "duplicate-uri": "URI=a;URI=b;DNS=c;DNS=d",
        "no-equals": "By",
        "empty-key": "=x",
        "stray-quote": 'By=a"b"',
        "unbalanced": 'Subject="CN=x',
        "text-after-quote": 'Subject="CN=x"y',
        "escape-at-end": 'Subject="CN=x\\',
        "unicode": 'By=spiffe://ü;Subject="CN=Ünïcödé 🙂"',
        "uppercase-keys": "BY=x;HASH=ab;CERT=cd",
        "empty": "",
    }
    for name, value in seeds.items():
        write(t, name, value)


X5T = "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"


def introspection_corpus():
    t = "FuzzIntrospectionResponse"
    seeds = {
        "rfc7662": '{\n  "active": true,\n  "client_id": "l238j323ds-23ij4",\n  "username": "jdoe",\n  "scope": "read write dolphin",\n  "sub": "Z5O3upPC88QrAjx00dis",\n  "aud": "https://protected.example.net/resource",\n  "iss": "https://server.example.com/",\n  "exp": 1419356238,\n  "iat": 1419350238,\n  "extension_field": "twenty-seven"\n}',
        "rfc7662-inactive": '{"active": false}',
        "rfc8705-bound": '{"active":true,"iss":"https://server.example.com","sub":"ty.webb@example.com","exp":1493726400,"nbf":1493722800,"cnf":{"x5t#S256":"' + X5T + '"}}',
        "keycloak": '{"exp":1735689600,"iat":1735689300,"jti":"onrtac:3f1d2a","iss":"https://localhost:8444/realms/demo","aud":["account","api"],"sub":"7d2f7c1e-8c4a-4f5e-9d0b-2b1a3c4d5e6f","typ":"Bearer","azp":"system-client-mtls","sid":"a1b2","acr":"1","allowed-origins":["*"],"realm_access":{"roles":["offline_access","uma_authorization"]},"resource_access":{"account":{"roles":["manage-account","view-profile"]}},"cnf":{"x5t#S256":"' + X5T + '"},"scope":"system-access email profile","email_verified":false,"clientHost":"172.18.0.5","preferred_username":"service-account-system-client-mtls","clientAddress":"172.18.0.5","client_id":"system-client-mtls","username":"service-account-system-client-mtls","token_type":"Bearer","active":true}',
        "glewlwyd": '{"active":true,"scope":"system-access","cnf":{"x5t#S256":"' + X5T + '"}}',
        "glewlwyd-full": '{"active":true,"username":"user1","client_id":"client1","scope":"system-access openid","token_type":"bearer","exp":1735689600,"iat":1735686000,"nbf":1735686000,"sub":"abcdef","aud":"client1","iss":"https://glewlwyd.tld","jti":"XYZ","cnf":{"x5t#S256":"' + X5T + '"}}',
        "dpop-jkt": '{"active":true,"cnf":{"jkt":"0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"},"token_type":"DPoP"}',
        "scope-array": '{"active":true,"scope":["a","b"],"aud":["x"],"exp":1.7e9}',
        "nulls": '{"active":true,"scope":null,"aud":null,"exp":null,"cnf":null,"client_id":null}',
        "unicode-escapes": '{"active":true,"sub":"\\u00fc\\ud83d\\ude00\\n\\t\\"\\\\\\/","name":"\u00fc\U0001f600"}',
        "numbers": '{"active":true,"n":[0,-0,1e999,-1e-999,9223372036854775807,9223372036854775808,-9223372036854775809,1.5E+3,0.000001]}',
        "deep-31": '{"active":true,"x":' + "[" * 30 + "]" * 30 + "}",
        "deep-32": '{"active":true,"x":' + "[" * 31 + "]" * 31 + "}",
        # hostile
        "duplicate-active": '{"active":false,"active":true}',
        "active-string": '{"active":"true"}',
        "active-number": '{"active":1}',
        "no-active": '{"scope":"admin"}',
        "exp-string": '{"active":true,"exp":"1735689600"}',
        "exp-huge": '{"active":true,"exp":1e300}',
        "cnf-string": '{"active":true,"cnf":"' + X5T + '"}',
        "x5t-number": '{"active":true,"cnf":{"x5t#S256":1}}',
        "aud-mixed": '{"active":true,"aud":["a",1]}',
        "trailing-data": '{"active":true} {"active":false}',
        "bom": '\ufeff{"active":true}',
        "lone-surrogate": '{"active":true,"sub":"\\ud800"}',
        "invalid-utf8": b'{"active":true,"sub":"\xc3\x28\xff"}',
        "control-char": '{"active":true,"sub":"a\x01b"}',
        "top-array": '[{"active":true}]',
        "truncated": '{"active":true,"scope":"a',
        "empty": "",
        "whitespace-only": " \r\n\t",
    }
    for name, value in seeds.items():
        write(t, name, value)


def config_corpus():
    t = "FuzzConfig"
    root = os.path.join(HERE, "..")
    write(t, "compose-sidecar", open(os.path.join(root, "deploy", "compose", "sidecar.yaml")).read())
    readme = open(os.path.join(root, "README.md")).read()
    blocks = [b.split("```", 1)[0] for b in readme.split("```yaml\n")[1:]]
    for i, block in enumerate(b for b in blocks if "introspection:" in b):
        write(t, f"readme-{i}", block)
    write(t, "minimal", "introspection:\n  endpoint: https://as.example/introspect\n  client_id: c\npolicies:\n  - name: p\n    match: { path_prefix: / }\n")
    write(t, "anchors", "introspection: &i\n  endpoint: https://as.example/i\n  client_id: c\nx: *i\npolicies: [ {name: a, match: {path_prefix: /}} ]\n")
    write(t, "empty", "")
    write(t, "not-a-mapping", "- a\n- b\n")


def main():
    if shutil.which("openssl") is None:
        sys.exit("openssl is needed")
    for target in ["FuzzBearer", "FuzzCertificate", "FuzzXFCC", "FuzzIntrospectionResponse", "FuzzConfig"]:
        shutil.rmtree(os.path.join(CORPUS, target), ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        certs = make_certificates(tmp)
    bearer_corpus()
    certificate_corpus(certs)
    xfcc_corpus(certs)
    introspection_corpus()
    config_corpus()


if __name__ == "__main__":
    main()
