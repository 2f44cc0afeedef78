"""Bad input is refused with a message naming the file / tensor / argument, exit code 2
(1 for write failures), and never leaves a DST that looks complete."""

import errno
import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from moequant import cli, convert_pipeline
from moequant import convert as convert_mod


@pytest.fixture
def src(ckpt, tmp_path):
    """A private, mutable copy of a tiny kimi_k25 checkpoint."""
    d = tmp_path / "src"
    shutil.copytree(ckpt("kimi_k25", layers=3), d)
    return d


def run(src, dst, *extra):
    return cli.main(["convert", "--hf-path", str(src), "--mlx-path", str(dst), "--quiet", *extra])


def edit_config(src, fn):
    path = src / "config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


def weights_of(cfg):
    return cfg["text_config"]["quantization_config"]["config_groups"]["group_0"]["weights"]


CONFIG_CASES = {
    "fp8": (lambda c: c["text_config"]["quantization_config"].update(format="float-quantized"), "FP8"),
    "asymmetric": (lambda c: weights_of(c).update(symmetric=False), "asymmetric"),
    "8-bit": (lambda c: weights_of(c).update(num_bits=8), "8-bit"),
    "group 16": (lambda c: weights_of(c).update(group_size=16), "group_size"),
    "no groups": (lambda c: c["text_config"]["quantization_config"].pop("config_groups"), "config_groups"),
    "contradictory": (
        lambda c: c.update(
            quantization_config={**c["text_config"]["quantization_config"], "format": "float-quantized"}
        ),
        "differs",
    ),
    "awq": (lambda c: c["text_config"]["quantization_config"].update(quant_method="awq"), "quant_method"),
    "model type": (lambda c: c.update(model_type="llama"), "model_type 'llama'"),
    "missing field": (lambda c: c["text_config"].pop("kv_lora_rank"), "kv_lora_rank"),
    "wrong group": (lambda c: weights_of(c).update(group_size=64), "weight_scale has shape"),
    "wrong dims": (lambda c: c["text_config"].update(moe_intermediate_size=256), "implies"),
    "no metadata": (lambda c: c["text_config"].pop("quantization_config"), "no quantization_config"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_refused_before_output(src, tmp_path, capsys, case):
    fn, needle = CONFIG_CASES[case]
    edit_config(src, fn)
    assert run(src, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert needle in err and ("config.json" in err or ".safetensors" in err), err
    assert not (tmp_path / "out").exists()


def test_truncated_shard_named(src, tmp_path, capsys):
    shard = sorted(src.glob("model-*.safetensors"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    assert run(src, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert shard.name in err and "truncated" in err and "tensor" in err
    assert not (tmp_path / "out").exists()


def test_tensor_missing_from_index_named(src, tmp_path, capsys):
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    missing = "language_model.model.layers.2.mlp.experts.5.up_proj.weight_scale"
    del data["weight_map"][missing]
    index.write_text(json.dumps(data))
    assert run(src, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert missing in err and "model.safetensors.index.json" in err


def test_index_lists_missing_file(src, tmp_path, capsys):
    shard = sorted(src.glob("model-*.safetensors"))[0]
    shard.unlink()
    assert run(src, tmp_path / "out") == 2
    assert shard.name in capsys.readouterr().err


def _rewrite(src, name, fn):
    """Rewrite one tensor of the shard holding it."""
    index = json.loads((src / "model.safetensors.index.json").read_text())
    path = src / index["weight_map"][name]
    tensors = mx.load(str(path))
    fn(tensors)
    mx.save_safetensors(str(path), tensors, metadata={"format": "pt"})
    return path


def test_zero_point_refused(src, tmp_path, capsys):
    name = "language_model.model.layers.1.mlp.experts.0.up_proj.weight_zero_point"
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    path = _rewrite(
        src, name.replace("zero_point", "scale"), lambda t: t.update({name: mx.zeros((128, 1), mx.int32)})
    )
    index["weight_map"][name] = path.name
    index_path.write_text(json.dumps(index))
    assert run(src, tmp_path / "out") == 2
    assert "asymmetric" in capsys.readouterr().err


def test_weight_shape_contradiction_named_and_dst_incomplete(src, tmp_path, capsys):
    name = "language_model.model.layers.2.mlp.experts.3.down_proj.weight_shape"
    path = _rewrite(src, name, lambda t: t.update({name: mx.array(np.array([256, 64], np.int32))}))
    dst = tmp_path / "out"
    assert run(src, dst) == 2
    err = capsys.readouterr().err
    assert name in err and path.name in err
    assert not (dst / "config.json").exists() and not (dst / "model.safetensors.index.json").exists()


def test_destination_exists(src, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    assert run(src, dst) == 2
    assert "already exists" in capsys.readouterr().err
    assert run(src, dst, "--overwrite") == 2  # not a model directory: never deleted
    assert (dst / "notes.txt").exists()


def test_bad_recipe(src, tmp_path, capsys):
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"rules": [{"match": "*", "bits": 7, "group_size": 64}]}))
    assert run(src, tmp_path / "out", "--recipe", str(bad)) == 2
    assert "bits must be one of" in capsys.readouterr().err
    assert run(src, tmp_path / "out", "--recipe", "nope") == 2
    assert run(src, tmp_path / "out", "--upgrade-layers", "0") == 2  # layer 0 is dense
    assert "have no matching module" in capsys.readouterr().err


def test_full_disk_during_write(src, tmp_path, capsys, monkeypatch):
    """A failing write (ENOSPC from the OS, simulated) names the shard and exits 1."""
    headers = []
    real = convert_pipeline.pwrite_all

    def failing(fd, data, offset):
        headers.extend([offset] if offset == 0 else [])  # a shard's header goes first
        if len(headers) == 2:  # the second shard
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(convert_pipeline, "pwrite_all", failing)
    dst = tmp_path / "out"
    assert run(src, dst) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "model-00002-of-" in err
    assert not (dst / "config.json").exists()
    assert not list(dst.glob(".partial-*"))


def test_not_enough_space_up_front(src, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        convert_mod.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6 - 1000, 1000)
    )
    assert run(src, tmp_path / "out") == 1
    assert "only 0.00 GB is free" in capsys.readouterr().err


def test_unreadable_shard_named(src, tmp_path, capsys):
    # Tests run as root, where permission bits do not stop reads: make it a directory.
    shard = sorted(src.glob("model-*.safetensors"))[2]
    shard.unlink()
    shard.mkdir()
    assert run(src, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert shard.name in err and "cannot read" in err
