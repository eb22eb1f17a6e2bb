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
    max_video_pixels: int = 4096 * 2160  # larger frames (from the container's headers) are refused before decoding
    max_decode_s: float = 60.0        # a read that takes longer stops with one sentence
    max_frames: int = 128             # most frames a request may sample (memory grows with frames)
    max_attention_frames: int = 32    # attention maps hold layers x heads x queries x frames x patches
    max_question_chars: int = 2000
    max_history_turns: int = 16       # earlier turns an API caller may send
    max_history_chars: int = 16000
    max_new_tokens: int = 512         # also bounded by the model's context
    max_fractions: int = 12           # active fractions of one zeroing curve
    max_seeds: int = 5
    max_redundancy_models: int = 4
    max_compare_models: int = 3
    max_heldout_items: int = 200
    max_dpi: int = 300
    cache_mb: int = 1024              # vision features of all sessions together (each session sees only its own)
    model_memory_mb: int = 0          # loaded checkpoints' weights together; 0: half the memory free at startup
    queue_size: int = 32              # waiting requests beyond this are refused with "queue full"
    concurrency: int = 1              # model calls running at once (they share one queue)
    session_ttl_s: int = 3600         # a session's state (chat, files) is dropped this long after its last use
    eval_set: str | None = None       # multiple-choice JSON for the held-out redundancy curve
    allow_custom_models: bool | None = None  # any local folder / hub id typed by a user; None: only on loopback
    hub_models: bool | None = None    # offer the published hub checkpoints; None: only on loopback
    preload: bool = True              # start loading the default model in the background at startup
    share: bool = False               # never a public share link unless asked
    analytics: bool = False

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb) * 1024**2

    @property
    def local(self) -> bool:
        """Listening on loopback: every visitor is this machine's user."""
        return is_loopback(self.host)

    def resolved(self) -> "AppConfig":
        """Defaults that depend on where the server listens, filled in (a copy)."""
        from dataclasses import replace

        return replace(self, allow_custom_models=self.local if self.allow_custom_models is None
                       else self.allow_custom_models,
                       hub_models=self.local if self.hub_models is None else self.hub_models)


# option name -> (environment variable, type, help)
_OPTIONS = {
    "model": ("VIDLMM_MODEL", str, "checkpoint folder or hub id (default: the embedded group model)"),
    "models_dir": ("VIDLMM_MODELS_DIR", str, "folder of embedded checkpoints, one sub-folder each"),
    "host": ("VIDLMM_HOST", str, "address to listen on (0.0.0.0 to serve the network)"),
    "port": ("VIDLMM_PORT", int, "port to listen on"),
    "dtype": ("VIDLMM_DTYPE", str, "auto, fp32, bf16 or fp16"),
    "device": ("VIDLMM_DEVICE", str, "auto, cpu or cuda"),
    "quantization": ("VIDLMM_QUANTIZATION", str, "int8 (torch, CPU), 8bit or 4bit (bitsandbytes); language model only"),
    "max_upload_mb": ("VIDLMM_MAX_UPLOAD_MB", int, "largest accepted upload, MiB"),
    "max_duration_s": ("VIDLMM_MAX_DURATION_S", float, "longest accepted video, seconds"),
    "max_video_pixels": ("VIDLMM_MAX_VIDEO_PIXELS", int, "largest accepted frame, pixels (width x height)"),
    "max_decode_s": ("VIDLMM_MAX_DECODE_S", float, "longest a video read may take, seconds"),
    "max_frames": ("VIDLMM_MAX_FRAMES", int, "most frames a request may sample"),
    "max_attention_frames": ("VIDLMM_MAX_ATTENTION_FRAMES", int, "most frames for attention maps and pictures"),
    "max_question_chars": ("VIDLMM_MAX_QUESTION_CHARS", int, "longest question, characters"),
    "max_history_turns": ("VIDLMM_MAX_HISTORY_TURNS", int, "most earlier turns an API caller may send"),
    "max_history_chars": ("VIDLMM_MAX_HISTORY_CHARS", int, "longest history an API caller may send, characters"),
    "max_new_tokens": ("VIDLMM_MAX_NEW_TOKENS", int, "most tokens one answer may generate"),
    "max_fractions": ("VIDLMM_MAX_FRACTIONS", int, "most active fractions in one zeroing curve"),
    "max_seeds": ("VIDLMM_MAX_SEEDS", int, "most random seeds in one zeroing curve"),
    "max_redundancy_models": ("VIDLMM_MAX_REDUNDANCY_MODELS", int, "most models overlaid in one zeroing plot"),
    "max_compare_models": ("VIDLMM_MAX_COMPARE_MODELS", int, "most models in one comparison"),
    "max_heldout_items": ("VIDLMM_MAX_HELDOUT_ITEMS", int, "most held-out questions in one zeroing curve"),
    "max_dpi": ("VIDLMM_MAX_DPI", int, "highest resolution of downloaded figures"),
    "cache_mb": ("VIDLMM_CACHE_MB", int, "vision-feature cache for all sessions together, MiB"),
    "model_memory_mb": ("VIDLMM_MODEL_MEMORY_MB", int, "loaded models' weights together, MiB (0: half the free "
                        "memory at startup)"),
    "queue_size": ("VIDLMM_QUEUE_SIZE", int, "most requests waiting in the queue"),
    "concurrency": ("VIDLMM_CONCURRENCY", int, "model calls running at once"),
    "session_ttl_s": ("VIDLMM_SESSION_TTL_S", int, "seconds a session's state lives after its last use"),
    "eval_set": ("VIDLMM_EVAL_SET", str, "multiple-choice JSON (MVBench style) for the held-out redundancy curve"),
}
_FLAGS = {  # boolean options: --name / --no-name, environment value 1/0
    "allow_custom_models": ("VIDLMM_ALLOW_CUSTOM_MODELS", "accept any local folder or hub id a user types "
                            "(default: only when listening on loopback)"),
    "hub_models": ("VIDLMM_HUB_MODELS", "offer the published hub checkpoints (default: only when listening on "
                   "loopback)"),
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
        default = getattr(defaults, name)
        shown = "" if default is None else f", default {'on' if default else 'off'}"
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, action=argparse.BooleanOptionalAction,
                            default=None, help=f"{text} [${env}{shown}]")
    return parser


def is_loopback(host: str) -> bool:
    """Only this machine can reach a server listening here (so only its owner is a visitor)."""
    import ipaddress

    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_config(argv: list[str] | None = None) -> AppConfig:
    """Command line over environment over defaults. On a Hugging Face Space the server listens on all interfaces
    (the Space's proxy is the only way in). Custom models and the hub checkpoints are offered only when the server
    listens on loopback, unless asked for."""
    args = build_parser().parse_args(argv)
    on_space = bool(os.environ.get("SPACE_ID"))
    values = {}
    for f in fields(AppConfig):
        default = f.default
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
    return config.resolved()
