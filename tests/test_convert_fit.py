"""The recipe's `fit` field and `convert --fit`: validation, what the written recipe
records, that both fits give files of identical size, that a resume never mixes fits,
and that the ETA accounts for the slower fit."""

import json

import pytest

from moequant import cli, convert_pipeline
from moequant import convert as convert_mod
from moequant import progress as progress_mod
from moequant.convert import convert
from moequant.plan import make_plan
from moequant.recipes import PRESETS, RecipeError, load_recipe


def run(*args):
    return cli.main(["convert", *map(str, args), "--quiet"])


@pytest.mark.parametrize(
    "rule,message",
    [
        ({"match": "*", "bits": 3, "group_size": 64, "fit": "lsq"}, "fit must be one of"),
        ({"match": "*", "bits": 3, "group_size": 64, "fit": 1}, "fit must be one of"),
        ({"match": "*", "keep": True, "fit": "mse"}, "'keep' excludes bits, group_size and fit"),
    ],
)
def test_bad_fit_in_a_recipe_is_refused(tmp_path, rule, message):
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"rules": [rule]}))
    with pytest.raises(RecipeError, match=message):
        load_recipe(str(f))


def test_bad_fit_flag_is_exit_2(ckpt, tmp_path, capsys):
    src = ckpt("kimi_k2", layers=2)
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", "--hf-path", str(src), "--mlx-path", str(tmp_path / "o"), "--fit", "lsq"])
    assert e.value.code == 2 and "--fit" in capsys.readouterr().err
    with pytest.raises(RecipeError, match="--fit 'lsq'"):
        convert(src, tmp_path / "o", "alis-3.6", fit="lsq", progress=False)
    assert not (tmp_path / "o").exists()


def test_mse_preset_has_alis_allocation_and_identical_size(ckpt):
    """alis-3.6-mse: alis-3.6's bits, groups and layers, fit mse on the routed experts
    (min-max elsewhere, like the int4-native reference), and exactly the same bytes."""
    assert [
        dict(r, fit="mse") if "switch_mlp" in r["match"] else r for r in PRESETS["alis-3.6"]["rules"]
    ] == PRESETS["alis-3.6-mse"]["rules"]
    src = ckpt("kimi_k25", layers=5)
    a, b = make_plan(src, "alis-3.6"), make_plan(src, "alis-3.6-mse")
    assert a.bytes == b.bytes
    for path, d in a.resolution.decisions.items():
        e = b.resolution.decisions[path]
        assert (d is None) == (e is None)
        if d is not None:
            want = "mse" if "switch_mlp" in path else "minmax"
            assert (d.bits, d.group_size, d.fit, e.fit) == (e.bits, e.group_size, "minmax", want)


def test_recipe_file_records_the_fit_and_fit_flag_overrides(ckpt, tmp_path):
    """--fit minmax turns alis-3.6-mse back into alis-3.6: the same shards byte for byte,
    and the recipe file and config say minmax."""
    src = ckpt("kimi_k25", layers=3)
    convert(src, tmp_path / "a", "alis-3.6", progress=False)
    convert(src, tmp_path / "b", "alis-3.6-mse", fit="minmax", progress=False)
    for out in ("a", "b"):
        rec = json.loads((tmp_path / out / "moequant_recipe.json").read_text())
        assert rec["fit"] == ["minmax"]
        quantized = [m for m in rec["modules"].values() if m != "unquantized"]
        assert quantized and all(m["fit"] == "minmax" for m in quantized)
        cfg = json.loads((tmp_path / out / "config.json").read_text())
        assert cfg["moequant"]["fit"] == ["minmax"]
    shards = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in (tmp_path / "b").glob("*.safetensors"))
    for name in shards:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_int4_native_records_no_fit(ckpt):
    """A lossless repack has no fit to record."""
    src = ckpt("kimi_k2", layers=2)
    res = make_plan(src, "int4-native")
    experts = [d for p, d in res.resolution.decisions.items() if "switch_mlp" in p]
    assert experts and all(d.repack for d in experts)
    assert all("fit" not in d.record() and d.record()["repacked_int4"] for d in experts)


