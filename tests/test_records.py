"""Run records and what the seeds can say: the Student t distribution against SciPy (the library that defines it), a
record's schema (malformed, non-finite, out-of-range and injected values refused or escaped), training from an
uncommitted tree refused, and a resumed run's segments summed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scipy import stats as scipy_stats

from reproduction import stats
from reproduction.records import RecordError, read_record_file, validate_record, write_record
from reproduction.render import WEIGHTS_KEY, md_text, render_markdown, weights_provenance
from reproduction.seeds import comparisons
from reproduction.spec import Column, Compare, Row, SeedRun, TableSpec

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def record(**changes) -> dict:
    base = {"format": 1, "config_hash": "0123456789ab", "status": "finished", "task": "classification",
            "scale": "tiny", "metrics": {"top1": 50.0, "top5": 80.0}, "commit": COMMIT, "dataset": "embedded",
            "device": "CPU (2 threads)", "finished_at": "2026-12-01 00:00:00 UTC", "train_seconds": 10.0}
    return {**base, **changes}


@pytest.mark.parametrize("df", [1, 2, 2.7, 4, 10, 30, 1000])
def test_t_quantiles_and_cdf_match_scipy(df: float) -> None:
    for p in (0.6, 0.9, 0.975, 0.995):
        assert stats.t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-9)
    for t in (-3.0, -0.5, 0.0, 1.0, 4.3):
        assert stats.t_cdf(t, df) == pytest.approx(scipy_stats.t.cdf(t, df), abs=1e-12)


def test_the_published_two_sided_95_percent_points() -> None:
    for df, value in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (10, 2.228), (30, 2.042)):
        assert stats.t_quantile(0.975, df) == pytest.approx(value, abs=5e-4)


def test_welch_matches_scipy_and_its_interval_is_consistent_with_its_t() -> None:
    a, b = [1.586, 1.124, 0.95], [0.537, 0.489, 0.823]
    c = stats.welch(a, b)
    reference = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert c.t == pytest.approx(reference.statistic, rel=1e-12) and c.delta == pytest.approx(sum(a) / 3 - sum(b) / 3)
    se = c.delta / c.t
    assert c.high - c.delta == pytest.approx(scipy_stats.t.ppf(0.975, c.df) * se, rel=1e-9)
    assert c.separated == (reference.pvalue < 0.05)
    assert stats.welch([1.0], [2.0, 3.0]).separated is None and stats.welch([1.0], [2.0]).t is None
    assert stats.welch([1.0, 1.0], [2.0, 2.0]).separated is None  # no spread at all: not measured
    with pytest.raises(ValueError, match="both rows need values"):
        stats.welch([], [1.0])


def test_a_table_states_what_the_seeds_say_against_its_baseline() -> None:
    def row(label: str, paper: float, values: list[float]) -> Row:
        runs = [SeedRun(seed, config_hash=f"{label}{seed}", record={"metrics": {"acc": v}}) for seed, v in
                enumerate(values)]
        return Row(label, [], {"acc": paper}, runs=runs)
    spec = TableSpec("demo", "Demo", "paper", [], [Column("acc", "acc", "acc", 1)],
                     [row("base", 70.0, [50.0, 51.0, 52.0]), row("up", 72.0, [60.0, 61.0, 62.0]),
                      row("down", 72.0, [40.0, 41.0, 42.0]), row("same", 70.5, [50.5, 52.5, 51.0])],
                     compare=Compare("acc", {"up": "base", "down": "base", "same": "base"}, "up"))
    compared = comparisons(spec)
    assert compared["up"]["acc"]["verdict"] == "separated, in the paper's direction"
    assert compared["down"]["acc"]["verdict"] == "separated, opposite to the paper's direction"
    assert compared["same"]["acc"]["verdict"] == "not separated from seed noise"
    assert compared["up"]["acc"]["paper_delta"] == pytest.approx(2.0) and compared["up"]["acc"]["delta"] == 10.0
    markdown = render_markdown(spec, {"scale": "tiny"})
    assert "| up | base | +2.00 | +10.00 | [+7.73, +12.27] | +12.25 (4.0) | 3 / 3 | separated, in the paper's" \
           in markdown


@pytest.mark.parametrize("change, message", [
    ({"metrics": {"top1": float("nan")}}, "must be finite"),
    ({"metrics": {"top1": 1e308}}, r"outside \[0.0, 100.0\]"),
    ({"metrics": {"top1": -166621.0}}, r"outside \[0.0, 100.0\]"),
    ({"metrics": {"bbox_AP": 101.0}}, r"outside \[0.0, 100.0\]"),
    ({"metrics": {}}, "metrics is empty"),
    ({"metrics": {"top1": "50"}}, "must be a number"),
    ({"metrics": {"top1": [50]}}, "must be a number"),
    ({"commit": "HEAD"}, "is not a 40-digit commit"),
    ({"device": "CPU\n# heading"}, "one line"),
    ({"dataset": ["a"]}, "must be a string"),
    ({"world_size": 0}, "whole number >= 1"),
    ({"status": "running"}, "only finished runs"),
    ({"config_hash": "../../etc"}, "not 12 hex digits"),
    ({"format": 2}, "format is 2"),
    ({"weights_sha256": "96ed529c"}, "weights_sha256 .* not 64 hex digits"),
    ({"backbone_weights": {"path": "a.pt"}}, "backbone_weights must be"),
    ({"backbone_weights": {"path": "a\n# b", "sha256": "0" * 64}}, "backbone_weights.path must be one line"),
])
def test_a_malformed_record_is_refused_naming_the_field(change: dict, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        validate_record(record(**change), "the record")


def test_a_record_file_must_be_named_by_its_hash_and_be_json(tmp_path: Path) -> None:
    path = write_record(record(), tmp_path)
    assert path.name == "0123456789ab.json" and read_record_file(path)["metrics"]["top1"] == 50.0
    other = tmp_path / "ba9876543210.json"
    other.write_text(path.read_text())
    with pytest.raises(RecordError, match="holds the record of run 0123456789ab"):
        read_record_file(other)
    other.write_text("{truncated")
    with pytest.raises(RecordError, match="ba9876543210.json: not a readable JSON"):
        read_record_file(other)


def test_strings_from_records_reach_markdown_as_text() -> None:
    text = md_text("x | y\n# heading <script>alert(1)</script> [link](javascript:alert(1)) `code`")
    assert "\n" not in text and "<" not in text and "[link](" not in text and "\\[link\\]" in text
    assert "| " not in text.replace("\\| ", "")
    spec = TableSpec("demo", "Demo", "paper", [], [Column("top1", "top-1", "top1")],
                     [Row("A", [], {}, runs=[SeedRun(0, config_hash="0123456789ab",
                                                     record=record(device="<b>x</b> | y"))])])
    markdown = render_markdown(spec, {"dataset": "a\n# b | c <i>"})
    assert "<b>" not in markdown and "<i>" not in markdown and "\n# b" not in markdown
    assert "| dataset | a # b \\| c &lt;i&gt; |" in markdown


def test_reproduce_refuses_to_train_from_an_uncommitted_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from reproduction import reproduce
    monkeypatch.setattr(reproduce, "uncommitted_changes", lambda: ["carafe/ops.py"])
    monkeypatch.setattr(reproduce, "run_child", lambda *a, **k: pytest.fail("trained from a dirty tree"))
    assert reproduce.main(["pp-12", "--seeds", "1", "--runs", str(tmp_path / "runs"), "--out",
                           str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "uncommitted changes (carafe/ops.py)" in error and "--allow-dirty" in error
    assert not (tmp_path / "out").exists()


def test_git_state_hashes_an_uncommitted_change(tmp_path: Path) -> None:
    import subprocess

    from tasks.common.provenance import git_state

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)
    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-qm", "a")
    clean = git_state(tmp_path)
    assert clean["clean"] is True and clean["diff_sha256"] is None and len(str(clean["commit"])) == 40
    (tmp_path / "a.py").write_text("x = 2\n")
    first = git_state(tmp_path)
    (tmp_path / "a.py").write_text("x = 3\n")
    second = git_state(tmp_path)
    assert first["clean"] is False and str(first["commit"]).endswith("+dirty")
    assert first["diff_sha256"] != second["diff_sha256"] and len(str(first["diff_sha256"])) == 64
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "new.py").write_text("y = 1\n")  # an untracked file counts as a change too
    assert git_state(tmp_path)["clean"] is False


def test_retrain_stale_trains_the_marked_seeds_again_and_replaces_their_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records at a commit this clone does not have are marked ('?'); --retrain-stale trains them again (here the
    child is replaced by one that writes a finished run), and the new records replace the old."""
    from reproduction import reproduce
    from reproduction.records import load_records
    from reproduction.spec import compose_rows, load_table_spec

    table = load_table_spec("pp-12")
    compose_rows(table, "tiny", seeds=1)
    out = tmp_path / "out"
    for row in table.rows:
        write_record(record(config_hash=row.config_hash, commit="f" * 40), out / "runs")
    trained = []

    def fake_training(command: list[str], cwd: Path) -> int:
        run_dir = Path(next(word for word in command if word.startswith("hydra.run.dir=")).split("=", 1)[1])
        trained.append(run_dir.name)
        (run_dir / "metrics.json").write_text(json.dumps({**record(config_hash=run_dir.name), "format": None,
                                                           "metrics": {"top1": 70.0, "top5": 90.0},
                                                           "finished_at": "2026-12-02 00:00:00 UTC"}))
        return 0
    monkeypatch.setattr(reproduce, "run_child", fake_training)
    monkeypatch.setattr(reproduce, "uncommitted_changes", lambda: [])
    argv = ["pp-12", "--seeds", "1", "--runs", str(tmp_path / "runs"), "--out", str(out)]
    assert reproduce.main([*argv, "--render-only"]) == 0 and trained == []
    assert "?" in (out / "table-pp-12.md").read_text()  # marked: the commit is not in this clone
    assert reproduce.main([*argv, "--retrain-stale"]) == 0
    assert sorted(trained) == sorted(row.config_hash for row in table.rows)
    assert {r["metrics"]["top1"] for r in load_records(out / "runs").values()} == {70.0}


