"""A kubernetes-asyncio ApiClient of our own, from a kubeconfig or the pod's service account."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import aiohttp
import yaml

if TYPE_CHECKING:
    from kubernetes_asyncio.client import ApiClient


class KubeConfigError(Exception):
    """The cluster's credentials cannot be loaded; the message says from where."""


async def api_client(kubeconfig: str | None, context: str | None = None) -> ApiClient:
    """Our own Configuration: the library's global default stays untouched."""
    # imported here: kubernetes_asyncio costs ~40 MB of RSS, and a storage-source check
    # against a registry config never talks to a cluster
    from kubernetes_asyncio.client import ApiClient, Configuration
    from kubernetes_asyncio.config import ConfigException, load_incluster_config, load_kube_config

    configuration = Configuration()
    try:
        if kubeconfig:
            await load_kube_config(
                config_file=kubeconfig,
                context=context,
                client_configuration=configuration,
                persist_config=False,
            )
        else:
            load_incluster_config(client_configuration=configuration)
    except (ConfigException, OSError, ValueError, TypeError, KeyError, yaml.YAMLError) as exc:
        if kubeconfig:
            hint = "check the file, or pass another with --kubeconfig FILE"
            where = f"kubeconfig {kubeconfig}"
        else:
            hint = "outside a cluster, pass --kubeconfig FILE (or set PRUNER_KUBECONFIG)"
            where = "in-cluster service account"
        raise KubeConfigError(f"cannot load {where}: {exc}; {hint}") from None
    return ApiClient(configuration)


async def request(
    api: ApiClient,
    method: str,
    path: str,
    seconds: float,
    *,
    query: list[tuple[str, str]] | None = None,
    body: Any = None,
) -> tuple[int, bytes]:
    """One API request answered within ``seconds``: its status and raw body. Raises
    TimeoutError or aiohttp.ClientError as the client does; the caller names the failure."""
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    async with asyncio.timeout(seconds):
        # _preload_content=False: the raw aiohttp response, status unchecked, body unread
        resp = await api.call_api(
            path,
            method,
            query_params=query,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(total=seconds),
        )
        async with resp:
            return resp.status, await resp.read()
