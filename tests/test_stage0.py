"""Stage 0 on a small world in smoke mode: the LLM folder is a causal LM with its tokenizer, the tower folder composes
with it through build_from_parts into a model that answers about a world video, training lowers the losses, and the
same seed gives the same weights."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from train import stage0 as S
from train.world import WorldConfig, generate_world, load_clips, render_clip, timeline
from vidlmm.conversation import IMAGE_TOKEN_INDEX, build_prompt, tokenizer_image_token
from vidlmm.evaluate import SUFFIX
from vidlmm.preprocess import ImageProcessor
from vidlmm.tokenizer import EOS_TOKEN, load_tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("s0world")
    generate_world(root, WorldConfig(num_train=24, num_eval=8))
    return root


@pytest.fixture(scope="module")
def stage0(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("s0")
    stats = S.run_stage0(world, out, budget="smoke", seed=0, progress=False)
    return out, stats


def test_llm_folder_is_a_causal_lm_with_its_tokenizer(stage0):
    from transformers import AutoModelForCausalLM

    out, stats = stage0
    lm = AutoModelForCausalLM.from_pretrained(out / "llm")
    tok = load_tokenizer(out / "llm")
    eos = tok.convert_tokens_to_ids(EOS_TOKEN)
    assert lm.config.model_type == "qwen2" and lm.config.tie_word_embeddings
    # the symbolic video's ids follow the tokenizer's (both budgets train the LM with it)
    assert S.BUDGETS["smoke"]["llm"]["symbolic_per_clip"] and S.BUDGETS["full"]["llm"]["symbolic_per_clip"]
    assert lm.config.vocab_size == len(tok) + S.symbol_count() and len(tok) == stats["llm"]["vocab"]
    assert lm.config.eos_token_id == lm.config.pad_token_id == tok.eos_token_id == tok.pad_token_id == eos
    assert lm.config.max_position_embeddings == 1024
    # width-sized init, not Qwen2's 0.02 (`python -m train.diagnose recall`); stage 1's connector inherits it
    assert lm.config.initializer_range == S.BUDGETS["smoke"]["llm"]["init_std"] == 0.1
    assert (out / "stage0.json").is_file() and json.loads((out / "stage0.json").read_text())["budget"] == "smoke"


def test_losses_go_down(stage0):
    _, stats = stage0
    lm, vi = stats["llm"], stats["vision"]
    assert lm["final_loss"] < lm["first_loss"] - 0.5
    assert lm["val_loss"] < lm["val_loss_init"]
    assert vi["final_loss"] < vi["first_loss"]
    assert 0.0 <= vi["retrieval"]["image_to_text_top1"] <= 1.0


def test_composes_into_a_model_that_answers(stage0, world):
    from vidlmm.checkpoint import build_from_parts
    from vidlmm.pipeline import GenerationSettings, VideoLMM

    out, _ = stage0
    model = build_from_parts(str(out / "llm"), str(out / "vision"), connector_type="groupresampler",
                             num_queries=16, group=4).eval()
    assert model.config.vision_config["image_size"] == S.BUDGETS["smoke"]["vision"]["image_size"]
    video = sorted((world / "videos").glob("train_*"))[0]
    answer = VideoLMM(model).ask(str(video), "What colour is the circle?",
                                 generation=GenerationSettings(max_new_tokens=4))
    assert 1 <= len(answer.token_ids) <= 4
    assert answer.text == model.tokenizer.decode(answer.token_ids, skip_special_tokens=True).strip()
    assert answer.num_visual_tokens == 16
    # the whole SiglipModel (vision + text tower) is a valid tower folder too
    build_from_parts(str(out / "llm"), str(out / "siglip"), connector_type="groupresampler", num_queries=16, group=4)


def test_same_seed_same_weights(stage0, world, tmp_path):
    out, stats = stage0
    again = S.run_stage0(world, tmp_path, budget="smoke", seed=0, progress=False)
    # the second run trained (its losses fell well beyond batch noise, the LLM's on held-out text too; smoke:
    # LLM 5.9 -> 3.3, tower 14.7 -> 6.1), with the first run's losses
    for part in ("llm", "vision"):
        assert again[part]["final_loss"] < 0.8 * again[part]["first_loss"], part
        assert (again[part]["first_loss"], again[part]["final_loss"]) == \
            (stats[part]["first_loss"], stats[part]["final_loss"]), part
    assert again["llm"]["val_loss"] < again["llm"]["val_loss_init"]
    for part in ("llm", "vision"):
        a, b = load_file(out / part / "model.safetensors"), load_file(tmp_path / part / "model.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), part
    for name in ("vocab.json", "merges.txt"):
        assert (out / "llm" / name).read_bytes() == (tmp_path / "llm" / name).read_bytes()


def test_text_is_rendered_like_stage_two_without_the_video(stage0, world):
    out, _ = stage0
    tok = load_tokenizer(out / "llm")
    pairs = [("<image>\nWhat colour is the circle?", "Red."), ("How many objects are there?", "Two.")]
    with_video = tokenizer_image_token(build_prompt("qwen2_base", pairs, add_generation_prompt=False), tok)
    ids = S.conversation_ids(pairs, tok)
    assert IMAGE_TOKEN_INDEX in with_video and ids == [i for i in with_video if i != IMAGE_TOKEN_INDEX]
    assert ids[-1] == tok.eos_token_id and "<image>" not in tok.decode(ids)
    # MC prompts come from training clips only, answered with the correct option's text

    clips = load_clips(world)
    convs = S.mc_conversations(clips["train"][:4], seed=0)
    assert convs and all(c[0][0].endswith(SUFFIX) for c in convs)
    for (question, answer), in convs:
        assert answer[0] not in "(" and f". {answer}\n" in question or f") {answer}\n" in question
    # template strings are compact
    report = S.tokenizer_report(tok)
    assert report[" ASSISTANT:"] <= 3 and report["eos"] == 1


def test_frame_descriptions_and_pixels_match_the_ground_truth(world):
    spec = load_clips(world)["train"][0]
    tl, frames = timeline(spec), render_clip(spec)
    for t in (0, spec.frames // 2, spec.frames - 1):
        text = S.frame_description(spec, tl, t)
        n = int(tl.visible[:, t].sum())
        assert text.startswith(("zero", "one", "two", "three")[n] + " object")
        for i in np.flatnonzero(tl.visible[:, t]):
            assert f"{tl.colour_name(i, t)} {spec.objects[i].shape}" in text
    fs = S.FrameSet([spec], 32, frames_per_clip=4)
    idx = np.arange(4)
    t_idx = np.linspace(0, spec.frames - 1, 4).astype(np.int64)
    assert torch.equal(fs.pixels(idx), ImageProcessor.for_tower("siglip", 32)(frames[t_idx]))


def test_mc_training_annotations_cover_training_clips_only(world, tmp_path):
    from train.stage0 import write_mc_annotations
    from vidlmm.evaluate import parse_choice
    from vidlmm.conversation import normalize_conversations

    path = write_mc_annotations(world, tmp_path / "mc.json", seed=0, per_clip=3)
    records = json.loads(path.read_text())
    train_ids = {s.id for s in load_clips(world)["train"]}
    assert {r["id"].rsplit("_mc", 1)[0] for r in records} == train_ids
    assert (world / records[0]["video"]).is_file()
    for r in records:
        normalize_conversations(r["conversations"])  # the reference format, no warnings needed
        human, gpt = r["conversations"][0]["value"], r["conversations"][1]["value"]
        assert human.startswith("<image>\n") and human.rstrip().endswith("directly.")
        # the answer is the text of exactly one option, which the evaluation parser reads as that option
        options = [line for line in human.splitlines() if line[:3] in ("A. ", "B. ", "C. ", "D. ")
                   or line[:4] in ("(A) ", "(B) ", "(C) ", "(D) ")]
        texts = [line.split(" ", 1)[1] for line in options]
        assert len(options) == 4 and texts.count(gpt) == 1
        assert parse_choice(gpt, texts) == "ABCD"[texts.index(gpt)]
        assert r["options"] == texts  # the answer each option would be, for stage 2's option_weight
    assert write_mc_annotations(world, tmp_path / "again.json", seed=0, per_clip=3).read_text() == path.read_text()
    # with the letter: the same questions, each answer its text then its letter, which the parser reads first,
    # so that even a reply whose text is not among the options names one
    lettered = json.loads(write_mc_annotations(world, tmp_path / "l.json", seed=0, per_clip=3, letter=True).read_text())
    assert [r["conversations"][0] for r in lettered] == [r["conversations"][0] for r in records]
    for r, plain in zip(lettered, records):
        text = plain["conversations"][1]["value"]
        texts = [line.split(" ", 1)[1] for line in r["conversations"][0]["value"].splitlines()[-5:-1]]
        letter = "ABCD"[texts.index(text)]
        assert r["conversations"][1]["value"] == f"{text} ({letter})"
        assert r["options"] == [f"{t} ({c})" for t, c in zip(texts, "ABCD")]
        assert parse_choice(f"Not an option ({letter})", texts) == letter
    # as turns: one conversation per clip asking the same questions in the same order, the video before the first
    by_clip = {}
    for r in records:
        turns = by_clip.setdefault(r["id"].rsplit("_mc", 1)[0], [])
        question, answer = r["conversations"]
        turns += [{**question, "value": question["value"].removeprefix("<image>\n" if turns else "")}, answer]
    turned = json.loads(write_mc_annotations(world, tmp_path / "t.json", seed=0, per_clip=3, turns=True).read_text())
    assert [r["id"] for r in turned] == [f"{clip}_mc" for clip in by_clip]
    for r in turned:
        normalize_conversations(r["conversations"])
        assert "options" not in r and len(r["conversations"]) == 6
        assert sum("<image>" in turn["value"] for turn in r["conversations"]) == 1
        assert r["conversations"] == by_clip[r["id"][:-3]]


def test_other_video_questions_are_asked_of_another_clips_video(world, tmp_path):
    from train.stage0 import write_other_video_annotations

    path = write_other_video_annotations(world, tmp_path / "other.json", seed=0)
    records = json.loads(path.read_text())
    train_ids = [s.id for s in load_clips(world)["train"]]
    assert [r["id"].rsplit("_other", 1)[0] for r in records] == train_ids  # one question per training clip
    for r in records:
        asked_of = r["id"].rsplit("_other", 1)[0]
        assert r["video"] != f"videos/{asked_of}.mp4" and (world / r["video"]).is_file()
        assert r["answer_known"] is False and r["conversations"][1]["value"] in r["options"]
        assert len(r["options"]) == 4 and all(f") {o}\n" in r["conversations"][0]["value"]
                                              or f". {o}\n" in r["conversations"][0]["value"] for o in r["options"])
    assert write_other_video_annotations(world, tmp_path / "again.json", seed=0).read_text() == path.read_text()


def test_single_object_annotations_ask_the_lone_objects_colour_and_shape(world, tmp_path):
    from train.stage0 import write_single_object_annotations
    from train.world import timeline

    records = json.loads(write_single_object_annotations(world, tmp_path / "single.json").read_text())
    specs = {s.id: s for s in load_clips(world)["train"]}
    singles = {i for i, s in specs.items() if len(s.objects) == 1}
    assert singles and {r["video"].split("/")[1].split(".")[0] for r in records} == singles
    for r in records:
        spec = specs[r["id"].split("_")[0] + "_" + r["id"].split("_")[1]]
        (obj,) = spec.objects
        tl = timeline(spec)
        colours = {tl.colour_name(0, t) for t in range(spec.frames)}
        question, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
        assert question.startswith("<image>\n")
        if "colour" in question:  # asked only when the colour never changes
            assert colours == {obj.colour} and answer == obj.colour.capitalize() + "."
        else:
            assert answer == obj.shape.capitalize() + "." and any(c in question for c in colours)


def test_lookup_annotations_ask_every_colour_and_shape_of_the_several_object_clips(world, tmp_path):
    from train import world as W
    from train.stage0 import write_lookup_annotations
    from train.world import timeline

    path = write_lookup_annotations(world, tmp_path / "lookup.json")
    records = json.loads(path.read_text())
    specs = {s.id: s for s in load_clips(world)["train"]}
    several = {i for i, s in specs.items() if len(s.objects) > 1}
    assert several and {r["video"].split("/")[1].split(".")[0] for r in records} == several
    asked = 0
    for r in records:
        spec = specs[r["id"].removesuffix("_lookups")]
        conv = r["conversations"]
        assert [c["from"] for c in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n") and all("<image>" not in c["value"] for c in conv[1:])
        questions = [c["value"].removeprefix("<image>\n") for c in conv[::2]]
        assert len(set(questions)) == len(questions) > 1  # every question once, in one conversation
        for question, reply in zip(questions, (c["value"] for c in conv[1::2])):
            answer = reply.removesuffix(".").lower()
            if answer in W.COLOUR_NAMES:  # "What colour is the square?": the square's colour
                assert [o.colour for o in spec.objects if o.shape in question] == [answer]
            else:  # "Which shape is red?": the shape of an object that is red at some point
                tl = timeline(spec)
                shows = {(tl.colour_name(i, t), o.shape)
                         for i, o in enumerate(spec.objects) for t in range(spec.frames)}
                assert answer in W.SHAPES and any(c in question and s == answer for c, s in shows)
            asked += 1
    assert asked > len(records)
    assert write_lookup_annotations(world, tmp_path / "again.json").read_text() == path.read_text()


def test_one_mc_question_per_clip_still_asks_both_categories(world, tmp_path):
    """Stage 2's MC records (per_clip=1) alternate static and temporal, like the held-out set (half each)."""
    from train import world as W
    from train.world import text as WT
    from train.stage0 import write_mc_annotations

    records = json.loads(write_mc_annotations(world, tmp_path / "mc1.json", seed=0, per_clip=1).read_text())
    specs = {s.id: s for s in load_clips(world)["train"]}
    assert len(records) == len(specs)
    categories = []
    for r in records:
        spec = specs[r["id"].rsplit("_mc", 1)[0]]
        kind = {t: q.category for q in WT._question_pool(spec, np.random.default_rng(0)) for t in q.texts}
        categories.append(kind[r["conversations"][0]["value"].splitlines()[1]])
    assert categories[0::2] == ["static"] * len(categories[0::2])
    assert categories[1::2] == ["temporal"] * len(categories[1::2])
    rng = np.random.default_rng(3)
    assert [d["category"] for d in W.mc_items(specs[records[1]["id"].rsplit("_mc", 1)[0]], rng, first="temporal")] \
        == ["temporal", "static"]


