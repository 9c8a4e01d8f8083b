"""The benchmark script runs (tiny sizes) and reports every number the README promises."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_benchmark_quick_reports_everything(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench.py", "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["matmul_peak_gflops"] > 0
    for kind in ("ours", "latte"):
        assert r["dit_step"][kind]["gflop_per_step"] > 0 and 0 < r["dit_step"][kind]["mfu"] < 1.5
    assert r["dit_step"]["speed_ratio_ours_over_latte"] > 0
    assert set(r["training"]) == {"cache_off", "cache_auto", "cache_speedup"}
    assert 0 <= r["training"]["cache_auto"]["data_wait_fraction"] <= 1
    assert set(r["memory_MiB"]) == {"with_checkpointing", "without_checkpointing"}
    c = r["conditioning_step"]
    assert c["text_over_class"] == pytest.approx(c["text"]["sec_per_step"] / c["class"]["sec_per_step"])
    assert c["text"]["params_M"] > c["class"]["params_M"] and "text / class" in proc.stdout
    assert {"ddim_10", "dpm++_10"} <= set(r["sampling_sec_per_video"])
    assert "speed: ours over latte " in proc.stdout and "ours_no_qk_norm over latte" in proc.stdout
    assert "ours_rope over latte" in proc.stdout
    t = r["text_encoding"]
    assert set(t["encoders"]) == {"tiny"} and t["captions"] > 0  # --quick: the demo's encoder only
    assert "text encoder tiny " in proc.stdout and f"{t['captions']} captions cached once in " in proc.stdout


def test_text_encoding_row_compares_the_cache_with_encoding_every_step(capsys):
    """bench.py's caption-cache row at quick size: the demo's captions cached once vs the
    tiny encoder run on every step's batch; the ratios are those of the measured times."""
    import torch

    from benchmarks.bench import bench_text_encoding, print_text_encoding
    from data.builtin import MovingShapes
    from utils.config import TrainRunConfig, load_config
    t = bench_text_encoding(True, torch.device("cpu"), 2)
    cfg = load_config(TrainRunConfig, os.path.join(ROOT, "config_t2v_demo.yaml"), ["data.builtin.num_clips=16"])
    captions = {*cfg.validation.prompts, *(c for split in ("train", "val")
                                           for c in MovingShapes(cfg.data, split).distinct_captions())}
    assert (t["captions"], t["batch"], t["steps"]) == (len(captions), cfg.train.batch_size, cfg.train.max_steps)
    e = t["encoders"]["tiny"]
    assert e["width"] == 64 and e["max_length"] == 32 and e["once_s"] > 0 and e["lookup_per_step_s"] > 0
    assert e["per_step_ratio"] == pytest.approx(e["encode_per_step_s"] / e["lookup_per_step_s"])
    assert e["run_encode_s"] == pytest.approx(t["steps"] * e["encode_per_step_s"])
    assert e["run_ratio"] == pytest.approx(e["run_encode_s"] / (e["once_s"] + t["steps"] * e["lookup_per_step_s"]))
    print_text_encoding(t)
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(rf"text encoder tiny \([\d.]+M params, 32 tokens of 64\): {len(captions)} captions cached "
                        rf"once in [\d.]+ s; per step \(batch 8\) encoding [\d.]+ ms vs cache lookup [\d.]+ ms "
                        rf"\(\d+x\); over the demo's 12000 steps [\d.]+ s encoding every step vs [\d.]+ s cached "
                        rf"\(\d+x; the cache pays off after \d+ steps\)", line), line


