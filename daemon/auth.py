"""Bearer-token auth for a daemon reachable beyond loopback: TokenReview, then SubjectAccessReview.

Fails closed: a review that errors or times out answers 503, never lets the request through.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import structlog
from aiohttp import web
from kubernetes_asyncio.client import ApiClient

from daemon.config import ConfigError, Settings
from daemon.kube import KubeConfigError, api_client, request

AUTH_MODES = ("auto", "on", "off")
TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
ACCESS_REVIEWS = "/apis/authorization.k8s.io/v1/subjectaccessreviews"
#: kubelet probes carry no token; they reveal nothing but "up" and "storage reachable"
# "/" is the status page: a static file that asks for a token and holds no data
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/"})
MAX_TOKEN = 16384  # service-account JWTs are ~1 KiB; anything huge is not a token
HOW_TO_GET = (
    "send 'Authorization: Bearer <token>'; get a token with "
    "'oc create token <serviceaccount> -n <namespace>' or 'oc whoami -t'"
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: the mode of the run a request names (resolved once, before any review is awaited)
RunMode = Callable[[web.Request], str | None]
#: set on a request whose bearer token was accepted with at least the check right
VERIFIED = web.RequestKey("verified", bool)


class ReviewUnavailable(Exception):
    """The API server could not answer a review: the request must be refused (503)."""


@dataclass(frozen=True, slots=True)
class Permission:
    """A verb on a cluster-scoped resource, as a SubjectAccessReview asks it."""

    verb: str
    resource: str  # plural, e.g. images
    group: str  # API group, '' for core

    def __str__(self) -> str:
        target = f"{self.resource}.{self.group}" if self.group else self.resource
        return f"{self.verb} {target}"


@dataclass(frozen=True, slots=True)
class UserInfo:
    """Who a TokenReview says the token belongs to."""

    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: Mapping[str, list[str]] = field(default_factory=dict)


class Reviewer(Protocol):
    """The two cluster calls; raise ReviewUnavailable on anything but a clear answer."""

    async def authenticate(self, token: str) -> tuple[UserInfo | None, str]: ...

    async def authorize(self, user: UserInfo, permission: Permission) -> tuple[bool, str]: ...

    async def close(self) -> None: ...


def split_resource(text: str) -> tuple[str, str]:
    """'images.image.openshift.io' -> ('images', 'image.openshift.io'); 'pods' -> ('pods', '')."""
    resource, _, group = text.strip().partition(".")
    if not resource:
        raise ConfigError(
            f"auth resource {text!r} must be <plural>.<group>, e.g. images.image.openshift.io"
        )
    return resource, group


def is_loopback(host: str) -> bool:
    """True only for addresses that cannot be reached from outside the pod."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        # a host name other than localhost may resolve anywhere: treat it as exposed
        return False


def auth_enabled(settings: Settings, host: str) -> bool:
    """Whether to require tokens on ``host``; ConfigError for a refused combination."""
    mode = settings.auth
    if mode not in AUTH_MODES:
        raise ConfigError(f"auth must be one of {', '.join(AUTH_MODES)}, not {mode!r}")
    exposed = not is_loopback(host)
    if mode == "on" and settings.insecure_no_auth:
        raise ConfigError("--auth on and --insecure-no-auth contradict each other; drop one")
    if not settings.auth_check_verb or not settings.auth_delete_verb:
        raise ConfigError("--auth-check-verb and --auth-delete-verb must not be empty")
    split_resource(settings.auth_resource)
    if mode == "on":
        return True
    if mode == "off" and exposed and not settings.insecure_no_auth:
        raise ConfigError(
            f"refusing to listen on {settings.listen} without authentication: anyone who can "
            "reach it could delete blobs. Use --auth on (TokenReview + SubjectAccessReview), "
            "listen on 127.0.0.1, or pass --insecure-no-auth (PRUNER_INSECURE_NO_AUTH=true) "
            "if something else guards the port"
        )
    return exposed and not settings.insecure_no_auth


def _redact(text: str, token: str) -> str:
    # an API server's error text should never echo the token, but make sure of it
    return text.replace(token, "<token>") if token else text


