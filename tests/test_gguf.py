"""`lora export --format gguf | gguf-lora [--ollama]`: GGUF files for llama.cpp and Ollama, read back with llama.cpp's
own `gguf` reader. Per family, on tiny random transformers checkpoints with a LoRA adapter: every tensor of the f32
export equals W + scaling B A computed here from the checkpoint and the adapter file (the family's layout undone:
llama's rotary row permutation, GPT-NeoX's fused q/k/v order, GPT-2's Conv1D transpose), the metadata and
tokenizer fields are right, f16 / bf16 / q8_0 stay within their rounding, gguf-lora tensors are the adapter's A and
B; the Modelfile is exact. With llama-cpp-python installed, llama.cpp's logits on the f32 file equal ours."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import assert_one_line_error, build_tokenizer, cli, make_hf_gpt2

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

V = 400  # build_tokenizer's vocabulary
SIZES = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)
R, ALPHA = 4, 8.0
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def hf_config(family: str):
    """The feature that sets each family apart switched on (as tests/test_models.py)."""
    if family == "llama":  # GQA, tied embeddings, q/k/v/o biases, llama3 rope scaling
        return transformers.LlamaConfig(**SIZES, num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    if family == "mistral":
        return transformers.MistralConfig(**SIZES, num_key_value_heads=2, sliding_window=None)
    if family == "qwen2":  # q/k/v biases
        return transformers.Qwen2Config(**SIZES, num_key_value_heads=2, tie_word_embeddings=True)
    if family == "qwen3":  # q/k RMSNorm, head_dim * heads != hidden_size
        return transformers.Qwen3Config(**SIZES, num_key_value_heads=2, head_dim=32)
    if family == "gpt_neox":  # partial rotary, parallel residual, fused per-head q/k/v
        return transformers.GPTNeoXConfig(**SIZES, rotary_pct=0.5)
    raise KeyError(family)


FAMILIES = ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gpt_neox"]
TARGETS = {"gpt2": ["attn.c_attn", "mlp.c_fc"], "gpt_neox": ["all-linear"]}


def make_adapter(path, lora_kw=None, metadata=None, out=None):
    """A LoRA adapter on the checkpoint at `path` with random non-zero A and B, saved as `lora train` saves one."""
    from lora_cli.adapter import save_adapter
    from lora_cli.config import LoraConfig
    from lora_cli.inference import load_with_tokenizer
    from lora_cli.lora import apply_lora

    base, _ = load_with_tokenizer(str(path))
    kw = {"r": R, "alpha": ALPHA, "dropout": 0.0, "targets": ["all-linear"], **(lora_kw or {})}
    apply_lora(base.model, LoraConfig(**kw), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name, p in base.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(hash(name) % 1000))
    meta = {"base_model": base.describe(), "task": "causal_lm", **(metadata or {})}
    return save_adapter(out or path / "adapter.safetensors", base.model, meta)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """build(family) -> (family, checkpoint dir, adapter file, f32 GGUF path), made once per module: a random
    transformers checkpoint (GPT-2 with the bundled BPE; the others with a byte-level BPE tokenizer.json, Qwen2's
    with a ChatML chat template), an alpaca adapter on it, and its f32 export."""
    from lora_cli.gguf_export import export_gguf

    made = {}

    def get(family):
        if family in made:
            return made[family]
        path = tmp_path_factory.mktemp(family)
        torch.manual_seed(0)
        if family == "gpt2":
            make_hf_gpt2(path)
        else:
            hf = transformers.AutoModelForCausalLM.from_config(hf_config(family)).eval()
            with torch.no_grad():
                for p in hf.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
            hf.save_pretrained(path)
            build_tokenizer(path, bos=family != "qwen2")
            if family == "qwen2":
                config = json.loads((path / "tokenizer_config.json").read_text())
                (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
        adapter = make_adapter(path, {"targets": TARGETS.get(family, ["all-linear"])}, {"data": {"format": "alpaca"}})
        out = path / "model.gguf"
        export_gguf(adapter, out, dtype="f32")
        made[family] = family, path, adapter, out
        return made[family]

    return get


@pytest.fixture(params=FAMILIES)
def exported(request, build):
    return build(request.param)


def merged_reference(path, adapter) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (transformers' names and layout) with W += alpha / r * B A from the adapter file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = load_file(str(path / "model.safetensors"))
    with safe_open(str(adapter), "pt") as f:
        lora = {k: f.get_tensor(k) for k in f.keys()}
    for key, a in lora.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            delta = ALPHA / R * (lora[module + ".lora_B.weight"] @ a)
            if module.startswith("transformer."):  # GPT-2's Conv1D stores [in, out]
                delta = delta.T
            state[module + ".weight"] = state[module + ".weight"] + delta
    return state


def undo_layout(family: str, key: str, t: torch.Tensor, config) -> torch.Tensor:
    """A GGUF tensor back in transformers' layout, written independently of gguf_export."""
    if family == "gpt2" and key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
        return t.T
    if family in ("llama", "mistral") and (".q_proj." in key or ".k_proj." in key):
        heads = config["num_attention_heads"] if ".q_proj." in key else config["num_key_value_heads"]
        d = t.shape[0] // heads
        return t.reshape(heads, d // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)  # pairs -> halves
    if family == "gpt_neox" and "query_key_value" in key:
        heads = config["num_attention_heads"]
        return t.reshape(3, heads, t.shape[0] // heads // 3, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
    return t


def field(reader, key):
    return reader.fields[key].contents()


def test_f32_tensors_metadata_and_tokenizer(exported):
    family, path, adapter, out = exported
    reader = gguf.GGUFReader(str(out))
    config = json.loads((path / "config.json").read_text())
    arch = {"mistral": "llama", "gpt_neox": "gptneox"}.get(family, family)
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), 2)
    reference = merged_reference(path, adapter)
    expected = {}
    for key, t in reference.items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is not None and not key.endswith((".attn.bias", ".masked_bias")):
            expected[name] = (key, t)
    if family == "gpt2":  # the tied output projection is written beside the embedding
        expected["output.weight"] = ("lm_head.weight", reference["transformer.wte.weight"])
    got = {t.name: t for t in reader.tensors}
    if family == "llama":  # llama3 rope scaling: the per-frequency divisors llama.cpp applies
        freqs = torch.tensor(got.pop("rope_freqs.weight").data.copy())
        assert freqs.shape == (8,) and freqs.min() == 1.0 and freqs.max() == 8.0
    assert set(got) == set(expected)
    for name, t in got.items():
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        key, want = expected[name]
        have = undo_layout(family, key, torch.tensor(t.data.copy()), config)
        assert have.shape == want.shape, name
        assert torch.allclose(have, want, atol=1e-6, rtol=1e-5), name
    # metadata
    assert field(reader, "general.architecture") == arch and field(reader, "general.type") == "model"
    assert field(reader, f"{arch}.block_count") == 2
    assert field(reader, f"{arch}.embedding_length") == 64
    assert field(reader, f"{arch}.context_length") == (128 if family == "gpt2" else SIZES["max_position_embeddings"])
    if family not in ("gpt2", "gpt_neox"):
        assert field(reader, f"{arch}.attention.head_count_kv") == 2
        assert field(reader, f"{arch}.rope.dimension_count") == config.get("head_dim", 16)
    if family == "gpt_neox":
        assert field(reader, f"{arch}.rope.dimension_count") == 8  # rotary_pct 0.5 of 16
        assert field(reader, f"{arch}.use_parallel_residual") is True
    # tokenizer
    tokens = field(reader, "tokenizer.ggml.tokens")
    merges = field(reader, "tokenizer.ggml.merges")
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    if family == "gpt2":
        assert len(tokens) == 50257 and tokens[50256] == "<|endoftext|>" and len(merges) == 50000
        assert field(reader, "tokenizer.ggml.bos_token_id") == field(reader, "tokenizer.ggml.eos_token_id") == 50256
        assert field(reader, "tokenizer.ggml.add_bos_token") is False
        assert field(reader, "tokenizer.ggml.token_type")[50256] == 3  # control
    else:
        tok = json.loads((path / "tokenizer.json").read_text())
        assert len(tokens) == V and len(merges) == len(tok["model"]["merges"])
        assert merges[0] == " ".join(tok["model"]["merges"][0]) if isinstance(tok["model"]["merges"][0], list) \
            else tok["model"]["merges"][0]
        ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
        if family == "qwen2":
            assert field(reader, "tokenizer.ggml.eos_token_id") == ids["<|im_end|>"]
            assert field(reader, "tokenizer.ggml.padding_token_id") == ids["<|endoftext|>"]
            assert "tokenizer.ggml.bos_token_id" not in reader.fields
            assert field(reader, "tokenizer.ggml.add_bos_token") is False
        else:
            assert field(reader, "tokenizer.ggml.bos_token_id") == ids["<|begin_of_text|>"]
            assert field(reader, "tokenizer.ggml.eos_token_id") == ids["<|end_of_text|>"]
            assert field(reader, "tokenizer.ggml.add_bos_token") is True
        types = field(reader, "tokenizer.ggml.token_type")
        assert [types[i] for i in sorted(ids.values())] == [3] * len(ids) and types[300] == 1
    template = field(reader, "tokenizer.chat_template")
    if family == "qwen2":  # the base tokenizer_config.json's chat template
        assert template == CHATML
    else:  # the adapter's alpaca prompt template as a chat template
        assert "### Instruction:\n{{ message['content'] }}\n\n### Response:\n" in template


