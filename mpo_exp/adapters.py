"""K single-objective policies as LoRA adapters on one base model (``dpo.lora``).

With ``dpo.lora`` set, each pi_k is trained as a peft LoRA adapter on pi_ref and only the adapter
is cached. :class:`AdapterBank` then holds **one** copy of pi_ref's weights with the K adapters
loaded, and every policy (pi_ref = the base with adapters off, peft's ``"__base__"``) is a light
:class:`AdapterModel` view of it. Views of one bank are run together: scoring K+1 policies is one
forward over the batch repeated K+1 times with peft's per-row ``adapter_names`` (mixed-adapter
batches), and mixed decoding runs the K adapters' rows in one forward per token, so the KV cache
holds one block of rows per adapter (see :func:`mpo_exp.generation.sample`).
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel

from mpo_exp.nodes import LORA_FIELDS, to_plain

log = logging.getLogger(__name__)

BASE = "__base__"  # peft's adapter name for "no adapter" in a mixed batch


def lora_config(spec: dict):
    """A peft ``LoraConfig`` for a causal LM from a LoRA spec (:data:`LORA_FIELDS`)."""
    try:
        from peft import LoraConfig
    except ImportError as e:  # pragma: no cover - peft ships with the default install
        raise ImportError("LoRA (model.lora, dpo.lora) needs the `peft` package: pip install peft") from e
    spec = dict(to_plain(spec))
    assert set(spec) <= set(LORA_FIELDS), f"LoRA fields are {LORA_FIELDS}, got {sorted(spec)}"
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=int(spec.get("r", 8)),
        lora_alpha=int(spec.get("alpha", 16)),
        lora_dropout=float(spec.get("dropout", 0.0)),
        target_modules=spec.get("target_modules"),
    )


def with_adapter(model: PreTrainedModel, spec: dict):
    """``model`` wrapped with a fresh, trainable LoRA adapter (only the adapter's weights train)."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(spec))


class AdapterBank:
    """One base model and named LoRA adapters, run as several policies that share its weights."""

    def __init__(self, base: PreTrainedModel) -> None:
        self.base = base.eval()
        self.model = self.base  # becomes a PeftModel once the first adapter is loaded
        self.names: list[str] = []

    def add(self, name: str, path: str | Path) -> AdapterModel:
        """Load the adapter saved at ``path`` under ``name`` and return its view."""
        if name == BASE or name in self.names:
            raise ValueError(f"adapter name {name!r} is reserved or already loaded")
        if not self.names:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.base, str(path), adapter_name=name)
        else:
            self.model.load_adapter(str(path), adapter_name=name)
        self.model.eval()
        self.names.append(name)
        return self.view(name)

    def view(self, name: str = BASE) -> AdapterModel:
        if name != BASE and name not in self.names:
            raise KeyError(f"no adapter {name!r}; loaded: {self.names}")
        return AdapterModel(self, name)

    def forward(self, adapter_names: Sequence[str], **kwargs):
        """One forward in which row i runs adapter ``adapter_names[i]`` (``BASE``: none)."""
        if not self.names:  # no adapter yet: the base model is pi_ref
            return self.base(**kwargs)
        return self.model(**kwargs, adapter_names=list(adapter_names))

    def adapter_parameters(self, name: str) -> Iterator[torch.nn.Parameter]:
        if name == BASE:
            return iter(())
        return (p for n, p in self.model.named_parameters() if f".{name}." in n and "lora_" in n)

    def base_parameters(self) -> Iterator[torch.nn.Parameter]:
        return (p for n, p in self.model.named_parameters() if "lora_" not in n)

    def merged(self, name: str) -> PreTrainedModel:
        """A full copy of the base with adapter ``name`` merged in (for weight-space methods)."""
        base = copy.deepcopy(self.base)  # the LoRA layers sit inside it: unwrap the one we want
        if name == BASE or not self.names:
            return _strip_lora(base, None)
        return _strip_lora(base, name)


