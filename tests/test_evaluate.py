"""Multiple-choice evaluation: the deterministic answer parser, item loading, and evaluate() end to end.

The end-to-end run uses a tiny random-weight checkpoint, so its answers are garbage: only the structure of the
result is checked (counts, chance level, unparsable replies, one encode per video, JSON and markdown).
"""

from __future__ import annotations

import argparse
import json

import pytest

from tests.videos import make_moving_square_frames, write_video
from vidlmm.errors import VidlmmError
from vidlmm.eval_cli import add_eval_arguments, run_eval_cli
from vidlmm.evaluate import (MCItem, build_mc_question, evaluate, load_mc_items, parse_choice, summarize,
                             ItemRecord)

OPTS = ["a red car", "a blue square", "two dogs", "nothing moves"]
ABCD = list("ABCD")


# ---- parser -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, expected", [
    ("A", "A"),
    ("  D.  ", "D"),
    ("C) two dogs", "C"),
    ("B. a blue square", "B"),
    ("(B) because the square is blue", "B"),
    ("The answer is C.", "C"),
    ("I think the answer is (D), not (A) as one may think", "A"),  # several "(X)": the last one wins
    ("Answer: B", "B"),
    ("b", "B"),          # a whole reply of one letter is read in any case (documented choice)
    ("(c)", "C"),
    ("'A'", "A"),
    ("Because it moves", None),   # the reference would read "B" from "Because"; we do not
    ("a dog runs", None),         # lower-case "a" inside a sentence is a word, not a letter
    ("In the video there is a blue square moving from left to right", "B"),   # option text, long reply
    ("a blue square", "B"),       # option text, short reply (the reference needs > 5 words)
    ("It looks like two dogs, or maybe a red car at the end", "A"),  # several texts: the last one wins
    ("Two Dogs.", "C"),           # case-insensitive, trailing period ignored
    ("", None),
    ("   ", None),
    (".,!?", None),
    ("purple elephants everywhere", None),
    ("An owl flies", None),       # a capital letter starting a word is not a letter answer
])
def test_parse_choice(reply, expected):
    assert parse_choice(reply, OPTS, ABCD) == expected


def test_parse_choice_is_deterministic_and_respects_letters():
    for reply in ["zzz", "", "no idea at all really, sorry about that", "E"]:
        first = parse_choice(reply, OPTS, ABCD)
        assert first is None
        assert all(parse_choice(reply, OPTS, ABCD) is None for _ in range(20))
    assert parse_choice("E", OPTS + ["five"], list("ABCDE")) == "E"  # valid only when there is an option E
    assert parse_choice("B", ["x", "y"]) == "B"  # letters default to A, B, ...
    assert parse_choice(None, OPTS, ABCD) is None
    # "(X)" beats " X " beats option texts, like the reference's order
    assert parse_choice("not (C) but D two dogs", OPTS, ABCD) == "C"
    assert parse_choice("maybe D or a blue square", OPTS, ABCD) == "D"


# Real datasets (MVBench, Video-MME) write options as sentences with a final period; a reply quotes the sentence
# inside its own ("... the man closes the door and leaves"), where the option's period is not.
SENTENCES = ["The man opens the door.", "The man closes the door.", "A dog barks at the door.", "Nothing happens."]


@pytest.mark.parametrize("reply, expected", [
    ("I think the man closes the door and then he leaves", "B"),
    ("the man opens the door", "A"),              # a short reply that is an option's text, without its period
    ("Nothing happens", "D"),
    ("NOTHING   HAPPENS at all", "D"),               # case and spacing are ignored too
    ("first the man opens the door, then a dog barks at the door", "C"),  # several texts: the last one wins
    ("The man opens the door.", "A"),             # the reply's own period is stripped before comparing
    ("the man walks to the door", None),
])
def test_option_texts_are_compared_without_their_trailing_period(reply, expected):
    assert parse_choice(reply, SENTENCES, ABCD) == expected


