"""The compose stack (deploy/compose/), checked statically against the native stack's own
definitions: the Compose Specification's schema, the generated files being current, and no
drift in topics, identities, service settings, health ports, mounted config and pinned
versions. No Docker engine is needed (or used)."""

from __future__ import annotations

import fnmatch
import importlib.resources
import json
import re
import string
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from deploy.compose import generate
from deploy.compose.bootstrap import PLACEHOLDER, SetupSettings
from deploy.local.spire_stack import ENTRIES_FILE
from deploy.local.stack import LAG_EXPORTER_IDENTITY, SERVICES, Stack
from services.cli.status.config import StatusSettings
from services.common.config import KafkaSettings, describe_settings_error
from services.common.identity import spiffe_id_of
from services.common.topology import all_topics
from services.ingester.service import IngesterSettings
from services.lag_exporter.service import LagExporterSettings
from services.processor.service import ProcessorSettings
from services.storage.service import StorageSettings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
# The settings class of each compose service that runs our code (what its env must name).
SETTINGS = {
    "ingester": IngesterSettings,
    "processor": ProcessorSettings,
    "storage": StorageSettings,
    "lag-exporter": LagExporterSettings,
    "pipectl": StatusSettings,
    "setup": SetupSettings,
    "opa-svid": KafkaSettings,
    "elasticsearch-svid": KafkaSettings,
}
# What compose sets differently from the native stack, on purpose:
# - PIPELINE_INSTANCE_ID: left to its default, the container's host name (one per replica);
# - PIPELINE_HTTP_HOST: 0.0.0.0, so Prometheus reaches /metrics over the compose network;
# - PIPELINE_STACK_DIR: the native stack's directory, which compose has no equivalent of;
# - PIPELINE_LAKE_FLUSH_SECONDS: storage's setting, given to storage only.
ONLY_NATIVE = {"PIPELINE_INSTANCE_ID", "PIPELINE_STACK_DIR"}
ONLY_COMPOSE = {"PIPELINE_HTTP_HOST"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    """The native stack's definitions (nothing started: a Stack under a scratch root)."""
    return Stack(root=tmp_path_factory.mktemp("stack"), instances={})


def env_names(settings: type) -> set[str]:
    """The environment variables a pydantic-settings class reads."""
    prefix = settings.model_config.get("env_prefix", "")
    names = set()
    for name, field in settings.model_fields.items():
        if field.validation_alias is not None:
            choices = getattr(field.validation_alias, "choices", [field.validation_alias])
            names |= {str(c).upper() for c in choices}
        elif field.alias is not None:
            names.add(field.alias.upper())
        else:
            names.add(f"{prefix}{name}".upper())
    return names


def required_env_names(settings: type) -> set[str]:
    """The variables a settings class cannot start without (no default)."""
    prefix = settings.model_config.get("env_prefix", "")
    names = set()
    for name, field in settings.model_fields.items():
        if field.is_required():
            alias = field.validation_alias
            names.add(str(alias.choices[0]).upper() if alias is not None else f"{prefix}{name}".upper())
    return names


def environment(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def bind_sources(service: dict) -> dict[str, Path]:
    """target -> the repository path a service bind-mounts there (short syntax, relative)."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str) and volume.startswith("."):
            source, target = volume.split(":")[:2]
            mounts[target] = (COMPOSE_DIR / source).resolve()
    return mounts


# ---- the file itself ------------------------------------------------------------------------


def compose_schema() -> dict:
    # check-jsonschema vendors the Compose Specification's schema: validated offline.
    path = importlib.resources.files("check_jsonschema") / "builtin_schemas/vendor/compose-spec.json"
    return json.loads(path.read_text())


def schema_errors(document: dict) -> list[str]:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_matches_the_compose_specification(compose: dict) -> None:
    assert schema_errors(compose) == []


def test_the_schema_check_catches_a_broken_file(compose: dict) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["kafka"]["depends_on"]["opa"]["condition"] = "when_ready"
    assert schema_errors(broken), "the schema accepted an unknown depends_on condition"


def test_generated_files_are_current() -> None:
    for path, text in generate.outputs().items():
        assert path.read_text() == text, (
            f"{path.relative_to(REPO)} is stale: run python -m deploy.compose.generate"
        )


def test_every_interpolated_variable_is_in_env_example() -> None:
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE_FILE.read_text()))
    example = COMPOSE_DIR / ".env.example"
    documented = {line.split("=")[0] for line in example.read_text().splitlines() if "=" in line}
    assert used - documented == set(), f"set in compose.yaml but missing from {example.name}"
    assert ".env" in (REPO / ".gitignore").read_text().split(), ".env (the secrets) must be git-ignored"


def env_example() -> dict[str, str]:
    lines = (COMPOSE_DIR / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's ${VAR:?message}, as compose.yaml uses it (every use is that form)."""

    def one(match: re.Match) -> str:
        if not variables.get(match.group(1)):
            raise ValueError(f"required variable {match.group(1)} is missing a value: {match.group(2)}")
        return variables[match.group(1)]

    return re.sub(r"\$\{([A-Z0-9_]+):\?([^}]*)\}", one, value)


def test_every_variable_is_required_so_compose_stops_without_it() -> None:
    """Unset or empty, a variable stops `docker compose` before any container starts, with
    compose's message naming it: every use is ${VAR:?...}, none may fall back to empty."""
    text = COMPOSE_FILE.read_text()
    uses = re.findall(r"\$\{[^}]*\}", text)
    assert uses and all(re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", use) for use in uses), (
        f"not all required: {sorted({u for u in uses if ':?' not in u})}"
    )
    with pytest.raises(ValueError, match="PG_STORAGE_PASSWORD"):
        interpolate(text, {**env_example(), "PG_STORAGE_PASSWORD": ""})


def setup_environment(compose: dict, variables: dict[str, str]) -> dict[str, str]:
    return {k: interpolate(v, variables) for k, v in environment(compose["services"]["setup"]).items()}


def test_setup_refuses_every_placeholder_of_env_example(
    compose: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """.env.example copied but not edited: setup stops before contacting anything, naming
    every secret still holding the placeholder; Grafana and the services wait for setup."""
    from deploy.compose import bootstrap

    example = env_example()
    secrets = {k for k in example if k != "KAFKA_CLUSTER_ID"}  # the cluster id is no secret
    assert all(PLACEHOLDER in example[k] for k in secrets), "a secret of .env.example without the placeholder"
    for name, value in setup_environment(compose, example).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(bootstrap, "retry", lambda *a, **k: pytest.fail("setup went on with placeholders"))
    with pytest.raises(SystemExit) as stopped:
        bootstrap.main()
    assert stopped.value.code == 2
    with pytest.raises(ValidationError) as refused:
        SetupSettings()
    named = {str(e["loc"][0]) for e in refused.value.errors()}
    assert named == secrets, f"refused {sorted(named)}, the secrets are {sorted(secrets)}"
    for service in ("grafana", *SERVICES):
        assert (
            compose["services"][service]["depends_on"]["setup"]["condition"]
            == "service_completed_successfully"
        )


@pytest.mark.parametrize("value", ["", "  ", "change-me", "pipeline-CHANGE-ME"])
def test_setup_refuses_an_empty_or_placeholder_secret(
    compose: dict, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    chosen = {k: f"s3cret-{k.lower()}" for k in env_example()}
    for name, given in setup_environment(compose, chosen).items():
        monkeypatch.setenv(name, given)
    SetupSettings()  # real values: accepted
    monkeypatch.setenv("PG_MONITOR_PASSWORD", value)
    with pytest.raises(ValidationError) as refused:
        SetupSettings()
    # What setup prints (describe_settings_error): the variable's name, not the value given.
    (line,) = describe_settings_error(refused.value).splitlines()
    assert line.startswith("  PG_MONITOR_PASSWORD: ") and "s3cret" not in line


def test_setup_is_given_exactly_what_it_reads(compose: dict) -> None:
    """Every variable setup's settings need is set, and nothing it does not read; one
    password per PG_LOGINS role (deploy/local/stack.py)."""
    from deploy.local.stack import PG_LOGINS

    given = set(environment(compose["services"]["setup"]))
    assert given - env_names(SetupSettings) == set(), "setup is given variables it does not read"
    assert required_env_names(SetupSettings) - given == set(), "setup lacks required settings"
    assert {f"PG_{login.upper()}_PASSWORD" for login in PG_LOGINS} <= env_names(SetupSettings)


def test_the_image_holds_every_module_setup_imports() -> None:
    """The image copies deploy/ selectively (Dockerfile): every deploy module bootstrap.py
    imports, in a fresh interpreter, is under one of its COPY sources."""
    script = (
        "import sys, deploy.compose.bootstrap\n"
        "for name, module in sys.modules.items():\n"
        "    if name.startswith('deploy.') and getattr(module, '__file__', None):\n"
        "        print(module.__file__)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    files = [str(Path(f).relative_to(REPO)) for f in out.stdout.split()]
    copied = [
        args.split()[0] for instruction, args in dockerfile(REPO / "Dockerfile") if instruction == "COPY"
    ]
    assert "deploy/compose/bootstrap.py" in files
    missing = [f for f in files if not any(fnmatch.fnmatch(f, source) for source in copied)]
    assert missing == [], f"imported by setup, not copied into the image: {missing}"


def test_no_secret_is_written_into_the_compose_file(compose: dict) -> None:
    for name, service in compose["services"].items():
        for key, value in environment(service).items():
            if re.search(r"PASSWORD|SECRET|_KEY$|DSN|DATA_SOURCE_NAME", key) and "CLUSTER_ID" not in key:
                assert "${" in value, f"{name}: {key} holds a literal value; take it from .env"


def test_only_ui_ports_are_published_and_on_loopback(compose: dict) -> None:
    published = {name: s["ports"] for name, s in compose["services"].items() if s.get("ports")}
    assert set(published) == {"prometheus", "grafana", "jaeger"}, (
        "only the UIs are published; Kafka, OPA and the stores stay on the compose network"
    )
    for name, ports in published.items():
        assert all(str(p).startswith("127.0.0.1:") for p in ports), f"{name} is published beyond loopback"


# ---- Kafka ------------------------------------------------------------------------------


def properties(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def test_broker_settings_are_the_native_ones_but_the_listener_addresses() -> None:
    native = properties(
        string.Template(generate.KAFKA_TEMPLATE.read_text()).substitute(generate.KAFKA_VALUES)
    )
    ours = properties(generate.KAFKA_OUT.read_text())
    assert set(ours) == set(native), "compose's server.properties sets other keys than the native one"
    drifted = {k for k in native if native[k] != ours[k]} - set(generate.OVERRIDES)
    assert drifted == set(), f"differs from deploy/local/kafka/server.properties: {sorted(drifted)}"
    # Security defaults closed: SSL listeners with client auth only, no plaintext.
    protocols = dict(p.split(":") for p in ours["listener.security.protocol.map"].split(","))
    listeners = [entry.split("://")[0] for entry in ours["listeners"].split(",")]
    assert {protocols[name] for name in listeners} == {"SSL"}
    assert ours["ssl.client.auth"] == "required"
    assert not any("PLAINTEXT" in value.upper() for value in ours.values()), "a plaintext listener"


def test_kafka_mounts_the_native_broker_files(compose: dict) -> None:
    mounts = bind_sources(compose["services"]["kafka"])
    local = REPO / "deploy" / "local" / "kafka"
    assert mounts["/etc/pipeline/kafka/server.properties"] == generate.KAFKA_OUT
    assert mounts["/etc/pipeline/kafka/jmx-exporter.yml"] == local / "jmx-exporter.yml"
    assert mounts["/etc/pipeline/kafka/log4j.properties"] == local / "log4j.properties"


def test_setup_creates_exactly_the_topology_topics(monkeypatch: pytest.MonkeyPatch) -> None:
    """The setup container's topic list is services/common/topology.py's (run with fakes)."""
    from deploy.compose import bootstrap

    created = []

    class FakeAdmin:
        def __init__(self, config: dict) -> None: ...

        def list_topics(self, timeout: float):
            return type("Metadata", (), {"topics": {}})()

        def create_topics(self, topics, **kwargs):
            created.extend(topics)
            return {}

    class FakeSettings:
        def kafka_clients(self):
            return type("Clients", (), {"config": lambda self: {}})()

    monkeypatch.setattr(bootstrap, "AdminClient", FakeAdmin)
    bootstrap.create_topics(FakeSettings())
    got = [(t.topic, t.num_partitions, t.config) for t in created]
    assert got == [(t.name, t.partitions, t.config) for t in all_topics()]


# ---- identities -------------------------------------------------------------------------


def compose_entries() -> dict[str, dict]:
    return {e["spiffe_id"]: e for e in json.loads(generate.ENTRIES_OUT.read_text())["entries"]}


def selected_service(entry: dict) -> str:
    labels = dict(s["value"].removeprefix("label:").rsplit(":", 1) for s in entry["selectors"])
    assert entry["selectors"] and all(s["type"] == "docker" for s in entry["selectors"])
    assert labels["com.docker.compose.project"] == "pipeline"
    return labels["com.docker.compose.service"]


def test_every_native_identity_is_registered_for_a_compose_service(compose: dict) -> None:
    native = set(json.loads(ENTRIES_FILE.read_text())["entries"])
    entries = compose_entries()
    assert set(entries) == native, "compose's SPIRE entries name other identities than the native ones"
    assert compose["name"] == generate.PROJECT
    for spiffe_id, entry in entries.items():
        assert selected_service(entry) in compose["services"], f"{spiffe_id}: no such compose service"
    mounts = bind_sources(compose["services"]["spire-register"])
    assert mounts["/etc/spire/entries.json"] == generate.ENTRIES_OUT


def test_each_workload_asks_for_the_identity_registered_for_it(compose: dict, native: Stack) -> None:
    entries = compose_entries()
    asked = {}
    for name, service in compose["services"].items():
        identity = environment(service).get("PIPELINE_IDENTITY")
        command = [str(c) for c in service.get("command") or []]
        if "services.common.identity" in command:  # an SVID sidecar names its SPIFFE ID
            identity = command[command.index("services.common.identity") + 1]
        if identity:
            asked[name] = spiffe_id_of(identity)
    # The native stack's identity for each of its services and the lag exporter.
    expected = {name: spiffe_id_of(identity) for name, identity in SERVICES.items()}
    expected["lag-exporter"] = spiffe_id_of(LAG_EXPORTER_IDENTITY)
    for name, spiffe_id in expected.items():
        assert asked.get(name) == spiffe_id, f"{name} runs as {asked.get(name)}, natively {spiffe_id}"
    for name, spiffe_id in asked.items():
        assert spiffe_id in entries, f"{name} asks for {spiffe_id}, which is not registered"
        assert selected_service(entries[spiffe_id]) == name, (
            f"{spiffe_id} is registered for {selected_service(entries[spiffe_id])}, but {name} asks for it"
        )
    # pipectl presents the operator identity by default (CliSettings); it is registered for it.
    assert selected_service(entries[spiffe_id_of("operator-cli")]) == "pipectl"


def test_workload_api_socket_is_the_agents(compose: dict) -> None:
    agent = (COMPOSE_DIR / "spire" / "agent.conf").read_text()
    socket = re.search(r'socket_path = "([^"]+)"', agent).group(1)
    for name, service in compose["services"].items():
        endpoint = environment(service).get("SPIFFE_ENDPOINT_SOCKET")
        if endpoint:
            assert endpoint == f"unix://{socket}", f"{name}: SPIFFE_ENDPOINT_SOCKET is not the agent's"
            targets = [v["target"] for v in service["volumes"] if isinstance(v, dict)]
            assert str(Path(socket).parent) in targets, f"{name} does not mount the agent's socket"


# ---- settings ---------------------------------------------------------------------------


def test_every_setting_compose_gives_is_read_by_that_program(compose: dict) -> None:
    for name, settings in SETTINGS.items():
        known = env_names(settings)
        ours = {
            k
            for k in environment(compose["services"][name])
            if k.startswith(("PIPELINE_", "SPIFFE_", "OTEL_"))
        }
        assert ours - known == set(), f"{name} sets variables {settings.__name__} does not read"


def native_service_env(native: Stack, service: str) -> set[str]:
    """What `make up` gives a service (stack.py env_for, start_service, PipelineService.start)."""
    names = set(native.env_for(service)) | set(native.service_env)
    names |= {
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "PIPELINE_IDENTITY",
        "PIPELINE_HTTP_PORT",
        "PIPELINE_INSTANCE_ID",
    }
    if service == "storage":
        names |= {"PIPELINE_ES_USERNAME", "PIPELINE_ES_PASSWORD"}
    return names


def test_services_get_the_native_settings(compose: dict, native: Stack) -> None:
    cases = {service: native_service_env(native, service) for service in SERVICES}
    # The lag exporter: stack.py start_lag_exporter, plus its port (PipelineService.start).
    cases["lag-exporter"] = {"PIPELINE_KAFKA_BOOTSTRAP", "SPIFFE_ENDPOINT_SOCKET", "PIPELINE_IDENTITY"}
    cases["lag-exporter"] |= {"PIPELINE_HTTP_PORT", "PIPELINE_INSTANCE_ID"}
    # pipectl: the operator's settings (.stack/env), with its default identity.
    cases["pipectl"] = set(native.env())
    for name, native_names in cases.items():
        read = env_names(SETTINGS[name])
        expected = (native_names & read) - ONLY_NATIVE
        ours = set(environment(compose["services"][name])) - ONLY_COMPOSE
        assert ours == expected, (
            f"{name}: compose lacks {sorted(expected - ours)}, has beyond native {sorted(ours - expected)}"
        )


# ---- health and metrics ----------------------------------------------------------------


def test_health_port_is_the_metrics_port_prometheus_scrapes(compose: dict) -> None:
    prometheus = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    for name in [*SERVICES, "lag-exporter"]:
        service = compose["services"][name]
        env = environment(service)
        port = env["PIPELINE_HTTP_PORT"]
        assert env["PIPELINE_HTTP_HOST"] == "0.0.0.0", f"{name}: /metrics must be reachable by Prometheus"
        probe = " ".join(service["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port}/healthz" in probe, f"{name}: the health check is not its /healthz"
    dns = jobs["pipeline"]["dns_sd_configs"][0]
    assert sorted(dns["names"]) == sorted(SERVICES)
    assert all(
        compose["services"][s]["environment"]["PIPELINE_HTTP_PORT"] == str(dns["port"]) for s in SERVICES
    )
    lag_port = compose["services"]["lag-exporter"]["environment"]["PIPELINE_HTTP_PORT"]
    assert jobs["lag-exporter"]["static_configs"][0]["targets"] == [f"lag-exporter:{lag_port}"]
    start = (COMPOSE_DIR / "kafka" / "start.sh").read_text()
    jmx_port = re.search(r"jmx_prometheus_javaagent\.jar=(\d+):", start).group(1)
    assert jobs["kafka"]["static_configs"][0]["targets"] == [f"kafka:{jmx_port}"]
    # The native jobs, each present.
    assert set(jobs) >= {"pipeline", "lag-exporter", "kafka", "postgres", "prometheus"}


def test_services_start_after_what_they_need(compose: dict) -> None:
    services = compose["services"]
    for name in SERVICES:
        needs = services[name]["depends_on"]
        assert needs["setup"]["condition"] == "service_completed_successfully", (
            f"{name} may start before setup"
        )
        assert needs["kafka"]["condition"] == "service_healthy"
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], (
                    f"{name} waits for {dependency}, which has no healthcheck"
                )


# ---- mounted config -----------------------------------------------------------------------


def test_policies_rules_and_dashboards_are_mounted_from_the_repository(compose: dict) -> None:
    services = compose["services"]
    opa = services["opa"]
    assert bind_sources(opa)["/opa"] == REPO / "opa"
    # OPA loads `opa` from / : module ids opa/<path>, as the native stack's (run in the repository).
    assert opa["working_dir"] == "/" and opa["command"][-1] == "opa"
    for flag in ("--authentication=tls", "--authorization=basic", "--ignore=*_test.rego"):
        assert flag in opa["command"], f"OPA is not started with {flag} (the native stack's)"

    prometheus = bind_sources(services["prometheus"])
    assert prometheus["/etc/prometheus/rules"] == REPO / "deploy" / "prometheus" / "rules"
    assert prometheus["/etc/prometheus/prometheus.yml"] == COMPOSE_DIR / "prometheus.yml"
    rule_files = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())["rule_files"]
    native_rules = sorted((REPO / "deploy" / "prometheus" / "rules").glob("*.yml"))
    assert native_rules, "no rule files"
    for rules in native_rules:
        inside = f"/etc/prometheus/rules/{rules.name}"
        assert any(Path(inside).match(pattern) for pattern in rule_files), f"{rules.name} is not loaded"

    grafana = bind_sources(services["grafana"])
    assert grafana["/var/lib/grafana/dashboards/pipeline"] == REPO / "deploy" / "grafana" / "dashboards"
    provider = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/dashboards/pipeline.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards/pipeline"
    datasource = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"

    es = bind_sources(services["elasticsearch"])
    assert es["/usr/share/elasticsearch/config/roles.yml"] == REPO / "deploy/local/elasticsearch/roles.yml"


def test_every_bind_mount_exists_in_the_repository(compose: dict) -> None:
    for name, service in compose["services"].items():
        for target, source in bind_sources(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
            assert source.is_relative_to(REPO), f"{name} mounts {source}, outside the repository"


# ---- images -------------------------------------------------------------------------------


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(instruction, arguments) of each instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split()[0].upper(), line.partition(" ")[2].strip()) for line in lines]


DOCKERFILES = [REPO / "Dockerfile", COMPOSE_DIR / "kafka.Dockerfile", COMPOSE_DIR / "spire.Dockerfile"]


def pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and re.search(r"\d", tag) is not None


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_bases_are_pinned(path: Path) -> None:
    froms = [args.split()[0] for instruction, args in dockerfile(path) if instruction == "FROM"]
    assert froms, f"{path.name} has no FROM"
    for image in froms:
        assert pinned(image), f"{path.name}: {image} is not pinned to a version tag"


def test_compose_images_are_pinned(compose: dict) -> None:
    # Images built here (from the pinned Dockerfiles above) are named by their build service.
    built = {s["image"] for s in compose["services"].values() if "build" in s}
    for name, service in compose["services"].items():
        if service.get("image") and service["image"] not in built:
            assert pinned(service["image"]), f"{name}: {service['image']} is not pinned"


@pytest.mark.parametrize(
    "path", [REPO / "Dockerfile", COMPOSE_DIR / "kafka.Dockerfile"], ids=lambda p: p.name
)
def test_images_run_as_a_non_root_user(path: Path) -> None:
    instructions = dockerfile(path)
    last_stage = max(i for i, (instruction, _) in enumerate(instructions) if instruction == "FROM")
    users = [args for instruction, args in instructions[last_stage:] if instruction == "USER"]
    assert users, f"{path.name}: the final stage sets no USER"
    assert users[-1].split(":")[0] not in ("root", "0"), f"{path.name} runs as root"


def test_services_image_has_no_entrypoint_and_builds_the_jars_itself() -> None:
    assert "ENTRYPOINT" not in {i for i, _ in dockerfile(REPO / "Dockerfile")}
    kafka = COMPOSE_DIR / "kafka.Dockerfile"
    copies = [args for instruction, args in dockerfile(kafka) if instruction == "COPY"]
    assert not any("target/" in c and "--from=" not in c for c in copies), (
        "kafka.Dockerfile copies local build output; build the jars in its Maven stage"
    )


def test_pinned_versions_match_the_native_stack(compose: dict) -> None:
    makefile = (REPO / "Makefile").read_text()
    pom = (REPO / "deploy" / "local" / "pom.xml").read_text()

    def make_var(name: str) -> str:
        return re.search(rf"^{name} := v?(\S+)", makefile, re.M).group(1)

    images = {name: s.get("image", "") for name, s in compose["services"].items()}
    assert images["opa"].endswith(f":{make_var('OPA_VERSION')}"), "OPA differs from the Makefile's"
    assert images["elasticsearch"].endswith(f":{make_var('ES_VERSION')}"), "Elasticsearch differs"
    assert images["spire-server"].endswith(f":{make_var('SPIRE_VERSION')}"), "SPIRE differs"
    spire = [a for i, a in dockerfile(COMPOSE_DIR / "spire.Dockerfile") if i == "FROM" and "spiffe" in a]
    assert all(f":{make_var('SPIRE_VERSION')} " in a + " " for a in spire), "spire.Dockerfile's SPIRE differs"
    kafka_version = re.search(r"<kafka.version>([^<]+)<", pom).group(1)
    froms = [a for i, a in dockerfile(COMPOSE_DIR / "kafka.Dockerfile") if i == "FROM"]
    assert f"apache/kafka:{kafka_version}" in froms, (
        f"the broker image is not Kafka {kafka_version} (pom.xml)"
    )