def test_stage0_reads_its_tower_through_the_library_tower():
    """Stage 0's probes read the training tower with VisionTower (shared weights, no copy): the features equal the
    transformers model's hidden layer -2 without token 0 ("patch") or with it ("cls_patch")."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from vidlmm.vision import VisionTower

    torch.manual_seed(0)
    model = SiglipVisionModel(SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3,
                                                 num_attention_heads=2, intermediate_size=64)).eval()
    pixels = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(S.patch_features(model, pixels), hidden[:, 1:])
    assert torch.equal(S.patch_features(model, pixels, select_strategy="cls_patch"), hidden)
    tower = VisionTower.around(model)
    assert tower.tokens_per_frame == 15 and next(tower.parameters()) is next(model.parameters())


def test_the_command_changes_any_trainer_setting_and_can_stop_after_the_llm(world, tmp_path, capsys):
    """`python -m train.stage0 --set llm.KEY=V --no-vision`: a keyword of pretrain_llm outside the budget (here the
    reading-comprehension data) reaches the LLM's training, which changes its data and so its loss; no tower is
    trained; a misspelt setting is refused before anything trains."""
    from train.stage0.run import main

    common = ["--world", str(world), "--smoke", "--quiet", "--no-vision"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--set", "llm.context_per_clip=0", "llm.restatements=0",
                 "llm.recall_steps=3"]) == 0
    assert "vision: not trained" in capsys.readouterr().out
    a, b = (json.loads((tmp_path / x / "stage0.json").read_text()) for x in "ab")
    assert "vision" not in a and not (tmp_path / "a" / "vision").exists() and (tmp_path / "a" / "llm").is_dir()
    assert b["llm"]["train_sequences"] < a["llm"]["train_sequences"]
    assert "recall" not in a["llm"] and b["llm"]["recall"]["steps"] == 3 and 0 <= b["llm"]["recall"]["accuracy"] <= 1
    with pytest.raises(ValueError, match="llm.context_per_clp"):
        main([*common, "--out", str(tmp_path / "c"), "--set", "llm.context_per_clp=0"])
    assert not (tmp_path / "c").exists()


def test_length_batches_cover_every_sequence_once_and_pad_less_than_random_batches(world, tmp_path):
    """`llm.bucket`: one pass of `length_batches` holds every sequence exactly once, in batches of at most the
    batch size and of similar length (far less padding than random batches of the same lengths); an LM trained
    with it reports the padding it fed, below the padding of one trained without it."""
    from train.stage0.lm import length_batches
    from train.stage0.run import main

    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 200, 1000)
    batches = length_batches(np.random.default_rng(1), lengths, 32, chunk=8)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000)) and max(map(len, batches)) == 32

    def padding(bs):
        return sum(lengths[b].max() * len(b) - lengths[b].sum() for b in bs) / sum(lengths[b].sum() for b in bs)

    random = [b for b in np.array_split(rng.permutation(1000), 1000 // 32)]
    assert padding(batches) < padding(random) / 4
    assert flat[:64].tolist() != np.sort(flat[:64]).tolist()  # the batches are shuffled, not in length order
    common = ["--world", str(world), "--smoke", "--quiet", "--no-vision"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--set", "llm.bucket=true"]) == 0
    a, b = (json.loads((tmp_path / x / "stage0.json").read_text())["llm"] for x in "ab")
    assert b["padding"] < a["padding"] and a["tokens_seen"] > 0


def test_an_llm_only_change_trains_the_llm_and_copies_the_tower(stage0, world, tmp_path):
    """`build_embedded --stage0 llm.KEY=V` costs the LLM's training only: the tower (and its SigLIP folder) is the
    shipped stage 0's, byte for byte, and the new LLM is another model."""
    source, _ = stage0
    stats = S.run_stage0(world, tmp_path, budget="smoke", seed=0, progress=False,
                         overrides={"llm": {"restatements": 0}}, reuse_vision=source)
    for part in ("vision", "siglip"):
        files = sorted(p.relative_to(source / part) for p in (source / part).rglob("*") if p.is_file())
        assert files and all((tmp_path / part / f).read_bytes() == (source / part / f).read_bytes() for f in files)
    assert stats["vision_from"] == str(source) and stats["vision"]["params"] > 0
    new, old = (load_file(next((d / "llm").glob("*.safetensors"))) for d in (tmp_path, source))
    assert any(not torch.equal(new[k], old[k]) for k in old)
    assert "vision: copied" not in S.format_summary(stats)  # the copied tower's own stats are reported


