"""What a table measures when it is rendered rather than reads from a run: the operator's costs at a config node, and
the trained models' inference speed, timed together."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from carafe.costs import flops_per_pixel, num_params
from reproduction.seeds import row_problem
from reproduction.spec import TableSpec
from tasks.common.distributed import init_world
from tasks.common.engine import load_weights
from tasks.common.experiment import task_class
from tasks.common.factories import build_operator
from tasks.common.provenance import device_name
from tasks.common.run_folder import CHECKPOINT_NAME
from tasks.common.speed import measure_speeds


def measure_costs(spec: TableSpec) -> None:
    """Fill ``cost.flops`` (per input pixel, papers' convention) and ``cost.params`` of each composed row's
    operator at ``spec.costs.node``, built for ``channels`` and ``scale_factor`` (from the seed-0 config: the seed
    does not change the operator)."""
    costs = spec.costs or {}
    for row in spec.rows:
        node = OmegaConf.select(row.config, costs["node"]) if row.config is not None else None
        if node is None:
            row.measure_problem = f"no `{costs['node']}` in the row's config"
            continue
        module = build_operator(node, costs["node"])(channels=int(costs.get("channels", 256)),
                                   scale_factor=int(costs.get("scale_factor", 2)))
        row.measured.update({"cost.flops": float(flops_per_pixel(module)), "cost.params": float(num_params(module))})

def measure_speed(spec: TableSpec) -> str:
    """Time every row's trained model together (``tasks.common.speed.measure_speeds``) on one image of the row's
    ``task.speed_image_size``: the model of the row's first seed whose run folder holds a checkpoint. Fill
    ``speed.fps`` and ``speed.ratio`` (to ``spec.speed.baseline``). Returns the device the speeds were measured on."""
    settings = spec.speed or {}
    world = init_world("auto")
    calls = {}
    for row in spec.rows:
        timed = next((run for run in row.finished_runs()
                      if run.run_dir and (Path(run.run_dir) / CHECKPOINT_NAME).is_file()), None)
        if timed is None:
            row.measure_problem = ("no trained model to time (a result without its run folder)" if row.finished_runs()
                                   else row_problem(row) or "not run")
            continue
        task = task_class(timed.config)(timed.config, world)
        model = load_weights(task.build_model(), Path(timed.run_dir) / CHECKPOINT_NAME).to(world.device).eval()
        image = task.inference_input(*timed.config.task.speed_image_size)
        calls[row.label] = (lambda m=model, x=image: m(x))
    speeds = measure_speeds(calls, int(settings.get("warmup", 3)), int(settings.get("iterations", 10)),
                            world.device) if calls else {}
    baseline = speeds.get(settings.get("baseline"))
    for row in spec.rows:
        if row.label in speeds:
            row.measured["speed.fps"] = speeds[row.label]
            if baseline:
                row.measured["speed.ratio"] = speeds[row.label] / baseline
            else:
                row.measure_problem = f"the baseline row {settings.get('baseline')!r} has no speed"
    return device_name(world.device)


def carry_speed(spec: TableSpec, previous: Path) -> str | None:
    """Speed columns that cannot be timed now (the trained models are not on this machine) taken from the table's
    previous rendering, for rows whose seed-0 run is the same; returns where that rendering measured them."""
    if not spec.speed or not previous.is_file():
        return None
    try:
        data = json.loads(previous.read_text())
        metrics = {c["key"]: c["metric"] for c in data["columns"]}
        by_label = {row["label"]: row for row in data["rows"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    carried = False
    for row in spec.rows:
        old = by_label.get(row.label)
        if old is None or old.get("config_hash") != row.config_hash or any(k.startswith("speed.") for k in row.measured):
            continue
        values = old.get("render_measured") if "render_measured" in old else {
            metrics[k]: v for k, v in (old.get("measured") or {}).items() if k in metrics}
        speed = {k: float(v) for k, v in (values or {}).items() if k.startswith("speed.") and isinstance(v, (int, float))}
        if speed:
            row.measured.update(speed)
            row.measure_problem = ""
            carried = True
    where = (data.get("provenance") or {}).get("speed measured on")
    return f"{where} (carried over from the previous rendering: the trained models are not on this machine)" \
        if carried and where else None