def test_real_size_option_reports_throughput_and_mfu(tmp_path):
    """`--real-size` (DiT-B/2 on 16 x 32 x 32 latents, for a GPU; --quick shrinks it here)."""
    out = tmp_path / "real.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench.py", "--real-size", "--quick", "--device", "cpu",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    tokens = r["size"]["batch"] * r["size"]["frames"] * (r["size"]["latent"] // 2) ** 2
    assert r["tokens_per_s"] == pytest.approx(tokens / r["sec_per_step"]) and 0 < r["mfu"] < 1.5
    assert "samples/s" in proc.stdout and "tokens/s" in proc.stdout and "MFU" in proc.stdout
    from benchmarks.bench import REAL
    assert REAL == dict(hidden=768, depth=12, heads=12, frames=16, latent=32, batch=8)  # DiT-B/2 sizes


@pytest.mark.slow
def test_vae_benchmark_prints_tokens_and_ratio(capsys):
    """Per-frame vs 4x temporal VAE at equal pixels (quick sizes: 9 frames of 32x32)."""
    import importlib.util

    import torch
    spec = importlib.util.spec_from_file_location("vae_bench", os.path.join(ROOT, "benchmarks", "vae_bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.run(quick=True, device=torch.device("cpu"))
    assert r["per_frame"]["latent_shape"] == [8, 9, 4, 4] and r["temporal_4x"]["latent_shape"] == [8, 3, 4, 4]
    assert (r["per_frame"]["tokens_per_clip"], r["temporal_4x"]["tokens_per_clip"]) == (36, 12)
    assert r["token_ratio"] == 3.0 and r["speed_ratio"] > 0
    bench.print_row(r)
    assert "3.00x fewer tokens" in capsys.readouterr().out


@pytest.mark.slow
def test_data_benchmark_prints_every_ratio(tmp_path):
    """benchmarks/data_bench.py at quick sizes: every row of the README, with its ratio."""
    out = tmp_path / "data.json"
    proc = subprocess.run([sys.executable, "benchmarks/data_bench.py", "--quick", "--files", "40",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    for row in ("pipeline_vs_raw", "first_vs_last", "random_windows", "long_gop", "stage2_no_cache"):
        assert r[row]["ratio"] > 0, row
    assert r["index"]["files"] == 40 and r["index"]["cold_s"] > 0 and r["index"]["warm_s"] > 0
    for text in ("pipeline vs raw PyAV", "last/first", "long/short", "end/start", "short/long", "index 40 files"):
        assert text in proc.stdout, text


def test_bucket_benchmark_quick_reports_speed_and_coherence_per_shape(tmp_path):
    """benchmarks/bucket_bench.py --quick: the speed ratio and data wait of buckets against one
    shape, and coherence per shape (every bucket; the fixed run at its clips' shapes)."""
    out = tmp_path / "buckets.json"
    proc = subprocess.run([sys.executable, "benchmarks/bucket_bench.py", "--quick", "--rounds", "1",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert len(r["throughput"]["ratio_steps_per_s"]) == 1 and r["throughput"]["ratio_steps_per_s"][0] > 0
    assert all(0 <= x["data_wait_fraction"] < 1 for x in r["throughput"]["rounds"]["buckets"])
    coherent = r["quality"]["coherent"]
    assert set(coherent["buckets"]) == {"16x24x4", "16x16x4", "24x16x4", "16x24x1", "16x16x1", "24x16x1"}
    assert set(coherent["fixed"]) == {"16x24x4", "16x16x4", "24x16x4"}
    assert "buckets / fixed: steps/s" in proc.stdout and r["matmul_gflops"] > 0


def test_time_to_quality_quick_scores_each_recipe(tmp_path):
    """benchmarks/time_to_quality.py --quick with two v-prediction recipes (two learning rates,
    one sampled with another sampler): evaluations at steps 2 and 4, the first reaching of each
    target, and the table."""
    out = tmp_path / "ttq.json"
    proc = subprocess.run([sys.executable, "benchmarks/time_to_quality.py", "--quick",
                           "--recipe", "fast:train.lr=1e-3", "--recipe", "slow:train.lr=3e-4,predict.sampler=ddim",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["steps"] == 4 and r["videos"] == 2 and r["targets"] == [1, 2] and set(r["recipes"]) == {"fast", "slow"}
    for name, rec in r["recipes"].items():
        evals = rec["evaluations"]
        assert [e["steps"] for e in evals] == [2, 4] and all(e["videos"] == 2 for e in evals)
        assert [e["checkpoint_step"] for e in evals] == [2, 4]  # each chunk stops where it should
        assert all(0 <= e["coherent"] <= 2 for e in evals) and 0 < evals[0]["minutes"] < evals[1]["minutes"]
        for k in ("1", "2"):
            hit = rec["reached"][k]
            first = next((e for e in evals if e["coherent"] >= int(k)), None)
            assert hit == (first and {"steps": first["steps"], "minutes": first["minutes"]})
        assert rec["steps_per_s"] > 0
    assert r["recipes"]["slow"]["evaluations"][0]["sampler"] == "ddim"
    assert r["recipes"]["fast"]["evaluations"][0]["sampler"] == "ddpm"  # predict_advanced.yaml's
    assert r["recipes"]["slow"]["train_overrides"] == ["train.lr=3e-4", "validation.sampler=ddim"]  # follows predict
    assert "fast (train.lr=1e-3): " in proc.stdout and "2/2 coherent: " in proc.stdout


@pytest.mark.parametrize("args, words", [
    (["--recipe", "no colon"], "write it as name:key=value"),
    (["--recipe", "x:foo"], "'foo' is not key=value"),
    (["--recipe", "a:train.lr=1e-3", "--recipe", "a:train.lr=3e-4"], "names must differ"),
    (["--recipe", "a:train.lr=1e-3", "--every", "0"], "--every = 0: must be >= 1"),
])
def test_time_to_quality_bad_arguments_exit_2(args, words, capsys):
    """A mistyped recipe or count: the message and exit status 2 (a user error), before any work."""
    from benchmarks.time_to_quality import main
    from utils.cli import run_main
    with pytest.raises(SystemExit) as e:
        run_main(lambda argv: main(["--quick", *args]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and "Traceback" not in err, err


def test_time_to_quality_interleaved_recipe_trains_as_it_would_alone(tmp_path):
    """Chunks of one step, alternating with another recipe, give bitwise the checkpoint of one
    uninterrupted train_advanced.py run (data position, own noise and global RNG streams)."""
    import torch

    import train_advanced
    from benchmarks.time_to_quality import QUICK_TRAIN, main, parse_recipe
    from utils.checkpoint import load_checkpoint
    runs = tmp_path / "ttq"
    assert main(["--quick", "--recipe", "a:train.lr=1e-3", "--recipe", "b:train.lr=3e-4,model.qk_norm=false",
                 "--steps", "3", "--chunk", "1", "--every", "3", "--videos", "1", "--runs-dir", str(runs)]) == 0
    assert train_advanced.main(["--config", os.path.join(ROOT, "config_advanced.yaml"), *QUICK_TRAIN,
                                f"vae.path={runs / 'random_vae'}", f"experiment.runs_dir={tmp_path}",
                                "experiment.name=alone", "train.max_steps=3", "train.time_limit_minutes=null",
                                "validation.every_epochs=0", "train.lr=1e-3", "device=cpu"]) == 0
    chunked, alone = (load_checkpoint(str(p / "latest.pth")) for p in (runs / "a", tmp_path / "alone"))
    assert chunked["step"] == alone["step"] == 3
    for part in ("model_state", "ema_state"):
        for k, v in alone[part].items():
            assert torch.equal(chunked[part][k], v), (part, k)
    assert parse_recipe("x:train.betas=[0.9,0.99],predict.num_steps=20").train == ["train.betas=[0.9,0.99]"]
