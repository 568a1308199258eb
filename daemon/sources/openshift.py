"""The openshift reference source: the cluster's Image objects decide what is in use.

Lists are read page by page as raw JSON (``_preload_content=False``); only digests are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog
from kubernetes_asyncio.client import ApiClient

from daemon import kube, layout, manifests
from daemon.config import maintenance_read_only
from daemon.inventory import DigestSet, Inventory
from daemon.kube import KubeConfigError, api_client
from daemon.progress import Progress
from daemon.sources.base import Marks, ReadOnlyRefused, ReferenceSource, SourceError
from daemon.storage.base import Storage, StorageError
from daemon.usage import UsagePairs

IMAGES = "/apis/image.openshift.io/v1/images"
IMAGE_STREAMS = "/apis/image.openshift.io/v1/imagestreams"
IMAGE_STREAM = "/apis/image.openshift.io/v1/namespaces/{namespace}/imagestreams/{name}"
REGISTRY_CONFIG = "/apis/imageregistry.operator.openshift.io/v1/configs/cluster"
REGISTRY_NAMESPACE = "openshift-image-registry"
REGISTRY_DEPLOYMENT = f"/apis/apps/v1/namespaces/{REGISTRY_NAMESPACE}/deployments/image-registry"
#: the operator's name for the registry's container in that Deployment
REGISTRY_CONTAINER = "registry"
#: the operator sets the first (``{enabled: true}``); distribution also reads the second
_READ_ONLY_ENV = (
    "REGISTRY_STORAGE_MAINTENANCE_READONLY",
    "REGISTRY_STORAGE_MAINTENANCE_READONLY_ENABLED",
)

LIST_IMAGES = "list images.image.openshift.io"
WATCH_IMAGES = "watch images.image.openshift.io"
LIST_STREAMS = "list imagestreams.image.openshift.io (all namespaces)"
GET_CONFIG = "get configs.imageregistry.operator.openshift.io"
GET_STREAM = "get imagestreams.image.openshift.io"
GET_DEPLOYMENT = f"get deployments.apps in {REGISTRY_NAMESPACE}"

# Media types whose dockerImageMetadata.Id is the config blob; for schema1 it is a v1 id.
_CONFIG_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
    }
)
_NO_CONFIG_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.index.v1+json",
    }
)
_NAMESPACE = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?")
_DIGEST_LEN = 32
MANIFEST_LIMIT = 4 * 1024 * 1024  # distribution refuses larger manifest payloads
_READ_CHUNK = 64


class _Expired(Exception):
    """A continue token (or watch resourceVersion) is too old: 410."""


class _Retryable(Exception):
    """The watch broke in a way that resuming from the last resourceVersion may fix."""


@dataclass(slots=True)
class ImageIndex:
    """What the images listing leaves behind: digests only."""

    in_use: DigestSet = field(default_factory=DigestSet)
    names: set[bytes] = field(default_factory=set)
    # manifest list digest -> its children's digests concatenated (32 bytes each)
    children: dict[bytes, bytes] = field(default_factory=dict)
    # schema2/OCI images without a usable dockerImageMetadata.Id -> their media type
    no_config: dict[bytes, str] = field(default_factory=dict)


def _obj(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SourceError(f"openshift: unexpected answer: {where} is not an object")
    return value


def _arr(value: Any, where: str) -> list[Any]:
    # Go marshals empty slices without omitempty as null
    if value is None:
        return []
    if not isinstance(value, list):
        raise SourceError(f"openshift: unexpected answer: {where} is not a list")
    return value


def _digest(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise SourceError(f"openshift: unexpected answer: {where} is not a digest string")
    try:
        return layout.parse_digest(value)
    except layout.InvalidDigest as exc:
        raise SourceError(f"openshift: unexpected answer: {where}: {exc}") from None


def image_digests(image: Any) -> tuple[bytes, list[bytes], list[bytes], bool]:
    """One Image object -> (its manifest digest, blobs it needs, child manifests, whether
    those blobs are complete: False for a schema2/OCI image whose config it does not name)."""
    image = _obj(image, "an image")
    raw_name = _obj(image.get("metadata"), "image metadata").get("name")
    name = _digest(raw_name, "image metadata.name")
    where = f"image {raw_name}"
    blobs = [
        _digest(_obj(layer, f"{where} layer").get("name"), f"{where} dockerImageLayers[].name")
        for layer in _arr(image.get("dockerImageLayers"), f"{where} dockerImageLayers")
    ]
    children = [
        _digest(_obj(child, f"{where} manifest").get("digest"), f"{where} manifests[].digest")
        for child in _arr(image.get("dockerImageManifests"), f"{where} dockerImageManifests")
    ]
    media_type = image.get("dockerImageManifestMediaType") or ""
    config = _obj(image.get("dockerImageMetadata"), f"{where} dockerImageMetadata").get("Id")
    if media_type in _CONFIG_TYPES:
        try:
            blobs.append(layout.parse_digest(config if isinstance(config, str) else ""))
        except layout.InvalidDigest:
            # without its config the image cannot be pulled: never guess; the caller reads
            # the manifest from the store (or fails the run)
            return name, blobs, children, False
    elif media_type not in _NO_CONFIG_TYPES and isinstance(config, str) and config:
        # unknown or empty media type: keep whatever looks like a blob, it costs nothing
        with contextlib.suppress(layout.InvalidDigest):
            blobs.append(layout.parse_digest(config))
    return name, blobs, children, True


def stream_key(repository: str) -> str | None:
    """``<namespace>/<name>`` when ``repository`` can be an ImageStream, else None."""
    parts = repository.split("/")
    if len(parts) != 2 or not layout.is_repository_name(repository):
        return None
    namespace = parts[0]
    if len(namespace) > 63 or not _NAMESPACE.fullmatch(namespace):
        return None
    return repository


class OpenShiftSource(ReferenceSource):
    """Image objects are the truth; ImageStreams decide which repositories and links stay."""

    name = "openshift"

    def __init__(
        self,
        api: ApiClient,
        *,
        page_size: int = 500,
        list_restarts: int = 3,
        request_timeout: float = 60.0,
        watch_timeout: int = 300,
        watch_retries: int = 3,
        watch_retry_delay: float = 1.0,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.api = api
        self.page_size = max(1, page_size)
        self.list_restarts = max(0, list_restarts)
        self.request_timeout = request_timeout
        self.watch_timeout = max(1, watch_timeout)
        self.watch_retries = max(0, watch_retries)
        self.watch_retry_delay = watch_retry_delay
        self.log = (log or structlog.get_logger()).bind(source=self.name)
        self.images_version = ""  # resourceVersion of the last complete images listing
        self._watch: _ImageWatch | None = None
        self._storage: Storage | None = None  # the store mark read, for online mode's reads
        self._known: set[bytes] = set()  # Image names of the last listing

    # -- HTTP ---------------------------------------------------------------------------

    async def _open(
        self, path: str, query: list[tuple[str, str]], limits: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse:
        # _preload_content=False: the raw aiohttp response, status unchecked, body unread
        return await self.api.call_api(
            path,
            "GET",
            query_params=query,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=limits,
        )

    async def _fetch(self, path: str, query: list[tuple[str, str]], what: str) -> tuple[int, bytes]:
        """One GET within the request timeout: its status and body; SourceError when it
        gets no answer."""
        try:
            return await kube.request(self.api, "GET", path, self.request_timeout, query=query)
        except TimeoutError:
            raise SourceError(
                f"openshift: {what}: no answer within {self.request_timeout:g}s"
            ) from None
        except aiohttp.ClientError as exc:
            raise SourceError(f"openshift: {what}: {type(exc).__name__}: {exc}") from None

    async def _get(
        self, path: str, query: list[tuple[str, str]], what: str, permission: str
    ) -> dict[str, Any]:
        """GET one JSON object; SourceError on anything but 200 + a JSON object (410: _Expired)."""
        status, body = await self._fetch(path, query, what)
        if status != 200:
            if status == 410:
                raise _Expired(_status_message(body))
            raise _http_error(status, body, what, permission)
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise SourceError(f"openshift: {what}: malformed JSON: {exc}") from None
        return _obj(data, f"the answer to {what}")

    async def _list(
        self,
        path: str,
        what: str,
        permission: str,
        consume: Callable[[list[Any]], None],
        reset: Callable[[], None],
    ) -> str:
        """Every page of a list into ``consume``; an expired continue token starts over."""
        for attempt in range(self.list_restarts + 1):
            reset()
            token, version, page = "", "", 0
            seen: set[str] = set()  # tokens of this listing: a repeat would loop forever
            try:
                while True:
                    query = [("limit", str(self.page_size))]
                    if token:
                        query.append(("continue", token))
                    page += 1
                    data = await self._get(path, query, f"{what} (page {page})", permission)
                    meta = _obj(data.get("metadata"), f"{what} metadata")
                    if "items" not in data:
                        raise SourceError(f"openshift: unexpected answer: {what} has no items")
                    consume(_arr(data["items"], f"{what} items"))
                    version = version or str(meta.get("resourceVersion") or "")
                    token = meta.get("continue") or ""
                    if not isinstance(token, str):
                        raise SourceError(f"openshift: unexpected answer: {what} continue token")
                    if not token:
                        return version
                    if token in seen:
                        # a listing that cannot go on must not pass for a complete one
                        raise SourceError(
                            f"openshift: {what}: the API server answered page {page} with a "
                            "continue token it had already given; the listing cannot finish "
                            "(an API server or proxy fault), try again later"
                        )
                    seen.add(token)
            except _Expired as exc:
                if page == 1:
                    raise SourceError(f"openshift: {what}: 410 on a fresh list: {exc}") from None
                self.log.warning(
                    "listing expired, starting over", what=what, page=page, attempt=attempt + 1
                )
        raise SourceError(
            f"openshift: {what}: the listing expired (410 on a continue token) "
            f"{self.list_restarts + 1} times in a row; the cluster changes faster than it can "
            "be listed, try again later"
        )

    # -- mark ---------------------------------------------------------------------------

    async def list_images(self, progress: Progress) -> ImageIndex:
        """Every Image object, reduced to digests."""
        index = ImageIndex()
        start = progress.manifests

        def reset() -> None:
            nonlocal index
            index = ImageIndex()
            progress.manifests = start

        def consume(items: list[Any]) -> None:
            for item in items:
                name, blobs, children, complete = image_digests(item)
                if not complete:
                    index.no_config[name] = str(item.get("dockerImageManifestMediaType"))
                index.names.add(name)
                index.in_use.add(name)
                index.in_use.update(blobs)
                if children:
                    index.in_use.update(children)
                    index.children[name] = b"".join(children)
            progress.manifests += len(items)

        self.images_version = ""
        version = await self._list(IMAGES, "listing images", LIST_IMAGES, consume, reset)
        self.images_version = version
        return index

    async def list_streams(self, wanted: set[str]) -> dict[str, set[bytes]]:
        """Tag history digests of the ImageStreams named in ``wanted`` (``<ns>/<name>``)."""
        streams: dict[str, set[bytes]] = {}

        def consume(items: list[Any]) -> None:
            for item in items:
                meta = _obj(_obj(item, "an image stream").get("metadata"), "stream metadata")
                key = f"{meta.get('namespace')}/{meta.get('name')}"
                if key not in wanted:
                    continue
                where = f"image stream {key}"
                digests: set[bytes] = set()
                status = _obj(item.get("status"), f"{where} status")
                for tag in _arr(status.get("tags"), f"{where} status.tags"):
                    history = _obj(tag, f"{where} tag").get("items")
                    for event in _arr(history, f"{where} status.tags[].items"):
                        image = _obj(event, f"{where} tag event").get("image")
                        digests.add(_digest(image, f"{where} status.tags[].items[].image"))
                streams[key] = digests

        await self._list(
            IMAGE_STREAMS, "listing image streams", LIST_STREAMS, consume, streams.clear
        )
        return streams

    async def mark(self, inventory: Inventory, storage: Storage, progress: Progress) -> Marks:
        self._storage = storage
        index = await self.list_images(progress)
        self.log.info(
            "images listed",
            images=len(index.names),
            in_use=len(index.in_use),
            manifest_lists=len(index.children),
        )
        await self._mark_from_store(index, inventory, storage)
        self._known = index.names
        marks = Marks(in_use=index.in_use)
        valid = {name: stream_key(name) for name in inventory.repositories}
        wanted = {key for key in valid.values() if key is not None}
        streams = await self.list_streams(wanted) if wanted else {}
        checked = 0
        # usage: which repositories (image streams) keep each image, by repository index
        holders: dict[bytes, list[int]] | None = {} if self.usage_wanted else None
        for name, repo in inventory.repositories.items():
            checked += 1
            progress.repositories = max(progress.repositories, checked)
            key = valid[name]
            if key is None:
                marks.notes.append(
                    f"repository {name!r} cannot be an image stream (not <namespace>/<name>); "
                    "removed"
                )
                marks.remove_repositories.append(name)
                continue
            stream = streams.get(key)
            if stream is None:
                marks.remove_repositories.append(name)
                continue
            keep = _reachable(stream, index)
            if holders is not None:
                for digest in keep:
                    holders.setdefault(digest, []).append(checked - 1)
            for hexdigest in sorted(repo.revisions):
                if bytes.fromhex(hexdigest) not in keep:
                    marks.remove_revisions.append((name, hexdigest))
        self.log.info(
            "repositories checked",
            repositories=checked,
            remove_repositories=len(marks.remove_repositories),
            remove_revisions=len(marks.remove_revisions),
        )
        if holders is not None:
            marks.usage = await self._usage_pairs(inventory, holders)
            if marks.usage is None:
                marks.notes.append("usage per image stream skipped: the images listing failed")
        return marks

    async def _mark_from_store(
        self, index: ImageIndex, inventory: Inventory, storage: Storage
    ) -> None:
        """What the Image objects leave out, read from the manifests in the store: the config
        of an image without dockerImageMetadata.Id, and the blobs of a stored manifest list's
        children that have no Image object of their own (recursively)."""
        todo: dict[bytes, Need] = {
            name: Need(name, f"image {layout.format_digest(name)} ({media_type})", True)
            for name, media_type in index.no_config.items()
        }
        lists = {digest.hex() for digest in index.children}
        stored: set[str] = set()
        if lists:
            # only lists pushed to this store: an imported one's children are not here
            for repo in inventory.repositories.values():
                stored |= repo.revisions & lists
        for hexdigest in sorted(stored):
            parent = bytes.fromhex(hexdigest)
            for child in _split(index.children[parent]):
                if child not in index.names:
                    todo.setdefault(child, Need(parent, "manifest list", False))
        if not todo:
            return
        # a nested list read here keeps its children's revision links too (_reachable)
        found = await read_needed(storage, todo, index.names, index.children)
        index.in_use.update(found)
        self.log.info("manifests read from the store", manifests=len(todo), digests=len(found))

    async def _usage_pairs(
        self, inventory: Inventory, holders: dict[bytes, list[int]]
    ) -> UsagePairs | None:
        """(blob, image stream) pairs from a second images listing: the first kept digests
        only. Usage is a report: a listing that fails leaves it out, not the check."""
        made: list[UsagePairs] = []
        names = list(inventory.repositories)

        def reset() -> None:
            made[:] = [UsagePairs(inventory)]

        def consume(items: list[Any]) -> None:
            pairs = made[0]
            for item in items:
                name, blobs, _children, _complete = image_digests(item)
                for repo in holders.get(name, ()):
                    pairs.add(names[repo], name)
                    pairs.add_packed(names[repo], b"".join(blobs))

        try:
            await self._list(IMAGES, "listing images for usage", LIST_IMAGES, consume, reset)
        except SourceError as exc:
            self.log.warning("usage per image stream skipped", error=str(exc))
            return None
        return made[0]

    # -- guard --------------------------------------------------------------------------

    async def registry_read_only(self) -> bool:
        """spec.readOnly, and once it is set, the registry's pods all running with it:
        ReadOnlyRefused while the operator still rolls it out (old pods take pushes)."""
        data = await self._get_config()
        spec = _obj(data.get("spec"), "configs/cluster spec")
        value = spec.get("readOnly", False)
        if not isinstance(value, bool):
            raise SourceError("openshift: unexpected answer: configs/cluster spec.readOnly")
        if value:
            what = f"reading deployment {REGISTRY_NAMESPACE}/image-registry"
            try:
                deployment = await self._get(REGISTRY_DEPLOYMENT, [], what, GET_DEPLOYMENT)
            except _Expired as exc:
                raise SourceError(f"openshift: {what}: 410: {exc}") from None
            problem = rollout_problem(deployment)
            if problem:
                raise ReadOnlyRefused(
                    "spec.readOnly is set, but the registry is not read-only everywhere yet: "
                    f"deployment {REGISTRY_NAMESPACE}/image-registry {problem}; old registry "
                    "pods may still accept pushes",
                    "wait for `oc -n openshift-image-registry rollout status "
                    "deployment/image-registry` to finish, then delete again",
                )
        return value

    async def _get_config(self) -> dict[str, Any]:
        what = "reading configs.imageregistry.operator.openshift.io/cluster"
        try:
            return await self._get(REGISTRY_CONFIG, [], what, GET_CONFIG)
        except _Expired as exc:
            raise SourceError(f"openshift: {what}: 410: {exc}") from None

    # -- online mode --------------------------------------------------------------------

    async def start_online(self) -> None:
        """Watch images from the listing's resourceVersion; returns once the watch is open."""
        if self._watch is not None:
            return
        if not self.images_version:
            raise SourceError("openshift: online mode needs a complete images listing first")
        self._watch = _ImageWatch(self, self.images_version)
        await self._watch.start()

    async def newly_in_use(self, candidates: Iterable[bytes]) -> set[bytes]:
        if self._watch is None:
            raise SourceError("openshift: online mode: the image watch was not started")
        seen = await self._watch.current()
        await self._watch.read_pending(self._storage, self._known)
        return {digest for digest in candidates if digest in seen}

    async def repositories_now_in_use(self, names: Iterable[str]) -> set[str]:
        """Repositories whose ImageStream exists now: a push that finished during the run
        wrote its links before the registry created the stream."""
        found: set[str] = set()
        for name in names:
            key = stream_key(name)
            if key is not None and await self._stream_exists(key):
                found.add(name)
        return found

    async def _stream_exists(self, key: str) -> bool:
        namespace, _, name = key.partition("/")
        what = f"reading image stream {key}"
        path = IMAGE_STREAM.format(namespace=namespace, name=name)
        status, body = await self._fetch(path, [], what)
        if status == 200:
            return True
        if status == 404 and _is_not_found(body):
            return False  # only an explicit NotFound Status proves it absent
        raise _http_error(status, body, what, GET_STREAM)

    async def close(self) -> None:
        if self._watch is not None:
            await self._watch.stop()
        await self.api.close()


