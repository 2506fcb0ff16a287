"""The lambda landscape (``method=landscape``): where MPO's lambda sits on the simplex, and why.

For K <= 3 objectives, every lambda on a simplex grid is decoded token by token on the run's eval
prompts (the Evaluator's prompts, compared with the same pi_ref responses) and given (a) the
judge's per-objective win rates against pi_ref and (b) the decoded policy's KL to each pi_k (and to
pi_ref), read exactly per token (:func:`mpo_exp.mpo.decoded.decode_kl`). max_k KL is MPO's own
max-min objective for that policy. The MPO variants in ``options`` (``paper``, ``mixture``,
``decoded``, each optionally ``_std`` / ``_kl_ref`` calibrated) are fitted on the same shared
stages, marked on the same axes, and returned as policies, so the pipeline evaluates them beside
uniform mixing exactly as it evaluates ``method=mpo``.
The figure (``landscape.png``: curves for K = 2, triangle heat-maps for K = 3) is written into the
run's directory, and ``mpo-exp-report`` redraws it from ``results.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from mpo_exp import distributed as dist
from mpo_exp.evaluation import Evaluator, win_outcomes
from mpo_exp.generation import decode_prompts, decode_responses
from mpo_exp.methods import Method, MethodOutput
from mpo_exp.mpo.decoded import decode_kl, kl_gradients
from mpo_exp.mpo.method import CALIBRATIONS, MPOMethod

if TYPE_CHECKING:
    from mpo_exp.context import RunContext

log = logging.getLogger(__name__)

#: a variant's label: <base>[_<calibration>], each base an (objective, proposal)
BASES = {
    "paper": ("sequence", "reference"),
    "mixture": ("sequence", "mixture"),
    "decoded": ("decoded", "reference"),
}
DEFAULT_OPTIONS = ["paper", "mixture", "decoded", "paper_std", "mixture_std", "decoded_std"]


def option_overrides(label: str) -> dict[str, str]:
    """``decoded_std`` -> objective=decoded, proposal=reference, calibration=std (of ``method.mpo``)."""

    base, _, calibration = label.partition("_")
    if base not in BASES or (calibration and calibration not in CALIBRATIONS):
        raise ValueError(
            f"method.options: unknown variant {label!r}; a variant is <base>[_<calibration>] with base in "
            f"{sorted(BASES)} and calibration in {list(CALIBRATIONS[1:])} (e.g. decoded_std)"
        )
    objective, proposal = BASES[base]
    return {"objective": objective, "proposal": proposal, "calibration": calibration or "none"}


def simplex_grid(k: int, step: float) -> list[list[float]]:
    """Every point of the K-simplex whose coordinates are multiples of ``step`` (1/step an integer)."""
    n = round(1 / step)
    if abs(n * step - 1) > 1e-9:
        raise ValueError(f"method.step must divide 1 (1/step an integer), got {step}")

    def rec(left: int, dims: int) -> list[list[int]]:
        if dims == 1:
            return [[left]]
        return [[i, *rest] for i in range(left, -1, -1) for rest in rec(left - i, dims - 1)]

    return [[c / n for c in point] for point in rec(n, k)]


class LandscapeMethod(Method):
    """Decode a simplex grid of lambda and the MPO variants; record win rates and decoded KLs."""

    name = "landscape"

    def __init__(
        self,
        mpo: MPOMethod,
        step: float = 0.1,
        options: Sequence[str] | None = None,
        max_objectives: int = 3,
    ) -> None:
        if not 0 < float(step) <= 0.5:
            raise ValueError(f"method.step must be in (0, 0.5], got {step}")
        simplex_grid(2, float(step))  # 1/step must be an integer
        self.mpo, self.step, self.max_objectives = mpo, float(step), int(max_objectives)
        labels = list(DEFAULT_OPTIONS if options is None else options)
        if not labels or len(set(labels)) != len(labels):
            raise ValueError(f"method.options must name one or more distinct variants, got {labels}")
        self.options: dict[str, MPOMethod] = {
            label: mpo.variant(**option_overrides(label)) for label in labels
        }

    def validate(self, objectives: list[str]) -> None:
        if not 2 <= len(objectives) <= self.max_objectives:
            raise ValueError(
                f"method=landscape draws K = 2 or 3 objectives (a grid of step {self.step}); "
                f"task.objectives has {len(objectives)}"
            )
        for opt in self.options.values():
            opt.validate(objectives)

    def run(self, ctx: RunContext) -> MethodOutput:
        singles = ctx.single_objective_policies
        names = list(singles)
        ref = ctx.reference
        outputs = {label: opt.run(ctx) for label, opt in self.options.items()}
        ev = Evaluator(
            ctx.task,
            ref,
            int(ctx.cfg.eval.n_prompts),
            ctx.seed + 2,  # the pipeline's Evaluator: the same prompts and pi_ref responses
            ctx.batch_size,
            float(ctx.cfg.eval.temperature),
            0,
            sample_batch_size=ctx.sample_batch_size,
            own_logprobs=ctx.dtype == "float32",
        )
        with ctx.meter.stage("diagnostics/landscape"):
            baseline = ev.reference_rewards()
            models = [*(singles[n].model for n in names), ref.policies[0].model]
            points = []
            grid = simplex_grid(len(names), self.step)
            for lam in tqdm(grid, desc="landscape", leave=False, disable=None):
                points.append({"lambda": lam, **self._point(ctx, ev, baseline, models, [*lam, 0.0])})
            marked = {}
            for label, out in outputs.items():
                ex = out.extras["exponents"]
                a = [ex.get(n, 0.0) for n in names] + [ex.get("pi_ref", 0.0)]
                lam = [out.weights[n] for n in names]
                marked[label] = {
                    "policy": out.policies[0].name,
                    "lambda": lam,
                    "exponents": a,
                    "options": out.extras["options"],
                    **self._point(ctx, ev, baseline, models, a),
                }
        best_kl = min(points, key=lambda p: p["max_kl"])
        best_win = max(points, key=lambda p: p["min_win"])
        log.info(
            "landscape (%d points, step %g): smallest max-KL at lambda=%s (max KL %.3f, min win %.3f); "
            "best min win at lambda=%s (%.3f)",
            len(points),
            self.step,
            best_kl["lambda"],
            best_kl["max_kl"],
            best_kl["min_win"],
            best_win["lambda"],
            best_win["min_win"],
        )
        for label, p in marked.items():
            log.info(
                "  %s (%s): lambda=%s max KL %.3f min win %.3f",
                label,
                p["policy"],
                [round(x, 3) for x in p["lambda"]],
                p["max_kl"],
                p["min_win"],
            )
        landscape = {
            "objectives": names,
            "step": self.step,
            "eval_prompts": len(ev.prompts),
            "points": points,
            "options": marked,
        }
        if dist.is_main():
            from mpo_exp.report.landscape import plot_landscape

            plot_landscape(
                landscape, ctx.output_dir / "landscape.png", title=f"β={ctx.beta:g}, seed {ctx.seed}"
            )
        policies = [out.policies[0] for out in outputs.values()]
        costs = {k: v for out in outputs.values() for k, v in out.costs.items()}
        paper = outputs.get("paper") or next(iter(outputs.values()))
        return MethodOutput(
            policies=policies,
            costs=costs,
            weights=paper.weights,
            extras={
                "landscape": landscape,
                "option_lambdas": {label: p["lambda"] for label, p in marked.items()},
                "option_extras": {
                    label: {k: v for k, v in out.extras.items() if k not in ("bsmd",)}
                    for label, out in outputs.items()
                },
            },
        )

    @staticmethod
    def _point(ctx: RunContext, ev: Evaluator, baseline: torch.Tensor, models, exponents) -> dict:
        """Decode the eval prompts at ``exponents`` (over [pi_1..pi_K, pi_ref]) with common random numbers."""
        tok = ctx.reference.tokenizer
        torch.manual_seed(ctx.seed * 7919 + 12345)
        dist.seed_rank_stream()
        d = decode_kl(
            models,
            exponents,
            list(ev.shard),
            ctx.task.max_new_tokens,
            tok.pad_token_id,
            tok.eos_token_id,
            ctx.sample_batch_size,
            ctx.meter,
        )
        total, _ = kl_gradients(d, 1)
        rewards = ctx.task.rewards(decode_prompts(tok, d.batch), decode_responses(tok, d.batch))
        total, rewards = dist.gather_cat(total), dist.gather_cat(rewards)
        wins = win_outcomes(rewards, baseline).mean(0)
        kl = total.mean(0)
        se = total.std(0) / max(len(total), 1) ** 0.5
        k = len(exponents) - 1
        return {
            "win_rate": wins.tolist(),
            "min_win": float(wins.min()),
            "kl": kl[:k].tolist(),  # KL(pi || pi_k)
            "kl_se": se[:k].tolist(),
            "kl_ref": float(kl[k]),
            "max_kl": float(kl[:k].max()),
        }
