"""A tiny random-weight GGUF with Mistral's vocabulary markers and chat template, written with gguf-py.

No Mistral GGUF can be fetched offline, and what the Mistral tool format needs from a model is not its weights
but its vocabulary: ``[INST]``, ``[AVAILABLE_TOOLS]``, ``[TOOL_CALLS]``, ``[TOOL_RESULTS]``... as control tokens,
and Mistral Nemo's own template (``fixtures/templates``). The weights are random, so the answers are noise; the
grammar is what makes its tool calls valid, which is exactly what the tests check.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

TEMPLATE = Path(__file__).parent / "fixtures" / "templates" / "mistralai-Mistral-Nemo-Instruct-2407.jinja"
CONTROL = ["<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
           "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]
EMBEDDING, LAYERS, HEADS, KV_HEADS, FEED_FORWARD = 64, 2, 4, 2, 128


def vocabulary() -> tuple[list[str], list[int]]:
    """SentencePiece-style: unknown, the control tokens, the 256 byte tokens, then printable ASCII and ``▁``."""
    tokens, kinds = ["<unk>"], [gguf.TokenType.UNKNOWN]
    tokens += CONTROL
    kinds += [gguf.TokenType.CONTROL] * len(CONTROL)
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    kinds += [gguf.TokenType.BYTE] * 256
    normal = ["\u2581", *(chr(code) for code in range(33, 127))]
    tokens += normal
    kinds += [gguf.TokenType.NORMAL] * len(normal)
    return tokens, kinds


def token_id(text: str) -> int:
    """A control token's id in this vocabulary (logit_bias in the tests steers the random model with it)."""
    return 1 + CONTROL.index(text)


def write_tiny_mistral(path: Path, seed: int = 0) -> Path:
    """Write the model to ``path`` (about 200 kB) and return it."""
    tokens, kinds = vocabulary()
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-mistral-test")
    writer.add_context_length(4096)
    writer.add_embedding_length(EMBEDDING)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FEED_FORWARD)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(EMBEDDING // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(kinds)
    writer.add_bos_token_id(tokens.index("<s>"))
    writer.add_eos_token_id(tokens.index("</s>"))
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(TEMPLATE.read_text())

    def weights(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    head = EMBEDDING // HEADS
    writer.add_tensor("token_embd.weight", weights(len(tokens), EMBEDDING))
    writer.add_tensor("output_norm.weight", np.ones(EMBEDDING, dtype=np.float32))
    writer.add_tensor("output.weight", weights(len(tokens), EMBEDDING))
    for layer in range(LAYERS):
        block = f"blk.{layer}"
        writer.add_tensor(f"{block}.attn_norm.weight", np.ones(EMBEDDING, dtype=np.float32))
        writer.add_tensor(f"{block}.attn_q.weight", weights(EMBEDDING, EMBEDDING))
        writer.add_tensor(f"{block}.attn_k.weight", weights(KV_HEADS * head, EMBEDDING))
        writer.add_tensor(f"{block}.attn_v.weight", weights(KV_HEADS * head, EMBEDDING))
        writer.add_tensor(f"{block}.attn_output.weight", weights(EMBEDDING, EMBEDDING))
        writer.add_tensor(f"{block}.ffn_norm.weight", np.ones(EMBEDDING, dtype=np.float32))
        writer.add_tensor(f"{block}.ffn_gate.weight", weights(FEED_FORWARD, EMBEDDING))
        writer.add_tensor(f"{block}.ffn_up.weight", weights(FEED_FORWARD, EMBEDDING))
        writer.add_tensor(f"{block}.ffn_down.weight", weights(EMBEDDING, FEED_FORWARD))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
