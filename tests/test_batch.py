"""predict over many scans: every scan written when done, resume, shards and gather, a manifest."""

import json

import pytest

from noduledet import checkpoint, predict as predict_module
from noduledet.cli import main
from noduledet.data.luna16 import Luna16


def _run(root, ckpt, out, *extra):
    return main(["predict", str(root), "--checkpoint", str(ckpt), "-o", str(out), "--no-pictures", "--no-viewer",
                 *map(str, extra)])


@pytest.fixture(scope="module")
def straight(phantom_root, random_checkpoint, tmp_path_factory):
    """One uninterrupted run over the test phantom's four scans."""
    out = tmp_path_factory.mktemp("straight") / "out"
    assert _run(phantom_root, random_checkpoint, out) == 0
    return out


def test_an_interrupted_run_resumes_where_it_stopped(phantom_root, random_checkpoint, straight, tmp_path, monkeypatch,
                                                     capsys):
    out = tmp_path / "out"
    real, calls = predict_module.predict_scan, []

    def stop_at_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if killed while the third scan was written
        return real(*args, **kwargs)

    monkeypatch.setattr(predict_module, "predict_scan", stop_at_the_third)
    assert _run(phantom_root, random_checkpoint, out) == 130
    monkeypatch.setattr(predict_module, "predict_scan", real)
    names = Luna16(phantom_root).uids
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == names[:2]  # two finished, nothing half-written
    assert not (out / "candidates.csv").exists()
    assert _run(phantom_root, random_checkpoint, out) == 2  # no --resume: refused, nothing touched
    capsys.readouterr()
    assert _run(phantom_root, random_checkpoint, out, "--resume") == 0
    assert "2 scans already done, 2 to go" in capsys.readouterr().out
    assert (out / "candidates.csv").read_text() == (straight / "candidates.csv").read_text()
    assert _run(phantom_root, random_checkpoint, out, "--resume") == 0  # a finished run: merged again, same


def test_a_broken_scan_is_recorded_and_the_others_go_on(phantom_root, random_checkpoint, straight, tmp_path, capsys):
    import shutil

    root = tmp_path / "luna"
    shutil.copytree(phantom_root, root)
    names = Luna16(root).uids
    raw = next(root.rglob(f"{names[1]}.raw"))
    good = raw.read_bytes()
    raw.write_bytes(good[:1000])  # truncated
    out = tmp_path / "out"
    assert _run(root, random_checkpoint, out) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "1 of 4 scans failed" in err and f"{raw.name}: truncated" in err
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != "failed") == names[:1] + names[2:]
    assert (out / "failed" / f"{names[1]}.txt").is_file()
    assert not (out / "candidates.csv").exists()  # the merged files only for a complete run
    raw.write_bytes(good)
    assert _run(root, random_checkpoint, out, "--resume") == 0
    assert "3 scans already done, 1 to go" in capsys.readouterr().out
    assert not (out / "failed" / f"{names[1]}.txt").exists()
    assert (out / "candidates.csv").read_text() == (straight / "candidates.csv").read_text()


