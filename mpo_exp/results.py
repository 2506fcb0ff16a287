"""results.json (machine-readable) and results.md (the same numbers as a table)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

#: config entries that cannot change a number: where files go, logging, threads, resuming
NOT_RESULT_KEYS = ("paths", "logger", "hydra", "num_threads", "resume")
#: trainer fields that only change what is displayed or kept on disk
TRAINER_DISPLAY = ("enable_progress_bar", "log_every_n_steps", "enable_model_summary", "enable_checkpointing")


def result_config(cfg: DictConfig | Mapping[str, Any]) -> dict:
    """The resolved config less what cannot change a result (``results["config"]``): the report groups
    rows by it (seed aside), so two jobs that differ in any other field are never averaged together."""
    out = {}
    for key in cfg:
        if key in NOT_RESULT_KEYS:
            continue
        node = cfg[key]
        value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        if key == "trainer" and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in TRAINER_DISPLAY}
        out[str(key)] = value
    return json.loads(json.dumps(out, default=str))  # plain JSON: what results.json will hold


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # never leave an empty results.json.tmp behind
        raise


def format_table(results: dict) -> str:
    objs = results["objectives"]
    head = ["policy"] + [f"win {o}" for o in objs] + ["min win"] + [f"z {o}" for o in objs] + ["min z", "KL"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    # bold the best worst-objective win rate only (a single run has no interval to test it against)
    best = (
        max(f"{p['min_win_rate']:.3f}" for p in results["policies"].values()) if results["policies"] else None
    )
    for name, p in results["policies"].items():
        min_win = f"{p['min_win_rate']:.3f}"
        cells = (
            [name]
            + [f"{p['win_rate'][o]:.3f}" for o in objs]
            + [f"**{min_win}**" if min_win == best else min_win]
            + [f"{p['reward_z'][o]:+.3f}" for o in objs]
            + [f"{p['min_reward_z']:+.3f}", f"{p['kl']:.2f}"]
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_cost(results: dict) -> str:
    lines = ["| stage | wall s | FLOPs | tokens fwd | tokens bwd | reused |", "|---|---|---|---|---|---|"]
    for stage, c in results["cost"].items():
        lines.append(
            f"| {stage} | {c['wall_s']:.2f} | {c['flops']:.3g} | {c['tokens_fwd']} | {c['tokens_bwd']} "
            f"| {'yes' if c.get('reused') else ''} |"
        )
    return "\n".join(lines)


def format_markdown(results: dict) -> str:
    parts = [f"# {results['method']} — beta={results['beta']}, seed={results['seed']}", ""]
    if results.get("lambda") is not None:
        lam = ", ".join(f"{o}={w:.3f}" for o, w in zip(results["objectives"], results["lambda"], strict=True))
        parts += [f"lambda: {lam}", ""]
    parts += ["## Balanced performance (vs pi_ref on held-out prompts)", "", format_table(results), ""]
    parts += ["## Cost", "", format_cost(results), ""]
    summary = results.get("cost_summary", {})
    for name in results.get("method_policies", []):
        for part, c in summary.get(name, {}).items():
            parts.append(
                f"- {name} ({part.replace('_', '-')}): {c['wall_s']:.1f} s, {c['flops']:.3g} FLOPs, "
                f"{c['tokens_fwd']} tokens fwd"
            )
    parts += ["", "## Example responses", ""]
    for name, ex in results.get("examples", {}).items():
        for prompt, response in ex:
            parts.append(f"- {name}: `{prompt}` → `{response}`")
    return "\n".join(parts) + "\n"


def to_json(results: dict) -> str:
    """Indented JSON with lists of numbers kept on one line (per-prompt outcomes stay compact)."""
    text = json.dumps(results, indent=2)
    return re.sub(r"\[\s+([-+\deE.,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)


def write_results(results: dict, output_dir: Path) -> None:
    _atomic_write(output_dir / "results.json", to_json(results))
    _atomic_write(output_dir / "results.md", format_markdown(results))


def load_results(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())
