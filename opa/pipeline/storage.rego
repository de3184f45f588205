# Storage routing: which sinks may receive a record, and which of its properties
# must be removed before it is indexed for search.
#
# The storage service POSTs one whole batch to /v1/data/pipeline/storage/decisions:
#   {"input": {"records": [{"id", "type", "source", "property_keys": [key, ...]}, ...]}}
# and gets back an array with one entry per record, in the same order (an empty
# batch gives []):
#   {"sinks": [sink, ...],                 allowed sinks, sorted
#    "redact_for_search": [key, ...]}      property_keys ∩ sensitive_properties, sorted
# If input.records is not an array there is no result at all.
#
# Both lists are data: data.pipeline.config.storage (opa/pipeline/data.json),
#   {"sinks": [sink, ...], "sensitive_properties": [key, ...]}
# changeable at runtime with PUT /v1/data/pipeline/config/storage/<key>. Out of
# the box every record may go to every sink.
package pipeline.storage

decisions := [decision(record) | some record in input.records] if is_array(input.records)

config := data.pipeline.config.storage

# Built once per query, so each record costs one hash lookup per property key.
all_sinks := sort({sink | some sink in config.sinks})

sensitive := {key | some key in config.sensitive_properties}

# decision is total (a record without an array of property_keys has nothing to
# redact), so the result has exactly one entry per record.
decision(record) := {
	"sinks": all_sinks,
	"redact_for_search": sort({key |
		is_array(record.property_keys)
		some key in record.property_keys
		key in sensitive
	}),
}
