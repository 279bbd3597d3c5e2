"""Datasets on an S3-compatible server: moto's server mode on 127.0.0.1.

The server is real (HTTP on loopback, driven by s3fs/botocore exactly as
AWS S3 would be); nothing in the reader is mocked. Credentials and the
endpoint reach s3fs through the usual AWS environment variables.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kd_dagfm.data.convert import CategoricalEncoding, ConvertOptions
from kd_dagfm.data.criteo import convert_criteo
from kd_dagfm.data.reader import ParquetSplit, SplitReader, load_schema
from kd_dagfm.data.writer import write_dataset
from kd_dagfm.errors import DataError, SchemaError, StorageError
from kd_dagfm.phases import Phase
from kd_dagfm.pipeline import run_pipeline
from tests.conftest import shared_path, tiny_config
from tests.test_reader import read_ids, rid_schema, rid_table

BUCKET = "kd-dagfm-test"
# A distinctive secret, to check that it appears in no log line or message.
SECRET_KEY = "kd-dagfm-fake-secret-0123456789"


def aws_environment(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Fake credentials and ``endpoint``; no shared config, no instance metadata."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "kd-dagfm-fake-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 holding an empty bucket, with the AWS
    environment pointing at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as monkeypatch:
        aws_environment(monkeypatch, endpoint)
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    server.stop()


@pytest.fixture(scope="module")
def criteo_on_s3_and_local(
    s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, str]:
    """The Criteo sample converted twice: onto the S3 server and to local disk."""
    options = ConvertOptions(
        encoding=CategoricalEncoding("hash", hash_num_embeddings=1000),
        rows_per_shard=64,
        row_group_rows=32,
    )
    source = str(shared_path("criteo_sample.csv"))
    remote = f"s3://{BUCKET}/criteo"
    local = str(tmp_path_factory.mktemp("criteo-local") / "criteo")
    convert_criteo(source, remote, options)
    convert_criteo(source, local, options)
    return remote, local


def test_reader_streams_same_rows_from_s3(
    s3_endpoint: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    remote, local = f"s3://{BUCKET}/rid", str(tmp_path / "rid")
    for root in (remote, local):
        write_dataset(
            root,
            rid_schema(1000),
            {"train": rid_table(1000)},
            rows_per_shard=300,
            row_group_rows=64,
        )
    with caplog.at_level(logging.DEBUG, logger="kd_dagfm"):
        remote_split = ParquetSplit(remote, "train", load_schema(remote))
        for rank in range(2):
            kwargs = dict(batch_size=40, rank=rank, world_size=2, seed=9)
            from_s3 = read_ids(SplitReader(remote_split, **kwargs))  # type: ignore[arg-type]
            local_split = ParquetSplit(local, "train", load_schema(local))
            from_disk = read_ids(SplitReader(local_split, **kwargs))  # type: ignore[arg-type]
            assert len(from_s3) == len(from_disk) == (1000 // 2) // 40
            for got, want in zip(from_s3, from_disk):
                np.testing.assert_array_equal(got, want)
    assert [s.rsplit("/", 1)[-1] for s in remote_split.shards] == [
        f"part-0000{i}.parquet" for i in range(4)
    ]
    assert SECRET_KEY not in caplog.text


def test_pipeline_trains_alike_from_s3_and_local_disk(
    criteo_on_s3_and_local: tuple[str, str], tmp_path: Path
) -> None:
    results = {}
    for name, dataset in zip(("s3", "local"), criteo_on_s3_and_local):
        config = tiny_config(
            tmp_path / name,
            dataset=dataset,
            train_batch_size=32,
            eval_batch_size=64,
            epochs=1,
        )
        results[name] = run_pipeline(config)
    local = criteo_on_s3_and_local[1]
    test_rows = ParquetSplit(local, "test", load_schema(local)).num_rows
    for remote, local in zip(results["s3"], results["local"]):
        assert remote.phase == local.phase
        assert remote.test.examples == local.test.examples == test_rows
        # Same shard names, so the same order of examples: the same model.
        assert remote.test.auc == pytest.approx(local.test.auc, abs=1e-6)
        assert remote.test.log_loss == pytest.approx(local.test.log_loss, abs=1e-6)
    assert [r.phase for r in results["s3"]] == list(Phase)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_endpoint_fails_fast_naming_url(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    started = time.monotonic()
    with pytest.raises(StorageError) as raised:
        load_schema(f"s3://{BUCKET}/criteo")
    elapsed = time.monotonic() - started
    message = str(raised.value)
    assert f"failed to read s3://{BUCKET}/criteo/schema.json" in message
    assert f"S3 endpoint {dead}, up to 6 attempts with backoff" in message
    assert "EndpointConnectionError" in message
    assert SECRET_KEY not in message
    assert elapsed < 20, f"took {elapsed:.1f} s to give up"


def test_missing_prefix_names_the_dataset(s3_endpoint: str) -> None:
    with pytest.raises(
        SchemaError, match=f"no schema.json in dataset 's3://{BUCKET}/nothing-here'"
    ):
        load_schema(f"s3://{BUCKET}/nothing-here")
    remote = f"s3://{BUCKET}/rid-only-train"
    write_dataset(remote, rid_schema(100), {"train": rid_table(100)})
    with pytest.raises(DataError, match="no Parquet shards in split 'valid'"):
        ParquetSplit(remote, "valid", load_schema(remote))