def _status_message(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace")
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return data["message"][:300]
    return "no message"


class KubeReviewer:
    """TokenReview and SubjectAccessReview through a kubernetes-asyncio ApiClient."""

    def __init__(self, api: ApiClient, timeout: float = 10.0) -> None:
        self.api = api
        self.timeout = timeout

    async def _create(self, path: str, body: dict[str, Any], what: str) -> dict[str, Any]:
        try:
            status, raw = await request(self.api, "POST", path, self.timeout, body=body)
        except TimeoutError:
            raise ReviewUnavailable(f"{what}: no answer within {self.timeout:g}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ReviewUnavailable(f"{what}: {type(exc).__name__}: {exc}") from None
        except Exception as exc:
            # whatever else the client raises (e.g. an unreadable service-account token on
            # refresh) is still no answer: refuse with 503 rather than a bare 500
            raise ReviewUnavailable(f"{what}: {type(exc).__name__}") from None
        if status not in (200, 201):
            raise ReviewUnavailable(f"{what}: HTTP {status}: {_status_message(raw)}")
        try:
            data = json.loads(raw)
        except ValueError:
            raise ReviewUnavailable(f"{what}: malformed JSON answer") from None
        result = data.get("status") if isinstance(data, dict) else None
        if not isinstance(result, dict):
            raise ReviewUnavailable(f"{what}: answer has no status")
        return result

    async def authenticate(self, token: str) -> tuple[UserInfo | None, str]:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token},
        }
        try:
            status = await self._create(TOKEN_REVIEWS, body, "TokenReview")
        except ReviewUnavailable as exc:
            raise ReviewUnavailable(_redact(str(exc), token)) from None
        authenticated = status.get("authenticated", False)
        if not isinstance(authenticated, bool):
            raise ReviewUnavailable("TokenReview: status.authenticated is not a boolean")
        if not authenticated:
            return None, _redact(str(status.get("error") or "not authenticated"), token)[:300]
        user = status.get("user") or {}
        name = user.get("username") if isinstance(user, dict) else None
        if not isinstance(name, str) or not name:
            raise ReviewUnavailable("TokenReview: authenticated without a username")
        extra = user.get("extra") if isinstance(user.get("extra"), dict) else {}
        return (
            UserInfo(
                username=name,
                uid=str(user.get("uid") or ""),
                groups=tuple(g for g in user.get("groups") or () if isinstance(g, str)),
                extra=extra,
            ),
            "",
        )

    async def authorize(self, user: UserInfo, permission: Permission) -> tuple[bool, str]:
        spec: dict[str, Any] = {
            "user": user.username,
            "groups": list(user.groups),
            "resourceAttributes": {
                "verb": permission.verb,
                "group": permission.group,
                "resource": permission.resource,
            },
        }
        if user.uid:
            spec["uid"] = user.uid
        if user.extra:
            spec["extra"] = dict(user.extra)
        body = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": spec,
        }
        status = await self._create(ACCESS_REVIEWS, body, "SubjectAccessReview")
        allowed = status.get("allowed", False)
        if not isinstance(allowed, bool):
            raise ReviewUnavailable("SubjectAccessReview: status.allowed is not a boolean")
        return allowed, str(status.get("reason") or "")[:300]

    async def close(self) -> None:
        await self.api.close()


async def create_reviewer(kubeconfig: str | None, review_timeout: float = 10.0) -> KubeReviewer:
    """A reviewer on the pod's service account, or on ``kubeconfig`` when given."""
    try:
        client = await api_client(kubeconfig)
    except KubeConfigError as exc:
        raise ConfigError(
            f"auth is on but the cluster cannot be reached to review tokens: {exc}. "
            "Give --kubeconfig, run in a pod, or listen on 127.0.0.1"
        ) from None
    return KubeReviewer(client, review_timeout)


def _error(status: int, message: str, **extra: Any) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="registry-pruned"'} if status == 401 else None
    return web.json_response({"error": message, **extra}, status=status, headers=headers)


