"""The command line as a user (or another tool) sees it: `python -m vidlmm ask|info` in a subprocess.

Contract under test (see vidlmm/cli.py): with `--json`, `ask` prints exactly one JSON object on stdout; a user
error (bad video, bad model path, bad option) exits with status 2 and prints exactly one line `error: ...` on
stderr, never a traceback. A 1-frame video is not an error. A 2-hour video in fps mode stays fast and small.

Each subprocess costs a few seconds of imports, so runs are shared through module-scoped fixtures, and the
independent error cases run two at a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.videos import iter_moving_square_frames, make_moving_square_frames, write_video

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is moving in the video?"
GOOD_T, GOOD_FPS = 60, 10.0  # 6 s
LONG_SECONDS, LONG_FPS = 2 * 3600, 1.0
TIMING_KEYS = ("decode", "vision", "connector", "prefill", "generation")


@dataclass
class Run:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    maxrss_mb: float | None = None

    def describe(self) -> str:
        return (f"vidlmm {' '.join(self.args)}\n-> exit {self.returncode} in {self.wall_s:.1f} s\n"
                f"stdout: {self.stdout[-2000:]!r}\nstderr: {self.stderr[-4000:]!r}")


def _env(cache_dir: Path) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg", GRADIO_ANALYTICS_ENABLED="False",
               VIDLMM_CACHE_DIR=str(cache_dir), PYTHONPATH=str(ROOT))
    env.pop("VIDLMM_MODEL", None)
    env.pop("VIDLMM_DECODER_LOGS", None)
    return env


def run_cli(args: list[str], env: dict, timeout: float = 300) -> Run:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vidlmm", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return Run(args, proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0)


# A fresh interpreter that runs the CLI as its only child and reports the child's peak RSS: the pytest process's
# own RUSAGE_CHILDREN would also count every earlier child.
_RSS_WRAPPER = r"""
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.run([sys.executable, "-m", "vidlmm", *sys.argv[1:]], capture_output=True, text=True)
wall = time.perf_counter() - t0
rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
print(json.dumps({"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr, "wall_s": wall,
                  "maxrss_mb": rss_kb / 1024}))
