#!/bin/sh
# One-shot, at every `docker compose up`, before the agent starts: the server's bundle and a
# fresh single-use join token for the agent (on the bootstrap volume), and the registration
# entries (spire/entries.json, generated from deploy/local/spire/entries.json).
set -eu
sock=/run/spire/server/api.sock
out=/run/spire/bootstrap
until spire-server healthcheck -socketPath "$sock" >/dev/null 2>&1; do sleep 1; done
spire-server bundle show -socketPath "$sock" >"$out/bundle.pem.tmp" && mv "$out/bundle.pem.tmp" "$out/bundle.pem"
# -spiffeID: the agent's ID, the entries' parent_id (deploy/compose/generate.py AGENT_ID).
spire-server token generate -socketPath "$sock" -ttl 600 -spiffeID spiffe://pipeline.local/agent/compose \
  | sed -n 's/^Token: //p' >"$out/join_token"
test -s "$out/join_token"
# Entries that exist already are reported and left as they are; new ones are created.
# (Unlike the native stack, entries removed from the file are not deleted here.)
spire-server entry create -socketPath "$sock" -data /etc/spire/entries.json || true
spire-server entry show -socketPath "$sock" | grep -c "Entry ID" | sed 's/^/entries registered: /'
