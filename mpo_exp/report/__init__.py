"""``mpo-exp-report <sweep dir>``: rebuild the paper's tables and plots from a sweep's results.json files.

Writes into the sweep directory: Table 1 (win rate vs pi_ref per objective and the minimum, mean ±
std over seeds, with a 95% bootstrap interval over eval prompts for the minimum, one block per
beta) as Markdown, LaTeX and CSV; MPO's lambda (lambda.md); the leave-one-out ablation; the cost
table (total and post-processing, ratio to MPO); for fixed user weights (policies named
<method>_<w_1>_..._<w_K>: MOD = fixed_mix, MORLHF, MODPO, RiC) each method's Pareto front with its
per-objective rewards, hypervolume and the cost of the whole front, a stage shared by several jobs
counted once (fixed_weights.md/.csv); and PNG plots (per-objective bars, lambda trajectories, min
win rate vs cost, the Pareto fronts in mean reward per β). A missing or corrupt
results.json is named and skipped. Runs with different objective sets are reported separately, and
jobs with different settings (results.json ``config``, seed aside) get separate rows labelled by the
fields that differ; duplicate rows, shared rows that differ between jobs, NaN or missing values and
older results without per-prompt outcomes are flagged. Jobs are read in Hydra job-number order.

The "min" of a row is the mean over seeds of each seed's minimum over objectives of the win rate.
The best min of a beta is bold only when a paired bootstrap over prompts says it beats the
runner-up (the interval of the difference excludes 0).
"""

from mpo_exp.report.build import build_report, log_to_wandb, main
from mpo_exp.report.cost import cost_rows, policy_cost
from mpo_exp.report.fronts import Front, collect_fronts, hypervolume
from mpo_exp.report.lambdas import lambda_rows
from mpo_exp.report.load import ReportError, Sweep, collect, load_sweep, objective_groups, order_key, pretty
from mpo_exp.report.stats import DEFAULT_B, PromptBootstrap
from mpo_exp.report.table1 import table1

__all__ = [
    "DEFAULT_B",
    "Front",
    "PromptBootstrap",
    "ReportError",
    "Sweep",
    "build_report",
    "collect",
    "collect_fronts",
    "cost_rows",
    "hypervolume",
    "lambda_rows",
    "load_sweep",
    "log_to_wandb",
    "main",
    "objective_groups",
    "order_key",
    "policy_cost",
    "pretty",
    "table1",
]
