"""Pluggable implementations of the model's layer operations, picked by name.

"numpy" is the reference in refqwen/ itself. Faster backends register here.
"""

from refqwen.errors import RefqwenError

BACKENDS = {"numpy": "the float32 NumPy reference (refqwen/)"}


def available() -> dict[str, str]:
    """Backend name -> what it is, for every backend that can run on this machine."""
    return dict(BACKENDS)


def check(name: str) -> None:
    if name not in BACKENDS:
        listing = ", ".join(f"{n} ({why})" for n, why in available().items())
        raise RefqwenError(f"unknown backend {name!r}; available: {listing}")
