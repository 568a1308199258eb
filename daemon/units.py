"""Human sizes the way docker/go-units' BytesSize prints them (what the seed's pruner uses)."""

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB")


def bytes_size(size: float) -> str:
    """4 significant digits in binary units: ``2.835 GiB``."""
    i = 0
    while size >= 1024 and i < len(_UNITS) - 1:
        size /= 1024
        i += 1
    return f"{size:.4g} {_UNITS[i]}"


def duration_text(seconds: float) -> str:
    """``1h``, ``1h30m``, ``24h``, ``45s``: the way durations are given on the command line."""
    left = round(seconds)
    if left == 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if unit == "d" and (left % 86400 or left < 2 * 86400):
            continue  # 24h and 36h read better than 1d and 1d12h
        if left >= size:
            parts.append(f"{left // size}{unit}")
            left %= size
    return "".join(parts)
