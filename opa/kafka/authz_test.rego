# Tests for kafka.authz against the real opa/data.json
# (`opa test opa/` loads it at the data root).
package kafka.authz_test

import rego.v1

import data.kafka.authz

web := "spiffe://pipeline.local/source/web"

ingester := "spiffe://pipeline.local/service/ingester"

processor := "spiffe://pipeline.local/service/processor"

storage := "spiffe://pipeline.local/service/storage"

operator := "spiffe://pipeline.local/operator/cli"

bootstrap := "spiffe://pipeline.local/admin/bootstrap"

broker := "spiffe://pipeline.local/broker/kafka"

lag_exporter := "spiffe://pipeline.local/ops/lag-exporter"

# The input the plugin sends, shaped as in opa-authorizer 1.5.1.
request(principal_type, name, resource_type, resource_name, pattern_type, op) := {
	"requestContext": {
		"clientAddress": "/127.0.0.1",
		"clientInformation": {"softwareName": "apache-kafka-java", "softwareVersion": "3.9.2"},
		"connectionId": "127.0.0.1:9093-127.0.0.1:50000-0",
		"header": {
			"name": {"clientId": "test", "correlationId": 1, "requestApiKey": 0, "requestApiVersion": 9},
			"headerVersion": 2,
		},
		"listenerName": "CLIENT",
		"securityProtocol": "SSL",
		"principal": {"principalType": principal_type, "name": name},
	},
	"action": {
		"resourcePattern": {
			"resourceType": resource_type,
			"name": resource_name,
			"patternType": pattern_type,
			"unknown": false,
		},
		"operation": op,
		"resourceReferenceCount": 1,
		"logIfAllowed": true,
		"logIfDenied": true,
	},
}

# The decision for a literal resource; always a boolean, so callers compare
# with == true / == false (an undefined decision fails both).
decide(principal, resource_type, resource_name, op) := d if {
	d := authz.allow with input as request("User", principal, resource_type, resource_name, "LITERAL", op)
}

# The decision for an authorizeByResourceType question (PREFIXED "").
decide_by_type(principal, resource_type, op) := d if {
	d := authz.allow with input as request("User", principal, resource_type, "", "PREFIXED", op)
}

allowed_all(principal, cases) if {
	every c in cases {
		decide(principal, c[0], c[1], c[2]) == true
	}
}

denied_all(principal, cases) if {
	every c in cases {
		decide(principal, c[0], c[1], c[2]) == false
	}
}

# --- sources ---------------------------------------------------------------

test_sources_allowed if {
	allowed_all(web, [
		["TOPIC", "pipeline.raw.web", "WRITE"],
		["TOPIC", "pipeline.raw.web", "DESCRIBE"], # implied by WRITE
		["CLUSTER", "kafka-cluster", "IDEMPOTENT_WRITE"],
	])
	decide("spiffe://pipeline.local/source/mobile", "TOPIC", "pipeline.raw.mobile", "WRITE") == true
	decide("spiffe://pipeline.local/source/pos_2-eu", "TOPIC", "pipeline.raw.pos_2-eu", "WRITE") == true
}

# Provenance: a source writes its own raw topic and no other, so the topic names the
# identity that wrote a record.
test_sources_write_only_their_own_raw_topic if {
	denied_all(web, [
		["TOPIC", "pipeline.raw.backend", "WRITE"],
		["TOPIC", "pipeline.raw.mobile", "WRITE"],
		["TOPIC", "pipeline.raw", "WRITE"], # the old shared topic
		["TOPIC", "pipeline.raw.", "WRITE"],
		["TOPIC", "pipeline.raw.web.x", "WRITE"], # exact name, not a prefix
		["TOPIC", "pipeline.raw.webx", "WRITE"],
		["TOPIC", "pipeline.raw.{principal_name}", "WRITE"], # the placeholder itself
		["TOPIC", "pipeline.raw.backend", "DESCRIBE"],
	])
	decide("spiffe://pipeline.local/source/mobile", "TOPIC", "pipeline.raw.web", "WRITE") == false
}