def test_resume_refuses_to_mix_fits(ckpt, tmp_path, monkeypatch, capsys):
    """An unfinished minmax conversion is not finished with the mse fit (nor the other
    way round): exit 2 naming both fits, and nothing in DST is touched."""
    src = ckpt("kimi_k25", layers=5)
    dst = tmp_path / "out"
    real, calls = convert_pipeline.finish_shard, []

    def flaky(fd, tmp, path):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(path)
        return real(fd, tmp, path)

    monkeypatch.setattr(convert_pipeline, "finish_shard", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert(src, dst, "alis-3.6", progress=False, max_shard_bytes=300_000)
    monkeypatch.undo()
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    journal = json.loads(before[convert_mod.JOURNAL])
    assert journal["fit"] == ["minmax"] and journal["done"]
    args = ["--hf-path", src, "--mlx-path", dst]
    assert run(*args, "--fit", "mse") == 2
    err = capsys.readouterr().err
    assert "made with fit minmax" in err and "asks for mse" in err
    assert run(*args, "--recipe", "alis-3.6-mse") == 2
    assert "made with fit minmax" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    again = convert(src, dst, "alis-3.6", progress=False, max_shard_bytes=300_000)
    assert again.units_skipped == len(journal["done"])  # the same fit resumes


def test_eta_counts_mse_bytes_at_their_own_rate(monkeypatch):
    """Minmax bytes measured at 1 GB/s; before any mse piece is timed, mse bytes are
    assumed MSE_COST_PRIOR times slower; once timed, their measured rate is used."""
    now = [0.0]
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: now[0])
    bar = convert_mod.progress_bar({"minmax": 10**9, "mse": 10**9}, enabled=False)
    now[0] = 0.5
    bar.update(5 * 10**8, "minmax")
    prior = convert_mod.MSE_COST_PRIOR
    assert bar.eta() == pytest.approx(0.5 + prior * 1.0)
    now[0] = 1.0
    bar.update(5 * 10**8, "minmax", force=True)
    now[0] = 3.0  # mse at 0.125 GB/s
    bar.update(25 * 10**7, "mse")
    assert bar.eta() == pytest.approx(75 * 10**7 / 0.125e9)


# ------------------------------------------------------------------ builds with the mse fit


def _exact_errors(src, out, prefix=""):
    """(layer, proj) -> [relative Frobenius error per expert] of the build's stored values
    against the exact INT4 source, in float64 numpy (codes unpacked by mlx, everything
    after in float64)."""
    import mlx.core as mx
    import numpy as np

    from convert_oracle import load_dir
    from int4_reference import dequantize_exact

    S, O = load_dir(src), load_dir(out)
    errs = {}
    for key in O:
        if ".switch_mlp." not in key or not key.endswith(".scales"):
            continue
        base = key[: -len(".scales")]
        layer, proj = int(base.split(".layers.")[1].split(".")[0]), base.split(".")[-1]
        wq, s, b = O[base + ".weight"], O[key], O[base + ".biases"]
        k = s.shape[-1] * 64  # alis-3.6: group 64
        bits = wq.shape[-1] * 32 // k
        q = np.array(
            mx.dequantize(
                wq,
                mx.ones_like(s, dtype=mx.float32),
                mx.zeros_like(s, dtype=mx.float32),
                group_size=64,
                bits=bits,
            )
        ).astype(np.float64)
        sc = np.repeat(np.array(s.astype(mx.float32)).astype(np.float64), 64, axis=-1)
        bi = np.repeat(np.array(b.astype(mx.float32)).astype(np.float64), 64, axis=-1)
        w_hat = q * sc + bi
        row = []
        for e in range(wq.shape[0]):
            p = f"{prefix}model.layers.{layer}.mlp.experts.{e}.{proj}"
            w = np.array(dequantize_exact(S[p + ".weight_packed"], S[p + ".weight_scale"], 32)).astype(
                np.float64
            )
            row.append(np.linalg.norm(w_hat[e] - w) / np.linalg.norm(w))
        errs[(layer, proj)] = row
    return errs


@pytest.fixture(scope="module")
def mse_builds(tmp_path_factory):
    from moequant.testing import make_checkpoint

    root = tmp_path_factory.mktemp("fit")
    src = make_checkpoint(root / "src", "kimi_k2", layers=4, seed=5)
    convert(src, root / "minmax", "alis-3.6", progress=False)
    convert(src, root / "mse", "alis-3.6-mse", progress=False)
    convert(src, root / "all", "alis-3.6", fit="mse", progress=False)
    return root


