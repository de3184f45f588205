# SPIRE's own images hold the binary alone (no shell). The agent's start and the one-shot
# registration (deploy/compose/spire/*.sh) need one, so this puts the pinned binaries
# (SPIRE_VERSION in the Makefile) on a small shell image. Build from the repository root.
FROM ghcr.io/spiffe/spire-server:1.13.3 AS server
FROM ghcr.io/spiffe/spire-agent:1.13.3 AS agent

FROM busybox:1.37.0
COPY --from=server /opt/spire/bin/spire-server /opt/spire/bin/spire-server
COPY --from=agent /opt/spire/bin/spire-agent /opt/spire/bin/spire-agent
COPY deploy/compose/spire/register.sh deploy/compose/spire/agent.sh /opt/spire/
ENV PATH=/opt/spire/bin:$PATH
