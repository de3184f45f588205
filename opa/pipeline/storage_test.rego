package pipeline.storage_test

import data.pipeline.storage

all_sinks := ["analytics", "lake", "postgres", "search"]

rec(id, keys) := {"id": id, "type": "click", "source": "web", "property_keys": keys}

decide(records) := decisions if {
	decisions := storage.decisions with input as {"records": records}
}

test_shipped_data if {
	data.pipeline.config.storage == {
		"sinks": ["analytics", "lake", "postgres", "search"],
		"sensitive_properties": ["email", "phone", "ip_address", "credit_card", "ssn"],
	}
}

test_every_record_goes_everywhere if {
	decide([rec("e1", ["page"])]) == [{"sinks": all_sinks, "redact_for_search": []}]
}

test_redaction_is_sorted_intersection if {
	decide([rec("e1", ["page", "ssn", "email", "referrer", "ip_address", "phone", "credit_card"])]) == [{
		"sinks": all_sinks,
		"redact_for_search": ["credit_card", "email", "ip_address", "phone", "ssn"],
	}]
}

test_redaction_dedupes_and_is_exact if {
	decide([rec("e1", ["email", "email", "Email", "email_verified"])]) == [{"sinks": all_sinks, "redact_for_search": ["email"]}]
}

test_order_preserved if {
	decide([rec("e1", ["email"]), rec("e2", []), rec("e3", ["phone", "page"])]) == [
		{"sinks": all_sinks, "redact_for_search": ["email"]},
		{"sinks": all_sinks, "redact_for_search": []},
		{"sinks": all_sinks, "redact_for_search": ["phone"]},
	]
}

test_empty_batch if {
	decide([]) == []
}

test_no_records_array_no_result if {
	not storage.decisions with input as {}
}

test_missing_or_malformed_property_keys if {
	nothing := {"sinks": all_sinks, "redact_for_search": []}
	decide([{"id": "e1"}, rec("e2", "email"), rec("e3", {"a": "email"}), "junk", null]) == [nothing, nothing, nothing, nothing, nothing]
}

test_sensitive_list_is_data if {
	decide([rec("e1", ["user_agent", "email"])]) == [{"sinks": all_sinks, "redact_for_search": ["user_agent"]}] with data.pipeline.config.storage.sensitive_properties as ["user_agent"]
}

test_sinks_are_data_and_sorted if {
	decide([rec("e1", [])]) == [{"sinks": ["lake", "search"], "redact_for_search": []}] with data.pipeline.config.storage.sinks as ["search", "lake", "search"]
}
