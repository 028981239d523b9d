"""Where a hub id is loaded from: the Hugging Face Hub, or the local cache alone when the hub cannot serve it.

transformers asks the hub for every file of a model it has not cached, and huggingface_hub retries a failed request
with back-off (about 25 s per file): a mistyped name or a machine without network waited a minute or more before its
error, and a cached model whose optional files were never downloaded (a chat template, say) waited minutes before it
loaded. One HEAD request for the model's ``config.json``, without retries and with huggingface_hub's own timeout
(``HF_HUB_ETAG_TIMEOUT``), decides instead: the hub serves it (load as usual); it cannot, but the model is cached
(load with ``local_files_only=True``: no further request); or one line says what is wrong. Offline mode
(``HF_HUB_OFFLINE``) sends no request at all.
"""

from __future__ import annotations

from ..errors import LoopscopeError, first_line

CONFIG = "config.json"
LOCAL = "pass a directory saved with save_pretrained"


def cache_only(name: str) -> bool:
    """True when hub id ``name`` must be loaded from the local cache alone (offline mode, or the hub cannot serve
    it and it is cached); False to load it as usual. Raises :class:`LoopscopeError` when it is neither served nor
    cached."""
    from huggingface_hub import constants

    cached = _is_cached(name)
    if _offline(constants):
        if cached:
            return True
        raise LoopscopeError(
            f"{name} is neither a local directory nor in the Hugging Face cache, and HF_HUB_OFFLINE is set: "
            f"unset it to download the model, or {LOCAL}"
        )
    problem = _hub_problem(name, constants)
    if problem is None:
        return False
    if cached:
        return True
    raise LoopscopeError(f"{name} is neither a local directory nor in the Hugging Face cache, and {problem}")


def _is_cached(name: str) -> bool:
    """Whether the cache holds ``name``'s config.json at its main revision (what transformers would load)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, CONFIG), str)
    except (ValueError, OSError):  # a name the cache cannot hold
        return False


def _offline(constants) -> bool:
    is_offline = getattr(constants, "is_offline_mode", None)  # huggingface_hub >= 1.0; older ones have the flag
    return bool(is_offline() if callable(is_offline) else getattr(constants, "HF_HUB_OFFLINE", False))


def _hub_problem(name: str, constants) -> str | None:
    """Why the hub cannot serve ``name`` and what to do (to end a sentence), or None when it can, or when
    transformers says best what is wrong (a gated or disabled model, a repository without config.json, a name
    that is no valid id)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import EntryNotFoundError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    endpoint = constants.ENDPOINT
    try:  # one request, no retries (the default), the user's HF_HUB_ETAG_TIMEOUT
        get_hf_file_metadata(hf_hub_url(name, CONFIG), timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except (GatedRepoError, EntryNotFoundError):
        return None
    except RepositoryNotFoundError:
        return (
            f"the hub ({endpoint}) has no such model: check the name (a private one needs `hf auth login`), or {LOCAL}"
        )
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status is not None and status < 500 and status not in (408, 429):
            return None  # refused for a reason transformers words better (403: disabled, 400: bad id)
        return f"the hub ({endpoint}) answered HTTP {status}: try again later, or {LOCAL}"
    except ValueError:  # not a valid hub id: transformers names what is wrong with it
        return None
    except Exception as exc:  # connection, DNS, TLS, proxy or timeout errors, whichever HTTP client raises them
        return f"the hub ({endpoint}) cannot be reached ({first_line(exc)}): check the name and the network, or {LOCAL}"
    return None
