"""`penwright serve`: run dirs behind an OpenAI-compatible HTTP API and a web page to write with."""

from __future__ import annotations

from ..config import ServeConfig
from .app import create_app, load_writers

__all__ = ["ServeConfig", "create_app", "load_writers", "serve"]


def serve(cfg: ServeConfig, log=print) -> None:
    """Load the models and answer requests until interrupted."""
    import torch
    import uvicorn

    # Intra-op threads spinning on every core starve the event loop (10x slower on 2 busy cores).
    torch.set_num_threads(cfg.threads or max(1, torch.get_num_threads() - 1))
    app = create_app(cfg, log=log)
    log(f"serving {', '.join(cfg.models())} at http://{cfg.host}:{cfg.port}/ (API under /v1)")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
