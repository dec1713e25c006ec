"""The command line a newcomer meets: no silent abbreviations, "did you mean" for a misspelt flag, and a `--help`
that answers at once (it imports no torch)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dreambooth.cli import COMMANDS, main


@pytest.mark.parametrize("argv, wrong, right", [
    (["train", "--max_train_step", "3"], "--max_train_step", "--max_train_steps"),  # a unique prefix, once accepted
    (["identifier", "--clas_noun", "dog"], "--clas_noun", "--class_noun"),
    (["toy", "quality", "--per_promp", "3"], "--per_promp", "--per_prompt"),
])
def test_a_misspelt_flag_is_refused_with_the_closest_one(argv, wrong, right, capsys):
    with pytest.raises(SystemExit) as ended:
        main(argv)
    err = capsys.readouterr().err
    assert ended.value.code == 2 and "Traceback" not in err
    assert f"unrecognized arguments: {wrong}" in err and f"did you mean {right}?" in err
    assert f"dreambooth {argv[0]}: error:" in err  # the subcommand's name and usage, not the top level's


def test_help_imports_neither_torch_nor_any_command(capsys):
    code = ("import sys\nfrom dreambooth.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'dreambooth.config') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert all(name in out for name in COMMANDS) and out.strip().endswith("[]"), out


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "toy"])
def test_each_command_builds_its_flags_and_help(command, capsys):
    with pytest.raises(SystemExit) as ended:
        main([command, "--help"])
    assert ended.value.code == 0 and "--" in capsys.readouterr().out