@dataclass(frozen=True, slots=True)
class Need:
    """Why a manifest must be read from the store, for the error if it cannot be."""

    image: bytes  # the Image object that needs it
    what: str  # "manifest list", or "image <digest> (<media type>)" for a config-less one
    own: bool  # the manifest is the image's own (else a child of the list ``image``)


def _split(packed: bytes) -> Iterator[bytes]:
    for i in range(0, len(packed), _DIGEST_LEN):
        yield packed[i : i + _DIGEST_LEN]


def _unreadable(digest: bytes, need: Need, problem: str) -> SourceError:
    image = layout.format_digest(need.image)
    if need.own:
        return SourceError(
            f"openshift: {need.what} has no dockerImageMetadata.Id, and its manifest {problem}, "
            "so its config blob cannot be known. This blocks every run until it is fixed: "
            f"delete the Image (oc delete image {image}) if nothing needs it, or import or "
            "push it again so that OpenShift records its metadata"
        )
    return SourceError(
        f"openshift: manifest {layout.format_digest(digest)}, a child of the stored manifest "
        f"list {image} without an Image object of its own, {problem}: the blobs it needs "
        "cannot be known, so nothing is deleted. This blocks every run until it is fixed: "
        f"push the multi-arch image again, or delete the list's Image (oc delete image {image}) "
        "if nothing needs it"
    )


