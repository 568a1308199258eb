"""structlog loggers: JSON lines or logrus-like text; built and passed in, never global."""

from __future__ import annotations

import json
import logging
import sys
from types import ModuleType
from typing import IO, Any


def _structlog_without_rich() -> ModuleType:
    """structlog, imported without rich where this is its first import: structlog loads rich
    (when installed) for its console renderer and rich tracebacks, which these loggers never
    use: ~0.06 CPU s of every one-shot run. rich stays importable (the client's bar)."""
    if "structlog" in sys.modules or "rich" in sys.modules:
        import structlog

        return structlog
    # a None entry makes `import rich` raise ImportError: structlog's own fallback when rich
    # is not installed (plain tracebacks in its ConsoleRenderer)
    sys.modules["rich"] = None  # type: ignore[assignment]
    try:
        import structlog
    finally:
        del sys.modules["rich"]
    return structlog


structlog = _structlog_without_rich()

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("json", "text")


def _logrus_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text and all(c.isalnum() or c in "-._/:@+" for c in text):
        return text
    return json.dumps(text)


def logrus_renderer(_logger: Any, _name: str, event: dict[str, Any]) -> str:
    """``time="..." level=info msg="..." key=value``, as the registry itself logs."""
    parts = [
        f'time="{event.pop("timestamp", "")}"',
        f"level={event.pop('level', 'info')}",
        f"msg={json.dumps(str(event.pop('event', '')))}",
    ]
    parts += [f"{key}={_logrus_value(value)}" for key, value in sorted(event.items())]
    return " ".join(parts)


def make_logger(
    level: str = "info", fmt: str = "json", stream: IO[str] | None = None
) -> structlog.typing.FilteringBoundLogger:
    """A logger writing one line per event to ``stream`` at ``level`` and above."""
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}")
    renderer = structlog.processors.JSONRenderer(default=str) if fmt == "json" else logrus_renderer
    return structlog.wrap_logger(
        structlog.PrintLogger(stream),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
    )
