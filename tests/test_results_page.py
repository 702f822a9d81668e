"""benchmarks/results.py: docs/results.md's tables aggregated from run folders, not typed by hand."""

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

from results import main  # noqa: E402

RATES = [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]


def fake_run(root: Path, name: str, cpm: float, at1: float, git: str, pleural: tuple[int, int, float]) -> None:
    """A run folder as train and evaluate leave it: meta.json beside the checkpoint, eval/metrics.json."""
    (root / name / "eval").mkdir(parents=True)
    (root / name / "meta.json").write_text(json.dumps({"git": git}))
    n, in_pool, sens = pleural
    froc = {"cpm": cpm, "cpm_ci95": [cpm - 0.1, cpm + 0.1], "fp_rates": RATES,
            "sensitivities": [at1 / 2, at1 / 2, at1, at1, at1, 0.9, 0.9], "nodules": 10, "scans": 5, "in_pool": 9,
            "by_size": [], "by_kind": [{"group": "pleural", "nodules": n, "in_pool": in_pool, "sensitivity": [sens, 1.0],
                                        "fp_rates": [1.0, 4.0]}]}
    metrics = {"checkpoint": str(root / name / "best.pt"), "froc": froc, "froc_stage1": {"cpm": cpm / 4},
               "operating_points": [{"fp_rate_validation": 0.5, "fp_per_scan": 0.1, "sensitivity": 0.2},
                                    {"fp_rate_validation": 1.0, "fp_per_scan": 0.8, "sensitivity": at1}]}
    (root / name / "eval" / "metrics.json").write_text(json.dumps(metrics))


def manifest(path: Path, seeds: list[int]) -> Path:
    path.write_text(yaml.safe_dump({
        "title": "Results", "intro": "At {commit}.",
        "rows": {"demo": {"what": "the demo", "seeds": seeds, "metrics": "demo-s{seed}/eval/metrics.json",
                          "steps": [{"out": "demo-s{seed}", "run": "noduledet demo -o {runs}/demo-s{seed}"}]}},
        "tables": [{"title": "Demo", "rows": ["demo"], "columns": ["cpm", "cpm_stage1", "sens1", "op1_fp", "pool"],
                    "groups": True}]}))
    return path


def table_row(page: str, start: str) -> list[str]:
    line = next(line for line in page.splitlines() if line.startswith(start))
    return [c.strip() for c in line.split("|")[1:-1]]


def test_the_page_aggregates_two_seeds(tmp_path):
    fake_run(tmp_path, "demo-s0", 0.8, 0.7, "aaaa111", (2, 2, 0.5))
    fake_run(tmp_path, "demo-s1", 0.6, 0.5, "aaaa111", (4, 3, 0.0))
    out = tmp_path / "results.md"
    assert main(["--runs", str(tmp_path), "--manifest", str(manifest(tmp_path / "m.yaml", [0, 1])), "-o", str(out)]) == 0
    page = out.read_text()
    row = table_row(page, "| the demo |")
    # mean and sample std of 0.8 and 0.6: 0.700 ± 0.141; stage one a quarter of each
    assert row[1:3] == ["0, 1", "5 scans, 10 nodules"]
    assert row[3] == "0.700 ± 0.141 (0.800, 0.600)" and row[4] == "0.175 ± 0.035 (0.200, 0.150)"
    assert row[5] == "0.600 ± 0.141 (0.700, 0.500)" and row[6] == "0.80 ± 0.00 (0.80, 0.80)"
    assert row[7] == "0.900 ± 0.000 (0.900, 0.900)"
    assert row[8] == "0.60-0.80" and row[9] == "aaaa111"  # the intervals averaged; one commit named once
    # pleural: 6 nodules over both seeds, 5 in the pool; sensitivity at 1 FP/scan the mean of 0.5 and 0
    assert table_row(page, "| the demo | pleural |")[2:] == ["6", "0.83", "0.250", "1.000"]
    assert "`noduledet demo -o " + str(tmp_path) + "/demo-s{seed}`" in page


def test_a_row_without_runs_says_how_to_make_them(tmp_path):
    out = tmp_path / "results.md"
    assert main(["--runs", str(tmp_path), "--manifest", str(manifest(tmp_path / "m.yaml", [3])), "-o", str(out)]) == 0
    assert "| the demo | not measured at this commit: `noduledet demo -o" in out.read_text()


def test_a_manifest_naming_an_unknown_column_is_refused(tmp_path):
    path = manifest(tmp_path / "m.yaml", [0])
    broken = yaml.safe_load(path.read_text())
    broken["tables"][0]["columns"].append("auc")
    path.write_text(yaml.safe_dump(broken))
    with pytest.raises(SystemExit, match=r"m.yaml: table 'Demo' names unknown rows or columns \['auc'\]"):
        main(["--runs", str(tmp_path), "--manifest", str(path), "-o", str(tmp_path / "r.md")])


def test_rerun_keeps_a_benchmarks_output_whole_or_not_at_all(tmp_path):
    path = manifest(tmp_path / "m.yaml", [])
    spec = yaml.safe_load(path.read_text())
    spec["tables"].append({"title": "Speed", "output": {"out": "bench/scan.txt",
                                                        "run": f"{sys.executable} -c \"print('| stage one | 2.5 s |')\""}})
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "results.md"
    assert main(["--runs", str(tmp_path), "--manifest", str(path), "-o", str(out), "--rerun"]) == 0
    assert (tmp_path / "bench" / "scan.txt").read_text() == "| stage one | 2.5 s |\n"
    assert "```text\n| stage one | 2.5 s |\n```" in out.read_text()
    spec["tables"][1]["output"] = {"out": "bench/fails.txt", "run": f"{sys.executable} -c \"print('half'); exit(3)\""}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit, match="failed; .*fails.txt is not made"):
        main(["--runs", str(tmp_path), "--manifest", str(path), "-o", str(out), "--rerun"])
    assert not (tmp_path / "bench" / "fails.txt").exists()
