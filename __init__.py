"""loopscope: record every iteration of a looped-depth language model, analyse it offline.

One added line attaches the recorder::

    cap = loopscope.attach(model, "run.h5", tokenizer=tok)

and ``loopscope.open("run.h5")`` reads the capture back without needing torch.
"""

__version__ = "0.1.0"

__all__ = ["attach", "open", "__version__", "LoopscopeError"]


def attach(model, path, **options):
    """Attach forward hooks to ``model``'s recurrent block and stream every iteration to ``path``.

    See :func:`loopscope.hooks.capture.attach` for the options.
    """
    from .hooks.capture import attach as _attach

    return _attach(model, path, **options)


def open(path, *, missing="error", **options):  # noqa: A001 - mirrors h5py.File / builtins.open on purpose
    """Open a capture file for reading (no torch needed). See :class:`loopscope.storage.reader.CaptureFile`.

    A run file the index links but the run folder lacks is an error; ``missing="skip"`` reads the other runs."""
    from .storage.reader import CaptureFile

    return CaptureFile(path, missing=missing, **options)


def __getattr__(name):
    # Lazy so that ``import loopscope`` stays light (analysis and the reader need no torch).
    if name == "LoopscopeError":
        from .storage.errors import LoopscopeError

        return LoopscopeError
    if name in ("analysis", "hooks", "storage", "cli", "examples"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'loopscope' has no attribute {name!r}")
