"""Checkpoint I/O: resolving sources (directory, builtin, a fake Hugging Face cache), validation messages for
every kind of bad checkpoint, the atomic shard writer, inspect_checkpoint."""

import json
import os

import pytest
import torch
from conftest import TINY, hub_state_dict, write_checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

from mixtral_quant import checkpoint as ck
from mixtral_quant.checkpoint import CheckpointError, CheckpointReader, ShardWriter, resolve_config, resolve_source
from mixtral_quant.config import ConfigError, MixtralConfig


@pytest.mark.parametrize("style", [4, 5])
def test_reader_validates_a_good_checkpoint(tmp_path, style):
    path = write_checkpoint(tmp_path / "src", config_style=style)
    with CheckpointReader(path) as r:
        r.validate_source()
        assert set(r.keys()) == set(ck.expected_shapes(r.config))
        assert len(r.shards()) == 3
        assert r.config.rope_theta == TINY["rope_theta"] and r.config.dtype == "bfloat16"
        dtype, shape = r.info("model.layers.1.block_sparse_moe.experts.7.w2.weight")
        assert dtype == torch.bfloat16 and shape == (TINY["hidden_size"], TINY["intermediate_size"])


def test_single_file_checkpoint(tmp_path):
    path = write_checkpoint(tmp_path / "src", shards=1)
    with CheckpointReader(path) as r:
        r.validate_source()
        assert r.shards() == ["model.safetensors"]


def test_expected_shapes_match_the_random_hub_state_dict():
    sd = hub_state_dict(TINY)
    shapes = ck.expected_shapes(MixtralConfig.from_dict({"model_type": "mixtral", **TINY}))
    assert shapes == {k: tuple(v.shape) for k, v in sd.items()}
    assert {ck.tensor_class(k) for k in sd} == set(ck.TENSOR_CLASSES)


# ---- bad checkpoints: one-line message naming the file --------------------------------------------------------

def _shard(path, k=2):
    return os.path.join(path, f"model-{k:05d}-of-00003.safetensors")


def _edit_index(path, fn):
    f = os.path.join(path, ck.INDEX_NAME)
    with open(f) as fh:
        idx = json.load(fh)
    fn(idx["weight_map"])
    with open(f, "w") as fh:
        json.dump(idx, fh)


def bad_missing_path(tmp_path):
    return str(tmp_path / "nope"), "no such directory"


def bad_model_type(tmp_path):
    p = write_checkpoint(tmp_path / "src")
    conf = json.load(open(os.path.join(p, "config.json")))
    conf["model_type"] = "llama"
    json.dump(conf, open(os.path.join(p, "config.json"), "w"))
    return p, "model_type is 'llama', expected 'mixtral'"


def bad_pickles_only(tmp_path):
    p = tmp_path / "src"
    p.mkdir()
    (p / "config.json").write_text(json.dumps({"model_type": "mixtral", **TINY}))
    (p / "pytorch_model.bin").write_bytes(b"not loaded")
    return str(p), "only pickle weights (pytorch_model.bin)"


def bad_truncated(tmp_path):
    p = write_checkpoint(tmp_path / "src")
    data = open(_shard(p), "rb").read()
    open(_shard(p), "wb").write(data[: len(data) // 2])
    return p, "model-00002-of-00003.safetensors: truncated or corrupt"


def bad_corrupt_header(tmp_path):
    p = write_checkpoint(tmp_path / "src")
    open(_shard(p, 1), "wb").write(b"\xff" * 64)
    return p, "model-00001-of-00003.safetensors: truncated or corrupt"


def bad_missing_shard(tmp_path):
    p = write_checkpoint(tmp_path / "src")
    os.remove(_shard(p, 3))
    return p, "model-00003-of-00003.safetensors: listed in model.safetensors.index.json but missing"


def bad_escaping_index(tmp_path):
    p = write_checkpoint(tmp_path / "src")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "evil.safetensors"))
    _edit_index(p, lambda wm: wm.update({"model.norm.weight": "../evil.safetensors"}))
    return p, "shard path '../evil.safetensors' leaves the checkpoint directory"


def bad_absolute_index(tmp_path):
    p = write_checkpoint(tmp_path / "src")
    _edit_index(p, lambda wm: wm.update({"model.norm.weight": "/etc/passwd"}))
    return p, "shard path '/etc/passwd' leaves the checkpoint directory"


def bad_shape(tmp_path):
    sd = hub_state_dict(TINY)
    sd["model.layers.1.block_sparse_moe.experts.3.w2.weight"] = torch.zeros(64, 95, dtype=torch.bfloat16)
    p = write_checkpoint(tmp_path / "src", state_dict=sd)
    return p, "model.layers.1.block_sparse_moe.experts.3.w2.weight has shape [64, 95], config.json expects [64, 96]"


