"""The native stack's S3: S3Proxy on loopback with its filesystem backend, as a local process.

S3Proxy (org.gaul:s3proxy, pinned in deploy/local/s3/pom.xml) speaks the S3 REST API and keeps
each bucket as a directory and each object as a file under <stack>/s3/data/. `make deps`
copies its runtime classpath into deploy/local/s3/target/lib, apart from Kafka's jars. Every
request must be signed with AWS signature v4 and the stack's access key; there is no anonymous
access. Its configuration (with the secret key, mode 0600) is written to
<stack>/s3/s3proxy.properties at each start; its output goes to <stack>/logs/s3.log.

Clients: endpoint `http://127.0.0.1:<port>`, any region (S3Proxy checks the signature with the
region the client signed for; `us-east-1` is the convention), path-style addressing.
"""

from __future__ import annotations

import os
from pathlib import Path

import boto3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from deploy.local import tools
from deploy.local.processes import ManagedProcess, StackError

S3_DIR = tools.LOCAL / "s3"
LOGBACK = S3_DIR / "logback.xml"
REGION = "us-east-1"
START_TIMEOUT = 120.0  # a cold start takes ~2-3 s; the margin is for a loaded machine
# Heap: objects are streamed to disk, not held in memory; 512 MiB leaves room for many
# concurrent uploads. Exit on OOM so the stack sees a dead process, not a wedged one.
JAVA_OPTS = ("-Xms64m", "-Xmx512m", "-XX:+UseSerialGC", "-XX:+ExitOnOutOfMemoryError")


def s3proxy_classpath() -> str:
    """S3Proxy's jar and its runtime dependencies; `make deps` builds them."""
    lib = S3_DIR / "target" / "lib"
    if not list(lib.glob("s3proxy-*.jar")):
        raise StackError(f"S3Proxy jars are not built ({lib}/): run `make deps`")
    return f"{lib}/*"


def s3_jars_built() -> bool:
    try:
        s3proxy_classpath()
    except StackError:
        return False
    return True


def client_config(**overrides: object) -> Config:
    """botocore settings for this server: SigV4, path-style addressing (works for aioboto3 too)."""
    settings: dict[str, object] = {
        "signature_version": "s3v4",
        "s3": {"addressing_style": "path"},
        "retries": {"max_attempts": 3, "mode": "standard"},
    }
    settings.update(overrides)
    return Config(**settings)  # type: ignore[arg-type]


class S3Server:
    """S3Proxy (filesystem backend) on 127.0.0.1:<port>, SigV4 authentication with one key pair."""

    def __init__(self, root: Path, port: int, access_key: str, secret_key: str):
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.access_key = access_key
        self.secret_key = secret_key
        self.dir = root / "s3"
        self.data_dir = self.dir / "data"
        self.config_file = self.dir / "s3proxy.properties"
        self.process = ManagedProcess("s3", root / "run", root / "logs")
        self._client: BaseClient | None = None

    def client(self, **config: object) -> BaseClient:
        """A boto3 S3 client for this server with the stack's keys."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
            config=client_config(**config),
        )

    def healthy(self) -> bool:
        """A signed ListBuckets succeeds: the server answers and accepts this stack's keys."""
        if self._client is None:
            self._client = self.client(
                connect_timeout=2, read_timeout=2, retries={"max_attempts": 1, "mode": "standard"}
            )
        try:
            self._client.list_buckets()
        except (BotoCoreError, ClientError):
            return False
        return True

    def start(self) -> None:
        classpath = s3proxy_classpath()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)  # the lake's objects and the server's keys: the stack's user's only
        self._write_config()
        self.process.start(
            [
                tools.java(),
                *JAVA_OPTS,
                f"-Dlogback.configurationFile={LOGBACK}",
                "-cp",
                classpath,
                "org.gaul.s3proxy.Main",
                "--properties",
                str(self.config_file),
            ]
        )
        self.process.wait_healthy(
            self.healthy, timeout=START_TIMEOUT, what="S3Proxy answering signed S3 requests"
        )

    def ensure_bucket(self, bucket: str) -> bool:
        """Create the bucket unless it exists; True if this call created it."""
        client = self.client()
        try:
            client.head_bucket(Bucket=bucket)
            return False
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise StackError(f"S3 bucket {bucket}: {e}") from e
        try:
            client.create_bucket(Bucket=bucket)
        except ClientError as e:  # created by someone else in between: fine
            if e.response.get("Error", {}).get("Code") in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return False
            raise StackError(f"creating S3 bucket {bucket} failed: {e}") from e
        return True

    def _write_config(self) -> None:
        properties = {
            "s3proxy.endpoint": self.endpoint,  # binds this address only: loopback
            "s3proxy.authorization": "aws-v4",
            "s3proxy.identity": self.access_key,
            "s3proxy.credential": self.secret_key,
            "jclouds.provider": "filesystem-nio2",
            "jclouds.filesystem.basedir": str(self.data_dir),
        }
        text = "".join(f"{k}={_escape(v)}\n" for k, v in properties.items())
        fd = os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("# written by deploy/local/s3server.py at each start\n" + text)


def _escape(value: str) -> str:
    """A java.util.Properties value: backslashes and leading spaces would otherwise change it."""
    escaped = value.replace("\\", "\\\\").replace("\n", "\\n")
    return "\\" + escaped if escaped.startswith(" ") else escaped
