"""Model spec -> a model with weights (any family of lora_cli.models), and GPT-2 -> a Hugging Face directory.

The Hugging Face boundary lives here and only here: config.json's `model_type` picks the family; weights come
from one safetensors file, a sharded one (model.safetensors.index.json) or a .bin; GPT-2 checkpoints store the
four Conv1D weights as [in, out] and they are transposed once while loading (and back while saving); every
tensor's name and shape is checked. Random-init presets: GPT-2's sizes (models/gpt2.py) and the config.json
files in lora_cli/presets/.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import safetensors.torch
from torch.overrides import TorchFunctionMode

from lora_cli.config import WEIGHT_SUFFIXES, ModelSpec
from lora_cli.errors import CheckpointError, ConfigError, LoraError, first_line
from lora_cli.fsutil import atomic_dir, atomic_path, atomic_write_text
from lora_cli.models import GPT2_PRESETS, HEAD, CausalLM, GPT2Config, build_model as new_model, config_from_dict, model_type
from lora_cli.runtime import SAFETENSORS_DTYPES

SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")  # sharded checkpoints
WEIGHT_FILES = ("model.safetensors", SHARD_INDEXES[0], "pytorch_model.bin", SHARD_INDEXES[1])  # in transformers' order
PRESET_DIR = Path(__file__).parent / "presets"  # <name>.json: a published config.json's architecture fields
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers that older checkpoints carry next to the weights: GPT-2's and GPT-NeoX's causal masks and rotary
# frequencies, not parameters.
IGNORED_KEY = re.compile(r"(^|\.)(attn|attention)\.(bias|masked_bias)$|rotary_emb\.inv_freq$")
# Task heads outside the GPT-2 body: GPT2ForSequenceClassification's `score` (what `lora merge` writes for a
# classifier). A base model is its body; a new task gets a new head, so these are left out when loading.
HEAD_KEYS = ("score.weight", "score.bias")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?(@[\w.\-/]+)?$")  # owner/name, and @revision


@dataclass
class BaseModel:
    """A loaded base model and where it came from (recorded in adapters, checked when they are loaded)."""

    model: CausalLM
    source: str  # "hub" | "local" | "random"
    name: str  # hub id, absolute path, or preset name
    revision: str | None
    fingerprint: str
    # The checkpoint's config.json as read (a random preset's, with its overrides): `lora merge` writes it back,
    # so a merged directory keeps the fields lora-cli does not model (token ids, rope parameters, ...).
    hf_config: dict | None = None

    def describe(self) -> dict:
        return {"source": self.source, "name": self.name, "revision": self.revision, "fingerprint": self.fingerprint}


def load_model(spec: ModelSpec | str | dict, weights: bool = True, dtype: torch.dtype | None = None) -> BaseModel:
    """The one entry point: hub id, local directory or file, or random init.

    With weights=False only the architecture is read (config.json; no weight download) and the model lives on
    the meta device: enough for `lora info` to count parameters and list layers of gpt2-xl in a second.
    dtype: the compute dtype of a bf16/fp16 run; linear weights the checkpoint stores in it are kept as they are
    (see build_model), everything else is fp32.
    """
    if not isinstance(spec, ModelSpec):
        try:
            spec = ModelSpec.parse(spec)
        except ValueError as exc:
            raise CheckpointError(f"model: {exc}") from exc
    if spec.init == "random":
        return _random_model(spec, weights)
    path = Path(spec.name).expanduser()
    if path.exists():
        return _local_model(path.resolve(), weights, dtype)
    if _looks_like_path(spec.name) or not HUB_ID.match(spec.name):
        raise CheckpointError(f"model path {spec.name} does not exist; pass an existing directory or weights file, or a hub id such as gpt2")
    return _hub_model(spec, weights, dtype)


class _SkipInit(TorchFunctionMode):
    """Initialising a meta tensor (torch.nn.init, Tensor.normal_ / uniform_) returns it untouched. Meta tensors
    have no values, and initialising one runs a torch._refs decomposition whose first call imports torch._dynamo
    and sympy (~0.8 s, 72 MB): `lora info`, `generate`, `eval` and `predict` never need them."""

    METHODS = (torch.Tensor.normal_, torch.Tensor.uniform_)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensor = args[0] if args else kwargs.get("tensor")
        is_init = getattr(func, "__module__", None) == "torch.nn.init" or func in self.METHODS
        if is_init and isinstance(tensor, torch.Tensor) and tensor.is_meta:
            return tensor
        return func(*args, **kwargs)


@contextmanager
def on_meta():
    """Build modules on the meta device (shapes only, no memory), skipping their weight initialisation."""
    with torch.device("meta"), _SkipInit():
        yield


def meta_model(config) -> CausalLM:
    """The architecture of `config` on the meta device: shapes only."""
    with on_meta():
        return new_model(config)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(WEIGHT_SUFFIXES) or os.sep + os.sep in name


def preset_names() -> list[str]:
    return [*GPT2_PRESETS, *sorted(p.stem for p in PRESET_DIR.glob("*.json"))]


# The architecture overrides of a random preset (GPT-2's names, config.ARCH_OVERRIDES) in the other families' configs.
HF_OVERRIDE_NAMES = {"n_layer": "num_hidden_layers", "n_head": "num_attention_heads", "n_embd": "hidden_size",
                     "n_positions": "max_position_embeddings", "vocab_size": "vocab_size"}


def _random_model(spec: ModelSpec, weights: bool) -> BaseModel:
    preset = spec.name.split("/")[-1]
    if preset not in preset_names():  # the model spec's fault: a config (or flag) problem, as the next one
        raise ConfigError(f"model: init: random needs a preset name ({', '.join(preset_names())}), got {spec.name!r}")
    raw = None  # GPT-2: save_pretrained writes its config from GPT2Config
    try:
        if preset in GPT2_PRESETS:
            config = GPT2Config.from_dict({**GPT2_PRESETS[preset].to_dict(), **spec.overrides})
        else:
            raw = json.loads((PRESET_DIR / f"{preset}.json").read_text(encoding="utf-8"))
            raw = {**{k: v for k, v in raw.items() if not k.startswith("_")},  # "_source": a note, not a field
                   **{HF_OVERRIDE_NAMES[k]: v for k, v in spec.overrides.items()}}
            config = config_from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model: bad architecture override: {exc}") from exc
    if not weights:
        return BaseModel(meta_model(config), "random", preset, None, "")
    model = new_model(config)
    model.init_weights(torch.Generator().manual_seed(spec.seed))
    return BaseModel(model, "random", preset, None, fingerprint(model.state_dict()), raw)


def _local_model(path: Path, weights: bool, dtype: torch.dtype | None = None) -> BaseModel:
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{path} has no config.json; pass a Hugging Face model directory or a single weights file")
        weight_file = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
        if weight_file is None:
            raise CheckpointError(f"{path} has no {' or '.join(WEIGHT_FILES)}; the directory holds no model weights")
        config = read_config(config_file)
        if not weights:
            if weight_file.name in SHARD_INDEXES:
                headers = read_shards(weight_file, lambda name: path / name, check_only=True)
            else:
                headers = header_tensors(check_weights_file(weight_file))
            model = meta_model(config)
            if headers:  # safetensors headers name every tensor's shape and dtype: check them as loading would
                checked_tensors(model, headers, path)
            return BaseModel(model, "local", str(path), None, "", raw_config(config_file))
        if weight_file.name in SHARD_INDEXES:
            state = read_shards(weight_file, lambda name: path / name)
        else:
            state = read_state_dict(weight_file)
    else:
        _refuse_adapter_file(path)
        _refuse_other_files(path)
        state = read_state_dict(path)
        config_file = path.parent / "config.json"  # a weights file inside its model's folder: the folder's config
        config = read_config(config_file) if config_file.is_file() else infer_config(state, path)
    model = build_model(config, state, path, dtype)
    raw = raw_config(config_file) if config_file.is_file() else None
    return BaseModel(model, "local", str(path), None, fingerprint(model.state_dict()), raw)


def _refuse_other_files(path: Path) -> None:
    """A file of a checkpoint that is not its weights (a shard index, config.json), or a GGUF export: one line."""
    if path.name in SHARD_INDEXES or path.name == "config.json":
        raise CheckpointError(f"{path} is the {'shard index' if path.name != 'config.json' else 'config'} of a "
                              f"checkpoint, not its weights; pass the directory that holds it ({path.parent})")
    if path.suffix.lower() == ".gguf":
        raise CheckpointError(f"{path} is a GGUF file (llama.cpp's format), which lora-cli does not read; pass the "
                              "Hugging Face checkpoint it came from (a directory, hub id or .safetensors file)")


class HubFiles:
    """The files of one hub repository at one revision, through huggingface_hub's cache. config.json is asked of
    the hub first: that resolves the revision to a commit (or, without network, finds the cached one). Every other
    file is then looked up in that commit's cache before the hub is asked, and a file the cache knows the commit
    lacks (huggingface_hub's .no_exist marker) is absent without asking: repositories lack most of the optional
    files read here, and without network each question cost huggingface_hub's retries, about 23 s a file (a
    cached sharded Qwen2 started in 72 s instead of 2). `fetch` gives the file's path, or None where it is known
    to be absent; it raises what hf_hub_download raises."""

    def __init__(self, repo_id: str, revision: str | None):
        from huggingface_hub.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # its retry warnings would bury our one-line message
        self.repo_id, self.revision = repo_id, revision
        self.commit: str | None = None  # set by the config.json fetch
        self.reachable: bool | None = None  # whether the hub answers (asked once, before a file not cached)

    def fetch(self, filename: str) -> Path | None:
        # Here, not at the top: only hub ids pay for importing huggingface_hub (~0.3 s).
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        local = False
        if self.commit is not None:
            cached = try_to_load_from_cache(self.repo_id, filename, revision=self.commit)
            if isinstance(cached, str):
                return Path(cached)
            if cached is not None:  # the .no_exist marker: the commit has no such file
                return None
            local = not self._hub_answers()  # no network: the cache's answer, at once (not after 23 s of retries)
        path = Path(hf_hub_download(self.repo_id, filename, revision=self.commit or self.revision,
                                    local_files_only=local))
        if self.commit is None and path.parent.parent.name == "snapshots":
            self.commit = path.parent.name
        return path

    def _hub_answers(self) -> bool:
        """Whether the hub answers at all: one plain request (huggingface_hub's session: its proxies and
        certificates), without the retries hf_hub_download makes on a connection error. Cached files come back at
        once without network; a file not in the cache is asked for only where the hub answers."""
        if self.reachable is None:
            from huggingface_hub import constants
            from huggingface_hub.utils import get_session

            if constants.HF_HUB_OFFLINE:  # HF_HUB_OFFLINE=1: no request at all
                self.reachable = False
                return False
            try:
                get_session().head(constants.ENDPOINT, timeout=10)  # any status: it answered
                self.reachable = True
            except Exception:  # its HTTP client's connection and timeout errors: no network
                self.reachable = False
        return self.reachable

    def need(self, filename: str) -> Path:
        """fetch, for a file the checkpoint cannot do without (config.json, tokenizer.json, a shard its index
        names)."""
        path = self.fetch(filename)
        if path is None:
            raise CheckpointError(f"model {self.repo_id} has no {filename} at commit {self.commit} (so says the "
                                  "Hugging Face cache); pass a model that has one, or a local directory")
        return path


def _hub_model(spec: ModelSpec, weights: bool, dtype: torch.dtype | None = None) -> BaseModel:
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo_id, revision = hub_ref(spec.name, spec.revision)
    files = HubFiles(repo_id, revision)
    try:
        config_file = files.need("config.json")
        if not weights:
            config = read_config(config_file)
            return BaseModel(meta_model(config), "hub", repo_id, config_file.parent.name, "", raw_config(config_file))
        weight_file = None
        for candidate in WEIGHT_FILES:
            try:
                weight_file = files.fetch(candidate)
                if weight_file is None:
                    continue
                if candidate in SHARD_INDEXES:  # every shard it names, through the same cache
                    read_shards(weight_file, files.need, only_fetch=True)
                break
            except EntryNotFoundError:
                continue
            except LocalEntryNotFoundError:
                # Offline (or no network): the other weight file may be the one in the cache.
                weight_file = None
                continue
        if weight_file is None:
            raise LocalEntryNotFoundError(f"no weights for {repo_id}")
    except CheckpointError:
        raise
    except Exception as exc:  # huggingface_hub raises many types (network, auth, offline); all mean "not here"
        raise CheckpointError(hub_failure(spec.name, exc, spec.revision)) from exc
    config = read_config(config_file)
    if weight_file.name in SHARD_INDEXES:
        state = read_shards(weight_file, lambda name: weight_file.parent / name)
    else:
        state = read_state_dict(weight_file)
    model = build_model(config, state, Path(repo_id), dtype)
    resolved = weight_file.parent.name if weight_file.parent.parent.name == "snapshots" else revision
    return BaseModel(model, "hub", repo_id, resolved, fingerprint(model.state_dict()), raw_config(config_file))


def hub_ref(name: str, revision: str | None = None) -> tuple[str, str | None]:
    """(repo id, revision) of a hub id written owner/name[@revision]; `revision`, the model spec's own, wins."""
    repo_id, _, at_revision = name.partition("@")
    return repo_id, revision or at_revision or None


