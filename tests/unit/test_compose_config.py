"""The compose project as `docker compose config` resolves it: compose-go (the library Docker
Compose is built on) behind deploy/compose/loader, built by `make compose-tools`. It
interpolates the env file, resolves paths and checks what the JSON schema cannot (a
dependency on no service, an undeclared volume). Then: every file the project mounts or
builds from exists in the repository (a missing bind-mount source would be created empty
by Docker, and the container would start without its config)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.unit.test_compose import COMPOSE_DIR, COMPOSE_FILE
from tests.unit.test_k8s import REPO, tool

ENV_EXAMPLE = COMPOSE_DIR / ".env.example"


def compose_config(compose_file: Path, env_file: Path | None) -> subprocess.CompletedProcess[str]:
    binary = tool("compose-config", "COMPOSE_GO_VERSION")
    args = [binary, *(["--env-file", str(env_file)] if env_file else []), str(compose_file)]
    # No .env of the working directory and no PIPELINE_* of ours leak in: only what is given.
    return subprocess.run(args, capture_output=True, text=True, check=False, cwd=compose_file.parent, env={})


@pytest.fixture(scope="module")
def project() -> dict:
    result = compose_config(COMPOSE_FILE, ENV_EXAMPLE)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_loader_is_built_from_the_makefiles_compose_go_version() -> None:
    go_mod = (REPO / "deploy" / "compose" / "loader" / "go.mod").read_text()
    version = re.search(r"github.com/compose-spec/compose-go/v2 (\S+)", go_mod).group(1)
    assert tool("compose-config", "COMPOSE_GO_VERSION").parent.name == f"compose-config-{version}"


def test_the_project_resolves_with_the_example_env(project: dict) -> None:
    declared = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    # Services behind a profile (pipectl, run on demand) are not in the default project.
    assert set(project["services"]) == {name for name, s in declared.items() if not s.get("profiles")}
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    )
    # The env file's values reach the containers: interpolated, nothing left unresolved.
    environment = json.dumps([s.get("environment") or {} for s in project["services"].values()])
    assert "${" not in environment.replace("$${", "")
    assert example["KAFKA_CLUSTER_ID"] in environment


def test_without_the_env_file_every_secret_is_named_as_missing() -> None:
    result = compose_config(COMPOSE_FILE, None)
    assert result.returncode != 0
    example = [line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines() if "=" in line]
    missing = set(re.findall(r"required variable (\w+) is missing a value", result.stderr))
    assert missing == {name for name in example if not name.startswith("#")}


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (
            lambda d: d["services"]["storage"]["depends_on"].update(
                {"nowhere": {"condition": "service_healthy"}}
            ),
            'service "storage" depends on undefined service "nowhere"',
        ),
        (
            lambda d: d["services"]["storage"].setdefault("volumes", []).append("undeclared:/data"),
            "refers to undefined volume undeclared",
        ),
    ],
    ids=["dependency on no service", "undeclared volume"],
)
def test_an_inconsistent_project_is_refused(tmp_path: Path, change, error: str) -> None:  # type: ignore[no-untyped-def]
    broken = yaml.safe_load(COMPOSE_FILE.read_text())
    change(broken)
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    result = compose_config(path, ENV_EXAMPLE)
    assert result.returncode != 0 and error in result.stderr


def test_every_mounted_file_and_build_context_exists(project: dict) -> None:
    missing = []
    for name, service in project["services"].items():
        for volume in service.get("volumes") or []:
            source = Path(volume["source"])
            # Ours only: a host path such as the Docker socket is the host's business.
            if volume["type"] == "bind" and source.is_relative_to(REPO) and not source.exists():
                missing.append(f"{name}: bind mount {volume['source']}")
        build = service.get("build")
        if build:
            context = Path(build["context"])
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            if not dockerfile.is_file():
                missing.append(f"{name}: {dockerfile}")
    for kind in ("configs", "secrets"):
        for name, item in (project.get(kind) or {}).items():
            if item.get("file") and not Path(item["file"]).exists():
                missing.append(f"{kind} {name}: {item['file']}")
    assert not missing
