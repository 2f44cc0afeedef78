from moequant import cli


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert cli.main(["demo", "--layers", "3", "--max-tokens", "3", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "0 mismatching" in out and "routed experts 3." in out
    assert "MoE blocks patched" in out and " 0 MoE blocks" not in out
    assert (tmp_path / "kimi-mlx" / "config.json").exists()


def test_demo_workdir_keeps_files_for_the_other_commands(tmp_path, capsys):
    # --workdir keeps the checkpoint and the build, and says what to try on them; the
    # commands it prints work (serve and generate are tested in test_moe_cli.py).
    assert cli.main(["demo", "--layers", "2", "--max-tokens", "2", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"kept in {tmp_path}" in out
    cmds = [line.split()[1:] for line in out.splitlines() if line.startswith("  moequant ")]
    assert [c[0] for c in cmds] == ["plan", "convert", "inspect", "generate", "serve"]
    for c in cmds[:3]:
        assert cli.main(c) == 0, c
    assert (tmp_path / "kimi-mlx-uniform-4" / "config.json").exists()