def test_lookup_conversations_ask_each_clip_every_colour_and_shape_its_caption_answers(world):
    """`llm.lookup_per_clip`: after the clip's own caption, every colour and shape question of the clip, each answer
    a word of that caption; a clip of several objects is asked about more than its first one."""
    from train.stage0.text import lookup_conversations
    from train.world import asked_questions

    fit, _, _ = S.split_clips(world)
    convs = lookup_conversations(fit, seed=0, per_clip=2)
    asked = [spec for spec in fit for _ in range(2)
             if asked_questions(spec, np.random.default_rng(0), ("colour", "shape"))]
    assert len(convs) == len(asked) > 0
    several = 0
    for spec, conv in zip(asked, convs):
        caption = conv[0][0].split("\n")[0].lower()
        answers = [a.rstrip(".").lower() for _, a in conv]
        assert all(a in caption for a in answers)
        several += len(set(answers)) > 2
    assert several > 0
    assert lookup_conversations(fit, seed=0, per_clip=2) == convs != lookup_conversations(fit, seed=1, per_clip=2)


def test_recall_batches_ask_each_pair_once_either_way_and_score_only_the_answers():
    """`llm.recall_steps`' data: after the pairs, each pair once as a query and its answer, the answer the query's
    partner (the token after it or before it in the first half); only answers carry labels."""
    from train.stage0.lm import recall_batch

    ids, labels = recall_batch(np.random.default_rng(0), 64, np.arange(10, 200), sep=1, pairs=6)
    assert ids.shape == labels.shape == (64, 26)
    ways = set()
    for row, lab in zip(ids.tolist(), labels.tolist()):
        first, queries = row[1:13], row[14:]
        partner = {first[i]: first[i ^ 1] for i in range(12)}
        assert sorted(queries[0::2] + queries[1::2]) == sorted(first)
        assert all(partner[q] == a for q, a in zip(queries[0::2], queries[1::2]))
        assert lab[:15] == [-100] * 15 and lab[14::2] == [-100] * 6 and lab[15::2] == queries[1::2]
        ways |= {first.index(q) % 2 for q in queries[0::2]}
    assert ways == {0, 1}  # forward and backward queries both occur


def test_a_symbolic_video_is_one_token_per_visible_object_of_each_sampled_frame(world):
    """`train.stage0.symbols`: 16 frames x 4 slots; a frame's visible objects as the ids of their (colour, shape,
    cell), left to right, the other slots blank; an object that blinks or vanishes leaves its slot."""
    from train.stage0.symbols import CELLS, FRAMES, SLOTS, symbol_index, symbol_parts
    from train.world import COLOUR_NAMES, SHAPES
    from vidlmm.video import FrameSampling, sample_frame_indices

    first = 1000
    for spec in load_clips(world)["train"]:
        video = S.symbolic_video(spec, first)
        assert len(video) == FRAMES * SLOTS and all(first <= i < first + S.symbol_count() for i in video)
        tl = timeline(spec)
        for f, t in enumerate(sample_frame_indices(spec.frames, spec.fps, FrameSampling.uniform(FRAMES))):
            slots = [symbol_parts(i - first - 1) for i in video[f * SLOTS:(f + 1) * SLOTS] if i != first]
            shown = sorted((COLOUR_NAMES[colour], SHAPES[shape]) for colour, shape, _, _ in slots)
            truth = sorted((tl.colour_name(i, t), spec.objects[i].shape) for i in np.flatnonzero(tl.visible[:, t]))
            assert shown == truth
            cols = [col for *_, col in slots]
            assert cols == sorted(cols)
    # every (colour, shape, row, column) has its own index past the blank, and `symbol_parts` reads it back
    everything = list(itertools.product(range(len(COLOUR_NAMES)), range(len(SHAPES)), range(3), range(3)))
    assert len(everything) == CELLS * len(COLOUR_NAMES) * len(SHAPES) == S.symbol_count() - 1
    assert sorted(symbol_index(*p) for p in everything) == list(range(len(everything)))
    assert all(symbol_parts(symbol_index(*p)) == p for p in everything)


