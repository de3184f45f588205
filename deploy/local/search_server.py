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
"""

from __future__ import annotations

import os
import pwd
import shutil
import string
import subprocess
from pathlib import Path

import httpx

from deploy.local import tools
from deploy.local.processes import ManagedProcess, StackError, wait_until

ES_VERSION = "8.19.21"  # keep in step with deploy/local/elasticsearch/pom.xml and the Makefile
ES_USER = "pipeline-es"
CONFIG_TEMPLATES = tools.LOCAL / "elasticsearch"
START_TIMEOUT = 180.0  # a cold start takes 10-13 s on the 2-core machine; generous for a busy one


def elasticsearch_home() -> Path:
    """The unpacked distribution; `make deps` puts it there."""
    home = CONFIG_TEMPLATES / "target" / f"elasticsearch-{ES_VERSION}"
    if not (home / "bin" / "elasticsearch").is_file() or not (home / "lib").is_dir():
        raise StackError(f"Elasticsearch {ES_VERSION} is not unpacked at {home}: run `make deps`")
    return home


def ensure_os_user() -> pwd.struct_passwd | None:
    """As root, the system user Elasticsearch runs as (created once); otherwise None (run as we are)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(ES_USER)
    except KeyError:
        pass
    result = subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "--comment",
            "pipeline Elasticsearch (native stack)",
            ES_USER,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    try:  # another stack may have created it at the same moment: that is fine too
        return pwd.getpwnam(ES_USER)
    except KeyError:
        raise StackError(f"creating the OS user {ES_USER} failed: {result.stderr.strip()}") from None


class SearchServer:
    """Single-node Elasticsearch over plain HTTP on 127.0.0.1 (security off: loopback is the boundary)."""

    def __init__(self, root: Path, port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.dir = root / "elasticsearch"
        self.config_dir = self.dir / "config"
        self.data_dir = self.dir / "data"
        self.logs_dir = self.dir / "logs"
        self.tmp_dir = self.dir / "tmp"
        self.process = ManagedProcess("elasticsearch", root / "run", root / "logs")

    def healthy(self) -> bool:
        """Cluster health green or yellow (yellow: replicas unassigned), from this stack's node:
        one serving our data directory, not another server that happens to hold the port."""
        try:
            local = httpx.get(
                f"{self.url}/_nodes/_local/settings",
                params={"filter_path": "nodes.*.settings.path.data"},
                timeout=2,
            )
            health = httpx.get(f"{self.url}/_cluster/health", timeout=2)
            if local.status_code != 200 or health.status_code != 200:
                return False
            nodes = local.json().get("nodes", {}).values()
            data = [n["settings"]["path"]["data"] for n in nodes]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
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
            prefix = self._as_user(user)
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
        wait_until(
            self._up_or_exited,
            timeout=START_TIMEOUT,
            what="Elasticsearch cluster health green or yellow",
            log=self.process.log_file,
            interval=0.5,
        )

    def _up_or_exited(self) -> bool:
        if self.process.exited():
            raise StackError(f"{self.process.name} exited during start; see {self.process.log_file}")
        return self.healthy()

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
        shutil.copyfile(CONFIG_TEMPLATES / "log4j2.properties", self.config_dir / "log4j2.properties")
        for d in (self.dir, self.config_dir):
            d.chmod(0o750)
        if user is not None:
            self._own(user)

    def _own(self, user: pwd.struct_passwd) -> None:
        """The ES user owns <stack>/elasticsearch/ and all in it (it writes its keystore to config/)."""
        ids = (user.pw_uid, user.pw_gid)
        if (os.stat(self.dir).st_uid, os.stat(self.dir).st_gid) != ids:  # new, or made by someone else
            paths = [Path(top) / n for top, dirs, files in os.walk(self.dir) for n in (*dirs, *files)]
        else:
            paths = [self.config_dir / n for n in ("elasticsearch.yml", "jvm.options", "log4j2.properties")]
        for path in [self.dir, self.config_dir, self.data_dir, self.logs_dir, self.tmp_dir, *paths]:
            st = os.lstat(path)
            if (st.st_uid, st.st_gid) != ids:
                os.lchown(path, *ids)

    @staticmethod
    def _as_user(user: pwd.struct_passwd) -> list[str]:
        # setpriv execs in place (no PAM session, no extra process): the pid file names the JVM
        # launcher, and its uid, gid and groups are all the ES user's (Popen's user= keeps root's gid).
        return [
            "setpriv",
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            "--init-groups",
            "--",
        ]

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
            *self._as_user(user),
            "sh",
            "-c",
            'test -r "$1" && test -x "$2" && test -w "$3"',
            "probe",
            str(home / "lib" / f"elasticsearch-{ES_VERSION}.jar"),
            str(home / "bin" / "elasticsearch"),
            str(self.data_dir),
        ]
        return subprocess.run(probe, check=False).returncode == 0
