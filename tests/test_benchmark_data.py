"""The public benchmarks read as they ship (`vidlmm.benchmarks`): fixture files written here in each layout
(MVBench's root with bounded and frame-folder tasks, Video-MME's parquet, MLVU's dev root, MMVU, LongVideoBench,
EgoSchema in both layouts), format detection, missing videos listed instead of ending the run, per-duration and
M-Avg results, and `eval` end to end on such a root."""

from __future__ import annotations

import argparse
import io
import json
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from tests.ports import free_port
from tests.videos import make_moving_square_frames, write_video
from vidlmm.benchmarks import detect_format, load_benchmark
from vidlmm.errors import VidlmmError
from vidlmm.eval_cli import add_eval_arguments, run_eval_cli
from vidlmm.evaluate import ItemRecord, summarize, weights_fingerprint


def eval_json(data: Path, tiny_checkpoints) -> dict:
    """`eval --data DATA --json` on the tiny group model, in this process: the printed object."""
    from vidlmm.checkpoint import load_model

    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args(["--data", str(data), "--num-frames", "4", "--max-new-tokens", "3", "--json"])
    out = io.StringIO()
    with redirect_stdout(out):
        assert run_eval_cli(args, load_model(tiny_checkpoints["group"], dtype="fp32", device="cpu")) == 0
    return json.loads(out.getvalue())