test_sources_with_odd_names_get_nothing if {
	every id in [
		"spiffe://pipeline.local/source/",
		"spiffe://pipeline.local/source/web/x",
		"spiffe://pipeline.local/source/Web", # not a source name: upper case
		"spiffe://pipeline.local/source/web.x", # not a source name: a dot
	] {
		every topic in ["pipeline.raw.web", "pipeline.raw.x", "pipeline.raw.Web", "pipeline.raw.web.x", "pipeline.raw.web/x"] {
			decide(id, "TOPIC", topic, "WRITE") == false
		}
		decide_by_type(id, "TOPIC", "WRITE") == false
	}
}

test_placeholder_only_in_names if {
	roles := {"prefixed": {
		"principals": ["spiffe://pipeline.local/source/*"],
		"grants": [{"resource": "TOPIC", "prefix": "pipeline.raw.{principal_name}", "operations": ["WRITE"]}],
	}}
	d := authz.allow with input as request("User", web, "TOPIC", "pipeline.raw.web", "LITERAL", "WRITE")
		with data.kafka_acl.roles as roles
	d == false
}

test_sources_denied if {
	denied_all(web, [
		["TOPIC", "pipeline.raw.web", "READ"],
		["TOPIC", "pipeline.raw.web", "DELETE"],
		["TOPIC", "pipeline.raw.web", "ALTER"],
		["TOPIC", "pipeline.raw.web", "DESCRIBE_CONFIGS"],
		["TOPIC", "pipeline.raw.evil", "WRITE"], # not its own topic
		["TOPIC", "pipeline.validated", "WRITE"],
		["TOPIC", "pipeline.validated", "DESCRIBE"],
		["TOPIC", "pipeline.dlq", "WRITE"],
		["GROUP", "pipeline-ingester", "READ"],
		["GROUP", "anything", "READ"],
		["GROUP", "anything", "DESCRIBE"],
		["TRANSACTIONAL_ID", "pipeline-ingester-0", "WRITE"],
		["CLUSTER", "kafka-cluster", "DESCRIBE"],
		["CLUSTER", "kafka-cluster", "CREATE"],
		["CLUSTER", "kafka-cluster", "CLUSTER_ACTION"],
	])
}

test_sources_glob_is_one_segment if {
	decide("spiffe://pipeline.local/source/web/extra", "TOPIC", "pipeline.raw.web", "WRITE") == false
	decide("spiffe://pipeline.local/source", "TOPIC", "pipeline.raw.web", "WRITE") == false
	decide("spiffe://pipeline.local/source/", "TOPIC", "pipeline.raw.web", "WRITE") == false
	decide("spiffe://pipeline.local/other/source/web", "TOPIC", "pipeline.raw.web", "WRITE") == false
}

# --- ingester --------------------------------------------------------------

test_ingester_allowed if {
	allowed_all(ingester, [
		["TOPIC", "pipeline.raw.web", "READ"],
		["TOPIC", "pipeline.raw.mobile", "READ"],
		["TOPIC", "pipeline.raw.backend", "DESCRIBE"], # pattern subscription: implied by READ
		["GROUP", "pipeline-ingester", "READ"],
		["GROUP", "pipeline-ingester", "DESCRIBE"],
		["TOPIC", "pipeline.validated", "WRITE"],
		["TOPIC", "pipeline.validated", "DESCRIBE"],
		["TOPIC", "pipeline.dlq", "WRITE"],
		["TRANSACTIONAL_ID", "pipeline-ingester", "WRITE"],
		["TRANSACTIONAL_ID", "pipeline-ingester-0", "WRITE"],
		["TRANSACTIONAL_ID", "pipeline-ingester-0", "DESCRIBE"],
		["CLUSTER", "kafka-cluster", "IDEMPOTENT_WRITE"],
	])
}