def bad_missing_tensor(tmp_path):
    sd = hub_state_dict(TINY)
    del sd["model.layers.0.self_attn.k_proj.weight"]
    return write_checkpoint(tmp_path / "src", state_dict=sd), "'model.layers.0.self_attn.k_proj.weight' is missing"


def bad_extra_tensor(tmp_path):
    sd = hub_state_dict(TINY)
    sd["model.layers.0.mlp.extra.weight"] = torch.zeros(3, dtype=torch.bfloat16)
    return write_checkpoint(tmp_path / "src", state_dict=sd), "unexpected tensor 'model.layers.0.mlp.extra.weight'"


def bad_index_lies(tmp_path):
    p = write_checkpoint(tmp_path / "src")
    _edit_index(p, lambda wm: wm.update({"model.ghost.weight": wm["model.norm.weight"]}))
    return p, "listed in model.safetensors.index.json are not in this file (first: 'model.ghost.weight')"


BAD = [bad_missing_path, bad_model_type, bad_pickles_only, bad_truncated, bad_corrupt_header, bad_missing_shard,
       bad_escaping_index, bad_absolute_index, bad_shape, bad_missing_tensor, bad_extra_tensor, bad_index_lies]


@pytest.mark.parametrize("case", BAD, ids=lambda f: f.__name__)
def test_bad_checkpoints_are_refused_by_name(tmp_path, case):
    path, message = case(tmp_path)
    with pytest.raises((CheckpointError, ConfigError)) as e:
        with CheckpointReader(resolve_source(path)) as r:
            r.validate_source()
    assert message in str(e.value)
    assert "\n" not in str(e.value)


# ---- resolving sources ------------------------------------------------------------------------------------------