def test_chat_template_in_the_adapter_wins(tmp_path, build):
    family, path, adapter, _ = build("qwen2")
    from lora_cli.gguf_export import export_gguf

    custom = make_adapter(path, {"targets": ["q_proj"]}, {"data": {"chat_template": "{{ messages[0]['content'] }}"}},
                          out=tmp_path / "a.safetensors")
    export_gguf(custom, tmp_path / "c.gguf")
    assert field(gguf.GGUFReader(str(tmp_path / "c.gguf")), "tokenizer.chat_template") == "{{ messages[0]['content'] }}"


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_smaller_dtypes_within_their_rounding(tmp_path, build, dtype):
    family, path, adapter, f32 = build("llama")
    from lora_cli.gguf_export import export_gguf

    export_gguf(adapter, tmp_path / f"{dtype}.gguf", dtype=dtype)
    reader = gguf.GGUFReader(str(tmp_path / f"{dtype}.gguf"))
    want = {t.name: torch.tensor(t.data.copy()) for t in gguf.GGUFReader(str(f32)).tensors}
    kind = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[dtype]
    assert field(reader, "general.file_type") == {"f16": 1, "bf16": 32, "q8_0": 7}[dtype]
    for t in reader.tensors:
        w = want[t.name]
        have = torch.tensor(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(w.shape)
        if w.dim() == 1 or t.name.endswith("_norm.weight"):
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and torch.equal(have, w)
            continue
        assert t.tensor_type.name == kind, t.name
        if dtype == "q8_0":  # per 32 values an f16 scale d = max|block| / 127: |error| <= d / 2 + 127 |d - f16(d)|
            step = w.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 127
            assert ((have - w).reshape(-1, 32).abs() <= step * (0.5 + 127 * 2 ** -11) + 1e-7).all(), t.name
        else:
            assert torch.allclose(have, w, rtol=2 ** -8 if dtype == "bf16" else 2 ** -11, atol=1e-7), t.name


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_gguf_lora_tensors_are_the_adapters(tmp_path, build, family):
    """gpt2: q/v slices of c_attn; llama: rotary rows and rsLoRA; gpt_neox: fused q/k/v rows."""
    _, path, _, _ = build(family)
    from safetensors import safe_open

    from lora_cli.gguf_export import export_gguf

    config = json.loads((path / "config.json").read_text())
    kw = {"gpt2": {"targets": ["attn.q", "attn.v"]}, "llama": {"targets": ["q_proj", "k_proj", "down_proj"],
                                                               "use_rslora": True},
          "gpt_neox": {"targets": ["attention.query_key_value"]}}[family]
    adapter = make_adapter(path, kw, out=tmp_path / "a.safetensors")
    export_gguf(adapter, tmp_path / "lora.gguf", fmt="gguf-lora")
    reader = gguf.GGUFReader(str(tmp_path / "lora.gguf"))
    assert field(reader, "general.type") == "adapter" and field(reader, "adapter.type") == "lora"
    assert field(reader, "adapter.lora.alpha") == ALPHA
    with safe_open(str(adapter), "pt") as f:
        lora = {k: f.get_tensor(k) for k in f.keys()}
    got = {t.name: torch.tensor(t.data.copy()) for t in reader.tensors}
    if family == "gpt2":
        # One adapter on c_attn of rank 2r: A = [A_q; A_v], B block-structured over (q rows, v rows)
        assert set(got) == {f"blk.{i}.attn_qkv.weight.lora_{x}" for i in range(2) for x in "ab"}
        for i in range(2):
            p = f"transformer.h.{i}.attn.c_attn"
            A = got[f"blk.{i}.attn_qkv.weight.lora_a"]
            B = got[f"blk.{i}.attn_qkv.weight.lora_b"]
            assert torch.equal(A, torch.cat([lora[f"{p}.lora_q.lora_A.weight"], lora[f"{p}.lora_v.lora_A.weight"]]))
            want = torch.zeros(192, 2 * R)
            want[:64, :R] = lora[f"{p}.lora_q.lora_B.weight"]
            want[128:, R:] = lora[f"{p}.lora_v.lora_B.weight"]
            # llama.cpp scales by alpha / rank = 8 / 8; ours is alpha / r = 8 / 4 per slice
            assert torch.allclose(B, want * 2.0, atol=1e-7)
        return
    fold = (ALPHA / math.sqrt(R)) / (ALPHA / R) if family == "llama" else 1.0  # rsLoRA's alpha/sqrt(r) over alpha/r
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if family == "llama" else gguf.MODEL_ARCH.GPTNEOX, 2)
    modules = sorted({k[: -len(".lora_A.weight")] for k in lora if k.endswith(".lora_A.weight")})
    assert len(got) == 2 * len(modules)
    for module in modules:
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        assert torch.equal(got[name + ".lora_a"], lora[module + ".lora_A.weight"])
        b = undo_layout(family, module + ".weight", got[name + ".lora_b"], config)
        assert torch.allclose(b, lora[module + ".lora_B.weight"] * fold, atol=1e-7), module