def test_symbolic_sequences_put_the_video_where_the_image_goes_and_score_only_text(world, stage0):
    """`llm.symbolic_per_clip`: captions in stage 1's layout and questions in stage 2's, each with the clip's
    symbolic video in the video's place; a batch never scores the video's ids."""
    from train.stage0.lm import _lm_batch

    out, _ = stage0
    tok = load_tokenizer(out / "tokenizer")
    fit, _, _ = S.split_clips(world)
    seqs = S.symbolic_ids(fit[:3], tok, seed=0)
    eos = tok.convert_tokens_to_ids(EOS_TOKEN)
    for k, spec in enumerate(fit[:3]):
        video = S.symbolic_video(spec, len(tok))
        mine = [s for s in seqs if any(s[i:i + len(video)] == video for i in range(len(s) - len(video) + 1))]
        assert len(mine) >= 3 and mine[0][:len(video)] == video and mine[0][-1] == eos
    ids, mask, labels = _lm_batch(seqs, eos, len(tok))
    assert ((labels != -100) & (ids >= len(tok))).sum() == 0 and ((labels != -100) & (mask == 1)).any()
    assert (ids >= len(tok)).any()


@pytest.fixture(scope="module")
def symbolic_llm(stage0):
    """The smoke stage-0 LLM, trained with `llm.symbolic_per_clip` as the budgets are: its folder."""
    return stage0[0] / "llm"


@pytest.fixture(scope="module")
def plain_llm(world, tmp_path_factory):
    """A smoke stage-0 LLM trained without the symbolic video (`llm.symbolic_per_clip=0`): its folder."""
    out = tmp_path_factory.mktemp("s0plain")
    S.run_stage0(world, out, budget="smoke", seed=0, progress=False, vision=False,
                 overrides={"llm": {"symbolic_per_clip": 0}})
    return out / "llm"


def test_an_llm_trained_with_symbolic_videos_has_rows_for_them_and_is_read_with_them(world, symbolic_llm):
    """The LLM's embedding grows by the symbolic ids (the tokenizer does not), and `diagnose context` answers
    every question type with the video in place."""
    from transformers import AutoConfig

    from train.diagnose import context_reading

    tok = load_tokenizer(symbolic_llm)
    assert AutoConfig.from_pretrained(symbolic_llm).vocab_size == len(tok) + S.symbol_count()
    report = context_reading(symbolic_llm, world, limit=4)
    asked = report["symbolic_video_qa"]
    assert asked and all(0 <= int(v.split("/")[0]) <= int(v.split("/")[1]) for v in asked.values())


def test_factored_symbol_rows_share_an_objects_parts_across_cells_and_start_an_llm(world, stage0, tmp_path):
    """`llm.symbol_init=factored`: a symbol's row shares its colour's, shape's and cell's parts with the other
    symbols (an object in two cells starts at cosine about 2/3, two objects in one cell 1/3, nothing shared 0),
    rows as long as `init_std` draws; the LM starts from them."""
    from train.stage0.lm import pretrain_llm
    from train.stage0.symbols import CELLS
    from train.world import SHAPES

    rows = S.factored_rows(256, 0.1, seed=0)
    assert rows.shape == (S.symbol_count(), 256) and rows.std().item() == pytest.approx(0.1, rel=0.1)

    def cos(a: int, b: int) -> float:
        return torch.nn.functional.cosine_similarity(rows[1 + a], rows[1 + b], dim=0).item()

    other = (1 * len(SHAPES) + 1) * CELLS  # the next colour and shape, cell 0
    assert cos(0, 1) == pytest.approx(2 / 3, abs=0.15) and cos(0, other) == pytest.approx(1 / 3, abs=0.15)
    assert abs(cos(0, other + 1)) < 0.2
    out, _ = stage0
    pretrain_llm(world, out / "tokenizer", tmp_path, hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate=64,
                 steps=1, batch_size=2, lr=1e-4, variants=0, symbolic_per_clip=1, symbol_init="factored",
                 init_std=0.1, progress=False)
    table = load_file(tmp_path / "model.safetensors")["model.embed_tokens.weight"]
    start = S.factored_rows(32, 0.1, seed=0)
    assert torch.allclose(table[-len(start):], start, atol=1e-3)  # one small step away
    with pytest.raises(ValueError, match="symbol_init"):
        pretrain_llm(world, out / "tokenizer", tmp_path, symbol_init="sorted")
    with pytest.raises(ValueError, match="symbolic_per_clip > 0"):
        pretrain_llm(world, out / "tokenizer", tmp_path, symbol_init="factored", symbolic_per_clip=0)


def test_composed_symbol_rows_stay_sums_of_their_parts_through_training(world, stage0, tmp_path):
    """`llm.symbol_init=composed`: only the parts are learned, so after training a row is still its colour's +
    shape's + cell's part (the difference between two cells is the same for every colour and shape), the rows
    moved from their start, and the saved LM is a plain Qwen2 checkpoint with those rows in its embedding."""
    from train.stage0.lm import pretrain_llm
    from train.stage0.symbols import CELLS
    from train.world import COLOUR_NAMES, SHAPES

    out, _ = stage0
    pretrain_llm(world, out / "tokenizer", tmp_path, hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate=64,
                 steps=3, batch_size=2, lr=1e-2, variants=0, symbolic_per_clip=1, symbol_init="composed",
                 init_std=0.1, progress=False)
    weights = load_file(tmp_path / "model.safetensors")
    assert not [k for k in weights if "composed" in k]
    rows = weights["model.embed_tokens.weight"][-S.symbol_count():]
    start = S.factored_rows(32, 0.1, seed=0)
    assert (rows - start).abs().max() > 1e-3  # trained
    grid = rows[1:].reshape(len(COLOUR_NAMES), len(SHAPES), CELLS, -1)
    step = grid[:, :, 1:] - grid[:, :, :1]  # cell k against cell 0, per colour and shape
    assert torch.allclose(step, step[:1, :1].expand_as(step), atol=1e-5)
    shape_step = grid[:, 1:] - grid[:, :1]
    assert torch.allclose(shape_step, shape_step[:1, :, :1].expand_as(shape_step), atol=1e-5)
    with pytest.raises(ValueError, match="recall warm-up"):
        pretrain_llm(world, out / "tokenizer", tmp_path, symbol_init="composed", recall_steps=1)


