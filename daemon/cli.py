"""``registry-pruned serve``, and one-shot ``check``/``delete`` like ``dockerregistry -prune``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon import client, logs, operator_storage
from daemon.config import ConfigError, Settings, load_settings, parse_duration
from daemon.findings import Finding
from daemon.lease import LeaseHeld
from daemon.listings import LISTINGS, print_listing
from daemon.prune import CHECK, DELETE
from daemon.report import Ending, restore_line, summary_lines
from daemon.retention import PolicyError, Retention, add_revision_flags, revision_options
from daemon.runs import STOPPED, SUCCEEDED, Busy, Run, RunManager, manager_for, options_for
from daemon.sources.base import ReadOnlyRefused
from daemon.storage import open_storage
from daemon.storage.base import StorageError
from daemon.trash import TrashGone, restore_run
from daemon.usage import table as usage_table
from daemon.verify import RECOVER, VERIFY


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"PRUNER_{name}", default)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--registry-config",
        type=Path,
        default=_env("REGISTRY_CONFIG"),
        help="the registry's config.yml (default /etc/docker/registry/config.yml)",
    )
    common.add_argument(
        "--storage-from",
        choices=("openshift",),
        default=_env("STORAGE_FROM") or None,
        help="take the storage from the image registry operator's config and mounted secret "
        "instead of --registry-config and REGISTRY_STORAGE_*",
    )
    common.add_argument(
        "--storage-secret-dir",
        type=Path,
        default=_env("STORAGE_SECRET_DIR", str(operator_storage.DEFAULT_SECRET_DIR)),
        help="where the secret image-registry-private-configuration is mounted",
    )
    common.add_argument(
        "--pvc-mount",
        default=_env("PVC_MOUNT", operator_storage.DEFAULT_PVC_MOUNT),
        help="where the registry's claim is mounted (pvc storage)",
    )
    common.add_argument(
        "--pvc-claim",
        default=_env("PVC_CLAIM") or None,
        help="the claim mounted at --pvc-mount; start-up fails if the operator names another",
    )
    common.add_argument(
        "--storage-ca-file",
        type=Path,
        default=_env("STORAGE_CA_FILE") or None,
        help="CA bundle for the storage endpoint (default for a trustedCA: "
        f"{operator_storage.DEFAULT_CA_FILE})",
    )
    common.add_argument("--state-dir", type=Path, default=_env("STATE_DIR", "state"))
    common.add_argument("--grace", type=_duration, default=_env("GRACE", "1h"))
    common.add_argument("--upload-max-age", type=_duration, default=_env("UPLOAD_MAX_AGE", "24h"))
    common.add_argument(
        "--trash",
        type=_duration,
        default=_env("TRASH", "0"),
        help="delete: move what is removed into the store's trash, kept this long (e.g. 7d) "
        "for `registry-pruned restore RUN_ID`; default off (0)",
    )
    common.add_argument(
        "--source", choices=("storage", "openshift"), default=_env("SOURCE", "storage")
    )
    common.add_argument("--kubeconfig", default=_env("KUBECONFIG"))
    common.add_argument(
        "--api-page-size",
        type=int,
        default=int(_env("API_PAGE_SIZE", "500") or 500),
        help="items per page when listing images and image streams (openshift source)",
    )
    common.add_argument(
        "--api-timeout",
        type=_duration,
        default=_env("API_TIMEOUT", "60s"),
        help="how long one API request may take before the run fails closed",
    )
    common.add_argument("--workers", type=int, default=int(_env("WORKERS", "16") or 16))
    common.add_argument("--log-format", choices=logs.FORMATS, default=_env("LOG_FORMAT", "json"))

    parser = argparse.ArgumentParser(
        prog="registry-pruned", description="Find and delete orphaned blobs of an image registry."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", parents=[common], help="run the HTTP daemon")
    serve.add_argument("--listen", default=_env("LISTEN", "127.0.0.1:8099"))
    serve.add_argument("--log-level", choices=logs.LEVELS, default=_env("LOG_LEVEL", "info"))
    serve.add_argument("--history", type=int, default=int(_env("HISTORY", "50") or 50))
    serve.add_argument(
        "--auth",
        choices=("auto", "on", "off"),
        default=_env("AUTH", "auto"),
        help="bearer tokens checked by TokenReview/SubjectAccessReview; auto: on off loopback",
    )
    serve.add_argument(
        "--insecure-no-auth",
        action="store_true",
        default=_truthy(_env("INSECURE_NO_AUTH")),
        help="allow listening beyond loopback without auth (something else must guard the port)",
    )
    serve.add_argument("--auth-check-verb", default=_env("AUTH_CHECK_VERB", "get"))
    serve.add_argument("--auth-delete-verb", default=_env("AUTH_DELETE_VERB", "delete"))
    serve.add_argument(
        "--auth-resource",
        default=_env("AUTH_RESOURCE", "images.image.openshift.io"),
        help="<plural>.<group> the verbs are checked on",
    )
    serve.add_argument(
        "--allowed-host",
        action="append",
        dest="allowed_hosts",
        metavar="NAME",
        help="a host name callers use for the daemon besides localhost and IP addresses "
        "(e.g. its Service's); repeatable; PRUNER_ALLOWED_HOSTS takes them comma-separated",
    )
    one_shots = (
        (CHECK, "report what would be deleted"),
        (DELETE, "delete orphans"),
        (VERIFY, "prove every kept image whole (exit 1 on any broken one)"),
        (RECOVER, "openshift: manifests in storage without an Image, under lost-found tags"),
    )
    client.add_parsers(sub)
    for name, text in one_shots:
        one = sub.add_parser(name, parents=[common], help=text)
        one.add_argument("--log-level", choices=logs.LEVELS, default=_env("LOG_LEVEL", "warning"))
        if name == CHECK:
            one.add_argument(
                "--usage",
                action="store_true",
                help="also print per-repository usage: exclusive and shared bytes (storage source)",
            )
        if name in (CHECK, DELETE):
            add_revision_flags(one)
        if name == DELETE:
            one.add_argument(
                "--online",
                action="store_true",
                default=(_env("ONLINE", "") or "").lower() in ("1", "true", "yes"),
                help="delete although the registry is writable (relies on the grace period)",
            )
        if name == RECOVER:
            one.add_argument(
                "--apply",
                action="store_true",
                help="create the ImageStreamMappings (needs the optional recover ClusterRole)",
            )
    restore = sub.add_parser(
        "restore", parents=[common], help="put a delete run's trash back (delete --trash 7d)"
    )
    restore.add_argument("run_id", metavar="RUN_ID")
    restore.add_argument("--log-level", choices=logs.LEVELS, default=_env("LOG_LEVEL", "warning"))
    listing = sub.add_parser("list", parents=[common], help="list what the store holds (NDJSON)")
    listing.add_argument("what", choices=LISTINGS)
    listing.add_argument("repository", nargs="?", help="for manifests: one repository only")
    listing.add_argument("--log-level", choices=logs.LEVELS, default=_env("LOG_LEVEL", "warning"))
    return parser


def _revision_options(args: argparse.Namespace, source: str) -> tuple[bool, Retention]:
    given = {
        name: getattr(args, name, None)
        for name in ("keep_last", "keep_younger_than", "keep_tags", "repositories")
    }
    return revision_options(
        getattr(args, "untagged", False),
        {k: v for k, v in given.items() if v is not None},
        args.command,
        source,
    )


def _operator_storage(args: argparse.Namespace) -> dict[str, object]:
    """--storage-from openshift: the registry config the operator's objects amount to."""
    if args.registry_config is not None:
        raise ConfigError(
            "--storage-from openshift replaces --registry-config (PRUNER_REGISTRY_CONFIG): "
            "give one of them"
        )
    # serve logs to stdout; one-shot runs keep stdout for the summary
    stream = None if args.command == "serve" else sys.stderr
    log = logs.make_logger(args.log_level, args.log_format, stream)
    config = asyncio.run(operator_storage.fetch_config(args.kubeconfig, args.api_timeout))
    mounts = operator_storage.Mounts(
        secret_dir=args.storage_secret_dir,
        pvc_mount=args.pvc_mount,
        pvc_claim=args.pvc_claim,
        ca_file=args.storage_ca_file,
        azure_federated_token=os.environ.get("AZURE_FEDERATED_TOKEN_FILE") or None,
        azure_service_url=os.environ.get(operator_storage.AZURE_SERVICEURL) or None,
    )
    storage = operator_storage.storage_config(config, mounts)
    operator_storage.log_choice(config, log)
    return storage


