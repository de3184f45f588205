#!/usr/bin/env bash
# Installs the system packages the native stack needs, only those missing: Java 17 and
# Maven (Kafka, the principal builder), PostgreSQL's server, Go (to build OPA), npm (the lag
# view's charting library) and Chromium (the lag view's test opens it headless).
set -euo pipefail

missing=()
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
command -v go >/dev/null || missing+=(golang-go)
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || command -v postgres >/dev/null \
  || missing+=(postgresql)
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  missing+=(postgresql)  # provides the `postgres` OS user that runs the server when we are root
fi
command -v python3 >/dev/null || missing+=(python3 python3-venv)
command -v npm >/dev/null || missing+=(npm)
command -v chromium >/dev/null || missing+=(chromium)

# As root, the stack runs each service as its own system user (SPIRE tells workloads apart by
# uid): those users must reach the Python interpreter, which may live under root's private
# home (pyenv). Let others traverse (not list) each directory above it.
if [ "$(id -u)" = 0 ] && command -v python3 >/dev/null; then
  dir=$(dirname "$(readlink -f "$(command -v python3)")")
  while [ "$dir" != / ]; do
    [ -n "$(find "$dir" -maxdepth 0 -perm -o+x)" ] || chmod o+x "$dir"
    dir=$(dirname "$dir")
  done
fi

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "missing system packages: ${missing[*]}" >&2
  echo "install them (e.g. sudo apt-get install ${missing[*]}) and run make again" >&2
  exit 1
fi
echo "installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
