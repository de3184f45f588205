"""The Kubernetes deployment (deploy/k8s/), checked statically: rendered by Kustomize (base
and the dev overlay), validated by kubeconform against the Kubernetes API's schemas and the
CRD schemas of Strimzi, KEDA and the Prometheus operator, the generated files current, and
no drift from the native stack in topics, identities, settings, probes, scaling bounds,
network reach, policies, rules and dashboards. No cluster is needed (or used).

kustomize and kubeconform come from `make k8s-tools` (part of `make deps`): a missing one
fails these tests, never skips them."""

from __future__ import annotations

import json
import os
import re
import string
import subprocess
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr

from deploy.compose.bootstrap import SetupSettings
from deploy.k8s import generate, schemas
from deploy.local.spire_stack import ENTRIES_FILE
from deploy.local.stack import LAG_EXPORTER_IDENTITY, SERVICES, Stack
from services.common.identity import spiffe_id_of
from services.common.topology import STAGES, all_topics, group_id
from services.lag_exporter.keda_secret import SERVICE_ACCOUNT_DIR, KedaSecretSettings
from tests.unit.test_compose import (
    COMPOSE_FILE,
    ONLY_COMPOSE,
    ONLY_NATIVE,
    SETTINGS,
    env_names,
    native_service_env,
    required_env_names,
)

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = {"base": K8S / "base", "dev": K8S / "overlays" / "dev"}
SOCKET_DIR = "/run/spire/agent"
# Strimzi 1.2.0's KafkaClusterSpec.FORBIDDEN_PREFIXES: settings the operator owns (listeners,
# TLS, authorizer, KRaft roles). A Kafka resource setting one is rejected by the operator.
STRIMZI_FORBIDDEN = (
    *("listeners", "advertised.", "broker.", "listener.", "host.name", "port", "inter.broker.listener.name"),
    *("sasl.", "ssl.", "security.", "password.", "log.dir", "authorizer.", "super.user"),
    *("zookeeper.connect", "zookeeper.set.acl", "zookeeper.ssl", "zookeeper.clientCnxnSocket"),
    *("cruise.control.metrics.topic", "cruise.control.metrics.reporter.bootstrap.servers"),
    *("node.id", "process.roles", "controller.", "metadata.log.dir"),
)
STRIMZI_ALLOWED = {
    "ssl.cipher.suites",
    "ssl.protocol",
    "ssl.enabled.protocols",
    "ssl.secure.random.implementation",
}


def make_var(name: str) -> str:
    return re.search(rf"^{name} := (\S+)", (REPO / "Makefile").read_text(), re.M).group(1)


def tool(name: str, variable: str) -> Path:
    cache = Path(os.environ.get("PIPELINE_CACHE", Path.home() / ".cache" / "pipeline"))
    path = cache / f"{name}-{make_var(variable)}" / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `make deps` (k8s-tools, compose-tools)", pytrace=False)
    return path