def _fake_hub_cache(cache, repo, files: dict[str, bytes]) -> str:
    """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<commit>/<files>}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    return str(snap)


def test_repo_id_resolves_from_the_offline_cache(tmp_path, monkeypatch):
    src = write_checkpoint(tmp_path / "src")
    files = {f: open(os.path.join(src, f), "rb").read() for f in os.listdir(src)}
    snap = _fake_hub_cache(tmp_path / "hf" / "hub", "someorg/Mixtral-tiny", files)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = resolve_source("someorg/Mixtral-tiny")
    assert os.path.samefile(path, snap)
    with CheckpointReader(path) as r:
        r.validate_source()
    assert resolve_config("someorg/Mixtral-tiny").hidden_size == TINY["hidden_size"]


def test_repo_id_not_in_the_offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"someorg/absent: not a local directory and not found in the local "
                                              r"Hugging Face cache \(HF_HUB_OFFLINE=1\)"):
        resolve_source("someorg/absent")
    with pytest.raises(CheckpointError, match="someorg/absent: not a local directory"):
        resolve_config("someorg/absent")
    assert not os.path.exists(tmp_path / "empty" / "models--someorg--absent" / "snapshots")


def test_allow_download_false_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(CheckpointError, match="not found in the local Hugging Face cache"):
        resolve_source("someorg/absent", allow_download=False)


def test_builtin_and_paths(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match=r"builtin:no-such-model: no embedded model at .*no-such-model"):
        resolve_source("builtin:no-such-model")
    f = tmp_path / "file.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file; pass the checkpoint directory"):
        resolve_source(str(f))
    with pytest.raises(CheckpointError, match=r"\./missing/dir: no such directory"):
        resolve_source("./missing/dir")
    d = write_checkpoint(tmp_path / "ok")
    assert resolve_source(d) == os.path.abspath(d)
    # a builtin is a directory inside the package: point the package's data dir at a tmp one
    data = tmp_path / "pkg" / "data"
    write_checkpoint(data / "tiny-mixtral", shards=1)
    monkeypatch.setattr(ck.os.path, "abspath", lambda p, _real=os.path.abspath: (
        str(tmp_path / "pkg" / "checkpoint.py") if p == ck.__file__ else _real(p)))
    assert resolve_source("builtin:tiny-mixtral") == str(data / "tiny-mixtral")


def test_resolve_config_known_name_and_file(tmp_path):
    assert resolve_config("Mixtral-8x7B-v0.1").intermediate_size == 14336
    p = write_checkpoint(tmp_path / "src", config_style=5)
    assert resolve_config(os.path.join(p, "config.json")).rope_theta == TINY["rope_theta"]
    with pytest.raises(CheckpointError, match="not a known model"):
        resolve_config("Mixtral-9x9B")


# ---- writing ---------------------------------------------------------------------------------------------------

def _tensors(n, size=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"t{i:02d}": torch.randn(size, generator=g) for i in range(n)}


def test_shard_writer_splits_names_and_indexes(tmp_path):
    ts = _tensors(10)  # 4000 bytes each
    out = tmp_path / "out"
    with ShardWriter(str(out), max_shard_bytes=9000) as w:
        for k, v in ts.items():
            w.add({k: v})
        w.write_json("config.json", {"a": 1})
        assert w.max_buffered_bytes <= 9000
        assert not out.exists()  # nothing visible before finish()
        w.finish()
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the temporary sibling is gone
    idx = json.load(open(out / ck.INDEX_NAME))
    shards = sorted(set(idx["weight_map"].values()))
    assert shards == [ck.shard_name(k, 5) for k in range(1, 6)]
    assert idx["metadata"]["total_size"] == sum(v.numel() * 4 for v in ts.values())
    for k, v in ts.items():
        with safe_open(str(out / idx["weight_map"][k]), "pt") as f:
            assert torch.equal(f.get_tensor(k), v)
    assert os.path.getsize(out / shards[0]) < 9000 + 1000  # data + a small header


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_shard_writer_leaves_nothing_on_failure(tmp_path, exc):
    with pytest.raises(exc):
        with ShardWriter(str(tmp_path / "out"), max_shard_bytes=5000) as w:
            for k, v in _tensors(5).items():
                w.add({k: v})
            raise exc("boom")
    assert os.listdir(tmp_path) == []


def test_shard_writer_output_appears_complete(tmp_path, monkeypatch):
    """finish() moves the directory into place with one rename, once every shard and the index are written: at
    that rename the directory already holds all of them, each shard with its tensors."""
    ts = _tensors(7)  # 4000 bytes each: 4 shards of at most 2
    out = str(tmp_path / "out")
    at_rename = {}
    real_rename = os.rename

    def rename(a, b):
        if os.path.abspath(b) == out:
            idx = json.load(open(os.path.join(a, ck.INDEX_NAME)))
            at_rename["files"] = sorted(os.listdir(a))
            at_rename["tensors"] = {}
            for shard in set(idx["weight_map"].values()):
                with safe_open(os.path.join(a, shard), "pt") as f:
                    at_rename["tensors"].update({k: f.get_tensor(k) for k in f.keys()})
        return real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with ShardWriter(out, max_shard_bytes=9000) as w:
        for k, v in ts.items():
            w.add({k: v})
        w.write_json("config.json", {"a": 1})
        w.finish()
    assert at_rename["files"] == sorted([ck.INDEX_NAME, "config.json", *(ck.shard_name(k, 4) for k in range(1, 5))])
    assert at_rename["tensors"].keys() == ts.keys()
    assert all(torch.equal(at_rename["tensors"][k], v) for k, v in ts.items())


@pytest.mark.parametrize("exc", [OSError, KeyboardInterrupt])
def test_interrupted_finish_leaves_no_output(tmp_path, monkeypatch, exc):
    """The last shard is written inside finish(): a failure there (disk full, Ctrl-C) leaves no output directory
    and no temporary one."""
    import safetensors.torch

    real_save, calls = safetensors.torch.save_file, []

    def save_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:  # the third and last shard, written by finish()
            raise exc("interrupted")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(exc):
        with ShardWriter(str(tmp_path / "out"), max_shard_bytes=9000) as w:
            for k, v in _tensors(5).items():  # shards of 2 + 2 + 1 tensors
                w.add({k: v})
            assert len(calls) == 2
            w.finish()
    assert len(calls) == 3 and os.listdir(tmp_path) == []


def test_shard_writer_output_dir_rules(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="out: output directory exists and is not empty; .*--overwrite"):
        ShardWriter(str(out))
    assert (out / "mine.txt").read_text() == "keep me" and sorted(os.listdir(tmp_path)) == ["out"]
    with ShardWriter(str(out), overwrite=True) as w:
        w.add({"x": torch.ones(3)})
        w.finish()
    assert sorted(os.listdir(out)) == [ck.shard_name(1, 1), ck.INDEX_NAME]
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not a directory"):
        ShardWriter(str(f), overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    with ShardWriter(str(empty)) as w:
        w.add({"x": torch.ones(3)})
        w.finish()
    assert ck.INDEX_NAME in os.listdir(empty)


def test_inspect_source_checkpoint(tiny_checkpoint):
    info = ck.inspect_checkpoint(tiny_checkpoint)
    sd = hub_state_dict(TINY)
    assert info["tensors"] == len(sd) and info["shards"] == 3 and info["quantization_config"] is None
    assert info["total"]["params"] == sum(v.numel() for v in sd.values())
    assert info["total"]["bytes"] == 2 * info["total"]["params"]
    L, E = TINY["num_hidden_layers"], TINY["num_local_experts"]
    assert info["classes"]["experts"]["count"] == 3 * L * E
    assert {c["format"] for c in info["classes"].values()} == {"bf16"}