test_ingester_denied if {
	denied_all(ingester, [
		["TOPIC", "pipeline.raw.web", "WRITE"],
		["TOPIC", "pipeline.raw", "READ"], # the prefix is "pipeline.raw."
		["TOPIC", "pipeline.validated", "READ"],
		["TOPIC", "pipeline.processed", "WRITE"],
		["TOPIC", "pipeline.dlq", "READ"],
		["GROUP", "pipeline-processor", "READ"],
		["GROUP", "pipeline-ingester-other", "READ"], # group name is exact
		["TRANSACTIONAL_ID", "pipeline-processor-0", "WRITE"],
		["TOPIC", "pipeline.raw.web", "DELETE"],
		["CLUSTER", "kafka-cluster", "CREATE"],
	])
}

# --- processor -------------------------------------------------------------

test_processor_allowed if {
	allowed_all(processor, [
		["TOPIC", "pipeline.validated", "READ"],
		["TOPIC", "pipeline.validated", "DESCRIBE"],
		["GROUP", "pipeline-processor", "READ"],
		["TOPIC", "pipeline.processed", "WRITE"],
		["TOPIC", "pipeline.dlq", "WRITE"],
		["TRANSACTIONAL_ID", "pipeline-processor-3", "WRITE"],
		["CLUSTER", "kafka-cluster", "IDEMPOTENT_WRITE"],
	])
}

test_processor_denied if {
	denied_all(processor, [
		["TOPIC", "pipeline.raw.web", "READ"],
		["TOPIC", "pipeline.raw.web", "DESCRIBE"],
		["TOPIC", "pipeline.validated", "WRITE"],
		["TOPIC", "pipeline.processed", "READ"],
		["GROUP", "pipeline-ingester", "READ"],
		["TRANSACTIONAL_ID", "pipeline-ingester-0", "WRITE"],
		["TRANSACTIONAL_ID", "pipeline-storage-0", "WRITE"],
	])
}

# --- storage ---------------------------------------------------------------

test_storage_allowed if {
	allowed_all(storage, [
		["TOPIC", "pipeline.processed", "READ"],
		["GROUP", "pipeline-storage-postgres", "READ"],
		["GROUP", "pipeline-storage-lake", "READ"],
		["GROUP", "pipeline-storage-search", "READ"],
		["GROUP", "pipeline-storage-analytics", "READ"],
		["GROUP", "pipeline-storage-lake", "DESCRIBE"],
		["TOPIC", "pipeline.analytics", "WRITE"],
		["TOPIC", "pipeline.dlq", "WRITE"],
		["TRANSACTIONAL_ID", "pipeline-storage-lake-0", "WRITE"],
		["CLUSTER", "kafka-cluster", "IDEMPOTENT_WRITE"],
	])
}

test_storage_denied if {
	denied_all(storage, [
		["TOPIC", "pipeline.processed", "WRITE"],
		["TOPIC", "pipeline.analytics", "READ"],
		["TOPIC", "pipeline.validated", "READ"],
		["GROUP", "pipeline-processor", "READ"],
		["GROUP", "storage-lake", "READ"], # prefix is "pipeline-storage-"
		["GROUP", "pipeline-storage", "READ"],
		["TRANSACTIONAL_ID", "pipeline-storagex-0", "WRITE"],
		["GROUP", "pipeline-storage-lake", "DELETE"],
		["TRANSACTIONAL_ID", "pipeline-processor-0", "WRITE"],
	])
}

# --- operator CLI ----------------------------------------------------------

test_operator_allowed if {
	allowed_all(operator, [
		["TOPIC", "pipeline.raw.web", "READ"],
		["TOPIC", "pipeline.dlq", "READ"],
		["TOPIC", "pipeline.analytics", "DESCRIBE"],
		["TOPIC", "pipeline.processed", "DESCRIBE_CONFIGS"],
		["TOPIC", "pipeline.raw.web", "WRITE"],
		["TOPIC", "pipeline.raw.backend", "WRITE"], # replay to the original source's topic
		["TOPIC", "pipeline.audit", "WRITE"],
		["TOPIC", "pipeline.audit", "READ"],
		["GROUP", "pipeline-ingester", "DESCRIBE"],
		["GROUP", "pipeline-storage-lake", "DESCRIBE"],
		["GROUP", "pipectl-inspect-1", "READ"],
		["CLUSTER", "kafka-cluster", "DESCRIBE"],
		["CLUSTER", "kafka-cluster", "DESCRIBE_CONFIGS"],
		["CLUSTER", "kafka-cluster", "IDEMPOTENT_WRITE"],
	])
}

