"""Downloads without a network: use what is cached, or fail at once in one line.

open_clip, ``datasets``, ``transformers`` and ``huggingface_hub`` fetch files on first use; with
no network they retry for about a minute before failing with a message that does not say how to
give the file instead. Before a download, adamerge therefore:

1. looks in the local cache with the library's own offline lookup (:func:`cached_hub_file`; a whole
   repo's snapshot folder: :func:`cached_hub_snapshot`, :func:`hub_snapshot`), so a file fetched
   once works with no network;
2. checks whether a network is there (:func:`network_problem`): ``HF_HUB_OFFLINE=1`` (or
   ``TRANSFORMERS_OFFLINE`` / ``HF_DATASETS_OFFLINE`` for datasets), else one short request to the
   hub (``HF_ENDPOINT``, default ``https://huggingface.co``) through the proxies the environment
   names, answered within :data:`PROBE_TIMEOUT_S` seconds;
3. with no network, raises :class:`OfflineError`: one line naming the download (model and tag,
   hub repo and file, or dataset id) and the option that gives a local file instead (see
   ``docs/offline.md``). Library calls that can be served from their caches run inside
   :func:`hub_offline`, so they read the cache instead of retrying.

Nothing is remembered between calls (no process-wide cache of probe answers).
"""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

PROBE_TIMEOUT_S = 4.0
DEFAULT_ENDPOINT = "https://huggingface.co"
DOCS = "docs/offline.md"
_TRUE = {"1", "ON", "YES", "TRUE"}


class OfflineError(OSError):
    """A download is needed and there is no network; the message names the download and how to
    give a local file instead."""


def offline_flag(datasets: bool = False) -> str | None:
    """The environment setting that turns downloads off (``"HF_HUB_OFFLINE=1"``), or None.

    Args:
        datasets: also honour ``HF_DATASETS_OFFLINE`` (for ``datasets.load_dataset``).
    """
    names = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"] + (["HF_DATASETS_OFFLINE"] if datasets else [])
    for name in names:
        value = os.environ.get(name)
        if value is not None and value.strip().upper() in _TRUE:
            return f"{name}={value}"
    return None


def hub_endpoint() -> str:
    """The Hugging Face hub address: ``HF_ENDPOINT`` or ``https://huggingface.co``."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _proxies() -> dict[str, str]:
    """The environment's proxies as urllib uses them, with ``ALL_PROXY`` for http(s) when no
    scheme-specific one is set (as httpx, which huggingface_hub uses, does)."""
    proxies = dict(urllib.request.getproxies())
    every = proxies.pop("all", None)
    if every and urllib.parse.urlsplit(every).scheme in ("http", "https"):
        for scheme in ("http", "https"):
            proxies.setdefault(scheme, every)
    return proxies


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc.reason, str):
        exc = exc.reason  # type: ignore[assignment]
    text = str(getattr(exc, "reason", None) or exc).strip().splitlines()
    return text[0] if text and text[0] else type(exc).__name__


def probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the server of ``url`` answers (any HTTP status); else why not, in a few words.

    One ``HEAD`` request to the server's root through the environment's proxies. Name lookup
    included, it is given ``timeout`` seconds (it runs in a thread, as a lookup cannot be timed
    out otherwise). Nothing is remembered: a probe runs only before a download that the cache
    cannot serve, and with no network the first one ends the run.
    """
    origin, proxies = _origin(url), _proxies()
    answer: list[str | None] = []

    def ask() -> None:
        try:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))
            with opener.open(urllib.request.Request(origin, method="HEAD"), timeout=timeout):
                pass
            answer.append(None)
        except urllib.error.HTTPError:
            answer.append(None)  # the server answered
        except Exception as exc:  # URLError, timeouts, TLS errors: no usable connection
            answer.append(_reason(exc))

    thread = threading.Thread(target=ask, name="adamerge-network-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    reason = answer[0] if answer else f"no answer within {timeout:g} s"
    if reason is not None:
        scheme = urllib.parse.urlsplit(origin).scheme
        via = f" through proxy {proxies[scheme]}" if proxies.get(scheme) else ""
        reason = f"{origin.rstrip('/')} is unreachable{via} ({reason})"
    return reason


def network_problem(url: str | None = None, datasets: bool = False) -> str | None:
    """Why downloads from ``url`` (default: the hub) cannot happen now, or None if they can.

    An offline setting (:func:`offline_flag`) answers without a request; otherwise
    :func:`probe` asks the server.
    """
    flag = offline_flag(datasets)
    if flag:
        return f"{flag} is set"
    return probe(url or hub_endpoint())


@contextmanager
def hub_offline() -> Iterator[None]:
    """Inside: huggingface_hub, transformers and datasets read their caches and never connect.

    They read their offline switches when imported; this sets those switches for the block and
    puts them back after it. ``datasets`` copies the hub's switch when it is imported, so import
    it before the block (it is not imported here: that takes seconds).
    """
    import sys
    try:
        import huggingface_hub.constants  # noqa: F401  (cheap; transformers reads it on each call)
    except ImportError:
        pass
    saved = []
    for module, names in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                          ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        mod = sys.modules.get(module)
        if mod is None:
            continue
        for name in names:
            if hasattr(mod, name):
                saved.append((mod, name, getattr(mod, name)))
                setattr(mod, name, True)
    try:
        yield
    finally:
        for mod, name, value in reversed(saved):
            setattr(mod, name, value)


def cached_hub_file(repo_id: str, filenames: Sequence[str], cache_dir: str | None = None,
                    revision: str | None = None) -> str | None:
    """The local path of the first of ``filenames`` of hub repo ``repo_id`` in the cache, or None.

    Looks only in the cache (``hf_hub_download(..., local_files_only=True)``, in
    :func:`hub_offline`: even a cache lookup builds request headers, which may ask the hub
    something otherwise): no connection.
    """
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None
    with hub_offline():
        for filename in filenames:
            try:
                return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                       local_files_only=True)
            except Exception:  # not cached (LocalEntryNotFoundError), or a broken cache entry
                continue
    return None