def test_gguf_lora_goes_by_the_tensors_an_adapter_holds(tmp_path, build):
    """`bias: lora_only` on a model without biases (Mistral) trains no bias: the file holds LoRA pairs only and
    exports as a llama.cpp LoRA; on a model with biases (this Llama) it carries them and is refused in one line."""
    from lora_cli.gguf_export import export_gguf

    _, mistral, _, _ = build("mistral")
    adapter = make_adapter(mistral, {"targets": ["q_proj", "v_proj"], "bias": "lora_only"},
                           out=tmp_path / "no-bias.safetensors")
    export_gguf(adapter, tmp_path / "lora.gguf", fmt="gguf-lora")
    assert len(gguf.GGUFReader(str(tmp_path / "lora.gguf")).tensors) == 2 * 2 * 2  # 2 layers x q, v x A, B
    _, llama, _, _ = build("llama")
    adapter = make_adapter(llama, {"targets": ["q_proj", "v_proj"], "bias": "lora_only"},
                           out=tmp_path / "bias.safetensors")
    line = assert_one_line_error(*cli("export", adapter, tmp_path / "b.gguf", "--format", "gguf-lora"), 1)
    assert "also trains whole modules or biases, which a llama.cpp LoRA adapter cannot carry" in line
    assert not (tmp_path / "b.gguf").exists()


