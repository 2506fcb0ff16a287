"""build_report: every table and plot of a sweep, per objective set; and the command line."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections import Counter
from pathlib import Path

from mpo_exp.report.ablation import ablation_markdown
from mpo_exp.report.budgets import budgets_markdown
from mpo_exp.report.closed_form import closed_form_markdown
from mpo_exp.report.cost import cost_markdown, cost_rows
from mpo_exp.report.curves import collect_curves, curve_plots, curves_markdown
from mpo_exp.report.fronts import collect_fronts
from mpo_exp.report.fronts_table import fronts_csv, fronts_markdown
from mpo_exp.report.lambdas import lambda_markdown, lambda_rows
from mpo_exp.report.load import (
    Records,
    ReportError,
    collect,
    disagreements_note,
    load_sweep,
    normalization_line,
    objective_groups,
    pi_ref_fingerprint,
    settings_note,
)
from mpo_exp.report.options import landscapes, options_markdown
from mpo_exp.report.plots import front_plots, make_plots
from mpo_exp.report.policies import policies_markdown
from mpo_exp.report.stats import DEFAULT_B, PromptBootstrap
from mpo_exp.report.table1 import paper_table_markdown, table1
from mpo_exp.report.versus import versus_markdown

log = logging.getLogger("mpo_exp.report")


def duplicates_note(records: Records) -> str:
    dups = records.duplicates
    items = []
    for d in dups:
        label = records.label(d.key)
        if d.norm and f"[{d.norm}]" not in label:
            label += f" [{d.norm}]"
        items.append(f"{label} at β={d.beta:g}, seed {d.seed}: kept `{d.kept}`, dropped `{d.dropped}`")
    return (
        f"Duplicates: {len(dups)} (β, seed, policy, setting) row(s) came from more than one job run with "
        "the same config; the lowest job number is kept and the other is not averaged in: "
        + "; ".join(items)
        + "."
    )


def unpaired_note(runs: list[dict]) -> str | None:
    """Runs written before the π_ref fingerprint that share a (β, seed) with another run: their rows
    pair with that run's by (seed, number of prompts) alone."""
    per_cell = Counter((float(r["beta"]), int(r["seed"])) for r in runs)  # rows pair within (β, seed)
    legacy = [
        r["_rel"]
        for r in runs
        if pi_ref_fingerprint(r) is None
        and per_cell[float(r["beta"]), int(r["seed"])] > 1
        and any(isinstance(m, dict) and "win_per_prompt" in m for m in r["policies"].values())
    ]
    if not legacy:
        return None
    log.warning(
        "no pi_ref_fingerprint in %d results.json (%s ...): their rows are paired by (seed, prompts) alone",
        len(legacy),
        legacy[0],
    )
    return (
        "No π_ref fingerprint in " + ", ".join(f"`{d}`" for d in legacy) + " (results written before it was "
        "recorded): paired intervals treat their rows as measured against the same π_ref responses "
        "whenever seed and number of prompts match, unchecked."
    )


def _slug(objectives: list[str]) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", "-".join(objectives))