def test_grid_cells_are_a_rows_part_plus_a_columns_part_starting_on_a_line(world, stage0, tmp_path):
    """`llm.symbol_cells=grid`: a cell's part is its row's + its column's, so moving one column right changes a row
    by the same vector in every row (before and after training); the parts start on a line (middle = mean of the
    ends); the free cells' draw is unchanged by the option's existence."""
    from train.stage0.lm import pretrain_llm
    from train.stage0.symbols import ComposedSymbols

    grid = ComposedSymbols(32, 0.1, seed=3, cells="grid")
    cells = grid.cell_parts().detach().reshape(3, 3, -1)
    right = cells[:, 1:] - cells[:, :-1]  # one column to the right, in each row
    assert torch.allclose(right, right[:1].expand_as(right), atol=1e-6) and right.norm() > 0
    assert torch.allclose(cells[1], (cells[0] + cells[2]) / 2, atol=1e-6)  # the middle row between the others
    assert torch.equal(ComposedSymbols(32, 0.1, seed=3).rows(), ComposedSymbols(32, 0.1, seed=3, cells="free").rows())
    out, _ = stage0
    pretrain_llm(world, out / "tokenizer", tmp_path, hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate=64,
                 steps=3, batch_size=2, lr=1e-2, variants=0, symbolic_per_clip=1, symbol_init="composed",
                 symbol_cells="grid", init_std=0.1, progress=False)
    rows = load_file(tmp_path / "model.safetensors")["model.embed_tokens.weight"][-S.symbol_count():]
    trained = rows[1:].reshape(-1, 3, 3, rows.shape[-1])  # [colour x shape, row, column]
    right = trained[:, :, 1:] - trained[:, :, :-1]
    assert torch.allclose(right, right[:1, :1].expand_as(right), atol=1e-5)
    with pytest.raises(ValueError, match="needs symbol_init='composed'"):
        pretrain_llm(world, out / "tokenizer", tmp_path, symbolic_per_clip=1, symbol_cells="grid")


def test_composed_loss_is_the_lms_own_loss_with_the_composed_rows_in_its_embedding():
    """`_composed_loss` (the rows taken from the parts, in the input and the tied output layer) equals
    Qwen2ForCausalLM's own loss once those rows are written into its embedding, and differs before."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from train.stage0.lm import _composed_loss
    from train.stage0.symbols import ComposedSymbols

    text = 40
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=text + S.symbol_count(), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         tie_word_embeddings=True, initializer_range=0.1)).eval()
    composed = ComposedSymbols(32, 0.1, seed=3)
    ids = torch.cat([torch.randint(text, text + S.symbol_count(), (2, 6)), torch.randint(0, text, (2, 5))], 1)
    mask = torch.ones_like(ids)
    labels = ids.masked_fill(ids >= text, -100)
    with torch.no_grad():
        ours = _composed_loss(model, composed, ids, mask, labels, text)
        assert abs(float(ours) - float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)) > 1e-4
        model.get_input_embeddings().weight[text:] = composed.rows()
        own = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert float(ours) == pytest.approx(float(own), abs=1e-5)


@pytest.mark.parametrize("option", ["temporal", "extra"])
def test_symbolic_options_add_a_conversation_of_each_clips_questions_of_their_types(world, stage0, option):
    """`llm.symbolic_temporal` / `llm.symbolic_extra=["colour"]`: per clip and draw, one more sequence, every
    temporal (colour) question of the clip with its answer after the symbolic video; the other sequences stay those
    of a run without it."""
    from train.world import QUESTION_TYPES, asked_questions

    types = QUESTION_TYPES["temporal"] if option == "temporal" else ("colour",)
    out, _ = stage0
    tok = load_tokenizer(out / "tokenizer")
    fit, _, _ = S.split_clips(world)
    plain = S.symbolic_ids(fit[:4], tok, seed=0)
    more = S.symbolic_ids(fit[:4], tok, seed=0, **({"temporal": True} if option == "temporal" else {"extra": types}))
    extra = [seq for seq in more if seq not in plain]
    assert [seq for seq in more if seq in plain] == plain
    asked = [spec for spec in fit[:4] if asked_questions(spec, np.random.default_rng(0), types)]
    assert asked and len(extra) == len(asked)
    for spec, seq in zip(asked, extra):
        text = tok.decode([i for i in seq if i < len(tok)])
        for q, _ in asked_questions(spec, np.random.default_rng(0), types):
            assert q.answer + "." in text and q.type in types


def test_where_turns_name_each_objects_cell_in_the_first_and_last_sampled_frame(world, stage0):
    """`llm.symbolic_where`: per clip and draw one more sequence after the symbolic video, where each object is at
    first and at the end, named by the cell its symbol carries; a mover's two answers differ, and say its direction;
    the other sequences stay those of a run without it."""
    from train.stage0.symbols import COLUMNS, ROWS, where_turns

    out, _ = stage0
    tok = load_tokenizer(out / "tokenizer")
    fit, _, _ = S.split_clips(world)
    plain = S.symbolic_ids(fit[:4], tok, seed=0)
    more = S.symbolic_ids(fit[:4], tok, seed=0, where=True)
    assert [seq for seq in more if seq in plain] == plain and len(more) == len(plain) + 4
    cells = {"Middle": (1, 1), **{f"{r} {c}".capitalize(): (ROWS.index(r), COLUMNS.index(c)) for r in ROWS
                                  for c in COLUMNS if (r, c) != ("middle", "middle")}}
    step = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
    movers = 0
    for spec in load_clips(world)["train"]:
        turns = dict(where_turns(spec, np.random.default_rng(0)))
        tl = timeline(spec)
        # uniform sampling takes the first and the last frame
        assert len(turns) == sum(tl.visible[:, t].sum() for t in (0, spec.frames - 1))
        for e in spec.events:
            if e.kind != "move" or not tl.visible[e.obj, 0] or not tl.visible[e.obj, -1]:
                continue
            shape = spec.objects[e.obj].shape
            (r0, c0), (r1, c1) = (cells[turns[f"Where is the {tl.colour_name(e.obj, t)} {shape} {when}?"][:-1]]
                                  for t, when in ((0, "at first"), (spec.frames - 1, "at the end")))
            dr, dc = step[e.direction]
            assert (np.sign(r1 - r0), np.sign(c1 - c0)) == (dr, dc)
            movers += 1
    assert movers


def test_the_alignment_loss_scores_each_frames_symbols_in_any_order_and_only_there():
    """`alignment_loss`: the symbols' own embeddings score far better than random tokens, whatever the order of a
    frame's tokens; the same tokens a frame off score as badly as random ones; lengths count."""
    from train.stage0.symbols import FRAMES, SLOTS

    gen = torch.Generator().manual_seed(0)
    table = torch.randn(S.symbol_count(), 32, generator=gen)
    ids = torch.randint(0, S.symbol_count(), (FRAMES * SLOTS,), generator=gen)
    exact = table[ids]
    shuffled = exact.view(FRAMES, SLOTS, -1)[:, [2, 0, 3, 1]].reshape(exact.shape)
    shifted = exact.view(FRAMES, SLOTS, -1).roll(1, 0).reshape(exact.shape)
    noise = torch.randn(exact.shape, generator=gen)
    loss = {name: float(S.alignment_loss(t, table, ids)) for name, t in
            {"exact": exact, "shuffled": shuffled, "shifted": shifted, "random": noise, "long": 3 * exact}.items()}
    assert loss["exact"] == pytest.approx(loss["shuffled"], abs=1e-5)
    assert loss["exact"] < 0.5 * loss["random"] and loss["shifted"] > 0.8 * loss["random"]
    assert loss["long"] > loss["exact"] + 1.0  # log(3)^2 per token