async def read_needed(
    storage: Storage | None,
    todo: dict[bytes, Need],
    names: AbstractSet[bytes],
    lists: dict[bytes, bytes] | None = None,
) -> set[bytes]:
    """Read the manifests ``todo`` names from the store; every digest they reference, their
    children's too unless ``names`` (Image objects) covers them; the lists among them into
    ``lists``. SourceError when one cannot be read or parsed: fail closed."""
    if storage is None:
        raise SourceError("openshift: manifests must be read from the store, but none is open")
    found: set[bytes] = set()
    queue = list(todo.items())
    seen = set(todo)
    while queue:
        batch, queue = queue[:_READ_CHUNK], queue[_READ_CHUNK:]
        keys = [layout.blob_data(digest.hex()) for digest, _need in batch]
        try:
            answers = await storage.read_parsed(keys, MANIFEST_LIMIT, manifests.split_references)
        except StorageError as exc:
            raise SourceError(f"openshift: cannot read manifests from the store: {exc}") from exc
        for (digest, need), key, refs in zip(batch, keys, answers, strict=True):
            if refs is None:
                raise _unreadable(digest, need, f"is not in the store ({storage.location(key)})")
            if isinstance(refs, ValueError):
                raise _unreadable(digest, need, f"cannot be parsed: {refs}")
            blobs, children = refs
            found.add(digest)
            found.update(_split(blobs))
            if children and lists is not None:
                lists.setdefault(digest, children)
            for child in _split(children):
                found.add(child)
                if child not in names and child not in seen:
                    seen.add(child)
                    # a child of a child is still the list's: the same advice applies
                    queue.append(
                        (child, need if not need.own else Need(digest, "manifest list", False))
                    )
    return found


