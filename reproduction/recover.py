"""Recover run records (``results/runs/<hash>.json``) from tables rendered before records existed.

    python scripts/recover_records.py                      # every results/table-*.json of the older format

Tables rendered before run records (format 1) kept each seed's measured cells and its run's commit, device, times
and dataset. This writes one record per run they name: the metrics are the cells mapped back to metric names through
each table's columns (the union over every table that shows the run), the resolved config is the one the current
table specs compose to that hash (the committed tables' hashes are checked to compose unchanged), and
``recovered_from`` names the table files. Where tables show two different results for one run id (the config was
trained again and only some tables were rendered again), the most recently finished run is kept, as a retrained
config's record replaces the old one; the script prints every such case. It never overwrites an existing record.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from reproduction.records import RECORDS_DIR_NAME, load_records, write_record
from reproduction.render import committed_tables
from reproduction.spec import MEASURED_AT_RENDER, compose_rows, load_table_spec
from tasks.common.provenance import REPO_ROOT, git_commit

NOT_RECORDED = ["history", "per-class and other metrics the tables did not show", "segments", "threads", "torch",
                "clean (beyond the commit's +dirty mark)"]


def _nested(metrics: dict, dotted: str, value: float) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        metrics = metrics.setdefault(key, {})
    metrics[leaf] = value


def recover(results_dir: Path) -> tuple[dict[str, dict], list[str]]:
    """The records the older table JSONs in ``results_dir`` hold, and a line for every run id shown with two
    results."""
    seen: dict[str, list[tuple[dict, dict, str, str]]] = {}   # hash -> (run info, metrics, table, scale)
    commit = git_commit()
    for path in committed_tables(results_dir):
        data = json.loads(path.read_text())
        if data.get("format") is not None:
            continue
        columns = {c["key"]: c["metric"] for c in data["columns"]}
        for row in data["rows"]:
            for seed in row.get("seeds") or [row]:
                if not seed.get("config_hash") or not seed.get("run") or not seed.get("measured"):
                    continue
                metrics: dict = {}
                for key, value in seed["measured"].items():
                    metric = columns.get(key)
                    if metric is not None and not metric.startswith(MEASURED_AT_RENDER) and value is not None:
                        _nested(metrics, metric, float(value))
                seen.setdefault(seed["config_hash"], []).append(
                    (seed["run"], metrics, f"results/{path.name}", data["provenance"]["scale"]))
    configs: dict[str, dict] = {}
    tables = sorted({Path(t).stem.removeprefix("table-") for shown in seen.values() for _, _, t, _ in shown})
    for name in tables:
        spec = load_table_spec(name)
        data = json.loads((results_dir / f"table-{name}.json").read_text())
        compose_rows(spec, data["provenance"]["scale"], seeds=max(len(r.get("seeds") or [r]) for r in data["rows"]))
        for row in spec.rows:
            for run in row.runs:
                configs[run.config_hash] = OmegaConf.to_container(run.config, resolve=True)
    records, conflicts = {}, []
    for config_hash, shown in seen.items():
        latest = max(info["finished_at"] for info, _, _, _ in shown)
        kept = [entry for entry in shown if entry[0]["finished_at"] == latest]
        dropped = [entry for entry in shown if entry[0]["finished_at"] != latest]
        if dropped:
            conflicts.append(f"{config_hash}: {sorted({t for _, _, t, _ in dropped})} showed the run finished "
                             f"{sorted({i['finished_at'] for i, _, _, _ in dropped})}; kept the one finished {latest} "
                             f"({sorted({t for _, _, t, _ in kept})})")
        info = kept[0][0]
        metrics: dict = {}
        for _, values, _, _ in kept:
            for key, value in values.items():
                if isinstance(value, dict):
                    metrics.setdefault(key, {}).update(value)
                else:
                    metrics[key] = value
        config = configs.get(config_hash)
        records[config_hash] = {
            "config_hash": config_hash, "status": "finished",
            "task": config["task"]["name"] if config else "unknown", "scale": info.get("scale") or kept[0][3],
            "metrics": metrics, "primary_metric": None, "history": None, "dataset": info["dataset"],
            "device": info["device"], "world_size": info.get("world_size", 1), "threads": None,
            "train_seconds": info.get("train_seconds"), "wall_seconds": info.get("wall_seconds"), "segments": None,
            "commit": info["commit"], "clean": not str(info["commit"]).endswith("+dirty"), "diff_sha256": None,
            "finished_at": info["finished_at"], "torch": None, "config": config,
            "recovered_from": "; ".join(sorted({t for _, _, t, _ in kept})) + f" at commit {commit[:12]}",
            "not_recorded": NOT_RECORDED,
        }
    return records, conflicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "results", help="the rendered tables' folder")
    args = parser.parse_args(argv)
    records_dir = args.results / RECORDS_DIR_NAME
    existing = load_records(records_dir)
    records, conflicts = recover(args.results)
    for line in conflicts:
        print(f"two results for one run id: {line}", file=sys.stderr)
    written = 0
    for config_hash, record in sorted(records.items()):
        if config_hash in existing:
            continue
        write_record(record, records_dir)
        written += 1
    print(f"wrote {written} records to {records_dir} ({len(records) - written} already had one)", file=sys.stderr)
    return 0