def build_report(
    root: str | os.PathLike, paper: bool = False, plots: bool = True, n_boot: int = DEFAULT_B
) -> dict:
    sweep = load_sweep(root)
    if not sweep.runs:
        raise SystemExit(f"no readable results.json under {root}")
    out = Path(root)
    groups = objective_groups(sweep.runs)
    multi = len(groups) > 1
    boot = PromptBootstrap(n_boot)
    h = "###" if multi else "##"
    md_parts: dict[str, list[str]] = {
        "table1": [],
        "cost": [],
        "lambda": [],
        "ablation": [],
        "closed_form": [],
        "fixed_weights": [],
        "options": [],
        "landscape": [],
        "curves": [],
        "policies": [],
        "budgets": [],
    }
    report_parts: list[str] = []
    rows, costs, lambdas, images, dups, tables, all_fronts = [], [], [], [], [], [], []
    for objectives, runs in groups:
        suffix = f"_{_slug(objectives)}" if multi else ""
        heading = f"## Objectives: {', '.join(objectives)} ({len(runs)} runs)"
        records = collect(runs)
        t1 = table1(objectives, records, boot)
        norm = normalization_line(runs, records)
        if norm:
            t1.notes.append(norm)
        for note in (settings_note(records), disagreements_note(records), unpaired_note(runs)):
            if note:
                t1.notes.append(note)
        if records.duplicates:
            t1.notes.append(duplicates_note(records))
        md = t1.markdown()
        versus = versus_markdown(t1.rows)
        if versus:
            md += "\n\n" + versus
        (out / f"table1{suffix}.tex").write_text(t1.latex())
        (out / f"table1{suffix}.csv").write_text(t1.csv())
        group_costs, cost_notes = cost_rows(records)
        cost_md = cost_markdown(group_costs, cost_notes)
        lam_rows = lambda_rows(objectives, runs)
        lam_md = lambda_markdown(objectives, lam_rows) if lam_rows else None
        ablation = ablation_markdown(objectives, records)
        closed = closed_form_markdown(objectives, records, boot)
        options = options_markdown(objectives, runs, records, boot)
        land_md, land_images = landscapes(runs, out, suffix, plots)
        images += land_images
        policies_md = policies_markdown(objectives, records)
        budgets_md = budgets_markdown(runs)
        curves = collect_curves(runs, boot)
        curves_md = curves_markdown(curves)
        fronts, refs = collect_fronts(objectives, runs, boot)
        fixed = fronts_markdown(objectives, fronts, refs) if fronts else None
        if fronts:
            (out / f"fixed_weights{suffix}.csv").write_text(fronts_csv(objectives, fronts))
        for key, text in (
            ("table1", md),
            ("cost", cost_md),
            ("lambda", lam_md),
            ("ablation", ablation),
            ("closed_form", closed),
            ("fixed_weights", fixed),
            ("options", options),
            ("landscape", land_md),
            ("curves", curves_md),
            ("policies", policies_md),
            ("budgets", budgets_md),
        ):
            if text:
                md_parts[key].append(f"{heading}\n\n{text}" if multi else text)
        if multi:
            report_parts += ["", heading]
        report_parts += ["", f"{h} Table 1: win rate vs π_ref (%)", "", md]
        if policies_md:
            report_parts += ["", f"{h} Rewards, KL and cost per policy", "", policies_md]
        report_parts += ["", f"{h} Cost", "", cost_md]
        if lam_md:
            report_parts += ["", f"{h} MPO's λ", "", lam_md]
        if ablation:
            report_parts += ["", f"{h} Leave-one-out ablation (z-normalised reward)", "", ablation]
        if closed:
            report_parts += ["", f"{h} RL against its closed form", "", closed]
        if fixed:
            report_parts += ["", f"{h} Fixed user weights: Pareto fronts", "", fixed]
        if options:
            report_parts += ["", f"{h} MPO's variants (objective, proposal, calibration)", "", options]
        if land_md:
            report_parts += ["", f"{h} λ landscapes", "", land_md]
        if curves_md:
            report_parts += ["", f"{h} Cost to quality (checkpoints along training)", "", curves_md]
        if budgets_md:
            report_parts += ["", f"{h} Budgets", "", budgets_md]
        if plots:
            images += make_plots(objectives, runs, t1.rows, group_costs, out, suffix)
            images += front_plots(objectives, fronts, refs, out, suffix)
            images += curve_plots(curves, out, suffix)
        rows += t1.rows
        costs += group_costs
        lambdas += lam_rows
        dups += records.duplicates
        tables.append(t1)
        all_fronts += fronts

    table1_md = "\n\n".join(md_parts["table1"])
    if paper:
        table1_md += "\n\n" + paper_table_markdown()
    texts = {key: "\n\n".join(parts) or None for key, parts in md_parts.items()}
    (out / "table1.md").write_text(table1_md + "\n")
    (out / "cost.md").write_text(texts["cost"] + "\n")
    for key in (
        "lambda",
        "ablation",
        "closed_form",
        "fixed_weights",
        "options",
        "landscape",
        "curves",
        "policies",
        "budgets",
    ):
        if texts[key]:
            (out / f"{key}.md").write_text(texts[key] + "\n")

    parts = ["# Sweep report", "", f"{len(sweep.runs)} runs read from `{out}`."]
    if sweep.skipped:
        parts += ["", "Skipped:"] + [f"- `{p}`: {why}" for p, why in sweep.skipped]
    if multi:
        parts += [
            "",
            "The runs do not share one objective set; each set is reported on its own (never merged), "
            "with its own table1_<objectives>.{tex,csv} and plots: "
            + "; ".join(f"{', '.join(o)} ({len(r)} runs)" for o, r in groups)
            + ".",
        ]
    parts += report_parts
    if paper:
        parts += ["", "## Published Table 1", "", paper_table_markdown()]
    parts += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images]
    (out / "report.md").write_text("\n".join(parts) + "\n")
    return {
        "runs": sweep.runs,
        "skipped": sweep.skipped,
        "groups": [o for o, _ in groups],
        "table1": table1_md,
        "tables": tables,
        "cost": texts["cost"],
        "lambda": texts["lambda"],
        "ablation": texts["ablation"],
        "closed_form": texts["closed_form"],
        "fixed_weights": texts["fixed_weights"],
        "options": texts["options"],
        "landscape": texts["landscape"],
        "curves": texts["curves"],
        "fronts": all_fronts,
        "duplicates": dups,
        "images": images,
        "rows": rows,
        "costs": costs,
        "lambda_rows": lambdas,
    }


