"""The Llama-family decoder (Llama, Qwen2, Qwen3, Mistral): HF parameter names, fused q/k/v and gate/up.

forward(input_ids, positions) -> final-normed hidden states; compute_logits(hidden) -> logits.
Inside a `forward_context` the tokens are a flat [num_tokens] batch over the paged KV cache;
outside one they are a plain [batch, seq] causal LM with no cache."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.context import get_forward_context
from models.kernels.decode import DecodeKernels
from models.layers import Embedding, Linear, PackedLinear, RMSNorm, RotaryEmbedding, apply_rotary
from models.lora import LoRABatch
from models.parallel import TensorParallel


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.scale = self.head_dim ** -0.5
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = PackedLinear(config.hidden_size, {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size},
                                     bias=config.qkv_bias)
        self.o_proj = Linear(q_size, config.hidden_size, bias=config.o_bias)
        self.q_size, self.kv_size = q_size, kv_size
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        # bound to the KV cache's tensors once it exists (engine.kv_cache.KVCache.bind)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.backend = None
        self.tp: TensorParallel | None = None  # set by models.parallel.shard_model: o_proj's outputs are partial sums

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        lead = hidden.shape[:-1]
        qkv = self.qkv_proj(hidden).view(*lead, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        num_qk_heads = self.num_heads + self.num_kv_heads
        qk = qkv[..., :num_qk_heads, :]
        if self.qk_norm:
            qk = torch.cat([self.q_norm(qk[..., :self.num_heads, :]), self.k_norm(qk[..., self.num_heads:, :])], -2)
        qk = apply_rotary(qk, cos, sin)  # q and k rotated in one go
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=-2)
        v = qkv[..., num_qk_heads:, :]
        out = self.o_proj(self.attend(q, k, v).reshape(*lead, self.q_size))
        return out if self.tp is None else self.tp.all_reduce(out)

    def qk_norm_weights(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The q and k norms' weights as the fused kernels take them (None, None: no such norms). Their eps is the
        layers' (Qwen3's rms_norm_eps)."""
        return (self.q_norm.weight, self.k_norm.weight) if self.qk_norm else (None, None)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx = get_forward_context()
        if ctx is None:
            return self._causal_no_cache(q, k, v)
        return self.backend.forward(q, k, v, self.k_cache, self.v_cache, ctx, self.scale)

    def _causal_no_cache(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # [batch, seq, heads, head_dim] -> [batch, heads, seq, head_dim] for SDPA
        q, k, v = (t.transpose(-3, -2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                             enable_gqa=self.num_heads != self.num_kv_heads)
        return out.transpose(-3, -2)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = PackedLinear(config.hidden_size, {"gate_proj": config.intermediate_size,
                                                              "up_proj": config.intermediate_size},
                                         bias=config.mlp_bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.tp: TensorParallel | None = None  # set by models.parallel.shard_model: down's outputs are partial sums

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        out = self.down_proj(F.silu(gate) * up)
        return out if self.tp is None else self.tp.all_reduce(out)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))

    def forward_fused(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernels: DecodeKernels,
                      lora: LoRABatch | None) -> torch.Tensor:
        """forward() for a few token rows [num_tokens, hidden] on the CPU: one kernel before attention and
        one after it (models.kernels.decode), instead of some twenty operators; LoRA rows included."""
        attn, mlp, ops = self.self_attn, self.mlp, kernels.ops
        lora_slots = None if lora is None else lora.token_slots

        def lora_weights(*linears: nn.Module) -> list[torch.Tensor | None]:
            """[A, Bᵀ] of each linear that LoRA wraps (models.lora.LoRALinear), None where it does not."""
            if lora is None:
                return []
            found = [linear.active_weights(lora.slots) if hasattr(linear, "active_weights") else None
                     for linear in linears]
            return [t for weights in found for t in (weights or (None, None))]

        # (a linear's qtype: its weights' ggml type, 0 for float; a LoRA wrapper reports its base's)
        qkv_weights, qkv_qtypes = kernel_parts(attn.qkv_proj)
        q, k, v = ops.attention_input(hidden, self.input_layernorm.weight, self.input_layernorm.eps, qkv_weights,
                                      attn.qkv_proj.bias, cos, sin, attn.num_heads, attn.num_kv_heads, lora_slots,
                                      lora_weights(attn.qkv_proj), qkv_qtypes, *attn.qk_norm_weights())
        out = attn.attend(q, k, v).view(hidden.shape[0], attn.q_size)
        gate_up_weights, gate_up_qtypes = kernel_parts(mlp.gate_up_proj)
        return ops.attention_output(out, hidden, attn.o_proj.kernel_weight, attn.o_proj.bias,
                                    self.post_attention_layernorm.weight, self.post_attention_layernorm.eps,
                                    gate_up_weights, mlp.gate_up_proj.bias, mlp.down_proj.kernel_weight,
                                    mlp.down_proj.bias, lora_slots,
                                    lora_weights(attn.o_proj, mlp.gate_up_proj, mlp.down_proj),
                                    [int(attn.o_proj.qtype), int(mlp.down_proj.qtype)], gate_up_qtypes)

    def add_to(self, stack: object) -> None:
        """Append this layer to a DecoderStack (models.kernels.decode.cpp): forward_fused's calls, without LoRA."""
        attn, mlp = self.self_attn, self.mlp
        qkv_weights, qkv_qtypes = kernel_parts(attn.qkv_proj)
        gate_up_weights, gate_up_qtypes = kernel_parts(mlp.gate_up_proj)
        stack.add_layer(self.input_layernorm.weight, self.input_layernorm.eps, qkv_weights,
                        attn.qkv_proj.bias, attn.o_proj.kernel_weight, attn.o_proj.bias,
                        self.post_attention_layernorm.weight, self.post_attention_layernorm.eps,
                        gate_up_weights, mlp.gate_up_proj.bias, mlp.down_proj.kernel_weight,
                        mlp.down_proj.bias, qkv_qtypes, gate_up_qtypes,
                        [int(attn.o_proj.qtype), int(mlp.down_proj.qtype)], attn.k_cache, attn.v_cache,
                        *attn.qk_norm_weights())


def kernel_parts(linear: nn.Module) -> tuple[list[torch.Tensor], list[int]]:
    """A projection's weights as the fused kernels take them, and their ggml types (0: float): one part per run
    of shards of one type (models.quant.MixedQuantizedLinear), else the one weight; a LoRA wrapper's base's."""
    base = getattr(linear, "base", linear)
    parts = list(getattr(base, "parts", [base]))
    return [part.kernel_weight for part in parts], [int(part.qtype) for part in parts]


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # no default N(0, 1) init (weights come from a checkpoint, or training's init_weights): on the meta device
        # (models.loader) torch runs it in Python behind a guard that imports torch's compiler, 1.4 s of every start
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size,
                                      _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope, config.max_position_embeddings)