def test_answers_given_as_option_text_ignore_the_trailing_period(tmp_path):
    (tmp_path / "v.mp4").write_bytes(b"x")
    options = [f"{letter}. {text}" for letter, text in zip("ABCD", SENTENCES)]
    answers = ["The man closes the door", "nothing happens.", "C. a dog barks at the door", "(A)", 3]
    data = [{"video": "v.mp4", "question": "What happens?", "options": options, "answer": a} for a in answers]
    assert [i.answer_letter for i in load_mc_items(_write(tmp_path, data))] == ["B", "D", "C", "A", "D"]
    # the answer must equal an option's text (not merely start it): one match, not two
    bare = [{"video": "v.mp4", "question": "Q", "options": ["Red.", "Red and blue."], "answer": "red"}]
    assert load_mc_items(_write(tmp_path, bare, "bare.json"))[0].answer_letter == "A"


def test_build_mc_question_styles():
    item = MCItem("0", "v.mp4", "What moves?", ["a car", "a square"], ["A", "B"], "B")
    suffix = "Answer with the option's letter from the given choices directly."
    assert build_mc_question(item) == f"What moves?\n(A) a car\n(B) a square\n{suffix}"
    assert build_mc_question(item, "videomme") == f"What moves?\nA. a car\nB. a square\n{suffix}"
    with pytest.raises(VidlmmError):
        build_mc_question(item, "nope")


# ---- loading ------------------------------------------------------------------------------------------------

def _write(tmp_path, data, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_load_items_formats(tmp_path):
    (tmp_path / "vids").mkdir()
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / "vids" / name).write_bytes(b"x")
    data = [
        {"video": "vids/a.mp4", "question": "Q1", "options": ["A. red", "B. blue", "C. green"], "answer": "B",
         "category": "color", "id": "q1"},
        {"video": "vids/a.mp4", "question": "Q2", "options": ["(A) left", "(B) right"], "answer": "(A)"},
        {"video": "vids/b.mp4", "question": "Q3", "candidates": ["left", "right", "up", "down"], "answer": "up",
         "task_type": "motion"},
        {"video": "vids/b.mp4", "question": "Q4", "options": {"B": "two", "A": "one"}, "answer": "two"},
        {"video": "vids/b.mp4", "question": "Q5", "options": ["A. one.", "B. two."], "answer": "B. two."},
        {"video": "vids/b.mp4", "question": "Q6", "options": ["A cat", "B dog"], "answer": "B dog"},  # no prefix
    ]
    items = load_mc_items(_write(tmp_path, data))
    assert [i.answer_letter for i in items] == ["B", "A", "C", "B", "B", "B"]
    assert items[0].options == ["red", "blue", "green"] and items[0].letters == list("ABC")
    assert items[0].id == "q1" and items[0].category == "color" and items[1].id == "1"
    assert items[1].options == ["left", "right"] and items[1].category == "all"
    assert items[2].options == ["left", "right", "up", "down"] and items[2].category == "motion"
    assert items[3].options == ["one", "two"] and items[3].letters == ["A", "B"]
    assert items[5].options == ["A cat", "B dog"]
    assert items[0].video == str(tmp_path / "vids" / "a.mp4")
    # video_root instead of the JSON's folder
    data_root = [dict(data[0], video="a.mp4")]
    items = load_mc_items(_write(tmp_path, data_root, "r.json"), video_root=tmp_path / "vids")
    assert items[0].video == str(tmp_path / "vids" / "a.mp4")


@pytest.mark.parametrize("bad, fragment", [
    ({"question": "Q", "options": ["x", "y"], "answer": "A"}, "video"),
    ({"video": "v.mp4", "options": ["x", "y"], "answer": "A"}, "question"),
    ({"video": "v.mp4", "question": "Q", "options": "x, y", "answer": "A"}, "options"),
    ({"video": "v.mp4", "question": "Q", "options": ["x"], "answer": "A"}, "2 to 26"),
    ({"video": "v.mp4", "question": "Q", "options": ["x", "y"]}, "answer"),
    ({"video": "v.mp4", "question": "Q", "options": ["x", "y"], "answer": "C"}, "answer"),
    ({"video": "v.mp4", "question": "Q", "options": ["x", "y"], "answer": "z"}, "answer"),
    ({"video": "v.mp4", "question": "Q", "options": {"AA": "x", "B": "y"}, "answer": "B"}, "letter"),
    ({"video": "missing.mp4", "question": "Q", "options": ["x", "y"], "answer": "A"}, "not found"),
    ("just a string", "object"),
])
def test_load_items_malformed(tmp_path, bad, fragment):
    (tmp_path / "v.mp4").write_bytes(b"x")
    good = {"video": "v.mp4", "question": "Q", "options": ["x", "y"], "answer": "A"}
    with pytest.raises(VidlmmError) as err:
        load_mc_items(_write(tmp_path, [good, bad]))
    message = str(err.value)
    assert "\n" not in message and "Item 1" in message and fragment in message


