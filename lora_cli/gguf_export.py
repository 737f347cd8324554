"""`lora export --format gguf | gguf-lora`: an adapter for llama.cpp and Ollama, written with llama.cpp's own
`gguf` Python package (pip install "lora-cli[gguf]").

--format gguf       the base with the adapter folded in (lora.merge_and_unload, fp32) as one GGUF file: the
                    architecture's metadata, the tokenizer (byte-level BPE tokens, merges, token types, bos / eos /
                    pad ids, add_bos) and the chat template the model was trained with, for every family. Tensor
                    names come from gguf's TensorNameMap; the per-family layouts follow llama.cpp's
                    convert_hf_to_gguf.py:
                      gpt2        weights are [out, in] already (transformers' Conv1D [in, out] is transposed when
                                  lora-cli loads it); the output projection is written beside the tied embedding
                      llama       (also mistral) q_proj / k_proj rows permuted from the rotate-half layout of
                                  transformers to the interleaved pairs llama.cpp's rotary embedding reads; Llama 3
                                  rope scaling as a rope_freqs tensor of per-frequency divisors
                      qwen2/3     as they are (llama.cpp rotates them in the rotate-half "neox" layout)
                      gpt_neox    query_key_value rows from per-head [H, 3, D] to [3, H, D] (q | k | v)
                    --dtype f32 | f16 | bf16 | q8_0 (1-D tensors stay f32; a q8_0 row not a multiple of 32 falls
                    back to f16, as convert_hf_to_gguf.py does).
--format gguf-lora  the adapter alone, as llama.cpp's convert_lora_to_gguf.py writes it for `llama-cli --lora`:
                    general.type adapter, adapter.type lora, adapter.lora.alpha, and NAME.lora_a [r, in] /
                    NAME.lora_b [out, r] per layer (the family's row layout applied to lora_b; any scaling other
                    than alpha / r, e.g. rsLoRA or per-layer alphas, folded into lora_b).
--ollama            a `Modelfile` beside the GGUF: FROM, TEMPLATE (Go template syntax) and PARAMETER stop lines.

The template: the adapter's `chat_template` metadata if present, else the base tokenizer_config.json's
`chat_template`, else the adapter's prompt template (alpaca, prompt_completion), turned into a chat template.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_cli.chat_template import checkpoint_template, end_of_turn_id, read_template, reply_ends
from lora_cli.data.formats import prompt_template
from lora_cli.errors import AdapterError, ConfigError, LoraError
from lora_cli.fsutil import atomic_path, atomic_write_text
from lora_cli.inference import Loaded, load_for_inference
from lora_cli.lora import LoRALinear, LoRASlicedLinear, lora_layers, merge_and_unload
from lora_cli.merge import hf_vocab_and_merges
from lora_cli.models import HEAD, model_type
from lora_cli.prompts import uses_template
from lora_cli.tokenizer import GPT2Tokenizer

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
FORMATS = ("gguf", "gguf-lora")
MODELFILE = "Modelfile"
# model_type -> llama.cpp's architecture (a gguf.MODEL_ARCH member): Mistral runs as llama, as in convert_hf_to_gguf
ARCHITECTURES = {"gpt2": "GPT2", "llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3",
                 "gpt_neox": "GPTNEOX"}
# Token types (llama.cpp's llama_token_type): NORMAL 1, CONTROL 3, USER_DEFINED 4, UNUSED 5.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
# The pre-tokenizer split patterns llama.cpp knows by name (llama-vocab.cpp), as tokenizer.json spells them.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _gguf():
    """The gguf package, or one line saying how to install it."""
    try:
        import gguf  # an optional dependency: only GGUF export needs it
    except ImportError as exc:
        raise ConfigError('GGUF export needs the gguf package: pip install "lora-cli[gguf]" (or pip install gguf)') from exc
    return gguf


# ------------------------------------------------------------------------------------------ layouts


def row_layout(family: str, name: str, config):
    """The function that reorders the rows (dim 0) of the weight or bias `name` into llama.cpp's layout, or None
    when it is stored as it is (see the module docstring)."""
    if family in ("llama", "mistral") and name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight",
                                                          "k_proj.bias")):
        heads = config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads
        return lambda t: permute_rotary(t, heads)
    if family == "gpt_neox" and name.endswith(("query_key_value.weight", "query_key_value.bias")):
        return lambda t: neox_qkv(t, config.num_attention_heads)
    return None


def permute_rotary(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from rotate-half order (x_0..x_{D/2-1}, then their partners) to interleaved pairs
    (x_0, x_{D/2}, x_1, ...): [H * D, ...] viewed as [H, 2, D/2, ...] -> [H, D/2, 2, ...]."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def neox_qkv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """GPT-NeoX's fused rows, per head [H, 3, D], to [3, H, D]: all queries, then keys, then values."""
    return t.reshape(heads, 3, t.shape[0] // heads // 3, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


# ------------------------------------------------------------------------------------------ tokenizer


@dataclass
class Vocab:
    """What a GGUF file says about the tokenizer."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE)
    pre: str  # tokenizer.ggml.pre: the pre-tokenizer's name in llama.cpp
    tokens: list[str]
    types: list[int]
    merges: list[str]  # "left right", in rank order
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None


def gguf_vocab(tokenizer, vocab_size: int, log=None) -> Vocab:
    """The tokenizer as GGUF stores it, padded to the model's `vocab_size` embedding rows with unused tokens
    `[PAD{id}]` (llama.cpp sizes the embedding by the token list)."""
    log = log or (lambda message: None)
    if isinstance(tokenizer, GPT2Tokenizer):
        vocab, pairs = hf_vocab_and_merges()
        specials, added = {tokenizer.eos_id}, set()
        out = Vocab("gpt2", "gpt-2", [], [], [f"{a} {b}" for a, b in pairs], tokenizer.bos_id, tokenizer.eos_id,
                    None)
    else:
        vocab, pairs, specials, added, pre = _tokenizer_json(tokenizer.path, log)
        out = Vocab("gpt2", pre, [], [], pairs, tokenizer.bos_id, tokenizer.eos_ids[0] if tokenizer.eos_ids else None,
                    tokenizer.pad_id)
    by_id = {i: token for token, i in vocab.items()}
    for i in range(vocab_size):
        token = by_id.get(i)
        out.tokens.append(token if token is not None else f"[PAD{i}]")
        if token is None:
            out.types.append(UNUSED)
        elif i in specials:
            out.types.append(CONTROL)
        elif i in added:
            out.types.append(USER_DEFINED)
        else:
            out.types.append(NORMAL)
    return out


def _tokenizer_json(path: Path, log):
    """(vocab token -> id, merges "a b", special ids, other added ids, llama.cpp pre-tokenizer name) of a
    byte-level BPE tokenizer.json."""
    from tokenizers import Tokenizer  # here: only HF tokenizers need it

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    model = data.get("model") or {}
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if model.get("type") != "BPE" or model.get("byte_fallback") or "ByteLevel" not in kinds:
        raise ConfigError(f"{path}: GGUF export converts byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM, "
                          "Qwen2/3, Pythia); this one is not (SentencePiece-style ones, as Llama 2, Mistral 7B and "
                          "TinyLlama use, are not converted yet)")
    tok = Tokenizer.from_file(str(path))
    vocab = tok.get_vocab(with_added_tokens=True)
    decoder = tok.get_added_tokens_decoder()
    specials = {i for i, t in decoder.items() if t.special}
    added = set(decoder) - specials
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    splits = [(s.get("pattern") or {}).get("Regex") for s in steps if s.get("type") == "Split"]
    byte_level = next(s for s in steps if s.get("type") == "ByteLevel")
    if not splits and kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        name = "gpt-2"  # GPT-2's own split pattern (GPT-2, Pythia, the tests' tokenizers)
    elif splits == [LLAMA3_SPLIT]:
        name = "llama-bpe"
    elif splits == [QWEN2_SPLIT]:
        name = "qwen2"
    elif kinds == ["Digits", "ByteLevel"]:
        name = "smollm"
    else:
        name = "default"
        log(f"warning: {path}: a pre-tokenizer llama.cpp does not know by name; written as 'default', so llama.cpp "
            "may split some texts differently")
    if byte_level.get("add_prefix_space"):
        log(f"warning: {path}: the tokenizer puts a space before every text (ByteLevel add_prefix_space) and "
            "llama.cpp does not, so their ids differ at the start of a text")
    norm = data.get("normalizer") or {}
    norms = [n.get("type") for n in (norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm])]
    # NFC alone (Qwen2's) changes only texts written in decomposed Unicode: not worth a warning on every export
    if [n for n in norms if n not in (None, "NFC")]:
        log(f"warning: {path}: the tokenizer normalizes text first ({', '.join(map(str, norms))}) and llama.cpp "
            "does not, so their ids differ on texts the normalizer changes")
    return vocab, merges, specials, added, name


# ------------------------------------------------------------------------------------------ templates


def chat_template(loaded: Loaded) -> str | None:
    """The template the adapter was trained with (its metadata), else the base checkpoint's own
    (chat_template.checkpoint_template), else None."""
    if loaded.settings.chat_template:
        return read_template(loaded.settings.chat_template)
    return checkpoint_template(loaded.tokenizer, loaded.base.name if loaded.base.source == "local" else None)


def llama_cpp_lacks(family: str, cfg) -> str | None:
    """Why llama.cpp's architecture for this family cannot hold the checkpoint (it would refuse to load the file),
    or None: Qwen2/Qwen3 read no rope_freqs tensor, Qwen3 no attention biases, and GPT-NeoX needs them."""
    if family in ("qwen2", "qwen3") and getattr(cfg, "rope_scaling", None):
        kind = cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type"))
        return f"llama.cpp's {family} architecture has no rope scaling tensor for its rope_scaling {kind!r}"
    if family == "qwen3" and cfg.attention_bias:
        return "llama.cpp's qwen3 architecture has no attention biases (attention_bias: true)"
    if family == "gpt_neox" and not cfg.attention_bias:
        return "llama.cpp's gpt_neox architecture needs attention biases (attention_bias: false here)"
    return None


def prompt_pieces(settings) -> list[str | None] | None:
    """The adapter's prompt template as literal text around one None slot (where the user's prompt goes), or None
    when it has none (format text). Alpaca uses its template without an Input block; other fields render empty."""
    if not uses_template(settings):
        return None
    template = prompt_template(settings.format, settings.prompt_template, has_input=False)
    role = "instruction" if settings.format == "alpaca" else "prompt"
    slot = {role, settings.columns.get(role, role)}  # a custom template may name the role's column
    pieces: list[str | None] = []
    for literal, name, _, _ in string.Formatter().parse(template):
        if pieces and pieces[-1] is not None:  # the parser cuts literal text at each escaped brace: rejoin it,
            pieces[-1] += literal  # so the Jinja and Go escapes below see a "{{" whole
        else:
            pieces.append(literal)
        if name in slot:
            pieces.append(None)
    return pieces


def jinja_from_prompt(pieces: list[str | None], eos: str) -> str:
    """A chat template (Jinja, as tokenizer.chat_template) that renders each user message with the prompt template
    and each assistant message as its text and eos, as the adapter was trained."""
    lit = lambda s: "{{ " + json.dumps(s) + " }}" if re.search(r"{[{%#]|{$", s) else s  # noqa: E731
    user = "".join("{{ message['content'] }}" if p is None else lit(p) for p in pieces)
    return ("{% for message in messages %}{% if message['role'] == 'user' %}" + user
            + "{% elif message['role'] == 'assistant' %}{{ message['content'] }}" + lit(eos)
            + "{% endif %}{% endfor %}")


def go_literal(s: str) -> str:
    """Text as it stands in a Go template (a literal `{{` becomes an action printing it)."""
    s = s.replace("{{", '{{ "{{" }}')
    return s[:-1] + '{{ "{" }}' if s.endswith("{") and not s.endswith('}}') else s  # "{" + "{{ .Prompt }}"


def go_from_prompt(pieces: list[str | None]) -> str:
    return "".join("{{ .Prompt }}" if p is None else go_literal(p) for p in pieces)


def go_from_chat(template: str, bos: str, eos: str, strip_bos: bool) -> str | None:
    """An Ollama Go template equal to the Jinja chat template on conversations of system, user and assistant
    messages, found by rendering it around marker texts: the text before, after and between the messages by role.
    None when the template does not fit that shape (checked on three conversations)."""
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment  # templates are data: sandboxed
    except ImportError:
        return None
    try:
        render = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template).render
    except Exception:  # a template jinja cannot compile
        return None
    S, U, A, U2 = "\x01SYS\x01", "\x01USR\x01", "\x01AST\x01", "\x01US2\x01"

    def run(messages, gen):
        text = render(messages=[{"role": r, "content": c} for r, c in messages], add_generation_prompt=gen,
                      bos_token=bos, eos_token=eos)
        return text[len(bos):] if strip_bos and text.startswith(bos) else text  # the runtime adds bos itself

    try:
        full = run([("system", S), ("user", U), ("assistant", A), ("user", U2)], False)
        gen = run([("system", S), ("user", U), ("assistant", A), ("user", U2)], True)[len(full):]
        head, rest = full.split(S)
        sys_user, rest = rest.split(U)
        user_asst, rest = rest.split(A)
        asst_user, user_end = rest.split(U2)
        asst_end = run([("system", S), ("user", U), ("assistant", A)], False).split(A)[1]
        head_user = run([("user", U)], False).split(U)[0]
    except Exception:  # an unexpected layout, or a template that raised (e.g. it insists on some role order)
        return None
    user_pre = asst_user[len(asst_end):] if asst_user.startswith(asst_end) else None
    if user_pre is None or not user_asst.startswith(user_end) or not sys_user.endswith(user_pre) \
            or not head_user.endswith(user_pre):
        return None
    asst_pre, sys_end, start = user_asst[len(user_end):], sys_user[: len(sys_user) - len(user_pre)], \
        head_user[: len(head_user) - len(user_pre)]
    pieces = {"system": (head, sys_end), "user": (user_pre, user_end), "assistant": (asst_pre, asst_end)}

    def expected(messages):  # what the Go template below renders, in Python
        out = "" if messages[0][0] == "system" else start
        for role, content in messages:
            out += pieces[role][0] + content + pieces[role][1]
        return out + gen

    for conv in ([("user", U)], [("user", U), ("assistant", A), ("user", U2)], [("system", S), ("user", U)]):
        if run(conv, True) != expected(conv):
            return None
    if any('"""' in p for pair in pieces.values() for p in pair) or '"""' in start + gen:
        return None
    g = go_literal  # no {{- trims: they would eat the newlines of the template's own text
    return ("{{ if or (not .Messages) (ne (index .Messages 0).Role \"system\") }}" + g(start) + "{{ end }}"
            "{{ range .Messages }}"
            "{{ if eq .Role \"system\" }}" + g(head) + "{{ .Content }}" + g(sys_end)
            + "{{ else if eq .Role \"user\" }}" + g(user_pre) + "{{ .Content }}" + g(user_end)
            + "{{ else if eq .Role \"assistant\" }}" + g(asst_pre) + "{{ .Content }}" + g(asst_end)
            + "{{ end }}{{ end }}" + g(gen))


def modelfile(gguf_name: str, template: str | None, stops: list[str]) -> str:
    """An Ollama Modelfile for the GGUF file beside it."""
    lines = [_from_line(gguf_name)]
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ export


@dataclass
class GGUFResult:
    path: Path
    tensors: int
    modelfile: Path | None = None


def check_replaceable(out: Path, ollama: bool, overwrite: bool) -> None:
    """Refuse to write over an existing file unless --overwrite, and even then anything but a GGUF file (its
    magic bytes): --overwrite must never replace a user's other files."""
    if out.is_dir():
        raise ConfigError(f"{out} is a directory; name the .gguf file to write, e.g. {out / 'model.gguf'}")
    for path in (out, out.parent / MODELFILE) if ollama else (out,):
        if path != out and path.is_dir():
            raise ConfigError(f"{path} is a directory, where --ollama writes the Modelfile; move it or write the "
                              "GGUF into another folder")
        if not path.exists():
            continue
        if not overwrite:
            raise ConfigError(f"{path} already exists; choose another name or pass --overwrite to replace it")
        if path == out:
            with open(out, "rb") as fh:
                if fh.read(4) != b"GGUF":
                    raise ConfigError(f"{out} exists and is not a GGUF file; --overwrite replaces only a GGUF file; "
                                      "choose another name")
        elif _first_line(path) != _from_line(out.name):
            raise ConfigError(f"{path} exists and is not the Modelfile of {out.name} (its first line is not "
                              f"{_from_line(out.name)!r}); --overwrite replaces only that one; move it or write the "
                              "GGUF into another folder")


