"""Datasets: read a table, detect its format, render prompts, tokenise, mask, split and batch.

The pipeline, in the order `load_splits` runs it, one module per step:

1. io: `read_table` reads .csv / .tsv / .json / .jsonl / .parquet / .txt with pandas into a `Table`.
2. formats: `detect_format` picks the format and the column of each role from the column names;
   `render_prompt` fills the prompt template.
3. encode: `encode_records` turns each row into `Example(ids, loss_mask)` (or a class id); `load_file` runs
   steps 1-3 for one file.
4. splits: seeded train/val/test split (stratified by label for classification), balancing, `load_splits`.
5. batches: `batch_indices` + `collate`: length-grouped, seeded batches padded only to the longest in the batch;
   `pack` for data.packing.

Modules import from lower steps only (batches needs none of them); lora_cli.config, errors, tokenizer and fsutil
never import this package.
"""

from lora_cli.data.batches import BATCH_ORDER, IGNORE_INDEX, Batch, batch_indices, collate, pack, padding_waste, split_batch
from lora_cli.data.encode import (NOT_TEXT, DataStats, Example, cell_value, chunk_text, count_stats, encode_pair,
                                  encode_records, encode_text, label_order, load_file, preview, row_label)
from lora_cli.data.formats import (FLAG_HINTS, OPTIONAL_ROLES, RESPONSE_ROLE, detect_format, fill_template,
                                   prompt_template, render_prompt, template_fields)
from lora_cli.config import SUPPORTED_SUFFIXES, TABLE_SUFFIXES
from lora_cli.data.io import JsonValueError, RepeatedKey, Table, loads_unique, read_table
from lora_cli.data.splits import DataSplits, class_weights, load_splits, split_examples, undersample, write_split

__all__ = [
    "BATCH_ORDER", "IGNORE_INDEX", "Batch", "batch_indices", "collate", "pack", "padding_waste", "split_batch",
    "NOT_TEXT", "DataStats", "Example", "cell_value", "chunk_text", "count_stats", "encode_pair", "encode_records",
    "encode_text", "label_order", "load_file", "preview", "row_label",
    "FLAG_HINTS", "OPTIONAL_ROLES", "RESPONSE_ROLE", "detect_format", "fill_template", "prompt_template", "render_prompt",
    "template_fields",
    "SUPPORTED_SUFFIXES", "TABLE_SUFFIXES", "JsonValueError", "RepeatedKey", "Table", "loads_unique", "read_table",
    "DataSplits", "class_weights", "load_splits", "split_examples", "undersample", "write_split",
]
