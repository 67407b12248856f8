"""The runtime's version check: a generated package names the runtime it needs
(``RUNTIME_VERSION`` of the energyc that generated it) and calls ``require`` at import."""

from __future__ import annotations

from energyc.runtime_version import RUNTIME_VERSION


def _version_tuple(version: str) -> tuple[int, ...]:
    """"0.10.2" -> (0, 10, 2), so that versions compare numerically."""
    return tuple(int(part) for part in version.split("."))


def require(version: str, package: str) -> None:
    """Check, at the import of a generated package, that this runtime is at least ``version``.

    Args:
        version: the ``RUNTIME_VERSION`` of the energyc that generated ``package``.
        package: the generated package's name, for the message.

    Raises:
        ImportError: the installed runtime is older than ``version``.
    """
    if _version_tuple(RUNTIME_VERSION) < _version_tuple(version):
        import energyc

        raise ImportError(
            f"{package} was generated for energyc.runtime >= {version}, but the installed energyc "
            f"{energyc.__version__} ({energyc.__file__}) has runtime {RUNTIME_VERSION}: upgrade "
            f"energyc, or regenerate the package with this energyc (`energyc compile`)"
        )