"""


def run_cli_measured(args: list[str], env: dict, timeout: float = 300) -> Run:
    proc = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"wrapper failed: {proc.stderr[-3000:]}"
    out = json.loads(proc.stdout)
    return Run(args, out["rc"], out["stdout"], out["stderr"], out["wall_s"], out["maxrss_mb"])


def parse_json_stdout(run: Run) -> dict:
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one JSON line on stdout\n{run.describe()}"
    obj = json.loads(lines[0])
    assert isinstance(obj, dict), run.describe()
    return obj


def uniform(total: int, n: int) -> list[int]:
    return np.linspace(0, total - 1, n).astype(int).tolist()


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def env(workdir) -> dict:
    return _env(workdir / "vidlmm-cache")


@pytest.fixture(scope="module")
def model_dir(workdir) -> Path:
    from vidlmm.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(workdir / "tiny-group", "groupresampler", seed=0, num_queries=64, group=4)


@pytest.fixture(scope="module")
def tiny_model(model_dir):
    from vidlmm.checkpoint import load_model

    return load_model(model_dir, tokenizer=False)


@pytest.fixture(scope="module")
def videos(workdir) -> dict[str, str]:
    v = {"good": write_video(workdir / "good.mp4", make_moving_square_frames(GOOD_T, 48, 64), GOOD_FPS),
         "one_frame": write_video(workdir / "one.mp4", make_moving_square_frames(1, 48, 64), GOOD_FPS)}
    data = Path(v["good"]).read_bytes()
    (workdir / "truncated.mp4").write_bytes(data[: int(len(data) * 0.4)])
    (workdir / "empty.mp4").write_bytes(b"")
    (workdir / "notes.mp4").write_text("These are my meeting notes, not a video.\n" * 20)
    (workdir / "a_folder.mp4").mkdir()
    v.update(truncated=str(workdir / "truncated.mp4"), empty=str(workdir / "empty.mp4"),
             text=str(workdir / "notes.mp4"), directory=str(workdir / "a_folder.mp4"),
             missing=str(workdir / "no_such_video.mp4"))
    return v


def _ask(video: str, model: Path | str | None, *extra: str) -> list[str]:
    args = ["ask", "--video", video, "--question", QUESTION, "--max-new-tokens", "4"]
    if model is not None:
        args += ["--model", str(model)]
    return [*args, *extra]


# ------------------------------------------------------------------ good runs
@pytest.fixture(scope="module")
def good_runs(env, model_dir, videos) -> dict[str, Run]:
    cases = {
        "uniform": _ask(videos["good"], model_dir, "--json", "--num-frames", "8"),
        "fps": _ask(videos["good"], model_dir, "--json", "--fps", "--max-frames", "4"),
        "info": ["info", "--model", str(model_dir), "--json"],
        "info_text": ["info", "--model", str(model_dir)],
        "one_frame": _ask(videos["one_frame"], model_dir, "--json"),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_cli, args, env) for name, args in cases.items()}
        return {name: f.result() for name, f in futures.items()}


def test_ask_json_uniform(good_runs, tiny_model, model_dir):
    run = good_runs["uniform"]
    assert run.returncode == 0, run.describe()
    assert "Traceback" not in run.stderr
    out = parse_json_stdout(run)
    assert {"answer", "token_ids", "frame_indices", "timestamps", "num_visual_tokens", "timings"} <= set(out)
    from vidlmm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    assert out["answer"] == tokenizer.decode(out["token_ids"], skip_special_tokens=True).strip()
    assert out["token_ids"] and all(isinstance(t, int) and not isinstance(t, bool) for t in out["token_ids"])
    assert len(out["token_ids"]) <= 4
    assert out["frame_indices"] == uniform(GOOD_T, 8)
    assert out["timestamps"] == pytest.approx([i / GOOD_FPS for i in out["frame_indices"]], abs=1e-5)
    assert out["num_visual_tokens"] == tiny_model.num_visual_tokens(8) == 64
    for key in TIMING_KEYS:
        assert isinstance(out["timings"][key], (int, float)) and out["timings"][key] >= 0, key
    print(f"\n[cli] ask --json --num-frames 8: {run.wall_s:.1f} s wall, timings {out['timings']}")


def test_ask_json_and_info_name_the_precision(good_runs):
    """The precision the model was loaded in and why (tiny models: fp32, the reference's numerics)."""
    ask = parse_json_stdout(good_runs["uniform"])["precision"]
    info = parse_json_stdout(good_runs["info"])["precision"]
    assert ask == info
    assert ask["name"] == "fp32" and ask["dtype"] == "float32" and ask["quantization"] is None
    assert ask["reason"].startswith("fp32 because the weights are small")
    text = good_runs["info_text"]
    assert text.returncode == 0, text.describe()
    line = next(line for line in text.stdout.splitlines() if line.startswith("precision"))
    assert line.split(None, 1)[1].startswith("fp32: fp32 because the weights are small"), line


def test_ask_json_fps_mode_capped(good_runs):
    run = good_runs["fps"]
    assert run.returncode == 0, run.describe()
    out = parse_json_stdout(run)
    duration = GOOD_T / GOOD_FPS
    n = min(4, max(1, int(duration)))
    assert n == 4  # the cap is what limits it here (6 s clip)
    assert out["frame_indices"] == uniform(GOOD_T, n)
    assert out["timestamps"] == pytest.approx([i / GOOD_FPS for i in out["frame_indices"]], abs=1e-5)


def test_info_json(good_runs, tiny_model):
    run = good_runs["info"]
    assert run.returncode == 0, run.describe()
    assert run.stderr.strip() == "", run.describe()
    info = parse_json_stdout(run)
    assert info["connector"] == "groupresampler"
    assert info["num_queries"] == 64
    assert info["groups"] == 4
    assert info["parameters"] == tiny_model.parameter_counts()
    assert set(info["parameters"]) == {"vision_tower", "connector", "language_model"}
    assert all(isinstance(v, int) and v > 0 for v in info["parameters"].values())


def test_one_frame_video_succeeds(good_runs):
    run = good_runs["one_frame"]
    assert run.returncode == 0, run.describe()
    assert "Traceback" not in run.stderr
    out = parse_json_stdout(run)
    assert out["frame_indices"] == [0] * 16  # the checkpoint's default: uniform 16, repeats allowed
    assert out["timestamps"] == [0.0] * 16
    assert out["num_visual_tokens"] == 64


def test_default_stand_in_model(env, workdir, videos):
    """No --model: the tiny stand-in is written to $VIDLMM_CACHE_DIR (unless an embedded model exists)."""
    from vidlmm.defaults import embedded_model

    run = run_cli(_ask(videos["good"], None, "--json", "--num-frames", "4"), env)
    assert run.returncode == 0, run.describe()
    parse_json_stdout(run)
    other = [line for line in run.stderr.splitlines() if line.strip() and not line.startswith("note: ")]
    assert other == [], run.describe()
    if embedded_model() is None:
        assert (Path(env["VIDLMM_CACHE_DIR"]) / "tiny-random-group-v1" / "config.json").is_file()
        assert run.stderr.startswith("note: "), run.describe()


# ------------------------------------------------------------------ user errors
BAD_CASES = ["missing", "empty", "text", "truncated", "directory", "bad_model", "bad_option", "budget_on_resampler",
             "damaged_weights", "shard_outside"]


@pytest.fixture(scope="module")
def damaged_models(model_dir, workdir) -> dict[str, Path]:
    """Copies of the tiny model: one with its safetensors cut in half, one whose shard index points outside."""
    import shutil

    truncated = workdir / "damaged-model"
    shutil.copytree(model_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    outside = workdir / "escaping-model"
    shutil.copytree(model_dir, outside)
    (outside / "model.safetensors").rename(workdir / "elsewhere.safetensors")
    index = {"metadata": {}, "weight_map": {"language_model.model.norm.weight": "../elsewhere.safetensors"}}
    (outside / "model.safetensors.index.json").write_text(json.dumps(index))
    return {"truncated": truncated, "shard_outside": outside}


@pytest.fixture(scope="module")
def bad_runs(env, model_dir, videos, workdir, damaged_models) -> dict[str, Run]:
    cases = {name: _ask(videos[name], model_dir, "--json") for name in
             ("missing", "empty", "text", "truncated", "directory")}
    cases["bad_model"] = _ask(videos["good"], workdir / "no-such-model", "--json")
    cases["bad_option"] = _ask(videos["good"], model_dir, "--json", "--num-frames", "abc")
    cases["budget_on_resampler"] = _ask(videos["good"], model_dir, "--json", "--token-budget", "32")
    cases["damaged_weights"] = _ask(videos["good"], damaged_models["truncated"], "--json")
    cases["shard_outside"] = _ask(videos["good"], damaged_models["shard_outside"], "--json")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_cli, args, env) for name, args in cases.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("case", BAD_CASES)
def test_user_error_is_one_line_exit_2(bad_runs, case):
    run = bad_runs[case]
    assert "Traceback" not in run.stderr + run.stdout, run.describe()
    assert run.returncode == 2, run.describe()
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.describe()
    assert run.stdout.strip() == "", run.describe()
    if case in ("missing", "empty", "text", "truncated", "directory"):
        assert "Cannot read video" in lines[0], run.describe()
    if case in ("damaged_weights", "shard_outside"):
        assert "'damaged-model' is damaged or truncated" in lines[0] or "outside its folder" in lines[0], lines[0]
        assert str(ROOT) not in lines[0] and "/tmp" not in lines[0], "a server path in a user-visible error"
    print(f"\n[cli] {case}: {lines[0]}")


def test_token_budget_serves_a_compressor_at_another_budget(workdir):
    from vidlmm.checkpoint import load_model
    from vidlmm.cli import build_parser, _load
    from vidlmm.tiny import write_tiny_checkpoint

    folder = write_tiny_checkpoint(workdir / "tiny-pool", "pool", connector_options={"token_budget": 16})
    assert load_model(folder).num_visual_tokens(4) == 16
    args = build_parser().parse_args(["info", "--model", str(folder), "--token-budget", "36"])
    assert _load(args).num_visual_tokens(4) == 36  # 9 per frame (a square) x 4 frames


# ------------------------------------------------------------------ a 2-hour video
@pytest.fixture(scope="module")
def two_hour_video(workdir) -> tuple[str, float]:
    t0 = time.perf_counter()
    frames = iter_moving_square_frames(int(LONG_SECONDS * LONG_FPS), 32, 32)
    path = write_video(workdir / "two_hours.mp4", frames, LONG_FPS)
    took = time.perf_counter() - t0
    print(f"\n[cli] wrote a {LONG_SECONDS} s {LONG_FPS:g} fps 32x32 video in {took:.2f} s "
          f"({os.path.getsize(path) / 1e6:.2f} MB)")
    assert took < 30
    return path, took


def test_two_hour_video_fps_mode_fast_and_small(env, model_dir, two_hour_video):
    path, _ = two_hour_video
    run = run_cli_measured(_ask(path, model_dir, "--json", "--fps", "--max-frames", "64"), env)
    print(f"\n[cli] 2-hour video, --fps --max-frames 64: exit {run.returncode}, {run.wall_s:.1f} s wall, "
          f"child peak RSS {run.maxrss_mb:.0f} MB")
    assert run.returncode == 0, run.describe()
    out = parse_json_stdout(run)
    total = int(LONG_SECONDS * LONG_FPS)
    n = min(64, max(1, int(total / LONG_FPS)))
    assert n == 64
    assert out["frame_indices"] == uniform(total, n)
    assert out["timestamps"] == pytest.approx([i / LONG_FPS for i in out["frame_indices"]], abs=1e-5)
    assert run.wall_s < 60, "hang guard"
    assert run.maxrss_mb < 1536, f"peak RSS {run.maxrss_mb:.0f} MB"