def test_load_items_file_errors(tmp_path):
    with pytest.raises(VidlmmError, match="no such file"):
        load_mc_items(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(VidlmmError, match="not valid JSON"):
        load_mc_items(tmp_path / "bad.json")
    (tmp_path / "obj.json").write_text('{"a": 1}')
    with pytest.raises(VidlmmError, match="list"):
        load_mc_items(tmp_path / "obj.json")
    # without the video check, paths need not exist
    path = _write(tmp_path, [{"video": "/nowhere/v.mp4", "question": "Q", "options": ["x", "y"], "answer": 1}])
    assert load_mc_items(path, check_videos=False)[0].answer_letter == "B"


def test_summarize_counts():
    rec = lambda cat, parsed, ok, k: ItemRecord("i", "v", cat, "q", "A", "r", parsed, ok, k)  # noqa: E731
    result = summarize([rec("x", "A", True, 4), rec("x", None, False, 4), rec("y", "B", False, 2)])
    assert result.n == 3 and result.correct == 1 and result.unparsable == 1
    assert result.accuracy == pytest.approx(1 / 3)
    assert result.chance == pytest.approx((0.25 + 0.25 + 0.5) / 3)
    # both questions are about one video: resampling videos cannot move the accuracy, so the interval is a point
    assert result.per_category["x"] == {"n": 2, "correct": 1, "accuracy": 0.5, "interval": [0.5, 0.5],
                                        "chance": 0.25, "unparsable": 1}
    assert result.macro_accuracy == pytest.approx(0.25)


# ---- end to end ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eval_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalset")
    write_video(root / "one.mp4", make_moving_square_frames(12, 56, 64, seed=0), fps=6)
    write_video(root / "two.mp4", make_moving_square_frames(10, 48, 64, seed=1), fps=5)
    options = ["A. a white square", "B. a red circle", "C. nothing", "D. two cars"]
    data = [
        {"video": "one.mp4", "question": "What moves?", "options": options, "answer": "A", "category": "object"},
        {"video": "two.mp4", "question": "Which way does it move?", "options": ["left", "right", "up", "down"],
         "answer": "right", "category": "direction"},
        {"video": "one.mp4", "question": "Which way does it move?", "options": ["left", "right", "up", "down"],
         "answer": "B", "category": "direction"},
        {"video": "two.mp4", "question": "What moves?", "options": options, "answer": "A", "category": "object"},
    ]
    path = root / "data.json"
    path.write_text(json.dumps(data))
    return path


def test_evaluate_end_to_end(tiny_checkpoints, eval_set, monkeypatch):
    from vidlmm.checkpoint import load_model
    from vidlmm.pipeline import GenerationSettings, VideoLMM
    from vidlmm.video import FrameSampling

    model = load_model(tiny_checkpoints["group"], dtype="fp32", device="cpu")
    calls = []
    original = model.encode_frames

    def counting(pixels):
        calls.append(tuple(pixels.shape))
        return original(pixels)

    monkeypatch.setattr(model, "encode_frames", counting)
    items = load_mc_items(eval_set)
    # cache disabled: the one-encode-per-video guarantee must not depend on the feature cache
    lmm = VideoLMM(model, sampling=FrameSampling.uniform(4), cache_bytes=0)
    result = evaluate(lmm, items, generation=GenerationSettings(max_new_tokens=6))
    assert len(calls) == 2  # two distinct videos, four questions
    assert result.n == 4 and len(result.items) == 4
    assert [r.id for r in result.items] == ["0", "1", "2", "3"]  # the items' order, not the video grouping
    assert result.chance == pytest.approx(0.25)
    assert set(result.per_category) == {"object", "direction"}
    assert all(c["n"] == 2 and c["chance"] == pytest.approx(0.25) for c in result.per_category.values())
    assert result.unparsable == sum(r.parsed is None for r in result.items)
    assert result.correct == sum(r.correct for r in result.items)
    for record, item in zip(result.items, items):
        assert record.parsed in (None, *item.letters)
        assert record.correct == (record.parsed == item.answer_letter)
        assert record.parsed == parse_choice(record.response, item.options, item.letters)
    # deterministic: a second run (greedy, no random fallback) gives the same records
    again = evaluate(lmm, items, generation=GenerationSettings(max_new_tokens=6))
    assert [(r.response, r.parsed) for r in again.items] == [(r.response, r.parsed) for r in result.items]

    payload = json.loads(json.dumps(result.to_json()))
    assert {"accuracy", "per_category", "chance", "unparsable", "n", "items", "seconds"} <= set(payload)
    assert payload["n"] == 4 and len(payload["items"]) == 4
    assert {"response", "parsed", "correct", "category", "answer"} <= set(payload["items"][0])
    table = result.to_markdown()
    assert table.startswith("| category | n | accuracy [95 % interval] | chance |")
    assert "| object | 2 |" in table and "| direction | 2 |" in table and "| 25.0 |" in table
    assert "unparsable" in table

    # the CLI entry point on the same model: arguments, limit, JSON and markdown output
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args(["--data", str(eval_set), "--num-frames", "4", "--max-new-tokens", "4",
                              "--limit", "3", "--json"])
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        assert run_eval_cli(args, model) == 0
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["n"] == 3
    args.json = False
    out = io.StringIO()
    with redirect_stdout(out):
        assert run_eval_cli(args, model) == 0
    assert "| **overall** | 3 |" in out.getvalue()
    # no sampling arguments: the model's own sampling; --progress: one line per question on stderr
    from vidlmm.pipeline import default_sampling

    args = parser.parse_args(["--data", str(eval_set), "--max-new-tokens", "2", "--limit", "2", "--json",
                              "--progress"])
    out, err = io.StringIO(), io.StringIO()
    from contextlib import redirect_stderr

    with redirect_stdout(out), redirect_stderr(err):
        assert run_eval_cli(args, model) == 0
    assert json.loads(out.getvalue())["sampling"] == default_sampling(model).describe()
    assert [line.split(" ")[0] for line in err.getvalue().splitlines() if line.startswith("[")] == ["[1/2]", "[2/2]"]


def test_cli_arguments_and_errors(tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--json", action="store_true")
    add_eval_arguments(parser)  # must not clash with options the CLI already defines
    args = parser.parse_args(["--data", "x.json", "--fps", "--max-frames", "8", "--style", "videomme"])
    assert args.fps and args.max_frames == 8 and args.style == "videomme" and args.limit is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--data", "x.json", "--fps", "--num-frames", "4"])
    with pytest.raises(VidlmmError, match="no such file"):
        run_eval_cli(parser.parse_args(["--data", str(tmp_path / "none.json")]), model=None)


def test_evaluate_scripted_replies(tmp_path):
    """With scripted replies: accuracy, unparsable counting and one prepare() per video, exactly."""
    from types import SimpleNamespace

    replies = {"Q0": "A", "Q1": "I really cannot tell", "Q2": "The answer is (C).", "Q3": ""}
    prepared_for = []

    class FakeLMM:
        def prepare(self, video, sampling=None):
            prepared_for.append(video)
            return SimpleNamespace(video=video), False

        def ask(self, prepared, question, generation=None):
            assert question.endswith("directly.") and "\n(A) " in question
            return SimpleNamespace(text=replies[question.split("\n")[0]])

    items = [MCItem(f"i{k}", f"v{k % 2}.mp4", f"Q{k}", OPTS, ABCD, "A" if k < 2 else "D", "c" if k else "d")
             for k in range(4)]
    result = evaluate(FakeLMM(), items)
    assert prepared_for == ["v0.mp4", "v1.mp4"]
    assert [r.parsed for r in result.items] == ["A", None, "C", None]
    assert result.correct == 1 and result.unparsable == 2 and result.accuracy == 0.25
    assert result.per_category["c"]["unparsable"] == 2 and result.per_category["d"]["accuracy"] == 1.0
    assert [r.question for r in result.items] == ["Q0", "Q1", "Q2", "Q3"]  # records keep what was asked
    rows = result.to_markdown().split("\n\n")[0].splitlines()[2:]  # categories in order of first appearance
    assert rows[:2] == ["| d | 1 | 100.0 [100.0, 100.0] | 25.0 |", "| c | 3 | 0.0 [0.0, 0.0] | 25.0 |"]
    assert rows[2].startswith("| **overall** | 4 | 25.0 [") and rows[2].endswith("] | 25.0 |")