def test_modelfile_for_an_alpaca_adapter_is_exact(tmp_path, build):
    _, path, adapter, _ = build("gpt2")
    from lora_cli.gguf_export import export_gguf

    # in this process: GPT-2's 50,000 merges, derived from the BPE ranks, are cached here already
    result = export_gguf(adapter, tmp_path / "m.gguf", dtype="q8_0", ollama=True)
    assert (result.path, result.modelfile) == (tmp_path / "m.gguf", tmp_path / "Modelfile")
    assert (tmp_path / "Modelfile").read_text() == (
        "FROM ./m.gguf\n"
        'TEMPLATE """Below is an instruction that describes a task. Write a response that appropriately completes '
        "the request.\n\n### Instruction:\n{{ .Prompt }}\n\n### Response:\n\"\"\"\n"
        'PARAMETER stop "<|endoftext|>"\n')


def test_modelfile_for_a_chat_template_follows_it(tmp_path, build):
    _, path, adapter, _ = build("qwen2")
    code, out, err = cli("export", adapter, tmp_path / "q.gguf", "--format", "gguf", "--ollama")
    assert code == 0, err
    assert out.splitlines() == [str(tmp_path / "q.gguf"), str(tmp_path / "Modelfile")]
    assert (tmp_path / "Modelfile").read_text() == (
        "FROM ./q.gguf\n"
        'TEMPLATE """{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}{{ end }}'
        '{{ range .Messages }}'
        '{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n'
        '{{ end }}{{ end }}<|im_start|>assistant\n"""\n'
        'PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|endoftext|>"\n')