def clip(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_video(path, make_moving_square_frames(8, 48, 48, seed=seed), fps=4)


def dump(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def mvbench(tmp_path):
    """Three tasks: a bounded mp4 task (answers with and without the option's trailing period), the TV task's
    frame folders, and an unbounded task with one video missing."""
    root = tmp_path / "MVBench"
    clip(root / "video/star/Charades_v1_480/A1.mp4")
    dump(root / "json/action_sequence.json", [
        {"video": "A1.mp4", "question": "What did the person do first?", "candidates": ["Sat down.", "Stood up."],
         "answer": "Stood up.", "start": 0.5, "end": 1.5},
        {"video": "A1.mp4", "question": "And then?", "candidates": ["Opened the door", "Closed the door"],
         "answer": "Closed the door.", "start": 1.0, "end": 2.0}])
    frames = root / "video/tvqa/frames_fps3_hq/clip_7"
    frames.mkdir(parents=True)
    from PIL import Image

    for i, frame in enumerate(make_moving_square_frames(6, 48, 48), start=1):
        Image.fromarray(frame).save(frames / f"{i:05d}.jpg")
    dump(root / "json/episodic_reasoning.json", [
        {"video": "clip_7", "question": "Who speaks?", "candidates": ["Ross", "Rachel", "Monica"],
         "answer": "Monica", "start": 0.0, "end": 2.0}])
    clip(root / "video/clevrer/video_validation/video_10000.mp4", seed=1)
    dump(root / "json/object_existence.json", [
        {"video": "video_10000.mp4", "question": "Is there a cube?", "candidates": ["yes", "no"], "answer": "no"},
        {"video": "video_10001.mp4", "question": "Is there a cube?", "candidates": ["yes", "no"], "answer": "yes"}])
    return root


def test_mvbench_root_as_it_ships(mvbench):
    assert detect_format(mvbench) == "mvbench"
    bench = load_benchmark(mvbench)
    by_id = {item.id: item for item in bench.items}
    assert set(by_id) == {"action_sequence_0", "action_sequence_1", "episodic_reasoning_0", "object_existence_0"}
    assert bench.missing == [{"id": "object_existence_1", "video": "video_10001.mp4", "why": "not found"}]
    first, second = by_id["action_sequence_0"], by_id["action_sequence_1"]
    assert (first.answer_letter, first.start, first.end, first.category) == ("B", 0.5, 1.5, "action_sequence")
    assert second.answer_letter == "B"  # "Closed the door." is the candidate "Closed the door"
    tv = by_id["episodic_reasoning_0"]
    assert Path(tv.video).is_dir() and tv.fps == 3.0 and tv.answer_letter == "C"
    assert by_id["object_existence_0"].start is None and bench.style == "mvbench"


def test_videomme_parquet_with_durations(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    root = tmp_path / "Video-MME"
    clip(root / "data/vid001.mp4")
    clip(root / "data/vid002.mkv", seed=2)
    rows = [
        {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
         "url": "https://example.invalid/1", "videoID": "vid001", "question_id": "001-1",
         "task_type": "Counting Problem", "question": "How many squares?",
         "options": ["A. One.", "B. Two.", "C. Three.", "D. Four."], "answer": "A"},
        {"video_id": "002", "duration": "long", "domain": "Film", "sub_category": "Movie",
         "url": "https://example.invalid/2", "videoID": "vid002", "question_id": "002-1",
         "task_type": "Action Recognition", "question": "What moves?",
         "options": ["A. A square.", "B. A car.", "C. A dog.", "D. Nothing."], "answer": "A"},
        {"video_id": "003", "duration": "medium", "domain": "Film", "sub_category": "Movie",
         "url": "https://example.invalid/3", "videoID": "vid003", "question_id": "003-1",
         "task_type": "Action Recognition", "question": "What moves?",
         "options": ["A. x.", "B. y.", "C. z.", "D. w."], "answer": "C"}]
    (root / "videomme").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), root / "videomme/test-00000-of-00001.parquet")
    assert detect_format(root) == "videomme"
    bench = load_benchmark(root)
    assert [i.id for i in bench.items] == ["001-1", "002-1"] and bench.style == "videomme"
    assert bench.items[1].video.endswith("vid002.mkv") and bench.items[0].options[0] == "One."
    assert [i.groups for i in bench.items] == [{"duration": "short"}, {"duration": "long"}]
    assert bench.missing == [{"id": "003-1", "video": "vid003", "why": "not found"}]
    records = [ItemRecord(i.id, i.video, i.category, i.question, i.answer_letter, "A", "A", True, 4, i.groups)
               for i in bench.items]
    result = summarize(records)
    assert result.per_group == {"duration": {
        "short": {"n": 1, "correct": 1, "accuracy": 1.0, "interval": [1.0, 1.0], "chance": 0.25, "unparsable": 0},
        "long": {"n": 1, "correct": 1, "accuracy": 1.0, "interval": [1.0, 1.0], "chance": 0.25, "unparsable": 0}}}
    (root / "videomme/test-00000-of-00001.parquet").write_bytes(b"PAR1 but not really")
    with pytest.raises(VidlmmError, match="could not be read as parquet"):
        load_benchmark(root)


def test_mlvu_dev_root_gives_m_avg(tmp_path):
    root = tmp_path / "MLVU"
    clip(root / "video/1_plotQA/movie1.mp4")
    clip(root / "video/4_count/count1.mp4", seed=3)
    dump(root / "json/1_plotQA.json", [
        {"video": "movie1.mp4", "duration": 2.0, "question": "Who wins?", "candidates": ["the cat", "the dog"],
         "answer": "the dog", "question_type": "plotQA"}] * 3)
    dump(root / "json/4_count.json", [
        {"video": "count1.mp4", "duration": 2.0, "question": "How many?", "candidates": ["1", "2", "3", "4"],
         "answer": "3", "question_type": "count"}])
    assert detect_format(root) == "mlvu"
    bench = load_benchmark(root)
    assert bench.average == "macro" and [i.category for i in bench.items] == ["plotQA"] * 3 + ["count"]
    # plotQA 3/3 right, count 0/1: micro 3/4, M-Avg (1 + 0) / 2
    records = [ItemRecord(i.id, i.video, i.category, i.question, i.answer_letter, "", i.answer_letter if
                          i.category == "plotQA" else "A", i.category == "plotQA", len(i.options)) for i in bench.items]
    result = summarize(records)
    assert result.accuracy == 0.75 and result.macro_accuracy == 0.5


def test_mlvu_hub_copy_with_the_options_inside_the_question(tmp_path):
    """The hub's MLVU dev: `video_name`, the options as the question's last lines, a letter answer, `task_type`."""
    root = tmp_path / "MLVU"
    clip(root / "video/2_needle/needle1.mp4")
    dump(root / "json/2_needle.json", [
        {"video_name": "needle1.mp4", "question": "What was hidden?\n(A) a key\n(B) a ring\n(C) a coin",
         "answer": "B", "task_type": "needle"},
        {"video_name": "2_needle/needle1.mp4", "question": "Where?\nA. in a box\nB. under a cup", "answer": "A",
         "task_type": "needle"},
        {"video_name": "gone.mp4", "question": "Which?\n(A) x\n(B) y", "answer": "A", "task_type": "needle"}])
    bench = load_benchmark(root)
    assert [(i.question, i.options, i.answer_letter, i.category) for i in bench.items] == [
        ("What was hidden?", ["a key", "a ring", "a coin"], "B", "needle"),
        ("Where?", ["in a box", "under a cup"], "A", "needle")]
    assert all(Path(i.video).is_file() for i in bench.items) and bench.missing[0]["video"] == "gone.mp4"
    dump(root / "json/2_needle.json", [{"video_name": "needle1.mp4", "question": "No options here", "answer": "A"}])
    with pytest.raises(VidlmmError, match="last lines must be its options"):
        load_benchmark(root)


def test_mmvu_keeps_open_ended_questions_apart(tmp_path):
    clip(tmp_path / "videos/Art/0.mp4")
    dump(tmp_path / "validation.json", [
        {"id": "mc-1", "video": "https://huggingface.co/datasets/yale-nlp/MMVU/resolve/main/videos/Art/0.mp4",
         "question": "Which colour?", "question_type": "multiple-choice",
         "choices": {"A": "red", "B": "white", "C": "blue", "D": "green", "E": "black"}, "answer": "B",
         "metadata": {"subject": "Art"}},
        {"id": "open-1", "video": "https://huggingface.co/datasets/yale-nlp/MMVU/resolve/main/videos/Art/0.mp4",
         "question": "What is drawn?", "question_type": "open-ended", "choices": {}, "answer": "a square"}])
    assert detect_format(tmp_path / "validation.json") == "mmvu"
    bench = load_benchmark(tmp_path)
    assert [(i.id, i.answer_letter, i.category, len(i.options)) for i in bench.items] == [("mc-1", "B", "Art", 5)]
    assert [(o.id, o.answer) for o in bench.open_ended] == [("open-1", "a square")]
    assert Path(bench.items[0].video) == tmp_path / "videos/Art/0.mp4"


def test_longvideobench_correct_choice_is_an_index(tmp_path):
    clip(tmp_path / "videos/abc.mp4")
    dump(tmp_path / "lvb_val.json", [
        {"id": "lvb-1", "video_path": "abc.mp4", "subtitle_path": "abc_en.json", "duration": 8.0,
         "starting_timestamp_for_subtitles": 0, "question": "What happens?", "candidates": ["x", "y", "z"],
         "correct_choice": 2, "duration_group": 15, "question_category": "E2O"}])
    assert detect_format(tmp_path) == "longvideobench"
    (item,) = load_benchmark(tmp_path).items
    assert (item.answer_letter, item.category, item.groups) == ("C", "E2O", {"duration": "15"})


def test_egoschema_in_both_layouts(tmp_path):
    own = tmp_path / "own"
    clip(own / "videos/uid-1.mp4")
    dump(own / "questions.json", [
        {"q_uid": "uid-1", "question": "What did c do?", **{f"option {i}": f"thing {i}" for i in range(5)}},
        {"q_uid": "uid-2", "question": "And then?", **{f"option {i}": f"other {i}" for i in range(5)}}])
    dump(own / "subset_answers.json", {"uid-1": 3})
    bench = load_benchmark(own)
    assert detect_format(own) == "egoschema" and [(i.id, i.answer_letter) for i in bench.items] == [("uid-1", "D")]
    assert bench.notes and "1 questions have no public answer" in bench.notes[0]

    lmms = tmp_path / "lmms"
    clip(lmms / "videos/vid-9.mp4")
    dump(lmms / "test.json", [{"question_idx": "q9", "question": "Why?", "video_idx": "vid-9",
                               "option": ["A. one", "B. two", "C. three", "D. four", "E. five"], "answer": "1"}])
    assert detect_format(lmms / "test.json") == "egoschema"
    assert [(i.id, i.answer_letter) for i in load_benchmark(lmms / "test.json").items] == [("q9", "B")]


def test_unknown_layouts_and_formats_are_one_sentence(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VidlmmError, match="no benchmark layout was recognised"):
        load_benchmark(tmp_path / "empty")
    dump(tmp_path / "MVBench/json/not_a_task.json", [])
    (tmp_path / "MVBench/video").mkdir()
    with pytest.raises(VidlmmError, match="not one of the 20 tasks"):
        load_benchmark(tmp_path / "MVBench")


def test_eval_on_an_mvbench_root_lists_what_it_could_not_score(mvbench, tiny_checkpoints):
    """`eval --data <MVBench root>` runs to the end: the missing video is listed with its reason, the rest (the
    TV task's frame folder included) are scored per task."""
    payload = eval_json(mvbench, tiny_checkpoints)
    assert {"accuracy", "n", "per_category", "missing", "unparsable"} <= set(payload)
    assert payload["format"] == "mvbench" and payload["n"] == 4
    assert set(payload["per_category"]) == {"action_sequence", "episodic_reasoning", "object_existence"}
    assert payload["missing"] == [{"id": "object_existence_1", "video": "video_10001.mp4", "why": "not found"}]
    assert np.isfinite(payload["accuracy"])


def test_bounded_sampling_follows_mvbench_and_frame_folders_read_like_videos(mvbench):
    """A window [start, end] takes the middle frame of each of N equal segments of its frames (MVBench's
    `get_index`); a folder of numbered JPEGs reads at its frame rate, frames in numeric order."""
    from vidlmm.video import FrameSampling, read_video, sample_frame_indices

    bounded = FrameSampling(num_frames=4, start=1.0, end=3.0)
    # 10 fps, 50 frames: frames 10..30, segments of 5: middles 12.5 -> 12, 17, 22, 27 (MVBench's int(a + s/2 + round(s*i)))
    assert sample_frame_indices(50, 10.0, bounded).tolist() == [12, 17, 22, 27]
    assert sample_frame_indices(50, 10.0, FrameSampling(num_frames=4, start=4.5, end=99)).tolist() == \
        [45, 46, 47, 48]  # clamped to the clip's last frame (49)
    assert sample_frame_indices(50, 10.0, FrameSampling(num_frames=4)).tolist() == [0, 16, 32, 49]  # unbounded
    # a folder of frames is numbered from 1 (00001.jpg): files 10..30 -> 12, 17, 22, 27 are list indices 11, 16, ...
    assert sample_frame_indices(50, 10.0, FrameSampling(num_frames=4, start=1.0, end=3.0, folder_fps=10.0)).tolist() \
        == [11, 16, 21, 26]
    folder = mvbench / "video/tvqa/frames_fps3_hq/clip_7"
    clip_ = read_video(folder, FrameSampling(num_frames=3, folder_fps=3.0))
    assert (clip_.backend, clip_.total_frames, clip_.fps) == ("frames", 6, 3.0)
    assert clip_.indices.tolist() == [0, 2, 5] and clip_.sampled_frames().shape == (3, 48, 48, 3)
    from vidlmm.errors import VideoReadError

    with pytest.raises(VideoReadError, match="read only with its frame rate"):
        read_video(folder, FrameSampling(num_frames=3))


def test_eval_samples_the_window_unless_told_to_ignore_it(mvbench, tiny_checkpoints):
    """The bounded questions about one video are read per window (two reads) with bounds, and once for the whole
    clip with --ignore-bounds; the TV task's frame folder is read at 3 fps, in its window either way (as the
    reference's script reads it)."""
    from vidlmm.checkpoint import load_model
    from vidlmm.pipeline import VideoLMM
    from vidlmm.evaluate import evaluate
    from vidlmm.video import FrameSampling

    model = load_model(tiny_checkpoints["group"], dtype="fp32", device="cpu")
    lmm = VideoLMM(model, sampling=FrameSampling.uniform(4), cache_bytes=0)
    reads = []
    original = lmm.prepare

    def counting(video, sampling=None):
        reads.append((Path(video).name, sampling.start, sampling.end, sampling.folder_fps))
        return original(video, sampling)

    lmm.prepare = counting
    bench = load_benchmark(mvbench)
    result = evaluate(lmm, bench.items)
    assert sorted(reads) == [("A1.mp4", 0.5, 1.5, None), ("A1.mp4", 1.0, 2.0, None), ("clip_7", 0.0, 2.0, 3.0),
                             ("video_10000.mp4", None, None, None)]
    assert result.n == 4 and not result.missing  # the frame folder is read now
    reads.clear()
    evaluate(lmm, bench.items, bounds=False)
    assert sorted(reads) == [("A1.mp4", None, None, None), ("clip_7", 0.0, 2.0, 3.0),
                             ("video_10000.mp4", None, None, None)]


def test_an_unreadable_video_costs_its_questions_not_the_run(mvbench, tiny_checkpoints):
    from vidlmm.checkpoint import load_model
    from vidlmm.evaluate import evaluate
    from vidlmm.pipeline import VideoLMM
    from vidlmm.video import FrameSampling

    (mvbench / "video/clevrer/video_validation/video_10000.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    bench = load_benchmark(mvbench)
    result = evaluate(VideoLMM(load_model(tiny_checkpoints["group"], dtype="fp32", device="cpu"),
                               sampling=FrameSampling.uniform(4)), bench.items)
    assert result.n == 3 and [m["id"] for m in result.missing] == ["object_existence_0"]
    assert "damaged or incomplete" in result.missing[0]["why"]


def test_likelihood_scoring_picks_the_most_likely_option_and_is_never_unparsable(mvbench, tiny_checkpoints):
    """Each option's score is the log-likelihood of its text as the start of the answer (the reply's end not
    scored), recomputed here from one plain forward pass over prompt + option on the same visual tokens; the
    choice is the best-scored option."""
    import torch

    from vidlmm.checkpoint import load_model
    from vidlmm.conversation import build_prompt, tokenizer_image_token
    from vidlmm.evaluate import evaluate
    from vidlmm.pipeline import VideoLMM
    from vidlmm.video import FrameSampling

    lmm = VideoLMM(load_model(tiny_checkpoints["group"], dtype="fp32", device="cpu"),
                   sampling=FrameSampling.uniform(4))
    bench = load_benchmark(mvbench)
    result = evaluate(lmm, bench.items, scoring="likelihood")
    assert result.unparsable == 0 and result.n == 4
    item, record = bench.items[0], result.items[0]
    prepared, _ = lmm.prepare(item.video, FrameSampling(num_frames=4, start=item.start, end=item.end))
    visual = lmm.visual_tokens(prepared)
    prompt = lmm.prompt_ids(item.question)
    expected = []
    end = lmm.model.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for text in item.options:
        ids = tokenizer_image_token(build_prompt(lmm.template, [(item.question, text)], add_generation_prompt=False),
                                    lmm.model.tokenizer)
        assert ids[-1] == end
        ids = ids[:-1]  # the reply's end is not scored: an option is the answer's start
        embeds, mask, _ = lmm.model.build_inputs([ids], [visual])
        with torch.no_grad():
            logp = torch.log_softmax(lmm.model(embeds, mask).logits[0].float(), -1)
        offset = embeds.shape[1] - len(ids)  # the visual tokens replace the one placeholder id
        expected.append(sum(float(logp[offset + t - 1, ids[t]]) for t in range(len(prompt), len(ids))))
    assert record.scores == pytest.approx(expected, abs=1e-4)
    assert record.parsed == item.letters[int(np.argmax(expected))] and record.response in item.options


def test_records_let_an_interrupted_run_resume(mvbench, tiny_checkpoints, tmp_path):
    """The records after a kill (two questions written, the third torn mid-line) make the rerun read only the
    videos with questions left, and end with the uninterrupted run's records; other settings are refused."""
    from vidlmm.checkpoint import load_model
    from vidlmm.evaluate import evaluate
    from vidlmm.pipeline import VideoLMM
    from vidlmm.video import FrameSampling

    lmm = VideoLMM(load_model(tiny_checkpoints["group"], dtype="fp32", device="cpu"),
                   sampling=FrameSampling.uniform(4), cache_bytes=0)
    items = load_benchmark(mvbench).items
    straight = evaluate(lmm, items, records=tmp_path / "all.jsonl")
    lines = (tmp_path / "all.jsonl").read_text().splitlines()
    settings = json.loads(lines[0])["settings"]
    assert settings == {"model": str(tiny_checkpoints["group"]), "weights": weights_fingerprint(lmm.model),
                        "sampling": "uniform 4", "style": "mvbench", "scoring": "generate", "bounds": True,
                        "max_new_tokens": 16, "likelihood_of": None}
    assert [json.loads(line)["record"]["id"] for line in lines[1:]] == [r.id for r in straight.items]
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])  # two records kept, the third torn
    reads = []
    original = lmm.prepare
    lmm.prepare = lambda video, sampling=None: reads.append(Path(video).name) or original(video, sampling)
    resumed = evaluate(lmm, items, records=cut)
    assert [(r.id, r.response) for r in resumed.items] == [(r.id, r.response) for r in straight.items]
    assert sorted(reads) == ["clip_7", "video_10000.mp4"]  # the two A1.mp4 windows were scored before the kill
    def parsed(line):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            return {}

    assert sum("record" in parsed(line) for line in cut.read_text().splitlines()) == 4
    with pytest.raises(VidlmmError, match="other settings .*scoring"):
        evaluate(lmm, items, records=cut, scoring="likelihood")
    # likelihood records from before the reply's end was left unscored have no likelihood_of: not mixed in
    before = {key: value for key, value in settings.items() if key != "likelihood_of"}
    old = tmp_path / "old_likelihood.jsonl"
    old.write_text(json.dumps({"settings": {**before, "scoring": "likelihood", "max_new_tokens": None}}) + "\n")
    with pytest.raises(VidlmmError, match="other settings .*likelihood_of"):
        evaluate(lmm, items, records=old, scoring="likelihood")