def test_stage1_symbol_weight_teaches_the_connector_its_clips_symbols(world, stage0, symbolic_llm, plain_llm,
                                                                     tmp_path):
    """The recipe's `symbol_weight`: stage 1 on caption annotations that carry each clip's symbolic video lowers
    the connector's `alignment_loss` on those clips; an LM without the symbols' rows is refused in one sentence."""
    from train.diagnose import symbol_readout
    from train.recipe import load_recipe
    from train.trainer import TrainingStep, build_model, run
    from vidlmm.checkpoint import load_model
    from vidlmm.pipeline import default_sampling
    from vidlmm.preprocess import read_pixels

    out, _ = stage0
    annotations = S.write_symbol_annotations(world, world / "captions.json", tmp_path / "captions_symbols.json")
    specs = {f"videos/{spec.id}.mp4": spec for spec in load_clips(world)["train"]}
    items = json.loads(annotations.read_text())
    assert all(item["symbols"] == S.symbolic_video(specs[item["video"]], 0) for item in items)
    # an unreadable video among them costs its sample (a placeholder of one frame, no symbols), not the run
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "broken.mp4").write_bytes(b"not a video")
    annotations.write_text(json.dumps(items + [{**items[0], "id": "broken", "video": "videos/broken.mp4"}]))

    def recipe(llm, name, *extra):
        return load_recipe("toy_stage1.yaml", [
            f"llm={llm}", f"vision_tower={out / 'vision'}", f"annotations=[{json.dumps(str(annotations))}]",
            f"video_roots=[{json.dumps(str(world))}]", f"output_dir={tmp_path / name}", "global_batch_size=8",
            "per_device_batch_size=8", "epochs=12", "learning_rate=1e-2", "decode_time_limit_s=0", "symbol_weight=1",
            *extra])

    def alignment(model) -> float:
        step = TrainingStep(model.eval(), symbol_weight=1.0)
        with torch.no_grad():
            visual = [model.connect(model.encode_frames(read_pixels(world / item["video"], default_sampling(model),
                                                                    model.image_processor)[1])) for item in items]
            return float(step.symbol_distance(visual, [item["symbols"] for item in items]).mean())

    trained = recipe(symbolic_llm, "aligned")
    before = alignment(build_model(trained))
    folder = run(trained, progress=False)
    model = load_model(folder, dtype="fp32", device="cpu").eval()
    after = alignment(model)
    assert [skip["id"] for skip in json.loads((folder / "trainer_state.json").read_text())["skipped"]] == ["broken"]
    assert after < before - 1.0, (before, after)
    with pytest.raises(ValueError, match="no embedding rows for the symbolic video"):
        run(recipe(plain_llm, "no_rows"), max_steps=1, progress=False)
    # `python -m train.diagnose symbols`: the nearest symbol of each token, against the frame's symbols
    readout = symbol_readout(model, world, clips=3)
    assert readout["clips"] == 3 and readout["symbol_length"] > 0
    assert all(0.0 <= readout[k] <= 1.0 for k in ("precision", "recall", "frames_exact"))
    # a reading right in every part is right as a pair, and a pair shown has its colour and its shape shown
    assert readout["precision"] <= readout["pair_shown"] <= min(readout["colour_shown"], readout["shape_shown"])
    with pytest.raises(ValueError, match="no embedding rows for the symbolic video"):
        symbol_readout(build_model(recipe(plain_llm, "no_rows")).eval(), world, clips=1)


def test_patch_symbols_name_the_object_on_each_patch_as_the_symbolic_video_names_it(world):
    """`patch_symbols`: per sampled frame, each cell of the tower's patch grid holds the symbol the frame's symbolic
    video gives the object on it (its colour and shape those of the tower's dense labels, `patch_labels`), the blank
    where the dense labels see background; every object the symbolic video lists that covers a patch is found."""
    from train.stage0.symbols import FRAMES, SLOTS, symbol_parts
    from train.stage0.tower import patch_labels
    from train.world import COLOUR_NAMES, SHAPES
    from vidlmm.video import FrameSampling, sample_frame_indices

    grid, found = 8, 0
    for spec in load_clips(world)["train"][:6]:
        ids = np.asarray(S.patch_symbols(spec, grid)).reshape(FRAMES, grid * grid)
        frames = np.asarray(S.symbolic_video(spec, 0)).reshape(FRAMES, SLOTS)
        tl = timeline(spec)
        for f, t in enumerate(sample_frame_indices(spec.frames, spec.fps, FrameSampling.uniform(FRAMES))):
            labels = patch_labels(spec, tl, int(t), grid)
            assert ((ids[f] == 0) == (labels == 0)).all()
            assert set(ids[f][ids[f] > 0]) <= set(frames[f][frames[f] > 0])
            for symbol, label in zip(ids[f][ids[f] > 0], labels[labels > 0]):
                colour, shape, _, _ = symbol_parts(int(symbol) - 1)
                assert label == 1 + colour * len(SHAPES) + shape < 1 + len(COLOUR_NAMES) * len(SHAPES)
            found += len(set(ids[f][ids[f] > 0]))
    assert found


def test_the_patch_alignment_loss_scores_each_patch_against_its_objects_symbol():
    """`patch_alignment_loss`: patches that are their objects' symbols (the blank on background) score far better
    than the same tokens on other patches, or random ones; lengths count; the background, however large, weighs as
    much as the objects."""
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(S.symbol_count(), 32, generator=gen)
    ids = torch.randint(1, S.symbol_count(), (12,), generator=gen)
    ids[6:] = 0  # half the patches on objects, half background
    exact = table[ids]
    loss = {name: float(S.patch_alignment_loss(t, table, ids)) for name, t in
            {"exact": exact, "other": exact.roll(1, 0), "random": torch.randn(exact.shape, generator=gen),
             "long": 3 * exact}.items()}
    assert loss["exact"] < 0.5 * loss["random"] and loss["exact"] < 0.5 * loss["other"], loss
    assert loss["long"] > loss["exact"] + 1.0  # log(3)^2 per patch
    more_background = torch.cat([ids, torch.zeros(24, dtype=ids.dtype)])
    wrong = exact.clone()
    wrong[:6] = torch.randn(6, 32, generator=gen)  # the objects' patches missed, the background right
    assert float(S.patch_alignment_loss(torch.cat([wrong, table[[0] * 24]]), table, more_background)) == \
        pytest.approx(float(S.patch_alignment_loss(wrong, table, ids)), rel=1e-5)