def test_bad_export_requests_are_one_line(tmp_path, build):
    _, path, adapter, _ = build("qwen2")
    line = assert_one_line_error(*cli("export", adapter, tmp_path / "x.gguf", "--format", "gguf-lora", "--ollama"), 2)
    assert "--ollama needs --format gguf" in line
    line = assert_one_line_error(*cli("export", adapter, tmp_path / "x.gguf", "--format", "gguf", "--dtype", "q4"), 2)
    assert "--dtype must be one of f32, f16, bf16, q8_0" in line
    line = assert_one_line_error(*cli("export", adapter, tmp_path, "--format", "gguf"), 2)
    assert "is a directory" in line
    # a trailing slash names a folder to be: not a file named like it (pathlib would drop the slash)
    line = assert_one_line_error(*cli("export", adapter, f"{tmp_path / 'gg'}/", "--format", "gguf"), 2)
    assert line == f"error: OUT {tmp_path / 'gg'}/ ends with a slash, so it names a directory; name a file to write"
    for fmt in ("gguf", "peft"):  # nor a folder or file named "-", for any format
        line = assert_one_line_error(*cli("export", adapter, "-", "--format", fmt, cwd=tmp_path), 2)
        assert line == "error: OUT -: name a path to write (standard output carries the command's own output)"
    assert not list(tmp_path.iterdir())


def test_export_replaces_only_an_earlier_export_and_only_with_overwrite(tmp_path, build):
    _, path, adapter, _ = build("qwen2")
    notes = tmp_path / "notes.json"
    notes.write_text("mine")
    for flags in ((), ("--overwrite",)):
        line = assert_one_line_error(*cli("export", adapter, notes, "--format", "gguf", *flags), 2)
        assert line.endswith("notes.json already exists; choose another name or pass --overwrite to replace it"
                             if not flags else "notes.json exists and is not a GGUF file; --overwrite replaces only "
                                               "a GGUF file; choose another name")
    assert notes.read_text() == "mine"
    out = tmp_path / "m.gguf"
    assert cli("export", adapter, out, "--format", "gguf-lora")[0] == 0
    first = out.stat().st_mtime_ns
    line = assert_one_line_error(*cli("export", adapter, out, "--format", "gguf-lora"), 2)
    assert "m.gguf already exists" in line and out.stat().st_mtime_ns == first
    (tmp_path / "Modelfile").write_text("FROM mine.gguf\n")
    line = assert_one_line_error(*cli("export", adapter, tmp_path / "n.gguf", "--format", "gguf", "--ollama"), 2)
    assert line.endswith("Modelfile already exists; choose another name or pass --overwrite to replace it")
    assert cli("export", adapter, out, "--format", "gguf-lora", "--overwrite")[0] == 0
    assert out.read_bytes()[:4] == b"GGUF" and not (tmp_path / "n.gguf").exists()
    # --overwrite --ollama replaces the Modelfile an export wrote for that GGUF, never a hand-written one or a folder
    before = out.read_bytes()
    line = assert_one_line_error(*cli("export", adapter, out, "--format", "gguf", "--ollama", "--overwrite"), 2)
    assert line == (f"error: {tmp_path / 'Modelfile'} exists and is not the Modelfile of m.gguf (its first line is "
                    "not 'FROM ./m.gguf'); --overwrite replaces only that one; move it or write the GGUF into another "
                    "folder")
    assert (tmp_path / "Modelfile").read_text() == "FROM mine.gguf\n" and out.read_bytes() == before
    (tmp_path / "Modelfile").unlink()
    assert cli("export", adapter, out, "--format", "gguf", "--ollama", "--overwrite")[0] == 0
    assert cli("export", adapter, out, "--format", "gguf", "--ollama", "--overwrite")[0] == 0  # its own: replaced
    (tmp_path / "Modelfile").unlink()
    (tmp_path / "Modelfile").mkdir()
    line = assert_one_line_error(*cli("export", adapter, tmp_path / "p.gguf", "--format", "gguf", "--ollama"), 2)
    assert line == (f"error: {tmp_path / 'Modelfile'} is a directory, where --ollama writes the Modelfile; move it or "
                    "write the GGUF into another folder")
    assert not (tmp_path / "p.gguf").exists()