def test_records_of_a_folder_are_not_kept_for_the_model_rebuilt_there(mvbench, tmp_path):
    """Records name a model by its folder; a rebuild writes new weights into the same folder (as
    `train.build_embedded` does to assets/models): the rerun is refused instead of keeping the old model's answers;
    with restart_records (the rebuild's own scores) the file is started again and holds only the new model's."""
    from vidlmm.checkpoint import load_model
    from vidlmm.evaluate import evaluate
    from vidlmm.pipeline import VideoLMM
    from vidlmm.tiny import write_tiny_checkpoint
    from vidlmm.video import FrameSampling

    def lmm(seed: int):
        write_tiny_checkpoint(tmp_path / "model", "groupresampler", seed=seed, num_queries=16, group=4)
        return VideoLMM(load_model(tmp_path / "model", dtype="fp32", device="cpu"),
                        sampling=FrameSampling.uniform(4), cache_bytes=0)

    items = load_benchmark(mvbench).items[:1]
    first = lmm(seed=0)
    evaluate(first, items, records=tmp_path / "records.jsonl")
    assert weights_fingerprint(first.model) == weights_fingerprint(lmm(seed=0).model)  # the same weights again
    with pytest.raises(VidlmmError, match="other settings .weights."):
        evaluate(lmm(seed=1), items, records=tmp_path / "records.jsonl")
    second = lmm(seed=1)
    again = evaluate(second, items, records=tmp_path / "records.jsonl", restart_records=True)
    lines = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert [line["settings"]["weights"] for line in lines if "settings" in line] == [weights_fingerprint(second.model)]
    assert [line["record"]["response"] for line in lines if "record" in line] == [r.response for r in again.items]
    assert evaluate(second, items, records=tmp_path / "records.jsonl").items == again.items  # kept, not refused
    # the same weights copied to another folder keep their records: nothing is read or scored again
    shutil.copytree(tmp_path / "model", tmp_path / "copied")
    copied = VideoLMM(load_model(tmp_path / "copied", dtype="fp32", device="cpu"),
                      sampling=FrameSampling.uniform(4), cache_bytes=0)
    copied.prepare = lambda *args, **kwargs: pytest.fail("a kept question was scored again")
    assert evaluate(copied, items, records=tmp_path / "records.jsonl").items == again.items