def hub_failure(name: str, exc: Exception, revision: str | None = None) -> str:
    """The one line for a hub id that cannot be had: `name` as given (owner/name[@revision]), `revision` the
    model spec's own (it wins over @revision)."""
    repo_id, revision = hub_ref(name, revision)
    shown = f"{repo_id} (revision {revision})" if revision else repo_id
    kind = type(exc).__name__
    if kind in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
        return f"model {shown} was not found on the Hugging Face hub ({kind}); check the id and revision, or log in with `hf auth login`"
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    where = "offline mode (HF_HUB_OFFLINE=1) is on and " if offline else ""
    command = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    return (
        f"model {shown} could not be downloaded and is not in the Hugging Face cache ({where}{kind}); "
        f"download it once with `{command}` where there is internet, "
        f"or pass a local directory or weights file"
    )


def raw_config(path: Path) -> dict:
    """config.json as a dict."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable JSON config: {exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return raw


def read_config(path: Path):
    """config.json -> the config of its family (chosen by model_type; GPT-2 when it names none)."""
    raw = raw_config(path)
    if raw.get("model_type", "gpt2") != "gpt2":
        try:
            return config_from_dict(raw)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
    activation = raw.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{path}: activation_function {activation!r} is not GPT-2's tanh GELU (gelu_new)")
    if raw.get("scale_attn_by_inverse_layer_idx") or raw.get("scale_attn_weights") is False:
        raise CheckpointError(f"{path}: non-standard attention scaling is not supported")
    try:
        return GPT2Config.from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def check_weights_file(path: Path) -> dict:
    """Cheap checks of one weights file that `lora info` does not load: a .safetensors file must be as long as
    its header says (8-byte little-endian header length, JSON header, then the tensors' data_offsets), which
    catches a truncated download; a .bin/.pt file must be readable and a zip archive with its end record (what
    torch.save writes) or a legacy pickle. Returns a safetensors file's header ({} for a .bin/.pt file)."""
    again = "download or copy it again"
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if path.suffix != ".safetensors":
                if head.startswith(b"PK") and not zipfile.is_zipfile(fh):
                    raise CheckpointError(f"{path} is truncated or corrupt (its zip archive has no end record); {again}")
                if not head.startswith((b"PK", b"\x80")):
                    raise CheckpointError(f"{path} is not a PyTorch weights file (neither torch.save's zip nor a pickle)")
                return {}
            if len(head) < 8:
                raise CheckpointError(f"{path} is not a safetensors file ({size} bytes, shorter than its header); {again}")
            (header_len,) = struct.unpack("<Q", head)
            if 8 + header_len > size:
                raise CheckpointError(f"{path} is truncated: its header alone needs {8 + header_len:,} bytes but the "
                                      f"file has {size:,}; {again}")
            header = json.loads(fh.read(header_len))
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not a safetensors file (its header is not JSON); {again}") from exc
    try:
        data_end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a safetensors file (a header entry has no data_offsets)") from exc
    if 8 + header_len + data_end > size:
        raise CheckpointError(f"{path} is truncated: its header describes {8 + header_len + data_end:,} bytes but "
                              f"the file has {size:,}; {again}")
    for key, entry in header.items():
        if key != "__metadata__":
            problem = _entry_problem(entry)
            if problem:
                raise CheckpointError(f"{path} is not a safetensors file (tensor {key} {problem}); {again}")
    return header


def _entry_problem(entry: dict) -> str | None:
    """What is wrong with a safetensors header entry's shape and dtype, given its data_offsets (checked before), or
    None: the shape is a list of sizes, the dtype a name, and they fill the bytes the offsets give (at least one
    bit an element where this torch does not know the dtype, such as a 4-bit float)."""
    shape, name = entry.get("shape"), entry.get("dtype")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return f"has the shape {json.dumps(shape)}, not a list of sizes"
    if not isinstance(name, str) or not name:
        return "has no dtype"
    span = int(entry["data_offsets"][1]) - int(entry["data_offsets"][0])
    count = math.prod(shape)
    dtype = SAFETENSORS_DTYPES.get(name)
    if (count * dtype.itemsize != span) if dtype is not None else count > 8 * span:
        return f"of shape {shape} and dtype {name} does not fill its {span:,} bytes"
    return None


def header_tensors(header: dict) -> dict[str, torch.Tensor]:
    """A safetensors header as meta tensors of its shapes and dtypes (a float dtype this torch lacks as float32,
    any other as int64): what checked_tensors needs to check names, shapes and kinds, unread."""
    def dtype(name: str) -> torch.dtype:
        return SAFETENSORS_DTYPES.get(name, torch.float32 if name.startswith(("F", "BF")) else torch.int64)

    return {key: torch.empty(entry["shape"], device="meta", dtype=dtype(str(entry.get("dtype", ""))))
            for key, entry in header.items() if key != "__metadata__"}


def read_state_dict(path: Path, error: type[LoraError] = CheckpointError, what: str = "") -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or a .bin/.pt file read with weights_only=True (never unpickles code).
    error / what: the error to raise and the word naming the file in it (adapters: AdapterError, "adapter ")."""
    if path.is_file() and not os.access(path, os.R_OK):  # safetensors reports it as "No such file or directory"
        raise error(f"cannot read {what}{path}: Permission denied; make it readable (chmod +r)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            with warnings.catch_warnings():  # the unpickler warns of odd pickles (protocol 0) before refusing them
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except OSError as exc:
        raise error(f"cannot read {what}{path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # safetensors and the unpickler raise their own types for damaged or unsafe files
        # (their texts run to many lines about miniz or weights_only; --debug shows them)
        raise error(f"cannot load {what}{path}: it is truncated, corrupt, or not a plain tensor file; "
                    "download or copy it again") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise error(f"{path} does not hold a state dict of tensors (names to tensors); download or copy it again, "
                    "or save the model's state_dict() alone")
    return state


def read_shards(index_file: Path, locate, only_fetch: bool = False, check_only: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a sharded checkpoint: the index's (model.safetensors.index.json, pytorch_model.bin.index.json)
    weight_map names each tensor's shard; `locate(shard name)` gives its path (a local directory's file, or a hub
    download). only_fetch: locate every shard and read nothing (a hub download before loading); check_only: check
    that every shard is there and whole (check_weights_file) and read only the headers (`lora info`): meta
    tensors (header_tensors) come back, none for .bin shards."""
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
        odd = next((f for f in shards if not isinstance(f, str) or not f or Path(f).name != f), None)
        if odd is not None:  # a shard is a file name beside the index
            raise ValueError(f"weight_map names the shard {json.dumps(odd)}, not a file name")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError,
            ValueError) as exc:
        raise CheckpointError(f"{index_file} is not a readable shard index (a JSON object with a weight_map): "
                              f"{first_line(exc)}") from exc
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        shard_path = Path(locate(shard))
        if only_fetch:
            continue
        if not shard_path.is_file():
            raise CheckpointError(f"{index_file} names shard {shard}, which is missing; download the checkpoint again")
        if check_only:
            state.update(header_tensors(check_weights_file(shard_path)))
            continue
        state.update(read_state_dict(shard_path))
    return state


