"""`mixq quantize / inspect / plan` through click's CliRunner: exit codes, one-line errors, --json that parses."""

import json
import os

import pytest
from click.testing import CliRunner
import torch
from conftest import TINY, hub_state_dict, write_checkpoint

from mixtral_quant.cli.main import cli
from mixtral_quant.plan import plan_memory
from mixtral_quant.config import MixtralConfig


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_line_error(r, code=1):
    assert r.exit_code == code, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mixq: error: "), r.output
    assert "Traceback" not in r.output
    return lines[0]


def test_quantize_inspect_roundtrip(tmp_path):
    src = write_checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    r = run("quantize", src, "-o", out, "--experts", "nf4", "--attention", "int8", "--device", "cpu",
            "--max-shard-size", "100KB", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["formats"] == {"attention": "int8", "experts": "nf4"} and d["output"] == str(out)
    assert d["bits_per_param"]["attention"] > 8  # int8 plus the fp32 row scales
    r = run("inspect", out, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["classes"]["attention"]["format"] == "int8" and info["classes"]["experts"]["format"] == "nf4"
    assert info["total"]["bytes"] == d["output_bytes"] and info["shards"] > 1
    r = run("inspect", out)
    assert r.exit_code == 0 and "experts" in r.output and "total" in r.output and "bits/param" in r.output


def test_quantize_summary_and_format_flag(tmp_path):
    src = write_checkpoint(tmp_path / "src", config_style=5)
    r = run("quantize", src, "-o", tmp_path / "out", "--format", "int8", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert f"wrote {tmp_path / 'out'}" in r.output and "attention int8, experts int8" in r.output
    r = run("quantize", src, "-o", tmp_path / "out", "--format", "int8")
    line = _one_line_error(r)
    assert "output directory exists and is not empty" in line and "--overwrite" in line
    r = run("quantize", src, "-o", tmp_path / "out", "--no-double-quant", "--blocksize", "128", "--overwrite",
            "--json")
    assert r.exit_code == 0, r.output
    with open(tmp_path / "out" / "config.json") as f:
        qc = json.load(f)["quantization_config"]
    assert qc["blocksize"] == 128 and qc["double_quant"] is False and qc["formats"]["experts"] == "nf4"


@pytest.mark.parametrize("args, message", [
    (["quantize", "{tmp}/missing", "-o", "{tmp}/out"], "missing: no such directory"),
    (["quantize", "-o", "{tmp}/out", "builtin:nothing-here"], "builtin:nothing-here: no embedded model"),
    (["quantize", "{src}", "-o", "{tmp}/out", "--max-shard-size", "big"], "size 'big' not understood"),
    (["inspect", "{src}/config.json"], None),
    (["plan", "Mixtral-1x1B"], "not a known model"),
    (["plan", "Mixtral-8x7B-v0.1", "--gpu-memory", "lots"], "size 'lots' not understood"),
    (["plan", "Mixtral-8x7B-v0.1", "--blocksize", "48"], "blocksize must be a power of two"),
])
def test_errors_are_one_line(tmp_path, args, message):
    src = write_checkpoint(tmp_path / "src")
    r = run(*[a.format(tmp=tmp_path, src=src) for a in args])
    if message is None:  # click's own usage error (a file where a directory is expected): exit 2
        assert r.exit_code == 2 and "Traceback" not in r.output
    else:
        assert message in _one_line_error(r)
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_quantize_shape_mismatch_exits_1_and_writes_nothing(tmp_path):
    """A weight whose shape disagrees with config.json: through the CLI, one line, exit 1, no output."""
    sd = hub_state_dict(TINY)
    sd["model.layers.1.block_sparse_moe.experts.3.w2.weight"] = torch.zeros(64, 95, dtype=torch.bfloat16)
    src = write_checkpoint(tmp_path / "src", state_dict=sd)
    r = run("quantize", src, "-o", tmp_path / "out", "--device", "cpu")
    line = _one_line_error(r)
    assert "experts.3.w2.weight has shape [64, 95], config.json expects [64, 96]" in line
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_usage_errors_exit_2(tmp_path):
    r = run("quantize", "-o", tmp_path / "o", "--format", "nf3")
    assert r.exit_code == 2 and "nf3" in r.output
    r = run("quantize", tmp_path)  # -o is required
    assert r.exit_code == 2 and "--output" in r.output
    r = run("plan", "--context", "0")
    assert r.exit_code == 2


def test_plan_json_and_text():
    r = run("plan", "Mixtral-8x7B-v0.1", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    ref = plan_memory(MixtralConfig.from_name("Mixtral-8x7B-v0.1"))
    assert d["weights_bytes"] == ref.weights_bytes and d["total_bytes"] == ref.total_bytes
    assert d["fits"] is None and {"kv_cache_bytes", "offload"} <= set(d)
    r = run("plan", "Mixtral-8x7B-v0.1", "--gpu-memory", "24GB", "--context", "8192", "--batch", "2", "--json")
    d = json.loads(r.output)
    assert d["fits"] is False and d["offload"]["experts_per_layer_on_host"] >= 1 and d["context"] == 8192
    r = run("plan", "Mixtral-8x7B-v0.1", "--gpu-memory", "24GB")
    o = json.loads(run("plan", "Mixtral-8x7B-v0.1", "--gpu-memory", "24GB", "--json").output)["offload"]
    lo, hi = min(o["slots_per_layer"]), max(o["slots_per_layer"])
    slots = str(lo) if lo == hi else f"{lo}-{hi}"
    assert r.exit_code == 0 and f"does not fit in 24.00 GB: {slots} of 8 experts per layer in device slots" in r.output
    assert f"({o['host_bytes'] / 1e9:.2f} GB pinned)" in r.output and o["host_bytes"] > 0
    r = run("plan", "Mixtral-8x7B-v0.1", "--gpu-memory", "40GB", "--format", "nf4")
    assert r.exit_code == 0 and "fits in 40.00 GB" in r.output and "24.48 GB" in r.output


def test_plan_reads_a_directory_and_an_offline_repo_id(tmp_path, monkeypatch):
    src = write_checkpoint(tmp_path / "src")
    r = run("plan", src, "--json", "--context", "128")
    assert r.exit_code == 0, r.output
    experts = json.loads(r.output)["class_params"]["experts"]
    assert experts == 2 * 8 * 3 * TINY["hidden_size"] * TINY["intermediate_size"]
    # a repo id: only config.json is needed, from the (fake) cache when offline
    commit = "a" * 40
    root = tmp_path / "hub" / "models--org--tiny"
    (root / "snapshots" / commit).mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    (root / "snapshots" / commit / "config.json").write_bytes((tmp_path / "src" / "config.json").read_bytes())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = run("plan", "org/tiny", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["class_params"] == json.loads(run("plan", src, "--json").output)["class_params"]
    assert "not found in the local Hugging Face cache" in _one_line_error(run("plan", "org/other"))


def test_help_teaches():
    for cmd in ("quantize", "inspect", "plan"):
        r = run(cmd, "--help")
        assert r.exit_code == 0 and "Examples:" in r.output and f"mixq {cmd}" in r.output


def test_plan_of_a_packed_checkpoint_uses_its_formats(tmp_path):
    from mixtral_quant.quantize import quantize

    src = write_checkpoint(tmp_path / "src", shards=2)
    out = quantize(src, str(tmp_path / "q"), experts="int8", attention="bf16", progress=False).output
    r = run("plan", out, "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    cfg = MixtralConfig.from_dict({"model_type": "mixtral", **TINY})
    want = plan_memory(cfg, experts="int8", attention="bf16")
    assert got["weights_bytes"] == want.weights_bytes and got["formats"] == {"attention": "bf16", "experts": "int8"}
    # explicit flags still win over the checkpoint's recipe
    r = run("plan", out, "--format", "nf4", "--json")
    assert json.loads(r.output)["weights_bytes"] == plan_memory(cfg, experts="nf4", attention="nf4").weights_bytes
