# shellcheck shell=bash
# scripts/lib.sh - shell helpers shared by scripts/demo.sh, scripts/test.sh and
# scripts/idp-glewlwyd.sh (source it). The nginx rendering and port waiting live in
# scripts/stack.py, shared with the pytest harness.

# ensure_packages PKG... - apt-get install the Debian packages that are not installed yet.
ensure_packages() {
  local p missing=() glewlwyd_new=no
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "missing Debian packages: ${missing[*]} - run as root, or: sudo apt-get install ${missing[*]}" >&2
    return 1
  fi
  for p in "${missing[@]}"; do [ "$p" = glewlwyd ] && glewlwyd_new=yes; done
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # dbconfig-common asks which database the distro glewlwyd instance uses; ours has its own sqlite file.
  echo "glewlwyd glewlwyd/database-type select sqlite3" | debconf-set-selections 2>/dev/null || true
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  # glewlwyd's postinst may start the system service on 0.0.0.0:4593; we run our own on loopback.
  if [ "$glewlwyd_new" = yes ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl disable --now glewlwyd.service 2>/dev/null || true
  fi
}

# stop_pid PID [NAME] - stop one process we started: TERM, wait up to 10 s, then KILL.
stop_pid() {
  local pid="$1" name="${2:-process}"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "$name (PID $pid) still alive after 10 s, sending SIGKILL"
    kill -9 "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

# port_free PORT - true when nothing listens on 127.0.0.1:PORT.
port_free() {
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}
