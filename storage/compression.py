"""Optional compression of states: the filter names ``attach(compression=...)`` accepts, and the plugin they need.

Float activations compress poorly (their mantissas are noise), so the default is none. LZ4, Zstd and the Blosc /
Bitshuffle variants are HDF5 plugins shipped by ``hdf5plugin``, an optional extra: a file written with one of
them records the filter's name on each states dataset (attribute ``compression``), and the reader imports
``hdf5plugin`` when a file needs it, failing with one line that says what to install.
"""

from __future__ import annotations

from typing import Any

from ..errors import LoopscopeError

INSTALL_HINT = "pip install 'loopscope[compress]'"

_BUILTIN: dict[str, dict[str, Any]] = {
    "gzip": {"compression": "gzip", "compression_opts": 4},
    "lzf": {"compression": "lzf"},
}
_PLUGIN = ("lz4", "zstd", "blosc-lz4", "bitshuffle-lz4")
NAMES = (*_BUILTIN, *_PLUGIN)


def check(name: str | None) -> None:
    """A one-line error for an unknown filter name or a missing plugin, before anything is written."""
    if name is None:
        return
    if name not in NAMES:
        raise LoopscopeError(f"compression={name!r} is not one of None, {', '.join(repr(n) for n in NAMES)}")
    if name in _PLUGIN:
        plugin(f"compression={name!r}")


def needs_plugin(name: str | None) -> bool:
    return name in _PLUGIN


def plugin(what: str, error: type[LoopscopeError] = LoopscopeError):
    """``hdf5plugin`` imported (which registers its filters with HDF5), or a one-line ``error`` naming the extra."""
    try:
        import hdf5plugin
    except ImportError:
        raise error(f"{what} needs the hdf5plugin package: {INSTALL_HINT}") from None
    return hdf5plugin


def dataset_options(name: str | None) -> dict[str, Any]:
    """``h5py`` create_dataset keyword arguments for filter ``name`` (byte shuffle before LZ4 in Blosc: floats'
    exponent bytes then sit together, the only part that compresses)."""
    if name is None:
        return {}
    if name in _BUILTIN:
        return dict(_BUILTIN[name])
    check(name)
    h5plugin = plugin(f"compression={name!r}")
    if name == "lz4":
        return dict(h5plugin.LZ4())
    if name == "zstd":
        return dict(h5plugin.Zstd())
    if name == "blosc-lz4":
        return dict(h5plugin.Blosc(cname="lz4", clevel=5, shuffle=h5plugin.Blosc.SHUFFLE))
    return dict(h5plugin.Bitshuffle(cname="lz4"))
