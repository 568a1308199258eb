"""Recover (openshift source; OpenShift's ``-restore-mode=recover``): manifests in the store
that no Image object of their image stream accounts for, re-registered under
``lost-found-<hex>`` tags through ImageStreamMappings. The check form only lists them."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import aiohttp
import structlog

from daemon import kube, layout
from daemon.findings import Finding, Recovered
from daemon.inventory import Inventory
from daemon.progress import Progress
from daemon.sources.base import SourceError
from daemon.sources.openshift import OpenShiftSource, _reachable, _status_message, stream_key
from daemon.sources.openshift_objects import DEFAULT_REGISTRY, StreamRecord, list_stream_records
from daemon.storage.base import NotFound, Storage, StorageError
from daemon.verify import MANIFEST_LIMIT, RECOVER, chunked
from daemon.workers import in_parallel

CONFIG_LIMIT = 16 * 1024 * 1024
CREATE_MAPPINGS = "create imagestreammappings.image.openshift.io"
SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
SCHEMA1_LAYER = "application/vnd.docker.container.image.rootfs.diff+x-gtar"


def media_type(doc: dict[str, Any]) -> str:
    if doc.get("schemaVersion") == 1:
        return SCHEMA1_SIGNED if "signatures" in doc else SCHEMA1
    found = doc.get("mediaType")
    if isinstance(found, str) and found:
        return found
    return OCI_INDEX if isinstance(doc.get("manifests"), list) else OCI_MANIFEST


def image_object(
    digest: str, repository: str, registry: str, payload: bytes, config: bytes | None
) -> dict[str, Any]:
    """The Image the original builds from a manifest in storage (restore.go's Storage)."""
    doc = json.loads(payload)
    kind = media_type(doc)
    layers: list[dict[str, Any]] = []
    for layer in doc.get("layers") or []:
        layers.append(
            {
                "name": layer.get("digest"),
                "size": layer.get("size", 0),
                "mediaType": layer.get("mediaType", ""),
            }
        )
    for layer in reversed(doc.get("fsLayers") or []):
        layers.append({"name": layer.get("blobSum"), "size": 0, "mediaType": SCHEMA1_LAYER})
    image: dict[str, Any] = {
        "kind": "Image",
        "apiVersion": "image.openshift.io/v1",
        "metadata": {
            "name": digest,
            "annotations": {
                "openshift.io/image.managed": "true",
                "image.openshift.io/manifestBlobStored": "true",
                "image.openshift.io/dockerLayersOrder": "ascending",
            },
        },
        "dockerImageReference": f"{registry}/{repository}@{digest}",
        "dockerImageManifest": payload.decode("utf-8", "replace"),
        "dockerImageManifestMediaType": kind,
        "dockerImageLayers": layers,
    }
    if config is not None:
        image["dockerImageConfig"] = config.decode("utf-8", "replace")
    if isinstance(doc.get("manifests"), list):
        image["dockerImageManifests"] = [
            {
                "digest": child.get("digest"),
                "mediaType": child.get("mediaType", ""),
                "manifestSize": child.get("size", 0),
                "architecture": (child.get("platform") or {}).get("architecture", ""),
                "os": (child.get("platform") or {}).get("os", ""),
                "variant": (child.get("platform") or {}).get("variant", ""),
            }
            for child in doc["manifests"]
            if isinstance(child, dict)
        ]
    return image


class Recovery:
    name = RECOVER

    def __init__(
        self,
        storage: Storage,
        source: Any,
        progress: Progress,
        report: Callable[[Finding], None],
        *,
        apply: bool = False,
        log: structlog.typing.FilteringBoundLogger | None = None,
        workers: int = 16,
    ) -> None:
        if not isinstance(source, OpenShiftSource):
            raise SourceError(
                "mode=recover needs the openshift source (--source openshift): it re-registers "
                "manifests that have no Image object in the cluster"
            )
        self.storage = storage
        self.source = source
        self.progress = progress
        self.report = report
        self.apply = apply
        self.log = log or structlog.get_logger()
        self.workers = max(1, workers)
        self.result = Recovered(applied=apply)
        self.errors: list[str] = []

    async def run(self, inventory: Inventory) -> Recovered:
        self.progress.enter(self.name)
        revisions = await self._revisions(inventory)
        index = await self.source.list_images(self.progress)
        streams = await list_stream_records(self.source)
        for repo in sorted(revisions):
            key = stream_key(repo)
            if key is None:
                # the original logs "failed to parse the image reference" and goes on
                self.log.warning("not an image stream name; skipped", repository=repo)
                self.result.skipped += len(revisions[repo])
                continue
            stream = streams.get(key)
            history = set()
            if stream is not None:
                for text in stream.history():
                    try:
                        history.add(layout.parse_digest(text))
                    except layout.InvalidDigest:
                        continue
            keep = _reachable(history, index)
            for raw in sorted(revisions[repo]):
                if raw not in keep:
                    await self._lost(repo, raw, stream)
        return self.result

    def verdict(self) -> None:
        if self.errors:
            raise SourceError(
                f"{len(self.errors)} of {self.result.lost} lost-found mappings could not be "
                f"created: {'; '.join(self.errors[:5])}"
            )

    async def _revisions(self, inventory: Inventory) -> dict[str, set[bytes]]:
        pairs = [
            (repo.name, hexdigest)
            for repo in inventory.repositories.values()
            for hexdigest in sorted(repo.revisions)
        ]
        found: dict[str, set[bytes]] = {}

        async def read(chunk: list[tuple[str, str]]) -> None:
            keys = [layout.revision_dir(r, h) + "link" for r, h in chunk]
            links = await self.storage.read_parsed(keys, 1024, layout.link_digest)
            for (repo, hexdigest), raw in zip(chunk, links, strict=True):
                if isinstance(raw, bytes) and raw.hex() == hexdigest:
                    found.setdefault(repo, set()).add(raw)

        await in_parallel(chunked(pairs), read, self.workers)
        return found

    async def _lost(self, repo: str, raw: bytes, stream: StreamRecord | None) -> None:
        digest = layout.format_digest(raw)
        tag = "lost-found-" + raw.hex()
        self.result.lost += 1
        would = f'Would add image "{digest}" to imagestream "{repo}" with tag "{tag}"'
        reason = "no Image object of the image stream accounts for this manifest"
        if not self.apply:
            self.report(Finding("lost-found", repo, digest, reason, would, tag=tag))
            return
        registry = stream.registry if stream is not None else DEFAULT_REGISTRY
        try:
            payload = await self.storage.read(layout.blob_data(raw.hex()), MANIFEST_LIMIT)
            config = await self._config(payload)
            image = image_object(digest, repo, registry, payload, config)
        except (NotFound, ValueError) as exc:
            # the original logs an unreadable manifest and goes on with the next one
            self.result.skipped += 1
            self.log.error(
                "lost manifest unreadable; skipped", repository=repo, digest=digest, error=str(exc)
            )
            return
        except StorageError as exc:
            raise SourceError(f"cannot read manifest {digest} of {repo}: {exc}") from exc
        namespace, _, name = repo.partition("/")
        body = {
            "kind": "ImageStreamMapping",
            "apiVersion": "image.openshift.io/v1",
            "metadata": {"namespace": namespace, "name": name},
            "image": image,
            "tag": tag,
        }
        error = await self._create(namespace, body)
        if error is None:
            self.result.added += 1
            message = f'Added image "{digest}" to imagestream "{repo}" with tag "{tag}"'
            self.report(Finding("lost-found", repo, digest, "added", message, tag=tag))
            return
        self.result.failed += 1
        self.errors.append(f"{repo}@{digest}: {error}")
        self.report(
            Finding(
                "lost-found",
                repo,
                digest,
                f"not added: {error}",
                f"{would}: failed: {error}",
                tag=tag,
            )
        )

    async def _config(self, payload: bytes) -> bytes | None:
        doc = json.loads(payload)
        config = doc.get("config") if isinstance(doc, dict) else None
        text = config.get("digest") if isinstance(config, dict) else None
        if not isinstance(text, str):
            return None
        raw = layout.parse_digest(text)
        return await self.storage.read(layout.blob_data(raw.hex()), CONFIG_LIMIT)

    async def _create(self, namespace: str, body: dict[str, Any]) -> str | None:
        """POST one ImageStreamMapping; None when created, else why not."""
        src = self.source
        path = f"/apis/image.openshift.io/v1/namespaces/{namespace}/imagestreammappings"
        try:
            status, answer = await kube.request(
                src.api, "POST", path, src.request_timeout, body=body
            )
        except TimeoutError:
            return f"no answer within {src.request_timeout:g}s"
        except aiohttp.ClientError as exc:
            return f"{type(exc).__name__}: {exc}"
        if status in (200, 201):
            return None
        message = _status_message(answer)
        if status == 403:
            return (
                f"403 Forbidden: the service account needs '{CREATE_MAPPINGS}' (the optional "
                f"ClusterRole in manifests/openshift/components/recover/rbac.yaml): {message}"
            )
        if status == 404:
            return f"404: {message} (create the image stream first, then run recover again)"
        return f"HTTP {status}: {message}"