def test_llama_cpp_logits_equal_ours(exported):
    """llama.cpp itself (llama-cpp-python) on the f32 file: its logits on a few token sequences equal our merged
    model's."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    from lora_cli.inference import load_for_inference

    family, path, adapter, out = exported
    loaded = load_for_inference(adapter)
    # the KV cache in f32 (llama.cpp keeps it in f16 by default: ~1e-3 off on these logits)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=2, seed=0,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    worst = 0.0
    for seed, n in ((7, 12), (8, 30), (9, 5)):
        ids = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
        with torch.no_grad():
            ours = loaded.model.logits(loaded.model(torch.tensor([ids])))[0].double().numpy()
        llm.reset()
        llm.eval(ids)
        theirs = np.array(llm.scores[:n], dtype=np.float64)
        worst = max(worst, float(np.abs(theirs - ours).max()))
    print(f"{family}: max |logits llama.cpp - ours| = {worst:.2e} (logits std {ours.std():.2f})")
    # llama.cpp's CPU GELU reads an f16 table (and is the tanh form for GPT-NeoX too, where Pythia uses the exact
    # GELU): measured 2.5e-4 (gpt2) and 7.2e-4 (gpt_neox); the SiLU families agree to float rounding (~1e-6).
    assert worst < (2e-3 if family in ("gpt2", "gpt_neox") else 1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_llama_cpp_applies_the_gguf_lora(tmp_path, build, family):
    """llama.cpp with the gguf-lora file on a GGUF of the bare base (an adapter with B = 0, merged) gives the
    logits of our model with the adapter."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lora_cli.gguf_export import export_gguf
    from lora_cli.inference import load_for_inference

    _, path, _, _ = build(family)
    kw = {"gpt2": {"targets": ["attn.q", "attn.v"]}, "llama": {"targets": ["q_proj", "k_proj", "down_proj"],
                                                               "use_rslora": True},
          "gpt_neox": {"targets": ["attention.query_key_value"]}}[family]
    adapter = make_adapter(path, kw, out=tmp_path / "a.safetensors")
    with safe_open(str(adapter), "pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file({k: v * 0 if "lora_B" in k else v for k, v in tensors.items()}, str(tmp_path / "zero.safetensors"),
              metadata=header)
    export_gguf(tmp_path / "zero.safetensors", tmp_path / "base.gguf")
    export_gguf(adapter, tmp_path / "lora.gguf", fmt="gguf-lora")
    loaded = load_for_inference(adapter)
    ids = torch.randint(0, V, (12,), generator=torch.Generator().manual_seed(7)).tolist()
    with torch.no_grad():
        ours = loaded.model.logits(loaded.model(torch.tensor([ids])))[0].double().numpy()
    llm = llama_cpp.Llama(model_path=str(tmp_path / "base.gguf"), lora_path=str(tmp_path / "lora.gguf"), n_ctx=64,
                          logits_all=True, verbose=False, n_threads=2, type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(ids)
    diff = float(np.abs(np.array(llm.scores[:12], dtype=np.float64) - ours).max())
    print(f"{family} + gguf-lora: max |logits llama.cpp - ours| = {diff:.2e}")
    assert diff < (2e-3 if family in ("gpt2", "gpt_neox") else 1e-5)  # GELU: see the test above


LLAMA3_CHAT = ("{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
               "<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def test_a_chat_templates_end_of_turn_token_ends_replies_in_llama_cpp_and_ollama(tmp_path, build):
    """A Llama-3-style chat adapter on a base whose eos is <|end_of_text|>: the GGUF names <|eot_id|> as its
    end-of-turn token (llama.cpp stops there, as `lora chat` does) and the Modelfile stops at it; where the end of
    turn is the eos itself (ChatML on Qwen's <|im_end|>) no eot field is written."""
    _, path, _, _ = build("llama")
    from lora_cli.gguf_export import export_gguf

    ids = {t["content"]: t["id"] for t in json.loads((path / "tokenizer.json").read_text())["added_tokens"]}
    adapter = make_adapter(path, {"targets": ["q_proj"]}, {"data": {"format": "chat", "chat_template": LLAMA3_CHAT}},
                           out=tmp_path / "chat.safetensors")
    export_gguf(adapter, tmp_path / "c.gguf", ollama=True)
    reader = gguf.GGUFReader(str(tmp_path / "c.gguf"))
    assert field(reader, "tokenizer.ggml.eos_token_id") == ids["<|end_of_text|>"]
    assert field(reader, "tokenizer.ggml.eot_token_id") == ids["<|eot_id|>"]
    assert (tmp_path / "Modelfile").read_text().endswith(
        'PARAMETER stop "<|end_of_text|>"\nPARAMETER stop "<|eot_id|>"\n')
    # Chat data was tokenised as the template wrote it (its own bos, no added one): llama.cpp and Ollama add none
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert "<|begin_of_text|>" in (tmp_path / "Modelfile").read_text().split('"""')[1]  # the template writes it
    from lora_cli.chat_template import chat_ids
    from lora_cli.inference import load_for_inference

    chatml = make_adapter(path, {"targets": ["q_proj"]}, {"data": {"format": "chat", "chat_template": CHATML}},
                          out=tmp_path / "chatml-on-llama.safetensors")
    conversation = [{"role": "user", "content": "hi there"}]
    trained = chat_ids(CHATML, conversation, load_for_inference(chatml).tokenizer, add_generation_prompt=True)
    assert trained[0] != ids["<|begin_of_text|>"]  # trained without a bos
    export_gguf(chatml, tmp_path / "chatml-on-llama.gguf")
    assert field(gguf.GGUFReader(str(tmp_path / "chatml-on-llama.gguf")), "tokenizer.ggml.add_bos_token") is False
    _, qwen, qwen_adapter, qwen_gguf = build("qwen2")
    assert "tokenizer.ggml.eot_token_id" not in gguf.GGUFReader(str(qwen_gguf)).fields  # alpaca: no template turn
    chatml = make_adapter(qwen, {"targets": ["q_proj"]}, {"data": {"format": "chat", "chat_template": CHATML}},
                          out=tmp_path / "chatml.safetensors")
    export_gguf(chatml, tmp_path / "q.gguf")
    assert "tokenizer.ggml.eot_token_id" not in gguf.GGUFReader(str(tmp_path / "q.gguf")).fields  # eos is <|im_end|>
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "c.gguf"), n_ctx=64, verbose=False, n_threads=2)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert llama_cpp.llama_vocab_is_eog(vocab, ids["<|eot_id|>"])
    assert not llama_cpp.llama_vocab_is_eog(vocab, ids["<|begin_of_text|>"])
    # llama.cpp tokenises the rendered conversation into the ids training used
    llm = llama_cpp.Llama(model_path=str(tmp_path / "chatml-on-llama.gguf"), n_ctx=64, verbose=False, n_threads=2)
    from lora_cli.chat_template import render_chat

    text = render_chat(CHATML, conversation, True)
    assert llm.tokenize(text.encode(), add_bos=llm._model.add_bos_token(), special=True) == trained


