import pytest

from noduledet.cli import main


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "models" in capsys.readouterr().out


def test_models_prints_a_table(capsys):
    assert main(["models", "--size", "64", "--variants", "res", "ccapm", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert lines[0] == "| variant | params (M) | GFLOPs/slice | CPU ms/slice |"
    assert [line.split("|")[1].strip() for line in lines[1:]] == ["res", "ccapm"]


def test_models_unknown_variant_is_one_line(capsys):
    assert main(["models", "--variants", "resnet101"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown variant 'resnet101'" in err
