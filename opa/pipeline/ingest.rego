# Ingest admission: may this source emit this event type?
#
# The ingester POSTs one whole batch to /v1/data/pipeline/ingest/decisions:
#   {"input": {"records": [{"event_id", "event_type", "source", "user_id"}, ...]}}
# and gets back an array with one {"allow": bool, "reason": string} per record,
# in the same order (an empty batch gives []). reason is "" when allowed,
# otherwise exactly one of:
#   record lacks source or event_type               (missing, or not a non-empty string)
#   unknown source "tv"
#   source "web" may not emit event type "refund"
# Anything not explicitly allowed is denied. If input.records is not an array
# there is no result at all (the caller must treat that as an error).
#
# Who may emit what is data: data.pipeline.config.ingest.sources (loaded from
# opa/pipeline/data.json), an object keyed by source name, each
# {"event_types": [type, ...]}. A source can be added, replaced or removed at
# runtime with PUT/DELETE /v1/data/pipeline/config/ingest/sources/<name>.
#
# Cost is linear in the batch: the data is turned into sets once per query and
# each record costs a constant number of hash lookups.
package pipeline.ingest

decisions := [decision(record) | some record in input.records] if is_array(input.records)

# source name -> set of event types it may emit. A complete object (not a
# partial "allowed_types[source] := ..." rule, which OPA may re-evaluate on
# every lookup), so it is built once per query.
allowed_types := {source: {event_type | some event_type in spec.event_types} |
	some source, spec in data.pipeline.config.ingest.sources
}

# decision is total (defined for every value, including non-objects), so the
# result always has exactly one entry per record.
decision(record) := deny("record lacks source or event_type") if {
	not has_fields(record)
} else := deny(sprintf("unknown source %q", [record.source])) if {
	not allowed_types[record.source]
} else := deny(sprintf("source %q may not emit event type %q", [record.source, record.event_type])) if {
	not record.event_type in allowed_types[record.source]
} else := {"allow": true, "reason": ""}

deny(reason) := {"allow": false, "reason": reason}

has_fields(record) if {
	non_empty_string(record.source)
	non_empty_string(record.event_type)
}

non_empty_string(x) if {
	is_string(x)
	x != ""
}