test_operator_denied if {
	denied_all(operator, [
		["TOPIC", "pipeline.dlq", "WRITE"],
		["TOPIC", "pipeline.raw", "WRITE"],
		["TOPIC", "pipeline.audit.x", "WRITE"],
		["TOPIC", "pipeline.validated", "WRITE"],
		["TOPIC", "pipeline.raw.web", "DELETE"],
		["TOPIC", "pipeline.raw.web", "ALTER_CONFIGS"],
		["TOPIC", "other.topic", "READ"],
		["TOPIC", "__consumer_offsets", "READ"],
		["GROUP", "pipeline-ingester", "READ"], # may look at, not join, service groups
		["GROUP", "pipeline-ingester", "DELETE"],
		["CLUSTER", "kafka-cluster", "ALTER_CONFIGS"],
		["CLUSTER", "kafka-cluster", "CREATE"],
		["TRANSACTIONAL_ID", "pipeline-ingester-0", "WRITE"],
	])
}

# --- lag exporter: reads offsets and one record per lagging partition ------

test_lag_exporter_allowed if {
	allowed_all(lag_exporter, [
		["TOPIC", "pipeline.raw.web", "READ"],
		["TOPIC", "pipeline.processed", "READ"],
		["TOPIC", "pipeline.processed", "DESCRIBE"],
		["GROUP", "pipeline-ingester", "DESCRIBE"],
		["GROUP", "pipeline-storage-lake", "DESCRIBE"],
	])
}

test_lag_exporter_denied if {
	denied_all(lag_exporter, [
		["TOPIC", "pipeline.raw.web", "WRITE"],
		["TOPIC", "pipeline.dlq", "WRITE"],
		["TOPIC", "other.topic", "READ"],
		["GROUP", "pipeline-ingester", "READ"], # never joins or commits for a service's group
		["GROUP", "pipectl-status", "DESCRIBE"],
		["CLUSTER", "kafka-cluster", "IDEMPOTENT_WRITE"],
		["TRANSACTIONAL_ID", "pipeline-ingester-0", "WRITE"],
	])
}

# --- bootstrap admin -------------------------------------------------------

test_bootstrap_allowed if {
	allowed_all(bootstrap, [
		["CLUSTER", "kafka-cluster", "CREATE"],
		["CLUSTER", "kafka-cluster", "ALTER_CONFIGS"],
		["CLUSTER", "kafka-cluster", "DESCRIBE_CONFIGS"],
		["CLUSTER", "kafka-cluster", "DESCRIBE"],
		["TOPIC", "pipeline.raw.web", "CREATE"],
		["TOPIC", "pipeline.raw.web", "ALTER"],
		["TOPIC", "pipeline.raw.web", "DESCRIBE"], # implied by ALTER
		["TOPIC", "pipeline.analytics", "ALTER_CONFIGS"],
		["TOPIC", "pipeline.analytics", "DESCRIBE_CONFIGS"],
	])
}

test_bootstrap_denied if {
	denied_all(bootstrap, [
		["TOPIC", "pipeline.raw.web", "READ"],
		["TOPIC", "pipeline.raw.web", "WRITE"],
		["TOPIC", "pipeline.raw.web", "DELETE"],
		["TOPIC", "other.topic", "CREATE"],
		["GROUP", "pipeline-ingester", "READ"],
		["CLUSTER", "kafka-cluster", "ALTER"],
		["CLUSTER", "kafka-cluster", "CLUSTER_ACTION"],
	])
}

# --- broker ----------------------------------------------------------------

test_broker_allowed_everything if {
	allowed_all(broker, [
		["CLUSTER", "kafka-cluster", "CLUSTER_ACTION"],
		["CLUSTER", "kafka-cluster", "ALTER"],
		["TOPIC", "__consumer_offsets", "WRITE"],
		["TOPIC", "any.topic", "DELETE"],
		["GROUP", "any-group", "READ"],
		["TRANSACTIONAL_ID", "any-tx", "WRITE"],
		["DELEGATION_TOKEN", "token", "DESCRIBE"],
		["USER", "someone", "CREATE_TOKENS"],
	])
	decide_by_type(broker, "TOPIC", "ALTER") == true
}