def test_two_processes_give_the_one_process_result(mvbench, tiny_checkpoints, tmp_path):
    """`accelerate launch` with two CPU processes splits the videos and the first process prints the merged
    result, the one process's item for item."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    args = ["-m", "vidlmm", "eval", "--model", str(tiny_checkpoints["group"]), "--data", str(mvbench),
            "--num-frames", "4", "--max-new-tokens", "3", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *args], cwd=root, capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    port = free_port()
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          "train/configs/cpu_2proc.yaml", "--main_process_port", str(port), *args], cwd=root,
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout)  # exactly one JSON object: rank 1 prints nothing
    for payload in (a, b):
        payload.pop("seconds")
    assert a == b and a["n"] == 4 and len(a["missing"]) == 1


LEAVE_SCRIPT = """
import atexit, importlib, os

def gloo_threads():  # registered first, so it runs last: after the process group is left
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    count = sum(n.startswith("pt_gloo") for n in names)
    os.write(2, f"rank {os.environ['RANK']}: {count} gloo threads\\n".encode())  # one write: no interleaving

atexit.register(gloo_threads)
from vidlmm.eval_cli import run_sharded
# what a model load does once the group exists: import torch.distributed.nn (its defaults would hold the group)
run_sharded(lambda shard: importlib.import_module("torch.distributed.nn.functional") and shard)
"""


def test_two_processes_leave_the_group_before_the_interpreter_shuts_down(tmp_path):
    """Under `accelerate launch`, every process has joined gloo's worker threads by the time the interpreter shuts
    down: a worker left running can release a collective's tensors during shutdown and abort the process."""
    import os
    import re
    import subprocess
    import sys

    script = tmp_path / "leave.py"
    script.write_text(LEAVE_SCRIPT)
    root = Path(__file__).resolve().parent.parent
    port = free_port()
    run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          "train/configs/cpu_2proc.yaml", "--main_process_port", str(port), str(script)], cwd=root,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(re.findall(r"rank (\d): (\d+) gloo threads", run.stderr)) == [("0", "0"), ("1", "0")], \
        run.stderr[-3000:]


