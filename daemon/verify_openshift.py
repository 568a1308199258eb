"""Verify with the openshift source (OpenShift's ``-restore-mode=check-database``): every
managed Image object's manifest, config and layers are in the store, and every image stream
tag history item names an Image that exists."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from daemon import layout
from daemon.findings import Finding, Verification
from daemon.inventory import Inventory
from daemon.progress import Progress
from daemon.sources.base import SourceError
from daemon.sources.openshift import OpenShiftSource
from daemon.sources.openshift_objects import (
    ImageRecord,
    list_image_records,
    list_stream_records,
)
from daemon.storage.base import Storage
from daemon.verify import EXAMPLES, VERIFY, sizes_of


class OpenShiftVerifier:
    name = VERIFY

    def __init__(
        self,
        storage: Storage,
        source: Any,
        progress: Progress,
        report: Callable[[Finding], None],
        *,
        log: structlog.typing.FilteringBoundLogger | None = None,
        workers: int = 16,
    ) -> None:
        if not isinstance(source, OpenShiftSource):
            raise SourceError("verify with the openshift source needs an OpenShift API")
        self.storage = storage
        self.source = source
        self.progress = progress
        self.report = report
        self.log = log or structlog.get_logger()
        self.workers = max(1, workers)
        self.result = Verification()
        self.present: set[bytes] = set()

    async def run(self, _inventory: Inventory) -> Verification:
        self.progress.enter(self.name)
        images = await list_image_records(self.source, self.progress)
        streams = await list_stream_records(self.source)
        managed = [image for image in images.values() if image.managed]
        await self._presence(managed)
        problems = {image.name: self._problems(image) for image in managed}
        result = self.result
        broken: set[bytes | str] = set()
        named: set[bytes] = set()
        for key in sorted(streams):
            for tag, items in streams[key].tags:
                ref = f"{key}:{tag}"
                for position, text in enumerate(items):
                    result.tags += 1
                    line = self._tag(ref, position, text, images, problems, named)
                    if line is None:
                        continue
                    missing, reason, label = line
                    broken.add(label)
                    self.report(
                        Finding(
                            "broken",
                            key,
                            text,
                            f"imagestream tag {ref!r} in position {position}: {reason}",
                            f'Broken imagestream tag "{ref}" in position {position}: {reason}',
                            missing=missing,
                        )
                    )
                    self._example(f"{ref}@{text}")
        for image in sorted(managed, key=lambda i: i.name):
            found = problems[image.name]
            if not found or image.name in named:
                continue  # a tag line named it already, as the original does
            digest = layout.format_digest(image.name)
            broken.add(image.name)
            self._example(digest)
            self.report(
                Finding(
                    "broken",
                    image.repository,
                    digest,
                    "; ".join(text for _m, text in found),
                    "\n".join(f'Broken image "{digest}": {text}' for _m, text in found),
                    missing=sorted({m for m, _t in found if m}),
                )
            )
        missing_images = {label for label in broken if isinstance(label, str)}
        result.images = len(managed) + len(missing_images)
        result.broken = len(broken)
        self.log.info("verified", **result.document())
        return result

    def _example(self, text: str) -> None:
        if len(self.result.examples) < EXAMPLES:
            self.result.examples.append(text)

    def _tag(
        self,
        ref: str,
        position: int,
        text: str,
        images: dict[bytes, ImageRecord],
        problems: dict[bytes, list[tuple[str, str]]],
        named: set[bytes],
    ) -> tuple[list[str], str, bytes | str] | None:
        """(missing, reason, what is broken) for a tag item that is broken, else None."""
        try:
            raw = layout.parse_digest(text)
        except layout.InvalidDigest as exc:
            return [], f'bad image name "{text}": {exc}', f"bad:{text}"
        image = images.get(raw)
        if image is None:
            # the original's Images().Get NotFound error, word for word
            reason = f'image "{text}": images.image.openshift.io "{text}" not found'
            return [text], reason, text
        found = problems.get(raw)
        if not found:
            return None
        named.add(raw)
        # the original reports a tag by the first problem of its image
        missing, reason = found[0]
        return ([missing] if missing else []), reason, raw

    async def _presence(self, managed: list[ImageRecord]) -> None:
        wanted: dict[int, set[bytes]] = {}
        for image in managed:
            for raw in (image.name, *image.blobs, *image.children):
                wanted.setdefault(raw[0], set()).add(raw)
        self.present.update(await sizes_of(self.storage, wanted, self.progress, self.workers))

    def _problems(self, image: ImageRecord) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        digest = layout.format_digest(image.name)
        if image.name not in self.present:
            # the original: ErrImage{Digest: the image's own digest, ErrBlobUnknown}
            found.append((digest, f'image "{digest}": unknown blob'))
        for blob in image.blobs:
            if blob not in self.present:
                text = layout.format_digest(blob)
                found.append((text, f'image blob "{text}": unknown blob'))
        for child in image.children:
            if child not in self.present:
                text = layout.format_digest(child)
                found.append((text, f'child manifest "{text}": unknown blob'))
        return found