def test_resume_refuses_another_run(phantom_root, random_checkpoint, straight, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(phantom_root, random_checkpoint, out) == 0
    assert _run(phantom_root, random_checkpoint, out, "--resume", "--score-threshold", "0.9") == 2
    assert "a run with other settings, options" in capsys.readouterr().err
    other = tmp_path / "other.pt"
    ckpt = checkpoint.load(random_checkpoint)
    ckpt.epoch = 7
    checkpoint.save(ckpt, other)
    assert main(["predict", str(phantom_root), "--checkpoint", str(other), "-o", str(out), "--no-pictures",
                 "--no-viewer", "--resume"]) == 2
    assert "a run with other checkpoint_sha1" in capsys.readouterr().err


def test_two_shards_gathered_are_one_run(phantom_root, random_checkpoint, straight, tmp_path, capsys):
    for i in (0, 1):
        assert _run(phantom_root, random_checkpoint, tmp_path / f"s{i}", "--shard", f"{i}/2") == 0
    names = Luna16(phantom_root).uids
    assert [p.name for p in sorted((tmp_path / "s0").iterdir()) if p.is_dir()] == names[0::2]
    assert main(["gather", str(tmp_path / "s0"), "-o", str(tmp_path / "g")]) == 2  # half the scans are missing
    assert "2 of 4 scans are in no shard" in capsys.readouterr().err and not (tmp_path / "g").exists()
    assert main(["gather", str(tmp_path / "s0"), str(tmp_path / "s1"), "-o", str(tmp_path / "g")]) == 0
    assert (tmp_path / "g" / "candidates.csv").read_text() == (straight / "candidates.csv").read_text()
    gathered = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert [s["name"] for s in gathered] == names
    assert main(["gather", str(tmp_path / "s0"), "-o", str(tmp_path / "h"), "--allow-missing"]) == 0
    assert json.loads((tmp_path / "h" / "run.json").read_text())["missing"] == names[1::2]


def test_a_manifest_lists_scans_relative_to_itself(phantom_root, random_checkpoint, straight, tmp_path, capsys):
    data = Luna16(phantom_root)
    (tmp_path / "scans.txt").write_text("# the test phantom\n" + "".join(
        f"{data.scan_path(u).relative_to(phantom_root)}\n\n" for u in data.uids))
    (tmp_path / "scans.txt").rename(phantom_root / "scans.txt")
    try:
        assert main(["predict", "--manifest", str(phantom_root / "scans.txt"), "--checkpoint", str(random_checkpoint),
                     "-o", str(tmp_path / "m"), "--no-pictures", "--no-viewer"]) == 0
        assert (tmp_path / "m" / "candidates.csv").read_text() == (straight / "candidates.csv").read_text()
        (phantom_root / "scans.txt").write_text("subset0/nothing.mhd\n")
        assert main(["predict", "--manifest", str(phantom_root / "scans.txt"), "--checkpoint", str(random_checkpoint),
                     "-o", str(tmp_path / "n")]) == 2
        assert f"{phantom_root / 'scans.txt'}:1: subset0/nothing.mhd: no such file or folder" in capsys.readouterr().err
        assert not (tmp_path / "n").exists()
    finally:
        (phantom_root / "scans.txt").unlink()


def test_an_operating_point_gives_the_findings_a_reader_reviews(phantom_root, random_checkpoint, tmp_path, capsys):
    ckpt = checkpoint.load(random_checkpoint)
    ckpt.operating_points = {"fp_rates": [0.5, 1.0, 2.0, 4.0], "thresholds": [0.9, 0.6, 0.3, 0.1]}
    checkpoint.save(ckpt, tmp_path / "c.pt")
    out = tmp_path / "out"
    assert main(["predict", str(phantom_root), "--checkpoint", str(tmp_path / "c.pt"), "-o", str(out),
                 "--no-pictures", "--operating-point", "1"]) == 0
    every = (out / "candidates.csv").read_text().splitlines()[1:]
    findings = (out / "findings.csv").read_text().splitlines()[1:]
    assert findings == [row for row in every if float(row.split(",")[-1]) >= 0.6]
    summary = json.loads((out / "summary.json").read_text())
    counts = [s["findings_at_fp_per_scan"]["1"] for s in summary]
    assert sum(counts) == len(findings) and all(set(s["findings_at_fp_per_scan"]) == {"1/2", "1", "2", "4"}
                                                for s in summary)
    assert (out / "index.html").stat().st_size > 1000
    # with at most one finding per scan at 2 FP/scan: each scan's most probable candidate at or above 0.3
    assert max(s["findings_at_fp_per_scan"]["2"] for s in summary) > 1  # a scan the limit shortens
    ckpt.operating_points["max_findings"] = [1, 2, 1, 3]
    checkpoint.save(ckpt, tmp_path / "m.pt")
    assert main(["predict", str(phantom_root), "--checkpoint", str(tmp_path / "m.pt"), "-o", str(tmp_path / "m"),
                 "--no-pictures", "--operating-point", "2"]) == 0
    firsts = {}
    for row in (tmp_path / "m" / "candidates.csv").read_text().splitlines()[1:]:
        if float(row.split(",")[-1]) >= 0.3:
            firsts.setdefault(row.split(",")[0], row)
    assert (tmp_path / "m" / "findings.csv").read_text().splitlines()[1:] == list(firsts.values())
    capped = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert [s["findings_at_fp_per_scan"] for s in capped] == [
        {"1/2": min(s["findings_at_fp_per_scan"]["1/2"], 1), "1": min(s["findings_at_fp_per_scan"]["1"], 2),
         "2": min(s["findings_at_fp_per_scan"]["2"], 1), "4": min(s["findings_at_fp_per_scan"]["4"], 3)} for s in summary]
    assert main(["predict", str(phantom_root), "--checkpoint", str(random_checkpoint), "-o", str(tmp_path / "x"),
                 "--operating-point", "1"]) == 2
    assert "no calibrated operating points" in capsys.readouterr().err
    assert main(["predict", str(phantom_root), "--checkpoint", str(tmp_path / "c.pt"), "-o", str(tmp_path / "y"),
                 "--operating-point", "3"]) == 2
    assert "this checkpoint has 0.5, 1, 2, 4 false positives per scan" in capsys.readouterr().err


def test_a_calibrated_checkpoint_gives_the_1_fp_operating_point_by_default(phantom_root, random_checkpoint, tmp_path,
                                                                          capsys):
    """Its findings (findings.csv, the viewer, SR and SEG) at the 1-FP point unless --score-threshold
    or --operating-point say otherwise; an uncalibrated checkpoint keeps 0.5; every record says which rule."""
    ckpt = checkpoint.load(random_checkpoint)
    ckpt.operating_points = {"fp_rates": [0.5, 1.0, 2.0, 4.0], "thresholds": [0.9, 0.45, 0.3, 0.1],
                             "max_findings": [1, 2, 3, 4]}
    checkpoint.save(ckpt, tmp_path / "c.pt")

    data = Luna16(phantom_root)
    two = [data.scan_path(u) for u in data.uids[:2]]

    def findings(out, ckpt, *flags):
        assert main(["predict", *map(str, two), "--checkpoint", str(ckpt), "-o", str(out), "--no-pictures",
                     "--no-viewer", *flags]) == 0
        record = json.loads((out / "run.json").read_text())["options"]
        scan = json.loads((out / sorted(p.name for p in out.iterdir() if (p / "scan.json").is_file())[0] /
                           "scan.json").read_text())
        assert scan["findings_rule"] == record["rule"]
        rows = (out / "findings.csv").read_text().splitlines()[1:]
        return record, rows, (out / "candidates.csv").read_text().splitlines()[1:]

    record, rows, every = findings(tmp_path / "default", tmp_path / "c.pt")
    assert record["rule"] == ("operating point 1 false positive(s) per scan (the default of a calibrated "
                              "checkpoint): probability >= 0.45, at most 2 per scan")
    assert f"findings: {record['rule']}" in capsys.readouterr().out
    per_scan: dict[str, list[str]] = {}
    for row in sorted(every, key=lambda r: -float(r.split(",")[-1])):  # the two most probable at or above 0.45
        if float(row.split(",")[-1]) >= 0.45 and len(per_scan.setdefault(row.split(",")[0], [])) < 2:
            per_scan[row.split(",")[0]].append(row)
    assert sorted(rows) == sorted(r for kept in per_scan.values() for r in kept) and rows
    record, rows, every = findings(tmp_path / "given", tmp_path / "c.pt", "--score-threshold", "0.2")
    assert record["rule"] == "--score-threshold 0.2" and record["max_findings"] == 0
    assert rows == [r for r in every if float(r.split(",")[-1]) >= 0.2]
    record, rows, every = findings(tmp_path / "plain", random_checkpoint)
    assert record["rule"] == ("probability >= 0.5, the checkpoint's eval.score_threshold (it has no calibrated "
                              "operating points)")
    assert rows == [r for r in every if float(r.split(",")[-1]) >= 0.5]
    capsys.readouterr()
    assert _run(phantom_root, tmp_path / "c.pt", tmp_path / "both", "--operating-point", "1", "--score-threshold",
                "0.2") == 2
    assert "--operating-point and --score-threshold both choose the findings; pass one" in capsys.readouterr().err