def test_mse_build_same_size_lower_error_and_loads_in_mlx_lm(mse_builds):
    """Identical file sizes, tensor for tensor; every expert tensor's error at most
    min-max's and, over each (layer, projection), clearly lower; stock mlx-lm loads the
    build (no moequant import) and generates."""
    import subprocess
    import sys

    import mlx.core as mx

    from convert_oracle import load_dir

    a, b = mse_builds / "minmax", mse_builds / "mse"
    sa = {p.name: p.stat().st_size for p in a.glob("*.safetensors")}
    assert sa == {p.name: p.stat().st_size for p in b.glob("*.safetensors")}
    ta, tb = load_dir(a), load_dir(b)
    assert {k: (v.shape, v.dtype) for k, v in ta.items()} == {k: (v.shape, v.dtype) for k, v in tb.items()}
    rec = json.loads((b / "moequant_recipe.json").read_text())
    assert rec["fit"] == ["minmax", "mse"] and rec["recipe"] == "alis-3.6-mse"
    ea, eb = _exact_errors(mse_builds / "src", a), _exact_errors(mse_builds / "src", b)
    assert ea.keys() == eb.keys() and len(ea) == 9
    for key in ea:
        assert all(y <= x * (1 + 1e-6) for x, y in zip(ea[key], eb[key])), key
        assert sum(eb[key]) < 0.95 * sum(ea[key]), (key, sum(ea[key]), sum(eb[key]))
    # The preset leaves the 6-bit bf16 modules min-max; --fit mse fits them too.
    attn = "model.layers.1.self_attn.q_a_proj"
    assert bool(mx.array_equal(ta[attn + ".scales"], tb[attn + ".scales"]).item())
    tc = load_dir(mse_builds / "all")
    assert not bool(mx.array_equal(ta[attn + ".scales"], tc[attn + ".scales"]).item())
    assert json.loads((mse_builds / "all" / "moequant_recipe.json").read_text())["fit"] == ["mse"]
    code = (
        "import sys, mlx_lm; from mlx_lm.sample_utils import make_sampler; "
        f"m, t = mlx_lm.load({str(b)!r}); "
        "out = mlx_lm.generate(m, t, 'The quick', max_tokens=4, sampler=make_sampler(temp=0.0)); "
        "print('generated', len(t.encode(out))); assert 'moequant' not in sys.modules"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "generated" in r.stdout, r.stderr


def test_inspect_reports_the_exact_error_of_an_mse_build(mse_builds, capsys):
    """inspect --source on an mse build: the error of the stored values (float64 oracle)
    and the fit, from the recipe file."""
    from moequant.inspect_model import expert_errors

    oracle = _exact_errors(mse_builds / "src", mse_builds / "mse")
    rep = expert_errors(mse_builds / "mse", mse_builds / "src")
    for r in rep["per_layer_proj"]:
        assert r["fit"] == "mse"
        assert r["per_expert"] == pytest.approx(oracle[(r["layer"], r["proj"])], rel=1e-5)
    assert cli.main(["inspect", str(mse_builds / "mse"), "--source", str(mse_builds / "src")]) == 0
    out = capsys.readouterr().out
    assert "fit: mse (from moequant_recipe.json)" in out and "3b mse " in out


def test_auto_ranks_layers_by_the_error_of_the_fit_used(mse_builds, tmp_path):
    """With the mse fit, auto measures each candidate layer at 3-bit mse: the loss of a
    layer left at 3 bits equals the relative squared error of what the build stores
    there (all 8 experts sampled), and is below the min-max loss of the same layer."""
    import numpy as np

    from convert_oracle import load_dir
    from int4_reference import dequantize_exact

    src = mse_builds / "src"
    S = load_dir(src)
    mm = convert(src, tmp_path / "mm", "alis-3.6", upgrade_layers="auto", progress=False)
    ms = convert(src, tmp_path / "ms", "alis-3.6-mse", upgrade_layers="auto", progress=False)
    (d_mm, loss_mm), (d_ms, loss_ms) = mm.resolution.auto_losses[2], ms.resolution.auto_losses[2]
    assert (d_mm.fit, d_ms.fit) == ("minmax", "mse") and loss_mm.keys() == loss_ms.keys()
    assert all(loss_ms[l] < loss_mm[l] for l in loss_mm)
    for fit, res, out in (("minmax", mm, tmp_path / "mm"), ("mse", ms, tmp_path / "ms")):
        errs = _exact_errors(src, out)
        chosen = res.resolution.selected[2]
        for layer, loss in res.resolution.auto_losses[2][1].items():
            if layer in chosen:
                continue
            # relative squared error over all experts: sum ||dW||^2 / sum ||W||^2
            p = f"model.layers.{layer}.mlp.experts.{{}}.down_proj"
            norms = [
                float(
                    np.sum(
                        np.array(
                            dequantize_exact(
                                S[p.format(e) + ".weight_packed"], S[p.format(e) + ".weight_scale"], 32
                            )
                        ).astype(np.float64)
                        ** 2
                    )
                )
                for e in range(8)
            ]
            rel = errs[(layer, "down_proj")]
            want = sum(r * r * n for r, n in zip(rel, norms)) / sum(norms)
            assert loss == pytest.approx(want, rel=1e-4), (fit, layer)