def cached_hub_snapshot(repo_id: str, revision: str | None = None, cache_dir: str | None = None) -> Path | None:
    """The snapshot folder of hub repo ``repo_id`` in the local cache (``refs/<revision>`` ->
    ``snapshots/<commit>``), or None; no connection (``snapshot_download(...,
    local_files_only=True)`` in :func:`hub_offline`). The folder may hold only some of the repo's
    files: the caller checks for the ones it needs."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    with hub_offline():
        try:
            return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True))
        except Exception:  # not cached (LocalEntryNotFoundError), or an incomplete snapshot
            return None


def hub_snapshot(repo_id: str, file_sets: Sequence[Sequence[str]], usable: Callable[[Path], bool], what: str,
                 hint: str, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """The local snapshot folder of hub repo ``repo_id`` holding the files ``usable`` needs.

    1. The cache's snapshot, when ``usable(folder)``: no connection at all.
    2. Else, with a network, ``snapshot_download`` restricted to each of ``file_sets`` (glob
       patterns, preferred first: e.g. safetensors, then ``.bin``) until the folder is usable; a
       repo with no usable set: ``FileNotFoundError`` naming it.
    3. With no network, one :class:`OfflineError` line (:func:`download_or_cache`): ``"<what> is
       not in the local cache, and <why>; <hint>"``.
    """
    cached = cached_hub_snapshot(repo_id, revision, cache_dir)
    if cached is not None and usable(cached):
        return cached
    from huggingface_hub import snapshot_download
    with download_or_cache(what, hint):
        for allow in file_sets:
            folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                            allow_patterns=list(allow)))
            if usable(folder):
                return folder
        raise FileNotFoundError(f"{what}: hub repo {repo_id!r} has no usable set of the files expected "
                                f"({'; or '.join(', '.join(a) for a in file_sets)})")


def require_network(what: str, hint: str, url: str | None = None, datasets: bool = False) -> None:
    """Raise :class:`OfflineError` ``"<what>, and <why not>; <hint> (see docs/offline.md)"`` when
    there is no network for the download ``what`` describes; return when there is one."""
    problem = network_problem(url, datasets=datasets)
    if problem:
        raise OfflineError(f"{what}, and {problem}; {hint} (see {DOCS})")


@contextmanager
def download_or_cache(what: str, hint: str, url: str | None = None, datasets: bool = False) -> Iterator[None]:
    """Around a library call that may download (``load_dataset``, ``from_pretrained``).

    With a network, the call runs as it is. Without one, it runs in :func:`hub_offline` (served
    from the library's cache) and a failure to find the files there (an ``OSError``) becomes one
    :class:`OfflineError` line: ``"<what> is not in the local cache, and <why>; <hint>"``.
    """
    problem = network_problem(url, datasets=datasets)
    if problem is None:
        yield
        return
    try:
        with hub_offline():
            yield
    except OfflineError:
        raise
    except OSError as exc:
        raise OfflineError(f"{what} is not in the local cache, and {problem}; {hint} (see {DOCS})") from exc


def is_local_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id: it exists, or it starts
    with ``/``, ``./``, ``../`` or ``~``, or has more than one ``/`` (hub ids are ``org/name``)."""
    if os.path.exists(os.path.expanduser(name)):
        return True
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or name in (".", "..")


__all__ = ["DOCS", "OfflineError", "PROBE_TIMEOUT_S", "cached_hub_file", "cached_hub_snapshot", "download_or_cache",
           "hub_endpoint", "hub_offline", "hub_snapshot", "is_local_path", "network_problem", "offline_flag", "probe",
           "require_network"]
