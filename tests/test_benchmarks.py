"""The benchmark scripts run end to end at toy size and write their JSON; their correctness checks hold.

No timing assertions: speed is what the scripts measure, on real sizes, not what a test on a noisy machine asserts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY_VIDEO = ["--tiny", "--seconds", "2", "--size", "64x48", "--fps", "10"]


def run_bench(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               MPLBACKEND="Agg")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_bench_pipeline_runs_and_both_pipelines_give_the_same_ids(tmp_path):
    out_json, out_md = tmp_path / "pipeline.json", tmp_path / "pipeline.md"
    run = run_bench("bench_pipeline.py", *TINY_VIDEO, "--max-new-tokens", "8", "--json", str(out_json),
                    "--md", str(out_md))
    result = json.loads(out_json.read_text())
    assert result["same_token_ids"] is True and "same token ids: first yes, follow-up yes" in run.stdout
    for side in ("ours", "reference"):
        first, follow = result[side]["answers"]
        assert len(first["token_ids"]) == len(follow["token_ids"]) == 8
        assert set(first) >= {"decode", "preprocess", "vision", "connector", "prefill", "generation",
                              "tokens_per_s", "end_to_end"}
        assert result[side]["peak_rss_mb"] > 0
    assert result["ours"]["answers"][1]["cached_video"] is True  # the follow-up skipped decode and the tower
    assert result["ours"]["answers"][1]["vision"] == 0.0
    assert {"first_answer_speedup", "follow_up_speedup", "peak_rss_ratio"} <= set(result)
    assert "| stage (s) |" in out_md.read_text()


def test_bench_zeroing_runs_and_the_full_point_is_the_unmodified_answer(tmp_path):
    out_json = tmp_path / "zeroing.json"
    run_bench("bench_zeroing.py", *TINY_VIDEO, "--max-new-tokens", "6", "--json", str(out_json))
    result = json.loads(out_json.read_text())
    assert result["points"] == 6 * 3 * 4
    assert result["full_point_equals_answer"] is True
    assert result["ours_full_point_ok"] and result["from_scratch_full_point_ok"]
    assert len(result["from_scratch_changed"]) == result["points"]
    assert result["speedup"] > 0


def test_bench_fullsize_estimate_counts_the_published_shapes(tmp_path):
    out_json = tmp_path / "fullsize.json"
    run = run_bench("bench_fullsize.py", "--json", str(out_json))
    result = json.loads(out_json.read_text())
    params = result["estimate"]["params"]
    assert 3.0e9 < params["language_model"] < 3.2e9  # Qwen2.5-3B with tied embeddings counted once
    assert 4.0e8 < params["vision_tower"] < 4.5e8  # SigLIP-so400m
    assert 3.5e9 < params["total"] < 3.8e9
    modes = {r["mode"] for r in result["estimate"]["rows"]}
    assert modes == {"reference fp32", "fp32", "bf16", "8bit", "4bit"}
    rows = {r["mode"]: r for r in result["estimate"]["rows"] if r["frames"] == 16}
    assert rows["fp32"]["weights_gib"] > rows["bf16"]["weights_gib"] > rows["8bit"]["weights_gib"] > \
        rows["4bit"]["weights_gib"]
    assert "ESTIMATE" in run.stdout and "skipped" in run.stdout


def test_bench_fullsize_runs_on_cpu_at_toy_size(tmp_path):
    out_json = tmp_path / "fullsize_tiny.json"
    run = run_bench("bench_fullsize.py", "--tiny", "--run-cpu", "--cuda", "--frames", "4", "--new-tokens", "4",
                    "--json", str(out_json))
    result = json.loads(out_json.read_text())
    (cpu_run,) = result["cpu"]["runs"]
    assert cpu_run["frames"] == 4 and cpu_run["new_tokens"] == 4 and cpu_run["ttft_s"] > 0
    # the precision load_model would choose (a toy model: fp32), and every CPU figure names the CPU
    assert result["cpu"]["precision"]["name"] == "fp32"
    cpu = result["machine"]["cpu"]
    assert result["cpu"]["cpu"] == cpu and " thread" in cpu
    assert run.stdout.startswith(f"machine: {cpu}")
    assert f"time to first token at 4 frames: {cpu_run['ttft_s']:.1f} s in fp32 on {cpu}" in run.stdout
    if "cuda" in result and "skipped" in result["cuda"]:
        assert "torch.cuda.is_available() is False" in run.stdout


def test_bench_startup_serves_http_200(tmp_path):
    out_json = tmp_path / "startup.json"
    run_bench("bench_startup.py", "--tiny", "--runs", "1", "--model-wait", "0", "--json", str(out_json))
    result = json.loads(out_json.read_text())
    assert result["median_ready_s"] is not None and result["runs"][0]["ready_s"] > 0


def test_bench_fullsize_weight_formula_matches_what_bitsandbytes_stores(tmp_path):
    """The estimate's weight bytes per precision against the storage of a model really quantized (toy size)."""
    from tests.test_quantize import _bitsandbytes_problem

    problem = _bitsandbytes_problem()
    if problem:
        pytest.skip(problem)
    out_json = tmp_path / "weights.json"
    run_bench("bench_fullsize.py", "--tiny", "--measure-weights", "--json", str(out_json))
    result = json.loads(out_json.read_text())
    measured = {r["mode"]: r["bytes"] for r in result["weights_measured"]}
    assert set(measured) == {"bf16", "8bit", "4bit"}
    assert measured["bf16"] > measured["8bit"] > measured["4bit"]
    estimated = {r["mode"]: r["estimated_bytes"] for r in result["weights_measured"]}
    for mode, actual in measured.items():
        # 4-bit: bitsandbytes' code tables (about 1 KiB per layer) are not in the formula; 1.3 % at toy size
        assert 0.999 < actual / estimated[mode] < 1.02, (mode, actual, estimated[mode])
    int8 = result["int8_layers_measured"]  # torch's packed int8 layers, counted as the RSS they add
    assert 0.9 < int8["measured_bytes_per_layer"] / int8["estimated_bytes_per_layer"] < 1.1, int8


