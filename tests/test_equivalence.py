"""Attestations that a refactor keeps every result (reproduction.equivalence): the chain search against a
hand-built code graph, code_status on this repository's own history, the file's validation, the hashes against
hashlib, and an attestation made end to end in a throw-away repository whose training script is a few lines."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch

from reproduction.check import check
from reproduction.equivalence import (
    Attestation,
    EquivalenceError,
    append_attestation,
    attest,
    equivalence_chain,
    load_attestations,
    results_sha256,
    state_sha256,
)
from reproduction.runs import code_status
from tasks.common.provenance import git_output

#: Commits of this repository: f4607b8 changed the shared engine and the tiny detection schedule after 2e36c45.
BEFORE, AFTER = "2e36c45", "f4607b8"


def _full(commit: str) -> str:
    return str(git_output("rev-parse", f"{commit}^{{commit}}")).strip()


def test_chain_follows_attestations_either_way_and_only_for_covered_tasks() -> None:
    code = {"a": 1, "a2": 1, "b": 2, "c": 3, "d": 4}     # commits with the same number have the same code

    def same(x: str, y: str) -> bool:
        return code[x] == code[y]

    ab = Attestation("a", "b", ("detection",), "cpu")
    bc = Attestation("c", "b", ("detection", "classification"), "cpu")
    assert equivalence_chain("a2", "b", "detection", False, [ab], same) == [ab]     # a2's code is a's
    assert equivalence_chain("b", "a2", "detection", False, [ab], same) == [ab]     # used backwards
    assert equivalence_chain("a", "c", "detection", False, [ab, bc], same) == [ab, bc]
    assert equivalence_chain("a", "c", "classification", False, [ab, bc], same) is None   # ab lacks the task
    assert equivalence_chain("a", "d", "detection", False, [ab, bc], same) is None
    assert equivalence_chain("a", "b", "detection", True, [ab], same) is None       # a CPU check, a GPU run
    assert equivalence_chain("a", "b", "detection", True, [Attestation("a", "b", ("detection",), "cuda")],
                             same) is not None


def test_code_status_counts_an_attested_change_as_equivalent_on_this_repositorys_history() -> None:
    before, after = _full(BEFORE), _full(AFTER)
    assert code_status(before, "detection", False, after, {"attestations": []}) == "changed"
    attested = {"attestations": [Attestation(before, after, ("detection",), "cpu")]}
    assert code_status(before, "detection", False, after, attested) == "equivalent"
    # the shared engine changed too, and the attestation has no classification check
    assert code_status(before, "classification", False, after, dict(attested)) == "changed"
    # an attestation naming a commit this clone lacks leads nowhere; it does not hide the change
    missing = {"attestations": [Attestation("0" * 40, after, ("detection",), "cpu")]}
    assert code_status(before, "detection", False, after, missing) == "changed"
    assert code_status(after, "detection", False, after, {"attestations": []}) == "current"


def _entry(**changes: object) -> dict:
    check_entry = {"name": "x", "task": "detection", "state_sha256": "a" * 64, "results_sha256": "b" * 64}
    entry = {"from": "1" * 40, "to": "2" * 40, "tasks": ["detection"], "device": "cpu", "checks": [check_entry]}
    entry.update(changes)
    return entry


@pytest.mark.parametrize("changes, message", [
    ({"from": "HEAD"}, "'from' is not a 40-digit commit"),
    ({"tasks": ["detection", "segmentation"]}, "tasks without a check: segmentation"),
    ({"tasks": ["chess"]}, "'tasks' must list some of"),
    ({"checks": []}, "'checks' must be a non-empty list"),
    ({"checks": [{"task": "detection", "state_sha256": "short", "results_sha256": "b" * 64}]},
     "check 0 'state_sha256' is not a SHA-256"),
    ({"device": "tpu"}, "'device' must be"),
])
def test_a_malformed_attestation_is_refused_naming_the_field(tmp_path: Path, changes: dict, message: str) -> None:
    path = tmp_path / "code-equivalence.json"
    path.write_text(json.dumps({"format": 1, "attestations": [_entry(**changes)]}))
    with pytest.raises(EquivalenceError, match=message):
        load_attestations(path)


def test_check_results_reports_a_malformed_attestations_file(tmp_path: Path) -> None:
    (tmp_path / "code-equivalence.json").write_text('{"format": 1, "attestations": [{"from": "HEAD"}]}')
    problems, _ = check(tmp_path)
    assert any("code-equivalence.json attestation 0" in p for p in problems)


def test_state_hash_is_hashlib_over_names_and_bytes_and_sees_one_ulp() -> None:
    weight = torch.tensor([1.0, 2.0])
    expected = hashlib.sha256()
    expected.update(b"w\0")
    expected.update(b"torch.float32(2,)")
    expected.update(weight.numpy().tobytes())
    assert state_sha256({"w": weight}) == expected.hexdigest()
    a = {"w": weight, "n": torch.tensor(3)}
    assert state_sha256(a) == state_sha256({"n": torch.tensor(3), "w": weight.clone()})   # key order is sorted
    nudged = torch.nextafter(weight, torch.tensor(9.0))
    assert state_sha256({**a, "w": nudged}) != state_sha256(a)


def test_results_hash_leaves_out_times_only() -> None:
    run = {"config_hash": "abc", "metrics": {"AP": 1.5}, "history": [{"epoch": 1, "train": {"loss": 0.5}}],
           "train_seconds": 3.0, "finished_at": "today"}
    assert results_sha256(run) == results_sha256({**run, "train_seconds": 9.0, "finished_at": "later"})
    assert results_sha256(run) != results_sha256({**run, "metrics": {"AP": 1.5000001}})
    assert results_sha256(run) != results_sha256({**run, "config_hash": "abd"})


TRAIN = '''\
import json, sys
from pathlib import Path
import torch
from scale import SCALE          # the "result-affecting code" of this throw-away repository
run = Path([a for a in sys.argv if a.startswith("hydra.run.dir=")][0].split("=", 1)[1])
run.mkdir(parents=True)
torch.manual_seed(0)
torch.save({"model": {"w": torch.randn(4) * SCALE}}, run / "checkpoint.pt")
(run / "metrics.json").write_text(json.dumps({"config_hash": "0" * 12, "metrics": {"loss": 0.5 * SCALE},
                                              "history": [], "train_seconds": 1.0}))
'''


def test_attest_trains_both_commits_and_finds_a_refactor_equal_and_a_change_not(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                              text=True).stdout.strip()

    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    (repo / "scripts" / "train.py").write_text(TRAIN)
    (repo / "scale.py").write_text("SCALE = 2.0\n")
    git("add", ".")
    git("commit", "-qm", "first")
    first = git("rev-parse", "HEAD")
    (repo / "scale.py").write_text("SCALE = 1.0 + 1.0   # a refactor: the same value\n")
    git("commit", "-qam", "refactor")
    refactor = git("rev-parse", "HEAD")
    (repo / "scale.py").write_text("SCALE = 2.001\n")
    git("commit", "-qam", "change")
    change = git("rev-parse", "HEAD")
    checks = [{"name": "toy", "task": "classification", "overrides": ["data={data}"]}]
    attestation, differences = attest(first, refactor, checks, 1, tmp_path / "w1", log=lambda _: None, repo=repo)
    assert differences == [] and attestation is not None
    assert attestation["from"] == first and attestation["tasks"] == ["classification"]
    expected = state_sha256({"w": (torch.manual_seed(0), torch.randn(4) * 2.0)[1]})
    assert attestation["checks"][0]["state_sha256"] == expected
    path = tmp_path / "code-equivalence.json"
    append_attestation(attestation, path)
    assert load_attestations(path) == [Attestation(first, refactor, ("classification",), "cpu")]
    attestation, differences = attest(first, change, checks, 1, tmp_path / "w2", log=lambda _: None, repo=repo)
    assert attestation is None
    assert any(d.startswith("toy: state_sha256") for d in differences)
    assert any(d.startswith("toy: results_sha256") for d in differences)


def test_a_run_from_a_pretrained_backbone_depends_on_the_classification_code_too() -> None:
    from reproduction.runs import code_tasks, result_code_paths

    pretrained = {"task": "detection", "config": {"model": {"backbone_weights": "runs/classification/ab/checkpoint.pt"}}}
    assert code_tasks(pretrained) == ("detection", "classification")
    assert code_tasks({"task": "detection", "config": {"model": {"backbone_weights": None}}}) == ("detection",)
    assert code_tasks({"task": "segmentation"}) == ("segmentation",)    # a recovered record without its config
    paths = result_code_paths(code_tasks(pretrained), False)
    assert "tasks/detection" in paths and "tasks/classification" in paths
    assert "tasks/classification" not in result_code_paths("detection", False)
    # an attestation must cover every task the run depends on
    assert not Attestation("a", "b", ("detection",), "cpu").covers(("detection", "classification"), False)
    assert Attestation("a", "b", ("classification", "detection"), "cpu").covers(("detection", "classification"), False)