def log_to_wandb(report: dict, root: Path, mode: str) -> None:
    import wandb

    run = wandb.init(
        project="mpo-exp",
        name=f"report-{root.name}",
        group=root.name,
        job_type="report",
        mode=mode,
        dir=str(root),
    )
    try:
        for table in report["tables"]:
            objs = table.objectives
            cols = ["beta", "policy", *objs, "min", "min_ci_low", "min_ci_high", "bold", "seeds"]
            data = [
                [
                    r["beta"],
                    r["label"],
                    *[r[o][0] if r[o] else None for o in objs],
                    r["min"][0] if r["min"] else None,
                    *(r["ci"] or (None, None)),
                    r["bold"],
                    r["seeds"],
                ]
                for r in table.rows
            ]
            name = "table1" if len(report["tables"]) == 1 else f"table1_{_slug(objs)}"
            run.log({name: wandb.Table(columns=cols, data=data)})
        run.log({p.stem: wandb.Image(str(p)) for p in report["images"]})
    finally:
        wandb.finish()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="mpo-exp-report",
        description=sys.modules[__package__].__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sweep_dir", help="a Hydra multirun directory (or any folder of run directories)")
    parser.add_argument(
        "--paper", action="store_true", help="print the paper's published Table 1 beside ours"
    )
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=DEFAULT_B,
        metavar="B",
        help=f"bootstrap resamples of the eval prompts for the min's interval (default: {DEFAULT_B})",
    )
    parser.add_argument(
        "--wandb",
        choices=["disabled", "offline", "online"],
        default="disabled",
        help="also log tables and plots to wandb (default: disabled)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        report = build_report(
            args.sweep_dir, paper=args.paper, plots=not args.no_plots, n_boot=args.bootstrap
        )
    except ReportError as e:
        raise SystemExit(f"mpo-exp-report: {e}") from e
    print(report["table1"])
    for key in ("cost", "lambda", "ablation", "fixed_weights", "options"):
        if report[key]:
            print()
            print(report[key])
    for path, why in report["skipped"]:
        print(f"skipped {path}: {why}")
    print(f"\nwrote {Path(args.sweep_dir) / 'report.md'} and {len(report['images'])} plots")
    if args.wandb != "disabled":
        log_to_wandb(report, Path(args.sweep_dir), args.wandb)
