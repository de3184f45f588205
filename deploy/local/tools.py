"""Where the native stack's programs are. `make deps` installs them; this only finds them."""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

from deploy.local.processes import StackError

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "deploy" / "local"
OPA_VERSION = "v1.22.3"  # keep in step with the Makefile
CACHE = Path(os.environ.get("PIPELINE_CACHE", Path.home() / ".cache" / "pipeline"))


def kafka_classpath() -> str:
    jar = LOCAL / "target" / "spiffe-principal.jar"
    lib = LOCAL / "target" / "lib"
    if not jar.is_file() or not lib.is_dir():
        raise StackError(f"Kafka jars are not built ({jar}, {lib}/): run `make deps`")
    return f"{jar}:{lib}/*"


# The JDKs the stack's Java programs (Kafka, Elasticsearch, S3Proxy) run on when one is
# installed: Java 25's AES-GCM is far cheaper than Java 17's, and TLS is on every connection.
# Profiled with JFR under `make bench`, the broker on Java 17 spent about a third of its CPU
# in GHASH's Java code (AES-GCM's hash). Back-to-back `make bench` runs, Java 17 -> 25, in
# µs of CPU per event at full speed / at 5,000 events/s: the broker 75 -> 67 / 163 -> 106,
# Elasticsearch 145 -> 124 / 159 -> 80. Java 17 (on PATH) still runs everything.
PREFERRED_JDKS = ("/usr/lib/jvm/temurin-25-jdk-amd64", "/usr/lib/jvm/java-25-openjdk-amd64")


def java() -> str:
    """PIPELINE_JAVA_HOME's java, else a preferred JDK's, else JAVA_HOME's, else the PATH's."""
    home = os.environ.get("PIPELINE_JAVA_HOME") or next(
        (jdk for jdk in PREFERRED_JDKS if Path(jdk, "bin", "java").is_file()), os.environ.get("JAVA_HOME")
    )
    path = f"{home}/bin/java" if home else shutil.which("java")
    if not path or not Path(path).is_file():
        raise StackError(
            "java not found (Java 17 or newer): set PIPELINE_JAVA_HOME or JAVA_HOME, or install openjdk-17-jre"
        )
    return path


def opa() -> str:
    path = Path(os.environ.get("PIPELINE_OPA_BIN", CACHE / f"opa-{OPA_VERSION}" / "opa"))
    if not path.is_file():
        raise StackError(f"OPA {OPA_VERSION} not found at {path}: run `make deps`")
    return str(path)


def postgres_bindir() -> Path:
    """The newest PostgreSQL server's bin directory (Debian's layout first)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=_major, reverse=True)
    found = shutil.which("postgres")
    if found:
        candidates.append(found)
    if not candidates:
        raise StackError("PostgreSQL server not found: run `make deps` (Debian package postgresql)")
    return Path(candidates[0]).resolve().parent


def _major(path: str) -> int:
    try:
        return int(Path(path).parts[-3])
    except ValueError:
        return 0


SPIRE_VERSION = "v1.13.3"  # keep in step with the Makefile


def spire(program: str) -> str:
    """spire-server or spire-agent, built by `make deps` from deploy/local/spire/go.mod."""
    path = CACHE / f"spire-{SPIRE_VERSION}" / "bin" / program
    if not path.is_file():
        raise StackError(f"SPIRE {SPIRE_VERSION} ({program}) not found at {path}: run `make deps`")
    return str(path)


JAEGER_VERSION = (
    "v1.76.0"  # the module's version: its cmd/jaeger is Jaeger v2; keep in step with the Makefile
)


def jaeger() -> str:
    """Jaeger v2 (the trace backend), built by `make deps` from deploy/local/jaeger/go.mod."""
    path = CACHE / f"jaeger-{JAEGER_VERSION}" / "bin" / "jaeger"
    if not path.is_file():
        raise StackError(f"Jaeger {JAEGER_VERSION} not found at {path}: run `make jaeger`")
    return str(path)