def test_stage1_patch_symbol_weight_teaches_a_compressor_the_symbols_of_its_patches(world, stage0, symbolic_llm,
                                                                                  tmp_path):
    """The recipe's `patch_symbol_weight` on a compressor whose tokens are kept patches (top-k): stage 1 on
    caption annotations that carry each patch's symbol lowers its patches' `patch_alignment_loss` on those clips
    and leaves the scorer that picks the kept patches as it was; annotations for another patch grid, or a connector
    that does not pass patches on, are refused in one sentence."""
    from train.diagnose import patch_readout
    from train.recipe import load_recipe
    from train.trainer import TrainingStep, build_model, run
    from vidlmm.checkpoint import load_model
    from vidlmm.pipeline import default_sampling
    from vidlmm.preprocess import read_pixels

    out, _ = stage0
    tower = json.loads((out / "vision" / "config.json").read_text())
    grid = tower["image_size"] // tower["patch_size"]
    annotations = S.write_symbol_annotations(world, world / "captions.json", tmp_path / "captions_patches.json",
                                             patch_grid=grid)
    items = json.loads(annotations.read_text())
    assert all(len(item["patch_symbols"]) == 16 * grid * grid for item in items)
    trained = load_recipe("toy_stage1.yaml", [
        f"llm={symbolic_llm}", f"vision_tower={out / 'vision'}", f"annotations=[{json.dumps(str(annotations))}]",
        f"video_roots=[{json.dumps(str(world))}]", f"output_dir={tmp_path / 'topk'}", "global_batch_size=8",
        "per_device_batch_size=8", "epochs=12", "learning_rate=1e-2", "decode_time_limit_s=0", "symbol_weight=0",
        "patch_symbol_weight=1", "connector_type=topk", "group=null", 'connector_options={"token_budget": 64}'])

    def distance(model, items) -> float:
        step = TrainingStep(model.eval(), patch_symbol_weight=1.0)
        with torch.no_grad():
            feats = [model.encode_frames(read_pixels(world / item["video"], default_sampling(model),
                                                     model.image_processor)[1]) for item in items]
            return float(step.patch_symbol_distance(feats, [item["patch_symbols"] for item in items]).mean())

    untrained = build_model(trained)
    before = distance(untrained, items)
    model = load_model(run(trained, progress=False), dtype="fp32", device="cpu").eval()
    after = distance(model, items)
    assert after < before - 1.0, (before, after)
    # its gradient reaches the projector, not the scorer that picks the kept patches (the LM's loss trains that)
    feats = untrained.encode_frames(read_pixels(world / items[0]["video"], default_sampling(untrained),
                                                untrained.image_processor)[1])
    TrainingStep(untrained.train(), patch_symbol_weight=1.0).patch_symbol_distance(
        [feats], [items[0]["patch_symbols"]]).sum().backward()
    grads = {name: p.grad for name, p in untrained.connector.named_parameters()}
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if n.startswith("projector"))
    assert [n for n in grads if n.startswith("scorer")] and all(grads[n] is None for n in grads
                                                                if n.startswith("scorer"))
    # `python -m train.diagnose patches`: where the kept patches lie and whether their tokens name their objects
    readout = patch_readout(model, world, clips=3)
    assert readout["clips"] == 3 and 0.0 < readout["object_patches"] < 1.0
    assert all(0.0 <= readout[k] <= 1.0 for k in ("on_objects", "objects_reached", "named"))
    group = build_model(load_recipe("toy_stage1.yaml", [f"llm={symbolic_llm}", f"vision_tower={out / 'vision'}"]))
    with pytest.raises(ValueError, match="does not pass the tower's patches on"):
        distance(group, items[:1])
    with pytest.raises(ValueError, match=f"patch_symbols has {grid * grid + 1} cells per frame"):
        distance(model, [{**items[0], "patch_symbols": [0] * (16 * (grid * grid + 1))}])


def test_a_part_trains_at_its_own_seed_and_the_rest_at_the_runs(world, stage0, tmp_path):
    """`llm.seed=1`: the LM's weights and draws at seed 1, the tokenizer the run's (seed 0), so the LM is another
    draw of the same recipe over the same vocabulary; the same override twice trains the same LM."""
    out, _ = stage0
    runs = []
    for k in range(2):
        S.run_stage0(world, tmp_path / str(k), budget="smoke", seed=0, progress=False, vision=False,
                     overrides={"llm": {"seed": 1}})
        runs.append(load_file(tmp_path / str(k) / "llm" / "model.safetensors"))
    base = load_file(out / "llm" / "model.safetensors")
    assert (tmp_path / "0" / "tokenizer" / "merges.txt").read_text() == \
        (out / "tokenizer" / "merges.txt").read_text()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in base)
    assert not all(torch.equal(runs[0][k], base[k]) for k in base)


def test_the_lm_is_drawn_again_until_it_reads_colours_from_symbols(world, stage0, tmp_path):
    """`llm.draws` with `llm.min_colour_read`: each draw is judged by `symbolic_read` (colours of named objects read
    from exact symbolic videos of held-out training clips); a draw under the floor is put aside in llm.seed<N> and
    the next seed drawn; when none reaches the floor the best comes back as llm. A floor the first draw reaches
    trains one LM, the one a run without draws trains."""
    out, _ = stage0
    stats = S.run_stage0(world, tmp_path / "none", budget="smoke", seed=0, progress=False, vision=False,
                         overrides={"llm": {"draws": 3, "min_colour_read": 1.01}})  # a floor no draw reaches
    draws = stats["llm"]["draws"]
    best = max(draws, key=lambda d: d["colour_read"])
    assert [d["seed"] for d in draws] == [0, 1, 2] and stats["llm"]["seed"] == best["seed"]
    assert all(0 <= d["colour_read"] <= 1 and "where" in d["symbolic_video_qa"] for d in draws)
    folder = tmp_path / "none"
    assert sorted(p.name for p in folder.glob("llm.seed*")) == [f"llm.seed{d['seed']}" for d in draws if d is not best]
    weights = {d["seed"]: load_file(folder / ("llm" if d is best else f"llm.seed{d['seed']}") / "model.safetensors")
               for d in draws}
    shipped = load_file(out / "llm" / "model.safetensors")
    assert all(torch.equal(weights[0][k], shipped[k]) for k in shipped)  # draw 0 is the run's own LM
    assert not all(torch.equal(weights[1][k], shipped[k]) for k in shipped)
    assert S.symbolic_read(folder / "llm", world) == best["symbolic_video_qa"]

    once = S.run_stage0(world, tmp_path / "once", budget="smoke", seed=0, progress=False, vision=False,
                        overrides={"llm": {"draws": 3, "min_colour_read": 0.0}})
    assert [d["seed"] for d in once["llm"]["draws"]] == [0] and not list((tmp_path / "once").glob("llm.seed*"))
    with pytest.raises(ValueError, match="needs llm.symbolic_per_clip"):
        S.run_stage0(world, tmp_path / "plain", budget="smoke", seed=0, progress=False, vision=False,
                     overrides={"llm": {"draws": 2, "symbolic_per_clip": 0}})


def test_a_stopped_stage0_keeps_the_draws_it_judged(world, tmp_path, monkeypatch):
    """Each judged draw keeps its stats and read beside its weights: a stage 0 run again after two draws (as a kill
    during the third leaves it, here the best of two put back as llm) trains only the third, and a run that finds
    every draw judged trains none and keeps the same one."""
    import train.stage0.run as R

    trained = []
    real = R.pretrain_llm
    monkeypatch.setattr(R, "pretrain_llm", lambda *a, **k: trained.append(k["seed"]) or real(*a, **k))
    unreachable = {"llm": {"draws": 2, "min_colour_read": 1.01}}
    two = S.run_stage0(world, tmp_path / "s0", budget="smoke", seed=0, progress=False, vision=False,
                       overrides=unreachable)
    assert trained == [0, 1]
    three = S.run_stage0(world, tmp_path / "s0", budget="smoke", seed=0, progress=False, vision=False,
                         overrides={"llm": {**unreachable["llm"], "draws": 3}})
    assert trained == [0, 1, 2] and three["llm"]["draws"][:2] == two["llm"]["draws"]
    best = max(three["llm"]["draws"], key=lambda d: d["colour_read"])
    assert three["llm"]["seed"] == best["seed"]
    assert S.symbolic_read(tmp_path / "s0" / "llm", world) == best["symbolic_video_qa"]
    again = S.run_stage0(world, tmp_path / "s0", budget="smoke", seed=0, progress=False, vision=False,
                         overrides={"llm": {**unreachable["llm"], "draws": 3}})
    assert trained == [0, 1, 2] and again["llm"] == three["llm"]
    assert sorted(p.name for p in (tmp_path / "s0").glob("llm.seed*")) == sorted(
        f"llm.seed{d['seed']}" for d in three["llm"]["draws"] if d is not best)
    # drawn from seed 1 with a floor it reaches: that draw, put aside by the runs before, is the LM again
    aside = [d for d in three["llm"]["draws"] if d is not best][0]
    weights = load_file(tmp_path / "s0" / f"llm.seed{aside['seed']}" / "model.safetensors")
    again = S.run_stage0(world, tmp_path / "s0", budget="smoke", seed=0, progress=False, vision=False,
                         overrides={"llm": {"seed": aside["seed"], "draws": 2, "min_colour_read": 0.0}})
    assert trained == [0, 1, 2] and again["llm"]["seed"] == aside["seed"] and again["llm"]["draws"] == [aside]
    kept = load_file(tmp_path / "s0" / "llm" / "model.safetensors")
    assert all(torch.equal(kept[k], weights[k]) for k in weights)
    assert (tmp_path / "s0" / f"llm.seed{best['seed']}" / "model.safetensors").is_file()  # the other, put aside