@pytest.mark.skipif(not (ROOT / "assets" / "models" / "group" / "config.json").is_file(),
                    reason="the load test serves the embedded models")
def test_bench_load_serves_hostile_and_normal_clients_within_its_goals(tmp_path):
    """A short run of the load test: the server as a Space starts it, three sessions mixing normal and hostile
    requests. The script exits 0 only when every goal holds (alive, no traceback to a client, no failed request,
    RSS under 2 GiB, cancelled jobs' slots freed within 1 s)."""
    out_json = tmp_path / "load.json"
    run = run_bench("bench_load.py", "--sessions", "3", "--seconds", "15", "--json", str(out_json), timeout=600)
    result = json.loads(out_json.read_text())
    outcomes = {r["outcome"] for r in result["results"]}
    assert {"served", "refused"} <= outcomes and "failed" not in outcomes, run.stdout[-2000:]
    assert all(result["goals"].values()) and result["peak_rss_mb"] < 2048


def test_bench_finetune_measures_full_lora_and_qlora(tmp_path):
    """Each mode trains (the loss falls on its repeated batch); LoRA trains fewer LLM parameters than full
    fine-tuning and keeps fewer gradient / AdamW bytes; QLoRA stores the LLM's weights in fewer bytes than LoRA."""
    out_json = tmp_path / "finetune.json"
    run_bench("bench_finetune.py", "--steps", "2", "--batch", "2", "--json", str(out_json))
    data = json.loads(out_json.read_text())
    full, lora, qlora = data["full"], data["lora"], data["qlora"]
    assert all(r["losses"][-1] < r["losses"][0] and r["step_s"] > 0 and r["peak_rss_mb"] >= r["rss_loaded_mb"]
               for r in (full, lora, qlora))
    assert lora["trainable"]["language_model"] == qlora["trainable"]["language_model"] < \
        full["trainable"]["language_model"]
    assert lora["grads_adamw_mb"] < full["grads_adamw_mb"]
    assert qlora["lm_weights_mb"] < 0.5 * lora["lm_weights_mb"]


def test_bench_train_step_times_the_parts_and_the_turns(tmp_path):
    """Each model's step, its connector's and LM's parts, and the same clips' two questions as turns of one
    sample, each measured; the turns samples do hold both questions of a clip."""
    out_json = tmp_path / "step.json"
    run_bench("bench_train_step.py", "--model", "group=assets/models/group", "--model", "topk=assets/models/topk",
              "--clips", "2", "--steps", "1", "--batch", "2", "--json", str(out_json))
    data = json.loads(out_json.read_text())
    for name in ("group", "topk"):
        r = data[name]
        assert r["questions_per_turns_sample"] == 2
        assert all(r[k] > 0 for k in ("step_s", "connector_s", "lm_s", "turns_step_s", "turns_questions_per_s"))


def test_bench_eval_compares_grouped_and_distributed_evaluation(tmp_path):
    """The grouped eval answers exactly as re-reading per question (the script asserts it), the two-process run
    merges to the one-process answers, and every rate is measured."""
    out_json = tmp_path / "eval.json"
    run_bench("bench_eval.py", "--limit", "8", "--zeroing-limit", "2", "--json", str(out_json))
    data = json.loads(out_json.read_text())
    assert data["questions"] == 8 and data["zeroing_points"] == 6 and data["same_answers"] is True
    assert all(data[k] > 0 for k in ("eval_grouped_s", "eval_each_s", "zeroing_s", "zeroing_each_s",
                                     "one_process_s", "two_processes_s"))


def test_bench_llm_attention_compares_the_analysis_with_an_answer(tmp_path):
    out_json = tmp_path / "llm.json"
    run_bench("bench_llm_attention.py", *TINY_VIDEO, "--max-new-tokens", "8", "--repeats", "1", "--json",
              str(out_json))
    data = json.loads(out_json.read_text())
    # the hooked arrays have the shapes the formula counts (every layer's hook ran, every head was kept)
    assert data["kept_bytes"] == data["kept_formula_bytes"] > 0 and data["answer_s"] > 0 and data["analysis_s"] > 0
    assert data["published_formula"]["sequence"] > 512  # the published model's 512 visual tokens and its text
