#!/bin/sh
# Beside the SPIRE server (its admin socket is on a volume of their pod): the node alias every
# agent of the cluster maps to, then the workload entries (../generated/spire-entries.json,
# generated from deploy/local/spire/entries.json), again every minute so a server restart on
# an empty store is repaired. Entries that exist already are reported and left as they are.
set -u
sock=/run/spire/server/api.sock
until spire-server healthcheck -socketPath "$sock" >/dev/null 2>&1; do sleep 2; done
while true; do
  # -node: parent of the entries (deploy/k8s/generate.py AGENT_ID).
  spire-server entry create -socketPath "$sock" -node -spiffeID spiffe://pipeline.local/agent/k8s \
    -selector k8s_psat:cluster:pipeline >/dev/null 2>&1 || true
  spire-server entry create -socketPath "$sock" -data /etc/spire/entries/entries.json >/dev/null 2>&1 || true
  spire-server entry show -socketPath "$sock" | grep -c "Entry ID" | sed 's/^/entries registered: /'
  sleep 60
done
