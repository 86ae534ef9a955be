#!/usr/bin/env python
"""Parameters and FLOPs per input pixel of every upsampler and downsampler in the zoo (papers' convention).

    python scripts/op_costs.py                                  # markdown tables, C = 256, sigma = 2
    python scripts/op_costs.py --json                           # [{"name", "direction", "flops_per_pixel", "params"}]
    python scripts/op_costs.py --channels 128 --scale 4 --set carafe.compressed_channels=32 --set down.lip.variant=bottleneck
    python scripts/op_costs.py --grids                          # CARAFE over the rows of ICCV Tables 8, 9 and 10
    python scripts/op_costs.py --write results/op-costs.md      # everything above, with the paper's Table 2 beside ours

``--set OP.KEY=VALUE`` sets an option of upsampler OP (``up.OP.KEY=VALUE`` is the same); ``down.OP.KEY=VALUE`` of
downsampler OP. Values are Python literals (``32``, ``None``, ``'bottleneck'``) or bare strings.

The papers' figures (Table 2's costs, the AP of Tables 8 to 10) and the rows of the grids are read from the table
specs ``conf/table/<N>.yaml``; this script computes only our side.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from carafe import DOWNSAMPLERS, UPSAMPLERS, build_downsampler, build_upsampler
from carafe.costs import as_number, carafe_paper_flops, flops_per_pixel, num_params, paper_round
from reproduction.measure import measure_costs
from reproduction.spec import SeedRun, load_table_spec, row_overrides
from tasks.common.experiment import compose
from tasks.common.io import write_text_atomic
from tasks.common.provenance import git_commit

UP_LABELS = {"dysample": "DySample (ICCV 2023)"}  # upsamplers beyond Table 2; its rows name the others
DOWN_LABELS = {"strided_conv": "Strided Conv", "max_pool": "Max Pool", "avg_pool": "Avg Pool", "dpp": "DPP",
               "lip": "LIP", "carafe": "CARAFE++"}
GRID_TABLES = ("8", "9", "10")  # ICCV ablations of CARAFE in the FPN: C_m; (k_enc, k_up); the kernel normalizer


def table2_figures() -> dict[str, tuple[str, str, str]]:
    """Zoo name -> (row label, FLOPs, params as printed) from ICCV Table 2's spec, whose rows each set the FPN's
    upsampler by name."""
    spec = load_table_spec("2")
    prefix = f"upsampler@{spec.costs['node']}="
    figures = {}
    for row in spec.rows:
        (name,) = [o.removeprefix(prefix) for o in row.overrides if o.startswith(prefix)]
        figures[name] = (row.label, str(row.paper["flops"]), str(row.paper["params"]))
    return figures


def parse_sets(items: list[str]) -> dict[tuple[str, str], dict[str, Any]]:
    """``["carafe.compressed_channels=32", "down.lip.variant=bottleneck"]`` -> {("up", "carafe"): {...}, ...}."""
    options: dict[tuple[str, str], dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) not in (2, 3):
            raise SystemExit(f"--set expects [up.|down.]OP.KEY=VALUE, got {item!r}")
        direction = parts[0] if len(parts) == 3 else "up"
        op, option = parts[-2], parts[-1]
        registry = {"up": UPSAMPLERS, "down": DOWNSAMPLERS}.get(direction)
        if registry is None:
            raise SystemExit(f"--set direction must be 'up' or 'down', got {direction!r} in {item!r}")
        if op not in registry:
            raise SystemExit(f"--set: unknown {registry.kind} {op!r}; known: {', '.join(registry.names)}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = {"none": None, "null": None}.get(raw.lower(), raw)
        options.setdefault((direction, op), {})[option] = value
    return options


def op_rows(channels: int, scale: int, options: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for direction, registry, build in (("up", UPSAMPLERS, build_upsampler), ("down", DOWNSAMPLERS, build_downsampler)):
        for name in registry.names:
            with torch.device("meta"):  # parameters need shapes only, not memory
                module = build(name, channels, scale, **options.get((direction, name), {}))
            rows.append({"name": name, "direction": direction, "flops_per_pixel": flops_per_pixel(module),
                         "params": num_params(module)})
    return rows


def grid_rows(channels: int, scale: int) -> dict[str, list[dict[str, Any]]]:
    """CARAFE's costs over the rows of ICCV Tables 8, 9 and 10 (each row's composed FPN upsampler, built for
    ``channels`` and ``scale``), with the paper's AP: table name -> rows."""
    grids = {}
    for name in GRID_TABLES:
        spec = load_table_spec(name)
        spec.costs = {**spec.costs, "channels": channels, "scale_factor": scale}
        for row in spec.rows:  # composed, not validated: validation would import the detection task for nothing
            row.runs = [SeedRun(0)]
            row.runs[0].config = compose(row_overrides(spec, row, "tiny"))
        measure_costs(spec)
        rows = []
        for row in spec.rows:
            up = row.config[spec.costs["node"]]
            rows.append({"label": row.label, "compressed_channels": up.compressed_channels,
                         "encoder_kernel": up.encoder_kernel, "up_kernel": up.up_kernel, "normalizer": up.normalizer,
                         "flops_per_pixel": as_number(Fraction(row.measured["cost.flops"])),
                         "params": as_number(Fraction(row.measured["cost.params"])), "paper_ap": row.paper["AP"]})
        grids[name] = rows
    return grids