def _count(value: Any, where: str) -> int:
    # Go omits zero counts (omitempty)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool):
        raise SourceError(f"openshift: unexpected answer: deployment {where} is not a number")
    return value


def rollout_problem(deployment: Any) -> str:
    """Why this registry Deployment is not wholly read-only yet ("" when it is): a rollout
    not observed or not finished, or a pod template without REGISTRY_STORAGE_MAINTENANCE_READONLY
    enabled in the registry's container."""
    deployment = _obj(deployment, "the registry deployment")
    meta = _obj(deployment.get("metadata"), "deployment metadata")
    spec = _obj(deployment.get("spec"), "deployment spec")
    status = _obj(deployment.get("status"), "deployment status")
    generation = _count(meta.get("generation"), "metadata.generation")
    observed = _count(status.get("observedGeneration"), "status.observedGeneration")
    if observed < generation:
        return f"has generation {generation}, its controller has seen only {observed}"
    wanted = spec.get("replicas")
    wanted = 1 if wanted is None else _count(wanted, "spec.replicas")  # the API's default
    updated = _count(status.get("updatedReplicas"), "status.updatedReplicas")
    running = _count(status.get("replicas"), "status.replicas")
    if updated != wanted or running != updated:
        return (
            f"is rolling out: {updated} of {wanted} replicas updated, "
            f"{running} running (old pods included)"
        )
    template = _obj(_obj(spec.get("template"), "deployment spec.template").get("spec"), "pod spec")
    containers = _arr(template.get("containers"), "deployment containers")
    registry = [
        c for c in containers if isinstance(c, dict) and c.get("name") == REGISTRY_CONTAINER
    ]
    if not registry:
        return f"has no container named {REGISTRY_CONTAINER!r}"
    env = {
        e.get("name"): e
        for e in _arr(registry[0].get("env"), "registry container env")
        if isinstance(e, dict)
    }
    names = [n for n in _READ_ONLY_ENV if n in env]
    if not names:
        return "runs its registry without REGISTRY_STORAGE_MAINTENANCE_READONLY"
    for name in names:  # every one that is set must say read-only: no guessing which wins
        value = env[name].get("value")
        if not isinstance(value, str):
            return f"sets {name} from a reference this pruner cannot read"
        try:
            enabled = maintenance_read_only(value)
        except ValueError:
            enabled = False
        if not enabled:
            return f"sets {name} to {value[:60]!r}, which does not enable read-only mode"
    return ""


