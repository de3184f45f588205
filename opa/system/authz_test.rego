# Tests for system.authz against the real opa/data.json (`opa test opa/` loads it).
package system.authz_test

import rego.v1

import data.system.authz

td := "spiffe://pipeline.local"

broker := concat("", [td, "/broker/kafka"])

ingester := concat("", [td, "/service/ingester"])

processor := concat("", [td, "/service/processor"])

storage := concat("", [td, "/service/storage"])

operator := concat("", [td, "/operator/cli"])

admin := concat("", [td, "/admin/bootstrap"])

web := concat("", [td, "/source/web"])

# A URI SAN as OPA puts it into input: Go's url.URL, marshalled as JSON.
uri(host, path) := {
	"Scheme": "spiffe", "Opaque": "", "User": null, "Host": host, "Path": path,
	"RawPath": "", "OmitHost": false, "ForceQuery": false, "RawQuery": "",
	"Fragment": "", "RawFragment": "",
}

spiffe(id) := uri("pipeline.local", substring(id, count(td), -1))

# The authorizer's input for a request by a client whose leaf certificate has `uris`.
request_by(uris, method, path, params) := {
	"identity": "O=SPIFFE",
	"client_certificates": [{"URIs": uris}],
	"method": method,
	"path": split(trim_prefix(path, "/"), "/"),
	"params": params,
	"headers": {},
}

decide(id, method, path) := d if {
	d := authz.allow with input as request_by([spiffe(id)], method, path, {})
}

allowed(id, method, path) if decide(id, method, path).allowed == true

refused(id, method, path) if decide(id, method, path).allowed == false

# ---- no certificate, or not one of ours ------------------------------------------------

test_no_certificate_is_refused if {
	d := authz.allow with input as {"method": "GET", "path": ["health"], "params": {}, "headers": {}}
	d.allowed == false
	d.reason == "no client certificate with a SPIFFE ID of pipeline.local"
}

test_a_certificate_without_a_uri_san_is_refused_even_health if {
	d := authz.allow with input as request_by(null, "GET", "/health", {})
	d.allowed == false
}

test_malformed_or_foreign_spiffe_ids_are_nobody if {
	bad := [
		[uri("pipeline.local.evil", "/admin/bootstrap")],
		[uri("pipeline.local:8443", "/admin/bootstrap")],
		[uri("pipeline.local", "")],
		[uri("pipeline.local", "/admin//bootstrap")],
		[object.union(uri("pipeline.local", "/admin/bootstrap"), {"Scheme": "https"})],
		[object.union(uri("pipeline.local", "/admin/bootstrap"), {"RawQuery": "x=1"})],
		[object.union(uri("pipeline.local", "/admin/bootstrap"), {"Fragment": "f"})],
		[object.union(uri("pipeline.local", "/admin/bootstrap"), {"User": {}})],
		# Two URI SANs: not an X509-SVID, even if one of them is the admin's.
		[spiffe(admin), spiffe(ingester)],
	]
	every uris in bad {
		d := authz.allow with input as request_by(uris, "GET", "/health", {})
		d.allowed == false
	}
}

# ---- health ----------------------------------------------------------------------------

test_every_identity_of_the_trust_domain_may_read_health if {
	every id in [broker, ingester, processor, storage, operator, admin, web] {
		allowed(id, "GET", "/health")
	}
}

test_health_is_read_only if refused(ingester, "POST", "/health")

# ---- admin -----------------------------------------------------------------------------

test_admin_may_write_policies_and_data if {
	allowed(admin, "PUT", "/v1/policies/opa/kafka/authz.rego")
	allowed(admin, "DELETE", "/v1/policies/opa/kafka/authz.rego")
	allowed(admin, "PUT", "/v1/data/kafka_acl/roles/x")
	allowed(admin, "PATCH", "/v1/data/pipeline/config")
	allowed(admin, "DELETE", "/v1/data/kafka_acl/roles/x")
	allowed(admin, "GET", "/v1/data/kafka_acl")
	allowed(admin, "POST", "/v1/data/kafka/authz/allow")
}

# ---- nobody else writes ----------------------------------------------------------------