def _fmt(value: float | int) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:,.2f}"


def markdown(rows: list[dict[str, Any]], channels: int, scale: int, compare: bool) -> str:
    table2 = table2_figures()
    out = [f"### Upsamplers (C = {channels}, sigma = {scale}; FLOPs per input pixel)", ""]
    if compare:
        out += ["| op | FLOPs | Params | FLOPs, Table 2 | Params, Table 2 | exact FLOPs | exact params |",
                "|---|---|---|---|---|---|---|"]
    else:
        out += ["| op | FLOPs | Params | exact FLOPs | exact params |", "|---|---|---|---|---|"]
    for r in (r for r in rows if r["direction"] == "up"):
        name, flops, params = r["name"], r["flops_per_pixel"], r["params"]
        label = f"{table2[name][0] if name in table2 else UP_LABELS[name]} (`{name}`)"
        if compare and name in table2:
            _, paper_f, paper_p = table2[name]
            out.append(f"| {label} | {paper_round(flops, like=paper_f)} | {paper_round(params, like=paper_p)} "
                       f"| {paper_f} | {paper_p} | {_fmt(flops)} | {_fmt(params)} |")
        elif compare:
            out.append(f"| {label} | {paper_round(flops)} | {paper_round(params)} | – | – | {_fmt(flops)} "
                       f"| {_fmt(params)} |")
        else:
            out.append(f"| {label} | {paper_round(flops)} | {paper_round(params)} | {_fmt(flops)} | {_fmt(params)} |")
    out += ["", f"### Downsamplers (C = {channels}, sigma = {scale}; FLOPs per input, high-resolution, pixel)", "",
            "| op | FLOPs | Params | exact FLOPs | exact params |", "|---|---|---|---|---|"]
    for r in (r for r in rows if r["direction"] == "down"):
        out.append(f"| {DOWN_LABELS[r['name']]} (`{r['name']}`) | {paper_round(r['flops_per_pixel'])} "
                   f"| {paper_round(r['params'])} | {_fmt(r['flops_per_pixel'])} | {_fmt(r['params'])} |")
    return "\n".join(out) + "\n"


def grids_markdown(grids: dict[str, list[dict[str, Any]]], channels: int, scale: int) -> str:
    out = []
    for name, rows in grids.items():
        title = load_table_spec(name).title.split(";")[0]
        out += [f"### CARAFE over the rows of {title} (C = {channels}, sigma = {scale})", "",
                "| row | FLOPs | Params | exact FLOPs | exact params | paper formula | AP (paper) |",
                "|---|---|---|---|---|---|---|"]
        for r in rows:
            cm = r["compressed_channels"]
            formula = ("n/a (no compressor)" if cm is None else
                       _fmt(carafe_paper_flops(channels, scale, cm, r["encoder_kernel"], r["up_kernel"])))
            out.append(f"| {r['label']} | {paper_round(r['flops_per_pixel'])} | {paper_round(r['params'])} "
                       f"| {_fmt(r['flops_per_pixel'])} | {_fmt(r['params'])} | {formula} | {r['paper_ap']} |")
        out.append("")
    return "\n".join(out)


