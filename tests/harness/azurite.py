"""A throwaway Azurite (Azure Blob emulator, npm ``azurite``) on a free loopback port, with
its well-known development account."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from azure.core.exceptions import ResourceExistsError
from azure.storage.blob import BlobServiceClient, ContainerClient

from daemon.config import AzureSettings, StorageSettings
from tests.harness.emulator import REPO_ROOT, Emulator, EmulatorError

#: Azurite's development account (public, documented: it is not a secret)
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azurite_binary() -> Path:
    """``azurite-blob`` as .ci/run installs it (``npm install --prefix .ci/node azurite``)."""
    candidates = [
        os.environ.get("AZURITE_BLOB", ""),
        str(REPO_ROOT / ".ci/node/node_modules/.bin/azurite-blob"),
        shutil.which("azurite-blob") or "",
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise EmulatorError("azurite-blob not found: npm install --prefix .ci/node azurite")


class Azurite(Emulator):
    """Azurite's Blob service, data in memory."""

    name = "azurite"

    def __init__(self, startup_timeout: float = 60.0) -> None:
        super().__init__(startup_timeout)
        self._service: BlobServiceClient | None = None

    def command(self) -> list[str]:
        return [
            str(azurite_binary()),
            "--blobHost=127.0.0.1",
            f"--blobPort={self.port}",
            "--inMemoryPersistence",
            "--silent",
            "--skipApiVersionCheck",
            "--loose",
        ]

    @property
    def url(self) -> str:
        """The Blob service URL (path style: the account is the first path component)."""
        return f"{self.host_url}/{ACCOUNT}"

    @property
    def host_url(self) -> str:
        """Where a fault proxy forwards to."""
        return f"http://127.0.0.1:{self.port}"

    def ready_url(self) -> str:
        return f"{self.url}?comp=list"

    def connection_string(self, url: str | None = None) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
            f"BlobEndpoint={url or self.url};"
        )

    def service(self) -> BlobServiceClient:
        if self._service is None:
            self._service = BlobServiceClient(
                self.url, credential={"account_name": ACCOUNT, "account_key": KEY}
            )
        return self._service

    def _container(self, name: str) -> ContainerClient:
        return self.service().get_container_client(name)

    def create(self, container: str) -> str:
        with contextlib.suppress(ResourceExistsError):
            self._container(container).create_container()
        return container

    def put(self, container: str, key: str, data: bytes) -> None:
        self._container(container).upload_blob(key, data, overwrite=True)

    def get(self, container: str, key: str) -> bytes:
        return self._container(container).download_blob(key).readall()

    def keys(self, container: str, prefix: str = "") -> list[str]:
        return sorted(
            b.name for b in self._container(container).list_blobs(name_starts_with=prefix)
        )

    def settings(
        self, container: str, rootdirectory: str = "", url: str | None = None
    ) -> StorageSettings:
        """The daemon's settings for ``container`` (through ``url``, a fault proxy's
        ``http://host:port``: the account's path is added)."""
        service = f"{url.rstrip('/')}/{ACCOUNT}" if url else self.url
        azure = AzureSettings(
            container=container, accountname=ACCOUNT, accountkey=KEY, serviceurl=service
        )
        return StorageSettings("azure", rootdirectory.strip("/"), azure=azure)

    def registry_config(self, container: str, rootdirectory: str = "", **extra: object) -> dict:
        """A distribution-style config naming this container."""
        section: dict[str, object] = {
            "accountname": ACCOUNT,
            "accountkey": KEY,
            "container": container,
            "serviceurl": self.url,
            **extra,
        }
        if rootdirectory:
            section["rootdirectory"] = "/" + rootdirectory.strip("/")
        return {"version": 0.1, "storage": {"azure": section}}

    def stop(self) -> None:
        if self._service is not None:
            self._service.close()
            self._service = None
        super().stop()