def _from_line(gguf_name: str) -> str:
    return f"FROM ./{gguf_name}"


def _first_line(path: Path) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.readline().rstrip("\r\n")
    except OSError:
        return ""


def export_gguf(adapter, out, fmt: str = "gguf", dtype: str = "f32", model: str | None = None,
                ollama: bool = False, allow_mismatch: bool = False, overwrite: bool = False,
                log=None) -> GGUFResult:
    """Write `out` (a .gguf file) from the adapter: the merged model (fmt gguf) or the adapter alone
    (gguf-lora); with `ollama`, a Modelfile beside it. Existing files are replaced only with `overwrite`."""
    log = log or (lambda message: None)
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not a GGUF format; choose gguf or gguf-lora")
    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    if fmt == "gguf-lora" and ollama:
        raise ConfigError("--ollama needs --format gguf: an Ollama ADAPTER needs its base as a GGUF file too; "
                          "export the merged model with --format gguf --ollama")
    out = Path(out).expanduser()
    check_replaceable(out, ollama, overwrite)
    gguf = _gguf()
    loaded = load_for_inference(adapter, model, allow_mismatch)
    if loaded.settings.task == "classification" or getattr(loaded.model, HEAD, None) is not None:
        raise ConfigError(f"adapter {loaded.adapter.path} is a classifier; llama.cpp runs causal language models: "
                          "GGUF export needs a causal-LM adapter")
    net = loaded.model.float()
    family = model_type(net.config)
    missing = llama_cpp_lacks(family, net.config)
    if missing:
        raise ConfigError(f"{loaded.base.name}: {missing}: llama.cpp could not load the file, so this model is not "
                          "exported to GGUF")
    arch = gguf.MODEL_ARCH[ARCHITECTURES[family]]
    names = gguf.get_tensor_name_map(arch, len(net.blocks))  # checkpoint names -> GGUF names, llama.cpp's table
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
        writer.add_name(f"{Path(loaded.base.name).name} + {loaded.adapter.path.stem}")
        if fmt == "gguf":
            count = _write_model(gguf, writer, names, loaded, net, family, dtype, log)
        else:
            count = _write_lora(gguf, writer, names, loaded, net, family, dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        check_replaceable(out, ollama, overwrite)  # again: another command may have written `out` meanwhile
    result = GGUFResult(out, count)
    if ollama:
        result.modelfile = out.parent / MODELFILE
        atomic_write_text(result.modelfile, _modelfile_text(loaded, out.name, log))
    return result


def _template_info(loaded: Loaded) -> tuple[str | None, list | None]:
    """(the chat template, the prompt template's pieces): the first is used when there is one."""
    chat = chat_template(loaded)
    return chat, (None if chat is not None else prompt_pieces(loaded.settings))


def adds_bos(loaded: Loaded) -> bool:
    """Whether llama.cpp should add bos to a text (tokenizer.ggml.add_bos_token): as the tokenizer does, except for
    an adapter trained on chat data, whose conversations were tokenised as the template wrote them (a bos only
    where the template writes one; transformers' apply_chat_template does the same)."""
    return loaded.tokenizer.adds_bos and not loaded.settings.chat_template


def _token_text(tokenizer, token_id: int | None) -> str:
    return "" if token_id is None else tokenizer.decode([token_id])


def _modelfile_text(loaded: Loaded, gguf_name: str, log) -> str:
    tok = loaded.tokenizer
    chat, pieces = _template_info(loaded)
    template = None
    if chat is not None:
        template = go_from_chat(chat, _token_text(tok, tok.bos_id), _token_text(tok, tok.eos_ids[0]),
                                strip_bos=adds_bos(loaded))
        if template is None:
            log("warning: the chat template has a shape the Modelfile's Go template cannot follow; TEMPLATE is left "
                "out, so Ollama uses the GGUF file's chat template")
    elif pieces is not None:
        template = go_from_prompt(pieces)
    else:
        template = "{{ .Prompt }}"  # plain text: the prompt as it is
    stops = [tok.decode([i]) for i in tok.eos_ids]
    if chat is not None:  # the template's end of turn, as `lora chat` stops there (ChatML's <|im_end|>)
        stops.append(reply_ends(chat, tok)[1])
    return modelfile(gguf_name, template, [s for s in dict.fromkeys(stops) if s])


def _quantize(gguf, name: str, t: torch.Tensor, dtype: str):
    """(data, raw_dtype) for writer.add_tensor: 1-D tensors and norms in f32 as llama.cpp wants them."""
    data = t.detach().float().contiguous().numpy()
    if dtype == "f32" or data.ndim <= 1 or name.endswith("_norm.weight"):
        return data, None
    if dtype == "f16":
        return data.astype("float16"), None
    kind = gguf.GGMLQuantizationType.BF16 if dtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    try:
        return gguf.quants.quantize(data, kind), kind
    except gguf.QuantError:  # a row length not a multiple of the 32-value block: f16, as convert_hf_to_gguf does
        return data.astype("float16"), None


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def _write_model(gguf, writer, names, loaded: Loaded, net, family: str, dtype: str, log) -> int:
    """Hyperparameters, tokenizer, template and the merged tensors."""
    cfg = net.config
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[dtype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # GPT-2's names (models.common.ModelConfig), which every family's config answers to
    writer.add_context_length(cfg.n_positions)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    if family == "gpt2":
        writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        writer.add_rope_freq_base(cfg.rope_theta)
    if family == "gpt_neox":
        writer.add_rope_dimension_count(int(cfg.rotary_pct * cfg.head_dim))
        writer.add_parallel_residual(cfg.use_parallel_residual)
        writer.add_layer_norm_eps(cfg.layer_norm_eps)
    elif family != "gpt2":
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)

    vocab = gguf_vocab(loaded.tokenizer, cfg.vocab_size, log)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for add, value in ((writer.add_bos_token_id, vocab.bos_id), (writer.add_eos_token_id, vocab.eos_id),
                       (writer.add_pad_token_id, vocab.pad_id)):
        if value is not None:
            add(value)
    writer.add_add_bos_token(adds_bos(loaded))
    chat, pieces = _template_info(loaded)
    if chat is not None:
        eot = end_of_turn_id(chat, loaded.tokenizer)
        if eot is not None and eot != vocab.eos_id:  # llama.cpp ends a reply at eot_token_id as at eos
            writer.add_eot_token_id(eot)
    elif pieces is not None:
        chat = jinja_from_prompt(pieces, _token_text(loaded.tokenizer, loaded.tokenizer.eos_ids[0]))
    if chat is not None:
        writer.add_chat_template(chat)

    log(f"merging {len(lora_layers(net))} LoRA layers into {loaded.base.name}")
    merge_and_unload(net)  # W += scaling * B A in fp32
    tied = net.tied
    state = net.state_dict()
    count = 0
    for key, tensor in state.items():
        if key == "lm_head.weight" and tied and family != "gpt2":
            continue  # llama.cpp reads a missing output tensor as the tied embedding
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LoraError(f"tensor {key} has no GGUF name in llama.cpp's {family} architecture; report it")
        if not bool(torch.isfinite(tensor).all()):
            raise LoraError(f"the merged weight {key} is not finite; nothing was written")
        layout = row_layout(family, key, cfg)
        data, raw = _quantize(gguf, name, layout(tensor) if layout else tensor, dtype)
        writer.add_tensor(name, data, raw_dtype=raw)
        count += 1
    scaling = getattr(cfg, "rope_scaling", None)
    if family != "gpt2" and scaling:  # Llama 3: llama.cpp divides each rotary frequency by its factor
        plain = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim))
        writer.add_tensor("rope_freqs.weight", (plain / net.rotary.inv_freq.cpu()).float().numpy())
        count += 1
    return count


