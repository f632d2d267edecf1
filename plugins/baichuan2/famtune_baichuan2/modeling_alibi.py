"""Baichuan2-13B as a transformers model: Llama's decoder with ALiBi in place of RoPE.

transformers has no architecture combining RMSNorm, a SwiGLU MLP and ALiBi (Bloom, Falcon and MPT
use LayerNorm and GELU), so famtune ships this one. Module names follow Llama's (``q_proj`` ...
``down_proj``, ``lm_head``), so LoRA targets, NF4 quantization and PEFT merging behave as for Llama.
Importing this module registers the model with ``AutoConfig``/``AutoModelForCausalLM`` under the
model type ``famtune_baichuan2_alibi``.

ALiBi adds ``slope[h] * (key position - query position)`` to the attention scores. The original
code adds ``slope[h] * key position``, which differs by a constant per query row and so gives the
same softmax; the relative form keeps the bias small near the diagonal in half precision.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from famtune_baichuan2.convert import ALIBI_MODEL_TYPE


class BaichuanAlibiConfig(PreTrainedConfig):
    """Baichuan2-13B's hyper-parameters; the defaults are the released 13B model's."""

    model_type = ALIBI_MODEL_TYPE
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 125696
    hidden_size: int = 5120
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 40
    hidden_act: str = "silu"
    model_max_length: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False


def alibi_slopes(num_heads: int) -> list[float]:
    """Per-head slopes: the geometric series 2^(-8i/n), i = 1..n, for n a power of two; otherwise
    the series of the nearest lower power of two, then every other slope of the series for twice it."""
    base = 2 ** math.floor(math.log2(num_heads))
    slopes = [2.0 ** (-8.0 * (i + 1) / base) for i in range(base)]
    slopes += [2.0 ** (-4.0 * (2 * j + 1) / base) for j in range(num_heads - base)]
    return slopes


def alibi_bias(
    slopes: torch.Tensor, attention_mask: torch.Tensor | None, q_len: int, past_len: int, dtype: torch.dtype
) -> torch.Tensor:
    """The additive attention bias [batch or 1, heads, q_len, past_len + q_len]: ALiBi where a
    query may attend, the dtype's minimum where it may not (future or padded keys). The minimum
    rather than -inf keeps fully padded query rows finite."""
    kv_len = past_len + q_len
    device = slopes.device
    distance = torch.arange(kv_len, device=device)[None, :] - torch.arange(past_len, kv_len, device=device)[:, None]
    visible = (distance <= 0)[None]
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[-1] != kv_len:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; this model takes a 2-D "
                f"[batch, {kv_len}] padding mask covering the cached and the new tokens"
            )
        if not bool(attention_mask.all()):
            visible = visible & attention_mask.to(device=device, dtype=torch.bool)[:, None, :]
    # The product is taken in float32 and only the per-head bias is cast; the batch-sized tensor
    # (needed only with padding) is made directly in the model's dtype.
    bias = (slopes.float()[:, None, None] * distance.float()[None]).to(dtype)
    return bias[None].masked_fill(~visible[:, None], torch.finfo(dtype).min)


class BaichuanAlibiRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class BaichuanAlibiMLP(nn.Module):
    def __init__(self, config: BaichuanAlibiConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class BaichuanAlibiAttention(nn.Module):
    def __init__(self, config: BaichuanAlibiConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, hidden_states: torch.Tensor, bias: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        batch, q_len, _ = hidden_states.shape
        shape = (batch, q_len, self.num_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(batch, q_len, -1))


class BaichuanAlibiDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: BaichuanAlibiConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = BaichuanAlibiAttention(config, layer_idx)
        self.mlp = BaichuanAlibiMLP(config)
        self.input_layernorm = BaichuanAlibiRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = BaichuanAlibiRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, hidden_states: torch.Tensor, bias: torch.Tensor | None = None, cache: Cache | None = None
    ) -> torch.Tensor:
        # hidden_states stays positional: reentrant checkpointing only tracks positional inputs.
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), bias, cache)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class BaichuanAlibiPreTrainedModel(PreTrainedModel):
    config_class = BaichuanAlibiConfig
    config: BaichuanAlibiConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BaichuanAlibiDecoderLayer"]


class BaichuanAlibiModel(BaichuanAlibiPreTrainedModel):
    def __init__(self, config: BaichuanAlibiConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(BaichuanAlibiDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = BaichuanAlibiRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        position_ids = kwargs.get("position_ids")
        if position_ids is not None and bool((position_ids.diff(dim=-1) < 0).any()):
            # Positions restarting inside a row mean packed sequences; the 2-D mask cannot keep
            # them apart, so attention would cross from one sequence into the next.
            raise ValueError(
                "position_ids restart inside a row (packed sequences); this model takes one "
                "sequence per row with a 2-D attention_mask: pad instead of packing"
            )
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # a recomputed layer would write its keys into the cache twice
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        past_len = cache.get_seq_length() if cache is not None else 0
        # Built per call, not kept as a buffer: from_pretrained constructs modules on the meta device.
        slopes = torch.tensor(alibi_slopes(self.config.num_attention_heads), device=inputs_embeds.device)
        bias = alibi_bias(slopes, attention_mask, inputs_embeds.shape[1], past_len, inputs_embeds.dtype)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, bias=bias, cache=cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


class BaichuanAlibiForCausalLM(BaichuanAlibiPreTrainedModel, GenerationMixin):
    def __init__(self, config: BaichuanAlibiConfig) -> None:
        super().__init__(config)
        self.model = BaichuanAlibiModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=cache if cache is not None else past_key_values,
            use_cache=use_cache,
            position_ids=kwargs.pop("position_ids", None),
        )
        hidden_states = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)


AutoConfig.register(ALIBI_MODEL_TYPE, BaichuanAlibiConfig, exist_ok=True)
AutoModelForCausalLM.register(BaichuanAlibiConfig, BaichuanAlibiForCausalLM, exist_ok=True)