def settings_from(args: argparse.Namespace) -> Settings:
    hosts = getattr(args, "allowed_hosts", None)
    if hosts is None and hasattr(args, "allowed_hosts"):
        hosts = (_env("ALLOWED_HOSTS") or "").split(",")
    storage = _operator_storage(args) if args.storage_from == "openshift" else None
    return load_settings(
        args.registry_config,
        storage_config=storage,
        storage_origin=f"--storage-from openshift ({operator_storage.CONFIG_NAME})",
        state_dir=args.state_dir,
        grace=args.grace,
        upload_max_age=args.upload_max_age,
        trash=args.trash,
        source=args.source,
        kubeconfig=args.kubeconfig,
        api_page_size=args.api_page_size,
        api_timeout=args.api_timeout,
        workers=args.workers,
        log_level=args.log_level,
        log_format=args.log_format,
        listen=getattr(args, "listen", None),
        history=getattr(args, "history", None),
        auth=getattr(args, "auth", None),
        insecure_no_auth=getattr(args, "insecure_no_auth", None),
        auth_check_verb=getattr(args, "auth_check_verb", None),
        auth_delete_verb=getattr(args, "auth_delete_verb", None),
        auth_resource=getattr(args, "auth_resource", None),
        allowed_hosts=tuple(h.strip() for h in hosts if h.strip()) if hosts else None,
    )