def _write_lora(gguf, writer, names, loaded: Loaded, net, family: str, dtype: str) -> int:
    """The adapter's layers as NAME.lora_a / NAME.lora_b (convert_lora_to_gguf.py's layout)."""
    lora = loaded.adapter.lora
    where = f"adapter {loaded.adapter.path}"
    if lora.use_dora:
        raise AdapterError(f"{where} uses DoRA, which llama.cpp LoRA adapters cannot express; export the merged "
                           "model with --format gguf")
    # What the file holds decides, not lora.bias: `bias: lora_only` on a model without biases trains none.
    carried = [k for k in loaded.adapter.tensors if not re.search(r"\.lora_[AB]\.", k)]
    if lora.modules_to_save or carried:
        raise AdapterError(f"{where} also trains whole modules or biases, which a llama.cpp LoRA adapter cannot "
                           "carry; export the merged model with --format gguf")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora.alpha))
    count = 0
    for module_name, layer in lora_layers(net):
        if isinstance(layer, LoRASlicedLinear):  # one adapter of rank r_q + r_k + r_v with a block B
            pairs = [(layer.slice(s), layer.offset(s)) for s in layer.slice_names]
            A = torch.cat([m.lora_A.weight.float() for m, _ in pairs])
            B = torch.zeros(layer.out_features, A.shape[0])
            col = 0
            for m, row in pairs:
                B[row: row + layer.slice_size, col: col + m.r] = m.lora_B.weight.float() * m.scaling
                col += m.r
        else:
            assert isinstance(layer, LoRALinear)
            A, B = layer.lora_A.weight.float(), layer.lora_B.weight.float() * layer.scaling
        B = B * (A.shape[0] / lora.alpha)  # llama.cpp scales by alpha / r: what is left of the scaling rides in B
        key = f"{module_name}.weight"
        name = names.get_name(key, try_suffixes=(".weight",))
        if name is None:
            raise LoraError(f"layer {module_name} has no GGUF name in llama.cpp's {family} architecture; report it")
        layout = row_layout(family, key, net.config)
        for suffix, t in (("lora_a", A), ("lora_b", layout(B) if layout else B)):
            data, raw = _quantize(gguf, name, t, dtype)
            writer.add_tensor(f"{name}.{suffix}", data, raw_dtype=raw)
            count += 1
    return count