class LlamaForCausalLM(nn.Module):
    """A Llama-family causal LM. Invariant: parameter names are HF's, except q/k/v -> qkv_proj and
    gate/up -> gate_up_proj (see `packed_modules`)."""

    kernels: DecodeKernels | None = None  # set at load time (models.kernels.decode.set_decode_kernels)
    _stack: object | None = None  # _decoder_stack(), and the (cache, backend) it was built for
    _stack_bound_to: tuple | None = None
    tp: TensorParallel | None = None  # this rank's share of a tensor-parallel model (models.parallel.shard_model)

    packed_modules = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                      "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        ctx = get_forward_context()
        seq_lens = None
        if ctx is not None and self.config.rope.rope_type == "dynamic":
            query_lens = ctx.query_start_loc.diff()
            prompt_lens = ctx.prompt_lens.repeat_interleave(query_lens, output_size=positions.shape[0])
            seq_lens = torch.maximum(positions + 1, prompt_lens)  # see RotaryEmbedding.forward
        hidden = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(positions, seq_lens)
        cos, sin = cos.to(hidden.dtype), sin.to(hidden.dtype)
        # the fused layer runs o_proj through down in one call, with no room for tensor parallelism's all-reduce
        if ctx is not None and self.kernels is not None and self.tp is None and self.kernels.takes(hidden):
            stack = self._decoder_stack() if ctx.lora is None else None
            if stack is not None:
                hidden = stack.forward(hidden, cos, sin, ctx.slot_mapping, ctx.block_tables, ctx.query_start_loc,
                                       ctx.context_lens, ctx.tree_mask)
            else:
                for layer in self.model.layers:
                    hidden = layer.forward_fused(hidden, cos, sin, self.kernels, ctx.lora)
        else:
            for layer in self.model.layers:
                hidden = layer(hidden, cos, sin)
        return self.model.norm(hidden)

    def _decoder_stack(self) -> object | None:
        """Every layer's forward_fused as one C++ call, for the fused CPU attention backend ("cpu"); built once
        the KV cache is bound, again if it is bound anew. None for other backends."""
        first = self.model.layers[0].self_attn
        if getattr(first.backend, "name", None) != "cpu":
            return None
        if self._stack is None or self._stack_bound_to != (first.k_cache.data_ptr(), first.backend):
            self._stack = self.kernels.ops.DecoderStack(first.num_heads, first.num_kv_heads, first.scale)
            for layer in self.model.layers:
                layer.add_to(self._stack)
            self._stack_bound_to = (first.k_cache.data_ptr(), first.backend)
        return self._stack

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits over the whole vocabulary; under tensor parallelism on rank 0 only (None on the others)."""
        logits = self.lm_head(hidden)
        return logits if self.tp is None else self.tp.gather(logits, self.config.vocab_size)