def _strip_lora(model: torch.nn.Module, keep: str | None) -> PreTrainedModel:
    """Replace every LoRA layer of ``model`` by its base layer, with adapter ``keep`` merged."""
    from peft.tuners.lora import LoraLayer

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                if keep is not None:
                    child.merge(adapter_names=[keep])
                setattr(parent, child_name, child.get_base_layer())
    return model


class AdapterModel(torch.nn.Module):
    """One policy of an :class:`AdapterBank`: called like a causal LM, it runs the bank's forward
    with its adapter on every row. Its parameters are the base's plus its own adapter's (what one
    forward uses, so the cost meter's FLOPs are right); it holds no weights of its own."""

    def __init__(self, bank: AdapterBank, name: str) -> None:
        super().__init__()
        self.bank, self.adapter = bank, name  # AdapterBank is not a Module: nothing is registered

    @property
    def config(self):
        return self.bank.base.config

    def forward(self, input_ids: torch.Tensor, **kwargs):
        return self.bank.forward([self.adapter] * len(input_ids), input_ids=input_ids, **kwargs)

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        yield from self.bank.base_parameters()
        yield from self.bank.adapter_parameters(self.adapter)

    def to(self, *args, **kwargs) -> AdapterModel:
        self.bank.model.to(*args, **kwargs)
        return self

    def train(self, mode: bool = True) -> AdapterModel:
        if mode:
            raise RuntimeError("an adapter view is for inference: train the adapter with dpo.lora instead")
        return self

    def merged(self) -> PreTrainedModel:
        return self.bank.merged(self.adapter)

    def extra_repr(self) -> str:
        return f"adapter={self.adapter!r}, bank adapters={self.bank.names}"


def shared_bank(models: Sequence[torch.nn.Module]) -> AdapterBank | None:
    """The bank every model is a view of, or None (plain models, or views of different banks)."""
    banks = {id(m.bank): m.bank for m in models if isinstance(m, AdapterModel)}
    if len(banks) != 1 or not all(isinstance(m, AdapterModel) for m in models):
        return None
    return next(iter(banks.values()))


def full_model(model: torch.nn.Module) -> PreTrainedModel:
    """The model itself, or for an adapter view a full copy with its adapter merged."""
    return model.merged() if isinstance(model, AdapterModel) else model


def disable_model_dropout(model: torch.nn.Module) -> None:
    """Set the model's own dropout to 0 and keep the LoRA adapters' (``lora_dropout``).

    DPO and PPO turn dropout off (as TRL does): it would make the policy's log-probs noisy against
    the fixed reference's (DPO) or the rollout's (PPO). An adapter's dropout is a setting of its
    own (``model.lora.dropout``, ``dpo.lora.dropout``) and regularises only the adapter's input.
    """
    adapter_dropouts = {
        id(d) for name, m in model.named_modules() if name.endswith("lora_dropout") for d in m.modules()
    }
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and id(module) not in adapter_dropouts:
            module.p = 0.0


def lora_target_problem(module_names: Sequence[str], targets, model_type: str) -> str | None:
    """Why a LoRA spec's ``target_modules`` would not adapt this model (None: they all exist).

    peft's own matching: a list entry names a module or the last parts of its dotted name; a
    string is a regular expression over the full name; null takes peft's default for the model
    type. Checked on the model's module names before any stage, since peft's error comes only
    after SFT and the preference pairs.
    """
    if targets is None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        if model_type not in DEFAULTS:
            return f"null has no peft default for model type {model_type!r}: name the modules"
        targets = DEFAULTS[model_type]
    layers = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in module_names}))
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, n) for n in module_names):
            return f"{targets!r} (a regular expression over full names) matches no module (layers: {layers})"
        return None
    for t in targets:
        if not any(n == t or n.endswith(f".{t}") for n in module_names):
            return f"{t!r} is no module of the model (its layers: {layers})"
    return None
