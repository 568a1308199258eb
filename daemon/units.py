"""Human sizes the way docker/go-units' BytesSize prints them (what the seed's pruner uses)."""

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB")


def bytes_size(size: float) -> str:
    """4 significant digits in binary units: ``2.835 GiB``."""
    i = 0
    while size >= 1024 and i < len(_UNITS) - 1:
        size /= 1024
        i += 1
    return f"{size:.4g} {_UNITS[i]}"