def test_an_lm_asked_for_at_one_seed_is_that_draw_alone(world, tmp_path, monkeypatch):
    """With a budget that draws the LM again (`llm.draws`), `llm.seed=N` still trains the LM at seed N once, as the
    documented runs at seeds 1 and 2 did; `llm.draws` beside it draws from N on."""
    from train.stage0.common import BUDGETS

    monkeypatch.setitem(BUDGETS["smoke"]["llm"], "draws", 2)
    monkeypatch.setitem(BUDGETS["smoke"]["llm"], "min_colour_read", 1.01)
    one = S.run_stage0(world, tmp_path / "one", budget="smoke", seed=0, progress=False, vision=False,
                       overrides={"llm": {"seed": 1}})
    assert "draws" not in one["llm"] and not list((tmp_path / "one").glob("llm.seed*"))
    two = S.run_stage0(world, tmp_path / "two", budget="smoke", seed=0, progress=False, vision=False,
                       overrides={"llm": {"seed": 1, "draws": 2}})
    assert [d["seed"] for d in two["llm"]["draws"]] == [1, 2]


def test_motion_labels_say_where_each_object_is_against_its_first_symbol(world, stage0, tmp_path):
    """`llm.motion_weight`: each object symbol is labelled with its cell against the same object's (shape's) first
    symbol in the sequence: a square moving left from the top right is 'left' once it has moved and 'same' before;
    an object that turns another colour is still the same object; text and blanks are not labelled. The head that
    learns them is not saved."""
    from train.stage0.lm import motion_labels, pretrain_llm
    from train.stage0.symbols import CELLS
    from train.world import COLOUR_NAMES, SHAPES

    text = 50

    def symbol(colour: str, shape: str, row: int, col: int) -> int:
        return text + 1 + (COLOUR_NAMES.index(colour) * len(SHAPES) + SHAPES.index(shape)) * CELLS + row * 3 + col

    ids = torch.tensor([[7, symbol("red", "square", 0, 2), symbol("blue", "circle", 2, 0), text,
                         symbol("red", "square", 0, 1), symbol("green", "circle", 1, 0), 9]])
    same, left, up = 4, 1, 3  # (column sign + 1) * 3 + (row sign + 1)
    assert motion_labels(ids, text).tolist() == [[-100, same, same, -100, left, up, -100]]
    out, _ = stage0
    pretrain_llm(world, out / "tokenizer", tmp_path, hidden_size=32, layers=2, heads=2, kv_heads=1, intermediate=64,
                 steps=3, batch_size=2, lr=1e-2, variants=0, symbolic_per_clip=1, symbol_init="composed",
                 motion_weight=1.0, motion_layer=1, init_std=0.1, progress=False)
    assert not [k for k in load_file(tmp_path / "model.safetensors") if "motion" in k]
    with pytest.raises(ValueError, match="motion_weight .* needs symbol_init='composed'"):
        pretrain_llm(world, out / "tokenizer", tmp_path, symbolic_per_clip=1, motion_weight=1.0)


def test_a_detached_motion_loss_trains_the_layers_but_not_the_symbols_parts():
    """`llm.motion_detach`: the motion head's loss reaches the LM's layers but leaves the composed symbols' parts
    as the LM's own loss trains them; without it, the parts take the motion loss's gradient too."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from train.stage0.lm import MOTIONS, MotionLoss, _composed_loss
    from train.stage0.symbols import CELLS, ComposedSymbols, symbol_count

    text = 40
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=text + symbol_count(), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    composed, head = ComposedSymbols(16, 0.1), torch.nn.Linear(16, MOTIONS)
    ids = torch.tensor([[3, text + 1 + 2, text + 1 + CELLS + 4, 5, text + 1 + 1, text + 1 + CELLS + 7, 6]])
    mask, labels = torch.ones_like(ids), ids.masked_fill(ids >= text, -100)

    def grads(motion):
        model.zero_grad(), composed.zero_grad(), head.zero_grad()
        _composed_loss(model, composed, ids, mask, labels, text, motion).backward()
        layer = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
        return composed.cell.grad.clone(), layer

    parts, layer = grads(None)
    detached_parts, detached_layer = grads(MotionLoss(head, 1, 1.0, True))
    torch.testing.assert_close(detached_parts, parts)
    assert not torch.allclose(detached_layer, layer)
    assert not torch.allclose(grads(MotionLoss(head, 1, 1.0, False))[0], parts)


def test_the_direction_probe_reads_every_object_symbol_and_one_answer_per_clip_with_a_move(world, symbolic_llm):
    """`diagnose.direction_probe`: one sample per object symbol of each probed clip's symbolic video (cell, colour),
    one per clip at the answer position, and one where the mover is in the last frame; an accuracy per layer (the
    embeddings and each layer) for each probe."""
    from transformers import AutoModelForCausalLM

    from train.diagnose import direction_probe
    from train.world import asked_questions

    model = AutoModelForCausalLM.from_pretrained(symbolic_llm).eval()
    tok = load_tokenizer(symbolic_llm)
    clips = load_clips(world)["train"]
    report = direction_probe(model, tok, clips[:16], clips[16:], seed=0)
    moving = [(k, spec) for k, spec in enumerate(clips[:16])
              if list(asked_questions(spec, np.random.default_rng([0, 47, k]), ("direction",)))]
    symbols = sum(t > len(tok) for _, spec in moving for t in S.symbolic_video(spec, len(tok)))
    assert moving and report["n"]["cell"][0] == report["n"]["colour"][0] == symbols
    assert report["n"]["answer"][0] == len(moving) >= report["n"]["moved_token"][0]
    layers = model.config.num_hidden_layers + 1
    for name in ("cell", "colour", "moved_token", "answer"):
        assert report[name] is None or (len(report[name]) == layers and all(0 <= v <= 1 for v in report[name]))


def test_part_lengths_recover_the_composed_parts_and_see_a_longer_cell_part():
    """`symbols.part_lengths` (in `diagnose lmprobe`): composed rows are fitted exactly; doubling the cell parts
    doubles the cells' spread, leaves the colours' alone, and sets two symbols in different cells further apart
    (a lower cosine), two of different colours closer; rows that are not sums leave a residual."""
    from train.stage0.symbols import ComposedSymbols, part_lengths

    symbols = ComposedSymbols(32, 0.5, seed=0)
    with torch.no_grad():
        base = part_lengths(symbols.rows())
        symbols.cell.mul_(2)
        longer = part_lengths(symbols.rows())
    assert base["residual"] < 1e-3 and longer["residual"] < 1e-3
    assert longer["cell"]["spread"] == pytest.approx(2 * base["cell"]["spread"], rel=0.01)
    assert longer["colour"]["spread"] == pytest.approx(base["colour"]["spread"], rel=0.01)
    assert longer["cell"]["cos_other"] < base["cell"]["cos_other"]
    assert longer["colour"]["cos_other"] > base["colour"]["cos_other"]
    assert part_lengths(torch.randn_like(symbols.rows()))["residual"] > 0.5
