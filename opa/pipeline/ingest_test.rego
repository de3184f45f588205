package pipeline.ingest_test

import data.pipeline.ingest

allowed := {"allow": true, "reason": ""}

rec(source, event_type) := {"event_id": "e1", "event_type": event_type, "source": source, "user_id": "u00001"}

decide(records) := decisions if {
	decisions := ingest.decisions with input as {"records": records}
}

test_shipped_data_matches_the_contract if {
	sources := data.pipeline.config.ingest.sources
	object.keys(sources) == {"web", "mobile", "backend"}
	{t | some t in sources.web.event_types} == common_types | {
		"click", "search", "signup", "login",
		"logout", "add_to_cart", "heartbeat", "debug",
	}
	{t | some t in sources.mobile.event_types} == common_types | {
		"app_open", "screen_view", "click", "login", "logout",
		"add_to_cart", "push_open", "heartbeat", "debug",
	}
	{t | some t in sources.backend.event_types} == common_types | {
		"signup", "refund", "subscription_started",
		"subscription_cancelled", "payment_failed", "heartbeat", "debug",
	}
}

# What a new user sends first, whatever the source: every source may emit these.
common_types := {"user_signup", "user_login", "user_logout", "page_view", "purchase"}

test_common_types_allowed_for_every_source if {
	records := [rec(source, event_type) | some source in ["web", "mobile", "backend"]; some event_type in common_types]
	count(records) == 15
	decide(records) == [allowed | some _ in records]
}

# The reference event of the README (its fields as the ingester sends them to the policy).
test_reference_event_allowed if {
	decide([{"event_id": "evt-001", "event_type": "user_signup", "source": "web", "user_id": "user-123"}]) == [allowed]
}

test_allowed_for_each_source if {
	decide([
		rec("web", "page_view"),
		rec("web", "debug"),
		rec("mobile", "app_open"),
		rec("mobile", "push_open"),
		rec("backend", "refund"),
		rec("backend", "payment_failed"),
	]) == [allowed, allowed, allowed, allowed, allowed, allowed]
}

test_unknown_source if {
	decide([rec("tv", "page_view")]) == [{"allow": false, "reason": `unknown source "tv"`}]
}

test_type_not_allowed_for_source if {
	decide([rec("web", "refund"), rec("mobile", "signup"), rec("backend", "click")]) == [
		{"allow": false, "reason": `source "web" may not emit event type "refund"`},
		{"allow": false, "reason": `source "mobile" may not emit event type "signup"`},
		{"allow": false, "reason": `source "backend" may not emit event type "click"`},
	]
}

test_lookups_are_exact_and_case_sensitive if {
	decide([rec("Web", "page_view"), rec("web", "Page_View")]) == [
		{"allow": false, "reason": `unknown source "Web"`},
		{"allow": false, "reason": `source "web" may not emit event type "Page_View"`},
	]
}

test_order_preserved_in_a_mixed_batch if {
	decide([
		rec("web", "refund"),
		rec("web", "click"),
		rec("tv", "click"),
		rec("backend", "refund"),
		{"event_id": "e5"},
		rec("mobile", "click"),
	]) == [
		{"allow": false, "reason": `source "web" may not emit event type "refund"`},
		allowed,
		{"allow": false, "reason": `unknown source "tv"`},
		allowed,
		{"allow": false, "reason": "record lacks source or event_type"},
		allowed,
	]
}

test_empty_batch if {
	decide([]) == []
}

test_no_records_array_no_result if {
	not ingest.decisions with input as {}
	not ingest.decisions with input as {"records": {"0": rec("web", "click")}}
}

test_missing_or_malformed_fields_denied if {
	lacks := {"allow": false, "reason": "record lacks source or event_type"}
	decide([
		{"event_id": "e1", "event_type": "click", "user_id": "u1"},
		{"event_id": "e2", "source": "web", "user_id": "u1"},
		{"event_id": "e3", "event_type": "click", "source": "", "user_id": "u1"},
		{"event_id": "e4", "event_type": null, "source": "web", "user_id": "u1"},
		{"event_id": "e5", "event_type": ["click"], "source": "web", "user_id": "u1"},
		{"event_id": "e6", "event_type": "click", "source": 7, "user_id": "u1"},
		{},
		"web click",
		null,
		42,
	]) == [lacks, lacks, lacks, lacks, lacks, lacks, lacks, lacks, lacks, lacks]
}

test_runtime_data_add_source if {
	decide([rec("tv", "page_view")]) == [{"allow": false, "reason": `unknown source "tv"`}]
	decide([rec("tv", "page_view")]) == [allowed] with data.pipeline.config.ingest.sources.tv as {"event_types": ["page_view"]}
}

test_runtime_data_add_type if {
	web_types := array.concat(data.pipeline.config.ingest.sources.web.event_types, ["refund"])
	decide([rec("web", "refund")]) == [allowed] with data.pipeline.config.ingest.sources.web.event_types as web_types
}

test_runtime_data_remove_source if {
	decide([rec("backend", "refund")]) == [{"allow": false, "reason": `unknown source "backend"`}] with data.pipeline.config.ingest.sources as {
		"web": data.pipeline.config.ingest.sources.web,
		"mobile": data.pipeline.config.ingest.sources.mobile,
	}
}

test_source_without_event_types_allows_nothing if {
	decide([rec("tv", "click")]) == [{"allow": false, "reason": `source "tv" may not emit event type "click"`}] with data.pipeline.config.ingest.sources.tv as {}
}
