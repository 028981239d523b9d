"""A small looped language model shaped like ByteDance's Ouro ("Scaling Latent Reasoning via Looped Language Models").

Ouro's checkpoints ship as Hub remote code for older transformers and are far too big for tests. This model is
written from the paper's public description so that loopscope's Ouro adapter can be tested on something that is
called the way Ouro is: the same module tree (``model.layers``, ``model.norm``, ``model.early_exit_gate``,
``lm_head``), the same recurrence and the same per-pass KV cache.

Layout (``L = num_hidden_layers``, ``P = total_ut_steps``)::

    x = model.embed_tokens(input_ids)                        # s0: what the first shared layer reads at pass 0
    for p in range(P):                                       # one pass = one iteration
        for i, layer in enumerate(model.layers):
            x = layer(x, cache entry p * L + i)              # every pass has its own keys and values
        x = model.norm(x)                                    # ends the pass; feeds the next one and the head
        gate[p] = model.early_exit_gate(x)                   # [B, T, 1] exit logit of this pass
    logits = lm_head(x)                                      # or the pass picked by exit_at_step / exit_threshold

Every pass runs for every token; the exit gate only decides which pass's output the head reads: the exit
probability of pass p is ``sigmoid(gate[p])`` times the probability of not having exited before (the last pass takes
what is left), and ``exit_threshold`` picks, per token, the first pass whose cumulative probability reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # transformers >= 5 renamed the base class; the old name stays as an alias there.
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import PretrainedConfig as _BaseConfig

__all__ = [
    "OuroReferenceConfig",
    "OuroReferenceForCausalLM",
    "OuroCausalLMOutput",
    "exit_distribution",
    "register",
    "tiny_config",
]

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
# transformers 5 calls the KV cache `cache` (argument and output field), transformers 4 `past_key_values`.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _cache_kwargs(cache: Cache | None) -> dict[str, Any]:
    """The cache as a keyword argument under this transformers version's field name (see ``_CACHE_FIELD``)."""
    return {_CACHE_FIELD: cache}


class OuroReferenceConfig(_BaseConfig):
    """Ouro's settings (defaults in the range of Ouro-1.4B: 24 shared layers run 4 times)."""

    model_type = "loopscope_ouro"

    def __init__(
        self,
        vocab_size: int = 49152,
        hidden_size: int = 2048,
        intermediate_size: int = 5632,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        max_position_embeddings: int = 65536,
        rope_theta: float = 1_000_000.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        total_ut_steps: int = 4,
        early_exit_step: int | None = None,
        early_exit_threshold: float | None = None,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        if num_attention_heads % num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({num_key_value_heads})"
            )
        if total_ut_steps < 1:
            raise ValueError(f"total_ut_steps must be at least 1, got {total_ut_steps}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads if head_dim is None else head_dim
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.total_ut_steps = total_ut_steps
        self.early_exit_step = early_exit_step
        self.early_exit_threshold = early_exit_threshold
        self.use_cache = use_cache
        super().__init__(**kwargs)
        # Set after the base init: transformers 4 would otherwise reset it to its own default.
        self.tie_word_embeddings = tie_word_embeddings


def tiny_config(**overrides) -> OuroReferenceConfig:
    """A small config for tests: hidden 32, 2 shared layers, 4 heads (2 key/value heads), 4 passes, vocab 128."""
    settings: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10_000.0,
        total_ut_steps=4,
        eos_token_id=None,
        pad_token_id=0,
    )
    settings.update(overrides)
    return OuroReferenceConfig(**settings)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


