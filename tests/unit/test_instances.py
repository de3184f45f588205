"""Several instances of each service side by side: their names, instance ids, ports and
counts (deploy/local/stack.py), and the URLs pipectl status probes for them."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.local.processes import StackError
from deploy.local.stack import (
    DEFAULT_PORTS,
    MAX_INSTANCES,
    Stack,
    instance_counts,
    instance_names,
    instance_ports,
    local_instance_id,
)
from services.cli.status.config import StatusSettings
from services.cli.status.rates import ServiceRates, StageRate
from services.cli.status.render import render
from services.common.topology import instance_id, instance_name
from tests.unit.test_cli_status import report, settings_for


def test_the_first_instance_keeps_the_service_name_and_the_others_are_numbered() -> None:
    assert [instance_name("ingester", n) for n in (1, 2, 3)] == ["ingester", "ingester-2", "ingester-3"]
    assert instance_names({"ingester": 2, "storage": 3}) == [
        "ingester", "ingester-2", "processor", "storage", "storage-2", "storage-3",
    ]  # fmt: skip


def test_instance_ids_are_unique_per_instance_and_the_first_is_unchanged() -> None:
    ids = [local_instance_id(n) for n in range(1, MAX_INSTANCES + 1)]
    assert ids[0] == "local"  # the transactional ids of a one-instance stack stay what they were
    assert len(set(ids)) == len(ids)
    # Transactional id and static member id of each: distinct, and the same at every call
    # (a restarted instance must present the same ones).
    assert instance_id("processor", local_instance_id(2)) == "pipeline-processor-local-2"
    assert len({instance_id("storage-lake", i) for i in ids}) == len(ids)


def test_counts_default_to_what_runs_else_one_and_are_read_per_service() -> None:
    assert instance_counts({}) == {"ingester": 1, "processor": 1, "storage": 1}
    assert instance_counts({"PIPELINE_INGESTER_INSTANCES": "1"}, {"ingester": 3, "storage": 2}) == {
        "ingester": 1, "processor": 1, "storage": 2,
    }  # fmt: skip
    env = {
        "PIPELINE_INGESTER_INSTANCES": "2",
        "PIPELINE_STORAGE_INSTANCES": " 3 ",
        "PIPELINE_PROCESSOR_INSTANCES": "",
    }
    assert instance_counts(env) == {"ingester": 2, "processor": 1, "storage": 3}


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", str(MAX_INSTANCES + 1)])
def test_a_bad_count_is_refused_naming_the_variable(value: str) -> None:
    with pytest.raises(StackError, match="PIPELINE_PROCESSOR_INSTANCES"):
        instance_counts({"PIPELINE_PROCESSOR_INSTANCES": value})


def test_further_instances_get_ports_next_to_the_first_unless_named() -> None:
    ports = instance_ports(DEFAULT_PORTS, {"ingester": 2, "processor": 1, "storage": MAX_INSTANCES})
    assert ports["ingester-2"] == 18091 and "processor-2" not in ports
    assert ports[f"storage-{MAX_INSTANCES}"] < DEFAULT_PORTS["opa"]
    assert len(set(ports.values())) == len(ports)  # no two components on one port
    assert instance_ports({**DEFAULT_PORTS, "ingester-2": 40000}, {"ingester": 2})["ingester-2"] == 40000


def test_a_stack_knows_every_instance_and_writes_one_url_per_instance(tmp_path: Path) -> None:
    stack = Stack(
        tmp_path, ports=dict(DEFAULT_PORTS), instances={"ingester": 2, "processor": 1, "storage": 2}
    )
    assert list(stack.instances) == ["ingester", "ingester-2", "processor", "storage", "storage-2"]
    assert stack.services == {n: stack.instances[n] for n in ("ingester", "processor", "storage")}
    second = stack.instances["storage-2"]
    assert (second.service, second.instance_id, second.port) == ("storage", "local-2", 18093)
    assert second.process.pid_file == tmp_path / "run" / "storage-2.pid"
    env = stack.env()
    assert env["PIPELINE_INGESTER_URL"] == "http://127.0.0.1:18081,http://127.0.0.1:18091"
    assert env["PIPELINE_PROCESSOR_URL"] == "http://127.0.0.1:18082"
    # The ports are kept in stack.json: the same at the next `up`, whatever the defaults.
    again = Stack(tmp_path, ports={"opa": 1}, instances={"ingester": 2, "processor": 1, "storage": 2})
    assert again.instances["storage-2"].port == 18093


def test_a_stack_in_another_shell_finds_the_instances_the_last_up_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for service in ("INGESTER", "PROCESSOR", "STORAGE"):
        monkeypatch.delenv(f"PIPELINE_{service}_INSTANCES", raising=False)
    stack = Stack(tmp_path, ports=dict(DEFAULT_PORTS), instances={"processor": 2})
    stack.record_instances()  # as `up` does
    assert list(Stack(tmp_path).instances) == ["ingester", "processor", "processor-2", "storage"]
    monkeypatch.setenv("PIPELINE_PROCESSOR_INSTANCES", "1")  # scale in at the next `up`
    assert list(Stack(tmp_path).instances) == ["ingester", "processor", "storage"]


def test_status_probes_every_instance_of_a_url_list(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, 9).model_copy(
        update={"ingester_url": "http://a:1/, http://b:2", "storage_url": "http://c:3"}
    )
    assert settings.instance_urls() == {
        "ingester": "http://a:1",
        "ingester-2": "http://b:2",
        "processor": "http://127.0.0.1:9",
        "storage": "http://c:3",
    }
    assert settings.service_url("ingester-2") == "http://b:2"


@pytest.mark.parametrize("value", ["http://a:1,", "http://a:1,b:2", "a:1"])
def test_status_refuses_a_url_list_with_a_bad_entry(value: str, tmp_path: Path) -> None:
    fields = settings_for(tmp_path, 9).model_dump()
    fields["ingester_url"] = value
    with pytest.raises(ValueError, match="ingester_url"):
        StatusSettings.model_validate(fields)


def test_rates_of_a_further_instance_name_it() -> None:
    rate = StageRate("processor", 10, 10, 5.0, 5.0, {})
    text = render(
        report(rates=[ServiceRates("processor", 2.0, [rate]), ServiceRates("processor-2", 2.0, [rate])])
    )
    assert "  processor " in text and "  processor (processor-2) " in text
