"""Writes a random-weight GGUF of a given size with a real model's tokenizer and chat template, for measuring speed
where no weights can be downloaded (the GPU machines lent to this project reach no network).

Speed depends on the shapes, not on the values: an 8B-class Llama (4,096 wide, 32 layers, 32 query and 8 KV heads,
14,336 feed-forward) in F16 reads and multiplies what a real one does. The tokenizer and template come from
``--like`` (by default the embedded model, or a vocabulary-only GGUF written with ``--vocab-only``), so the service
renders and tokenizes prompts as it does for that model. The answers are noise; the bench asks for a fixed number
of tokens, so that does not matter.

    python bench/random_gguf.py /tmp/random-8b.gguf --size 8b
    python bench/random_gguf.py .device/vocab.gguf --vocab-only     # the tokenizer alone (a few MB, to carry)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np

# (embedding, layers, heads, KV heads, feed-forward): Llama 3 8B's shapes, and a tiny one for tests on a CPU.
SIZES = {"8b": (4096, 32, 32, 8, 14336), "1b": (2048, 16, 32, 8, 8192), "tiny": (256, 4, 4, 2, 512)}
POOL = 1 << 22  # random values tiled into every tensor: generating 8 billion would take minutes


def copy_vocabulary(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> int:
    """The ``tokenizer.*`` fields of ``reader`` into ``writer``; returns the vocabulary size."""
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)
    return len(reader.fields["tokenizer.ggml.tokens"].data)


def write(path: Path, like: Path, size: str | None, context: int = 8192, seed: int = 0) -> Path:
    """A llama-architecture GGUF of ``size`` (or, with None, the vocabulary alone) with ``like``'s tokenizer."""
    reader = gguf.GGUFReader(str(like))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"random-{size or 'vocabulary'}")
    vocab = copy_vocabulary(reader, writer)
    tensors: list[tuple[str, np.ndarray]] = []
    if size is not None:
        embedding, layers, heads, kv_heads, feed_forward = SIZES[size]
        head = embedding // heads
        writer.add_context_length(context)
        writer.add_embedding_length(embedding)
        writer.add_block_count(layers)
        writer.add_feed_forward_length(feed_forward)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_rope_dimension_count(head)
        writer.add_rope_freq_base(500000.0)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_vocab_size(vocab)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        pool = (np.random.default_rng(seed).standard_normal(POOL) * 0.02).astype(np.float16)

        def weights(rows: int, columns: int) -> np.ndarray:
            return np.resize(pool, (rows, columns))

        def ones() -> np.ndarray:
            return np.ones(embedding, dtype=np.float32)

        tensors += [("token_embd.weight", weights(vocab, embedding)), ("output_norm.weight", ones()),
                    ("output.weight", weights(vocab, embedding))]
        for layer in range(layers):
            block = f"blk.{layer}"
            tensors += [(f"{block}.attn_norm.weight", ones()),
                        (f"{block}.attn_q.weight", weights(embedding, embedding)),
                        (f"{block}.attn_k.weight", weights(kv_heads * head, embedding)),
                        (f"{block}.attn_v.weight", weights(kv_heads * head, embedding)),
                        (f"{block}.attn_output.weight", weights(embedding, embedding)),
                        (f"{block}.ffn_norm.weight", ones()),
                        (f"{block}.ffn_gate.weight", weights(feed_forward, embedding)),
                        (f"{block}.ffn_up.weight", weights(feed_forward, embedding)),
                        (f"{block}.ffn_down.weight", weights(embedding, feed_forward))]
    for name, tensor in tensors:
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def embedded_model() -> Path:
    from llm.models import embedded_model_path

    return Path(embedded_model_path())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="the GGUF to write")
    parser.add_argument("--size", choices=sorted(SIZES), default="8b")
    parser.add_argument("--like", type=Path, help="the GGUF whose tokenizer to copy (default: the embedded model)")
    parser.add_argument("--vocab-only", action="store_true", help="write the tokenizer alone")
    parser.add_argument("--context", type=int, default=8192, help="the model's trained context length")
    args = parser.parse_args(argv)
    written = write(args.path, args.like or embedded_model(), None if args.vocab_only else args.size, args.context)
    print(f"random_gguf: wrote {written} ({written.stat().st_size / 2**30:.2f} GiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
