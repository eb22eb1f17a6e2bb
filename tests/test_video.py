"""Tests for vidlmm.video: reference index formulas, decoding only sampled frames, backends, bad inputs."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest

from tests.videos import (index_level, iter_moving_square_frames, locate_square, make_moving_square_frames,
                          square_box, write_audio_only, write_gif, write_video)
from vidlmm.errors import VideoReadError
from vidlmm.video import FrameSampling, VideoClip, probe_video, read_video, sample_frame_indices

T, H, W, FPS = 30, 64, 96, 10.0


# ------------------------------------------------------------------ index formulas
def test_uniform_matches_reference_formula():
    assert sample_frame_indices(10, 30.0, FrameSampling.uniform(16)).tolist() == [
        0, 0, 1, 1, 2, 3, 3, 4, 4, 5, 6, 6, 7, 7, 8, 9]
    for total in (1, 2, 7, 16, 17, 100, 1001, 7200):
        for n in (1, 8, 16, 64):
            got = sample_frame_indices(total, 25.0, FrameSampling.uniform(n))
            assert got.dtype == np.int64 and got.shape == (n,)
            assert got.tolist() == np.linspace(0, total - 1, n, dtype=int).tolist()


def test_fps_mode_reference_semantics():
    s = FrameSampling.fps(64)
    got = sample_frame_indices(95, 10.0, s)  # 9.5 s -> 9 frames spread over the clip
    assert got.tolist() == np.linspace(0, 94, 9, dtype=int).tolist()
    assert sample_frame_indices(5, 10.0, s).tolist() == [0]  # 0.5 s -> at least one frame
    assert sample_frame_indices(1, 30.0, s).tolist() == [0]
    capped = sample_frame_indices(7200, 1.0, s)
    assert capped.tolist() == np.linspace(0, 7199, 64, dtype=int).tolist()
    assert len(sample_frame_indices(300, 29.97, FrameSampling.fps(128))) == 10


def test_rate_mode():
    assert sample_frame_indices(100, 10.0, FrameSampling.at_rate(2.0)).tolist() == list(range(0, 100, 5))
    assert sample_frame_indices(100, 10.0, FrameSampling.at_rate(0.5)).tolist() == [0, 20, 40, 60, 80]
    assert sample_frame_indices(25, 10.0, FrameSampling.at_rate(1.0)).tolist() == [0, 10, 20]
    ntsc = sample_frame_indices(300, 29.97, FrameSampling.at_rate(1.0))  # 10.01 s -> t = 0..10 s
    assert len(ntsc) == 11 and ntsc[-1] == 299 and ntsc[1] == 29
    assert sample_frame_indices(3, 30.0, FrameSampling.at_rate(1.0)).tolist() == [0]
    # more than max_frames at this rate -> max_frames spread uniformly over the whole clip
    over = sample_frame_indices(100, 10.0, FrameSampling.at_rate(30.0, max_frames=8))
    assert over.tolist() == np.linspace(0, 99, 8, dtype=int).tolist()


def test_frame_sampling_describe_and_validation():
    assert FrameSampling().describe() == "uniform 16"
    assert FrameSampling.fps(64).describe() == "fps (max 64)"
    assert FrameSampling.at_rate(1.0, 64).describe() == "1 fps (max 64)"
    assert FrameSampling.at_rate(0.5, 32).describe() == "0.5 fps (max 32)"
    assert FrameSampling.from_reference(16, 16) == FrameSampling.uniform(16)
    assert FrameSampling.from_reference(-1, 128) == FrameSampling.fps(128)
    assert FrameSampling.from_reference(0, 64) == FrameSampling.fps(64)  # the 1fps checkpoints' num_frame 0
    for bad in (dict(mode="zoom"), dict(num_frames=0), dict(max_frames=0), dict(mode="rate", rate=0.0)):
        with pytest.raises(ValueError):
            FrameSampling(**bad)
    with pytest.raises(ValueError):
        sample_frame_indices(0, 10.0, FrameSampling())


# ------------------------------------------------------------------ decoding real files
@pytest.fixture(scope="module")
def frames():
    return make_moving_square_frames(T, H, W)


@pytest.fixture(scope="module")
def clips(tmp_path_factory, frames):
    d = tmp_path_factory.mktemp("clips")
    return {
        "mp4": write_video(d / "clip.mp4", frames, FPS, "mp4v"),
        "webm": write_video(d / "clip.webm", frames, FPS, "VP80"),
        "webm9": write_video(d / "clip9.webm", frames, FPS, "VP90"),
        "avi": write_video(d / "clip.avi", frames, FPS, "MJPG"),
    }


def assert_content(clip: VideoClip, total: int, tol_level: float = 8.0):
    """Each decoded frame shows the frame its index says: background level and square position."""
    h, w = clip.frames.shape[1:3]
    for frame, i in zip(map(clip.frame, range(clip.num_frames)), clip.indices):
        corner = frame[:4, :4, 2].astype(np.float32).mean()
        assert abs(corner - index_level(int(i), total)) <= tol_level, (i, corner)
        assert abs(locate_square(frame) - square_box(int(i), total, h, w)[0]) <= 1, i


@pytest.mark.parametrize("kind", ["mp4", "webm", "webm9", "avi"])
def test_read_video_full_size_uint8_rgb(clips, kind):
    clip = read_video(clips[kind], FrameSampling.uniform(8))
    assert clip.backend == "decord"
    assert clip.frames.dtype == np.uint8 and clip.frames.shape == (8, H, W, 3)
    assert clip.indices.tolist() == np.linspace(0, T - 1, 8, dtype=int).tolist()
    assert clip.total_frames == T and clip.fps == pytest.approx(FPS)
    assert clip.duration == pytest.approx(T / FPS)
    np.testing.assert_allclose(clip.timestamps, clip.indices / FPS)
    assert clip.path == clips[kind]
    assert_content(clip, T)
    assert abs(float(clip.frames[0, :4, :4, 0].mean()) - 30) < 8  # RGB order: red background is 30


def test_backends_agree(clips):
    for kind, path in clips.items():
        got = {b: read_video(path, FrameSampling.uniform(12), backend=b) for b in ("decord", "pyav", "opencv")}
        ref = got["decord"]
        for b, clip in got.items():
            assert clip.backend == b
            assert clip.indices.tolist() == ref.indices.tolist(), (kind, b)
            assert clip.total_frames == ref.total_frames and clip.fps == pytest.approx(ref.fps)
            diff = np.abs(clip.frames.astype(np.int16) - ref.frames.astype(np.int16))
            assert diff.mean() < 3.0, (kind, b, diff.mean())
            assert_content(clip, T)


def test_h264_with_b_frames_backends_agree(tmp_path):
    av = pytest.importorskip("av")
    path = str(tmp_path / "h264.mp4")
    try:
        with av.open(path, "w") as out:
            s = out.add_stream("libx264", rate=25)
            s.width, s.height, s.pix_fmt, s.options = 128, 96, "yuv420p", {"bf": "2", "g": "10"}
            for f in iter_moving_square_frames(60, 96, 128):
                for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    out.mux(p)
            for p in s.encode(None):
                out.mux(p)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"no H.264 encoder in this PyAV build: {exc}")
    clips = [read_video(path, FrameSampling.uniform(16), backend=b) for b in ("decord", "pyav", "opencv")]
    for clip in clips:
        assert clip.indices.tolist() == clips[0].indices.tolist() and clip.total_frames == 60
        assert_content(clip, 60)


def test_sampling_modes_on_file_and_duplicates(clips):
    clip = read_video(clips["mp4"], FrameSampling.uniform(40))  # more frames than the clip: repeats
    assert clip.indices.tolist() == np.linspace(0, T - 1, 40, dtype=int).tolist()
    # each distinct frame is decoded and kept once; frame_map says which one each sampled position shows
    assert clip.num_frames == 40 and clip.frames.shape == (T, H, W, 3)
    assert np.unique(clip.indices)[clip.frame_map].tolist() == clip.indices.tolist()
    first = np.flatnonzero(clip.indices == clip.indices[1])
    assert len(first) == 2 and clip.frame_map[first[0]] == clip.frame_map[first[-1]]
    assert clip.frame(first[0]) is not None and np.shares_memory(clip.frame(first[0]), clip.frame(first[-1]))
    assert clip.sampled_frames().shape == (40, H, W, 3)
    assert_content(clip, T)
    fps_clip = read_video(clips["webm"], FrameSampling.fps(64))  # 3 s -> 3 frames
    assert fps_clip.indices.tolist() == [0, 14, 29]
    rate_clip = read_video(clips["avi"], FrameSampling.at_rate(2.0))
    assert rate_clip.indices.tolist() == [0, 5, 10, 15, 20, 25]
    assert_content(rate_clip, T)


def test_reduced_size_decode(clips):
    for b in ("decord", "pyav", "opencv"):
        clip = read_video(clips["mp4"], FrameSampling.uniform(4), backend=b, size=(64, 40))
        assert clip.frames.shape == (4, 40, 64, 3), b
    # decord fails on some output widths (48 px here); auto falls back
    assert read_video(clips["mp4"], FrameSampling.uniform(4), size=(48, 32)).frames.shape == (4, 32, 48, 3)


def test_probe_video(clips):
    assert probe_video(clips["mp4"]) == (T, pytest.approx(FPS), "decord")
    assert probe_video(clips["avi"], backend="pyav")[:2] == (T, pytest.approx(FPS))


def test_fallback_when_decord_missing(clips, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # "import decord" now raises ImportError
    clip = read_video(clips["mp4"], FrameSampling.uniform(8))
    assert clip.backend == "pyav" and clip.frames.shape == (8, H, W, 3)
    assert_content(clip, T)


def test_fallback_when_decord_fails_or_lies(clips, monkeypatch):
    decord = pytest.importorskip("decord")

    def broken(self, indices):
        raise RuntimeError("simulated decoder failure")

    monkeypatch.setattr(decord.VideoReader, "get_batch", broken)
    clip = read_video(clips["webm"], FrameSampling.uniform(8))
    assert clip.backend == "pyav"
    assert_content(clip, T)

    class WrongShape:  # what decord's bug on small widths looks like: plausible size, wrong layout
        def asnumpy(self):
            return np.zeros((8, H, W // 2, 6), np.uint8)

    monkeypatch.setattr(decord.VideoReader, "get_batch", lambda self, idx: WrongShape())
    assert read_video(clips["webm"], FrameSampling.uniform(8)).backend == "pyav"
    monkeypatch.setitem(sys.modules, "av", None)  # and without PyAV: OpenCV
    clip = read_video(clips["webm"], FrameSampling.uniform(8))
    assert clip.backend == "opencv"
    assert_content(clip, T)


def test_animated_gif(tmp_path, frames):
    path = write_gif(tmp_path / "anim.gif", frames, FPS)
    clip = read_video(path, FrameSampling.uniform(6))
    assert clip.backend in ("pyav", "opencv")  # decord cannot open GIFs
    assert clip.frames.shape == (6, H, W, 3) and clip.total_frames == T
    assert clip.fps == pytest.approx(FPS)
    assert_content(clip, T, tol_level=4)


@pytest.mark.parametrize("width", [16, 24])
def test_tiny_width_video(tmp_path, width):
    path = write_video(tmp_path / f"tiny{width}.mp4", make_moving_square_frames(20, 32, width), FPS)
    clip = read_video(path, FrameSampling.uniform(5))
    assert clip.frames.shape == (5, 32, width, 3) and clip.frames.dtype == np.uint8
    assert clip.indices.tolist() == np.linspace(0, 19, 5, dtype=int).tolist()
    assert abs(float(clip.frames[-1, :4, :4, 2].mean()) - index_level(19, 20)) <= 10


def test_single_frame_video(tmp_path):
    path = write_video(tmp_path / "one.mp4", make_moving_square_frames(1, 32, 32), 25)
    clip = read_video(path, FrameSampling.uniform(16))
    assert clip.frames.shape == (1, 32, 32, 3) and clip.indices.tolist() == [0] * 16
    assert clip.frame_map.tolist() == [0] * 16 and clip.sampled_frames().shape == (16, 32, 32, 3)
    assert read_video(path, FrameSampling.fps(64)).indices.tolist() == [0]


def test_decoder_noise_stays_off_stderr(tmp_path, capfd):
    bad = tmp_path / "text.mp4"
    bad.write_text("secret file contents " * 20)
    with pytest.raises(VideoReadError):
        read_video(bad)
    captured = capfd.readouterr()
    assert "secret" not in captured.err and captured.err.strip() == ""


def test_import_is_light():
    code = "import sys, vidlmm.video; print(sorted({'decord','av','cv2','torch','gradio'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]"


def test_a_decode_leaves_the_other_libraries_vp8_and_vp9_encoders_working(tmp_path):
    """decord bundles an old libvpx; loaded into the global symbol scope (its own import does that) it takes over
    the VP8/VP9 encoders of every FFmpeg user loaded after it ("ABI version mismatch"). After read_video, in a
    fresh process where OpenCV and PyAV load only afterwards, both still write WebM: OpenCV's VP80 (the tests'
    writer) and PyAV's libvpx / libvpx-vp9 (`train.world.write_clip` without libx264)."""
    mp4 = write_video(tmp_path / "clip.mp4", make_moving_square_frames(8, 48, 64), 8)
    code = f"""
import sys
from tests.videos import make_moving_square_frames, write_video
from vidlmm.video import FrameSampling, read_video
assert read_video({mp4!r}, FrameSampling.uniform(4)).backend == "decord" and "cv2" not in sys.modules
frames = make_moving_square_frames(8, 48, 64)
write_video({str(tmp_path / "cv2.webm")!r}, frames, 8, "VP80")
import av
for name in ("libvpx", "libvpx-vp9"):
    if name not in av.codecs_available:
        continue
    with av.open({str(tmp_path)!r} + "/" + name + ".webm", "w", format="webm") as out:
        stream = out.add_stream(name, rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
print("written")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and out.stdout.strip() == "written", out.stderr[-2000:]
    clip = read_video(str(tmp_path / "cv2.webm"), FrameSampling.uniform(8), backend="pyav")
    assert [locate_square(f) for f in clip.frames] == [square_box(t, 8, 48, 64)[0] for t in range(8)]


# ------------------------------------------------------------------ bad inputs
def _bad_inputs(tmp_path, good_mp4):
    cases = {}
    cases["missing"] = (str(tmp_path / "nothing-here.mp4"), {"missing"})
    (tmp_path / "folder.mp4").mkdir()
    cases["directory"] = (str(tmp_path / "folder.mp4"), {"not_a_file"})
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)  # a decoder opening this would block forever: the stat check must catch it first
    cases["fifo"] = (str(fifo), {"not_a_file"})
    (tmp_path / "zero.mp4").write_bytes(b"")
    cases["empty"] = (str(tmp_path / "zero.mp4"), {"empty"})
    (tmp_path / "notes.mp4").write_text("This is a text file, not a video.\n" * 30)
    cases["text"] = (str(tmp_path / "notes.mp4"), {"not_a_video"})
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    cases["random"] = (str(tmp_path / "noise.mp4"), {"not_a_video"})
    data = open(good_mp4, "rb").read()
    (tmp_path / "cut.mp4").write_bytes(data[: int(len(data) * 0.4)])
    cases["truncated"] = (str(tmp_path / "cut.mp4"), {"not_a_video", "no_frames"})
    from PIL import Image
    Image.fromarray(make_moving_square_frames(1, 32, 32)[0]).save(tmp_path / "photo.png")
    os.rename(tmp_path / "photo.png", tmp_path / "photo.mp4")
    cases["still_png"] = (str(tmp_path / "photo.mp4"), {"not_a_video"})
    return cases


def test_bad_inputs_give_one_line_errors(tmp_path, clips):
    for name, (path, kinds) in _bad_inputs(tmp_path, clips["mp4"]).items():
        start = time.monotonic()
        with pytest.raises(VideoReadError) as info:
            read_video(path)
        err = info.value
        msg = str(err)
        assert err.kind in kinds, (name, err.kind, msg)
        assert "\n" not in msg and msg.startswith("Cannot read video '") and msg.endswith("."), msg
        assert os.path.basename(path) in msg and str(tmp_path) not in msg, msg
        assert time.monotonic() - start < 5, name
        with pytest.raises(VideoReadError):
            probe_video(path)
    again = tmp_path / "again"
    again.mkdir()
    specific = {n: str(_err(p)) for n, (p, _) in _bad_inputs(again, clips["mp4"]).items()
                if n in ("empty", "text", "still_png", "truncated")}
    assert "0 bytes" in specific["empty"]
    assert "text file" in specific["text"]
    assert "still image" in specific["still_png"]
    assert "MP4" in specific["truncated"] and "damaged" in specific["truncated"]


def _err(path) -> VideoReadError:
    try:
        read_video(path)
    except VideoReadError as err:
        return err
    raise AssertionError(f"{path} was read without error")


def test_audio_only_file(tmp_path):
    try:
        path = write_audio_only(tmp_path / "sound.m4a")
    except RuntimeError as exc:
        pytest.skip(str(exc))
    err = _err(path)
    assert err.kind == "no_video_stream" and "sound.m4a" in str(err)


def test_truncated_webm_reads_the_frames_that_exist(tmp_path, clips):
    data = open(clips["webm"], "rb").read()
    path = tmp_path / "cut.webm"
    path.write_bytes(data[: int(len(data) * 0.5)])
    for b in ("decord", "pyav"):
        clip = read_video(path, FrameSampling.uniform(4), backend=b)
        assert 1 <= clip.total_frames < T
        assert_content(clip, T)


def test_too_long_checked_before_decoding(long_video):
    start = time.monotonic()
    with pytest.raises(VideoReadError) as info:
        read_video(long_video, FrameSampling.fps(64), max_duration=600)
    assert info.value.kind == "too_long" and "600 s" in str(info.value)
    assert time.monotonic() - start < 5


def test_unknown_backend(clips):
    with pytest.raises(ValueError):
        read_video(clips["mp4"], backend="ffmpeg-cli")


# ------------------------------------------------------------------ a long video stays cheap
LONG_T = 2 * 60 * 60  # 2 hours at 1 fps


@pytest.fixture(scope="session")
def long_video(tmp_path_factory):
    start = time.monotonic()
    path = write_video(tmp_path_factory.mktemp("long") / "two_hours.mp4",
                       iter_moving_square_frames(LONG_T, 32, 32), 1.0)
    assert time.monotonic() - start < 20, "writing the 2-hour test clip should take a few seconds"
    return path


def test_two_hour_video_fps_mode_is_fast_and_small(long_video):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    start = time.monotonic()
    clip = read_video(long_video, FrameSampling.fps(64))
    elapsed = time.monotonic() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert clip.frames.shape == (64, 32, 32, 3) and clip.frames.nbytes == 64 * 32 * 32 * 3
    assert clip.indices.tolist() == np.linspace(0, LONG_T - 1, 64, dtype=int).tolist()
    assert clip.total_frames == LONG_T and clip.duration == pytest.approx(LONG_T)
    assert elapsed < 5, elapsed
    assert peak < 20 * 2**20, peak  # Python-side allocations: a few frames, not 7200
    assert rss_growth_mb < 200, rss_growth_mb
    assert_content(clip, LONG_T, tol_level=8)
    # the PyAV fallback seeks too, so it is also quick
    start = time.monotonic()
    pyav = read_video(long_video, FrameSampling.fps(64), backend="pyav")
    assert time.monotonic() - start < 10
    assert pyav.indices.tolist() == clip.indices.tolist()
    assert np.abs(pyav.frames.astype(np.int16) - clip.frames.astype(np.int16)).mean() < 3


# ------------------------------------------------------------------ memory follows the model, limits hold
@pytest.fixture(scope="module")
def big_frame_video(tmp_path_factory):
    """One 1920x1080 frame (6 MiB decoded): what a decode bomb does, at a size the tests can afford."""
    path = tmp_path_factory.mktemp("big") / "one_big_frame.mp4"
    return write_video(path, make_moving_square_frames(1, 1080, 1920), 25)


def test_transform_runs_per_frame_and_repeats_are_not_copied(big_frame_video):
    from vidlmm.preprocess import ImageProcessor

    processor = ImageProcessor.for_tower("siglip", 64)
    full = read_video(big_frame_video, FrameSampling.uniform(4))
    tracemalloc.start()
    clip = read_video(big_frame_video, FrameSampling.uniform(64), transform=processor.resize_frame)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert clip.frames.shape == (1, 64, 64, 3) and clip.num_frames == 64 and clip.source_size == (1920, 1080)
    # one full-size frame alive at a time (6 MiB), not 64 of them (398 MiB) as decoding then copying would hold
    assert peak < 3 * 1920 * 1080 * 3, peak
    # the per-frame resize is the processor's own: the same pixels as resizing the full-size frame afterwards
    assert np.array_equal(clip.frames[0], processor.resize_frame(full.frames[0]))


def test_model_pixels_equal_processing_full_frames(clips):
    from vidlmm.preprocess import ImageProcessor, read_pixels

    for processor in (ImageProcessor.for_tower("siglip", 32), ImageProcessor.for_tower("clip", 28)):
        clip, pixels = read_pixels(clips["mp4"], FrameSampling.uniform(40), processor)  # repeats: 30 distinct
        reference = processor(read_video(clips["mp4"], FrameSampling.uniform(40)).sampled_frames())
        assert clip.frames.shape[0] == T and pixels.shape == (40, 3, processor.size, processor.size)
        assert torch_equal(pixels, reference)


def torch_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


def test_pixel_limit_is_checked_before_decoding(big_frame_video, monkeypatch):
    import vidlmm.video as video

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a frame over the limit")

    monkeypatch.setattr(video, "_decode", no_decoding)
    with pytest.raises(VideoReadError) as info:
        read_video(big_frame_video, FrameSampling.uniform(8), max_pixels=1280 * 720)
    assert info.value.kind == "too_large"
    assert str(info.value) == ("Cannot read video 'one_big_frame.mp4': its frames are 1920x1080 (2.1 megapixels), "
                               "over the 0.9-megapixel limit.")


def test_pixel_limit_also_holds_when_the_headers_say_nothing(big_frame_video, monkeypatch):
    import vidlmm.video as video

    monkeypatch.setattr(video, "frame_size", lambda path: None)  # a container whose headers hide the size
    with pytest.raises(VideoReadError) as info:
        read_video(big_frame_video, FrameSampling.uniform(8), max_pixels=1280 * 720)
    assert info.value.kind == "too_large"
    assert read_video(big_frame_video, FrameSampling.uniform(2), max_pixels=None).frames.shape == (1, 1080, 1920, 3)


def test_decode_time_limit(clips, monkeypatch):
    import vidlmm.video as video

    clock = iter(range(0, 10**6, 5))  # every look at the clock: 5 s later
    monkeypatch.setattr(video.time, "monotonic", lambda: next(clock))
    with pytest.raises(VideoReadError) as info:
        read_video(clips["mp4"], FrameSampling.uniform(8), time_limit=12)
    assert info.value.kind == "too_slow"
    assert str(info.value) == "Cannot read video 'clip.mp4': decoding it takes longer than the 12 s limit."


def test_a_transform_that_changes_shape_is_a_bug_not_a_bad_file(clips):
    from vidlmm.video import TransformError

    sizes = iter(range(8, 100))
    with pytest.raises(TransformError):
        read_video(clips["mp4"], FrameSampling.uniform(4), transform=lambda f: f[: next(sizes)])


def test_decord_is_imported_on_first_use(monkeypatch):
    """`import_decord` imports decord when no one has (conftest preloads it, so take it out of sys.modules) and
    returns the loaded module afterwards."""
    decord = pytest.importorskip("decord")
    from vidlmm.decoders import import_decord

    monkeypatch.delitem(sys.modules, "decord")
    first = import_decord()
    assert hasattr(first, "VideoReader") and sys.modules["decord"] is first
    assert import_decord() is first
    monkeypatch.setitem(sys.modules, "decord", decord)
