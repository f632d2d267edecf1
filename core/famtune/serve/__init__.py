"""``famtune serve``: an OpenAI-compatible server and a chat page for a base, a merged model, or a
base with several adapters (see docs/users/serve.md)."""

from __future__ import annotations

import ipaddress
import sys

from famtune.errors import FamtuneError


def serve(
    model: str,
    adapters: list[str] | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    name: str | None = None,
    trust_remote_code: bool = False,
    log=print,
) -> int:
    """Load the models, then answer HTTP requests until interrupted."""
    from urllib.parse import urlencode

    import uvicorn

    from famtune.serve.app import create_app
    from famtune.serve.models import is_comparison, load_comparison, load_served, parse_adapter_specs

    if not _loopback(host) and not api_key:
        log(f"famtune: warning: serving on {host} without --api-key: anyone who reaches this port can use the models")
    if is_comparison(model):
        if adapters or name:
            raise FamtuneError(f"{model} is a comparison: its runs are served as they are; drop --adapter/--name")
        models = load_comparison(model, trust_remote_code=trust_remote_code)
    else:
        models = load_served(
            model, parse_adapter_specs(adapters or []), base_name=name, trust_remote_code=trust_remote_code
        )
    app = create_app(models, api_key=api_key)
    shown = f"[{host}]" if ":" in host else host
    page = f"http://{shown}:{port}/"
    log(f"famtune serve: models {', '.join(models)}; chat page {page} , API {page}v1 (Ctrl-C stops)")
    tuned = [m.name for m in models.values() if m.kind == "adapter"]
    if len(tuned) > 1 or (tuned and len(models) > 1):
        pair = tuned[:2] if len(tuned) > 1 else [tuned[0], next(n for n in models if n != tuned[0])]
        log(f"famtune serve: side by side: {page}?{urlencode({'a': pair[0], 'b': pair[1]})}")
    sys.stdout.flush()
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    try:
        server.run()
    except (OSError, SystemExit) as exc:  # uvicorn exits when it cannot bind (and has logged why)
        raise FamtuneError(
            f"cannot listen on {host}:{port} ({getattr(exc, 'strerror', None) or 'see above'}); "
            "pick another --port or --host"
        ) from None
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