class Authenticator:
    """Decides, per request, the permission needed and whether the caller has it."""

    def __init__(
        self,
        reviewer: Reviewer,
        log: structlog.typing.FilteringBoundLogger,
        *,
        check_verb: str = "get",
        delete_verb: str = "delete",
        resource: str = "images.image.openshift.io",
        cache_ttl: float = 60.0,
        cache_size: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not check_verb or not delete_verb:
            raise ConfigError("auth verbs must not be empty")
        plural, group = split_resource(resource)
        self.reviewer = reviewer
        self.log = log
        self.check = Permission(check_verb, plural, group)
        self.delete = Permission(delete_verb, plural, group)
        self.cache_ttl = cache_ttl
        self.cache_size = cache_size
        self.clock = clock
        # sha256(token) -> (user, expiry); (sha256(token), permission) -> expiry.
        # Only positive answers: a revoked right or token is noticed within cache_ttl.
        self._users: dict[str, tuple[UserInfo, float]] = {}
        self._grants: dict[tuple[str, Permission], float] = {}

    @classmethod
    def from_settings(
        cls, settings: Settings, reviewer: Reviewer, log: structlog.typing.FilteringBoundLogger
    ) -> Authenticator:
        return cls(
            reviewer,
            log,
            check_verb=settings.auth_check_verb,
            delete_verb=settings.auth_delete_verb,
            resource=settings.auth_resource,
        )

    def permission_for(self, request: web.Request, run_mode: RunMode) -> Permission | None:
        """None for the open probe paths; else what the request needs."""
        if request.path in OPEN_PATHS:
            return None
        route = request.match_info.route.resource
        canonical = route.canonical if route is not None else ""
        if canonical == "/prune":
            # any mode=delete, even a repeated one the handler will reject, needs delete; so
            # does any apply (recover writing ImageStreamMappings into the cluster)
            writes = "delete" in request.query.getall("mode", []) or "apply" in request.query
            return self.delete if writes else self.check
        if canonical == "/runs/{id}/stop":
            # stopping a run interferes with it as much as starting it: its mode's verb
            mode = run_mode(request)
            return self.delete if mode == "delete" else self.check
        if canonical in ("/runs/{id}/restore", "/trash/purge"):
            # writes to the store: putting a delete back, or deleting the trash for good
            return self.delete
        # reads, /metrics and unknown paths (404 only once authenticated)
        return self.check

    def middleware(self, run_mode: RunMode) -> Any:
        """The aiohttp middleware; ``run_mode(id)`` tells a run's mode (None if unknown)."""

        @web.middleware
        async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
            permission = self.permission_for(request, run_mode)
            if permission is None:
                if request.path == "/readyz" and "Authorization" in request.headers:
                    # a caller who shows a token may read the details a probe does not get
                    permission = self.check
                else:
                    return await handler(request)
            denied = await self.admit(request, permission)
            if denied is not None:
                return denied
            request[VERIFIED] = True
            return await handler(request)

        return authenticate

    async def admit(self, request: web.Request, permission: Permission) -> web.Response | None:
        """None when the caller may go on; else the 401/403/503 answer."""
        scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return _error(401, f"a bearer token is required: {HOW_TO_GET}")
        if len(token) > MAX_TOKEN or not token.isascii() or not token.isprintable():
            return _error(401, f"the bearer token is malformed: {HOW_TO_GET}")
        key = hashlib.sha256(token.encode()).hexdigest()
        now = self.clock()
        try:
            user = self._cached_user(key, now)
            if user is None:
                user, reason = await self.reviewer.authenticate(token)
                if user is None:
                    self.log.info("auth: token rejected", path=request.path, reason=reason)
                    return _error(
                        401,
                        f"the bearer token was not accepted by the cluster ({reason}): "
                        f"{HOW_TO_GET}",
                    )
                self._remember(self._users, key, (user, now + self.cache_ttl))
            if not self._granted(key, permission, now):
                allowed, reason = await self.reviewer.authorize(user, permission)
                if not allowed:
                    self.log.info(
                        "auth: permission denied",
                        user=user.username,
                        missing=str(permission),
                        path=request.path,
                    )
                    return _error(
                        403,
                        f"{user.username} may not {permission} (cluster scope), which this "
                        f"request needs; grant it with a ClusterRole bound to the caller",
                        missing=str(permission),
                        reason=reason,
                    )
                self._remember(self._grants, (key, permission), now + self.cache_ttl)
        except ReviewUnavailable as exc:
            self.log.warning("auth: review failed, request refused", error=str(exc))
            return _error(
                503, f"cannot verify the caller, refusing the request (fail closed): {exc}"
            )
        self.log.debug("auth: allowed", user=user.username, permission=str(permission))
        return None

    def _cached_user(self, key: str, now: float) -> UserInfo | None:
        entry = self._users.get(key)
        if entry is None or entry[1] <= now:
            self._users.pop(key, None)
            return None
        return entry[0]

    def _granted(self, key: str, permission: Permission, now: float) -> bool:
        expiry = self._grants.get((key, permission))
        if expiry is None or expiry <= now:
            self._grants.pop((key, permission), None)
            return False
        return True

    def _remember(self, cache: dict[Any, Any], key: Any, value: Any) -> None:
        cache.pop(key, None)
        cache[key] = value
        while len(cache) > self.cache_size:
            # dicts keep insertion order: the first entry is the oldest
            del cache[next(iter(cache))]

    def cache_keys(self) -> list[str]:
        """The token hashes held (for tests: never the tokens themselves)."""
        return [*self._users, *(key for key, _ in self._grants)]

    async def close(self) -> None:
        await self.reviewer.close()
