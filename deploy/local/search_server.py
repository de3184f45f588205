"""The native stack's Elasticsearch: one single-node server on loopback, as a local process.

The distribution is Maven Central's integ-test-zip (`make deps` unpacks it into
deploy/local/elasticsearch/target/); it has no bundled JDK and runs on the machine's Java 17.
Its configuration (elasticsearch.yml, jvm.options, log4j2.properties from
deploy/local/elasticsearch/) is written to <stack>/elasticsearch/config/; data, Elasticsearch's
own logs (GC log) and temporary files live beside it. Console output goes to
<stack>/logs/elasticsearch.log like every other component's.

Elasticsearch refuses to run as root: as root, it runs as the system user `pipeline-es`
(created here once, with useradd), which owns <stack>/elasticsearch/ and must be able to
read the distribution and traverse the directories above the stack root.

Security is on: HTTPS only, with the node's SVID from SPIRE (it names localhost) written to
config/tls/ and rewritten at every renewal, which Elasticsearch watches and reloads; basic auth against the file realm, whose users (USERS)
this module writes at each start with the passwords it is given, PBKDF2-hashed; their roles
are roles.yml beside the templates. Nothing is anonymous.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import secrets
import shutil
import ssl
import string
import subprocess
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from deploy.local import devca, tools
from deploy.local.os_users import as_user, ensure_system_user
from deploy.local.processes import ManagedProcess, StackError

ES_VERSION = "8.19.21"  # keep in step with deploy/local/elasticsearch/pom.xml and the Makefile
ES_USER = "pipeline-es"
CONFIG_TEMPLATES = tools.LOCAL / "elasticsearch"
START_TIMEOUT = 180.0  # a cold start takes 10-13 s on the 2-core machine; generous for a busy one
# The file realm's users, each with its one role (roles.yml, or built in: superuser). The
# stack keeps their passwords (stack.json) and hands each only to who acts as that user.
ADMIN_USER = "pipeline-admin"  # the stack itself: health checks, tests that clean up
WRITER_USER = "pipeline-storage"  # the storage service's search sink
READER_USER = "pipeline-operator"  # the operator: .stack/env, pipectl status
USERS = {ADMIN_USER: "superuser", WRITER_USER: "pipeline_writer", READER_USER: "pipeline_reader"}
# PBKDF2 cost of the users file: Elasticsearch's default. The passwords are 192 random bits,
# so stretching buys nothing here; the realm caches a verified password, so it costs once.
PBKDF2_ITERATIONS = 10_000
# The transport layer's own CA and certificate, made at each start and used by this node
# alone: long enough that a node running for months never sees them expire.
TRANSPORT_VALIDITY = timedelta(days=3650)


def password_hash(password: str, iterations: int = PBKDF2_ITERATIONS) -> str:
    """A users-file hash in Elasticsearch's PBKDF2 format, which the file realm recognises
    by its prefix: {PBKDF2}<iterations>$<salt>$<key>, PBKDF2-HMAC-SHA512 with a 32-byte
    salt and a 32-byte key, both base64."""
    salt = secrets.token_bytes(32)
    key = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, dklen=32)
    return f"{{PBKDF2}}{iterations}${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"


def client_tls(ca_file: Path) -> ssl.SSLContext:
    """A client context that trusts only the stack's CA (and checks the host name)."""
    return ssl.create_default_context(cafile=str(ca_file))


def elasticsearch_home() -> Path:
    """The unpacked distribution; `make deps` puts it there."""
    home = CONFIG_TEMPLATES / "target" / f"elasticsearch-{ES_VERSION}"
    if not (home / "bin" / "elasticsearch").is_file() or not (home / "lib").is_dir():
        raise StackError(f"Elasticsearch {ES_VERSION} is not unpacked at {home}: run `make deps`")
    return home


def ensure_os_user() -> pwd.struct_passwd | None:
    """As root, the system user Elasticsearch runs as (created once); otherwise None (run as we are)."""
    return ensure_system_user(ES_USER, "pipeline Elasticsearch (native stack)")


