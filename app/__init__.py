"""The Gradio app: `build_app(config)` returns (demo, service); `main(argv)` builds and launches it.

Layout and wiring are in `ui.py`, the callbacks in `handlers.py`, what they do in `service.py` (no Gradio there),
settings in `config.py`.
Heavy imports (gradio, torch, transformers) happen in `build_app` / on first use, so `import app` is cheap.
"""

from __future__ import annotations

import logging
import os
import threading

from .config import AppConfig, load_config

log = logging.getLogger("vidlmm.app")


def build_app(config: AppConfig | None = None):
    """(gradio Blocks with its queue configured, Service). Nothing is loaded until asked (see `preload`)."""
    config = config or AppConfig()
    if not config.analytics:
        os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no calls home at all
    from .service import Service
    from .ui import build_ui

    service = Service(config)
    demo = build_ui(service, config)
    demo.queue(max_size=config.queue_size, default_concurrency_limit=config.concurrency)
    return demo, service


def preload(service, name: str = "default") -> threading.Thread:
    """Load a model in the background, so the server answers at once and the first question waits less."""

    def run():
        import time

        start = time.perf_counter()
        try:
            service.model(name)  # inside the model slot, like every load
            log.info("model '%s' loaded in %.1f s", name, time.perf_counter() - start)
        except Exception as err:  # noqa: BLE001 - a failed preload is reported again on first use
            log.warning("preloading model '%s' failed: %s", name, err)

    thread = threading.Thread(target=run, name="vidlmm-preload", daemon=True)
    thread.start()
    return thread


def launch(demo, config: AppConfig, **kwargs):
    """Launch with the app's safety defaults: no share link, bounded uploads, errors shown as sentences."""
    from .ui import CSS

    options = dict(server_name=config.host, server_port=config.port, share=config.share,
                   max_file_size=f"{config.max_upload_mb}mb", show_error=True, css=CSS,
                   footer_links=["api", "gradio"])
    options.update(kwargs)
    return demo.launch(**options)


def main(argv: list[str] | None = None) -> int:
    import warnings

    from vidlmm.errors import VidlmmError

    warnings.filterwarnings("ignore", category=UserWarning)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        config = load_config(argv)
        demo, service = build_app(config)
    except (VidlmmError, ValueError) as err:
        print(f"error: {err}")
        return 2
    if config.preload:
        preload(service)
    launch(demo, config)
    return 0


__all__ = ["AppConfig", "build_app", "launch", "load_config", "main", "preload"]