def _canonical(state: dict[str, torch.Tensor], tied: bool = True) -> dict[str, torch.Tensor]:
    """Hugging Face keys with or without the `transformer.` prefix -> ours; drop mask buffers, a classification
    head (HEAD_KEYS) and, for a tied model, lm_head.weight (a copy of wte's)."""
    out = {}
    for key, value in state.items():
        if IGNORED_KEY.search(key) or key in HEAD_KEYS or (key == "lm_head.weight" and tied):
            continue
        out[key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"] = value
    return out


def _refuse_adapter_file(path: Path) -> None:
    """A lora-cli adapter named where a model belongs: say so, rather than that it is no GPT-2 state dict."""
    if path.suffix != ".safetensors":
        return
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            adapter = "lora" in (f.metadata() or {})
    except Exception:  # unreadable: read_state_dict says how
        return
    if adapter:
        raise CheckpointError(f"{path} is a lora-cli adapter, not a model; name its base model here (the adapter "
                              "goes to --adapter)")


def infer_config(state: dict[str, torch.Tensor], path: Path) -> GPT2Config:
    """Architecture of a bare GPT-2 weights file from its shapes. The head count is not visible in shapes: it is
    the published size's with this depth and width; any other size needs its config.json beside the file (a guess
    of GPT-2's head size of 64 gave logits 4e-3 away from transformers' for a 2-head model)."""
    s = _canonical(state)
    try:
        vocab_size, n_embd = s["transformer.wte.weight"].shape
        n_positions = s["transformer.wpe.weight"].shape[0]
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a GPT-2 state dict (no transformer.wte.weight / wpe.weight)") from exc
    layers = {int(m.group(1)) for k in s if (m := re.match(r"transformer\.h\.(\d+)\.", k))}
    n_layer = len(layers)
    if n_layer == 0:
        raise CheckpointError(f"{path} is not a GPT-2 state dict (no transformer.h.N blocks)")
    n_head = next((p.n_head for p in GPT2_PRESETS.values() if (p.n_layer, p.n_embd) == (n_layer, n_embd)), None)
    if n_head is None:
        raise CheckpointError(f"{path}: {n_layer} layers of width {n_embd} is no published GPT-2 size, and a bare "
                              "weights file does not say its number of attention heads; put its config.json beside "
                              "it (or pass its Hugging Face directory)")
    fc = s.get("transformer.h.0.mlp.c_fc.weight")  # Conv1D: [n_embd, n_inner]
    n_inner = fc.shape[-1] if fc is not None and fc.shape[-1] != 4 * n_embd else None
    head, wte = state.get("lm_head.weight"), s["transformer.wte.weight"]  # the head: a copy of wte's, or its own
    tied = head is None or (head.shape == wte.shape and torch.equal(head, wte))
    try:
        return GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                          n_head=n_head, n_inner=n_inner, tie_word_embeddings=tied)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def key_mismatch(missing: list[str], unexpected: list[str]) -> str | None:
    """'missing A and 2 more; unexpected B' for an error message, or None when both lists are empty."""
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            parts.append(f"{what} {keys[0]}" + (f" and {len(keys) - 1} more" if len(keys) > 1 else ""))
    return "; ".join(parts) or None


