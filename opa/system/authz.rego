# Who may use OPA's own API: OPA runs with --authentication=tls --authorization=basic
# (deploy/local/components.py) and asks data.system.authz.allow before every request.
#
# The TLS handshake already refused anyone without a client certificate from the trust
# bundle; the caller is that certificate's SPIFFE ID (its one spiffe:// URI SAN), never
# its subject DN (input.identity). Default deny. A caller may:
#
#   any SPIFFE ID of pipeline.local  GET /health (readiness probes)
#   admin/bootstrap                  everything: write policies and data, query, read
#   operator/cli                     GET /v1/data/... and /v1/policies/... (read only)
#   a client of data.opa_api.clients POST /v1/data/<decision> for its own decisions only,
#                                    without query parameters (no ?explain: no trace of
#                                    the policy's data)
#
# Writing a policy or data can grant any identity anything at the broker, so only the
# admin identity may; the operator's broker rights are deliberately narrower (no topic
# creation, no configuration changes), and a leaked operator key must not escalate. The
# admin is named here, not in data, so that no data change, which outlives a restart,
# can lock it out.
#
# Which decisions each client may ask is data (opa/data.json `opa_api.clients`), an object
# keyed by client name, each {"principals": [SPIFFE ID, ...], "decisions": [path, ...]}
# with paths as services/common/topology.py names them ("kafka/authz/allow").
#
# A refusal is HTTP 401 with the reason (OPA answers a denied request with 401, not 403).
package system.authz

import rego.v1

admin := "spiffe://pipeline.local/admin/bootstrap"

operator := "spiffe://pipeline.local/operator/cli"

default allow := {"allowed": false, "reason": "no client certificate with a SPIFFE ID of pipeline.local"}

allow := {"allowed": true} if permitted

allow := {"allowed": false, "reason": reason} if {
	not permitted
	reason := sprintf("%s may not %s /%s", [caller, input.method, concat("/", input.path)])
}

# The caller: the SPIFFE ID in the leaf certificate OPA verified, if it has exactly one URI
# SAN and that is a well-formed SPIFFE ID of our trust domain (the SPIFFE X509-SVID rules:
# no port, user info, query or fragment). OPA gives each URI as Go's url.URL fields.
caller := id if {
	[uri] := input.client_certificates[0].URIs
	uri.Scheme == "spiffe"
	uri.Host == "pipeline.local"
	uri.User == null
	uri.Opaque == ""
	uri.RawQuery == ""
	uri.Fragment == ""
	not uri.ForceQuery
	id := concat("", ["spiffe://", uri.Host, uri.Path])
	regex.match(`^spiffe://pipeline\.local(/[A-Za-z0-9._-]+)+$`, id)
}

permitted if {
	caller
	input.method == "GET"
	input.path == ["health"]
}

permitted if caller == admin

permitted if {
	caller == operator
	input.method == "GET"
	input.path[0] == "v1"
	input.path[1] in {"data", "policies"}
}

permitted if {
	input.method == "POST"
	input.params == {}
	some client in data.opa_api.clients
	caller in client.principals
	some decision in client.decisions
	input.path == array.concat(["v1", "data"], split(decision, "/"))
}
