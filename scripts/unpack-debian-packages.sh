#!/usr/bin/env bash
# unpack-debian-packages.sh DEST PACKAGE...: Debian packages' files unpacked under DEST (no
# install: no maintainer scripts, no system service started, nothing outside DEST), for
# programs the native stack runs itself (Prometheus, its PostgreSQL exporter, promtool).
# Idempotent: DEST/.unpacked lists what was unpacked; a second run with the same packages
# does nothing.
set -euo pipefail

dest=$1
shift
want="$*"
if [ -f "$dest/.unpacked" ] && [ "$(head -1 "$dest/.unpacked")" = "$want" ]; then
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
if ! apt-get download "$@" >download.log 2>&1; then
  # A fresh machine may have no package lists yet.
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q >/dev/null
    apt-get download "$@" >download.log 2>&1 || { cat download.log >&2; exit 1; }
  else
    cat download.log >&2
    echo "apt-get download $* failed: run 'sudo apt-get update' and make again" >&2
    exit 1
  fi
fi
rm -rf "$dest"
mkdir -p "$dest"
for deb in ./*.deb; do
  dpkg-deb -x "$deb" "$dest"
done
{ echo "$want"; ls ./*.deb; } >"$dest/.unpacked"
echo "unpacked $(ls ./*.deb | xargs -n1 basename | tr '\n' ' ')into $dest"