class SearchServer:
    """Single-node Elasticsearch over HTTPS on loopback, file-realm users with basic auth.

    Its certificate is its SVID, which the stack keeps written to config/tls/ (svid.pem,
    key.pem, bundle.pem: deploy/local/spire_stack.py SvidFiles, as the ES user) before the
    node starts and at every renewal; passwords: the password of each of USERS.
    """

    def __init__(self, root: Path, port: int, passwords: Mapping[str, str]):
        missing = set(USERS) - set(passwords)
        if missing:
            raise StackError(f"no Elasticsearch password for {', '.join(sorted(missing))}")
        self.port = port
        # The name its SVID carries (SPIRE issues DNS names, not IP addresses).
        self.url = f"https://localhost:{port}"
        self.passwords = dict(passwords)
        self.dir = root / "elasticsearch"
        self.config_dir = self.dir / "config"
        self.tls_dir = self.config_dir / "tls"
        # The trust bundle beside the SVID: what the stack (and the operator, who may read
        # it) verify the node with; rewritten with the SVID, so it follows CA rotations.
        self.ca_file = self.tls_dir / "bundle.pem"
        self.data_dir = self.dir / "data"
        self.logs_dir = self.dir / "logs"
        self.tmp_dir = self.dir / "tmp"
        self.process = ManagedProcess("elasticsearch", root / "run", root / "logs")

    def credentials(self, user: str) -> tuple[str, str]:
        """(user, password) for basic auth as one of USERS."""
        return user, self.passwords[user]

    def healthy(self) -> bool:
        """Cluster health green or yellow (yellow: replicas unassigned), from this stack's node:
        one serving our data directory, not another server that happens to hold the port
        (asked as the admin user, over TLS verified against the stack's CA)."""
        try:
            with httpx.Client(
                verify=client_tls(self.ca_file), auth=self.credentials(ADMIN_USER), timeout=2
            ) as client:
                local = client.get(
                    f"{self.url}/_nodes/_local/settings",
                    params={"filter_path": "nodes.*.settings.path.data"},
                )
                health = client.get(f"{self.url}/_cluster/health")
            if local.status_code != 200 or health.status_code != 200:
                return False
            nodes = local.json().get("nodes", {}).values()
            data = [n["settings"]["path"]["data"] for n in nodes]
        except (httpx.HTTPError, OSError, ValueError, KeyError, TypeError):
            return False
        mine = {str(self.data_dir), str(self.data_dir.resolve())}
        ours = any(mine & set([d] if isinstance(d, str) else d) for d in data)
        return ours and health.json().get("status") in ("green", "yellow")

    def start(self) -> None:
        home = elasticsearch_home()
        java_home = Path(tools.java()).resolve().parents[1]
        user = ensure_os_user()
        self._configure(user)
        prefix: list[str] = []
        if user is not None:
            home = self._readable_home(user, home)
            prefix = as_user(user)
        self.process.start(
            [*prefix, str(home / "bin" / "elasticsearch")],
            env={
                "ES_JAVA_HOME": str(java_home),
                "ES_PATH_CONF": str(self.config_dir),
                "ES_TMPDIR": str(self.tmp_dir),
                "ES_JAVA_OPTS": "",  # the heap and the rest are in our jvm.options
                "JAVA_HOME": "",  # else the start script warns that it ignores it
                "HOME": str(self.dir),
            },
            cwd=self.dir,
        )
        self.process.wait_healthy(
            self.healthy,
            timeout=START_TIMEOUT,
            what="Elasticsearch cluster health green or yellow",
            interval=0.5,
        )

    def _configure(self, user: pwd.struct_passwd | None) -> None:
        for d in (self.dir, self.config_dir, self.data_dir, self.logs_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        values = {
            "http_port": self.port,
            "data_dir": self.data_dir,
            "logs_dir": self.logs_dir,
            "tmp_dir": self.tmp_dir,
        }
        for name in ("elasticsearch.yml", "jvm.options"):
            text = string.Template((CONFIG_TEMPLATES / name).read_text()).substitute(values)
            (self.config_dir / name).write_text(text)
        for name in ("log4j2.properties", "roles.yml"):
            shutil.copyfile(CONFIG_TEMPLATES / name, self.config_dir / name)
        self._write_users(user)
        self._write_transport_tls(user)
        for d in (self.dir, self.config_dir):
            d.chmod(0o750)
        if user is not None:
            self._own(user)

    def _write_users(self, user: pwd.struct_passwd | None) -> None:
        """The file realm's users (hashed passwords, readable by the ES user only) and roles."""
        users = "".join(f"{name}:{password_hash(self.passwords[name])}\n" for name in USERS)
        _replace(self.config_dir / "users", users.encode(), 0o600, user)
        roles: dict[str, list[str]] = {}
        for name, role in USERS.items():
            roles.setdefault(role, []).append(name)
        users_roles = "".join(f"{role}:{','.join(names)}\n" for role, names in roles.items())
        _replace(self.config_dir / "users_roles", users_roles.encode(), 0o644, user)

    def _write_transport_tls(self, user: pwd.struct_passwd | None) -> None:
        """A CA for this node alone and the node's transport certificate from it; the CA's
        key is dropped, so no other certificate can ever be made that the transport trusts."""
        ca = devca.create_ca("transport.elasticsearch.invalid", validity=TRANSPORT_VALIDITY)
        key_pem, cert_pem = devca.issue_certificate(
            ca,
            dns_names=["localhost"],
            ip_addresses=["127.0.0.1"],
            not_after=datetime.now(UTC) + TRANSPORT_VALIDITY,
        )
        target = self.config_dir / "transport"
        target.mkdir(parents=True, exist_ok=True)
        _replace(target / "ca.pem", ca.bundle_pem, 0o644, user)
        _replace(target / "node.pem", cert_pem, 0o644, user)
        _replace(target / "node-key.pem", key_pem, 0o600, user)

    def _own(self, user: pwd.struct_passwd) -> None:
        """The ES user owns <stack>/elasticsearch/ and all in it (it writes its keystore to config/)."""
        ids = (user.pw_uid, user.pw_gid)
        # All of it when new (or made by someone else), else config/, which each start rewrites.
        ours = (os.stat(self.dir).st_uid, os.stat(self.dir).st_gid) == ids
        top = self.config_dir if ours else self.dir
        paths = [Path(d) / n for d, dirs, files in os.walk(top) for n in (*dirs, *files)]
        for path in [self.dir, self.config_dir, self.data_dir, self.logs_dir, self.tmp_dir, *paths]:
            st = os.lstat(path)
            if (st.st_uid, st.st_gid) != ids:
                os.lchown(path, *ids)

    def _readable_home(self, user: pwd.struct_passwd, home: Path) -> Path:
        """The distribution as the ES user can reach it: in place when the directories above it
        let others through; else (a checkout under a private home) a hard-linked mirror beside
        the stack's data, made once per stack root (a copy across file systems)."""
        if self._can_use(user, home):
            return home
        mirror = self.dir.parent / f"elasticsearch-{ES_VERSION}"
        if not (mirror / "bin" / "elasticsearch").is_file():
            partial = mirror.with_name(mirror.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            try:
                shutil.copytree(home, partial, symlinks=True, copy_function=os.link)
            except (OSError, shutil.Error):
                shutil.rmtree(partial, ignore_errors=True)
                shutil.copytree(home, partial, symlinks=True)
            partial.chmod(0o755)
            partial.rename(mirror)
        if self._can_use(user, mirror):
            return mirror
        raise StackError(
            f"the OS user {ES_USER} cannot read {home} or write {self.data_dir}: every directory "
            "above them must be traversable by others (chmod o+x)"
        )

    def _can_use(self, user: pwd.struct_passwd, home: Path) -> bool:
        probe = [
            *as_user(user),
            "sh",
            "-c",
            'test -r "$1" && test -x "$2" && test -w "$3"',
            "probe",
            str(home / "lib" / f"elasticsearch-{ES_VERSION}.jar"),
            str(home / "bin" / "elasticsearch"),
            str(self.data_dir),
        ]
        return subprocess.run(probe, check=False).returncode == 0


def _replace(path: Path, data: bytes, mode: int, user: pwd.struct_passwd | None) -> None:
    """Write a file whole: a temporary file beside it, with its mode and owner set, renamed
    over it (a reader sees the old file or the new one, never a part)."""
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(partial, mode)
    if user is not None:
        os.chown(partial, user.pw_uid, user.pw_gid)
    os.replace(partial, path)
