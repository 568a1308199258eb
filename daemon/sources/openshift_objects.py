"""Image objects and image streams as verify and recover need them (more than digests:
whether the registry manages an image, where it lives, each tag's history in order)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from daemon.progress import Progress
from daemon.sources.base import SourceError
from daemon.sources.openshift import (
    IMAGE_STREAMS,
    IMAGES,
    LIST_IMAGES,
    LIST_STREAMS,
    OpenShiftSource,
    _arr,
    _obj,
    image_digests,
)

MANAGED = "openshift.io/image.managed"
DEFAULT_REGISTRY = "image-registry.openshift-image-registry.svc:5000"


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One Image object: its manifest, the blobs and child manifests it needs."""

    name: bytes
    blobs: tuple[bytes, ...]
    children: tuple[bytes, ...]
    managed: bool  # only managed images have their blobs in this registry's store
    repository: str  # from dockerImageReference, "" if it names none


@dataclass(slots=True)
class StreamRecord:
    """One ImageStream: its tags' history (image names, newest first) and its registry."""

    key: str  # <namespace>/<name>
    tags: list[tuple[str, list[str]]] = field(default_factory=list)
    registry: str = DEFAULT_REGISTRY

    def history(self) -> list[str]:
        return [image for _tag, items in self.tags for image in items]


def _repository(reference: Any) -> str:
    """``host/ns/name@sha256:...`` -> ``ns/name``."""
    if not isinstance(reference, str):
        return ""
    path = reference.partition("@")[0]
    _host, _, repo = path.partition("/")
    return repo


def image_record(item: Any) -> ImageRecord:
    # an image whose config the object does not name is checked without it (its manifest
    # and layers): verify reports what the object says is missing, nothing it must guess
    name, blobs, children, _complete = image_digests(item)
    meta = _obj(item.get("metadata"), "image metadata")
    annotations = _obj(meta.get("annotations"), "image annotations")
    return ImageRecord(
        name,
        tuple(blobs),
        tuple(children),
        annotations.get(MANAGED) == "true",
        _repository(item.get("dockerImageReference")),
    )


async def list_image_records(
    source: OpenShiftSource, progress: Progress
) -> dict[bytes, ImageRecord]:
    """Every Image object, by manifest digest."""
    images: dict[bytes, ImageRecord] = {}

    def consume(items: list[Any]) -> None:
        for item in items:
            record = image_record(_obj(item, "an image"))
            images[record.name] = record
        progress.manifests += len(items)

    await source._list(IMAGES, "listing images", LIST_IMAGES, consume, images.clear)
    return images


async def list_stream_records(source: OpenShiftSource) -> dict[str, StreamRecord]:
    """Every ImageStream, by ``<namespace>/<name>``."""
    streams: dict[str, StreamRecord] = {}

    def consume(items: list[Any]) -> None:
        for item in items:
            meta = _obj(_obj(item, "an image stream").get("metadata"), "stream metadata")
            key = f"{meta.get('namespace')}/{meta.get('name')}"
            where = f"image stream {key}"
            status = _obj(item.get("status"), f"{where} status")
            record = StreamRecord(key)
            repository = status.get("dockerImageRepository")
            if isinstance(repository, str) and repository.endswith("/" + key):
                record.registry = repository[: -len(key) - 1] or DEFAULT_REGISTRY
            for tag in _arr(status.get("tags"), f"{where} status.tags"):
                tag = _obj(tag, f"{where} tag")
                items_ = _arr(tag.get("items"), f"{where} status.tags[].items")
                images = []
                for event in items_:
                    image = _obj(event, f"{where} tag event").get("image")
                    if not isinstance(image, str):
                        raise SourceError(
                            f"openshift: unexpected answer: {where} status.tags[].items[].image"
                        )
                    images.append(image)
                record.tags.append((str(tag.get("tag", "")), images))
            streams[key] = record

    await source._list(IMAGE_STREAMS, "listing image streams", LIST_STREAMS, consume, streams.clear)
    return streams
