"""The native stack's S3 server (S3Proxy, filesystem backend) on its own, in a temporary root.

Self-contained (no session stack): one server per module on a free port, stopped at the end.
Prints the cold start time and the upload rate (`pytest -s` shows them).
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aioboto3
import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError

from deploy.local import s3server
from deploy.local.processes import StackError
from deploy.local.s3server import REGION, S3Server, client_config
from deploy.local.stack import free_ports

ACCESS_KEY = "pipeline-test"
SECRET_KEY = "test-secret-key-0123456789"
BUCKET = "pipeline-lake-test"


def _new_server(root: Path) -> S3Server:
    return S3Server(root, free_ports(("s3",))["s3"], ACCESS_KEY, SECRET_KEY)


@pytest.fixture(scope="module")
def server() -> Iterator[S3Server]:
    root = Path(tempfile.mkdtemp(prefix="pipeline-test-s3-"))
    s3 = _new_server(root)
    try:
        started = time.monotonic()
        s3.start()
        print(f"\n[s3] cold start to healthy: {time.monotonic() - started:.1f}s")
        s3.ensure_bucket(BUCKET)
        yield s3
    finally:
        s3.process.stop()
        shutil.rmtree(root, ignore_errors=True)


def _keys(client, bucket: str, prefix: str = "") -> list[str]:  # type: ignore[no-untyped-def]
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_put_get_list_with_boto3(server: S3Server) -> None:
    client = server.client()
    body = b'{"event_id": "e1"}\n' * 100
    client.put_object(Bucket=BUCKET, Key="boto3/day=2026-11-26/part-0.jsonl", Body=body)
    client.put_object(Bucket=BUCKET, Key="boto3/day=2026-11-27/part-0.jsonl", Body=b"x")

    got = client.get_object(Bucket=BUCKET, Key="boto3/day=2026-11-26/part-0.jsonl")
    assert got["Body"].read() == body
    assert got["ContentLength"] == len(body)
    assert _keys(client, BUCKET, "boto3/") == [
        "boto3/day=2026-11-26/part-0.jsonl",
        "boto3/day=2026-11-27/part-0.jsonl",
    ]
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix="boto3/", Delimiter="/")
    assert [p["Prefix"] for p in listed["CommonPrefixes"]] == [
        "boto3/day=2026-11-26/",
        "boto3/day=2026-11-27/",
    ]


def test_put_get_list_with_aioboto3(server: S3Server) -> None:
    async def run() -> tuple[bytes, list[str], dict[str, str]]:
        session = aioboto3.Session(
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=REGION
        )
        async with session.client("s3", endpoint_url=server.endpoint, config=client_config()) as s3:
            await asyncio.gather(
                *(
                    s3.put_object(
                        Bucket=BUCKET,
                        Key=f"aio/part-{i}.bin",
                        Body=bytes([i]) * 1000,
                        ContentType="application/octet-stream",
                        Metadata={"rows": str(i)},
                    )
                    for i in range(5)
                )
            )
            got = await s3.get_object(Bucket=BUCKET, Key="aio/part-3.bin")
            async with got["Body"] as stream:
                body = await stream.read()
            listed = await s3.list_objects_v2(Bucket=BUCKET, Prefix="aio/")
            return body, [o["Key"] for o in listed["Contents"]], got["Metadata"]

    body, keys, metadata = asyncio.run(run())
    assert body == bytes([3]) * 1000
    assert keys == [f"aio/part-{i}.bin" for i in range(5)]
    assert metadata == {"rows": "3"}


def test_overwrite_keeps_one_object(server: S3Server) -> None:
    client = server.client()
    for version in (b"first", b"second, longer", b"third"):
        client.put_object(Bucket=BUCKET, Key="overwrite/obj", Body=version)
    assert _keys(client, BUCKET, "overwrite/") == ["overwrite/obj"]
    assert client.get_object(Bucket=BUCKET, Key="overwrite/obj")["Body"].read() == b"third"


def test_wrong_secret_key_is_refused(server: S3Server) -> None:
    wrong = S3Server(server.dir.parent, server.port, ACCESS_KEY, SECRET_KEY + "x").client(
        retries={"max_attempts": 1, "mode": "standard"}
    )
    with pytest.raises(ClientError) as refused:
        wrong.put_object(Bucket=BUCKET, Key="wrong/obj", Body=b"no")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert refused.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    with pytest.raises(ClientError) as listing:
        wrong.list_objects_v2(Bucket=BUCKET)
    assert listing.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert _keys(server.client(), BUCKET, "wrong/") == []

    unknown = S3Server(server.dir.parent, server.port, "someone-else", SECRET_KEY).client(
        retries={"max_attempts": 1, "mode": "standard"}
    )
    with pytest.raises(ClientError) as unknown_key:
        unknown.get_object(Bucket=BUCKET, Key="overwrite/obj")
    assert unknown_key.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_anonymous_request_is_refused(server: S3Server) -> None:
    for url in (
        f"{server.endpoint}/",
        f"{server.endpoint}/{BUCKET}",
        f"{server.endpoint}/{BUCKET}/overwrite/obj",
    ):
        response = httpx.get(url, timeout=5)
        assert response.status_code == 403, url
        assert b"AccessDenied" in response.content
    assert httpx.put(f"{server.endpoint}/{BUCKET}/anon", content=b"x", timeout=5).status_code == 403


def test_listens_on_loopback_only(server: S3Server) -> None:
    other = _non_loopback_address()
    if other is None:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    with pytest.raises(OSError), socket.create_connection((other, server.port), timeout=2):
        pass


def test_config_with_the_secret_is_private(server: S3Server) -> None:
    mode = stat.S_IMODE(os.stat(server.config_file).st_mode)
    assert mode == 0o600
    assert "s3proxy.authorization=aws-v4" in server.config_file.read_text()


def test_parquet_round_trip(server: S3Server) -> None:
    table = pa.table(
        {
            "event_id": pa.array([f"e{i}" for i in range(1000)]),
            "user_id": pa.array([f"u{i % 17}" for i in range(1000)]),
            "timestamp": pa.array(
                [1_764_165_787_000_000 + i for i in range(1000)], pa.timestamp("us", tz="UTC")
            ),
            "properties": pa.array(['{"a": [1, 2, {"b": null}]}'] * 1000),
            "user_known": pa.array([i % 2 == 0 for i in range(1000)]),
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    data = buffer.getvalue()

    client = server.client()
    key = "parquet/event_type=page_view/day=2026-11-26/part-00000.parquet"
    client.put_object(Bucket=BUCKET, Key=key, Body=data, ContentType="application/vnd.apache.parquet")
    got = client.get_object(Bucket=BUCKET, Key=key)
    fetched = got["Body"].read()
    assert fetched == data
    assert got["ContentType"] == "application/vnd.apache.parquet"
    back = pq.read_table(io.BytesIO(fetched))
    assert back.equals(table)
    assert back.schema == table.schema


def test_ensure_bucket_is_idempotent(server: S3Server) -> None:
    assert server.ensure_bucket("pipeline-new-bucket") is True
    assert server.ensure_bucket("pipeline-new-bucket") is False
    assert server.ensure_bucket("pipeline-new-bucket") is False
    names = [b["Name"] for b in server.client().list_buckets()["Buckets"]]
    assert names.count("pipeline-new-bucket") == 1


def test_upload_throughput(server: S3Server) -> None:
    client = server.client()
    payloads = [os.urandom(5 * 1024 * 1024) for _ in range(10)]
    started = time.monotonic()
    for i, payload in enumerate(payloads):
        client.put_object(Bucket=BUCKET, Key=f"bulk/obj-{i}", Body=payload)
    elapsed = time.monotonic() - started
    print(f"\n[s3] boto3 sequential put_object 10 x 5 MiB: {elapsed:.2f}s, {50 / elapsed:.0f} MiB/s")

    async def concurrent() -> float:
        session = aioboto3.Session(
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=REGION
        )
        async with session.client("s3", endpoint_url=server.endpoint, config=client_config()) as s3:
            t = time.monotonic()
            await asyncio.gather(
                *(
                    s3.put_object(Bucket=BUCKET, Key=f"bulk-aio/obj-{i}", Body=p)
                    for i, p in enumerate(payloads)
                )
            )
            return time.monotonic() - t

    elapsed_aio = asyncio.run(concurrent())
    print(f"[s3] aioboto3 concurrent put_object 10 x 5 MiB: {elapsed_aio:.2f}s, {50 / elapsed_aio:.0f} MiB/s")

    assert len(_keys(client, BUCKET, "bulk/")) == 10
    assert client.get_object(Bucket=BUCKET, Key="bulk/obj-7")["Body"].read() == payloads[7]
    assert client.get_object(Bucket=BUCKET, Key="bulk-aio/obj-3")["Body"].read() == payloads[3]


def test_data_survives_a_restart() -> None:
    root = Path(tempfile.mkdtemp(prefix="pipeline-test-s3-restart-"))
    s3 = _new_server(root)
    try:
        s3.start()
        assert s3.ensure_bucket("kept") is True
        s3.client().put_object(Bucket="kept", Key="k", Body=b"still here")
        s3.process.stop()
        assert not s3.healthy()
        started = time.monotonic()
        s3.start()
        print(f"\n[s3] warm restart to healthy: {time.monotonic() - started:.1f}s")
        assert s3.ensure_bucket("kept") is False
        assert s3.client().get_object(Bucket="kept", Key="k")["Body"].read() == b"still here"
    finally:
        s3.process.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_missing_jars_name_make_deps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(s3server, "S3_DIR", tmp_path)
    assert s3server.s3_jars_built() is False
    with pytest.raises(StackError, match="make deps"):
        s3server.s3proxy_classpath()


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET: no packet is sent, only a route chosen
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_start_failure_names_the_log(tmp_path: Path) -> None:
    s3 = _new_server(tmp_path)
    with socket.socket() as taken:  # someone else holds the port: S3Proxy cannot bind and exits
        taken.bind(("127.0.0.1", s3.port))
        taken.listen()
        try:
            with pytest.raises(StackError, match=r"s3 exited during start; see .*s3\.log"):
                s3.start()
        finally:
            s3.process.stop()
