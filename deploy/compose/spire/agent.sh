#!/bin/sh
# The agent with the join token spire-register wrote (single use: a new one at every start).
set -eu
exec spire-agent run -config /etc/spire/agent.conf -joinToken "$(cat /run/spire/bootstrap/join_token)"