NOTES = """
### How these numbers are counted, and where they differ from the paper

Convention (`carafe/costs.py`): a multiply-add is 2 FLOPs; a conv's bias is one more multiply-add per output element
(the `(C_in + 1)` of the CARAFE formula); bilinear interpolation / grid sampling is 4 multiply-adds per output
element; a lone elementwise product or sum is 1 FLOP; copies, comparisons, nonlinearities and normalisations
(softmax, sigmoid, BN/IN) are 0. Upsamplers are counted per low-resolution input pixel (as Table 2); downsamplers per
high-resolution input pixel (the papers print none; per input pixel is the cost of processing a map of a given
size). `tests/test_costs.py` checks every formula against a count of the aten operations a module runs.

Every Table 2 figure is matched at the paper's printed precision; CARAFE is exact (199,496 FLOPs, 74,148 params).
Readings behind the figures the paper does not define:
- Bilinear, 8k: 4 multiply-adds per output element, sigma^2 C = 1,024 elements per input pixel: 8,192.
- N.C. / B.C.: the 3x3 conv runs at the output resolution, sigma^2 x 2(9C + 1)C = 4,720,640 (+ 8,192 for bilinear).
- Deconv: 3x3 kernel, stride 2 (590,080 params). The ICCV introduction prints 1180k, which is 2 x 9 x C^2 =
  1,179,648 with the bias left out (or 1,180,160 if the conv formula 2(9C + 1)C is applied on the input grid);
  counting the bias at its sigma^2 C output elements gives 1,181,696. All three are Table 2's 1.2M; we keep the
  faithful bias count, like every other conv here.
- P.S.: 3x3 conv C -> 4C at the input resolution, then the shuffle: 4,720,640 FLOPs, 2,360,320 params.
- GUM: the paper gives no layout; 132k params running at the output resolution is what both published figures
  require (2 x 132k x sigma^2 = 1.06M). Ours: guidance branch of 1x1 convs C -> C -> C -> 2 (ReLU) on the
  nearest-upsampled map, offsets added to the bilinear sampling positions, bilinear sampling of the input:
  132,098 params, 1,064,984 FLOPs. The exact layout is our choice; the published numbers fix only its size.
- S.A.: bilinear upsampling (8,192) + 3x3 conv C -> 1 with sigmoid at the output resolution (18,440) + rescaling the
  upsampled map (1,024): 27,656 FLOPs, 2,305 params. A nearest-based reading (19,464 FLOPs) cannot give 28k.

DySample (ICCV 2023) is beyond the papers; the default is its 'lp' style, static scope, 4 groups: a 1x1 conv
C -> 2 x 4 x sigma^2 = 32 offsets (16,448), the offsets added to the bilinear sampling positions (32) and bilinear
sampling of the input (8,192): 24,672 FLOPs, 8,224 params.

The rows of the three grids are those of `conf/table/8.yaml`, `9.yaml` and `10.yaml` (the tables
`make reproduce-table-8` and so on train), and their AP column is the paper's figure declared there.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=256, help="C, input = output channels (default 256)")
    parser.add_argument("--scale", type=int, default=2, help="sigma, the integer scale factor (default 2)")
    parser.add_argument("--set", action="append", default=[], metavar="[up.|down.]OP.KEY=VALUE",
                        help="an option of one operator, e.g. carafe.compressed_channels=32 (repeatable)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    parser.add_argument("--grids", action="store_true", help="also CARAFE's costs over ICCV Tables 8, 9 and 10")
    parser.add_argument("--write", type=Path, metavar="PATH",
                        help="write the markdown report (with the grids and Table 2 beside ours) to PATH")
    args = parser.parse_args(argv)
    if args.channels < 1 or args.scale < 1:
        parser.error("--channels and --scale must be >= 1")

    options = parse_sets(args.set)
    rows = op_rows(args.channels, args.scale, options)
    compare = args.channels == 256 and args.scale == 2 and not any(d == "up" for d, _ in options)
    grids = grid_rows(args.channels, args.scale) if args.grids or args.write else None

    if args.json:
        payload: Any = rows
        if grids is not None:
            payload = {"ops": rows, **{f"table{name}": grid for name, grid in grids.items()}}
        print(json.dumps(payload, indent=2))
    else:
        text = markdown(rows, args.channels, args.scale, compare)
        if args.grids:
            text += "\n" + grids_markdown(grids, args.channels, args.scale)
        print(text, end="")

    if args.write:
        command = " ".join(["python", "scripts/op_costs.py", *(argv if argv is not None else sys.argv[1:])])
        header = (f"# Operator costs: parameters and FLOPs per input pixel\n\n"
                  f"- command: `{command}`\n- commit: {git_commit()}\n"
                  f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}\n"
                  f"- torch: {torch.__version__}\n\n"
                  "Table 2 columns are the ICCV 2019 paper's, printed figures; ours are rounded to the same "
                  "precision, and exact beside.\n\n")
        report = (header + markdown(rows, args.channels, args.scale, compare) + "\n"
                  + grids_markdown(grids, args.channels, args.scale) + NOTES)
        write_text_atomic(args.write, report)
        print(f"wrote {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