test_no_other_identity_may_write_policies_or_data if {
	every id in [broker, ingester, processor, storage, operator, web] {
		refused(id, "PUT", "/v1/policies/evil.rego")
		refused(id, "DELETE", "/v1/policies/opa/kafka/authz.rego")
		refused(id, "PUT", "/v1/data/kafka_acl/roles/evil")
		refused(id, "PATCH", "/v1/data/kafka_acl")
		refused(id, "DELETE", "/v1/data/kafka_acl/roles/ingester")
		refused(id, "POST", "/v1/data/kafka_acl/roles/evil") # POST creates a document too
		refused(id, "POST", "/v1/query")
		refused(id, "POST", "/v1/compile")
		refused(id, "GET", "/v1/config")
	}
}

test_a_refusal_names_the_caller_and_the_request if {
	decide(ingester, "PUT", "/v1/data/kafka_acl/roles/evil").reason == sprintf(
		"%s may not PUT /v1/data/kafka_acl/roles/evil",
		[ingester],
	)
}

# ---- operator: read only ---------------------------------------------------------------

test_the_operator_may_read_data_and_policies if {
	allowed(operator, "GET", "/v1/data/kafka_acl/roles")
	allowed(operator, "GET", "/v1/policies")
	allowed(operator, "GET", "/v1/policies/opa/kafka/authz.rego")
}

test_the_operator_may_not_ask_for_a_workloads_decision if {
	refused(operator, "POST", "/v1/data/kafka/authz/allow")
	refused(operator, "POST", "/v1/data/pipeline/ingest/decisions")
}

# ---- workloads: their own decisions only -----------------------------------------------

own := {
	broker: "/v1/data/kafka/authz/allow",
	ingester: "/v1/data/pipeline/ingest/decisions",
	processor: "/v1/data/pipeline/process/decisions",
	storage: "/v1/data/pipeline/storage/decisions",
}

test_each_workload_may_ask_its_own_decision if {
	every id, path in own {
		allowed(id, "POST", path)
	}
}

test_no_workload_may_ask_anothers_decision if {
	every id, _ in own {
		others := {path | some other, path in own; other != id}
		count(others) == count(own) - 1
		every path in others {
			refused(id, "POST", path)
		}
	}
}

test_the_brokers_decision_is_refused_to_services_and_sources if {
	every id in [ingester, processor, storage, web] {
		refused(id, "POST", own[broker])
	}
}

test_a_workload_may_not_read_data_or_its_decision_by_get if {
	refused(ingester, "GET", own[ingester])
	refused(ingester, "GET", "/v1/data/pipeline/config")
	refused(broker, "GET", "/v1/data/kafka_acl/roles")
	refused(broker, "GET", "/v1/policies")
}

test_a_workload_may_not_ask_for_a_trace_or_partial_evaluation if {
	every params in [{"explain": ["full"]}, {"partial": [""]}, {"metrics": [""]}] {
		d := authz.allow with input as request_by([spiffe(ingester)], "POST", own[ingester], params)
		d.allowed == false
	}
}

test_an_encoded_slash_is_not_a_path_separator if {
	# /v1/data/kafka%2Fauthz/allow: OPA's data API reads "kafka/authz" as one key.
	d := authz.allow with input as object.union(
		request_by([spiffe(broker)], "POST", own[broker], {}),
		{"path": ["v1", "data", "kafka/authz", "allow"]},
	)
	d.allowed == false
}

test_a_wider_or_deeper_path_is_not_the_decision if {
	refused(ingester, "POST", "/v1/data/pipeline/ingest")
	refused(ingester, "POST", "/v1/data/pipeline/ingest/decisions/0")
	refused(ingester, "POST", "/v1/data")
	refused(ingester, "POST", "/v0/data/pipeline/ingest/decisions")
}

test_sources_may_ask_nothing if {
	every path in own {
		refused(web, "POST", path)
	}
}

test_a_client_added_as_data_may_ask_its_decision if {
	clients := object.union(data.opa_api.clients, {"search": {"principals": [web], "decisions": ["pipeline/search/decisions"]}})
	d := authz.allow with input as request_by([spiffe(web)], "POST", "/v1/data/pipeline/search/decisions", {})
		with data.opa_api.clients as clients
	d.allowed == true
}
