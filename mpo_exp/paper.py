"""The MPO paper's published numbers, kept as data with their source, for side-by-side reports.

Source: Wang, Gui, Hu, Lin, Zhang, "MPO: An Efficient Post-Processing Framework for Mixing Diverse
Preference Alignment", arXiv 2502.18699 (ICML 2025), Table 1 (HH-RLHF, Qwen2.5-7B, GPT-judged win
rate % against pi_ref), as transcribed in ../shared/METHOD.md. The setup (7B models, GPT judge)
differs from the embedded default (a tiny GPT-2, oracle rewards): compare shapes, not values.
"""

from __future__ import annotations

SOURCE = (
    "Wang et al., MPO, arXiv 2502.18699 (ICML 2025), Table 1: HH-RLHF, Qwen2.5-7B, GPT-judged win rate (%)"
)
OBJECTIVES = ("helpful", "harmless", "humorous")

# (method, beta) -> win rate % per objective, in OBJECTIVES order
TABLE1: dict[tuple[str, float], tuple[float, float, float]] = {
    ("pi_helpful", 0.1): (53.5, 51.2, 39.1),
    ("pi_harmless", 0.1): (44.0, 61.2, 46.3),
    ("pi_humorous", 0.1): (44.4, 46.5, 56.5),
    ("reward_soup", 0.1): (44.8, 59.4, 56.4),
    ("maxmin_rlhf", 0.1): (44.6, 56.1, 51.4),
    ("mpo", 0.1): (46.3, 53.1, 54.1),
    ("reward_soup", 0.5): (51.9, 53.7, 50.0),
    ("maxmin_rlhf", 0.5): (46.1, 53.8, 54.8),
    ("mpo", 0.5): (54.9, 53.1, 57.1),
}

# leave-one-out ablation, z-normalised rewards (helpful, harmless, humorous)
ABLATION: dict[str, tuple[float, float, float]] = {
    "mpo": (0.05, 0.18, 0.19),
    "mpo_without_helpful": (-0.11, 0.28, 0.29),
    "mpo_without_harmless": (0.14, -0.02, 0.26),
    "mpo_without_humorous": (0.18, 0.04, -0.10),
}

IMDB_LAMBDA = {"sentiment": 0.386, "conciseness": 0.614}
GPU_HOURS = {"mpo": 2.5, "maxmin_rlhf": 10.0, "morlhf": 10.0}  # A100 hours, approximate