class OuroRMSNorm(nn.Module):
    """RMS norm computed in float32, cast back, then scaled by ``weight``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def _rope(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin ``[B, 1, T, head_dim]`` for rotating channel halves (float32 angles)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # [B, T, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class OuroAttention(nn.Module):
    """Grouped-query causal self-attention with RoPE; keys and values go to the cache entry of (pass, layer)."""

    def __init__(self, config: OuroReferenceConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, cache: Cache | None, entry: int
    ) -> Tensor:
        batch, tokens, _ = x.shape
        q = self.q_proj(x).view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, *rope), _rotate(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, entry)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, tokens, -1))


class OuroMLP(nn.Module):
    def __init__(self, config: OuroReferenceConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class OuroDecoderLayer(nn.Module):
    """Ouro's sandwich layer: each sub-block's input and output are normalised before the residual add."""

    def __init__(self, config: OuroReferenceConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        eps = config.rms_norm_eps
        self.input_layernorm = OuroRMSNorm(config.hidden_size, eps)
        self.self_attn = OuroAttention(config)
        self.input_layernorm_2 = OuroRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = OuroRMSNorm(config.hidden_size, eps)
        self.mlp = OuroMLP(config)
        self.post_attention_layernorm_2 = OuroRMSNorm(config.hidden_size, eps)

    def forward(
        self,
        hidden_states: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Tensor | None = None,
        cache: Cache | None = None,
        entry: int = 0,
    ) -> Tensor:
        x = hidden_states
        x = x + self.input_layernorm_2(self.self_attn(self.input_layernorm(x), rope, mask, cache, entry))
        return x + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(x)))


class OuroReferenceModel(nn.Module):
    """The decoder: embeddings, the shared layers, the per-pass norm and the exit gate."""

    def __init__(self, config: OuroReferenceConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(OuroDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = OuroRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.early_exit_gate = nn.Linear(config.hidden_size, 1)
        # As in Ouro, the pass count is read from the config once, when the model is built.
        self.total_ut_steps = int(config.total_ut_steps)

    def forward(
        self,
        input_ids: Tensor | None,
        inputs_embeds: Tensor | None,
        attention_mask: Tensor | None,
        position_ids: Tensor | None,
        cache: Cache | None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Every pass's normalised output ``[B, T, H]`` and exit-gate logits ``[B, T, 1]``."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, tokens = x.shape[:2]
        seen = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(seen, seen + tokens, device=x.device).unsqueeze(0).expand(batch, -1)
        rope = _rope(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        mask = _attention_mask(attention_mask, batch, tokens, seen, x.device)
        layers = len(self.layers)
        passes, gates = [], []
        for p in range(self.total_ut_steps):
            for i, layer in enumerate(self.layers):
                x = layer(x, rope, mask, cache, p * layers + i)
            x = self.norm(x)
            passes.append(x)
            gates.append(self.early_exit_gate(x))
        return passes, gates


def _attention_mask(attention_mask: Tensor | None, batch: int, tokens: int, seen: int, device) -> Tensor | None:
    """Boolean ``[B, 1, T, seen + T]`` (True = may attend): causal, padded keys masked, each query sees itself."""
    if attention_mask is None and tokens == 1:
        return None  # one new token may attend to everything cached
    keys = torch.arange(seen + tokens, device=device)
    queries = torch.arange(seen, seen + tokens, device=device)
    allowed = keys[None, :] <= queries[:, None]  # [T, S]
    if attention_mask is not None:
        padding = attention_mask[:, -(seen + tokens) :].to(device=device, dtype=torch.bool)  # [B, S]
        allowed = allowed[None] & padding[:, None, :]
        allowed = allowed | (keys[None, None, :] == queries[None, :, None])  # a padded query attends to itself
        return allowed[:, None]
    return allowed[None, None].expand(batch, 1, tokens, seen + tokens)


def exit_distribution(gate_logits: Tensor) -> Tensor:
    """``[..., P]`` gate logits -> the probability of exiting at each pass (sums to 1; the last pass takes the rest)."""
    stay = torch.ones_like(gate_logits[..., 0])
    probs = []
    for p in range(gate_logits.shape[-1]):
        leave = torch.sigmoid(gate_logits[..., p]) if p < gate_logits.shape[-1] - 1 else torch.ones_like(stay)
        probs.append(stay * leave)
        stay = stay * (1 - leave)
    return torch.stack(probs, dim=-1)


@dataclass
class OuroCausalLMOutput(CausalLMOutputWithPast):
    """The usual causal-LM output, plus every pass's exit-gate logits ``[B, T, P]`` and the pass each token's
    logits came from ``[B, T]`` (0-based)."""

    exit_logits: Tensor | None = None
    exit_pass: Tensor | None = None


class OuroReferenceForCausalLM(PreTrainedModel, GenerationMixin):
    """The reference Ouro-style looped LM. See the module docstring for the layout and call order."""

    config_class = OuroReferenceConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["OuroDecoderLayer"]
    _supports_sdpa = True
    _supports_cache_class = True
    # transformers 5 maps tied parameter -> source; transformers 4 lists the tied output parameter (the
    # annotation in transformers is the dict).
    _tied_weights_keys = (
        {"lm_head.weight": "model.embed_tokens.weight"} if _TRANSFORMERS_MAJOR >= 5 else ["lm_head.weight"]  # type: ignore[assignment]
    )

    def __init__(self, config: OuroReferenceConfig):
        super().__init__(config)
        self.model = OuroReferenceModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = cast(nn.Embedding, value)  # transformers hands back an nn.Embedding

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) weights, zero biases, unit norms; loaded tensors are left alone."""

        def fresh(t: Tensor | None) -> bool:
            return t is not None and not getattr(t, "_is_hf_initialized", False)

        std = self.config.initializer_range
        if isinstance(module, OuroRMSNorm):
            if fresh(module.weight):
                nn.init.ones_(module.weight)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            if fresh(module.weight):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if fresh(getattr(module, "bias", None)):
                nn.init.zeros_(cast(Tensor, module.bias))  # only a Linear has one

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        exit_at_step: int | None = None,
        exit_threshold: float | None = None,
        **kwargs,
    ) -> OuroCausalLMOutput:
        """Run all ``model.total_ut_steps`` passes and read out one of them.

        exit_at_step: read every token out from this pass (0-based) instead of the last one.
        exit_threshold: per token, read out the first pass whose cumulative exit probability reaches it.
        past_key_values / cache: the KV cache (transformers 4 / 5 name); one entry per (pass, layer). An empty cache
            that cannot hold ``total_ut_steps * num_hidden_layers`` entries is swapped for one that grows.
        logits_to_keep: compute logits for the last N positions only (0: all).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = kwargs.pop("cache", None) if past_key_values is None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = self._own_cache(cache) if use_cache else None
        passes, gates = self.model(input_ids, inputs_embeds, attention_mask, position_ids, cache)
        exit_logits = torch.cat(gates, dim=-1)  # [B, T, P]
        exit_at_step = self.config.early_exit_step if exit_at_step is None else exit_at_step
        exit_threshold = self.config.early_exit_threshold if exit_threshold is None else exit_threshold
        stacked = torch.stack(passes, dim=2)  # [B, T, P, H]
        if exit_at_step is not None:
            if not 0 <= exit_at_step < len(passes):
                raise ValueError(f"exit_at_step={exit_at_step} is not a pass of this model (0..{len(passes) - 1})")
            exit_pass = torch.full(exit_logits.shape[:2], exit_at_step, device=exit_logits.device)
        elif exit_threshold is not None:
            reached = exit_distribution(exit_logits.float()).cumsum(-1) >= exit_threshold
            reached[..., -1] = True
            exit_pass = reached.int().argmax(-1)
        else:
            exit_pass = torch.full(exit_logits.shape[:2], len(passes) - 1, device=exit_logits.device)
        hidden = stacked.gather(2, exit_pass[..., None, None].expand(-1, -1, 1, stacked.shape[-1])).squeeze(2)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return OuroCausalLMOutput(
            loss=loss, logits=logits, exit_logits=exit_logits, exit_pass=exit_pass, **_cache_kwargs(cache)
        )

    def _own_cache(self, cache: Cache | None) -> Cache:
        """A cache with room for one entry per (pass, layer): a given one if it has that room or grows, a growing
        ``DynamicCache`` in place of an empty one that cannot (generate() sizes its cache by layer count)."""
        needed = self.model.total_ut_steps * len(self.model.layers)
        if cache is None:
            return DynamicCache()
        if getattr(cache, "layer_class_to_replicate", None) is not None or len(getattr(cache, "layers", ())) >= needed:
            return cache
        if cache.get_seq_length() == 0:
            return DynamicCache()
        raise ValueError(
            f"{type(self).__name__} needs a cache entry per (pass, layer), {needed} in all; got a filled "
            f"{type(cache).__name__} with {len(cache.layers)}: pass a DynamicCache() or none"
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        past_key_values: Cache | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        cache: Cache | None = None,
        next_sequence_length: int | None = None,
        **kwargs,
    ) -> dict[str, Any]:
        """Feed the tokens the cache has not seen, with positions that skip left padding.

        The cache goes back to the model under the name generate() used (``cache`` in transformers 5,
        ``past_key_values`` in 4); other generate() kwargs (``exit_threshold``, ...) reach forward() untouched.
        """
        if inputs_embeds is not None:
            raise ValueError(f"{type(self).__name__}.generate() takes input_ids, not inputs_embeds")
        key = "cache" if cache is not None else "past_key_values"
        kv = cache if cache is not None else past_key_values
        seen = kv.get_seq_length() if kv is not None and kwargs.get("use_cache", True) else 0
        if next_sequence_length is not None:
            input_ids = input_ids[:, -next_sequence_length:]
        elif 0 < seen < input_ids.shape[1]:
            input_ids = input_ids[:, seen:]
        if attention_mask is not None:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
        else:
            positions = torch.arange(seen, seen + input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        model_inputs: dict[str, Any] = {
            "input_ids": input_ids.clone(memory_format=torch.contiguous_format),
            "position_ids": positions,
            "attention_mask": attention_mask,
            key: kv,
        }
        for name, value in kwargs.items():
            if name not in model_inputs and name not in ("position_ids", "cache_position", "past_key_values", "cache"):
                model_inputs[name] = value
        return model_inputs


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know ``model_type="loopscope_ouro"``. Safe to call twice."""
    AutoConfig.register(OuroReferenceConfig.model_type, OuroReferenceConfig, exist_ok=True)
    AutoModelForCausalLM.register(OuroReferenceConfig, OuroReferenceForCausalLM, exist_ok=True)