def _lines(mode: str, run: Run, ending: Ending) -> list[str]:
    """The summary in the original words, with what verify or recover found."""
    if mode == VERIFY:
        return run.verification.lines() if run.verification else []
    if mode == RECOVER:
        return run.recovery.lines() if run.recovery else []
    lines = summary_lines(mode, run.summary, ending)
    if run.verification is not None:
        lines += run.verification.lines()
    return lines


async def run_once(
    settings: Settings,
    mode: str,
    online: bool,
    apply: bool = False,
    usage: bool = False,
    untagged: bool = False,
    retention: Retention | None = None,
) -> int:
    """One run, recorded in the state directory like the daemon's; summary on stdout, logs on
    stderr; the exit status."""
    log = logs.make_logger(settings.log_level, settings.log_format, sys.stderr)
    storage = open_storage(settings.storage, settings.workers)
    # now, while this process has one thread: a filesystem's reader processes start by fork,
    # not spawn (~0.2 CPU s and as much wall time less; daemon/storage/filesystem.py). A run
    # refused at its guard has started them for nothing: they end with the storage
    storage.warm_up()

    def found(finding: Finding) -> None:
        print(finding.message, flush=True)  # the original's Broken/Would add lines, as found

    manager = manager_for(settings, storage, log, log_end_as_problem=False, on_finding=found)
    options = options_for(
        settings,
        mode,
        online=online,
        apply=apply,
        usage=usage,
        untagged=untagged,
        retention=retention or Retention(),
    )
    try:
        await manager.load()
        try:
            run = await manager.start(mode, settings.source, options)
        except ReadOnlyRefused as exc:
            print(f"error: {exc.error}", file=sys.stderr)
            if exc.hint:
                print(f"hint: {exc.hint}", file=sys.stderr)
            return 2
        loop = asyncio.get_running_loop()
        # Ctrl-C / SIGTERM stop cooperatively: in-flight batches finish
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, run.stop.set)
        view = client.local_view(sys.stderr)
        if view is not None:
            await _draw(view, run, mode)  # the bar ends before the summary is printed
        await run.done.wait()
    except OSError as exc:
        print(
            f"error: cannot use the state directory {settings.state_dir}: {exc}; "
            "pass a writable one with --state-dir DIR",
            file=sys.stderr,
        )
        return 1
    finally:
        await storage.close()
    ending = Ending(
        run_id=run.id,
        state=run.state,
        phase=run.progress.phase,
        error=run.error,
        grace=settings.grace,
        upload_max_age=settings.upload_max_age,
        revisions_pruned=options.revisions_pruned,
    )
    if run.state == SUCCEEDED:
        print("\n".join(_lines(mode, run, ending)))
        if usage:
            _print_usage(_saved_usage(manager, run), settings.source)
        return 0
    if run.state == STOPPED:
        print("\n".join(_lines(mode, run, ending)))
        print("error: stopped before the end; partial counts above", file=sys.stderr)
        return 130
    if (mode == DELETE and run.summary.blobs) or mode in (VERIFY, RECOVER):
        print("\n".join(_lines(mode, run, ending)))
    print(f"error: {run.error}", file=sys.stderr)
    return 1


