# Kafka broker authorization for the pipeline.
#
# The broker's authorizer (org.openpolicyagent.kafka:opa-authorizer) POSTs every
# decision to /v1/data/kafka/authz/allow and reads `result` as a boolean, so
# `allow` is deny-by-default and always defined.
#
# The policy is generic; who may do what is data: data.kafka_acl.roles
# (opa/data.json). Roles are an object keyed by role name so a single role can be
# added, replaced or revoked at runtime with PUT/DELETE
# /v1/data/kafka_acl/roles/<name>, without restarting OPA or Kafka.
#
# A role is {"principals": [glob, ...], "grants": [grant, ...]}; a grant is
# {"resource": TYPE or "*", "operations": [OP or "*", ...]} plus exactly one of
# "name" (exact resource name) or "prefix" (resource name starts with it).
# A name may contain {principal_name}: the last segment of the caller's SPIFFE ID, so
# one grant gives every source its own topic ("pipeline.raw.{principal_name}" is
# pipeline.raw.web for spiffe://pipeline.local/source/web and nothing else).
package kafka.authz

import rego.v1

default allow := false

# An ordinary question about one concrete resource. The plugin only ever sends
# LITERAL patterns for these (it rejects anything else before asking).
allow if {
	input.action.resourcePattern.patternType == "LITERAL"
	some grant in grants
	grant_covers_type(grant, input.action.resourcePattern.resourceType)
	grant_covers_name(grant, input.action.resourcePattern.name)
	grant_covers_operation(grant, input.action.operation)
}

# Authorizer.authorizeByResourceType: "may this principal do OP on ANY resource
# of this type?". Kafka asks it, for example, when an idempotent producer that
# lacks cluster IDEMPOTENT_WRITE calls InitProducerId (WRITE on any topic then
# suffices). The plugin encodes the question as the pattern PREFIXED "", which a
# literal name match would never satisfy, so it is answered here from the grants'
# resource types and operations alone.
allow if {
	input.action.resourcePattern.patternType == "PREFIXED"
	input.action.resourcePattern.name == ""
	some grant in grants
	grant_usable(grant)
	grant_covers_type(grant, input.action.resourcePattern.resourceType)
	grant_covers_operation(grant, input.action.operation)
}

# The caller, if it is a well-formed SPIFFE ID of our trust domain. The broker's
# SpiffePrincipalBuilder makes the principal the client certificate's SPIFFE ID.
# Anything else (ANONYMOUS, a certificate DN, another trust domain, a look-alike
# such as spiffe://pipeline.local.evil/..., a non-User principal type) has no
# principal here and therefore no grants. Requiring non-empty segments also
# stops ".../source/" from matching the glob ".../source/*".
principal := name if {
	input.requestContext.principal.principalType == "User"
	name := input.requestContext.principal.name
	regex.match(`^spiffe://pipeline\.local(/[A-Za-z0-9._-]+)+$`, name)
}

# Every grant of every role whose principal globs match the caller. With "/" as
# the delimiter, "*" matches exactly one path segment: source/* covers
# source/web but not source/web/x.
grants contains grant if {
	some role in data.kafka_acl.roles
	some pattern in role.principals
	glob.match(pattern, ["/"], principal)
	some grant in role.grants
}

grant_covers_type(grant, type) if grant.resource in {type, "*"}

# The caller's own name for {principal_name}: its SPIFFE ID's last segment, only when
# that is a plain lowercase name (the source names of services/common/topics.py).
# Anything else (dots, upper case) leaves it undefined, so a grant using the
# placeholder matches nothing for that caller instead of an unexpected topic.
principal_name := name if {
	name := regex.find_n(`[^/]+$`, principal, 1)[0]
	regex.match(`^[a-z0-9][a-z0-9_-]{0,62}$`, name)
}

placeholder := "{principal_name}"

# A grant's name with the placeholder filled in; undefined when it cannot be.
# Only names are expanded: an unexpanded "{" can never equal or prefix a real
# Kafka resource name, so a placeholder in a prefix simply matches nothing.
grant_name(grant) := grant.name if not contains(grant.name, placeholder)

grant_name(grant) := replace(grant.name, placeholder, principal_name) if contains(grant.name, placeholder)

# Whether a grant can match any resource of this caller: a placeholder it cannot fill
# must not count for the by-type question either.
grant_usable(grant) if not "name" in object.keys(grant)

grant_usable(grant) if is_string(grant_name(grant))

# A grant carrying both "name" and "prefix" (or neither) is malformed and
# matches nothing, rather than silently meaning the wider of the two.
grant_covers_name(grant, name) if {
	not "prefix" in object.keys(grant)
	grant_name(grant) == name
}

grant_covers_name(grant, name) if {
	not "name" in object.keys(grant)
	startswith(name, grant.prefix)
}

# Kafka's own ACL semantics (AclAuthorizer/StandardAuthorizer): READ, WRITE,
# DELETE or ALTER on a resource imply DESCRIBE on it, and ALTER_CONFIGS implies
# DESCRIBE_CONFIGS. Clients depend on it (a producer fetches topic metadata,
# i.e. DESCRIBE, before it WRITEs), and honoring it here keeps the data to the
# operations a role actually needs. Nothing else is implied.
implied_by := {
	"DESCRIBE": {"READ", "WRITE", "DELETE", "ALTER"},
	"DESCRIBE_CONFIGS": {"ALTER_CONFIGS"},
}

grant_covers_operation(grant, _) if "*" in grant.operations

grant_covers_operation(grant, op) if op in grant.operations

grant_covers_operation(grant, op) if {
	some granted in grant.operations
	granted in implied_by[op]
}