def test_zeroing_curves_on_a_benchmark_resume_and_split_over_two_processes(mvbench, tiny_checkpoints, tmp_path):
    """`python -m visualizations redundancy --mc ROOT`: the curve of two processes under `accelerate launch` is the
    one process's; a rerun with --records reads the kept questions back to the same curve; the video the benchmark
    lacks is listed with the one the reader could not find."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out: Path, *extra: str, launch: list[str] = ()):
        args = ["-m", "visualizations", "redundancy", "--model", str(tiny_checkpoints["group"]), "--mc",
                str(mvbench), "--num-frames", "4", "--max-new-tokens", "3", "--fractions", "1", "0.5",
                "--strategies", "random", "--seeds", "0", "1", "--out", str(out), *extra]
        done = subprocess.run([sys.executable, *launch, *args], cwd=root, capture_output=True, text=True,
                              timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads((out / "zeroing.json").read_text())["results"][0]

    one = run(tmp_path / "one", "--records", str(tmp_path / "records"))
    assert one["reference"]["n"] == 4 and [m["id"] for m in one["reference"]["missing"]] == [
        "object_existence_1"] and (tmp_path / "records" / "group.jsonl").is_file()
    again = run(tmp_path / "again", "--records", str(tmp_path / "records"))
    port = free_port()
    two = run(tmp_path / "two", launch=["-m", "accelerate.commands.launch", "--config_file",
                                        "train/configs/cpu_2proc.yaml", "--main_process_port", str(port)])
    assert again == one and two == one


@pytest.mark.parametrize("reply, answer, right", [
    ("It is a square.", "a square", True),      # the answer inside the reply
    ("Square", "a white square", True),         # the reply inside the answer
    ("a circle", "a square", False),
    ("", "a square", False),
])
def test_open_ended_answers_are_judged_by_containment(reply, answer, right):
    from vidlmm.evaluate import open_answer_correct

    assert open_answer_correct(reply, answer) is right


def test_eval_on_mmvu_reports_open_ended_questions_apart(tmp_path, tiny_checkpoints):
    from vidlmm.evaluate import open_answer_correct

    clip(tmp_path / "videos/Art/0.mp4")
    url = "https://huggingface.co/datasets/yale-nlp/MMVU/resolve/main/videos/Art/"
    dump(tmp_path / "validation.json", [
        {"id": "mc-1", "video": url + "0.mp4", "question": "Which colour?", "question_type": "multiple-choice",
         "choices": {"A": "red", "B": "white"}, "answer": "B"},
        {"id": "open-1", "video": url + "0.mp4", "question": "What is drawn?", "question_type": "open-ended",
         "choices": {}, "answer": "a square"},
        {"id": "open-2", "video": url + "9.mp4", "question": "What is drawn?", "question_type": "open-ended",
         "choices": {}, "answer": "a square"}])
    payload = eval_json(tmp_path, tiny_checkpoints)
    assert payload["n"] == 1 and payload["format"] == "mmvu"
    open_ = payload["open_ended"]
    assert open_["n"] == 1 and [m["id"] for m in payload["missing"]] == ["open-2"]
    (row,) = open_["items"]
    assert row["correct"] == open_answer_correct(row["response"], "a square") and open_["correct"] == row["correct"]


def test_a_damaged_data_file_is_one_sentence(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(VidlmmError, match="not valid JSON"):
        load_benchmark(tmp_path / "broken.json")
    with pytest.raises(VidlmmError, match="no such file"):
        load_benchmark(tmp_path / "absent.json")
