"""JSON schemas of the custom resources deploy/k8s uses, for kubeconform:
`python -m deploy.k8s.schemas DIR` writes DIR/<group>/<kind>_<version>.json (kubeconform's
`{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json`).

Each CRD's openAPIV3Schema is taken from the operator's release, converted the way
kubeconform's openapi2jsonschema.py does, strict (an object's unknown fields are errors
unless the CRD preserves them):

- KEDA (ScaledObject, TriggerAuthentication): its Go module github.com/kedacore/keda/v2,
  config/crd/bases/, from the Go module proxy (`go mod download`, Go's module cache).
- Prometheus operator (PrometheusRule, PodMonitor): its Go module, example/prometheus-operator-crd/.
- Strimzi (Kafka, KafkaNodePool, KafkaTopic): no CRD file is published to a registry
  reachable here (its io.strimzi:api jar on Maven Central has the model classes, not the
  generated CRDs; the Go proxy refuses the repository), so kubeconform skips these kinds
  (STRIMZI_KINDS). They are validated instead by deploy/k8s/strimzi/validate.mjs, with the
  validators the npm package @kubernetes-models/strimzi-kafka-operator generates from
  Strimzi's CRD schemas (types, enums, required fields; unknown fields are not refused,
  as the API server prunes them), and tests/unit/test_k8s.py checks their fields that
  matter (listeners, authorizer, topics) directly.

The Kubernetes resources' own schemas come from the kubernetes-validate package (PyPI),
which bundles them per Kubernetes version (kubernetes_schema_dir()).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
KEDA_MODULE = "github.com/kedacore/keda/v2@v2.21.0"
PROMETHEUS_OPERATOR_MODULE = "github.com/prometheus-operator/prometheus-operator@v0.85.0"
STRIMZI_KINDS = ("Kafka", "KafkaNodePool", "KafkaTopic")
# (module, directory in it, the CRD files)
MODULE_CRDS = [
    (KEDA_MODULE, "config/crd/bases", ["keda.sh_scaledobjects.yaml", "keda.sh_triggerauthentications.yaml"]),
    (
        PROMETHEUS_OPERATOR_MODULE,
        "example/prometheus-operator-crd",
        ["monitoring.coreos.com_prometheusrules.yaml", "monitoring.coreos.com_podmonitors.yaml"],
    ),
]
# The Kubernetes version validated against (a directory of kubernetes-validate's schemas).
KUBERNETES_VERSION = "1.33.0"


def module_dir(module: str) -> Path:
    """The module's directory in Go's module cache, downloaded through the proxy if absent."""
    # Run here: no go.mod above deploy/k8s, so nothing is recorded anywhere.
    out = subprocess.run(
        ["go", "mod", "download", "-json", module], capture_output=True, text=True, check=False, cwd=HERE
    )
    info = json.loads(out.stdout or "{}")
    if out.returncode != 0 or "Dir" not in info:
        raise RuntimeError(f"go mod download {module} failed: {info.get('Error') or out.stderr}")
    return Path(info["Dir"])


def crd_files() -> list[Path]:
    files: list[Path] = []
    for module, directory, names in MODULE_CRDS:
        root = module_dir(module) / directory
        files += [root / name for name in names]
    return files


COMBINATORS = ("oneOf", "anyOf", "allOf", "not")


def strict(schema: object, branch: bool = False) -> object:
    """openapi2jsonschema's strictness and int-or-string, recursively. A oneOf/anyOf/allOf
    branch is left open: it constrains fields its parent declares (Strimzi's `value` or
    `valueFrom`), and closing it would reject those."""
    if isinstance(schema, list):
        return [strict(item, branch) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value, key in COMBINATORS) for key, value in schema.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["oneOf"] = [{"type": "string"}, {"type": "integer"}]
    preserve = out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and "additionalProperties" not in out and not preserve and not branch:
        out["additionalProperties"] = False
    return out


def json_schemas(crd: dict) -> dict[str, dict]:
    """`<group>/<kind>_<version>.json` -> the JSON schema of each version a CRD serves."""
    spec = crd["spec"]
    kind, group = spec["names"]["kind"], spec["group"]
    out = {}
    for version in spec["versions"]:
        if not version.get("served", True):
            continue
        schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
        schema = strict(schema)
        # The resource's own apiVersion and kind, as kubeconform's converter pins them.
        props = schema.setdefault("properties", {})
        props["apiVersion"] = {"type": "string", "enum": [f"{group}/{version['name']}"]}
        props["kind"] = {"type": "string", "enum": [kind]}
        # metadata: validated by the Kubernetes schemas' ObjectMeta rules elsewhere.
        props["metadata"] = {"type": "object"}
        out[f"{group}/{kind.lower()}_{version['name']}.json"] = schema
    return out


def write(directory: Path) -> list[Path]:
    """The CRDs' schemas under DIR/<group>/, and kubernetes-validate's schemas of
    KUBERNETES_VERSION under DIR/kubernetes/ with their references made absolute file URLs
    (the package's refer to /api/_definitions.json, which kubeconform cannot resolve and then
    reports as a missing schema)."""
    written = []
    source = kubernetes_schema_dir()
    target_dir = (directory / "kubernetes").resolve()
    target_dir.mkdir(parents=True, exist_ok=True)
    definitions = (target_dir / "_definitions.json").as_uri()
    for path in source.glob("*.json"):
        text = path.read_text().replace('"/api/_definitions.json#', f'"{definitions}#')
        (target_dir / path.name).write_text(text)
    written.append(target_dir)
    for path in crd_files():
        for name, schema in json_schemas(yaml.safe_load(path.read_text())).items():
            target = directory / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(schema))
            written.append(target)
    return written


def kubernetes_schema_dir(version: str = KUBERNETES_VERSION) -> Path:
    import kubernetes_validate

    return Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{version}-local-strict"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m deploy.k8s.schemas DIR", file=sys.stderr)
        return 2
    for path in write(Path(args[0])):
        print(path)
    return 0


def kubeconform_args(directory: Path) -> list[str]:
    """kubeconform's schema locations for what write(directory) wrote; strict: unknown
    fields are errors."""
    return [
        "-strict",
        "-skip",
        ",".join(STRIMZI_KINDS),
        "-schema-location",
        f"{directory}/kubernetes/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json",
        "-schema-location",
        f"{directory}/{{{{ .Group }}}}/{{{{ .ResourceKind }}}}_{{{{ .ResourceAPIVersion }}}}.json",
    ]


if __name__ == "__main__":
    sys.exit(main())
