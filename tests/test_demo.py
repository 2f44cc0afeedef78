from moequant import cli


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert cli.main(["demo", "--layers", "3", "--max-tokens", "3", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "0 mismatching" in out and "routed experts 3." in out
    assert "MoE blocks patched" in out and " 0 MoE blocks" not in out
    assert (tmp_path / "kimi-mlx" / "config.json").exists()