FAMILY_NAMES = {"gpt2": "GPT-2", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
                "gpt_neox": "GPT-NeoX"}


def _head_name(model: CausalLM) -> str:
    """The output head's name in the checkpoint (and our module tree): GPT-NeoX's embed_out, else lm_head."""
    return "embed_out" if hasattr(model, "embed_out") else "lm_head"


def _family_keys(model: CausalLM, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A non-GPT-2 checkpoint's keys are already ours: drop buffers, a tied head's copy and a task head."""
    head = f"{_head_name(model)}.weight"
    return {k: v for k, v in state.items()
            if not IGNORED_KEY.search(k) and k not in HEAD_KEYS and not (model.tied and k == head)}


def _check_tied_head(model: CausalLM, state: dict, given: dict, path: Path) -> None:
    """A config that ties the output head to the embedding, over a checkpoint that stores a head of its own with
    other values: transformers keeps that head untied (and warns); tying it would compute other logits."""
    stored = next((state[k] for k in ("lm_head.weight", "embed_out.weight") if k in state), None)
    embed_key = next((n for n, p in model.named_parameters() if p is model.embed_tokens.weight), None)
    embed = given.get(embed_key) if embed_key is not None else None
    if stored is None or embed is None or stored.is_meta:  # a header's shapes have no values to compare
        return
    if stored.shape != embed.shape or not torch.equal(stored.float(), embed.float()):
        raise CheckpointError(f"{path}: config.json ties the output head to the input embedding (tie_word_embeddings: "
                              "true), but the checkpoint stores an output head with other values; set "
                              "tie_word_embeddings: false in config.json to use that head (as transformers does)")


def checked_tensors(model: CausalLM, state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the (meta) model's names, in its layout (GPT-2's Conv1D weights
    transposed): every name, shape and floating-point dtype checked, a mismatch one CheckpointError naming it."""
    gpt2 = model_type(model.config) == "gpt2"
    tied_head = {"lm_head.weight", "embed_out.weight"} if model.tied else set()
    expected = {k: v for k, v in model.state_dict().items() if k not in tied_head}
    given = _canonical(state, model.tied) if gpt2 else _family_keys(model, state)
    missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    head = _head_name(model)
    if missing == [f"{head}.weight"] and not extra and any(k in state for k in HEAD_KEYS):
        # `lora merge` of a classifier writes the body and its score head, no output head (transformers'
        # *ForSequenceClassification has none): a tied head is the embedding, an untied one is gone
        raise CheckpointError(f"{path} is a merged classifier without the {head} its base has: lora-cli reads a "
                              "merged classifier as a base model only when the output head is tied to the input "
                              "embedding; load it with transformers' AutoModelForSequenceClassification, or use "
                              "its adapter (lora predict --adapter FILE)")
    mismatch = key_mismatch(missing, extra)
    if mismatch:
        family = FAMILY_NAMES[model_type(model.config)]
        raise CheckpointError(f"{path} does not match the {family} architecture of its config: {mismatch}")
    if model.tied:
        _check_tied_head(model, state, given, path)
    checked = {}
    for key, target in expected.items():
        tensor = given[key]
        if gpt2 and key.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{path}: tensor {key} has shape {list(tensor.shape)}, the model expects {list(target.shape)}"
            )
        if not tensor.is_floating_point():
            raise CheckpointError(f"{path}: tensor {key} has dtype {tensor.dtype}, expected floating point")
        checked[key] = tensor
    return checked


