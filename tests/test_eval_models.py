"""`moequant eval` end to end on tiny DeepSeek-V3 models quantized by mlx-lm itself."""

import gc
import json
import weakref

import mlx.core as mx
import numpy as np
import pytest

from moequant import evaluate as ev
from moequant.cli import main
from moequant.errors import UserError
from moequant.testing.tiny_mlx import make_tiny_model, quantize_tiny, write_tokenizer

SEQ, NS = 64, 4
BITS = (8, 6, 4, 3, 2)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    ref = make_tiny_model(root / "ref", seed=0, scale=8.0)
    out = {"root": root, "ref": ref}
    for b in BITS:
        out[b] = quantize_tiny(ref, root / f"q{b}", b)
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import load_model

    pred = mixed_quant_predicate_builder("mixed_3_6", load_model(ref)[0])
    out["mixed_3_6"] = quantize_tiny(ref, root / "mixed_3_6", 3, quant_predicate=pred)
    return out


def run_eval(models, build, tmp_path, **kw):
    kw = {"seq_len": SEQ, "num_samples": NS, "cache_dir": str(tmp_path / "cache"), "progress": False, **kw}
    return ev.evaluate(str(models["ref"]), str(models[build] if build in models else build), **kw)


def test_a_build_against_itself_has_zero_kl(models, tmp_path):
    r = ev.evaluate(
        str(models[3]),
        str(models[3]),
        seq_len=SEQ,
        num_samples=NS,
        cache_dir=str(tmp_path / "c"),
        progress=False,
    )
    assert abs(r["kl"]["mean"]) < 1e-6 and r["kl"]["max"] < 1e-5
    assert r["flips"]["count"] == 0
    assert r["positions"] == NS * (SEQ - 1)


def test_more_bits_less_kl_and_deterministic(models, tmp_path):
    reports = {b: run_eval(models, b, tmp_path, top_k=128) for b in BITS}
    kl = [reports[b]["kl"]["mean"] for b in BITS]
    flips = [reports[b]["flips"]["rate"] for b in BITS]
    assert kl[0] > 0
    assert all(a < b for a, b in zip(kl, kl[1:])), kl
    assert flips[0] < flips[2] < flips[3] < flips[4], flips
    # Only the first run computed the reference; the rest reused its cache.
    assert [reports[b]["cache"]["reused"] for b in BITS] == [False, True, True, True, True]
    again = run_eval(models, 3, tmp_path, top_k=128, cache_dir=str(tmp_path / "fresh"))
    assert not again["cache"]["reused"]
    for key in ("kl", "flips", "perplexity"):
        assert again[key] == reports[3][key]
    # mlx-lm's mixed_3_6 recipe (6-bit head and some down_proj) lands between 4 and 3 bits.
    mixed = run_eval(models, "mixed_3_6", tmp_path, top_k=128)["kl"]["mean"]
    assert reports[4]["kl"]["mean"] < mixed < reports[3]["kl"]["mean"]
    other_seed = run_eval(models, 3, tmp_path, seed=1, cache_dir=str(tmp_path / "seed1"))
    assert other_seed["kl"]["mean"] != reports[3]["kl"]["mean"]


def test_cached_path_equals_side_by_side_on_real_models(models, tmp_path):
    from mlx_lm.utils import load_model, load_tokenizer

    r = run_eval(models, 3, tmp_path, top_k=32, fused=False)  # the oracle runs mlx-lm's paths
    tok = load_tokenizer(models["ref"])
    windows = ev.make_windows(ev.load_documents(None, tok), tok, SEQ, NS, seed=0)
    direct = ev.summarize(
        ev.compare_side_by_side(load_model(models["ref"])[0], load_model(models[3])[0], windows, 32)
    )
    for key in ("kl", "flips"):
        assert r[key] == pytest.approx(direct[key], rel=1e-6, abs=1e-9), key
    for key in ("reference", "build"):
        assert r["perplexity"][key] == pytest.approx(direct["perplexity"][key], rel=1e-6), key


def test_reference_is_released_before_the_build_is_loaded(models, tmp_path):
    loaded = []

    def loader(path, fused=False):
        gc.collect()
        # Every model loaded before must be gone by now, memory included.
        assert all(ref() is None for ref, _ in loaded), "an earlier model is still alive"
        for _, before in loaded:
            assert mx.get_active_memory() <= before + (1 << 20)
        before = mx.get_active_memory()
        model = ev.load_model(path)
        loaded.append((weakref.ref(model), before))
        return model

    run_eval(models, 4, tmp_path, loader=loader)
    assert len(loaded) == 2  # the reference, then the build
    gc.collect()
    assert loaded[1][0]() is None


def test_topk_kl_is_below_full_vocab_kl(models, tmp_path):
    small = run_eval(models, 3, tmp_path, top_k=8, cache_dir=str(tmp_path / "k8"))
    full = run_eval(models, 3, tmp_path, top_k=512, cache_dir=str(tmp_path / "kfull"))
    assert 0 < small["kl"]["mean"] < full["kl"]["mean"]
    # A flip compares the build's own probabilities, so it does not depend on k.
    assert small["flips"]["count"] == full["flips"]["count"]


