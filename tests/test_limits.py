"""The app's request limits (app/limits.py) word for word: each refusal is one sentence that names the limit, the
value asked for and the input it is about. No server and no model: the parsers alone, in milliseconds.
(tests/test_app.py sends the same limits through gradio_client against a running app.)"""

from __future__ import annotations

import pytest

from app.config import AppConfig
from app.limits import Limits, RefusedInput, UserError

LIMITS = Limits(AppConfig(max_question_chars=20, max_history_turns=2, max_history_chars=30, max_frames=8,
                          max_new_tokens=64, max_fractions=3, max_seeds=2, max_heldout_items=10, max_dpi=200))


def refused(call) -> tuple[str, str | None]:
    with pytest.raises(UserError) as info:
        call()
    return str(info.value), info.value.field


@pytest.mark.parametrize("call, sentence, field", [
    (lambda: LIMITS.question("   "), "Type a question first.", "question"),
    (lambda: LIMITS.question(42), "The question must be text.", "question"),
    (lambda: LIMITS.question("x" * 21), "The question is 21 characters long, over the limit of 20.", "question"),
    (lambda: LIMITS.question("z" * 1234),
     "The question is 1,234 characters long, over the limit of 20.", "question"),
    (lambda: LIMITS.history([["q", "a"]] * 3),
     "The history has 3 turns, over the limit of 2; start a new conversation.", "history"),
    (lambda: LIMITS.history([["q" * 20, "a" * 11]]),
     "The history is 31 characters long, over the limit of 30; start a new conversation.", "history"),
    (lambda: LIMITS.history([["only a question"]]), "history must be a list of [question, answer] pairs.",
     "history"),
    (lambda: LIMITS.sampling("uniform", num_frames=9), "Frames must be between 1 and 8 (got 9).", "num_frames"),
    (lambda: LIMITS.sampling("uniform", num_frames=5, most=4), "Frames must be between 1 and 4 (got 5).",
     "num_frames"),
    (lambda: LIMITS.sampling("fps", max_frames=0), "Max frames must be between 1 and 8 (got 0).", "max_frames"),
    (lambda: LIMITS.sampling("fps", max_frames=4, rate=31), "Frames per second must be between 0.01 and 30 (got 31).", "fps"),
    (lambda: LIMITS.sampling("sideways"), "Unknown frame sampling 'sideways' (use uniform or fps).", "mode"),
    (lambda: LIMITS.generation(max_new_tokens=65), "Max new tokens must be between 1 and 64 (got 65).",
     "max_new_tokens"),
    (lambda: LIMITS.generation(max_new_tokens="lots"), "Max new tokens must be a number, not 'lots'.",
     "max_new_tokens"),
    (lambda: LIMITS.generation(max_new_tokens=2.5), "Max new tokens must be a whole number, not 2.5.",
     "max_new_tokens"),
    (lambda: LIMITS.generation(8, temperature=float("nan")), "Temperature must be a finite number.", "temperature"),
    (lambda: LIMITS.generation(8, do_sample=True, temperature=0),
     "Sampling needs a temperature in (0, 10] and a top-p in (0, 1].", "temperature"),
    (lambda: LIMITS.generation(8, seed=-7), "The seed must be between 0 and 4.29497e+09 (got -7).", "seed"),
    (lambda: LIMITS.budget(active_fraction=0), "The active fraction must be above 0 and at most 1.",
     "active_fraction"),
    (lambda: LIMITS.budget(queries=-1), "Queries must be between 0 and 1e+06 (got -1).", "queries"),
    (lambda: LIMITS.budget(strategy="bogus"),
     "Unknown zeroing strategy 'bogus' (use random, contiguous, groups, even).", "strategy"),
    (lambda: LIMITS.fractions("1, 0.5, 0.25, 0.1"), "4 active fractions asked, over the limit of 3.", "fractions"),
    (lambda: LIMITS.fractions("1, 2"), "Fraction 2 is not in (0, 1].", "fractions"),
    (lambda: LIMITS.fractions("half"), "'half' is not a fraction (write e.g. 1, 0.5, 0.25 or 50%).", "fractions"),
    (lambda: LIMITS.fractions(" , "), "Give at least one active fraction.", "fractions"),
    (lambda: LIMITS.seeds(3), "Seeds must be between 1 and 2 (got 3).", "seeds"),
    (lambda: LIMITS.models(["a", "b", "c", "d"], 3, "to compare"),
     "Pick one to 3 different models to compare (got 4).", "models"),
    (lambda: LIMITS.models([], 4, "to overlay"), "Pick one to 4 different models to overlay (got 0).", "models"),
    (lambda: LIMITS.heldout_items(11), "Held-out questions must be between 1 and 10 (got 11).", "max_items"),
    (lambda: LIMITS.picture_frames(17), "Frames shown must be between 1 and 16 (got 17).", "frames"),
    (lambda: LIMITS.figure("bmp"), "Unknown figure format 'bmp' (use png, svg, pdf).", "fmt"),
    (lambda: LIMITS.figure("svg", dpi=201), "DPI must be between 50 and 200 (got 201).", "dpi"),
    (lambda: LIMITS.layer(10**7), "The layer must be between -1e+06 and 1e+06 (got 1e+07).", "layer"),
])
def test_each_refusal_is_its_exact_sentence(call, sentence, field):
    assert refused(call) == (sentence, field)


def test_the_limits_come_from_the_config():
    # the same request passes or is refused by the config's number alone
    assert LIMITS.question("x" * 20) == "x" * 20
    roomy = Limits(AppConfig(max_question_chars=2000))
    assert roomy.question("x" * 21) == "x" * 21
    assert refused(lambda: roomy.question("x" * 2001))[0] == \
        "The question is 2,001 characters long, over the limit of 2,000."
    assert LIMITS.sampling("uniform", num_frames=8).num_frames == 8
    assert LIMITS.fractions("1, 50%, 0.5") == [1.0, 0.5]  # three within the limit of 3; equal values merged
    assert LIMITS.generation(8, seed=None).seed is None and LIMITS.generation(8, seed="7").seed == 7


def test_a_refused_upload_is_refused_with_gradios_sentence():
    from app.service import Service

    service = Service.__new__(Service)  # check_video reads only the config before the file
    service.config = AppConfig()
    with pytest.raises(UserError) as info:
        service.check_video(RefusedInput("File too large."))
    assert (str(info.value), info.value.field) == ("File too large.", "video")
    with pytest.raises(UserError) as info:
        service.check_video(None)
    assert str(info.value) == "Upload a video (or pick an example) first."
