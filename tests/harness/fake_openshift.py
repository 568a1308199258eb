"""A fake OpenShift API server (aiohttp): the real paths and JSON shapes, faults on demand.

Tests mutate ``FakeCluster``; ``FakeOpenShift`` serves it; ``write_kubeconfig`` points at it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
SCHEMA2 = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
INTERNAL_REGISTRY = "image-registry.openshift-image-registry.svc:5000"
PRUNER_TOKEN = "pruner-token"
PRUNER_USER = "system:serviceaccount:openshift-image-registry:pruner"
CREATED = "2024-05-01T10:00:00Z"

IMAGE_GROUP = "image.openshift.io"
REGISTRY_GROUP = "imageregistry.operator.openshift.io"
JSON = "application/json"
_REPEAT_CONTINUE = web.RequestKey("repeat_continue", bool)


def fake_digest(seed: str | int) -> str:
    """A deterministic ``sha256:<hex>`` for ``seed``."""
    return "sha256:" + hashlib.sha256(str(seed).encode()).hexdigest()


def make_image(
    digest: str,
    *,
    layers: Iterable[str | tuple[str, int]] = (),
    config: str | None = None,
    media_type: str = SCHEMA2,
    repository: str = "ns/app",
    registry: str = INTERNAL_REGISTRY,
    manifests: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """An Image object as image.openshift.io/v1 serves it."""
    layer_list = [
        {"name": layer, "size": 1024, "mediaType": LAYER}
        if isinstance(layer, str)
        else {"name": layer[0], "size": layer[1], "mediaType": LAYER}
        for layer in layers
    ]
    image: dict[str, Any] = {
        "kind": "Image",
        "apiVersion": "image.openshift.io/v1",
        "metadata": {
            "name": digest,
            "uid": fake_digest(f"uid:{digest}")[7:43],
            "resourceVersion": "1",
            "creationTimestamp": CREATED,
            "annotations": {
                "image.openshift.io/dockerLayersOrder": "ascending",
                "openshift.io/image.managed": "true",
            },
        },
        "dockerImageReference": f"{registry}/{repository}@{digest}",
        "dockerImageMetadata": {
            "kind": "DockerImage",
            "apiVersion": "image.openshift.io/1.0",
            "Created": CREATED,
            "Architecture": "amd64",
            "Size": sum(entry["size"] for entry in layer_list),
        },
        "dockerImageMetadataVersion": "1.0",
        # OpenShift's Go type has no omitempty here: an image without layers says null
        "dockerImageLayers": layer_list or None,
        "dockerImageManifestMediaType": media_type,
    }
    if config is not None:
        image["dockerImageMetadata"]["Id"] = config
        image["dockerImageMetadata"]["Config"] = {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["sh"]}
    if manifests is not None:
        image["dockerImageManifests"] = [dict(entry) for entry in manifests]
        image["dockerImageMetadata"].pop("Architecture")
    return image


def make_manifest_list(
    digest: str,
    children: Iterable[str | tuple[str, str]],
    *,
    media_type: str = MANIFEST_LIST,
    repository: str = "ns/app",
) -> dict[str, Any]:
    """A manifest list / OCI index Image; ``children`` are digests or (digest, arch)."""
    entries = []
    for child in children:
        child_digest, arch = (child, "amd64") if isinstance(child, str) else child
        entries.append(
            {
                "digest": child_digest,
                "mediaType": OCI_MANIFEST if media_type == OCI_INDEX else SCHEMA2,
                "manifestSize": 527,
                "architecture": arch,
                "os": "linux",
            }
        )
    return make_image(digest, media_type=media_type, repository=repository, manifests=entries)


def make_image_stream(
    namespace: str,
    name: str,
    tags: Mapping[str, Sequence[str]] | None = None,
    *,
    registry: str = INTERNAL_REGISTRY,
) -> dict[str, Any]:
    """An ImageStream whose ``status.tags[tag].items`` name ``tags[tag]``, newest first."""
    repo = f"{registry}/{namespace}/{name}"
    status_tags = [
        {
            "tag": tag,
            "items": [
                {
                    "created": CREATED,
                    "dockerImageReference": f"{repo}@{digest}",
                    "image": digest,
                    "generation": 1,
                }
                for digest in digests
            ],
        }
        for tag, digests in (tags or {}).items()
    ]
    return {
        "kind": "ImageStream",
        "apiVersion": "image.openshift.io/v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": fake_digest(f"uid:{namespace}/{name}")[7:43],
            "resourceVersion": "1",
            "creationTimestamp": CREATED,
            "generation": 1,
        },
        "spec": {"lookupPolicy": {"local": False}},
        "status": {"dockerImageRepository": repo, "tags": status_tags or None},
    }


REGISTRY_NAMESPACE = "openshift-image-registry"


def make_registry_deployment(
    *,
    read_only: bool,
    replicas: int = 2,
    generation: int = 3,
    observed_generation: int | None = None,
    updated_replicas: int | None = None,
    running_replicas: int | None = None,
    env: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The operator's registry Deployment (apps/v1) as the API serves it; by default wholly
    rolled out. Zero counts are left out of status, as Go's omitempty does."""
    if env is None:
        env = [
            {"name": "REGISTRY_STORAGE", "value": "filesystem"},
            {"name": "REGISTRY_HTTP_ADDR", "value": ":5000"},
        ]
        if read_only:
            env = [
                *env,
                {"name": "REGISTRY_STORAGE_MAINTENANCE_READONLY", "value": "{enabled: true}"},
            ]
    updated = replicas if updated_replicas is None else updated_replicas
    running = updated if running_replicas is None else running_replicas
    counts = {
        "observedGeneration": generation if observed_generation is None else observed_generation,
        "replicas": running,
        "updatedReplicas": updated,
        "readyReplicas": updated,
        "availableReplicas": updated,
    }
    labels = {"docker-registry": "default"}
    return {
        "kind": "Deployment",
        "apiVersion": "apps/v1",
        "metadata": {
            "name": "image-registry",
            "namespace": REGISTRY_NAMESPACE,
            "uid": fake_digest("uid:image-registry")[7:43],
            "resourceVersion": "4242",
            "generation": generation,
            "creationTimestamp": CREATED,
            "labels": dict(labels),
            "annotations": {"deployment.kubernetes.io/revision": str(generation)},
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": dict(labels)},
            "template": {
                "metadata": {"creationTimestamp": None, "labels": dict(labels)},
                "spec": {
                    "containers": [
                        {
                            "name": "registry",
                            "image": "quay.io/openshift/origin-docker-registry:latest",
                            "ports": [{"containerPort": 5000, "protocol": "TCP"}],
                            "env": [dict(e) for e in env],
                            "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                            "imagePullPolicy": "IfNotPresent",
                        }
                    ],
                    "serviceAccountName": "registry",
                    "restartPolicy": "Always",
                },
            },
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 1, "maxSurge": "25%"},
            },
            "revisionHistoryLimit": 10,
            "progressDeadlineSeconds": 600,
        },
        "status": {
            **{k: v for k, v in counts.items() if v},
            "conditions": [
                {
                    "type": "Available",
                    "status": "True",
                    "reason": "MinimumReplicasAvailable",
                    "message": "Deployment has minimum availability.",
                },
                {
                    "type": "Progressing",
                    "status": "True",
                    "reason": "NewReplicaSetAvailable"
                    if updated == replicas == running
                    else "ReplicaSetUpdated",
                    "message": 'ReplicaSet "image-registry-5d9c" is progressing.',
                },
            ],
        },
    }