def test_chat_jsonl_directory_and_text_data(models, tmp_path):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(models["ref"])
    msgs = [
        {"role": "user", "content": "def fibonacci(n): " * 20},
        {"role": "assistant", "content": "for i in range(10): yield i * i " * 20},
    ]
    jl = tmp_path / "chat.jsonl"
    jl.write_text("\n".join(json.dumps({"messages": msgs}) for _ in range(3)) + "\n")
    docs = ev.load_documents(str(jl), tok)
    assert len(docs) == 3 and docs[0][1]() == tok.apply_chat_template(msgs, tokenize=False)
    w = ev.make_windows(docs, tok, SEQ, 2, seed=0)
    assert w.shape == (2, SEQ)
    expect = tok.encode(docs[0][1](), add_special_tokens=False)[:SEQ]
    np.testing.assert_array_equal(w[0], expect)

    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "a.py").write_text("import os\n" * 200)
    (d / "sub" / "b.txt").write_text("hello, world\n" * 200)
    assert [n for n, _ in ev.load_documents(str(d), tok)] == [str(d / "a.py"), str(d / "sub" / "b.txt")]
    r = run_eval(models, 4, tmp_path, data=str(d), num_samples=3)
    assert r["data"]["windows"] == 3 and r["kl"]["mean"] > 0
    # Short data: fewer windows than asked for, said so in the table.
    short = run_eval(
        models, 4, tmp_path, data=str(d / "a.py"), num_samples=50, cache_dir=str(tmp_path / "short")
    )
    n = len(tok.encode("import os\n" * 200, add_special_tokens=False)) // SEQ
    assert short["data"]["windows"] == n < 50
    assert f"only {n} of the 50 requested" in ev.format_report(short)


def _cli(*argv):
    return main(["eval", "--seq-len", str(SEQ), "--num-samples", "2", "--no-progress", *argv])


def test_cli_writes_table_and_json(models, tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = _cli(
        "--ref",
        str(models["ref"]),
        "--model",
        str(models[3]),
        "--cache",
        str(tmp_path / "c"),
        "--output",
        str(out),
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "KL(ref||build) mean" in text and "top-1 flip rate" in text
    report = json.loads(out.read_text())
    assert report["kl"]["mean"] > 0 and report["positions"] == 2 * (SEQ - 1)
    assert "lower bound" in report["definitions"]["kl"]
    assert report["definitions"]["near_tie_threshold"] == 0.1


def test_bad_input_is_exit_2_naming_the_argument(models, tmp_path, capsys):
    ref, q3 = str(models["ref"]), str(models[3])
    cases = []
    assert _cli("--ref", str(tmp_path / "nope"), "--model", q3) == 2
    cases.append("--ref")
    # A build with another tokenizer.
    other = tmp_path / "other_tok"
    other.mkdir()
    for f in models[3].iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    write_tokenizer(other, vocab_size=300)
    assert _cli("--ref", ref, "--model", str(other), "--cache", str(tmp_path / "c0")) == 2
    cases.append("tokenizer differs")
    # seq-len larger than the data.
    small = tmp_path / "small.txt"
    small.write_text("import os\n")
    assert _cli("--ref", ref, "--model", q3, "--data", str(small)) == 2
    cases.append("is larger than --data")
    # A cache made for another reference, then for other data.
    cache = str(tmp_path / "c1")
    assert _cli("--ref", ref, "--model", q3, "--cache", cache) == 0
    assert _cli("--ref", str(models[4]), "--model", q3, "--cache", cache) == 2
    cases.append("another reference model")
    assert _cli("--ref", ref, "--model", q3, "--cache", cache, "--seed", "5") == 2
    cases.append("other data")
    assert _cli("--ref", ref, "--model", q3, "--cache", cache, "--top-k-cache", "7") == 2
    cases.append("holds top-")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\n{"foo": 1}\n')
    assert _cli("--ref", ref, "--model", q3, "--data", str(bad)) == 2
    cases.append(f"{bad}:2")
    err = capsys.readouterr().err
    for c in cases:
        assert c in err, c


def test_fused_patches_the_reference_and_the_build(models, tmp_path, monkeypatch):
    import moequant

    patched = []

    def patch(model, **kw):
        assert kw == {}  # everything: MoE blocks, linear layers, MLA attention
        patched.append(model)

    monkeypatch.setattr(moequant, "patch", patch, raising=False)
    r = run_eval(models, 3, tmp_path)  # fused by default
    assert len(patched) == 2 and r["fused"] is True
    assert not hasattr(patched[0].lm_head, "scales")  # the float reference first
    assert hasattr(patched[1].lm_head, "scales")  # then the quantized build
    assert json.loads((tmp_path / "cache" / "meta.json").read_text())["fused"] is True
    patched.clear()
    assert run_eval(models, 3, tmp_path, fused=False, cache_dir=str(tmp_path / "c2"))["fused"] is False
    assert patched == []
    monkeypatch.delattr(moequant, "patch")
    with pytest.raises(UserError, match="--fused"):
        run_eval(models, 3, tmp_path, cache_dir=str(tmp_path / "c3"))


@pytest.mark.parametrize("bits", [4, 3])
def test_fused_report_equals_mlx_lm_paths(models, tmp_path, bits):
    """float32 models: with moequant.patch (eval's windows run moe_prefill in every MoE
    layer of the build) the report equals mlx-lm's own paths' within float32 noise."""
    fused = run_eval(models, bits, tmp_path, cache_dir=str(tmp_path / "f"))
    plain = run_eval(models, bits, tmp_path, fused=False, cache_dir=str(tmp_path / "p"))
    for key in ("mean", "median", "max"):
        assert fused["kl"][key] == pytest.approx(plain["kl"][key], rel=1e-4, abs=1e-8), key
    assert fused["flips"]["count"] == plain["flips"]["count"]
    for who in ("reference", "build"):
        assert fused["perplexity"][who]["ppl"] == pytest.approx(plain["perplexity"][who]["ppl"], rel=1e-6)


def test_progress_bar_on_stderr(models, tmp_path, capsys):
    assert (
        main(
            [
                "eval",
                "--seq-len",
                str(SEQ),
                "--num-samples",
                "2",
                "--ref",
                str(models["ref"]),
                "--model",
                str(models[2]),
                "--cache",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "reference [" in err and "build     [" in err and "2/2" in err
