import base64
import json
import re

import pytest
import torch

from noduledet import checkpoint
from noduledet.cli import main
from noduledet.models.detector import build_detector, same_network
from noduledet.report import markdown_to_html


def test_markdown_page_stands_alone(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure()
    fig.subplots().plot([0, 1])
    fig.savefig(tmp_path / "a.png")
    page = markdown_to_html("# Title\n\n| a | b |\n|---|---:|\n| x | **1** |\n\n![A curve](a.png)\n\n- item `code`\n",
                            tmp_path, "t")
    assert "<h1>Title</h1>" in page and "<th>a</th>" in page and "<td><b>1</b></td>" in page
    assert "<li>item <code>code</code></li>" in page
    data = page.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(data) == (tmp_path / "a.png").read_bytes()
    assert "src=\"a.png\"" not in page


@pytest.mark.slow  # the whole demo / compare: `python -m pytest -m slow`
def test_demo_end_to_end_small(tmp_path, capsys):
    out = tmp_path / "demo"
    # the config's overrides: stage two's 16 epochs and the proposer's 600 steps take minutes
    short = ["stage2.epochs=1", "stage2.samples_per_epoch=64", "proposer.steps=20"]
    assert main(["demo", "-o", str(out), "--scans", "4", "--epochs", "1", "--size", "64", *short]) == 0
    text = capsys.readouterr().out
    assert "stage 2 epoch 1/1:" in text and checkpoint.load(out / "run" / "best.pt").config.stage2.epochs == 1
    assert "[6/6] report" in text and f"report: {out / 'report.html'}" in text
    md = (out / "report.md").read_text()
    for heading in ("## Setup", "## Results on the held-out scans", "## Predictions on two held-out scans", "## Time"):
        assert heading in md
    assert "not clinical results" in md and "CPM" in md and "| 3-6 mm |" in md  # sensitivity by size
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3
    assert f"noduledet demo -o {out} --seed 0 --scans 4 --epochs 1 --size 64 {' '.join(short)}" in md  # reproduce
    assert (out / "run" / "best.pt").exists() and (out / "eval" / "metrics.json").exists()
    assert main(["demo", "-o", str(out), "--scans", "4", "--epochs", "1", "--size", "64"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["demo", "-o", str(tmp_path / "other"), "train.out=elsewhere"]) == 2
    assert "'train.out=elsewhere': the demo places data.root, data.cache, train.out inside -o" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


@pytest.mark.slow  # the whole demo / compare: `python -m pytest -m slow`
def test_compare_two_rows_and_resume(phantom_root, phantom_cache, tmp_path, capsys):
    args = ["compare", "--table", "3", "--data", str(phantom_root), "--cache", str(phantom_cache), "--epochs", "1",
            "--variants", "res", "ccapm", "--seeds", "0", "1", "--size", "64", "-o", str(tmp_path / "c"),
            "--neck", "fpn", "data.patch=64", "train.batch_size=4", "data.val_fraction=0.25", "data.pixel_mm=4.0"]
    assert main(args) == 0
    md = (tmp_path / "c" / "table3.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| res ") or line.startswith("| ccapm ")]
    assert len(rows) == 2 and "0.8421" in rows[1]  # the paper's CCAPM mAP beside ours
    cells = [c.strip() for c in rows[1].split("|")]
    assert cells[2] == "fpn" and re.fullmatch(r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\] "
                                             r"(better|worse|not distinguishable)", cells[10])  # ΔCPM vs res
    assert rows[0].split("|")[10].strip() == "baseline"
    assert re.search(r"Held-out scans needed .* `ccapm` (\d+|not estimable)", md)
    csv_text = (tmp_path / "c" / "table3.csv").read_text()
    assert csv_text.startswith("variant,neck,seeds,map,map_std,ap_paper,ap_paper_std,recall,recall_std,jaccard,")
    assert "d_cpm,d_cpm_low,d_cpm_high,d_cpm_verdict" in csv_text.splitlines()[0]
    assert (tmp_path / "c" / "figure5.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("already trained") == 4  # two rows, two seeds
    # Table 4's resnet18 is Table 3's res at the tiny preset, on the same neck: its row reuses that run
    table4 = ["compare", "--table", "4", *args[3:]]
    table4[table4.index("res")] = "resnet18"
    table4.remove("ccapm")
    assert main(table4) == 0
    assert "res-fpn seed 0: already trained" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "c" / "runs").iterdir()) == ["ccapm-fpn-s0", "ccapm-fpn-s1",
                                                                           "res-fpn-s0", "res-fpn-s1"]
    md4 = (tmp_path / "c" / "table4.md").read_text()
    assert "`resnet18` is the same network as `res` at preset `tiny` with the same neck" in md4
    row3, row4 = (next(x for x in text.splitlines() if x.startswith(f"| {v} ")) for text, v in ((md, "res"), (md4, "resnet18")))
    assert row3.split("|")[3:10] == row4.split("|")[3:10]  # the same metrics


def test_the_paper_protocol_puts_table_3_on_the_c4_carrier():
    from noduledet.models.detector import paper_neck

    assert {paper_neck(3, v) for v in ("res", "ccapm", "ccasm")} == {"c4"}
    assert paper_neck(4, "vgg16") == "c4" and paper_neck(4, "ccapm") == "fpn"


def test_same_network_follows_the_preset():
    assert same_network("resnet18", "tiny") == "res" and same_network("resnet50", "tiny") == "resnet50"
    assert same_network("resnet50", "paper") == "res" and same_network("ccapm", "paper") == "ccapm"
    torch.manual_seed(0)
    a = build_detector("resnet18").state_dict()
    torch.manual_seed(0)
    b = build_detector("res").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compare_refuses_a_missing_data_folder_before_writing(tmp_path, capsys):
    assert main(["compare", "--table", "3", "--data", str(tmp_path / "nope"), "-o", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{tmp_path / 'nope'}: no such folder")
    assert not (tmp_path / "c").exists()


def test_compare_refuses_a_variant_outside_the_table(tmp_path, capsys):
    assert main(["compare", "--table", "4", "--variants", "res-se", "-o", str(tmp_path / "c")]) == 2
    assert "not in Table 4" in capsys.readouterr().err
