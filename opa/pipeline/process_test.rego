package pipeline.process_test

import data.pipeline.process

kept := {"keep": true, "reason": ""}

dropped_test_user := {"keep": false, "reason": "test_user"}

skipped := {"keep": false, "reason": "skipped_type"}

sampled_out := {"keep": false, "reason": "sampled_out"}

rec(event_id, event_type, is_test) := {
	"event_id": event_id,
	"event_type": event_type,
	"source": "web",
	"user_id": "u00001",
	"user_is_test": is_test,
}

decide(records) := decisions if {
	decisions := process.decisions with input as {"records": records}
}

# Ids with known MD5 prefixes (hashlib.md5(id.encode()).hexdigest()[:8]):
#   "e1" -> cd3dc8b6 = 3443378358 -> 0.8017... (out at rate 0.5)
#   "e2" -> 68a9e49b = 1755964571 -> 0.4088... (in at rate 0.5)
#   "e3" -> 7ed21b04 = 2127698692 -> 0.4953... (used for the exact boundary)
test_md5_prefixes_as_python_computes_them if {
	substring(crypto.md5("e1"), 0, 8) == "cd3dc8b6"
	substring(crypto.md5("e2"), 0, 8) == "68a9e49b"
	substring(crypto.md5("e3"), 0, 8) == "7ed21b04"
}

# "%08x" % ceil(rate * 2**32) in Python; rates that keep everything get no
# entry, non-numeric rates are ignored.
test_sample_thresholds if {
	process.sample_thresholds == {
		"a": "",
		"b": "",
		"c": "00000001",
		"d": "5eb851ec",
		"e": "80000000",
		"f": "ffffffff",
	} with data.pipeline.config.process.sample_rates as {
		"a": 0,
		"b": -1,
		"c": 0.0000000001,
		"d": 0.37,
		"e": 0.5,
		"f": 4294967295 / 4294967296,
		"g": 0.99999999999,
		"h": 1,
		"i": 2,
		"j": "0.5",
		"k": null,
	}
}

test_shipped_data if {
	data.pipeline.config.process == {"drop_test_users": true, "skip_event_types": ["heartbeat", "debug"], "sample_rates": {}}
}

test_ordinary_record_kept if {
	decide([rec("e1", "click", false)]) == [kept]
}

test_test_user_dropped if {
	decide([rec("e1", "click", true)]) == [dropped_test_user]
}

test_test_user_kept_when_not_dropping if {
	decide([rec("e1", "click", true)]) == [kept] with data.pipeline.config.process.drop_test_users as false
}

test_only_boolean_true_is_a_test_user if {
	decide([rec("e1", "click", "true"), rec("e2", "click", 1), {"event_id": "e3", "event_type": "click"}]) == [kept, kept, kept]
}

test_skipped_types if {
	decide([rec("e1", "heartbeat", false), rec("e2", "debug", false)]) == [skipped, skipped]
}

test_skip_list_is_data if {
	decide([rec("e1", "heartbeat", false), rec("e2", "click", false)]) == [kept, skipped] with data.pipeline.config.process.skip_event_types as ["click"]
}

test_reason_precedence if {
	decide([rec("e1", "debug", true), rec("e1", "debug", false)]) == [dropped_test_user, skipped] with data.pipeline.config.process.sample_rates as {"debug": 0}
	decide([rec("e1", "click", true)]) == [dropped_test_user] with data.pipeline.config.process.sample_rates as {"click": 0}
}

test_order_preserved if {
	decide([
		rec("e1", "click", false),
		rec("e2", "heartbeat", false),
		rec("e3", "click", true),
		rec("e4", "purchase", false),
		rec("e5", "search", false),
	]) == [kept, skipped, dropped_test_user, sampled_out, kept] with data.pipeline.config.process.sample_rates as {"purchase": 0}
}

test_empty_batch if {
	decide([]) == []
}

test_no_records_array_no_result if {
	not process.decisions with input as {}
}

test_types_without_rate_keep_everything if {
	decide([rec("e1", "click", false), rec("e6", "click", false)]) == [kept, kept] with data.pipeline.config.process.sample_rates as {"search": 0}
}

test_rate_zero_drops_all if {
	ids := ["e1", "e2", "e3", "e4", "e5", "e6", "e7", "e8", "e9", "e10", "x", ""]
	decisions := decide([rec(id, "click", false) | some id in ids]) with data.pipeline.config.process.sample_rates as {"click": 0}
	decisions == [sampled_out | some _ in ids]
}

test_rate_one_keeps_all if {
	ids := ["e1", "e2", "e3", "e4", "e5", "e6", "e7", "e8", "e9", "e10", "x", ""]
	decisions := decide([rec(id, "click", false) | some id in ids]) with data.pipeline.config.process.sample_rates as {"click": 1}
	decisions == [kept | some _ in ids]
}

test_rate_half_splits_on_md5_prefix if {
	decide([rec("e1", "click", false), rec("e2", "click", false)]) == [sampled_out, kept] with data.pipeline.config.process.sample_rates as {"click": 0.5}
}

test_sampling_deterministic_per_event_id if {
	rates := {"click": 0.5}
	first := decide([rec("e1", "click", false), rec("e2", "click", false)]) with data.pipeline.config.process.sample_rates as rates

	# the same ids in another batch, another position, and with other fields
	# changed decide the same way
	second := decide([
		rec("e9", "click", false),
		rec("e2", "click", false),
		{"event_id": "e1", "event_type": "click", "source": "mobile", "user_id": "u99999", "user_is_test": false},
	]) with data.pipeline.config.process.sample_rates as rates
	second[1] == first[1]
	second[2] == first[0]
}

test_rate_boundary_is_strict if {
	# rate exactly equal to e3's value / 2^32: not < rate, so out ...
	exact := 2127698692 / 4294967296
	decide([rec("e3", "click", false)]) == [sampled_out] with data.pipeline.config.process.sample_rates as {"click": exact}

	# ... and the next representable bucket keeps it
	above := 2127698693 / 4294967296
	decide([rec("e3", "click", false)]) == [kept] with data.pipeline.config.process.sample_rates as {"click": above}
}

test_rate_is_per_type if {
	decide([rec("e1", "click", false), rec("e1", "search", false)]) == [sampled_out, kept] with data.pipeline.config.process.sample_rates as {"click": 0.5, "search": 0.9}
}

test_missing_event_id_sampled_out_unless_rate_one if {
	records := [{"event_type": "click", "user_is_test": false}, {"event_id": 17, "event_type": "click"}]
	decide(records) == [sampled_out, sampled_out] with data.pipeline.config.process.sample_rates as {"click": 0.5}
	decide(records) == [kept, kept] with data.pipeline.config.process.sample_rates as {"click": 1}
}

test_non_numeric_rate_ignored if {
	decide([rec("e1", "click", false)]) == [kept] with data.pipeline.config.process.sample_rates as {"click": "0"}
}

test_malformed_records_still_get_a_decision if {
	decide(["junk", null, 3, {}]) == [kept, kept, kept, kept]
}
