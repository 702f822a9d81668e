import pytest

from noduledet.cli import build_parser, main
from noduledet.models import build_detector
from noduledet.models.detector import count_parameters

COMMANDS = ["models", "phantom", "lidc-annotations", "prepare", "train", "stage2", "evaluate", "froc", "predict", "gather", "demo",
            "compare"]


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(f"    {c}" in out for c in COMMANDS)
    assert sorted(build_parser()._subparsers._group_actions[0].choices) == sorted(COMMANDS)


def test_models_prints_the_models_own_sizes(capsys):
    assert main(["models", "--size", "64", "--variants", "res", "ccapm", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| variant | params (M) | GFLOPs/slice | CPU ms/slice |")
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines[1:]]
    assert [c[0] for c in cells] == ["res", "ccapm"]
    for c in cells:
        assert c[1] == f"{count_parameters(build_detector(c[0])) / 1e6:.2f}"
    assert "ccapm: ResNet-18 x0.25, attention ccapm (form 'hou', combine 'add', chan_embed 'y')" in out


def test_models_unknown_variant_is_one_line(capsys):
    assert main(["models", "--variants", "resnet101"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown variant 'resnet101'" in err