test_broker_glob_is_exact if {
	decide("spiffe://pipeline.local/broker/kafka2", "TOPIC", "pipeline.raw.web", "READ") == false
	decide("spiffe://pipeline.local/broker/kafka/x", "TOPIC", "pipeline.raw.web", "READ") == false
}

# --- implications ----------------------------------------------------------

test_implications_only_describe if {
	# READ/WRITE/ALTER imply DESCRIBE, ALTER_CONFIGS implies DESCRIBE_CONFIGS ...
	decide(ingester, "TOPIC", "pipeline.raw.web", "DESCRIBE") == true
	decide(web, "TOPIC", "pipeline.raw.web", "DESCRIBE") == true
	decide(bootstrap, "TOPIC", "pipeline.x", "DESCRIBE") == true
	decide(bootstrap, "CLUSTER", "kafka-cluster", "DESCRIBE_CONFIGS") == true

	# ... but nothing else: not DESCRIBE_CONFIGS from WRITE, not the reverse.
	decide(web, "TOPIC", "pipeline.raw.web", "DESCRIBE_CONFIGS") == false
	decide(operator, "GROUP", "pipeline-ingester", "READ") == false
	decide(operator, "CLUSTER", "kafka-cluster", "ALTER_CONFIGS") == false
}

test_implications_from_minimal_grants if {
	roles := {"minimal": {
		"principals": ["spiffe://pipeline.local/test/minimal"],
		"grants": [
			{"resource": "TOPIC", "name": "deletable", "operations": ["DELETE"]},
			{"resource": "TOPIC", "name": "tunable", "operations": ["ALTER_CONFIGS"]},
		],
	}}
	every c in [
		["deletable", "DESCRIBE", true],
		["deletable", "DESCRIBE_CONFIGS", false],
		["tunable", "DESCRIBE_CONFIGS", true],
		["tunable", "DESCRIBE", false],
		["tunable", "ALTER", false],
	] {
		d := authz.allow with input as request("User", "spiffe://pipeline.local/test/minimal", "TOPIC", c[0], "LITERAL", c[1])
			with data.kafka_acl.roles as roles
		d == c[2]
	}
}

# --- authorizeByResourceType (PREFIXED "") ---------------------------------

test_by_resource_type if {
	decide_by_type(web, "TOPIC", "WRITE") == true
	decide_by_type(web, "TOPIC", "DESCRIBE") == true
	decide_by_type(web, "CLUSTER", "IDEMPOTENT_WRITE") == true
	decide_by_type(web, "TOPIC", "READ") == false
	decide_by_type(web, "GROUP", "READ") == false
	decide_by_type(web, "TRANSACTIONAL_ID", "WRITE") == false

	decide_by_type(ingester, "TRANSACTIONAL_ID", "WRITE") == true
	decide_by_type(storage, "GROUP", "READ") == true
	decide_by_type(operator, "GROUP", "DESCRIBE") == true
	decide_by_type(operator, "GROUP", "DELETE") == false
	decide_by_type(bootstrap, "TOPIC", "CREATE") == true
	decide_by_type(bootstrap, "TOPIC", "WRITE") == false

	decide_by_type("spiffe://pipeline.local/unknown/x", "TOPIC", "WRITE") == false
	decide_by_type("spiffe://evil.example/source/web", "TOPIC", "WRITE") == false
}

test_prefixed_with_a_name_is_not_a_by_type_question if {
	d := authz.allow with input as request("User", web, "TOPIC", "pipeline.", "PREFIXED", "WRITE")
	d == false
}

test_unknown_pattern_type_denied if {
	d := authz.allow with input as request("User", broker, "TOPIC", "pipeline.raw.web", "MATCH", "READ")
	d == false
}

# --- principals ------------------------------------------------------------

