"""lora-cli: fine-tune GPT-style models (GPT-2, Llama, Mistral, Qwen2/3, GPT-NeoX) with LoRA."""

import os

__version__ = "0.1.0"

# torch's CPU allocator asks for transparent huge pages on buffers of 2 MB and more when this is set (read once, at
# its first allocation, so it is set here, before lora_cli imports torch). Decoding reads every weight once per
# token: with 4 KB pages the TLB misses cost bandwidth. fp32 GEMVs over the 494 MB of GPT-2 124M's weights, 2 threads:
# 18.8 -> 23.6 GB/s. THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