def render(directory: Path) -> str:
    result = subprocess.run(
        [tool("kustomize", "KUSTOMIZE_VERSION"), "build", directory],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"kustomize build {directory}: {result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    return {name: render(path) for name, path in OVERLAYS.items()}


@pytest.fixture(scope="module")
def docs(rendered: dict[str, str]) -> dict[str, list[dict]]:
    return {name: [d for d in yaml.safe_load_all(text) if d] for name, text in rendered.items()}


@pytest.fixture(scope="module")
def base(docs: dict[str, list[dict]]) -> list[dict]:
    return docs["base"]


@pytest.fixture(scope="module")
def schema_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("schemas")
    schemas.write(directory)
    return directory


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    return Stack(root=tmp_path_factory.mktemp("stack"), instances={})


def of_kind(documents: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in documents if d["kind"] == kind}


def one(documents: list[dict], kind: str, name: str) -> dict:
    return of_kind(documents, kind)[name]


def pod_specs(documents: list[dict]) -> dict[str, dict]:
    """name -> pod template of every Deployment, StatefulSet, DaemonSet and Job."""
    kinds = ("Deployment", "StatefulSet", "DaemonSet", "Job")
    return {d["metadata"]["name"]: d["spec"]["template"] for d in documents if d["kind"] in kinds}


def container_env(container: dict) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def kubeconform(schema_dir: Path, text: str) -> dict:
    """kubeconform's JSON report: `resources` (those not valid) and `summary` (counts)."""
    result = subprocess.run(
        [
            tool("kubeconform", "KUBECONFORM_VERSION"),
            "-summary",
            "-output",
            "json",
            *schemas.kubeconform_args(schema_dir),
            "-",
        ],
        input=text,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.stdout, f"kubeconform: {result.stderr}"
    return json.loads(result.stdout)


# ---- rendering and schemas ----------------------------------------------------------------


def test_generated_files_are_current() -> None:
    for path, text in generate.outputs().items():
        assert path.is_file() and path.read_text() == text, (
            f"{path.relative_to(REPO)} is stale: run python -m deploy.k8s.generate"
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_manifests_validate_against_kubernetes_and_crd_schemas(
    overlay: str, rendered: dict[str, str], docs: dict[str, list[dict]], schema_dir: Path
) -> None:
    report = kubeconform(schema_dir, rendered[overlay])
    bad = [f"{r['kind']} {r['name']}: {r['status']} {r.get('msg')}" for r in report["resources"]]
    assert bad == [], "\n".join(bad)
    # Every document checked against a schema (-strict too) but Strimzi's, whose CRD files are
    # not to be had here (deploy/k8s/schemas.py; validate.mjs checks those, below).
    strimzi = sum(d["kind"] in schemas.STRIMZI_KINDS for d in docs[overlay])
    assert report["summary"] == {
        "valid": len(docs[overlay]) - strimzi,
        "invalid": 0,
        "errors": 0,
        "skipped": strimzi,
    }
    kinds = {d["kind"] for d in docs[overlay]}
    assert {
        "Kafka",
        "KafkaNodePool",
        "KafkaTopic",
        "ScaledObject",
        "TriggerAuthentication",
        "PrometheusRule",
    } <= kinds


def strimzi_validate(resources: list[dict]) -> tuple[int, list[dict]]:
    """deploy/k8s/strimzi/validate.mjs over the resources: its exit status and its results."""
    directory = K8S / "strimzi"
    if not (directory / "node_modules").is_dir():
        pytest.fail(f"{directory}/node_modules is missing: run `make k8s-tools`", pytrace=False)
    result = subprocess.run(
        ["node", "validate.mjs"], input=json.dumps(resources), capture_output=True, text=True,
        check=False, cwd=directory,
    )  # fmt: skip
    assert not result.stderr, result.stderr
    return result.returncode, [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_strimzi_resources_validate_against_strimzis_crd_schemas(
    overlay: str, docs: dict[str, list[dict]]
) -> None:
    strimzi = [d for d in docs[overlay] if d["kind"] in schemas.STRIMZI_KINDS]
    code, results = strimzi_validate(strimzi)
    assert [r for r in results if r["errors"]] == [] and code == 0
    assert [(r["kind"], r["name"]) for r in results] == [(d["kind"], d["metadata"]["name"]) for d in strimzi]
    assert {r["kind"] for r in results} == set(schemas.STRIMZI_KINDS)


def test_the_strimzi_validator_refuses_a_broken_resource(docs: dict[str, list[dict]]) -> None:
    kafka = json.loads(json.dumps(next(d for d in docs["dev"] if d["kind"] == "Kafka")))
    listener = kafka["spec"]["kafka"]["listeners"][0]
    listener["tls"] = "yes"
    del listener["port"]
    topic = json.loads(json.dumps(next(d for d in docs["dev"] if d["kind"] == "KafkaTopic")))
    topic["spec"]["partitions"] = "six"
    code, (kafka_result, topic_result) = strimzi_validate([kafka, topic])
    assert code == 1
    assert "tls must be boolean" in kafka_result["errors"][0]
    assert "must have required property port" in kafka_result["errors"][0]
    assert "partitions must be integer" in topic_result["errors"][0]


@pytest.mark.parametrize(
    ("kind", "name", "mutate"),
    [
        (
            "Deployment",
            "ingester",
            lambda d: d["spec"]["template"]["spec"]["containers"][0].update(readyProbe={}),
        ),
        ("NetworkPolicy", "default-deny", lambda d: d["spec"].update(podSelector="all")),
        ("ScaledObject", "processor", lambda d: d["spec"].update(maxReplicaCount="six")),
        ("TriggerAuthentication", "kafka-tls", lambda d: d["spec"].update(secretRef=[])),
        ("Job", "pipeline-setup", lambda d: d["spec"].update(backoffLimit="four")),
        ("Role", "keda-secret-writer", lambda d: d["rules"][0].update(verb=["patch"])),
        ("PrometheusRule", "pipeline-alerts", lambda d: d["spec"]["groups"][0].update(rulez=[])),
    ],
)
def test_validation_rejects_a_broken_resource(
    kind: str, name: str, mutate, base: list[dict], schema_dir: Path
) -> None:
    document = json.loads(json.dumps(one(base, kind, name)))
    mutate(document)
    report = kubeconform(schema_dir, yaml.safe_dump(document))
    assert [r["status"] for r in report["resources"]] == ["statusInvalid"], (
        f"the schema accepted a broken {kind}: {report}"
    )


def test_kustomize_owns_no_file_outside_its_directories() -> None:
    """Kustomize's load restrictor: every resource and generator file is under deploy/k8s."""
    for directory in OVERLAYS.values():
        spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
        paths = list(spec.get("resources", []))
        for generator in spec.get("configMapGenerator", []):
            paths += [f.split("=")[-1] for f in generator.get("files", [])]
        for path in paths:
            assert (directory / path).resolve().is_relative_to(K8S), f"{directory.name}: {path}"


# ---- Kafka ----------------------------------------------------------------------------------


def test_topics_are_the_topology_topics(docs: dict[str, list[dict]]) -> None:
    for overlay, documents in docs.items():
        topics = {t["spec"]["topicName"]: t for t in of_kind(documents, "KafkaTopic").values()}
        assert sorted(topics) == sorted(t.name for t in all_topics()), (
            f"{overlay}: other topics than topology's"
        )
        for spec in all_topics():
            got = topics[spec.name]
            assert got["spec"]["partitions"] == spec.partitions
            assert got["spec"]["config"] == spec.config
            assert got["metadata"]["labels"]["strimzi.io/cluster"] == generate.KAFKA_CLUSTER
        replicas = {t["spec"]["replicas"] for t in topics.values()}
        pool = one(documents, "KafkaNodePool", "combined")["spec"]["replicas"]
        assert replicas == {min(generate.TOPIC_REPLICAS, pool)}, f"{overlay}: replication factor vs brokers"


def native_broker_settings() -> dict[str, str]:
    values = {**generate_compose_values(), "trust_domain": "pipeline.local"}
    text = string.Template((REPO / "deploy/local/kafka/server.properties").read_text()).substitute(values)
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def generate_compose_values() -> dict:
    from deploy.compose import generate as compose

    return compose.KAFKA_VALUES


def forbidden_by_strimzi(key: str) -> bool:
    return key not in STRIMZI_ALLOWED and any(key == p or key.startswith(p) for p in STRIMZI_FORBIDDEN)


def test_broker_settings_are_the_native_ones_strimzi_lets_us_set(docs: dict[str, list[dict]]) -> None:
    """The dev overlay (one broker, as natively) sets each native setting Strimzi allows,
    with the native value; the ones Strimzi owns are in its listener and authorization."""
    native = native_broker_settings()
    # Natively set by placeholders the Kubernetes deployment answers differently.
    different = {"opa.authorizer.url": "https://opa.pipeline.svc:8181/v1/data/kafka/authz/allow"}
    # KRaft and threads: Strimzi sizes them; log.dirs is its volume.
    owned = {"log.dirs", "num.network.threads", "num.io.threads"}
    kafka = one(docs["dev"], "Kafka", "pipeline")["spec"]["kafka"]
    config = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in kafka["config"].items()}
    assert not [k for k in config if forbidden_by_strimzi(k)], "a setting Strimzi rejects"
    for key, value in native.items():
        if forbidden_by_strimzi(key) or key in owned:
            continue
        assert config.get(key) == different.get(key, value), (
            f"{key}: {config.get(key)} here, {value} natively"
        )
    # What Strimzi owns, set its way: TLS listener with client certificates, our authorizer and principals.
    (listener,) = kafka["listeners"]
    assert (
        listener["tls"] is True and listener["authentication"]["type"] == "tls" and listener["port"] == 9093
    )
    assert kafka["authorization"]["authorizerClass"] == native["authorizer.class.name"]
    assert config["principal.builder.class"] == native["principal.builder.class"]
    assert kafka["authorization"]["superUsers"] == [native["super.users"].removeprefix("User:")]
    base_config = one(docs["base"], "Kafka", "pipeline")["spec"]["kafka"]["config"]
    assert base_config["min.insync.replicas"] == 2 and base_config["default.replication.factor"] == 3


def test_broker_plugins_are_configured_for_strimzi(base: list[dict]) -> None:
    """DN principals on Strimzi's internal listeners only (its brokers and operators have no
    SPIFFE ID); the authorizer's SPIFFE TLS towards OPA from opa.authorizer.ssl.* (the native
    ssl.* algorithms, which Strimzi owns here), trusting OPA's SPIFFE ID alone."""
    native = native_broker_settings()
    kafka = one(base, "Kafka", "pipeline")["spec"]["kafka"]
    config = kafka["config"]
    # Strimzi's names (KafkaBrokerConfigurationBuilder), as Kafka reports them: upper case.
    dn_listeners = config["spiffe.dn.principal.listeners"].split(",")
    assert sorted(dn_listeners) == ["CONTROLPLANE-9090", "REPLICATION-9091"]
    clients = {f"{listener['name']}-{listener['port']}".upper() for listener in kafka["listeners"]}
    assert not clients & set(dn_listeners), "a client listener would take DN principals"
    for setting in ("keymanager.algorithm", "trustmanager.algorithm"):
        assert config[f"opa.authorizer.ssl.{setting}"] == native[f"ssl.{setting}"] == "Spiffe"
    assert "security.providers" in native and not any(k.startswith("security.") for k in config)
    pool = one(base, "KafkaNodePool", "combined")["spec"]
    accept = {p["name"]: p["value"] for p in pool["jvmOptions"]["javaSystemProperties"]}
    opa_id = next(i for i, account in registered().items() if account == "opa")
    assert accept == {"ssl.spiffe.accept": opa_id}


def test_broker_image_plugins_are_built_and_tested_against_its_kafka(base: list[dict]) -> None:
    """kafka.Dockerfile builds the jars with the pom's kafka4 profile, whose Kafka is the Kafka
    resource's version (what make test-java tests them against)."""
    pom = (REPO / "deploy/local/pom.xml").read_text()
    profile = re.search(r"<id>kafka4</id>.*?</profile>", pom, re.S).group(0)
    version = one(base, "Kafka", "pipeline")["spec"]["kafka"]["version"]
    assert f"<kafka.version>{version}</kafka.version>" in profile
    assert "-Pkafka4 test" in (REPO / "Makefile").read_text()
    dockerfile = (K8S / "kafka.Dockerfile").read_text()
    assert "mvn -B -q -Pkafka4 -DskipTests package" in dockerfile
    copies = re.findall(r"^COPY --from=jars (\S+)", dockerfile, re.M)
    assert copies and all(c.startswith("/build/target/kafka4/") for c in copies)


def test_broker_metrics_rules_are_the_native_ones(base: list[dict]) -> None:
    data = one(base, "ConfigMap", "kafka-metrics")["data"]
    assert data == {"jmx-exporter.yml": (REPO / "deploy/local/kafka/jmx-exporter.yml").read_text()}
    ref = one(base, "Kafka", "pipeline")["spec"]["kafka"]["metricsConfig"]["valueFrom"]["configMapKeyRef"]
    assert (ref["name"], ref["key"]) == ("kafka-metrics", "jmx-exporter.yml")


# ---- identities ---------------------------------------------------------------------------------


def registered() -> dict[str, str]:
    """SPIFFE ID -> the service account its entry selects (namespace checked)."""
    out = {}
    for entry in json.loads((generate.GENERATED / "spire-entries.json").read_text())["entries"]:
        selectors = {s["value"].split(":", 1)[0]: s["value"].split(":", 1)[1] for s in entry["selectors"]}
        assert all(s["type"] == "k8s" for s in entry["selectors"]) and selectors["ns"] == generate.NAMESPACE
        assert entry["parent_id"] == generate.AGENT_ID
        out[entry["spiffe_id"]] = selectors["sa"]
    return out


def test_every_native_identity_is_registered_for_a_service_account(base: list[dict]) -> None:
    entries = registered()
    assert set(entries) == set(json.loads(ENTRIES_FILE.read_text())["entries"])
    accounts = set(of_kind(base, "ServiceAccount"))
    # Made by Strimzi (the brokers'), or by what this slice does not run (README, "Not here").
    elsewhere = {f"{generate.KAFKA_CLUSTER}-kafka", "elasticsearch"}
    assert set(entries.values()) - accounts == elsewhere
    register = (K8S / "base" / "spire" / "register.sh").read_text()
    assert (
        f"-spiffeID {generate.AGENT_ID}" in register
        and f"k8s_psat:cluster:{generate.CLUSTER_NAME}" in register
    )


def test_each_workload_asks_for_the_identity_registered_for_its_account(base: list[dict]) -> None:
    entries = registered()
    asked = {}
    for name, pod in pod_specs(base).items():
        for container in pod["spec"]["containers"]:
            identity = container_env(container).get("PIPELINE_IDENTITY")
            command = container.get("command") or []
            if "services.common.identity" in command:
                identity = command[command.index("services.common.identity") + 1]
            if identity:
                spiffe_id = spiffe_id_of(identity)
                asked[name] = spiffe_id
                assert entries.get(spiffe_id) == pod["spec"]["serviceAccountName"], (
                    f"{name} runs as {pod['spec']['serviceAccountName']} but asks for {spiffe_id}"
                )
    expected = {name: spiffe_id_of(identity) for name, identity in SERVICES.items()}
    expected["lag-exporter"] = spiffe_id_of(LAG_EXPORTER_IDENTITY)
    expected["opa"] = "spiffe://pipeline.local/control/opa"
    expected["pipeline-setup"] = spiffe_id_of("admin-bootstrap")  # compose's setup, natively the operator's
    for name, spiffe_id in expected.items():
        assert asked.get(name) == spiffe_id, f"{name} runs as {asked.get(name)}, natively {spiffe_id}"
    assert (
        entries[spiffe_id_of("operator-cli")]
        == one(base, "Deployment", "pipectl")["spec"]["template"]["spec"]["serviceAccountName"]
    )


def test_the_workload_api_comes_from_the_spiffe_csi_driver(base: list[dict]) -> None:
    agent = (K8S / "base" / "spire" / "agent.conf").read_text()
    agent_socket = Path(re.search(r'socket_path = "([^"]+)"', agent).group(1))
    csi = one(base, "DaemonSet", "spiffe-csi-driver")["spec"]["template"]["spec"]
    driver = csi["containers"][0]
    host_dir = next(v["hostPath"]["path"] for v in csi["volumes"] if v["name"] == "agent-sockets")
    assert host_dir == str(agent_socket.parent)
    assert driver["args"][driver["args"].index("-workload-api-socket-dir") + 1] == "/spire-agent-socket"
    assert one(base, "CSIDriver", "csi.spiffe.io")["spec"]["volumeLifecycleModes"] == ["Ephemeral"]
    pods = {**pod_specs(base), "kafka": {"spec": kafka_pod(base)}}
    users = 0
    for name, pod in pods.items():
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        for container in pod["spec"]["containers"]:
            endpoint = container_env(container).get("SPIFFE_ENDPOINT_SOCKET")
            if endpoint is None:
                continue
            users += 1
            assert endpoint == f"unix://{SOCKET_DIR}/{agent_socket.name}", f"{name}: not the agent's socket"
            mount = next(m for m in container["volumeMounts"] if m["mountPath"] == SOCKET_DIR)
            assert mount.get("readOnly") is True
            assert volumes[mount["name"]].get("csi") == {"driver": "csi.spiffe.io", "readOnly": True}, name
    # The three services, the lag exporter and its KEDA sidecar, pipectl, OPA's sidecar, the
    # setup Job, the brokers.
    assert users >= 9
    for name, pod in pod_specs(base).items():
        if name not in ("spire-agent", "spiffe-csi-driver"):
            assert not any("hostPath" in v for v in pod["spec"].get("volumes", [])), (
                f"{name} mounts a host path"
            )


def kafka_pod(documents: list[dict]) -> dict:
    template = one(documents, "Kafka", "pipeline")["spec"]["kafka"]["template"]
    return {"volumes": template["pod"]["volumes"], "containers": [template["kafkaContainer"]]}


# ---- services: settings, probes, resources, disruption -------------------------------------------


def test_every_setting_is_read_by_that_program(base: list[dict], native: Stack) -> None:
    pods = pod_specs(base)
    cases = {service: native_service_env(native, service) for service in SERVICES}
    cases["lag-exporter"] = {"PIPELINE_KAFKA_BOOTSTRAP", "SPIFFE_ENDPOINT_SOCKET", "PIPELINE_IDENTITY"}
    cases["lag-exporter"] |= {"PIPELINE_HTTP_PORT", "PIPELINE_INSTANCE_ID"}
    cases["pipectl"] = set(native.env())
    for name, native_names in cases.items():
        ours = set(container_env(pods[name]["spec"]["containers"][0]))
        read = env_names(SETTINGS[name])
        assert {k for k in ours if k.startswith(("PIPELINE_", "SPIFFE_"))} - read == set(), (
            f"{name}: unread settings"
        )
        expected = (native_names & read) - ONLY_NATIVE
        # Elasticsearch's CA, Prometheus's and Jaeger's URLs: set where those run (README, "Not here").
        if name == "pipectl":
            expected -= {"PIPELINE_ES_CA", "PIPELINE_PROMETHEUS_URL", "PIPELINE_TRACES_URL"}
        assert ours - ONLY_COMPOSE == expected, (
            f"{name}: lacks {sorted(expected - ours)}, has beyond native {sorted(ours - ONLY_COMPOSE - expected)}"
        )


def test_the_setup_job_gets_what_setup_reads(base: list[dict]) -> None:
    """The Job runs compose's setup program (deploy/compose/bootstrap.py) with the names
    compose gives it (but Grafana's password, only checked there), each read by SetupSettings,
    every required one given, the addresses as values and the passwords from Secrets."""
    job = one(base, "Job", "pipeline-setup")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == yaml.safe_load(COMPOSE_FILE.read_text())["services"]["setup"]["command"]
    env = {e["name"]: e for e in container["env"]}
    assert set(env) - env_names(SetupSettings) == set(), "the Job sets variables setup does not read"
    assert required_env_names(SetupSettings) - set(env) == set(), "the Job lacks settings setup needs"
    compose_setup = set(yaml.safe_load(COMPOSE_FILE.read_text())["services"]["setup"]["environment"])
    assert set(env) == compose_setup - {"GRAFANA_ADMIN_PASSWORD"}
    secrets = {
        str(f.validation_alias.choices[0])
        for f in SetupSettings.model_fields.values()
        if f.annotation is SecretStr or f.annotation == SecretStr | None
    }
    for name, var in env.items():
        from_secret = "secretKeyRef" in var.get("valueFrom", {})
        assert from_secret == (name in secrets), (
            f"{name}: {'a literal' if name in secrets else 'from a Secret'}"
        )
    spec = job["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never" and 0 < spec["backoffLimit"] <= 6
    assert spec["template"]["spec"]["serviceAccountName"] == generate.SERVICE_ACCOUNTS["admin/bootstrap"]


def test_the_keda_sidecar_gets_what_it_reads(base: list[dict]) -> None:
    pod = one(base, "Deployment", "lag-exporter")["spec"]["template"]["spec"]
    sidecar = next(c for c in pod["containers"] if c["name"] == "keda-secret")
    assert sidecar["command"][-1] == "services.lag_exporter.keda_secret"
    env = container_env(sidecar)
    # KUBERNETES_SERVICE_HOST/_PORT: set by the kubelet in every pod.
    assert set(env) | {"KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"} == env_names(
        KedaSecretSettings
    ) - {"PIPELINE_TRUST_DOMAIN"}
    assert required_env_names(KedaSecretSettings) - set(env) == {
        "KUBERNETES_SERVICE_HOST",
        "KUBERNETES_SERVICE_PORT",
    }
    assert env["PIPELINE_KEDA_SECRET_NAME"] == generate.KEDA_TLS_SECRET
    assert spiffe_id_of(env["PIPELINE_IDENTITY"]) == spiffe_id_of(LAG_EXPORTER_IDENTITY)


def test_secrets_come_from_the_secrets_the_readme_lists(base: list[dict]) -> None:
    """Every Secret a pod reads is one the operator is told to make (README, Prerequisites)."""
    readme = (K8S / "README.md").read_text()
    prerequisites = readme[readme.index("## Prerequisites") : readme.index("## Commands")]
    listed = set()
    for token in re.findall(r"`([a-z0-9{},-]+)`", prerequisites):
        head, _, rest = token.partition("{")
        choices, _, tail = rest.partition("}")
        listed |= {head + c + tail for c in choices.split(",")} if rest else {token}
    refs = {
        env["valueFrom"]["secretKeyRef"]["name"]
        for pod in pod_specs(base).values()
        for container in pod["spec"]["containers"]
        for env in container.get("env", [])
        if "secretKeyRef" in env.get("valueFrom", {})
    }
    assert refs and refs - listed == set(), f"not in README's Prerequisites: {sorted(refs - listed)}"
    assert generate.KEDA_TLS_SECRET in listed


def test_only_the_keda_sidecar_may_write_and_only_keda_s_secret(base: list[dict]) -> None:
    """Role keda-secret-writer: get and patch on that one Secret, bound to the lag exporter's
    service account alone; its token is mounted into the sidecar alone (no automount)."""
    role = one(base, "Role", "keda-secret-writer")
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": [generate.KEDA_TLS_SECRET],
            "verbs": ["get", "patch"],
        }
    ]
    bindings = [
        b for b in of_kind(base, "RoleBinding").values() if b["roleRef"]["name"] == "keda-secret-writer"
    ]
    (binding,) = bindings
    assert binding["roleRef"]["kind"] == "Role"
    pod = one(base, "Deployment", "lag-exporter")["spec"]["template"]["spec"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": generate.NAMESPACE}
    ]
    assert pod["automountServiceAccountToken"] is False
    assert one(base, "ServiceAccount", "lag-exporter")["automountServiceAccountToken"] is False
    token_volumes = {
        v["name"]
        for v in pod["volumes"]
        if any("serviceAccountToken" in source for source in v.get("projected", {}).get("sources", []))
    }
    mounting = {
        c["name"]: m["mountPath"]
        for c in pod["containers"]
        for m in c.get("volumeMounts", [])
        if m["name"] in token_volumes
    }
    assert mounting == {"keda-secret": str(SERVICE_ACCOUNT_DIR)}


def test_pods_but_spire_s_node_parts_meet_pod_security_restricted(base: list[dict]) -> None:
    """The namespace enforces only `privileged` (README, "Not here"): each pod of ours, the
    setup Job and the sidecars included, is held to `restricted` here instead."""
    for name, pod in pod_specs(base).items():
        if name in ("spire-agent", "spiffe-csi-driver"):
            continue
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, f"{name}/{container['name']}"
            assert context["capabilities"]["drop"] == ["ALL"], f"{name}/{container['name']}"
            assert context["readOnlyRootFilesystem"] is True, f"{name}/{container['name']}"


def test_no_secret_is_written_into_a_manifest(base: list[dict]) -> None:
    for name, pod in pod_specs(base).items():
        for container in pod["spec"]["containers"]:
            for env in container.get("env", []):
                # A Secret's name (PIPELINE_KEDA_SECRET_NAME) is no secret.
                if re.search(r"PASSWORD|SECRET|_KEY$|DSN", env["name"]) and not env["name"].endswith("_NAME"):
                    assert "secretKeyRef" in env.get("valueFrom", {}), f"{name}: {env['name']} is a literal"
    assert not of_kind(base, "Secret"), "Secrets are made by the operator (README, Prerequisites)"


def test_probes_are_healthz_and_readyz_on_the_http_port(base: list[dict]) -> None:
    for name in [*SERVICES, "lag-exporter"]:
        container = one(base, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        port = int(container_env(container)["PIPELINE_HTTP_PORT"])
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            get = container[probe]["httpGet"]
            assert get["path"] == path, f"{name}: {probe} on {get['path']}"
            assert named.get(get["port"], get["port"]) == port, f"{name}: {probe} not on PIPELINE_HTTP_PORT"
        assert named["http"] == port


def test_every_container_requests_resources_and_caps_memory(base: list[dict]) -> None:
    for name, pod in pod_specs(base).items():
        for container in pod["spec"]["containers"]:
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), (
                f"{name}/{container['name']}: requests"
            )
            assert "memory" in resources.get("limits", {}), f"{name}/{container['name']}: no memory limit"


def test_scaled_and_replicated_deployments_have_disruption_budgets(base: list[dict]) -> None:
    budgets = of_kind(base, "PodDisruptionBudget")
    for name in [*generate.SCALED, "opa"]:
        labels = one(base, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        budget = budgets[name]["spec"]
        assert all(labels.get(k) == v for k, v in budget["selector"]["matchLabels"].items()), name


# ---- KEDA -------------------------------------------------------------------------------------


def partitions(topic: str) -> int:
    return next(t.partitions for t in all_topics() if t.name == topic)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_stage_scales_on_its_own_group_within_its_partitions(
    overlay: str, docs: dict[str, list[dict]]
) -> None:
    documents = docs[overlay]
    scaled = of_kind(documents, "ScaledObject")
    assert set(scaled) == set(generate.SCALED)
    groups = []
    auth = of_kind(documents, "TriggerAuthentication")
    for name, obj in scaled.items():
        spec = obj["spec"]
        assert spec["scaleTargetRef"]["name"] in of_kind(documents, "Deployment")
        bound = min(
            partitions(t["metadata"]["topic"])
            if "topic" in t["metadata"]
            else min(partitions(s.name) for s in all_topics() if s.name.startswith("pipeline.raw."))
            for t in spec["triggers"]
        )
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= bound, (
            f"{name}: replicas beyond partitions"
        )
        for trigger in spec["triggers"]:
            meta = trigger["metadata"]
            assert trigger["type"] == "kafka"
            assert meta["bootstrapServers"] == generate.BOOTSTRAP
            assert int(meta["lagThreshold"]) > 0
            groups.append(meta["consumerGroup"])
            params = {
                r["parameter"] for r in auth[trigger["authenticationRef"]["name"]]["spec"]["secretTargetRef"]
            }
            assert params == {"tls", "ca", "cert", "key"}, "KEDA must present a client certificate"
    assert sorted(groups) == sorted(group_id(s) for s in STAGES), "one trigger per stage's consumer group"


# ---- network policies -------------------------------------------------------------------------

# Pods this deployment does not define but its policies name (Strimzi's, and the stores).
OTHER_PODS = {
    "kafka": {"strimzi.io/name": "pipeline-kafka"},
    "entity-operator": {"strimzi.io/name": "pipeline-entity-operator"},
    **{name: {"app.kubernetes.io/name": name} for name in ("postgres", "s3", "elasticsearch", "jaeger")},
}
# Who may open a connection to whom (egress, in this namespace), and nothing else. "*" is
# outside the namespace: the Kubernetes API, kubelets, DNS.
EXPECTED_EGRESS = {
    *{
        (s, "kafka", 9093)
        for s in ("ingester", "processor", "storage", "lag-exporter", "pipectl", "pipeline-setup")
    },
    *{
        (s, dst, port)
        for s in ("ingester", "processor", "storage")
        for dst, port in (("opa", 8181), ("postgres", 5432), ("jaeger", 4318))
    },
    ("storage", "s3", 9000),
    ("storage", "elasticsearch", 9200),
    *{("pipectl", dst, port) for dst, port in (("postgres", 5432), ("s3", 9000), ("elasticsearch", 9200))},
    *{("pipectl", s, 8080) for s in ("ingester", "processor", "storage")},
    # The setup Job: the stores it prepares (the broker above); not OPA, which it never asks.
    *{
        ("pipeline-setup", dst, port)
        for dst, port in (("postgres", 5432), ("s3", 9000), ("elasticsearch", 9200))
    },
    # The lag exporter's KEDA sidecar: the Kubernetes API (its Secret).
    ("lag-exporter", "*", 443),
    ("lag-exporter", "*", 6443),
    *{("kafka", "kafka", port) for port in (9090, 9091, 9093)},
    ("kafka", "opa", 8181),
    ("entity-operator", "kafka", 9091),
    ("entity-operator", "*", 443),
    ("entity-operator", "*", 6443),
    ("spire-agent", "spire-server", 8081),
    ("spire-agent", "*", 10250),
    ("spire-server", "*", 443),
    ("spire-server", "*", 6443),
}


def selects(selector: dict, labels: dict) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        if expr["operator"] == "In" and labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def pod_labels(documents: list[dict]) -> dict[str, dict]:
    return {**{n: p["metadata"]["labels"] for n, p in pod_specs(documents).items()}, **OTHER_PODS}


def test_network_policies_allow_exactly_what_each_component_needs(base: list[dict]) -> None:
    policies = of_kind(base, "NetworkPolicy")
    deny = policies["default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    labels = pod_labels(base)
    allowed = set()
    for name, policy in policies.items():
        if name == "dns":
            continue
        sources = [pod for pod, lab in labels.items() if selects(policy["spec"]["podSelector"], lab)]
        for rule in policy["spec"].get("egress", []):
            peers = rule.get("to") or [None]
            for peer in peers:
                if peer is None:
                    targets = ["*"]
                else:
                    assert "namespaceSelector" not in peer, f"{name}: egress beyond the namespace"
                    targets = [pod for pod, lab in labels.items() if selects(peer["podSelector"], lab)]
                    assert targets, f"{name}: a peer selecting no pod"
                for source in sources:
                    for target in targets:
                        allowed |= {(source, target, p["port"]) for p in rule["ports"]}
    assert allowed - EXPECTED_EGRESS == set(), f"allowed beyond need: {sorted(allowed - EXPECTED_EGRESS)}"
    assert EXPECTED_EGRESS - allowed == set(), f"needed but denied: {sorted(EXPECTED_EGRESS - allowed)}"
    # DNS: to kube-dns only, port 53.
    (dns,) = policies["dns"]["spec"]["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}


def test_opa_and_kafka_admit_only_their_clients(base: list[dict]) -> None:
    labels = pod_labels(base)
    (rule,) = one(base, "NetworkPolicy", "opa-ingress")["spec"]["ingress"]
    admitted = {
        pod for pod, lab in labels.items() for peer in rule["from"] if selects(peer["podSelector"], lab)
    }
    assert admitted == {"ingester", "processor", "storage", "kafka"}
    (listener,) = one(base, "Kafka", "pipeline")["spec"]["kafka"]["listeners"]
    clients = {
        pod for pod, lab in labels.items() if selects(listener["networkPolicyPeers"][0]["podSelector"], lab)
    }
    assert clients == {"ingester", "processor", "storage", "lag-exporter", "pipectl", "pipeline-setup"}
    # Prometheus (namespace monitoring) reaches the metrics ports.
    metrics = one(base, "NetworkPolicy", "metrics-ingress")["spec"]["ingress"][0]
    assert metrics["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    assert [p["port"] for p in metrics["ports"]] == [8080]


# ---- configuration from the repository's files --------------------------------------------------


def test_prometheus_rules_are_the_repository_rules(base: list[dict]) -> None:
    rules = of_kind(base, "PrometheusRule")
    files = sorted((REPO / "deploy/prometheus/rules").glob("*.yml"))
    assert set(rules) == {p.stem for p in files}
    for path in files:
        assert rules[path.stem]["spec"] == yaml.safe_load(path.read_text())


def test_dashboards_are_the_repository_dashboards(base: list[dict]) -> None:
    maps = {
        n: m
        for n, m in of_kind(base, "ConfigMap").items()
        if m["metadata"].get("labels", {}).get("grafana_dashboard")
    }
    files = sorted((REPO / "deploy/grafana/dashboards").glob("*.json"))
    got = {key: value for m in maps.values() for key, value in m["data"].items()}
    assert got == {p.name: p.read_text() for p in files}


def test_opa_loads_the_repository_policies_at_their_paths(base: list[dict]) -> None:
    data = one(base, "ConfigMap", "opa-policies")["data"]
    opa = REPO / "opa"
    shipped = {
        str(p.relative_to(opa)): p.read_text()
        for p in opa.rglob("*")
        if p.is_file() and p.suffix in (".rego", ".json") and not p.name.endswith("_test.rego")
    }
    pod = one(base, "Deployment", "opa")["spec"]["template"]["spec"]
    items = next(v for v in pod["volumes"] if v["name"] == "policies")["configMap"]["items"]
    assert {item["path"]: data[item["key"]] for item in items} == shipped
    opa_container = pod["containers"][0]
    mount = next(m for m in opa_container["volumeMounts"] if m["name"] == "policies")
    assert (
        mount["mountPath"] == "/opa"
        and opa_container["workingDir"] == "/"
        and opa_container["args"][-1] == "opa"
    )
    for flag in ("--authentication=tls", "--authorization=basic", "--ignore=*_test.rego"):
        assert flag in opa_container["args"], f"OPA is not started with {flag} (the native stack's)"


def test_images_are_pinned_and_match_the_native_versions(base: list[dict]) -> None:
    built = {"pipeline:dev", "pipeline-spire:dev", "pipeline-strimzi-kafka:dev"}
    images = {c["image"] for p in pod_specs(base).values() for c in p["spec"]["containers"]}
    images.add(one(base, "Kafka", "pipeline")["spec"]["kafka"]["image"])
    for image in images - built:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and re.search(r"\d", tag), f"{image} is not pinned"
    assert f"openpolicyagent/opa:{make_var('OPA_VERSION').lstrip('v')}" in images
    spire = make_var("SPIRE_VERSION").lstrip("v")
    assert {f"ghcr.io/spiffe/spire-server:{spire}", f"ghcr.io/spiffe/spire-agent:{spire}"} <= images
    dockerfile = (K8S / "kafka.Dockerfile").read_text()
    version = one(base, "Kafka", "pipeline")["spec"]["kafka"]["version"]
    assert re.search(rf"^FROM quay\.io/strimzi/kafka:\S+-kafka-{re.escape(version)}$", dockerfile, re.M)