test_non_spiffe_principal_denied if {
	decide("CN=web,OU=source", "TOPIC", "pipeline.raw.web", "WRITE") == false
	decide("ANONYMOUS", "TOPIC", "pipeline.raw.web", "WRITE") == false
	decide("source/web", "TOPIC", "pipeline.raw.web", "WRITE") == false
}

test_other_trust_domain_denied if {
	decide("spiffe://evil.example/source/web", "TOPIC", "pipeline.raw.web", "WRITE") == false
	decide("spiffe://evil.example/broker/kafka", "CLUSTER", "kafka-cluster", "CLUSTER_ACTION") == false

	# look-alike trust domains
	decide("spiffe://pipeline.local.evil.example/source/web", "TOPIC", "pipeline.raw.web", "WRITE") == false
	decide("spiffe://pipeline.localx/source/web", "TOPIC", "pipeline.raw.web", "WRITE") == false
}

test_non_user_principal_type_denied if {
	d1 := authz.allow with input as request("Group", web, "TOPIC", "pipeline.raw.web", "LITERAL", "WRITE")
	d1 == false
	d2 := authz.allow with input as request("Group", broker, "TOPIC", "pipeline.raw.web", "LITERAL", "READ")
	d2 == false
	d3 := authz.allow with input as request("user", web, "TOPIC", "pipeline.raw.web", "LITERAL", "WRITE")
	d3 == false
}

test_unknown_principal_denied if {
	decide("spiffe://pipeline.local/source2/web", "TOPIC", "pipeline.raw.web", "WRITE") == false
	decide("spiffe://pipeline.local/service/unknown", "TOPIC", "pipeline.raw.web", "READ") == false
	decide("spiffe://pipeline.local/service/unknown", "CLUSTER", "kafka-cluster", "IDEMPOTENT_WRITE") == false
}

test_missing_input_is_false_not_undefined if {
	d1 := authz.allow with input as {}
	d1 == false
	d2 := authz.allow
	d2 == false
}

# --- data-driven: runtime role changes -------------------------------------

test_added_role_flips_decision if {
	decide(web, "TOPIC", "pipeline.validated", "READ") == false

	roles := object.union(data.kafka_acl.roles, {"web-reader": {
		"principals": [web],
		"grants": [{"resource": "TOPIC", "name": "pipeline.validated", "operations": ["READ"]}],
	}})
	d := authz.allow with input as request("User", web, "TOPIC", "pipeline.validated", "LITERAL", "READ")
		with data.kafka_acl.roles as roles
	d == true

	# the original grants still hold alongside the new role
	d2 := authz.allow with input as request("User", web, "TOPIC", "pipeline.raw.web", "LITERAL", "WRITE")
		with data.kafka_acl.roles as roles
	d2 == true
}

test_revoked_role_flips_decision if {
	decide(ingester, "TOPIC", "pipeline.raw.web", "READ") == true
	d := authz.allow with input as request("User", ingester, "TOPIC", "pipeline.raw.web", "LITERAL", "READ")
		with data.kafka_acl.roles as object.remove(data.kafka_acl.roles, ["ingester"])
	d == false
}

test_grant_with_both_name_and_prefix_matches_nothing if {
	roles := {"bad": {
		"principals": [web],
		"grants": [{"resource": "TOPIC", "name": "x", "prefix": "", "operations": ["READ"]}],
	}}
	d1 := authz.allow with input as request("User", web, "TOPIC", "x", "LITERAL", "READ")
		with data.kafka_acl.roles as roles
	d1 == false
	d2 := authz.allow with input as request("User", web, "TOPIC", "y", "LITERAL", "READ")
		with data.kafka_acl.roles as roles
	d2 == false
}

test_role_pattern_outside_trust_domain_matches_nothing if {
	roles := {"evil": {
		"principals": ["spiffe://evil.example/*", "*"],
		"grants": [{"resource": "*", "prefix": "", "operations": ["*"]}],
	}}
	d := authz.allow with input as request("User", "spiffe://evil.example/x", "TOPIC", "t", "LITERAL", "READ")
		with data.kafka_acl.roles as roles
	d == false
}
