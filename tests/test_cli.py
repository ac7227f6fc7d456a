from __future__ import annotations

import subprocess
import sys

import pytest

from alignx.cli import build_parser, main


def test_every_subcommand_has_help_and_common_flags():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        text = p.format_help()
        if name not in ("models", "jobs"):  # `jobs` talks to a cluster, it has no config
            assert "--config" in text and "--run-dir" in text and "KEY=VALUE" in text, name


def test_bad_config_is_one_error_line_not_a_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "alignx.cli", "config", "train.lora.rnak=3"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2
    assert "error:" in r.stderr and "train.lora.rnak: unknown key" in r.stderr
    assert "Traceback" not in r.stderr


def test_config_prints_resolved_yaml(capsys, tmp_path):
    assert main(["config", "--run-dir", str(tmp_path), "train.lora.rank=12"]) == 0
    out = capsys.readouterr().out
    assert "rank: 12" in out and str(tmp_path.resolve()) in out


def test_train_without_target_explains(tmp_path):
    with pytest.raises(SystemExit, match="--axis AXIS"):
        main(["train", "--run-dir", str(tmp_path)])


def test_models_lists_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "mistral7b" in out and "[paper]" in out