def test_the_weights_line_counts_which_training_of_a_pretraining_config_the_runs_loaded() -> None:
    """Two runs loaded the weights the pretraining run's record names, one other weights under the same file name
    (the config trained again elsewhere), one recorded no digest; a run from scratch is not counted."""
    path = "runs/classification/8395c98c4033/checkpoint.pt"
    pretrained, other = "a" * 64, "b" * 64

    def run(seed: int, digest: str | None, weights: str | None = path) -> SeedRun:
        loaded = {} if digest is None else {"backbone_weights": {"path": path, "sha256": digest}}
        return SeedRun(seed, config_hash=f"{seed:012d}", record=record(
            config={"model": {"backbone_weights": weights}}, **loaded))
    spec = TableSpec("demo", "Demo", "paper", [], [Column("top1", "top-1", "top1")],
                     [Row("A", [], {}, runs=[run(0, pretrained), run(1, other), run(2, pretrained)]),
                      Row("B", [], {}, runs=[run(3, None), run(4, None, weights=None)])])
    line = weights_provenance(spec, {"8395c98c4033": record(weights_sha256=pretrained)})[WEIGHTS_KEY]
    assert line == (f"`{path}`: 2 loaded weights sha256 aaaaaaaaaaaa, the weights of its pretraining run's record; "
                    "1 loaded weights sha256 bbbbbbbbbbbb, not the weights of its pretraining run's record; "
                    "1 without a digest (trained before records held one)")
    assert "(which holds no digest)" in weights_provenance(spec, {"8395c98c4033": record()})[WEIGHTS_KEY]
    scratch = TableSpec("demo", "Demo", "paper", [], [Column("top1", "top-1", "top1")],
                        [Row("B", [], {}, runs=[run(4, None, weights=None)])])
    assert weights_provenance(scratch, {}) == {}
