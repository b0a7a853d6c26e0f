# Dockerfile - the authz-sidecar image: a release build with the Swift runtime linked in, on Debian 12 slim.
#
#   docker build -t authz-sidecar .
#   docker run --rm -v "$PWD/sidecar.yaml:/etc/authz-sidecar/config.yaml:ro" \
#              -e AUTHZ_INTROSPECTION_CLIENT_SECRET=... -p 127.0.0.1:9191:9191 authz-sidecar
#   docker run --rm -v "$PWD/sidecar.yaml:/etc/authz-sidecar/config.yaml:ro" authz-sidecar check-config
#
# The configuration is read from /etc/authz-sidecar/config.yaml (AUTHZ_CONFIG); the image holds none.
# In a container the listeners must not stay on 127.0.0.1 unless the proxy shares the network
# namespace (a Kubernetes pod): e.g. listen: 0.0.0.0:9191, admin_listen: 0.0.0.0:9090 (see
# deploy/compose/sidecar.yaml). Ports: 9191 decisions (server.listen), 9192 Envoy gRPC ext_authz
# (server.grpc_listen, when set), 9090 /healthz /readyz /metrics (server.admin_listen). 0.0.0.0 is
# not loopback: /admin/* answers 403 there unless server.admin_token_file is set.
#
# Build arguments: SWIFT_IMAGE (the toolchain image; the dependencies' manifests need Swift >= 6.2,
# and Package.resolved is not committed, so the newest allowed versions are resolved unless one is
# in the build context), RUNTIME_IMAGE.

ARG SWIFT_IMAGE=swift:6.3-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ------------------------------------------------------------------------------------------- build
FROM ${SWIFT_IMAGE} AS build
# zlib's headers and libz.so for the gRPC transport's link step (as scripts/test.sh installs them).
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src

# Dependencies first: this layer is rebuilt only when the manifest (or a local Package.resolved) changes.
COPY Package.swift Package.resolve[d] ./
RUN swift package resolve

# SwiftPM checks every target's directory when it loads the package, the test targets' too.
COPY Sources ./Sources
COPY Tests ./Tests

# --static-swift-stdlib links the Swift runtime and Foundation into the binary; what stays dynamic
# is glibc, libstdc++/libgcc_s and zlib (the gRPC transport's compression), all in the runtime image.
RUN swift build -c release --product authz-sidecar --static-swift-stdlib \
 && install -D -m 0755 "$(swift build -c release --show-bin-path)/authz-sidecar" /out/authz-sidecar

# ----------------------------------------------------------------------------------------- runtime
FROM ${RUNTIME_IMAGE}

# ca-certificates: the system trust roots for an https authorization server (introspection.ca_file
# unset). No libcurl: the binary does not use FoundationNetworking. No curl either: the health
# check below uses bash's /dev/tcp.
# Unpinned on purpose: the distribution's security updates are wanted (hadolint DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates zlib1g libstdc++6 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 authz \
 && useradd --system --uid 10001 --gid authz --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin authz \
 && mkdir -p /etc/authz-sidecar

COPY --from=build /out/authz-sidecar /usr/local/bin/authz-sidecar
# Fails the build when a shared library the binary needs is missing from the runtime image.
RUN authz-sidecar --version

LABEL org.opencontainers.image.title="authz-sidecar" \
      org.opencontainers.image.description="Authorization sidecar for nginx auth_request and Envoy ext_authz (RFC 7662 introspection, RFC 8705 certificate-bound tokens)"

# AUTHZ_HEALTH_PORT: the port the HEALTHCHECK asks for /healthz on 127.0.0.1 - server.admin_listen's
# port, or server.listen's when admin_listen is null. The process itself does not read it.
ENV AUTHZ_CONFIG=/etc/authz-sidecar/config.yaml \
    AUTHZ_HEALTH_PORT=9090

USER 10001:10001
EXPOSE 9191 9192 9090

# A plain HTTP/1.1 GET of /healthz over bash's /dev/tcp: healthy when the status line says 200.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${AUTHZ_HEALTH_PORT:-9090} && printf 'GET /healthz HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && read -r -t 2 status <&3 && [[ $status == HTTP/1.[01]' 200'* ]]"]

ENTRYPOINT ["authz-sidecar"]
CMD ["serve"]
