"""Validate the composed config before any compute: every error names the field and the bad value.

Two passes. :func:`validate_config` is static and fast — it imports neither torch nor
transformers, so a typo answers in about a second: missing values, non-finite numbers, integer
seeds, sizes and choices, unknown arguments of every ``_target_`` node (read from the target's
source with :mod:`ast`, without importing it), values shared by design (β), and every path a run
will read (local, in the HF cache, or on the hub when online). :func:`validate_runtime` then builds
the light objects (task, method, trainer arguments) and checks lengths against the model's
context, still before the first stage is built.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import math
import os
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from mpo_exp.nodes import LORA_FIELDS, ConfigError, build_node, build_task, gguf_package_problem, to_plain

if TYPE_CHECKING:
    from mpo_exp.methods import Method

__all__ = ["ConfigError", "build_method", "build_node", "build_task", "to_plain", "validate_config"]


# ---- building objects (phase 2) ------------------------------------------------------------------
def build_method(cfg: DictConfig) -> Method:
    """:func:`mpo_exp.methods.build_method`, imported on use (this module's static pass loads no torch)."""
    from mpo_exp.methods import build_method as build

    return build(cfg)


# ---- static checks (phase 1) ---------------------------------------------------------------------
def _get(cfg: DictConfig, field: str):
    return OmegaConf.select(cfg, field, throw_on_missing=True)


POSITIVE_INTS = [
    "sft.n_examples",
    "sft.batch_size",
    "preferences.n_prompts",
    "dpo.batch_size",
    "dpo.max_steps",
    "reward_model.batch_size",
    "reward_model.max_steps",
    "reward_model.normalizer.n_prompts",
    "reward_model.normalizer.samples_per_prompt",
    "rl.batch_size",
    "rl.iterations",
    "eval.n_prompts",
    "inference_batch_size",
    "sampling_batch_size",
]
# sft.max_steps=0: pi_ref is the model as loaded (e.g. an instruct model), no SFT corpus needed
NON_NEGATIVE_INTS = ["seed", "eval.n_examples", "sft.max_steps", "dpo.lora.r"]
# eval.temperature: the sampler divides by it (0 would fail only once evaluation starts)
POSITIVE_FLOATS = [
    "beta",
    "sft.module.lr",
    "dpo.module.lr",
    "reward_model.module.lr",
    "rl.module.lr",
    "eval.temperature",
]
NON_NEGATIVE_FLOATS = ["preferences.bt_temperature", "dpo.lora.dropout"]
#: the training modules' own settings, checked before any stage (the modules would read them only
#: once their stage starts, after everything before it was built); absent fields are skipped
OPTIONAL_RANGES = {
    **{f"{g}.module.warmup_steps": "int>=0" for g in ("sft", "dpo", "reward_model")},
    **{f"{g}.module.weight_decay": ">=0" for g in ("sft", "dpo", "reward_model")},
    "rl.module.ppo_epochs": "int>=1",
    "rl.module.minibatches": "int>=1",
    "rl.module.rloo_k": "int>=2",  # a leave-one-out baseline needs another sample
    "rl.module.clip_range": ">0",
    "rl.module.clip_range_value": ">0",
    "rl.module.max_grad_norm": ">0",
    "rl.module.vf_coef": ">=0",
    "rl.module.gamma": "[0,1]",
    "rl.module.lam": "[0,1]",
    "reward_model.heldout_fraction": "[0,1)",
    "reward_model.plateau.every": "int>=0",
    "reward_model.plateau.patience": "int>=1",
    "reward_model.plateau.min_delta": ">=0",
    "rl.plateau_tol": ">=0",
}
_RANGE_TESTS = {
    "int>=0": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "int>=1": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "int>=2": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
    ">0": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    ">=0": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "[0,1]": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "[0,1)": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
}
#: Lightning's precisions (a stage's own, or null for trainer.precision's)
PRECISIONS = ("64-true", "32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true")
CHOICES = {
    **{f"{g}.precision": PRECISIONS for g in ("sft", "dpo", "reward_model", "rl")},
    "sampler": ("multinomial", "inverse_cdf"),  # mpo_exp.draws.SAMPLERS (kept free of torch here)
    "rl.module.estimator": ("ppo", "rloo"),
    # MODPO's margin / RiC's scores: reward models or the implicit rewards beta*log pi_k/pi_ref
    "method.rewards": ("rm", "implicit"),
}
#: values shared by design: one source of truth, an override elsewhere is refused
SHARED = {"dpo.module.beta": "beta"}
_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
_OWN_PACKAGES = ("mpo_exp", "baselines")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _leaves(node: Any, path: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, node


def _target_nodes(node: Any, path: str = ""):
    """(path, node) of every mapping with a ``_target_``."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for k, v in node.items():
            yield from _target_nodes(v, f"{path}.{k}" if path else str(k))


@cache
def _source_params(target: str) -> frozenset[str] | None:
    """Keyword arguments ``target`` accepts, read from its source without importing it.

    None when it cannot tell (not our own code, ``**kwargs``, an unresolvable base class).
    """
    module, _, name = target.rpartition(".")
    if not module.startswith(_OWN_PACKAGES):
        return None
    top = importlib.util.find_spec(module.split(".")[0])  # a top-level spec executes nothing
    if top is None or not top.submodule_search_locations:
        return None
    base = Path(list(top.submodule_search_locations)[0]).joinpath(*module.split(".")[1:])
    file = base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
    if not file.exists():
        return None
    tree = ast.parse(file.read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    if name not in classes:
        return None
    cls = classes[name]
    init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    if init is not None:
        if init.args.kwarg is not None:
            return None
        return frozenset(a.arg for a in [*init.args.args[1:], *init.args.kwonlyargs])
    imports = {
        alias.asname or alias.name: f"{n.module}.{alias.name}"
        for n in tree.body
        if isinstance(n, ast.ImportFrom) and n.module
        for alias in n.names
    }
    for b in cls.bases:
        if isinstance(b, ast.Name) and b.id in ("ABC", "object"):
            continue
        if isinstance(b, ast.Name) and b.id in classes:
            return _source_params(f"{module}.{b.id}")
        if isinstance(b, ast.Name) and b.id in imports:
            return _source_params(imports[b.id])
        return None
    return frozenset()


def _check_arguments(plain: dict) -> None:
    for path, node in _target_nodes(plain):
        accepted = _source_params(str(node["_target_"]))
        if accepted is None:
            continue
        unknown = [k for k in node if k not in _HYDRA_KEYS and k not in accepted]
        if unknown:
            field = f"{path}.{unknown[0]}"
            raise ConfigError(
                f"{field}: unknown argument of {node['_target_']} (accepted: {', '.join(sorted(accepted))})"
            )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def check_model_path(field: str, value: Any) -> None:
    """A local directory, or a hub name that is cached (offline) or exists on the hub (online)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{field} must be a hub name or a local path, got {field}={value!r}")
    path = Path(value).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{field}={value!r} is a file; expected a directory saved with save_pretrained")
        return
    if value.startswith(("/", "./", "../", "~")) or value.count("/") > 1:
        raise ConfigError(f"{field}={value!r}: no such local directory")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(value, "config.json"), str):
        return
    if _offline():
        raise ConfigError(
            f"{field}={value!r}: not a local directory and not in the HF cache, and HF_HUB_OFFLINE=1 "
            "(download it first, or give a local path)"
        )
    from huggingface_hub import HfApi

    try:
        exists = HfApi().repo_exists(value)
    except Exception as e:  # network trouble: say so, naming the field
        raise ConfigError(
            f"{field}={value!r}: could not reach the HF hub to check it ({type(e).__name__})"
        ) from e
    if not exists:
        raise ConfigError(f"{field}={value!r}: no such model on the HF hub (or it is private)")


def check_jsonl(path: Path, fields: dict[str, str], rows: int = 100) -> None:
    """The first ``rows`` rows of a local JSONL split parse and carry the configured fields."""
    n = 0
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{lineno} is not valid JSON ({e.msg})") from e
            for config_field, name in fields.items():
                if not isinstance(row, dict) or name not in row:
                    raise ConfigError(f"{path}:{lineno} has no field {name!r} (set by {config_field})")
            n += 1
            if n >= rows:
                break
    if n == 0:
        raise ConfigError(f"{path} is empty: a split needs at least one row")


def check_dataset_path(field: str, value: Any, splits: list[str], fields: dict[str, str]) -> None:
    """A local folder holding ``<split>.jsonl`` for every split, or a hub data set (online)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{field} must be a hub name or a local folder, got {field}={value!r}")
    path = Path(value).expanduser()
    if path.is_dir():
        missing = [s for s in splits if not (path / f"{s}.jsonl").is_file()]
        if missing:
            raise ConfigError(
                f"{field}={value!r}: the folder has no {', '.join(f'{s}.jsonl' for s in missing)}"
            )
        for split in splits:
            check_jsonl(path / f"{split}.jsonl", fields)
        return
    if path.exists() or value.startswith(("/", "./", "../", "~")) or value.count("/") > 1:
        raise ConfigError(f"{field}={value!r}: no such local folder (expected <split>.jsonl files in it)")
    if _offline():
        raise ConfigError(f"{field}={value!r}: not a local folder, and HF_HUB_OFFLINE=1 (no hub data sets)")
    if importlib.util.find_spec("datasets") is None:
        raise ConfigError(f"{field}={value!r} is a hub data set, which needs `pip install datasets`")


def check_writable(field: str, directory: str | os.PathLike) -> None:
    """Create ``directory`` and write a probe file into it, so a run never computes for nothing."""
    path = Path(directory)
    probe = path / f".write-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)  # room for a results file, not just a directory entry
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise ConfigError(f"{field}={str(directory)!r} is not writable: {e.strerror or e}") from e
    finally:
        probe.unlink(missing_ok=True)


def _check_paths(cfg: DictConfig) -> None:
    model_target = str(OmegaConf.select(cfg, "model._target_", default=""))
    if model_target.endswith("PretrainedSpec"):
        check_model_path("model.name_or_path", _get(cfg, "model.name_or_path"))
    if model_target.endswith("GGUFPackageSpec"):
        fields = ("name", "package", "gguf_file", "requirement")
        problem = gguf_package_problem(*(str(_get(cfg, f"model.{f}")) for f in fields))
        if problem:
            raise ConfigError(problem)
    task_target = str(OmegaConf.select(cfg, "task._target_", default=""))
    if task_target.endswith("HFDatasetTask"):
        splits = [str(_get(cfg, "task.train_split")), str(_get(cfg, "task.eval_split"))]
        fields = {f"task.{k}": str(_get(cfg, f"task.{k}")) for k in ("prompt_field", "response_field")}
        check_dataset_path("task.dataset", _get(cfg, "task.dataset"), splits, fields)
        objectives = _get(cfg, "task.objectives")
        if isinstance(objectives, DictConfig):
            for name, spec in objectives.items():
                if isinstance(spec, str) and not spec.startswith("builtin:"):
                    check_model_path(f"task.objectives.{name}", spec)
                elif isinstance(spec, DictConfig) and "model" in spec:
                    check_model_path(f"task.objectives.{name}.model", spec.model)


def _check_checkpoints(cfg: DictConfig) -> None:
    """``rl.checkpoints`` (RL iterations) and MODPO's ``method.checkpoints`` (steps): distinct
    points before the end of training (the last is the policy itself). RiC checks its own."""
    target = str(OmegaConf.select(cfg, "method._target_") or "")
    checks = [("rl.checkpoints", "rl.iterations", "iterations")]
    if target.endswith("MODPOMethod"):
        checks.append(("method.checkpoints", "dpo.max_steps", "steps"))
    for field, limit_field, unit in checks:
        points = OmegaConf.select(cfg, field)
        if not points:
            continue
        limit = OmegaConf.select(cfg, limit_field)
        if not isinstance(points, ListConfig) or not all(_is_int(p) for p in points):
            raise ConfigError(f"{field} must be a list of {unit}, got {field}={points!r}")
        bad = [p for p in points if not 1 <= p < limit]
        if bad or len(set(points)) != len(points):
            raise ConfigError(
                f"{field} must be distinct {unit} in [1, {limit_field}={limit}), got {list(points)}"
            )


def _check_lora(cfg: DictConfig, field: str) -> None:
    """``model.lora`` / ``dpo.lora``, one schema (r = 0 or null: off): known keys, r, alpha, dropout."""
    lora = OmegaConf.select(cfg, field)
    if lora is None:
        return
    fields = ", ".join(LORA_FIELDS)
    if not isinstance(lora, DictConfig):
        raise ConfigError(f"{field} must be a mapping ({fields}), got {lora!r}")
    unknown = sorted(set(lora) - set(LORA_FIELDS))
    if unknown:
        raise ConfigError(f"{field}.{unknown[0]}: unknown field (fields: {fields})")
    r, alpha, dropout = lora.get("r", 8), lora.get("alpha", 16), lora.get("dropout", 0.0)
    if not (_is_int(r) and r >= 0):
        raise ConfigError(f"{field}.r must be a non-negative integer, got {field}.r={r!r}")
    if not (_is_number(alpha) and alpha > 0):
        raise ConfigError(f"{field}.alpha must be a number > 0, got {field}.alpha={alpha!r}")
    if not (_is_number(dropout) and 0 <= dropout < 1):
        raise ConfigError(f"{field}.dropout must be in [0, 1), got {field}.dropout={dropout!r}")
    if r > 0 and importlib.util.find_spec("peft") is None:
        raise ConfigError(f"{field}.r > 0 needs the `peft` package (LoRA adapters): pip install peft")
    targets = lora.get("target_modules")
    if targets is not None and not (
        isinstance(targets, str)
        or (isinstance(targets, ListConfig) and len(targets) and all(isinstance(t, str) for t in targets))
    ):
        raise ConfigError(
            f"{field}.target_modules must be null, a module name or a list of names, got {targets!r}"
        )


def validate_config(cfg: DictConfig, check_paths: bool = True) -> None:
    """Static checks before any heavy import or compute; raises :class:`ConfigError`.

    ``check_paths=False`` skips the model / data / reward-model path checks (to check a preset
    meant for another machine).
    """
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra"))
    if missing:
        raise ConfigError(
            f"missing mandatory value(s): {', '.join(missing)} (set them as overrides, e.g. {missing[0]}=...)"
        )
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # an interpolation that does not resolve names its key
        raise ConfigError(f"config does not resolve: {e}".splitlines()[0]) from e
    assert isinstance(plain, dict)
    plain.pop("hydra", None)
    for field, value in _leaves(plain):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{field} must be a finite number, got {field}={value}")
    for field in POSITIVE_FLOATS:
        value = OmegaConf.select(cfg, field)
        if value is not None and not (_is_number(value) and value > 0):
            raise ConfigError(f"{field} must be a number > 0, got {field}={value!r}")
    for field in NON_NEGATIVE_FLOATS:
        value = _get(cfg, field)
        if not (_is_number(value) and value >= 0):
            raise ConfigError(f"{field} must be a number >= 0, got {field}={value!r}")
    for field in POSITIVE_INTS:
        value = OmegaConf.select(cfg, field)
        if value is not None and not (_is_int(value) and value >= 1):
            raise ConfigError(f"{field} must be an integer >= 1, got {field}={value!r}")
    for field in NON_NEGATIVE_INTS:
        value = _get(cfg, field)
        if not (_is_int(value) and value >= 0):
            raise ConfigError(f"{field} must be a non-negative integer, got {field}={value!r}")
    for field, rule in OPTIONAL_RANGES.items():
        value = OmegaConf.select(cfg, field)
        ok, what = _RANGE_TESTS[rule]
        if value is not None and not ok(value):
            raise ConfigError(f"{field} must be {what}, got {field}={value!r}")
    _check_checkpoints(cfg)
    if (OmegaConf.select(cfg, "reward_model.plateau.every") or 0) > 0 and not OmegaConf.select(
        cfg, "reward_model.heldout_fraction"
    ):
        raise ConfigError(
            "reward_model.plateau.every > 0 stops on the held-out pairs: it needs "
            "reward_model.heldout_fraction > 0"
        )
    _check_lora(cfg, "model.lora")
    _check_lora(cfg, "dpo.lora")
    threads = OmegaConf.select(cfg, "num_threads")
    if threads is not None and not (_is_int(threads) and threads >= 1):
        raise ConfigError(
            f"num_threads must be null (automatic) or an integer >= 1, got num_threads={threads!r}"
        )
    for field, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, field)
        if value is not None and value not in allowed:
            raise ConfigError(f"{field} must be one of {allowed}, got {field}={value!r}")
    for field, source in SHARED.items():
        value, truth = OmegaConf.select(cfg, field), _get(cfg, source)
        if value is not None and value != truth:
            raise ConfigError(
                f"{field}={value!r} differs from {source}={truth!r}: {source} is shared by every stage "
                f"and reported with the results; set {source}={value!r} instead"
            )
    objectives = OmegaConf.select(cfg, "task.objectives")
    if isinstance(objectives, ListConfig) and len(objectives) == 0:
        raise ConfigError("task.objectives must name at least one objective")
    _check_arguments(plain)
    if check_paths:
        _check_paths(cfg)


def validate_runtime(cfg: DictConfig) -> None:
    """Checks that need the light objects built (still before any stage): raises :class:`ConfigError`."""
    from hydra.utils import get_class

    task = build_task(cfg)
    build_method(cfg)
    trainer_kwargs = {k for k in cfg.trainer if k not in _HYDRA_KEYS}
    params = inspect.signature(get_class(cfg.trainer._target_)).parameters
    unknown = sorted(trainer_kwargs - set(params))
    if unknown:
        raise ConfigError(f"trainer.{unknown[0]}: unknown argument of {cfg.trainer._target_}")
    _check_lora_targets(cfg)
    positions = _model_positions(cfg)
    bound = task.prompt_length_bound()
    if positions is not None:
        needed = task.max_new_tokens + (bound or 0)
        if needed > positions:
            what = f"the longest prompt ({bound} tokens) + " if bound else ""
            raise ConfigError(
                f"task.max_new_tokens={task.max_new_tokens}: {what}max_new_tokens = {needed} exceeds the "
                f"model's {positions} positions (lower task.max_new_tokens or raise the model's context)"
            )


def _check_lora_targets(cfg: DictConfig) -> None:
    """``model.lora`` / ``dpo.lora`` target modules exist in the model (its config, no weights loaded)."""
    fields = [f for f in ("model.lora", "dpo.lora") if _lora_rank(OmegaConf.select(cfg, f)) > 0]
    if not fields:
        return
    spec = build_node(cfg.model, "model")
    if not hasattr(spec, "architecture"):
        return
    import torch
    from transformers import AutoModelForCausalLM

    from mpo_exp.adapters import lora_target_problem

    arch = spec.architecture()
    with torch.device("meta"):  # module names without allocating a weight
        model = AutoModelForCausalLM.from_config(arch)
    names = [n for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    for field in fields:
        targets = to_plain(OmegaConf.select(cfg, f"{field}.target_modules"))
        problem = lora_target_problem(names, targets, arch.model_type)
        if problem:
            raise ConfigError(f"{field}.target_modules: {problem}")


def _lora_rank(lora) -> int:
    if not isinstance(lora, DictConfig):
        return 0
    r = lora.get("r", 8)
    return int(r) if _is_int(r) else 0


def _model_positions(cfg: DictConfig) -> int | None:
    if OmegaConf.select(cfg, "model.n_positions") is not None:
        return int(cfg.model.n_positions)
    name = OmegaConf.select(cfg, "model.name_or_path")
    if name is None:
        return None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(name))
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(getattr(config, attr, None), int):
            return int(getattr(config, attr))
    return None