def test_go_template_follows_a_llama3_chat_template_and_refuses_what_it_cannot():
    from lora_cli.gguf_export import go_from_chat

    llama3 = ("{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>"
              "\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
              "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    # bos is left to the runtime (the GGUF says add_bos), so the template does not write it twice
    assert go_from_chat(llama3, "<|begin_of_text|>", "<|eot_id|>", strip_bos=True) == (
        '{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}{{ end }}{{ range .Messages }}'
        '{{ if eq .Role "system" }}<|start_header_id|>system<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
        '{{ else if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
        '{{ else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
        '{{ end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n')
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}{% endfor %}"
    assert go_from_chat(strict, "", "", strip_bos=False) is None
    numbered = "{% for m in messages %}{{ loop.index }}:{{ m['content'] }}\n{% endfor %}"  # not one text per role
    assert go_from_chat(numbered, "", "", strip_bos=False) is None


def test_a_sentencepiece_style_tokenizer_is_one_clear_error(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lora_cli.errors import ConfigError
    from lora_cli.gguf_export import gguf_vocab
    from lora_cli.tokenizer import load_tokenizer

    tok = Tokenizer(models.BPE(vocab={"<unk>": 0, "▁a": 1}, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ConfigError, match="converts byte-level BPE tokenizers .* this one is not"):
        gguf_vocab(load_tokenizer(str(tmp_path / "tokenizer.json")), 8)


def test_a_prefix_space_tokenizer_is_exported_with_a_warning(tmp_path):
    """ByteLevel(add_prefix_space=True) puts a space before every text; llama.cpp's gpt-2 pre-tokenizer does not."""
    from tokenizers import Tokenizer

    from lora_cli.gguf_export import gguf_vocab
    from lora_cli.tokenizer import load_tokenizer

    build_tokenizer(tmp_path, bos=False)
    raw = json.loads((tmp_path / "tokenizer.json").read_text())
    warnings: list[str] = []
    gguf_vocab(load_tokenizer(str(tmp_path)), 400, warnings.append)
    assert warnings == []
    raw["pre_tokenizer"]["add_prefix_space"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw))
    Tokenizer.from_file(str(tmp_path / "tokenizer.json"))  # still a valid file
    gguf_vocab(load_tokenizer(str(tmp_path)), 400, warnings.append)
    assert warnings == [f"warning: {tmp_path / 'tokenizer.json'}: the tokenizer puts a space before every text "
                        "(ByteLevel add_prefix_space) and llama.cpp does not, so their ids differ at the start of a "
                        "text"]


def test_prompt_templates_with_literal_braces_export_as_written():
    """A prompt template's escaped braces ({{ and }} are literal braces) stay literal in the GGUF's Jinja chat
    template and the Modelfile's Go template: the parser cut the text at each one, so neither escape saw them."""
    import jinja2

    from lora_cli.config import DataConfig
    from lora_cli.gguf_export import go_from_prompt, jinja_from_prompt, prompt_pieces
    from lora_cli.prompts import prompt_values, render

    for template in ("Fill {{{{name}}}} in: {prompt}\nA:", "Use {{% raw %}}: {prompt}\nA:", "x {{{prompt}"):
        settings = DataConfig(format="prompt_completion", prompt_template=template)
        pieces = prompt_pieces(settings)
        want = render(prompt_values("hi", settings), settings)
        jinja = jinja2.Environment().from_string(jinja_from_prompt(pieces, "<eos>"))
        assert jinja.render(messages=[{"role": "user", "content": "hi"}]) == want, template
        go = go_from_prompt(pieces)
        assert go.replace('{{ "{{" }}', "{{").replace('{{ "{" }}', "{").replace("{{ .Prompt }}", "hi") == want


def test_checkpoints_llama_cpp_cannot_load_are_not_exported():
    from lora_cli.gguf_export import llama_cpp_lacks
    from lora_cli.models.gpt_neox import GPTNeoXConfig
    from lora_cli.models.llama import LlamaConfig

    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    assert llama_cpp_lacks("llama", LlamaConfig(**sizes, rope_scaling=llama3, attention_bias=True)) is None
    assert llama_cpp_lacks("qwen2", LlamaConfig(**sizes, model_type="qwen2", rope_scaling=llama3)) == (
        "llama.cpp's qwen2 architecture has no rope scaling tensor for its rope_scaling 'llama3'")
    assert llama_cpp_lacks("qwen3", LlamaConfig(**sizes, model_type="qwen3", attention_bias=True)) == (
        "llama.cpp's qwen3 architecture has no attention biases (attention_bias: true)")
    assert llama_cpp_lacks("qwen3", LlamaConfig(**sizes, model_type="qwen3")) is None
    assert llama_cpp_lacks("gpt_neox", GPTNeoXConfig(**sizes, attention_bias=False)) == (
        "llama.cpp's gpt_neox architecture needs attention biases (attention_bias: false here)")
    assert llama_cpp_lacks("gpt_neox", GPTNeoXConfig(**sizes)) is None


def test_a_normalizing_tokenizer_is_exported_with_a_warning(tmp_path):
    """llama.cpp applies no tokenizer.json normalizer: a Lowercase one changes ids of any text with capitals, so
    the export says so; NFC alone (Qwen2's) changes only decomposed Unicode and passes without a word."""
    from lora_cli.gguf_export import gguf_vocab
    from lora_cli.tokenizer import load_tokenizer

    build_tokenizer(tmp_path, bos=False)
    raw = json.loads((tmp_path / "tokenizer.json").read_text())
    for normalizer, warned in (({"type": "NFC"}, False),
                               ({"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]}, True)):
        (tmp_path / "tokenizer.json").write_text(json.dumps({**raw, "normalizer": normalizer}))
        warnings: list[str] = []
        gguf_vocab(load_tokenizer(str(tmp_path)), 400, warnings.append)
        assert warnings == ([f"warning: {tmp_path / 'tokenizer.json'}: the tokenizer normalizes text first (NFC, "
                             "Lowercase) and llama.cpp does not, so their ids differ on texts the normalizer changes"]
                            if warned else [])