def build_model(config, state: dict[str, torch.Tensor], path: Path, keep: torch.dtype | None = None) -> CausalLM:
    """A model of the config's family with `state` copied in: GPT-2's Conv1D weights transposed, every name and
    shape checked; weights become fp32.

    keep: the autocast dtype of a bf16/fp16 run. The weights and biases of linear layers (not the output head)
    that the checkpoint stores in that dtype stay as they are, the tensors just read: a bf16 checkpoint then
    loads without an fp32 copy of its linear layers (peak memory about its size, not 3x). These are the weights
    train stores in that dtype anyway (models.cast_frozen_linears_, which turns a trained one back to fp32), and
    the bf16 -> fp32 -> bf16 round trip is exact, so the run computes the same."""
    model = meta_model(config)
    head = model.lm_head
    linear = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head
              for p in ("weight", "bias")} if keep is not None else set()
    converted = {}
    for key, tensor in checked_tensors(model, state, path).items():
        kept = key in linear and tensor.dtype == keep
        converted[key] = (tensor if kept else tensor.to(torch.float32)).contiguous()
    tied = model.tied
    # assign: the checked tensors become the parameters of the meta model (every key is there, see above), with
    # no allocation of empty weights first; to_empty would also import sympy through torch._refs
    model.load_state_dict(converted, strict=False, assign=True)
    if tied:  # re-tie after assign
        model.lm_head.weight = model.embed_tokens.weight
    return model


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A cheap identity of base weights: names, shapes and an evenly strided sample of every tensor.
    Tells one checkpoint from another without hashing gigabytes."""
    h = hashlib.sha256()
    for key in sorted(state):
        if key == "lm_head.weight":
            continue
        t = state[key].detach().reshape(-1)
        step = max(1, t.numel() // 4096)
        sample = t[::step].to(torch.float32).contiguous().cpu()
        h.update(key.replace(".base_layer", "").encode())
        h.update(str(tuple(state[key].shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


# model_type -> transformers' class names of (the causal LM, the sequence classifier): config.json's architectures.
ARCHITECTURES = {
    "gpt2": ("GPT2LMHeadModel", "GPT2ForSequenceClassification"),
    **{t: (f"{FAMILY_NAMES[t]}ForCausalLM", f"{FAMILY_NAMES[t]}ForSequenceClassification")
       for t in ("llama", "mistral", "qwen2", "qwen3")},
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXForSequenceClassification"),
}


def architecture(model: CausalLM) -> str:
    """The transformers class a saved `model` loads as: the family's causal LM, or its sequence classifier when
    the model carries a `score` head."""
    return ARCHITECTURES[model_type(model.config)][getattr(model, HEAD, None) is not None]


def hf_config_dict(config, torch_dtype: str = "float32", base_config: dict | None = None) -> dict:
    """config.json of a saved model: GPT-2's written from GPT2Config; another family's is the checkpoint's own
    config.json (base_config: every field it had, token ids and rope parameters included), else our config."""
    if model_type(config) != "gpt2":
        out = dict(base_config if base_config is not None else config.to_dict())
        out["model_type"] = model_type(config)
        dtype_keys = [k for k in ("torch_dtype", "dtype") if k in out] or ["torch_dtype"]  # transformers 4 / 5
        out.update({k: torch_dtype for k in dtype_keys})
        return out
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "initializer_range": 0.02,
        "n_ctx": config.n_positions,
        "tie_word_embeddings": True,
        "torch_dtype": torch_dtype,
        **config.to_dict(),
    }


def hf_state_dict(state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                  leave_out: tuple[str, ...] = ("lm_head.weight",), gpt2: bool = True) -> dict[str, torch.Tensor]:
    """Our state dict -> Hugging Face's layout: GPT-2's Conv1D weights back to [in, out]; the keys in leave_out
    (a tied head, which the embedding's weight stands for) are left out. The other families' names and
    orientation are already transformers'."""
    out = {}
    for key, tensor in state.items():
        if key in leave_out:
            continue
        t = tensor.detach().to("cpu", dtype)
        out[key] = (t.t() if gpt2 and key.endswith(CONV1D_SUFFIXES) else t).contiguous()
    return out


def save_pretrained(
    model: CausalLM,
    out_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    extra_files: dict[str, str] | None = None,
    config_updates: dict | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    base_config: dict | None = None,
) -> Path:
    """Write config.json + model.safetensors (+ extra text files) as a Hugging Face directory of the model's
    family: `transformers.AutoModelForCausalLM` loads it, or AutoModelForSequenceClassification when the model
    carries a `score` head (whose directory holds no output head: the classifier has none). base_config: the
    checkpoint's config.json (BaseModel.hf_config), written back with its own fields.

    The directory appears whole or not at all: it is built beside the target and renamed into place.
    """
    out = Path(out_dir)
    dtype_name = str(dtype).removeprefix("torch.")
    config = {**hf_config_dict(model.config, dtype_name, base_config), "architectures": [architecture(model)],
              **(config_updates or {})}
    head = "embed_out.weight" if hasattr(model, "embed_out") else "lm_head.weight"
    classifier = getattr(model, HEAD, None) is not None
    leave_out = (head,) if model.tied or classifier else ()
    tensors = hf_state_dict(model.state_dict(), dtype, leave_out, gpt2=model_type(model.config) == "gpt2")
    tensors.update({k: v.detach().to("cpu", dtype).contiguous() for k, v in (extra_tensors or {}).items()})
    with atomic_dir(out, CheckpointError) as staging:
        atomic_write_text(staging / "config.json", json.dumps(config, indent=2) + "\n")
        with atomic_path(staging / "model.safetensors") as tmp:
            safetensors.torch.save_file(tensors, str(tmp), metadata={"format": "pt"})  # looked up here: tests pause it
        for name, text in (extra_files or {}).items():
            atomic_write_text(staging / name, text)
    return out