async def restore_once(settings: Settings, run_id: str) -> int:
    """Put a trashed delete run back, under the store's lease; recorded in its document where
    this state directory has it. Resumable: a restore cut short is finished by the next."""
    log = logs.make_logger(settings.log_level, settings.log_format, sys.stderr)
    storage = open_storage(settings.storage, settings.workers)
    manager = manager_for(settings, storage, log, log_end_as_problem=False)
    try:
        with contextlib.suppress(OSError):
            await manager.load()
        try:
            if manager.get(run_id) is not None:
                run = await manager.restore(run_id)
                restored = run.document()["restore"]
            else:
                # a run of another daemon on this store: the store's trash is the truth
                result = await restore_run(storage, run_id, manager.dead_runs(), log)
                when = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
                restored = {"restored_at": when, **result.document()}
        except (TrashGone, LeaseHeld, Busy, StorageError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    finally:
        await storage.close()
    print(f"Run {run_id}: " + restore_line(restored))
    return 0


async def _draw(view: client.ProgressView, run: Run, mode: str) -> None:
    """The client's bar on stderr, from the run's own counters, until the run ends."""
    started = time.monotonic()
    with view:
        while True:
            progress, done = run.progress, run.done.is_set()
            elapsed = time.monotonic() - started
            doc = {
                "phase": progress.phase,
                "progress": {
                    **progress.snapshot(),
                    "fraction": 1.0 if done else progress.fraction(mode == DELETE),
                    "eta_seconds": progress.eta(elapsed, mode == DELETE),
                },
            }
            view.show(doc, final=done)
            if done:
                return
            await asyncio.sleep(0.2)


def _saved_usage(manager: RunManager, run: Run) -> dict[str, Any] | None:
    """The usage report the run manager recorded for ``run``; None where there is none."""
    try:
        return json.loads(manager.usage_path(run.id).read_text())
    except (OSError, ValueError):
        return None


def _print_usage(document: dict[str, Any] | None, source: str) -> None:
    if document is None:
        print(f"error: the {source} source reports no per-repository usage", file=sys.stderr)
        return
    print()
    print(usage_table(document))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in client.COMMANDS:
        return client.main(args)
    try:
        settings = settings_from(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        from daemon.api import serve

        return serve(settings)
    if args.command == "restore":
        return asyncio.run(restore_once(settings, args.run_id))
    if args.command == "list":
        return asyncio.run(print_listing(settings, args.what, args.repository))
    try:
        untagged, retention = _revision_options(args, settings.source)
    except PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(
        run_once(
            settings,
            args.command,
            getattr(args, "online", False),
            getattr(args, "apply", False),
            getattr(args, "usage", False),
            untagged,
            retention,
        )
    )
