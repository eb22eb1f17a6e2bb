"""visualizations/: every figure renders to PNG, SVG and PDF; data writers; the `python -m visualizations` command
writes PNG + JSON + CSV for attention, redundancy and budget, and PNG + JSON for a compressor's picture, on tiny
checkpoints."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from vidlmm.analysis import (ZeroingResult, attention_maps, connector_picture, connector_variants, redundancy_stats,
                             token_budget)
from visualizations import (plot_attention_heatmap, plot_connector_picture, plot_frame_overlays,
                            plot_redundancy_stats, plot_temporal_profile, plot_token_budget, plot_zeroing, save_figure,
                            write_data)
from visualizations.__main__ import main

MAGIC = {"png": b"\x89PNG", "pdf": b"%PDF"}
ROOT = Path(__file__).resolve().parent.parent


def assert_renders(fig, tmp_path, stem):
    assert isinstance(fig, Figure)
    for fmt in ("png", "svg", "pdf"):
        path = save_figure(fig, tmp_path / f"{stem}.{fmt}", dpi=60)
        data = path.read_bytes()
        assert len(data) > 1000
        assert data.startswith(MAGIC[fmt]) if fmt in MAGIC else b"<svg" in data[:2000]


@pytest.fixture(scope="module")
def maps(tiny_checkpoints, small_video):
    from vidlmm.checkpoint import load_model
    from vidlmm.pipeline import VideoLMM
    from vidlmm.video import FrameSampling

    out = {}
    for name in ("group", "naive"):
        lmm = VideoLMM(load_model(tiny_checkpoints[name], dtype="fp32", device="cpu"),
                       sampling=FrameSampling.uniform(16))
        out[name] = attention_maps(lmm, small_video)
    return out


COMPRESSORS = {  # connector_type -> (num_queries, connector_options): 4 output tokens per frame at 4 frames
    "llava_mini": (4, {"prefusion_layers": 1}),
    "pool": (64, {"token_budget": 16}),
    "tome": (64, {"frame_tokens": 4}),
    "topk": (64, {"frame_tokens": 4}),
}


@pytest.fixture(scope="module")
def compressors(tmp_path_factory):
    from vidlmm.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("compressors")
    return {name: write_tiny_checkpoint(root / name, name, seed=i, num_queries=q, connector_options=options)
            for i, (name, (q, options)) in enumerate(COMPRESSORS.items())}


@pytest.fixture(scope="module")
def pictures(compressors, small_video):
    from vidlmm.checkpoint import load_model
    from vidlmm.pipeline import VideoLMM
    from vidlmm.video import FrameSampling

    return {name: connector_picture(VideoLMM(load_model(folder, dtype="fp32", device="cpu"),
                                             sampling=FrameSampling.uniform(4)), small_video)
            for name, folder in compressors.items()}


def synthetic_result(name: str, kind: str = "likelihood") -> ZeroingResult:
    rng = np.random.default_rng(len(name))
    fractions, strategies, seeds = [1.0, 0.5, 0.25, 0.125], ["random", "contiguous", "groups", "even"], [0, 1, 2]
    points = []
    for s in strategies:
        for f in fractions:
            for seed in seeds:
                value = 1.0 if f == 1.0 else float(f ** 0.3 + (rng.normal(0, 0.03) if s == "random" else 0))
                metrics = {"likelihood": {"relative_likelihood": value, "delta_log_likelihood": np.log(value),
                                          "log_likelihood": -3 + np.log(value), "answer_changed": float(f < 0.5)},
                           "mc": {"accuracy": 0.6 * value, "relative_accuracy": value, "agreement": value}}[kind]
                points.append({"strategy": s, "fraction": f, "seed": seed, "active": f, "kept_tokens": int(64 * f),
                               **metrics})
    return ZeroingResult(name, fractions, strategies, seeds, points, kind=kind, reference={"n": 10})


# ---- figures --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["group", "naive"])
def test_attention_figures_render(maps, tmp_path, name):
    m = maps[name]
    assert_renders(plot_attention_heatmap(m), tmp_path, "heat")
    assert_renders(plot_attention_heatmap(m, layer=0, head=2, scale="log"), tmp_path, "heat_log")
    assert_renders(plot_frame_overlays(m, max_frames=6), tmp_path, "frames")
    assert_renders(plot_temporal_profile(m), tmp_path, "temporal")
    assert_renders(plot_redundancy_stats(redundancy_stats(m)), tmp_path, "redundancy")


def test_attention_figure_content(maps):
    m = maps["group"]
    fig = plot_attention_heatmap(m)
    ax = fig.axes[0]
    title = ax.get_title()
    assert "latent share" in title and "layer 3/3" in title and "mean of heads" in title
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[0] == f"f{m.frame_indices[0]}\n0.0 s" and len(labels) == 16  # frame number and time
    assert len(fig.axes) >= 2  # a colour bar
    assert "head 1" in plot_attention_heatmap(m, head=1).axes[0].get_title()
    overlays = plot_frame_overlays(m, query=5, max_frames=4)
    panels = [a for a in overlays.axes if a.get_title()]
    assert len(panels) == 4 and all(len(a.images) == 2 for a in panels)  # the frame and the map over it
    assert "query 5" in overlays._suptitle.get_text()
    assert "group 2" in plot_frame_overlays(m, group=2)._suptitle.get_text()
    many = plot_temporal_profile(maps["naive"])
    assert len(many.axes[0].get_lines()) == 1  # one group: one line
    with pytest.raises(ValueError):
        plot_attention_heatmap(m, scale="cubic")


@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_connector_pictures_render_one_look_per_kind(pictures, tmp_path, name):
    picture = pictures[name]
    fig = plot_connector_picture(picture, frames=3)
    assert_renders(fig, tmp_path, name)
    panels = [a for a in fig.axes if a.get_title()]
    title = fig._suptitle.get_text()
    assert all(a.images[0].get_array().shape == picture["frames"].shape[1:] for a in panels)  # the real frames
    assert [a.get_title() for a in panels[:1]] == ["f0 · 0.0 s" + (" · query 0" if name == "llava_mini" else "")]
    outlined = [[p for p in a.patches if not p.get_hatch()] for a in panels]
    if name == "llava_mini":  # frames x queries, each a map over the frame, with a colour bar
        assert len(panels) == 3 * 4 and all(len(a.images) == 2 for a in panels) and len(fig.axes) == 13
        assert "attention of each query" in title
    if name == "pool":  # the 2 x 2 bins drawn and numbered on each frame
        assert len(panels) == 3 and [len(p) for p in outlined] == [4] * 3
        assert [t.get_text() for t in panels[0].texts] == ["0", "1", "2", "3"] and "2 x 2" in title
    if name == "tome":  # merged regions painted (one RGBA layer) with borders between tokens
        assert len(panels) == 3 and all(len(a.images) == 2 and len(a.collections) == 1 for a in panels)
        assert title.startswith("tome: ToMe (reimplementation)")
    if name == "topk":  # the scores over the frame, the kept patches outlined
        assert len(panels) == 3 and [len(p) for p in outlined] == [4] * 3 and "scorer logit" in title
    assert all(len([p for p in a.patches if p.get_hatch()]) == 1 for a in panels)  # SigLIP's dropped patch
    one = [a for a in plot_connector_picture(picture, frames=1).axes if a.get_title()]
    assert len(one) == (4 if name == "llava_mini" else 1)  # one frame (of each query)


def test_zeroing_and_budget_figures(tmp_path, tiny_checkpoints):
    curves = {"naive": synthetic_result("naive"), "group": synthetic_result("group")}
    fig = plot_zeroing(curves)
    assert len(fig.axes[0].get_lines()) >= 8  # 2 connectors x 4 strategies (+ the reference line)
    assert "relative" in fig.axes[0].get_ylabel()
    assert_renders(fig, tmp_path, "zeroing")
    assert_renders(plot_zeroing([synthetic_result("a", "mc")], metric="accuracy", strategies=["random"]), tmp_path,
                   "zeroing_mc")
    assert_renders(plot_zeroing(synthetic_result("one")), tmp_path, "zeroing_one")
    with pytest.raises(ValueError):
        plot_zeroing(curves, metric="accuracy")
    from vidlmm.config import TinyLlavaConfig

    config = TinyLlavaConfig.from_json_file(Path(tiny_checkpoints["group"]) / "config.json")
    budget = token_budget(connector_variants(config), frames=(1, 4, 16, 64))
    fig = plot_token_budget(budget)
    assert len(fig.axes[0].get_lines()) == 4 + 1  # four settings + the context line
    assert_renders(fig, tmp_path, "budget")


def test_save_figure_rejects_unknown_formats(tmp_path):
    with pytest.raises(ValueError, match="png"):
        save_figure(Figure(), tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="json"):
        write_data({}, tmp_path / "x.txt")


# ---- data -----------------------------------------------------------------------------------------------------

def test_write_data(tmp_path, maps):
    result = synthetic_result("naive")
    write_data(result, tmp_path / "z.json")
    data = json.loads((tmp_path / "z.json").read_text())
    assert data["model"] == "naive" and len(data["points"]) == 48 and len(data["summary"]) == 16
    write_data(result, tmp_path / "z.csv")
    rows = list(csv.DictReader((tmp_path / "z.csv").open()))
    assert len(rows) == 48 and {"model", "strategy", "fraction", "seed", "relative_likelihood"} <= set(rows[0])
    stats = redundancy_stats(maps["naive"])
    write_data(stats, tmp_path / "r.json")
    r = json.loads((tmp_path / "r.json").read_text())  # strict JSON: NaN summaries became null
    assert r["summary"]["overlap_across_groups_mean"] is None and len(r["overlap"]) == 32
    write_data(stats, tmp_path / "r.csv")
    assert len(list(csv.DictReader((tmp_path / "r.csv").open()))) == 32
    write_data(maps["group"], tmp_path / "a.json")
    write_data(maps["group"], tmp_path / "a.csv")
    assert json.loads((tmp_path / "a.json").read_text())["num_frames"] == 16
    with pytest.raises(ValueError):
        write_data({"no": "rows"}, tmp_path / "bad.csv")


def test_exporter_writes_each_format_a_preview_and_rows_where_there_are_rows(tmp_path):
    """The one writer of the app's downloads and the CLI's folder: every format asked for, a PNG to show only
    when asked and PNG is not among them, CSV only for results with rows, names made safe, every path listed."""
    from visualizations import Exporter

    def figure():
        fig = Figure(figsize=(2, 2))
        fig.add_subplot().plot([0, 1], [1, 0])
        return fig

    out = Exporter(tmp_path / "a", ("svg", "pdf"), dpi=80, preview_dpi=40)
    shown, files = out.figure(figure(), "model/one: heat")
    assert [f.name for f in files] == ["model-one-heat.svg", "model-one-heat.pdf"]
    assert shown.name == "model-one-heat.png" and shown.read_bytes()[:4] == b"\x89PNG"
    assert files[0].read_text().lstrip().startswith("<?xml") and files[1].read_bytes()[:4] == b"%PDF"
    assert out.data({"no": "rows"}, "plain") == [tmp_path / "a" / "plain.json"]
    both = out.data({"rows": [{"x": 1}, {"x": 2}]}, "tab")
    assert [p.name for p in both] == ["tab.json", "tab.csv"] and len(list(csv.DictReader(both[1].open()))) == 2
    assert out.written == [shown, *files, tmp_path / "a" / "plain.json", *both]

    cli = Exporter(tmp_path / "b", ("png", "svg"), dpi=80)  # no preview: the PNG among the formats is the one
    shown, files = cli.figure(figure(), "zeroing")
    assert shown == files[0] and len(cli.written) == 2
    assert Exporter(tmp_path / "c", ("svg",)).figure(figure(), "x")[0] is None
    with pytest.raises(ValueError, match="png"):
        Exporter(tmp_path, ("jpg",))


def test_package_imports_no_torch():
    code = "import sys, visualizations; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


# ---- command line ---------------------------------------------------------------------------------------------

def test_cli_attention(tiny_checkpoints, small_video, tmp_path, capsys):
    out = tmp_path / "att"
    rc = main(["attention", "--model", str(tiny_checkpoints["group"]), "--video", small_video, "--out", str(out),
               "--num-frames", "8", "--scale", "log", "--group", "1", "--formats", "png", "svg", "--dpi", "60"])
    assert rc == 0
    for stem in ("attention_heatmap", "attention_frames", "attention_temporal", "attention_redundancy"):
        assert (out / f"{stem}.png").read_bytes().startswith(MAGIC["png"])
        assert (out / f"{stem}.svg").is_file()
    data = json.loads((out / "attention.json").read_text())
    assert data["num_frames"] == 8 and data["connector_type"] == "groupresampler"
    assert len(list(csv.DictReader((out / "attention.csv").open()))) == 4 * 8
    assert json.loads((out / "attention_redundancy.json").read_text())["summary"]["queries"] == 64
    assert (out / "attention_redundancy.csv").is_file()
    assert np.load(out / "attention.npz")["media"].shape == (3, 8, 64, 8 * 15)
    printed = capsys.readouterr().out.split()
    assert str(out / "attention_heatmap.png") in printed


def test_cli_picture(compressors, tiny_checkpoints, small_video, tmp_path, capsys):
    out = tmp_path / "pic"
    rc = main(["picture", "--model", str(compressors["pool"]), "--video", small_video, "--out", str(out),
               "--num-frames", "8", "--frames-shown", "2", "--formats", "png", "pdf", "--dpi", "60"])
    assert rc == 0
    assert (out / "picture.png").read_bytes().startswith(MAGIC["png"])
    assert (out / "picture.pdf").read_bytes().startswith(MAGIC["pdf"])
    data = json.loads((out / "picture.json").read_text())
    assert data["kind"] == "pooling_grid" and data["num_frames"] == 8 and data["pool_size"] == 1  # 16 // 8 -> 1
    assert "frames" not in data and "tokens" not in data and len(data["cell_token"]) == 8
    assert capsys.readouterr().out.split() == [str(out / "picture.png"), str(out / "picture.pdf"),
                                               str(out / "picture.json")]
    assert main(["picture", "--model", str(tiny_checkpoints["group"]), "--video", small_video,
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no picture of its own" in err and "\n" not in err


def test_cli_redundancy_one_video(tiny_checkpoints, small_video, tmp_path):
    out = tmp_path / "red"
    rc = main(["redundancy", "--model", str(tiny_checkpoints["group"]), "--model", str(tiny_checkpoints["naive"]),
               "--video", small_video, "--question", "What moves?", "--out", str(out), "--num-frames", "4",
               "--fractions", "1", "0.5", "0.25", "--seeds", "0", "1", "--max-new-tokens", "4", "--dpi", "60"])
    assert rc == 0
    assert (out / "zeroing.png").read_bytes().startswith(MAGIC["png"])
    data = json.loads((out / "zeroing.json").read_text())
    assert [r["model"] for r in data["results"]] == ["group", "naive"]
    assert len(list(csv.DictReader((out / "zeroing.csv").open()))) == 2 * 4 * 3 * 2
    assert len(list(csv.DictReader((out / "zeroing_summary.csv").open()))) == 2 * 4 * 3


def test_cli_redundancy_multiple_choice(tiny_checkpoints, tmp_path):
    from tests.videos import make_moving_square_frames, write_video

    write_video(tmp_path / "v.mp4", make_moving_square_frames(12, 48, 64), fps=10)
    items = [{"video": "v.mp4", "question": "Where does it go?", "options": ["left", "right"], "answer": "B"}]
    (tmp_path / "set.json").write_text(json.dumps(items))
    out = tmp_path / "mc"
    rc = main(["redundancy", "--model", str(tiny_checkpoints["naive"]), "--mc", str(tmp_path / "set.json"),
               "--video-root", str(tmp_path), "--out", str(out), "--num-frames", "4", "--fractions", "1", "0.25",
               "--strategies", "random", "even", "--seeds", "0", "--max-new-tokens", "2", "--dpi", "60"])
    assert rc == 0
    data = json.loads((out / "zeroing.json").read_text())["results"][0]
    assert data["kind"] == "mc" and data["reference"]["n"] == 1
    assert (out / "zeroing.png").is_file() and (out / "zeroing.csv").is_file()


def test_cli_budget(tiny_checkpoints, tmp_path):
    out = tmp_path / "budget"
    rc = main(["budget", "--model", str(tiny_checkpoints["group"]), "--with-connectors", "--frames", "1", "8", "64",
               "--out", str(out), "--formats", "png", "pdf"])
    assert rc == 0
    assert (out / "budget.png").is_file() and (out / "budget.pdf").read_bytes().startswith(MAGIC["pdf"])
    rows = json.loads((out / "budget.json").read_text())["rows"]
    names = {"group", "naive", "group (variant)", "image-level", "mlp", "llava-mini", "pool", "tome", "topk"}
    assert {r["name"] for r in rows} == names
    assert len(list(csv.DictReader((out / "budget.csv").open()))) == len(names) * 3
    pool = {r["frames"]: r["visual_tokens"] for r in rows if r["name"] == "pool"}
    assert pool[64] / 64 <= pool[8] / 8 <= pool[1]  # Dynamic-VLM: fewer tokens per frame as frames grow


def test_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "visualizations", "--help"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0 and all(c in proc.stdout for c in ("attention", "picture", "budget"))


@pytest.mark.parametrize("argv, fragment", [
    (["attention", "--video", "missing.mp4", "--out", "{tmp}"], "missing.mp4"),
    (["redundancy", "--out", "{tmp}"], "--video"),
    (["budget", "--out", "{tmp}", "--frames", "0"], "at least 1"),
    (["attention", "--out", "{tmp}"], "--video"),
    (["budget", "--out", "{tmp}", "--dpi", "1"], "dpi"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, fragment, tiny_checkpoints):
    argv = [a.replace("{tmp}", str(tmp_path / "o")) for a in argv] + ["--model", str(tiny_checkpoints["group"])]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and fragment in err