def _reachable(stream: set[bytes], index: ImageIndex) -> set[bytes]:
    """Revisions a stream keeps: its existing images and the children of its manifest lists."""
    keep = stream & index.names
    lists = list(keep & index.children.keys())
    while lists:  # an index may name other indexes
        kids = index.children[lists.pop()]
        for i in range(0, len(kids), _DIGEST_LEN):
            child = kids[i : i + _DIGEST_LEN]
            if child not in keep:
                keep.add(child)
                if child in index.children:
                    lists.append(child)
    return keep


def _is_not_found(body: bytes) -> bool:
    """A Status object with reason NotFound (a 404 from a proxy or a wrong path is not one)."""
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return (
        isinstance(data, dict) and data.get("kind") == "Status" and data.get("reason") == "NotFound"
    )


def _status_message(body: bytes) -> str:
    """The message of a Status object, or the start of whatever the body is."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        reason = data.get("reason") or ""
        return f"{reason}: {data['message']}" if reason else data["message"]
    return body[:300].decode("utf-8", "replace").strip() or "(empty body)"


def _http_error(status: int, body: bytes, what: str, permission: str) -> SourceError:
    message = _status_message(body)
    if status == 401:
        return SourceError(
            f"openshift: {what}: 401 Unauthorized: the API server rejected the credentials "
            f"(expired or missing service account token?): {message}"
        )
    if status == 403:
        return SourceError(
            f"openshift: {what}: 403 Forbidden: the service account needs '{permission}': {message}"
        )
    if status == 404:
        return SourceError(
            f"openshift: {what}: 404 Not Found (is this an OpenShift cluster?): {message}"
        )
    return SourceError(f"openshift: {what}: HTTP {status}: {message}")


class _ImageWatch:
    """A watch on Image objects recording every digest an added or modified image needs."""

    def __init__(self, source: OpenShiftSource, resource_version: str) -> None:
        self.source = source
        self.version = resource_version
        self.seen: set[bytes] = set()
        self.names: set[bytes] = set()  # Image objects added or modified since the listing
        # what the store must tell: config-less images, and lists to check for children
        self.pending: dict[bytes, Need] = {}
        self.lists: dict[bytes, list[bytes]] = {}
        self.failure: str | None = None
        self.connected = asyncio.Event()  # set while a stream is open, or once failed
        self.delivered = False  # the current connection delivered at least one event
        self.task: asyncio.Task[None] | None = None

    def _patience(self) -> float:
        src = self.source
        return (src.request_timeout + src.watch_retry_delay) * (src.watch_retries + 1)

    async def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name="openshift-image-watch")
        await self.current()

    async def current(self) -> set[bytes]:
        """The digests seen so far; waits out a reconnect, raises SourceError once broken."""
        if not self.connected.is_set():
            try:
                async with asyncio.timeout(self._patience()):
                    await self.connected.wait()
            except TimeoutError:
                raise SourceError("openshift: the image watch did not reconnect in time") from None
        if self.failure is not None:
            raise SourceError(self.failure)
        return self.seen

    async def read_pending(self, storage: Storage | None, known: AbstractSet[bytes]) -> None:
        """Add to ``seen`` what new images need that their objects do not name (read from
        the store, as mark does); SourceError when a manifest cannot be read."""
        if not self.pending and not self.lists:
            return
        names = known | self.names
        # copies: the watch adds to both meanwhile; entries go only once their reads succeeded
        todo, lists = dict(self.pending), dict(self.lists)
        done = list(todo)
        if lists and storage is not None:
            # only a list pushed to this store has its children here (an import's has not)
            keys = [layout.blob_data(name.hex()) for name in lists]
            try:
                stored = await storage.stat_many(keys)
            except StorageError as exc:
                raise SourceError(
                    f"openshift: cannot read manifests from the store: {exc}"
                ) from exc
            for (name, children), entry in zip(lists.items(), stored, strict=True):
                if entry is None:
                    continue
                for child in children:
                    if child not in names:
                        todo.setdefault(child, Need(name, "manifest list", False))
        if todo:
            self.seen.update(await read_needed(storage, todo, names))
        for name in done:
            self.pending.pop(name, None)
        for name in lists:
            self.lists.pop(name, None)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    def _fail(self, reason: str) -> None:
        self.failure = f"openshift: the image watch broke and cannot resume: {reason}"
        self.source.log.error("image watch broken", reason=reason)
        self.connected.set()  # wake waiters so that they raise

    async def _run(self) -> None:
        failures = 0
        while True:
            self.delivered = False
            error = ""
            try:
                await self._stream()
            except _Expired as exc:
                self._fail(f"resourceVersion {self.version} expired (410): {exc}")
                return
            except SourceError as exc:
                self._fail(str(exc))
                return
            except (_Retryable, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            self.connected.clear()
            if not error:
                # the server ended the watch (timeoutSeconds): resume where it stopped
                if not self.delivered:
                    await asyncio.sleep(self.source.watch_retry_delay)
                continue
            # a connection that delivered events was healthy: only a run of bare failures counts
            failures = 1 if self.delivered else failures + 1
            if failures > self.source.watch_retries:
                self._fail(f"{failures} attempts to resume failed, last: {error}")
                return
            self.source.log.warning(
                "image watch interrupted, resuming", resource_version=self.version, error=error
            )
            await asyncio.sleep(self.source.watch_retry_delay)

    async def _stream(self) -> None:
        """One watch connection, until the server ends it."""
        src = self.source
        query = [
            ("watch", "true"),
            ("resourceVersion", self.version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(src.watch_timeout)),
        ]
        # no total timeout: the stream lasts timeoutSeconds; a silent one is a broken one
        timeout = aiohttp.ClientTimeout(
            sock_connect=src.request_timeout, sock_read=src.watch_timeout + src.request_timeout
        )
        async with asyncio.timeout(src.request_timeout):
            resp = await src._open(IMAGES, query, timeout)
        async with resp:
            if resp.status != 200:
                body = await resp.read()
                if resp.status == 410:
                    raise _Expired(_status_message(body))
                error = _http_error(resp.status, body, "watching images", WATCH_IMAGES)
                if resp.status in (401, 403, 404):
                    raise error
                raise _Retryable(str(error))
            self.connected.set()
            while line := await resp.content.readline():
                if line.strip():
                    self._event(json.loads(line))
                    self.delivered = True

    def _event(self, event: Any) -> None:
        event = _obj(event, "a watch event")
        kind = event.get("type")
        obj = _obj(event.get("object"), "a watch event object")
        if kind == "ERROR":
            code = obj.get("code")
            message = obj.get("message") or obj.get("reason") or "watch error"
            if code == 410:
                raise _Expired(str(message))
            raise _Retryable(f"watch error {code}: {message}")
        if kind in ("ADDED", "MODIFIED"):
            name, blobs, children, complete = image_digests(obj)
            self.seen.add(name)
            self.seen.update(blobs)
            self.seen.update(children)
            self.names.add(name)
            if not complete:
                self.pending[name] = Need(name, f"image {layout.format_digest(name)}", True)
            if children:
                self.lists[name] = children
        elif kind not in ("DELETED", "BOOKMARK"):
            raise SourceError(f"openshift: unexpected watch event type {kind!r}")
        version = _obj(obj.get("metadata"), "watch object metadata").get("resourceVersion")
        if isinstance(version, str) and version:
            self.version = version


async def create(
    kubeconfig: str | None = None,
    page_size: int = 500,
    *,
    context: str | None = None,
    list_restarts: int = 3,
    request_timeout: float = 60.0,
    watch_timeout: int = 300,
    watch_retries: int = 3,
    watch_retry_delay: float = 1.0,
    log: structlog.typing.FilteringBoundLogger | None = None,
) -> OpenShiftSource:
    """An OpenShiftSource on the pod's service account, or on ``kubeconfig`` when given."""
    try:
        client = await api_client(kubeconfig, context)
    except KubeConfigError as exc:
        raise SourceError(f"openshift: {exc}") from None
    return OpenShiftSource(
        client,
        page_size=page_size,
        list_restarts=list_restarts,
        request_timeout=request_timeout,
        watch_timeout=watch_timeout,
        watch_retries=watch_retries,
        watch_retry_delay=watch_retry_delay,
        log=log,
    )
