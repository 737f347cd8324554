"""`lora info`: what a checkpoint is, before anything is downloaded in full or trained."""

from __future__ import annotations

from pathlib import Path

from lora_cli.config import ModelSpec, load_config
from lora_cli.data import load_file
from lora_cli.errors import ConfigError
from lora_cli.inference import load_with_tokenizer
from lora_cli.lora import (apply_lora, count_parameters, estimate_adapter_bytes, shorthands, tied_names,
                           with_classification_head)
from lora_cli.pretrained import load_model, on_meta


def describe(model: str, random_init: bool = False, lora_config: Path | None = None,
             overrides: list[str] | None = None) -> dict:
    """Config, exact parameter count and the names of the linear layers LoRA can target in `model`; with a run config, the trainable
    parameter count and adapter size its `lora` section would give. Weights are not loaded (meta device)."""
    spec = ModelSpec(name=model, init="random" if random_init else "pretrained")
    # A random preset as a run builds it: its vocabulary is its tokenizer's (the bundled GPT-2 BPE's 50,257)
    base = load_with_tokenizer(spec, weights=False)[0] if random_init else load_model(spec, weights=False)
    net = base.model
    tied = tied_names(net)
    report = {
        "model": base.name,
        "source": base.source,
        "revision": base.revision,
        "config": net.config.to_dict(),
        "parameters": net.num_parameters(),
        "tied": net.tied,
        # the layers LoRA can target: not a head that shares the input embedding's weight (named in "tied_head")
        "linear_layers": [n for n in net.linear_names() if tied is None or n != tied[0]],
        **({"tied_head": {"head": tied[0], "embedding": tied[1]}} if tied is not None else {}),
        "shorthands": shorthands(net),
    }
    raw = base.hf_config or {}
    classifier = next((str(a) for a in raw.get("architectures") or [] if str(a).endswith("ForSequenceClassification")),
                      None)
    if classifier is not None:  # a merged classifier: lora-cli reads its body (the head is left out)
        id2label = raw.get("id2label") if isinstance(raw.get("id2label"), dict) else {}
        labels = int(raw.get("num_labels") or len(id2label) or 2)
        names = [str(id2label.get(str(i), i)) for i in range(labels)]  # the class id where none is named
        report["classifier"] = {"architecture": classifier, "num_labels": labels, "labels": names,
                                "head_parameters": labels * net.config.n_embd}
    if lora_config is not None:
        cfg = load_config(lora_config, overrides, whole_run=False)  # its lora section (and task) is what counts
        lora_cfg = cfg.lora
        if cfg.task == "classification":
            with on_meta():
                lora_cfg = with_classification_head(net, lora_cfg, _num_labels(cfg), None)
        with on_meta():  # LoRA weights of a meta model: shapes only
            targets = apply_lora(net, lora_cfg)
        trainable, total = count_parameters(net)
        dtype = "fp32"
        report["lora"] = {
            "r": cfg.lora.r,
            "alpha": cfg.lora.alpha,
            "targets": targets,
            "trainable": trainable,
            "total": total,
            "adapter_bytes": estimate_adapter_bytes(net),
            "adapter_dtype": dtype,
        }
    return report


def _num_labels(cfg) -> int:
    """Classes of a classification config: data.labels, else the distinct labels of the training file."""
    if cfg.data.labels:
        return len(cfg.data.labels)
    if cfg.data.train is None:
        raise ConfigError(f"{cfg.label}: task: classification needs the number of classes: set data.labels (or "
                          "data.train, whose labels are counted)")
    _, stats, _, _, _ = load_file(cfg.data.train, cfg.data, cfg.task, "data.train")
    return len(stats.labels)
