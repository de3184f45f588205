# Processor business rules: which validated records are kept.
#
# The processor POSTs one whole batch to /v1/data/pipeline/process/decisions:
#   {"input": {"records": [{"event_id", "event_type", "source", "user_id", "user_is_test"}, ...]}}
# and gets back an array with one {"keep": bool, "reason": string} per record,
# in the same order (an empty batch gives []). reason is "" when kept,
# otherwise the FIRST of these that applies:
#   "test_user"    user_is_test is true and drop_test_users is true
#   "skipped_type" event_type is in skip_event_types
#   "sampled_out"  the record's event_type has a sample rate and the record
#                  falls outside it (see below)
# If input.records is not an array there is no result at all.
#
# The rules are data: data.pipeline.config.process (opa/pipeline/data.json),
#   {"drop_test_users": bool, "skip_event_types": [type, ...],
#    "sample_rates": {type: keep fraction in [0, 1], ...}}
# and can be changed at runtime with PUT /v1/data/pipeline/config/process/<key>.
#
# Sampling is deterministic per event_id, so a replay after a crash decides the
# same way. THE RULE (Python may reproduce it; keep the two in step):
#
#   rate = sample_rates.get(event_type)      # absent or not a number: keep
#   if rate >= 1: keep
#   elif rate <= 0: drop
#   else: keep iff int(hashlib.md5(event_id.encode("utf-8")).hexdigest()[:8], 16) / 16**8 < rate
#
# i.e. the first 8 hex digits of the MD5 of the UTF-8 event_id, read as an
# unsigned 32-bit integer v, and keep iff v / 2^32 < rate (strictly less). For
# 0 < rate < 1 a record without a string event_id cannot be sampled
# deterministically and is "sampled_out". The Python float expression above
# gives exactly the same answers for every rate with at most 9 decimal places
# (and every k / 2^32): float rounding cannot move rate * 2^32 across an integer.
#
# How it is evaluated (same rule, cheaper per record): v < rate * 2^32 holds iff
# v < ceil(rate * 2^32) =: limit, because v is an integer; when limit < 2^32 that
# is the same as comparing the 8-hex-digit strings hex(v) < "%08x" % limit, since
# md5 hex is lowercase and fixed-width strings compare like the numbers they
# spell. So each sampled type gets a threshold string once per query (see
# sample_thresholds) and each record costs one md5 and one string comparison.
package pipeline.process

decisions := [decision(record) | some record in input.records] if is_array(input.records)

config := data.pipeline.config.process

# Built once per query, so each record costs one hash lookup.
skip_types := {event_type | some event_type in config.skip_event_types}

# decision is total, so the result has exactly one entry per record.
decision(record) := drop("test_user") if {
	config.drop_test_users == true
	record.user_is_test == true
} else := drop("skipped_type") if {
	record.event_type in skip_types
} else := drop("sampled_out") if {
	sampled_out(record)
} else := {"keep": true, "reason": ""}

drop(reason) := {"keep": false, "reason": reason}

sampled_out(record) if {
	threshold := sample_thresholds[record.event_type]
	not sampled_in(record, threshold)
}

# Takes the whole record (not record.event_id) so that a missing event_id makes
# sampled_in undefined, hence "not sampled_in" true (sampled out), rather than
# making the caller's body undefined.
sampled_in(record, threshold) if {
	is_string(record.event_id)
	substring(crypto.md5(record.event_id), 0, 8) < threshold
}

# event_type -> threshold string, for every type with a numeric rate that does
# not keep everything (limit >= 2^32, i.e. rate > 1 - 2^-32, keeps every v and
# gets no entry; a non-numeric rate is ignored, i.e. keeps everything).
sample_thresholds := {event_type: threshold |
	some event_type, rate in config.sample_rates
	is_number(rate)
	limit := ceil(rate * 4294967296) # 16^8 = 2^32
	limit < 4294967296
	threshold := hex8(limit)
}

# rate <= 0: no 8-hex-digit string sorts before "", so every record is dropped.
hex8(limit) := "" if limit <= 0

else := sprintf("%08x", [limit])
