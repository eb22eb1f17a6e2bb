"""App settings: command-line options, each with an environment-variable equivalent (for Spaces and containers).

    python app.py --model M --host H --port P        # or VIDLMM_MODEL=M VIDLMM_HOST=H VIDLMM_PORT=P python app.py

Precedence: command line, then environment, then the defaults below. Nothing here imports gradio or torch.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path

from vidlmm.defaults import EMBEDDED_MODELS

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = ROOT / "assets" / "examples"


@dataclass
class AppConfig:
    """Everything the app can be told. Sizes are in MiB, durations in seconds."""

    model: str | None = None          # checkpoint folder or hub id; None: $VIDLMM_MODEL, embedded group, tiny stand-in
    models_dir: str = str(EMBEDDED_MODELS)  # embedded checkpoints, one folder each (group/, naive/, image/)
    host: str = "127.0.0.1"
    port: int = 7860
    dtype: str = "auto"
    device: str = "auto"
    quantization: str | None = None
    max_upload_mb: int = 200          # per uploaded file
    max_duration_s: float = 600.0     # longer videos are refused before decoding
    max_frames: int = 128             # upper bound of the frame sliders (memory grows with frames)
    cache_mb: int = 1024              # vision features of all sessions together (each session sees only its own)
    max_loaded_models: int = 3        # checkpoints kept in memory (switching beyond this reloads)
    queue_size: int = 32              # waiting requests beyond this are refused with "queue full"
    concurrency: int = 1              # model calls running at once (they share one queue)
    session_ttl_s: int = 3600         # a session's state (chat, files) is dropped this long after its last use
    eval_set: str | None = None       # multiple-choice JSON for the held-out redundancy curve
    allow_custom_models: bool = True  # accept any local folder / hub id typed by the user (off on a public Space)
    preload: bool = True              # start loading the default model in the background at startup
    share: bool = False               # never a public share link unless asked
    analytics: bool = False

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb) * 1024**2


# option name -> (environment variable, type, help)
_OPTIONS = {
    "model": ("VIDLMM_MODEL", str, "checkpoint folder or hub id (default: the embedded group model)"),
    "models_dir": ("VIDLMM_MODELS_DIR", str, "folder of embedded checkpoints, one sub-folder each"),
    "host": ("VIDLMM_HOST", str, "address to listen on (0.0.0.0 to serve the network)"),
    "port": ("VIDLMM_PORT", int, "port to listen on"),
    "dtype": ("VIDLMM_DTYPE", str, "auto, fp32, bf16 or fp16"),
    "device": ("VIDLMM_DEVICE", str, "auto, cpu or cuda"),
    "quantization": ("VIDLMM_QUANTIZATION", str, "8bit or 4bit (bitsandbytes, language model only)"),
    "max_upload_mb": ("VIDLMM_MAX_UPLOAD_MB", int, "largest accepted upload, MiB"),
    "max_duration_s": ("VIDLMM_MAX_DURATION_S", float, "longest accepted video, seconds"),
    "max_frames": ("VIDLMM_MAX_FRAMES", int, "most frames a user may sample"),
    "cache_mb": ("VIDLMM_CACHE_MB", int, "vision-feature cache for all sessions together, MiB"),
    "max_loaded_models": ("VIDLMM_MAX_LOADED_MODELS", int, "checkpoints kept loaded at once"),
    "queue_size": ("VIDLMM_QUEUE_SIZE", int, "most requests waiting in the queue"),
    "concurrency": ("VIDLMM_CONCURRENCY", int, "model calls running at once"),
    "session_ttl_s": ("VIDLMM_SESSION_TTL_S", int, "seconds a session's state lives after its last use"),
    "eval_set": ("VIDLMM_EVAL_SET", str, "multiple-choice JSON (MVBench style) for the held-out redundancy curve"),
}
_FLAGS = {  # boolean options: --name / --no-name, environment value 1/0
    "allow_custom_models": ("VIDLMM_ALLOW_CUSTOM_MODELS", "accept any local folder or hub id typed in the UI"),
    "preload": ("VIDLMM_PRELOAD", "load the default model in the background at startup"),
    "share": ("VIDLMM_SHARE", "create a public gradio.live link"),
    "analytics": ("VIDLMM_ANALYTICS", "send Gradio's usage analytics"),
}
_TRUE = ("1", "true", "yes", "on")


def _env_default(name: str, kind, default):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if kind is bool:
        return raw.strip().lower() in _TRUE
    return kind(raw)


def build_parser() -> argparse.ArgumentParser:
    defaults = AppConfig()
    parser = argparse.ArgumentParser(prog="python app.py", description="vidlmm: watch a video LMM's connector work.")
    for name, (env, kind, text) in _OPTIONS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, metavar=name.split("_")[-1].upper(),
                            default=None, help=f"{text} [${env}, default {getattr(defaults, name)}]")
    for name, (env, text) in _FLAGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, action=argparse.BooleanOptionalAction,
                            default=None, help=f"{text} [${env}, default {'on' if getattr(defaults, name) else 'off'}]")
    return parser


def load_config(argv: list[str] | None = None) -> AppConfig:
    """Command line over environment over defaults. On a Hugging Face Space, custom model paths default to off
    and the server listens on all interfaces (the Space's proxy is the only way in)."""
    args = build_parser().parse_args(argv)
    on_space = bool(os.environ.get("SPACE_ID"))
    values = {}
    for f in fields(AppConfig):
        default = f.default
        if f.name == "allow_custom_models" and on_space:
            default = False
        if f.name == "host":
            default = os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0" if on_space else default)
        if f.name == "port":
            default = int(os.environ.get("GRADIO_SERVER_PORT", default))
        env, kind = (_OPTIONS[f.name][0], _OPTIONS[f.name][1]) if f.name in _OPTIONS else (_FLAGS[f.name][0], bool)
        value = getattr(args, f.name)
        values[f.name] = value if value is not None else _env_default(env, kind, default)
    config = AppConfig(**values)
    if config.quantization in ("", "none"):
        config.quantization = None
    return config