def status_object(
    code: int, reason: str, message: str, details: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A meta/v1 Status as the API server answers errors."""
    status: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        status["details"] = dict(details)
    return status


_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    410: "Expired",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}
_EXPIRED_CONTINUE = (
    "The provided continue parameter is too old to display a consistent list result. "
    "You can start a new list without the continue parameter, or use the continue token "
    "in this response to retrieve the remainder of the results. Continuing with the "
    "provided token results in an inconsistent list - objects that were created, modified, "
    "or deleted between the time the first chunk was returned and now may show up in the list."
)


@dataclass(slots=True)
class Fault:
    """One fault: matches ``resource`` (and ``page`` of a list), fires ``times`` times."""

    resource: str  # images | imagestreams | imagestream | image | configs | watch | ...reviews
    page: int | None = None  # 1-based page of a list; None: any request
    status: int | None = None  # answer with this code and a Status object
    message: str | None = None
    delay: float = 0.0  # seconds before answering
    body: bytes | None = None  # answer 200 with these raw bytes
    repeat_continue: bool = False  # answer the page with the continue token it was asked with
    action: Callable[[], None] | None = None  # run when the fault fires (a race, made exact)
    times: int | None = 1  # None: every time
    hits: int = 0

    def armed(self) -> bool:
        return self.times is None or self.hits < self.times


@dataclass(slots=True)
class User:
    name: str
    groups: tuple[str, ...] = ()


@dataclass
class FakeCluster:
    """The state the fake API serves; tests mutate it directly or through the helpers."""

    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    streams: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    read_only: bool | None = False  # None: spec has no readOnly key
    #: the registry's Deployment; None: one wholly rolled out with ``read_only``
    deployment: dict[str, Any] | None = None
    #: the registry's storage as the operator reports it (status.storage), e.g.
    #: {"s3": {"bucket": ...}, "managementState": "Managed"}; None: no status.storage
    storage: dict[str, Any] | None = None
    #: spec.storage; None: the same as ``storage`` (as once the operator has applied it)
    spec_storage: dict[str, Any] | None = None
    tokens: dict[str, User] = field(default_factory=lambda: {PRUNER_TOKEN: User(PRUNER_USER)})
    #: (user or "group:<g>", verb, "<plural>.<group>" or core "<plural>"); "*" matches any
    allowed: set[tuple[str, str, str]] = field(default_factory=set)
    rbac: bool = False  # check the API's own requests against ``allowed`` too
    faults: list[Fault] = field(default_factory=list)
    bookmark_interval: float = 0.5
    #: every request as (method, path, query)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    watch_connections: int = 0
    _generated: int = 0
    _generator: Callable[[int], dict[str, Any]] | None = None
    _version: int = 1000
    _events: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    _compacted: int = 0  # watches from resourceVersions below this answer 410
    _drop_after: int | None = None
    _drops: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    # -- state ------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        return self._version

    def _bump(self, kind: str, obj: dict[str, Any]) -> None:
        self._version += 1
        obj["metadata"]["resourceVersion"] = str(self._version)
        self._events.append((self._version, kind, obj))
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def add_image(self, image: dict[str, Any]) -> dict[str, Any]:
        name = image["metadata"]["name"]
        kind = "MODIFIED" if name in self.images else "ADDED"
        self.images[name] = image
        self._bump(kind, image)
        return image

    def add_images(self, images: Iterable[dict[str, Any]]) -> None:
        for image in images:
            self.add_image(image)

    def delete_image(self, name: str) -> None:
        image = self.images.pop(name)
        self._bump("DELETED", image)

    def generate_images(self, count: int, factory: Callable[[int], dict[str, Any]]) -> None:
        """``count`` more images, built by ``factory(i)`` only when a page is served."""
        self._generated, self._generator = count, factory

    def add_stream(self, stream: dict[str, Any]) -> dict[str, Any]:
        meta = stream["metadata"]
        self.streams[(meta["namespace"], meta["name"])] = stream
        self._version += 1
        meta["resourceVersion"] = str(self._version)
        return stream

    def delete_stream(self, namespace: str, name: str) -> None:
        del self.streams[(namespace, name)]
        self._version += 1

    def compact(self) -> None:
        """Forget watch history: a watch from any current resourceVersion gets 410."""
        self._compacted = self._version + 1

    def add_token(self, token: str, user: str, groups: Iterable[str] = ()) -> None:
        self.tokens[token] = User(user, tuple(groups))

    def allow(self, user: str, verb: str, resource: str) -> None:
        self.allowed.add((user, verb, resource))

    # -- faults -----------------------------------------------------------------------

    def fault(self, resource: str, **kwargs: Any) -> Fault:
        fault = Fault(resource, **kwargs)
        self.faults.append(fault)
        return fault

    def fail(self, resource: str, page: int | None = None, status: int = 500, **kw: Any) -> Fault:
        return self.fault(resource, page=page, status=status, **kw)

    def forbid(self, resource: str) -> Fault:
        return self.fault(resource, status=403, times=None)

    def expire_continue(self, resource: str, page: int = 2, times: int | None = 1) -> Fault:
        """410 Expired on the continue request for ``page``."""
        return self.fault(resource, page=page, status=410, times=times)

    def on_request(self, resource: str, action: Callable[[], None], times: int = 1) -> Fault:
        """Run ``action`` when a request for ``resource`` arrives, then answer it as usual:
        the state changes at an exact point of the client's run."""
        return self.fault(resource, action=action, times=times)

    def repeat_continue(self, resource: str, page: int = 2, times: int | None = 1) -> Fault:
        """Page ``page`` of a list names the continue token it was asked with as the next one
        (a broken API server or proxy): a client that follows it loops forever."""
        return self.fault(resource, page=page, repeat_continue=True, times=times)

    def slow(self, resource: str, page: int | None, delay: float, **kw: Any) -> Fault:
        return self.fault(resource, page=page, delay=delay, **kw)

    def malformed(self, resource: str, page: int | None = 1, body: bytes | None = None) -> Fault:
        default = b'{"kind":"ImageList","apiVersion":"image.openshift.io/v1","items":[{"meta'
        return self.fault(resource, page=page, body=body or default)

    def drop_watch(self, after_events: int = 0, times: int = 1) -> None:
        """Cut ``times`` watch connections (open ones too) once they sent ``after_events``."""
        self._drop_after, self._drops = after_events, times
        self._notify()

    def take_drop(self, sent: int) -> bool:
        if self._drops > 0 and self._drop_after is not None and sent >= self._drop_after:
            self._drops -= 1
            return True
        return False

    def take_fault(self, resource: str, page: int | None) -> Fault | None:
        for fault in self.faults:
            if fault.resource != resource or not fault.armed():
                continue
            if fault.page is not None and fault.page != page:
                continue
            fault.hits += 1
            return fault
        return None

    def can(self, user: User, verb: str, resource: str) -> bool:
        subjects = {user.name, "*", *(f"group:{g}" for g in user.groups)}
        return any(
            s in subjects and v in (verb, "*") and r in (resource, "*") for s, v, r in self.allowed
        )

    # -- listings -----------------------------------------------------------------------

    def image_count(self) -> int:
        return len(self.images) + self._generated

    def image_slice(self, start: int, stop: int) -> Iterator[dict[str, Any]]:
        names = sorted(self.images)
        for i in range(start, min(stop, len(names))):
            yield self.images[names[i]]
        first = max(start - len(names), 0)
        last = min(stop - len(names), self._generated)
        if self._generator is not None:
            for i in range(first, last):
                yield self._generator(i)

    def stream_slice(self, start: int, stop: int) -> list[dict[str, Any]]:
        keys = sorted(self.streams)[start:stop]
        return [self.streams[key] for key in keys]


def _list_item(obj: dict[str, Any]) -> dict[str, Any]:
    # items of a built-in-style list carry no kind/apiVersion
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


def _encode_token(version: int, offset: int, page: int) -> str:
    raw = json.dumps({"rv": version, "start": offset, "page": page}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_token(token: str) -> tuple[int, int, int]:
    data = json.loads(base64.urlsafe_b64decode(token.encode()))
    return int(data["rv"]), int(data["start"]), int(data["page"])


class FakeOpenShift:
    """Serves a FakeCluster on 127.0.0.1; use ``async with FakeOpenShift() as api``."""

    def __init__(self, cluster: FakeCluster | None = None) -> None:
        self.cluster = cluster or FakeCluster()
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> FakeOpenShift:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        # handler_cancellation: a client that gives up (timeout) ends its handler too
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def write_kubeconfig(self, path: str | Path, token: str | None = PRUNER_TOKEN) -> Path:
        """A kubeconfig with one context pointing at this server, bearer-token auth."""
        user: dict[str, Any] = {"token": token} if token else {}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "pruner", "user": user}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "pruner"}}],
            "current-context": "fake",
        }
        target = Path(path)
        target.write_text(yaml.safe_dump(config))
        return target

    # -- the app --------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._authenticate])
        v1 = "/apis/image.openshift.io/v1"
        app.router.add_get("/version", self._version)
        app.router.add_get("/api", self._core_versions)
        app.router.add_get("/apis", self._groups)
        app.router.add_get(f"{v1}/images", self._images)
        app.router.add_get(f"{v1}/images/{{name}}", self._image)
        app.router.add_get(f"{v1}/imagestreams", self._streams)
        app.router.add_get(f"{v1}/namespaces/{{ns}}/imagestreams", self._streams)
        app.router.add_get(f"{v1}/namespaces/{{ns}}/imagestreams/{{name}}", self._stream)
        app.router.add_get(f"/apis/{REGISTRY_GROUP}/v1/configs/cluster", self._config)
        app.router.add_get("/apis/apps/v1/namespaces/{ns}/deployments/{name}", self._deployment)
        app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", self._token_review)
        app.router.add_post(
            "/apis/authorization.k8s.io/v1/subjectaccessreviews", self._access_review
        )
        return app

    @web.middleware
    async def _authenticate(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        self.cluster.requests.append((request.method, request.path, dict(request.query)))
        if self._user(request) is None:
            return _status(401, "Unauthorized")
        return await handler(request)

    def _user(self, request: web.Request) -> User | None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return self.cluster.tokens.get(token) if scheme.lower() == "bearer" else None

    async def _fault(
        self, request: web.Request, resource: str, page: int | None, verb: str, group: str
    ) -> web.StreamResponse | None:
        """Apply RBAC and an armed fault; a response when the request ends here."""
        user = self._user(request)
        assert user is not None  # the middleware answered 401 otherwise
        full = f"{resource}.{group}" if group else resource
        if self.cluster.rbac and not self.cluster.can(user, verb, full):
            return _status(403, _forbidden(user, verb, resource, group))
        fault = self.cluster.take_fault(resource, page)
        if fault is None:
            return None
        if fault.action is not None:
            fault.action()
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.body is not None:
            return web.Response(body=fault.body, content_type=JSON)
        if fault.repeat_continue:
            request[_REPEAT_CONTINUE] = True  # served normally, but for the next token
        if fault.status is None:
            return None
        message = fault.message
        if message is None:
            if fault.status == 403:
                message = _forbidden(user, verb, resource, group)
            elif fault.status == 410:
                message = _EXPIRED_CONTINUE
            else:
                message = f"fake fault on {resource} (page {page})"
        return _status(fault.status, message)

    async def _version(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "major": "1",
                "minor": "29",
                "gitVersion": "v1.29.0+fake",
                "platform": "linux/amd64",
            }
        )

    async def _core_versions(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"kind": "APIVersions", "versions": ["v1"]})

    async def _groups(self, request: web.Request) -> web.StreamResponse:
        groups = []
        for name in (
            IMAGE_GROUP,
            REGISTRY_GROUP,
            "apps",
            "authentication.k8s.io",
            "authorization.k8s.io",
        ):
            version = {"groupVersion": f"{name}/v1", "version": "v1"}
            groups.append({"name": name, "versions": [version], "preferredVersion": version})
        return web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})

    def _page(self, request: web.Request) -> tuple[int, int, int, int | None]:
        """(page number, offset, snapshot resourceVersion, limit) of a list request."""
        limit_text = request.query.get("limit")
        limit = int(limit_text) if limit_text and int(limit_text) > 0 else None
        token = request.query.get("continue")
        if not token:
            return 1, 0, self.cluster.resource_version, limit
        try:
            version, offset, page = _decode_token(token)
        except (ValueError, KeyError, binascii.Error) as exc:
            raise _StatusError(400, f"continue key is not valid: {exc}") from None
        return page, offset, version, limit

    def _list(
        self,
        kind: str,
        items: list[dict[str, Any]],
        total: int,
        page: int,
        offset: int,
        version: int,
        request: web.Request | None = None,
    ) -> web.Response:
        metadata: dict[str, Any] = {"resourceVersion": str(version)}
        end = offset + len(items)
        if end < total:
            metadata["continue"] = _encode_token(version, end, page + 1)
            metadata["remainingItemCount"] = total - end
        if request is not None and request.get(_REPEAT_CONTINUE):
            metadata["continue"] = request.query.get("continue") or ""
        body = {
            "kind": kind,
            "apiVersion": "image.openshift.io/v1",
            "metadata": metadata,
            "items": [_list_item(item) for item in items],
        }
        return web.Response(body=json.dumps(body).encode(), content_type=JSON)

    async def _images(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") in ("true", "1"):
            return await self._watch(request)
        try:
            page, offset, version, limit = self._page(request)
        except _StatusError as exc:
            return exc.response()
        answer = await self._fault(request, "images", page, "list", IMAGE_GROUP)
        if answer is not None:
            return answer
        total = self.cluster.image_count()
        stop = total if limit is None else offset + limit
        items = list(self.cluster.image_slice(offset, stop))
        return self._list("ImageList", items, total, page, offset, version, request)

    async def _image(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        answer = await self._fault(request, "image", None, "get", IMAGE_GROUP)
        if answer is not None:
            return answer
        image = self.cluster.images.get(name)
        if image is None:
            return _not_found("images", name)
        return web.json_response(image)

    async def _streams(self, request: web.Request) -> web.StreamResponse:
        try:
            page, offset, version, limit = self._page(request)
        except _StatusError as exc:
            return exc.response()
        answer = await self._fault(request, "imagestreams", page, "list", IMAGE_GROUP)
        if answer is not None:
            return answer
        namespace = request.match_info.get("ns")
        if namespace is None:
            items = self.cluster.stream_slice(0, len(self.cluster.streams))
        else:
            items = [s for (ns, _), s in sorted(self.cluster.streams.items()) if ns == namespace]
        total = len(items)
        items = items[offset:] if limit is None else items[offset : offset + limit]
        return self._list("ImageStreamList", items, total, page, offset, version, request)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        namespace, name = request.match_info["ns"], request.match_info["name"]
        answer = await self._fault(request, "imagestream", None, "get", IMAGE_GROUP)
        if answer is not None:
            return answer
        stream = self.cluster.streams.get((namespace, name))
        if stream is None:
            return _not_found("imagestreams", name)
        return web.json_response(stream)

    async def _config(self, request: web.Request) -> web.StreamResponse:
        answer = await self._fault(request, "configs", None, "get", REGISTRY_GROUP)
        if answer is not None:
            return answer
        spec: dict[str, Any] = {"managementState": "Managed", "replicas": 2}
        if self.cluster.read_only is not None:
            spec["readOnly"] = self.cluster.read_only
        status: dict[str, Any] = {"readyReplicas": 2}
        storage, spec_storage = self.cluster.storage, self.cluster.spec_storage
        if storage is not None:
            status["storage"] = storage
        if spec_storage is not None or storage is not None:
            spec["storage"] = spec_storage if spec_storage is not None else storage
        return web.json_response(
            {
                "apiVersion": f"{REGISTRY_GROUP}/v1",
                "kind": "Config",
                "metadata": {"name": "cluster", "resourceVersion": "1"},
                "spec": spec,
                "status": status,
            }
        )

    async def _deployment(self, request: web.Request) -> web.StreamResponse:
        answer = await self._fault(request, "deployments", None, "get", "apps")
        if answer is not None:
            return answer
        namespace, name = request.match_info["ns"], request.match_info["name"]
        deployment = self.cluster.deployment
        if deployment is None:
            deployment = make_registry_deployment(read_only=bool(self.cluster.read_only))
        if (namespace, name) != (REGISTRY_NAMESPACE, "image-registry"):
            message = f'deployments.apps "{name}" not found'
            return _status(404, message, {"name": name, "group": "apps", "kind": "deployments"})
        return web.json_response(deployment)

    async def _watch(self, request: web.Request) -> web.StreamResponse:
        cluster = self.cluster
        answer = await self._fault(request, "watch", None, "watch", IMAGE_GROUP)
        if answer is not None:
            return answer
        cluster.watch_connections += 1
        timeout = float(request.query.get("timeoutSeconds") or 1800)
        bookmarks = request.query.get("allowWatchBookmarks") == "true"
        version_text = request.query.get("resourceVersion") or ""
        response = web.StreamResponse(headers={"Content-Type": JSON})
        response.enable_chunked_encoding()
        await response.prepare(request)

        async def send(kind: str, obj: dict[str, Any]) -> None:
            await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        if version_text in ("", "0"):
            # "most recent": synthetic ADDED for what exists, then changes
            start = cluster.resource_version
            for image in list(cluster.images.values()):
                await send("ADDED", image)
        else:
            start = int(version_text)
            if start < cluster._compacted:
                message = f"too old resource version: {start} ({cluster._compacted})"
                await send("ERROR", status_object(410, "Expired", message))
                return response
        sent = 0
        deadline = asyncio.get_running_loop().time() + timeout
        position = start
        while True:
            if cluster.take_drop(sent):
                _cut(request)
                return response
            for version, kind, obj in list(cluster._events):
                if version <= position:
                    continue
                if cluster.take_drop(sent):
                    _cut(request)
                    return response
                await send(kind, obj)
                sent += 1
                position = version
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            changed = cluster._changed
            try:
                async with asyncio.timeout(min(remaining, cluster.bookmark_interval)):
                    await changed.wait()
            except TimeoutError:
                if bookmarks:
                    version = str(max(position, cluster.resource_version))
                    await send("BOOKMARK", _bookmark(version))
        await response.write_eof()
        return response

    async def _token_review(self, request: web.Request) -> web.StreamResponse:
        answer = await self._fault(request, "tokenreviews", None, "create", "authentication.k8s.io")
        if answer is not None:
            return answer
        try:
            review = await request.json()
            token = review["spec"]["token"]
        except (ValueError, KeyError, TypeError):
            return _status(400, "TokenReview: spec.token is required")
        user = self.cluster.tokens.get(token)
        status: dict[str, Any] = {"authenticated": user is not None}
        if user is not None:
            status["user"] = {
                "username": user.name,
                "uid": fake_digest(user.name)[7:43],
                "groups": [*user.groups, "system:authenticated"],
            }
        else:
            status["user"] = {}
            status["error"] = "invalid bearer token"
        review.setdefault("metadata", {})["creationTimestamp"] = None
        review["status"] = status
        return web.json_response(review, status=201)

    async def _access_review(self, request: web.Request) -> web.StreamResponse:
        answer = await self._fault(
            request, "subjectaccessreviews", None, "create", "authorization.k8s.io"
        )
        if answer is not None:
            return answer
        try:
            review = await request.json()
            spec = review["spec"]
            subject = User(spec["user"], tuple(spec.get("groups") or ()))
        except (ValueError, KeyError, TypeError):
            return _status(400, "SubjectAccessReview: spec.user is required")
        attributes = spec.get("resourceAttributes") or spec.get("nonResourceAttributes") or {}
        verb = attributes.get("verb", "")
        resource = attributes.get("resource") or attributes.get("path") or ""
        if attributes.get("group"):
            resource = f"{resource}.{attributes['group']}"
        if attributes.get("subresource"):
            resource = f"{resource}/{attributes['subresource']}"
        allowed = self.cluster.can(subject, verb, resource)
        status: dict[str, Any] = {"allowed": allowed}
        status["reason"] = (
            f'RBAC: allowed by the fake for user "{subject.name}"'
            if allowed
            else f'RBAC: user "{subject.name}" cannot {verb} {resource}'
        )
        review.setdefault("metadata", {})["creationTimestamp"] = None
        review["status"] = status
        return web.json_response(review, status=201)


class _StatusError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code

    def response(self) -> web.Response:
        return _status(self.code, str(self))


def _status(code: int, message: str, details: Mapping[str, Any] | None = None) -> web.Response:
    reason = _REASONS.get(code, "Unknown")
    return web.json_response(status_object(code, reason, message, details), status=code)


def _not_found(resource: str, name: str) -> web.Response:
    message = f'{resource}.{IMAGE_GROUP} "{name}" not found'
    details = {"name": name, "group": IMAGE_GROUP, "kind": resource}
    return _status(404, message, details)


def _forbidden(user: User, verb: str, resource: str, group: str) -> str:
    full = f"{resource}.{group}" if group else resource
    return (
        f'{full} is forbidden: User "{user.name}" cannot {verb} resource "{resource}" '
        f'in API group "{group}" at the cluster scope'
    )


def _bookmark(version: str) -> dict[str, Any]:
    meta = {"resourceVersion": version}
    return {"kind": "Image", "apiVersion": "image.openshift.io/v1", "metadata": meta}


def _cut(request: web.Request) -> None:
    """Drop the connection mid-stream, as a dying API server or proxy would."""
    transport = request.transport
    if transport is not None:
        with contextlib.suppress(Exception):
            transport.abort()


# -- the operator's secret, as the kubelet mounts it -------------------------------------------


def aws_credentials(access_key: str, secret_key: str) -> str:
    """The shared-credentials file the operator writes in image-registry-private-configuration."""
    return f"[default]\naws_access_key_id = {access_key}\naws_secret_access_key = {secret_key}\n"


def write_secret_volume(directory: str | Path, data: Mapping[str, str | bytes]) -> Path:
    """A secret volume's layout: ``<key> -> ..data/<key>``, ``..data -> ..<timestamp>/``."""
    target = Path(directory)
    stamp = target / "..2024_05_01_10_00_00.000000001"
    stamp.mkdir(parents=True)
    for key, value in data.items():
        (stamp / key).write_bytes(value.encode() if isinstance(value, str) else value)
        (target / key).symlink_to(Path("..data") / key)
    (target / "..data").symlink_to(stamp.name)
    return target
