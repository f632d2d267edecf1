"""Model sources: a local directory, a Hugging Face hub id (``Org/Name``) or a ModelScope id
(``modelscope:Org/Name``), resolved to a local directory.

A hub id is looked up in the library's local cache first; only when it is not there is the hub
asked, and only after a short reachability check of its host, so an offline machine gets one
line in a few seconds instead of the libraries' retry loops (ModelScope's take ~30 s) and their
raw exception text.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any
from urllib.parse import urlparse

from famtune.errors import FamtuneError

MODELSCOPE_PREFIX = "modelscope:"
REACH_TIMEOUT = 3.0  # seconds for name lookup + TCP connect to the hub's host


def is_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not os.path.exists(spec)


def unreachable(endpoint: str, timeout: float = REACH_TIMEOUT) -> str | None:
    """Why ``endpoint``'s host cannot be reached (``None`` when it can)."""
    url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    host, port = url.hostname or "", url.port or (80 if url.scheme == "http" else 443)
    # getaddrinfo has no timeout of its own (an unanswering DNS server blocks for 10 s or more)
    found: list[Any] = []

    def lookup() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            found.append(exc)

    worker = threading.Thread(target=lookup, daemon=True)
    worker.start()
    worker.join(timeout)
    if not found:
        return f"the name {host} did not resolve within {timeout:g} s"
    if isinstance(found[0], OSError):
        return f"the name {host} cannot be resolved ({found[0].strerror or found[0]})"
    infos = found[0]
    last: OSError | None = None
    for family, kind, proto, _, addr in infos[:4]:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(timeout)
                sock.connect(addr)
            return None
        except OSError as exc:
            last = exc
    return f"{host}:{port} does not answer ({getattr(last, 'strerror', None) or last})"


def _offline_error(spec: str, where: str, why: str) -> FamtuneError:
    return FamtuneError(
        f"{spec}: not a local directory, not in the {where} cache, and {why}; "
        f"download it on a connected machine and pass its directory"
    )


def _from_huggingface(spec: str) -> str:
    from huggingface_hub import constants, snapshot_download

    try:
        return snapshot_download(spec, local_files_only=True)
    except Exception:  # not cached (or offline mode): ask the hub below
        pass
    if constants.HF_HUB_OFFLINE:
        raise _offline_error(spec, "Hugging Face", "HF_HUB_OFFLINE is set")
    why = unreachable(constants.ENDPOINT)
    if why:
        raise _offline_error(spec, "Hugging Face", f"the hub cannot be reached: {why}")
    try:
        return snapshot_download(spec)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise FamtuneError(
            f"{spec}: the Hugging Face hub could not provide it ({type(exc).__name__}: {first}); "
            "check the id (and HF_TOKEN for gated models), or pass a local directory"
        ) from None


def _modelscope_api():
    """ModelScope's download function and default endpoint. Its hub client (``modelscope_hub``)
    imports in a fraction of a second; the ``modelscope`` package imports torch first."""
    try:
        from modelscope_hub.compat.snapshot_download import snapshot_download
        from modelscope_hub.constants import DEFAULT_ENDPOINT

        return snapshot_download, DEFAULT_ENDPOINT
    except ImportError:
        from modelscope import snapshot_download
        from modelscope.hub.utils.utils import get_endpoint

        return snapshot_download, get_endpoint()


def _from_modelscope(spec: str) -> str:
    model_id = spec[len(MODELSCOPE_PREFIX) :]
    try:
        snapshot_download, default_endpoint = _modelscope_api()
    except ImportError as exc:
        raise FamtuneError(f"{spec}: modelscope is not installed ({exc}); pip install modelscope") from None
    import logging

    for name in ("modelscope", "modelscope_hub"):  # its retry chatter would bury the one-line error
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return snapshot_download(model_id, local_files_only=True)
    except Exception:  # not cached: ask ModelScope below
        pass
    why = unreachable(os.environ.get("MODELSCOPE_DOMAIN") or default_endpoint)
    if why:
        raise _offline_error(spec, "ModelScope", f"ModelScope cannot be reached: {why}")
    try:
        return snapshot_download(model_id)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise FamtuneError(
            f"{spec}: ModelScope could not provide it ({type(exc).__name__}: {first}); "
            "check the id, or pass a local directory"
        ) from None


def resolve_source(spec: str) -> str:
    """A local directory holding the checkpoint named by ``spec``, downloading it if needed."""
    if os.path.isdir(spec):
        return os.path.abspath(spec)
    if spec.startswith(MODELSCOPE_PREFIX):
        return _from_modelscope(spec)
    if is_hub_id(spec):
        return _from_huggingface(spec)
    if os.path.exists(spec):
        raise FamtuneError(f"{spec}: is a file, not a model directory; pass the directory holding config.json")
    raise FamtuneError(f"{spec}: no such model directory; pass a local directory, Org/Name or modelscope:Org/Name")
