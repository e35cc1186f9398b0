#!/usr/bin/env python3
"""Write a tiny llama-architecture GGUF with fixed-seed random F32 weights (meaningless text,
but it loads in llama.cpp and generates): tests check plumbing, determinism and limits.

  tiny_llama.py OUT.gguf [--embd 256] [--blocks 4] [--context 512] [--name NAME] [--chat-template FILE]

--chat-template stores a Jinja chat template (tokenizer.chat_template), e.g. one with tools.
"""

import argparse

import numpy as np
from gguf import GGUFWriter, TokenType

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--embd", type=int, default=256)
p.add_argument("--blocks", type=int, default=4)
p.add_argument("--context", type=int, default=512)
p.add_argument("--name", default="tiny-llama")
p.add_argument("--chat-template")
a = p.parse_args()

rng = np.random.default_rng(20240601)
tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
n_vocab, n_embd, n_ff, n_head = len(tokens), a.embd, a.embd * 2, max(1, a.embd // 64)

w = GGUFWriter(a.out, "llama")
w.add_name(a.name)
w.add_context_length(a.context)
w.add_embedding_length(n_embd)
w.add_block_count(a.blocks)
w.add_feed_forward_length(n_ff)
w.add_head_count(n_head)
w.add_head_count_kv(n_head)
w.add_rope_dimension_count(n_embd // n_head)
w.add_layer_norm_rms_eps(1e-5)
w.add_file_type(0)  # all F32
w.add_tokenizer_model("llama")
w.add_token_list(tokens)
w.add_token_scores([0.0] * n_vocab)
w.add_token_types(types)
w.add_bos_token_id(1)
w.add_eos_token_id(2)
w.add_unk_token_id(0)
if a.chat_template:
    with open(a.chat_template, encoding="utf-8") as f:
        w.add_chat_template(f.read())


def t(name, *shape):
    w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))


t("token_embd.weight", n_vocab, n_embd)
w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
t("output.weight", n_vocab, n_embd)
for i in range(a.blocks):
    w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
    for m in ("q", "k", "v", "output"):
        t(f"blk.{i}.attn_{m}.weight", n_embd, n_embd)
    w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
    t(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
    t(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
    t(f"blk.{i}.ffn_down.weight", n_embd, n_ff)

w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
print(a.out)
