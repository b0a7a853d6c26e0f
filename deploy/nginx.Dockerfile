# deploy/nginx.Dockerfile - nginx as deploy/nginx.conf expects it: Debian 12's nginx (1.22) with the
# headers-more module (more_clear_input_headers 'X-Credential-*'), which the official nginx image lacks.
# The same Debian packages scripts/test.sh installs for the nginx integration tests. Used by
# compose.yml (service nginx) and deploy/kubernetes/ (container nginx).
#
#   docker build -f deploy/nginx.Dockerfile -t authz-edge-nginx deploy
#
# The configuration is mounted at /etc/authz-sidecar/nginx.conf (it loads the module itself with
# load_module, so Debian's /etc/nginx/nginx.conf is not used); the certificates under
# /etc/authz-sidecar/certs/.
FROM debian:bookworm-slim

# Unpinned on purpose: the distribution's security updates are wanted (hadolint DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      nginx libnginx-mod-http-headers-more-filter \
 && rm -rf /var/lib/apt/lists/* \
 && nginx -v

EXPOSE 443 8443
STOPSIGNAL SIGQUIT
CMD ["nginx", "-c", "/etc/authz-sidecar/nginx.conf", "-g", "daemon off;"]
