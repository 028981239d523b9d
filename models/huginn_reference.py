"""A small, from-scratch looped-depth language model that is shaped and called exactly like Huginn-0125.

Huginn-0125 ("Scaling up Test-Time Compute with Latent Reasoning", Geiping et al. 2025) is only published as Hub
remote code, and its weights are far too big for tests. loopscope attaches forward hooks to that model, so this
reference model reproduces what the hooks can observe -- the module tree, the order of calls, the arguments each
module receives, the recurrence and its KV cache, the ``generate()`` entry points -- on weights small enough to run
on a laptop CPU. Parameter and buffer names and shapes follow Huginn's as well (same state-dict keys).

Layout (``E = n_embd``)::

    input_ids -> transformer.wte (* embed_scale) -> transformer.prelude[0..P-1]          => e
    s0 ~ truncated normal (or input_states)
    repeat num_steps times:
        x = transformer.adapter(cat([x, e], -1))          # 2E -> E, the loop entry
        x = transformer.core_block[0] ... core_block[C-1]   # core_block[-1] ends an iteration
    latent = transformer.ln_f(x)                            # returned as `latent_states`
    logits = lm_head(ln_f(coda(latent)))                    # float32
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import ModelOutput

try:  # transformers >= 5 renamed the base class; the old name stays as an alias there.
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import PretrainedConfig as _BaseConfig

__all__ = [
    "RavenReferenceConfig",
    "RavenReferenceForCausalLM",
    "RecurrentKVCache",
    "CausalLMOutputRecurrentLatents",
    "SandwichBlock",
    "CausalSelfAttention",
    "GatedMLP",
    "RMSNorm",
    "register",
    "tiny_config",
    "get_adaptive_exit_evaluator",
    "EXIT_CRITERIA",
]

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

#: Vocabulary of ``tiny_config()``: sized for ``models/demo_tokenizer.py`` (256 bytes + specials + merges).
TINY_VOCAB_SIZE = 320


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------


class RavenReferenceConfig(_BaseConfig):
    """Huginn's ``RavenConfig`` fields and defaults (the defaults describe Huginn-0125 itself: 3.5B parameters).

    Derived values (``head_dim``, ``effective_expected_depth``, ``init_values``) are computed here the way Huginn
    computes them, unless given explicitly (as they are when a saved ``config.json`` is read back).
    """

    model_type = "loopscope_raven"
    # Huginn's own names; the standard HF names are aliases, so generic HF code finds what it looks for.
    attribute_map = {"num_attention_heads": "n_heads", "hidden_size": "n_embd", "num_hidden_layers": "n_layers"}

    def __init__(
        self,
        n_embd: int = 5280,
        n_heads: int = 55,
        num_key_value_heads: int | None = None,
        n_layers: int | None = None,
        block_size: int = 4096,
        vocab_size: int = 65536,
        padded_vocab_size: int | None = None,
        padding_multiple: int = 4096,
        tie_embeddings: bool = True,
        intermediate_size: int = 17920,
        bias: bool = False,
        norm_eps: float = 1e-6,
        n_layers_in_prelude: int = 2,
        n_layers_in_recurrent_block: int = 4,
        n_layers_in_coda: int = 2,
        mean_recurrence: int = 32,
        mean_backprop_depth: int = 8,
        qk_bias: bool = True,
        rope_base: float = 50_000.0,
        init_values: dict[str, float] | None = None,
        test_time_noise: float = 0.0,
        test_time_noise_type: str = "fixed",
        **kwargs,
    ):
        # Accept the standard HF spelling as well; Huginn stores the head count as `n_heads`.
        n_heads = kwargs.pop("num_attention_heads", n_heads)
        # `tie_embeddings` is the source of truth; a saved config carries both spellings.
        kwargs.pop("tie_word_embeddings", None)
        for derived in ("head_dim", "effective_expected_depth"):
            kwargs.pop(derived, None)
        if n_embd % n_heads:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_heads ({n_heads})")
        num_key_value_heads = n_heads if num_key_value_heads is None else num_key_value_heads
        if n_heads % num_key_value_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})")

        self.n_embd = n_embd
        self.n_heads = n_heads
        self.num_key_value_heads = num_key_value_heads
        self.n_layers_in_prelude = n_layers_in_prelude
        self.n_layers_in_recurrent_block = n_layers_in_recurrent_block
        self.n_layers_in_coda = n_layers_in_coda
        total_blocks = n_layers_in_prelude + n_layers_in_recurrent_block + n_layers_in_coda
        self.n_layers = total_blocks if n_layers is None else n_layers
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.padded_vocab_size = vocab_size if padded_vocab_size is None else padded_vocab_size
        self.padding_multiple = padding_multiple
        self.tie_embeddings = tie_embeddings
        self.intermediate_size = intermediate_size
        self.bias = bias
        self.norm_eps = norm_eps
        self.mean_recurrence = mean_recurrence
        self.mean_backprop_depth = mean_backprop_depth
        self.qk_bias = qk_bias
        self.rope_base = rope_base
        self.test_time_noise = test_time_noise
        self.test_time_noise_type = test_time_noise_type

        self.head_dim = n_embd // n_heads
        self.effective_expected_depth = (
            n_layers_in_prelude + n_layers_in_coda + n_layers_in_recurrent_block * mean_recurrence
        )
        std = math.sqrt(2 / (5 * n_embd))
        self.init_values = {
            "std": std,  # weights, and the initial latent state s0 (before embed_scale)
            "out_proj": std / math.sqrt(2 * self.effective_expected_depth),  # output projections
            "embedding": std,
            "embed_scale": math.sqrt(n_embd),  # multiplies token embeddings and s0
            **(init_values or {}),
        }
        super().__init__(**kwargs)
        # Set after the base init: transformers 4 would otherwise reset it to its own default.
        self.tie_word_embeddings = tie_embeddings


def tiny_config(**overrides) -> RavenReferenceConfig:
    """A small config for tests and demos: E=64, 4 heads, 1 prelude / 2 core / 1 coda blocks, 8 mean steps."""
    settings: dict[str, Any] = dict(
        n_embd=64,
        n_heads=4,
        intermediate_size=192,
        n_layers_in_prelude=1,
        n_layers_in_recurrent_block=2,
        n_layers_in_coda=1,
        vocab_size=TINY_VOCAB_SIZE,
        block_size=512,
        mean_recurrence=8,
        mean_backprop_depth=4,
    )
    if "num_attention_heads" in overrides:
        settings["n_heads"] = overrides.pop("num_attention_heads")
    settings.update(overrides)
    return RavenReferenceConfig(**settings)


# ----------------------------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------------------------


class RecurrentKVCache(Cache):
    """A KV cache with one entry per *block index*, not per layer.

    Every block call gets its own index: prelude blocks ``0..P-1``, then the core blocks numbered on through all
    iterations (``P + step * C + j``), and coda blocks ``-1, -2, ...``. So when a new token runs iteration ``k``,
    its attention sees the keys that the earlier tokens produced *at iteration k*, which is exactly what a full
    recomputation without a cache would compute.

    If a forward runs more iterations than an earlier one did, the new indices hold only the newer tokens, and
    attention there sees just those (Huginn's "full" lookup strategy behaves the same way).
    """

    is_compileable = False

    def __init__(self) -> None:
        # An explicit empty layer list keeps the HF base class (4.56+ and 5.x) from expecting per-layer objects.
        super().__init__(layers=[])
        self.key_cache: dict[int, Tensor] = {}
        self.value_cache: dict[int, Tensor] = {}
        self._seen_tokens = 0

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int | Tensor, cache_kwargs: dict | None = None
    ) -> tuple[Tensor, Tensor]:
        """Append this call's keys/values (``[B, H_kv, S, D]``) at block index ``layer_idx``; return all of them."""
        idx = int(layer_idx)
        if idx in self.key_cache:
            self.key_cache[idx] = torch.cat([self.key_cache[idx], key_states], dim=-2)
            self.value_cache[idx] = torch.cat([self.value_cache[idx], value_states], dim=-2)
        else:
            self.key_cache[idx] = key_states
            self.value_cache[idx] = value_states
        self._seen_tokens = max(self._seen_tokens, self.key_cache[idx].shape[-2])
        return self.key_cache[idx], self.value_cache[idx]

    def crop_entry(self, layer_idx: int, length: int) -> None:
        """Keep the first ``length`` tokens of one block index, so that decoding the same positions again replaces
        their keys instead of appending (Huginn's cache is keyed by position; adaptive exit checks decode a token's
        latents through the coda at every check)."""
        if layer_idx in self.key_cache:
            self.key_cache[layer_idx] = self.key_cache[layer_idx][..., :length, :]
            self.value_cache[layer_idx] = self.value_cache[layer_idx][..., :length, :]

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Tokens seen so far (the longest entry: the prelude and the coda are written on every forward)."""
        return self._seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def reset(self) -> None:
        self.key_cache.clear()
        self.value_cache.clear()
        self._seen_tokens = 0

    def _map(self, fn) -> None:
        self.key_cache = {i: fn(t) for i, t in self.key_cache.items()}
        self.value_cache = {i: fn(t) for i, t in self.value_cache.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the rows of the surviving beams."""
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map(lambda t: t[indices.to(t.device)])

    @property
    def num_entries(self) -> int:
        """How many block indices hold keys (prelude + core blocks x iterations + coda)."""
        return len(self.key_cache)

    def __len__(self) -> int:
        # Like HF's own caches, an empty cache is falsy and a filled one truthy.
        return self.num_entries

    def __repr__(self) -> str:
        return f"{type(self).__name__}(entries={self.num_entries}, seen_tokens={self._seen_tokens})"


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMS norm computed in float32 (stable in bf16), cast back to the input dtype, then scaled by ``weight``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        device_type = x.device.type if x.device.type != "meta" else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            x32 = x.float()
            normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
            return normed.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def precompute_freqs_cis(head_dim: int, length: int, theta: float) -> Tensor:
    """RoPE table ``[1, length, 1, head_dim // 2, 2]`` holding (cos, sin) per position and frequency pair."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)[None, :, None]


def apply_rotary(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """Rotate adjacent channel pairs ``(2i, 2i+1)`` of ``x`` (``[B, S, H, D]``), as Huginn does, in float32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    cos, sin = freqs_cis[..., 0], freqs_cis[..., 1]
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([real * cos - imag * sin, imag * cos + real * sin], dim=-1)
    return rotated.flatten(-2).type_as(x)


class CausalSelfAttention(nn.Module):
    """Causal self-attention with RoPE, optional grouped KV heads and Huginn's learned q/k bias.

    The padding ``mask`` argument is accepted and ignored, as in Huginn's released code: every sequence is treated
    as unpadded and causal, so left-padded batches attend to their pad tokens.
    """

    def __init__(self, config: RavenReferenceConfig) -> None:
        super().__init__()
        self.n_head = config.n_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.n_embd // config.n_heads
        self.chunks = [self.n_head * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim]
        self.Wqkv = nn.Linear(config.n_embd, sum(self.chunks), bias=False)
        if config.qk_bias:
            # Huginn's layout [q|k, 1, heads, head_dim]; with grouped KV the keys use the first n_kv_heads rows.
            self.qk_bias = nn.Parameter(torch.zeros(2, 1, self.n_head, self.head_dim))
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(
        self,
        x: Tensor,
        freqs_cis: Tensor,
        block_idx: Tensor | int,
        mask: Tensor | None = None,
        past_key_values: RecurrentKVCache | None = None,
    ) -> Tensor:
        B, S, E = x.shape
        q, k, v = self.Wqkv(x).split(self.chunks, dim=2)
        q = q.view(B, S, self.n_head, self.head_dim)
        k = k.view(B, S, self.n_kv_heads, self.head_dim)
        v = v.view(B, S, self.n_kv_heads, self.head_dim)
        if hasattr(self, "qk_bias"):
            q = (q + self.qk_bias[0]).to(q.dtype)
            k = (k + self.qk_bias[1, :, : self.n_kv_heads]).to(q.dtype)
        q, k = apply_rotary(q, freqs_cis), apply_rotary(k, freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, S, D]

        if past_key_values is not None:
            k, v = past_key_values.update(k, v, block_idx)
        if self.n_kv_heads != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_heads, dim=1)

        q_len, k_len = q.shape[2], k.shape[2]
        if q_len == k_len:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif q_len == 1:  # one new token sees every cached key
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # several new tokens after a cache: causal, aligned to the newest key
            allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(diagonal=k_len - q_len)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.proj(y.transpose(1, 2).reshape(B, S, E))


class GatedMLP(nn.Module):
    """SiLU-gated MLP with the gate and up projections fused into one ``fc`` (Huginn's layout)."""

    def __init__(self, config: RavenReferenceConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.intermediate_size * 2, bias=False)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)
        self.nonlin = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(self.nonlin(gate) * up)


class SandwichBlock(nn.Module):
    """Transformer block with a norm before *and* after each sublayer.

    The trailing norms (``norm_2``, ``norm_4``) renormalise the residual stream after every block, which is what
    keeps the state bounded however many times the core blocks are iterated.
    """

    def __init__(self, config: RavenReferenceConfig, layer_id: int) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = GatedMLP(config)
        self.norm_3 = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.norm_4 = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.layer_id = layer_id

    def forward(
        self,
        x: Tensor,
        freqs_cis: Tensor,
        step_idx: Tensor | int,
        mask: Tensor | None = None,
        past_key_values: RecurrentKVCache | None = None,
    ) -> Tensor:
        x = self.norm_2(self.attn(self.norm_1(x), freqs_cis, step_idx, mask, past_key_values) + x)
        return self.norm_4(self.mlp(self.norm_3(x)) + x)


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


# transformers 5 renamed the cache field of model outputs from `past_key_values` to `cache` (and reads it back
# under that name during generate); each version gets its own field name, and the other name as a read-only alias.
_CACHE_FIELD = "cache" if _TRANSFORMERS_MAJOR >= 5 else "past_key_values"

if _CACHE_FIELD == "cache":

    @dataclass
    class CausalLMOutputRecurrentLatents(ModelOutput):
        """Huginn's output. ``latent_states`` is ``ln_f`` of the last iteration's state (before the coda)."""

        loss: Tensor | None = None
        log_ppl: Tensor | None = None
        logits: Tensor | None = None
        cache: Cache | None = None
        latent_states: Tensor | None = None
        hidden_states: Tensor | None = None
        attention_maps: dict[int, Tensor] | None = None
        stats: dict | None = None

        @property
        def past_key_values(self) -> Cache | None:
            return self.cache

else:

    @dataclass
    class CausalLMOutputRecurrentLatents(ModelOutput):  # type: ignore[no-redef]  # one definition per transformers major
        """Huginn's output. ``latent_states`` is ``ln_f`` of the last iteration's state (before the coda)."""

        loss: Tensor | None = None
        log_ppl: Tensor | None = None
        logits: Tensor | None = None
        past_key_values: Cache | None = None
        latent_states: Tensor | None = None
        hidden_states: Tensor | None = None
        attention_maps: dict[int, Tensor] | None = None
        stats: dict | None = None

        @property
        def cache(self) -> Cache | None:
            return self.past_key_values


def _cache_kwargs(cache: Cache | None) -> dict[str, Any]:
    """The cache as a keyword argument under this transformers version's field name (see ``_CACHE_FIELD``)."""
    return {_CACHE_FIELD: cache}


def _block_index(i: int) -> Tensor:
    """Blocks receive their cache index as a 0-d long tensor, as in Huginn (a fresh one per call)."""
    return torch.tensor(i, dtype=torch.long)


def _to_int(value) -> int:
    return int(value.item()) if isinstance(value, Tensor) else int(value)


def _first_position(position_ids: Tensor | None, cache_position: Tensor | int | None) -> int | None:
    if position_ids is not None:
        return int(position_ids.reshape(-1)[0])
    if cache_position is not None:
        return _to_int(cache_position.reshape(-1)[0] if isinstance(cache_position, Tensor) else cache_position)
    return None


if TYPE_CHECKING:

    class _RavenTransformer(nn.ModuleDict):
        """What ``RavenReferenceForCausalLM.transformer`` holds (a plain ``nn.ModuleDict`` at run time)."""

        wte: nn.Embedding
        prelude: nn.ModuleList
        adapter: nn.Linear
        core_block: nn.ModuleList
        coda: nn.ModuleList
        ln_f: RMSNorm


class RavenReferenceForCausalLM(PreTrainedModel, GenerationMixin):
    """The reference looped-depth model. See the module docstring for the layout and call order."""

    freqs_cis: Tensor  # RoPE table, a registered buffer

    config_class = RavenReferenceConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["SandwichBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_cache_class = True
    # transformers 5 maps tied parameter -> source; transformers 4 lists the tied output parameter (the
    # annotation in transformers is the dict).
    _tied_weights_keys = (
        {"lm_head.weight": "transformer.wte.weight"} if _TRANSFORMERS_MAJOR >= 5 else ["lm_head.weight"]  # type: ignore[assignment]
    )

    def __init__(self, config: RavenReferenceConfig) -> None:
        super().__init__(config)
        self.config = config
        P, C = config.n_layers_in_prelude, config.n_layers_in_recurrent_block
        coda_offset = P + C * config.mean_recurrence
        self.transformer: _RavenTransformer = cast(
            "_RavenTransformer",
            nn.ModuleDict(
                dict(
                    wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                    prelude=nn.ModuleList(SandwichBlock(config, layer_id=i) for i in range(P)),
                    adapter=nn.Linear(config.n_embd * 2, config.n_embd, bias=config.bias),
                    core_block=nn.ModuleList(SandwichBlock(config, layer_id=P + i) for i in range(C)),
                    coda=nn.ModuleList(
                        SandwichBlock(config, layer_id=coda_offset + i) for i in range(config.n_layers_in_coda)
                    ),
                    ln_f=RMSNorm(config.n_embd, eps=config.norm_eps),  # applied twice: to the latent and after the coda
                )
            ),
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # Persistent, as in Huginn, so that Huginn checkpoints (which contain it) load without surprises.
        self.register_buffer("freqs_cis", self._rope_table(), persistent=True)
        self.post_init()

    # ---- HF plumbing -------------------------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.transformer.wte = cast(nn.Embedding, value)  # transformers hands back an nn.Embedding

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def _rope_table(self) -> Tensor:
        return precompute_freqs_cis(self.config.head_dim, self.config.block_size, self.config.rope_base)

    @property
    def emb_scale(self) -> float:
        return float(self.config.init_values["embed_scale"])

    def _init_role(self, module: nn.Module) -> str | None:
        """Which init a Linear gets. Decided per leaf module, because transformers 5 skips parameter-less
        container modules (such as GatedMLP) when it initialises custom-code models."""
        roles = self.__dict__.get("_init_roles")
        if roles is None or id(module) not in roles:
            roles = {id(self.transformer["adapter"]): "std", id(self.lm_head): "std"}
            for m in self.modules():
                if isinstance(m, CausalSelfAttention):
                    roles.update({id(m.Wqkv): "std", id(m.proj): "out_proj"})
                elif isinstance(m, GatedMLP):
                    roles.update({id(m.fc): "glu", id(m.proj): "out_proj"})
            self.__dict__["_init_roles"] = roles
        return roles.get(id(module))

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Huginn's scheme: truncated normals (+-3 std), small output projections, unit norms, zero q/k bias.

        Tensors that transformers has flagged as loaded from a checkpoint are left alone.
        """
        iv = self.config.init_values
        std, out_std = float(iv["std"]), float(iv["out_proj"])

        def fresh(t: Tensor | None) -> bool:
            return t is not None and not getattr(t, "_is_hf_initialized", False)

        def normal_(t: Tensor, sigma: float) -> None:
            if sigma > 0:
                nn.init.trunc_normal_(t, mean=0.0, std=sigma, a=-3 * sigma, b=3 * sigma)
            else:
                nn.init.zeros_(t)

        if isinstance(module, RMSNorm):
            if fresh(module.weight):
                nn.init.ones_(module.weight)
        elif isinstance(module, nn.Embedding):
            if fresh(module.weight):
                normal_(module.weight, float(iv["embedding"]))
        elif isinstance(module, nn.Linear):
            role = self._init_role(module)
            if role is None:
                return
            tied_head = module is self.lm_head and module.weight is self.transformer["wte"].weight
            if fresh(module.weight) and not tied_head:
                if role == "glu":  # gate half at `std`, up half at `out_proj`, as in Huginn
                    half = module.weight.shape[0] // 2
                    normal_(module.weight[:half], std)
                    normal_(module.weight[half:], out_std)
                else:
                    normal_(module.weight, std if role == "std" else out_std)
            if fresh(module.bias):
                nn.init.zeros_(module.bias)
        elif isinstance(module, CausalSelfAttention):
            if fresh(getattr(module, "qk_bias", None)):
                nn.init.zeros_(module.qk_bias)
        elif module is self:
            if fresh(self.freqs_cis) and self.freqs_cis.device.type != "meta":
                self.freqs_cis.copy_(self._rope_table().to(self.freqs_cis.device))

    # ---- forward -----------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor,
        input_embeds: Tensor | None = None,
        input_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        num_steps: int | Tensor | tuple | list | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool = False,
        cache_position: Tensor | None = None,
        init_scale: float = 1.0,
        **kwargs,
    ) -> CausalLMOutputRecurrentLatents:
        """Run prelude, ``num_steps`` iterations of the core blocks, then coda and head.

        num_steps: ``None`` -> ``config.mean_recurrence`` in eval mode (a random depth in train mode, as in Huginn);
            an int or a one-element tensor -> that many iterations; a pair ``(no_grad_steps, grad_steps)`` -> that
            many iterations without, then with, autograd. As in Huginn, a plain count runs without autograd.
        input_embeds: already-computed token embeddings (unscaled; ``embed_scale`` is applied here).
        input_states: the initial latent state s0 ``[B, S, E]``; drawn at random when omitted.
        init_scale: scales the std of the random s0; 0 gives an all-zero, deterministic s0.
        attention_mask: ignored, as in Huginn (no padding support: attention is plain causal).
        labels: compared position by position with the logits (no shift), as in Huginn.
        past_key_values: a ``RecurrentKVCache`` (an empty HF cache is swapped for one); ``cache`` is accepted
            as an alias, since transformers 5 passes the cache under that name.
        """
        if past_key_values is None:
            past_key_values = kwargs.pop("cache", None)
        past_key_values = self._ensure_own_cache(past_key_values)
        if use_cache and past_key_values is None:
            past_key_values = RecurrentKVCache()

        if input_embeds is None:
            input_embeds = self.transformer.wte(input_ids)
        if self.emb_scale != 1:
            input_embeds = input_embeds * self.emb_scale
        freqs_cis = self._positions_to_freqs(input_embeds.shape[1], position_ids, cache_position, past_key_values)

        mask = None  # padding masks are not supported (see the docstring)
        block_idx = -1
        for block in self.transformer.prelude:
            block_idx += 1
            input_embeds = block(input_embeds, freqs_cis, _block_index(block_idx), mask, past_key_values)

        x, num_steps_no_grad, num_steps_with_grad, _, block_idx = self.iterate_forward(
            input_embeds, input_states, freqs_cis, block_idx, mask, past_key_values, num_steps, init_scale
        )
        latent_states = x.clone().detach()

        for i, block in enumerate(self.transformer.coda):
            x = block(x, freqs_cis, _block_index(-1 - i), mask, past_key_values)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x).float()

        loss = log_ppl = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
            log_ppl = loss.clone().detach()

        return CausalLMOutputRecurrentLatents(
            loss=loss,
            log_ppl=log_ppl,
            logits=logits,
            latent_states=latent_states,
            stats={"num_steps_no_grad": num_steps_no_grad, "num_steps_with_grad": num_steps_with_grad},
            **_cache_kwargs(past_key_values),
        )

    def _ensure_own_cache(self, cache: Cache | None) -> RecurrentKVCache | None:
        """Swap an empty foreign (HF) cache for ours; a filled one cannot be reinterpreted per block index."""
        if cache is None or isinstance(cache, RecurrentKVCache):
            return cache
        if isinstance(cache, Cache) and cache.get_seq_length() == 0:
            return RecurrentKVCache()
        raise ValueError(
            f"{type(self).__name__} needs a RecurrentKVCache (one entry per block index); got a filled "
            f"{type(cache).__name__}"
        )

    def _positions_to_freqs(
        self, seq_len: int, position_ids: Tensor | None, cache_position: Tensor | None, cache: Cache | None
    ) -> Tensor:
        """RoPE rows for this call; one position vector is shared by the whole batch (no padding support)."""
        if position_ids is not None:
            positions = position_ids.reshape(-1, position_ids.shape[-1])[0] if position_ids.dim() > 1 else position_ids
        elif cache_position is not None:
            positions = cache_position.reshape(-1)
        else:
            start = cache.get_seq_length() if cache is not None else 0
            return self.freqs_cis[:, start : start + seq_len]
        return self.freqs_cis.index_select(1, positions.reshape(-1).to(self.freqs_cis.device))

    def iterate_forward(
        self,
        input_embeds: Tensor,
        input_states: Tensor | None,
        freqs_cis: Tensor,
        block_idx: int,
        mask: Tensor | None = None,
        past_key_values: RecurrentKVCache | None = None,
        num_steps=None,
        init_scale: float = 1.0,
    ) -> tuple[Tensor, int, int, Tensor, int]:
        """The recurrence. Returns ``(ln_f(state), no_grad_steps, grad_steps, state_before_last_step, block_idx)``."""
        x = self.initialize_state(input_embeds, scale=init_scale) if input_states is None else input_states.clone()
        xk = x
        no_grad_steps, grad_steps = self._split_num_steps(num_steps)
        with torch.no_grad():
            for step in range(no_grad_steps):
                xk = x
                x, block_idx = self.core_block_forward(
                    xk, input_embeds, freqs_cis, mask, past_key_values, block_idx, step
                )
        for step in range(grad_steps):
            xk = x
            x, block_idx = self.core_block_forward(
                xk, input_embeds, freqs_cis, mask, past_key_values, block_idx, no_grad_steps + step
            )
        return self.transformer.ln_f(x), no_grad_steps, grad_steps, xk.detach(), block_idx

    def core_block_forward(
        self,
        x: Tensor,
        input_embeds: Tensor,
        freqs_cis: Tensor,
        mask: Tensor | None,
        past_key_values: RecurrentKVCache | None,
        block_idx: int,
        current_step: int,
    ) -> tuple[Tensor, int]:
        """One iteration: optional noise, the adapter on ``[state, embeddings]``, then each core block in order."""
        x = self._maybe_inject_noise(x, current_step)
        x = self.transformer.adapter(torch.cat([x, input_embeds.to(x.device)], dim=-1))
        for block in self.transformer.core_block:
            block_idx += 1
            x = block(x, freqs_cis, _block_index(block_idx), mask, past_key_values)
        return x, block_idx

    def _split_num_steps(self, num_steps) -> tuple[int, int]:
        """Normalise every accepted ``num_steps`` form to ``(no_grad_steps, grad_steps)``."""
        if num_steps is None:
            return self.randomized_iteration_sampler()
        if isinstance(num_steps, Tensor):
            values = num_steps.reshape(-1).tolist()
        elif isinstance(num_steps, (tuple, list)):
            values = [_to_int(v) for v in num_steps]
        else:
            values = [_to_int(num_steps)]
        if len(values) == 1:
            values = [values[0], 0]
        if len(values) != 2 or min(values) < 0:
            raise ValueError(f"num_steps must be a count or a (no_grad_steps, grad_steps) pair, got {num_steps!r}")
        return int(values[0]), int(values[1])

    def randomized_iteration_sampler(self) -> tuple[int, int]:
        """Eval: ``mean_recurrence`` steps. Training: Huginn's Poisson-lognormal depth, last ``s`` steps with grad."""
        if not self.training:
            return int(self.config.mean_recurrence), 0
        s = int(self.config.mean_backprop_depth)
        t = max(int(self.config.mean_recurrence) - s, 0)
        sigma = 0.5
        mu = math.log(t + s) - sigma**2 / 2
        rate = torch.zeros(1).log_normal_(mean=mu, std=sigma)
        total = int(torch.poisson(rate).item()) + 1
        return max(total - s, 0), min(s, total)

    def initialize_state(self, like: Tensor, scale: float = 1.0) -> Tensor:
        """s0: truncated normal (+-3 std) with std = ``init_values["std"] * scale``, then times ``embed_scale``
        (Huginn scales s0 like the token embeddings); exactly zero when ``std * scale == 0``."""
        x = torch.randn_like(like)  # drawn and overwritten, to consume the RNG exactly as Huginn does
        std = float(self.config.init_values["std"]) * float(scale)
        if std > 0:
            nn.init.trunc_normal_(x, mean=0.0, std=std, a=-3 * std, b=3 * std)
            if self.emb_scale != 1:
                x = x * self.emb_scale
        else:
            x.zero_()
        return x

    def _maybe_inject_noise(self, x: Tensor, current_step: int, renorm: bool = True) -> Tensor:
        """Huginn's optional test-time noise on the state before each iteration, renormalised by the last core
        block's ``norm_4`` (so with noise on, that norm is called once more per iteration)."""
        if self.config.test_time_noise <= 0:
            return x
        n = self.config.test_time_noise * self.config.init_values["std"] * self.emb_scale
        kind = self.config.test_time_noise_type
        if kind == "fixed":
            weight = n
        elif kind == "geom":
            weight = n / (current_step + 1)
        elif kind == "sqrt":
            weight = n / math.sqrt(current_step + 1)
        elif kind == "line":
            weight = max(n, (self.config.mean_recurrence - current_step) / self.config.mean_recurrence)
        elif kind == "chi":
            weight = 2 * torch.rand(1, device=x.device, dtype=x.dtype) * n
        else:
            raise ValueError(f"unknown test_time_noise_type {kind!r}")
        x = x * (1 - weight) + torch.randn_like(x) * weight
        if renorm:
            x = cast(SandwichBlock, self.transformer.core_block[-1]).norm_4(x)
        return x

    # ---- Huginn's alternative entry points ---------------------------------------------------------------------

    # Same argument order as Huginn's, so code written against Huginn can call these positionally.

    def embed_inputs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: RecurrentKVCache | None = None,
        use_cache: bool = False,
        cache_position: Tensor | None = None,
        **kwargs,
    ) -> tuple[Tensor, int]:
        """Scaled embeddings through the prelude; returns ``(e, last_prelude_block_idx)``."""
        if use_cache and past_key_values is None:
            past_key_values = RecurrentKVCache()
        freqs_cis = self._positions_to_freqs(input_ids.shape[1], position_ids, cache_position, past_key_values)
        e = self.transformer.wte(input_ids)
        if self.emb_scale != 1:
            e = e * self.emb_scale
        block_idx = -1
        for block in self.transformer.prelude:
            block_idx += 1
            e = block(e, freqs_cis, _block_index(block_idx), None, past_key_values)
        return e, block_idx

    @torch.no_grad()
    def iterate_one_step(
        self,
        input_embeds: Tensor,
        input_states: Tensor,
        position_ids: Tensor | None = None,
        cache_position: Tensor | None = None,
        block_idx: int | Tensor = 0,
        attention_mask: Tensor | None = None,
        past_key_values: RecurrentKVCache | None = None,
        current_step: int = 0,
    ) -> tuple[Tensor, int, int]:
        """One iteration from a given state; returns ``(new_state, block_idx, current_step + 1)``."""
        freqs_cis = self._positions_to_freqs(input_embeds.shape[1], position_ids, cache_position, None)
        x, block_idx = self.core_block_forward(
            input_states, input_embeds, freqs_cis, None, past_key_values, _to_int(block_idx), current_step
        )
        return x, block_idx, current_step + 1

    def predict_from_latents(
        self,
        latents: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache_position: Tensor | None = None,
        past_key_values: RecurrentKVCache | None = None,
    ) -> CausalLMOutputRecurrentLatents:
        """Decode a (pre-``ln_f``) state into logits through ``ln_f``, the coda, ``ln_f`` and the head."""
        freqs_cis = self._positions_to_freqs(latents.shape[1], position_ids, cache_position, None)
        first = _first_position(position_ids, cache_position)
        x = self.transformer.ln_f(latents)
        for i, block in enumerate(self.transformer.coda):
            if isinstance(past_key_values, RecurrentKVCache) and first is not None:
                past_key_values.crop_entry(-1 - i, first)
            x = block(x, freqs_cis, _block_index(-1 - i), None, past_key_values)
        x = self.transformer.ln_f(x)
        return CausalLMOutputRecurrentLatents(
            logits=self.lm_head(x).float(), latent_states=x, **_cache_kwargs(past_key_values)
        )

    # ---- generation --------------------------------------------------------------------------------------------

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        past_key_values: Cache | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        cache_position: Tensor | None = None,
        cache: Cache | None = None,
        next_sequence_length: int | None = None,
        is_first_iteration: bool | None = None,
        **kwargs,
    ) -> dict[str, Any]:
        """Feed only the tokens the cache has not seen, with explicit positions, and swap in our cache.

        transformers 4 hands the cache over as ``past_key_values``, transformers 5 as ``cache``; it goes back to
        the model under the same name. Extra ``generate()`` kwargs (``num_steps``, ``init_scale``, ...) are
        forwarded to ``forward`` untouched.
        """
        if inputs_embeds is not None:
            raise ValueError(f"{type(self).__name__}.generate() takes input_ids, not inputs_embeds")
        cache_key = "cache" if cache is not None else "past_key_values"
        kv = cache if cache is not None else past_key_values
        use_cache = kwargs.get("use_cache", True)
        if kv is not None and use_cache:
            kv = self._ensure_own_cache(kv)
            assert kv is not None  # a given cache comes back as a RecurrentKVCache (or raises)
            seen = kv.get_seq_length()
            if next_sequence_length is not None:
                input_ids = input_ids[:, -next_sequence_length:]
            elif 0 < seen < input_ids.shape[1]:
                input_ids = input_ids[:, seen:]
        else:
            kv, seen = None, 0
        positions = torch.arange(seen, seen + input_ids.shape[1], device=input_ids.device)

        model_inputs: dict[str, Any] = {
            "input_ids": input_ids.clone(memory_format=torch.contiguous_format),
            "position_ids": positions.unsqueeze(0),
            cache_key: kv,
            "attention_mask": attention_mask,
        }
        for key, value in kwargs.items():
            if key not in model_inputs and key not in ("position_ids", "cache_position", "past_key_values", "cache"):
                model_inputs[key] = value
        return model_inputs

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        """Huginn's dispatcher: ``criterion=`` / ``exit_threshold=`` / ``exit_evaluator=`` ->
        :meth:`generate_with_adaptive_compute` (each token exits when its criterion holds);
        ``continuous_compute=True`` -> :meth:`generate_minimal` (each new token starts from the previous token's
        final latent state); everything else -> transformers' ``GenerationMixin.generate``."""
        if any(k in kwargs for k in ("criterion", "exit_threshold", "exit_evaluator")):
            return self.generate_with_adaptive_compute(*args, **kwargs)
        if kwargs.pop("continuous_compute", False):
            return self.generate_minimal(*args, continuous_compute=True, **kwargs)
        return super().generate(*args, **kwargs)

    @torch.no_grad()
    def generate_minimal(
        self,
        input_ids: Tensor,
        generation_config: GenerationConfig | None = None,
        tokenizer=None,
        streamer=None,
        continuous_compute: bool = False,
        init_scale: float = 1.0,
        num_steps=None,
        **kwargs,
    ) -> Tensor | GenerateDecoderOnlyOutput:
        """A plain cached decoding loop (greedy, or sampling with temperature / top-k / top-p).

        With ``continuous_compute``, the prompt starts from a random s0 and every later token's s0 is the previous
        token's ``latent_states`` (Huginn's warm start). Stops at ``max_new_tokens`` or when every row has emitted
        an ``eos_token_id``; finished rows are padded with ``pad_token_id`` (or their eos token).
        """
        decoding = _Decoding(self, input_ids, generation_config, streamer, kwargs)
        unused = decoding.unused
        for ignored in ("attention_mask", "use_cache", "past_key_values", "cache"):
            unused.pop(ignored, None)
        cache = RecurrentKVCache()
        states = None
        if continuous_compute:
            like = torch.empty(*input_ids.shape, self.config.n_embd, device=input_ids.device, dtype=self.dtype)
            states = self.initialize_state(like, scale=init_scale)
        for _ in range(decoding.max_new_tokens):
            seen = cache.get_seq_length()
            new_ids = decoding.sequences[:, seen:]
            positions = torch.arange(seen, decoding.sequences.shape[1], device=input_ids.device).unsqueeze(0)
            outputs = self(
                new_ids,
                input_states=states,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                num_steps=num_steps,
                init_scale=init_scale,
                **unused,
            )
            if continuous_compute:
                states = outputs.latent_states[:, -1:, :]
            if not decoding.append(self._next_token(outputs.logits[:, -1, :], decoding.config)):
                break
        return decoding.result(cache)

    # ---- adaptive compute (Huginn's per-token early exit) ------------------------------------------------------

    @torch.no_grad()
    def generate_with_adaptive_compute(
        self,
        input_ids: Tensor,
        generation_config: GenerationConfig | None = None,
        tokenizer=None,
        streamer=None,
        continuous_compute: bool = False,
        criterion: str = "none",
        exit_threshold: str | float | int = "auto",
        init_scale: float = 1.0,
        do_not_exit_in_prefill: bool = False,
        min_steps: int = 0,
        check_criterion_every_n_steps: int = 1,
        exit_evaluator: ExitEvaluator | None = None,
        num_steps=None,
        **kwargs,
    ) -> Tensor | GenerateDecoderOnlyOutput:
        """Decode token by token; every token iterates until its exit criterion holds (at most ``num_steps`` or
        ``mean_recurrence`` iterations), as Huginn's adaptive generation does.

        The loop runs outside :meth:`forward`: ``embed_inputs``, then ``iterate_one_step`` per iteration, the
        evaluator's ``check`` after each (which may decode the latents through the coda), and
        ``predict_from_latents`` for the logits. A batch iterates until every unfinished row has exited; a row that
        exited keeps its logits (and, with ``continuous_compute``, its state) from its exit step, while its state
        keeps being iterated with the others (those iterations fill the shared KV cache, as in Huginn).
        """
        decoding = _Decoding(self, input_ids, generation_config, streamer, kwargs)  # attention_mask etc.: ignored
        max_steps = int(self.config.mean_recurrence) if num_steps is None else _to_int(num_steps)
        evaluator = (
            exit_evaluator
            if exit_evaluator is not None
            else get_adaptive_exit_evaluator(self, criterion, exit_threshold)
        )
        batch = input_ids.shape[0]
        cache = RecurrentKVCache()
        warm = None
        if continuous_compute:  # Huginn draws the first warm state over the whole prompt
            embedded, _ = self.embed_inputs(input_ids)
            warm = self.initialize_state(embedded, scale=init_scale)
        unfinished = decoding.unfinished
        for token_index in range(decoding.max_new_tokens):
            seen = cache.get_seq_length()
            positions = torch.arange(seen, decoding.sequences.shape[1], device=input_ids.device).unsqueeze(0)
            aux: dict[str, Any] = {"position_ids": positions, "past_key_values": cache}
            embedded, block_idx = self.embed_inputs(decoding.sequences[:, seen:], use_cache=True, **aux)
            x = warm if continuous_compute else self.initialize_state(embedded, scale=init_scale)
            assert x is not None  # with continuous_compute, `warm` is always set
            next_warm = x[:, -1:, :].clone() if continuous_compute else None
            exited = torch.zeros(batch, dtype=torch.bool, device=x.device)
            next_logits: Tensor | None = None
            outputs: CausalLMOutputRecurrentLatents | None = None
            evaluator.init(x)
            for step in range(max_steps):
                x, block_idx, _ = self.iterate_one_step(embedded, x, block_idx=block_idx, current_step=step, **aux)
                checking = (
                    step >= min_steps
                    and (step - min_steps) % check_criterion_every_n_steps == 0
                    and not (do_not_exit_in_prefill and token_index == 0)
                )
                if not checking:
                    continue
                exits, outputs, _values = evaluator.check(self, x, aux)
                new = exits.to(exited.device) & ~exited & unfinished
                if new.any():
                    exited |= new
                    if outputs is None:
                        outputs = self.predict_from_latents(x, **aux)
                    assert outputs.logits is not None
                    logits = outputs.logits[:, -1, :].float()
                    next_logits = (
                        logits.clone() if next_logits is None else torch.where(new[:, None], logits, next_logits)
                    )
                    if continuous_compute:
                        assert next_warm is not None
                        next_warm[new] = x[new, -1:, :]
                if bool((exited | ~unfinished).all()):
                    break
            else:  # some rows never exited: they take the last iteration's logits
                if outputs is None:
                    outputs = self.predict_from_latents(x, **aux)
                assert outputs.logits is not None
                logits = outputs.logits[:, -1, :].float()
                late = ~exited & unfinished
                next_logits = logits if next_logits is None else torch.where(late[:, None], logits, next_logits)
                if continuous_compute:
                    assert next_warm is not None
                    next_warm[late] = x[late, -1:, :]
            if continuous_compute:
                warm = next_warm
            # set by now: some row exited, or the iterations ran out (None only for an empty batch, which fails here)
            if not decoding.append(self._next_token(cast(Tensor, next_logits), decoding.config)):
                break
        return decoding.result(cache)

    @torch.no_grad()
    def forward_with_adaptive_compute(
        self,
        input_ids: Tensor,
        exit_evaluator: ExitEvaluator,
        labels: Tensor | None = None,
        init_scale: float = 1.0,
        **kwargs,
    ) -> CausalLMOutputRecurrentLatents:
        """Huginn's experiment-only forward: token by token, each token iterating until ``exit_evaluator`` says
        stop (at most ``mean_recurrence`` steps). Batch size 1 only, as in Huginn. ``stats["compute_steps"]``."""
        if input_ids.shape[0] != 1:
            raise ValueError("forward_with_adaptive_compute runs one sequence at a time (batch size 1)")
        cache = RecurrentKVCache()
        all_logits, compute_steps = [], []
        for pos in range(input_ids.shape[1]):
            aux: dict[str, Any] = {
                "position_ids": torch.tensor([[pos]], device=input_ids.device),
                "past_key_values": cache,
            }
            embedded, block_idx = self.embed_inputs(input_ids[:, pos : pos + 1], use_cache=True, **aux)
            x = self.initialize_state(embedded, scale=init_scale)
            exit_evaluator.init(x)
            for step in range(int(self.config.mean_recurrence)):
                x, block_idx, _ = self.iterate_one_step(embedded, x, block_idx=block_idx, current_step=step, **aux)
                exits, _, _ = exit_evaluator.check(self, x, aux)
                if bool(exits.any()):
                    break
            compute_steps.append(step + 1)
            all_logits.append(self.predict_from_latents(x, **aux).logits)
        logits = torch.cat(cast("list[Tensor]", all_logits), dim=1)  # predict_from_latents always sets logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
        return CausalLMOutputRecurrentLatents(
            loss=loss, log_ppl=loss, logits=logits, stats={"compute_steps": compute_steps}
        )

    @staticmethod
    def _next_token(logits: Tensor, config: GenerationConfig) -> Tensor:
        logits = logits.float()
        if not config.do_sample:
            return logits.argmax(dim=-1)
        if config.temperature:
            logits = logits / config.temperature
        if config.top_k:
            kth = torch.topk(logits, min(int(config.top_k), logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if config.top_p is not None and config.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) > config.top_p  # keep the token that crosses top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return torch.multinomial(logits.softmax(-1), num_samples=1).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------------
# Exit evaluators for adaptive compute (Huginn's protocol: init(latents) per token, check(model, latents, aux)
# after each iteration, returning (exit per row, decoded outputs or None, the value compared per row))
# ----------------------------------------------------------------------------------------------------------------


class ExitEvaluator:
    """Decides after each iteration which rows may stop."""

    def init(self, latents: Tensor) -> None:
        """Called once per token, with the initial state."""

    def check(
        self, model: RavenReferenceForCausalLM, latents: Tensor, aux: dict
    ) -> tuple[Tensor, CausalLMOutputRecurrentLatents | None, Tensor]:
        raise NotImplementedError


class NeverExit(ExitEvaluator):
    """criterion="none": every token runs all its iterations."""

    def check(self, model, latents, aux):
        zeros = torch.zeros(latents.shape[0], device=latents.device)
        return zeros.bool(), None, zeros


class _LogitsChange(ExitEvaluator):
    """Exit when a function of the last position's next-token distribution stops changing."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.previous = None

    def init(self, latents):
        self.previous = None

    def measure(self, log_probs: Tensor, previous: Tensor | None) -> Tensor:
        raise NotImplementedError

    def check(self, model, latents, aux):
        outputs = model.predict_from_latents(latents, **aux)
        log_probs = F.log_softmax(outputs.logits[:, -1, :].float(), dim=-1)
        values = self.measure(log_probs, self.previous)
        self.previous = log_probs
        return values < self.threshold, outputs, values


class EntropyChange(_LogitsChange):
    """criterion="entropy-diff": |entropy now - entropy at the previous check| (first check: against 100)."""

    def measure(self, log_probs, previous):
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        before = torch.full_like(entropy, 100.0) if previous is None else -(previous.exp() * previous).sum(-1)
        return (entropy - before).abs()


class KLChange(_LogitsChange):
    """criterion="kl": KL(previous || now) of the next-token distribution (first check: against uniform)."""

    def measure(self, log_probs, previous):
        if previous is None:
            previous = torch.full_like(log_probs, -math.log(log_probs.shape[-1]))
        return (previous.exp() * (previous - log_probs)).sum(-1)


class ArgmaxStable(ExitEvaluator):
    """criterion="argmax-stability": exit once the top token has stayed the same for ``threshold`` checks."""

    def __init__(self, threshold: int):
        self.threshold = threshold

    def init(self, latents):
        self.top = None
        self.stable = torch.zeros(latents.shape[0], dtype=torch.long, device=latents.device)

    def check(self, model, latents, aux):
        outputs = model.predict_from_latents(latents, **aux)
        top = outputs.logits[:, -1, :].argmax(-1)
        same = top == self.top if self.top is not None else torch.zeros_like(top, dtype=torch.bool)
        self.stable = torch.where(same, self.stable + 1, torch.zeros_like(self.stable))
        self.top = top
        return self.stable >= self.threshold, outputs, self.stable


class _LatentChange(ExitEvaluator):
    """Exit when the latent state itself stops moving (no decoding needed)."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def init(self, latents):
        self.previous = latents.clone()

    def check(self, model, latents, aux):
        values = self.measure(latents, self.previous).mean(dim=-1)  # per row: mean over the positions
        self.previous = latents.clone()
        return values < self.threshold, None, values


class LatentChange(_LatentChange):
    """criterion="latent-diff": ||s_k - s_{k-1}|| / ||s_k|| per position."""

    @staticmethod
    def measure(now, before):
        return (now - before).norm(dim=-1) / now.norm(dim=-1)


class CosineChange(_LatentChange):
    """criterion="cosine": 1 - cos(s_k, s_{k-1}) per position."""

    @staticmethod
    def measure(now, before):
        return 1 - F.cosine_similarity(now, before, dim=-1)


#: criterion -> (evaluator class, default threshold); Huginn's "auto" thresholds.
EXIT_CRITERIA = {
    "none": (NeverExit, None),
    "entropy-diff": (EntropyChange, 1e-3),
    "latent-diff": (LatentChange, 0.03),
    "kl": (KLChange, 1e-3),
    "argmax-stability": (ArgmaxStable, 5),
    "cosine": (CosineChange, 1e-3),
}


def get_adaptive_exit_evaluator(model, criterion: str, exit_threshold: str | float | int = "auto") -> ExitEvaluator:
    """The evaluator for ``criterion`` (same name and role as Huginn's factory)."""
    if criterion not in EXIT_CRITERIA:
        raise ValueError(f"unknown exit criterion {criterion!r}; choose one of {', '.join(EXIT_CRITERIA)}")
    cls, default = EXIT_CRITERIA[criterion]
    if default is None:
        return cls()
    threshold = default if exit_threshold == "auto" else exit_threshold
    return cls(int(threshold) if cls is ArgmaxStable else float(threshold))


class _Decoding:
    """The bookkeeping both of Huginn's own decoding loops share: the generation config and its leftover kwargs,
    the sequences so far, which rows have finished (eos), padding of finished rows, and the streamer."""

    def __init__(self, model, input_ids: Tensor, generation_config: GenerationConfig | None, streamer, kwargs: dict):
        self.config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
        self.unused = self.config.update(**kwargs)
        limit = self.config.max_new_tokens
        self.max_new_tokens = max(
            limit if limit is not None else (self.config.max_length or 20) - input_ids.shape[1], 0
        )
        eos = self.config.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.stops = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
        self.pad = self.config.pad_token_id if self.config.pad_token_id is not None else (eos[0] if eos else None)
        self.sequences = input_ids
        self.unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        self.streamer = streamer
        if streamer is not None:
            streamer.put(input_ids.cpu())

    def append(self, next_token: Tensor) -> bool:
        """Add one token per row (finished rows get the pad token); False once every row has finished."""
        if self.pad is not None:
            next_token = torch.where(self.unfinished, next_token, torch.full_like(next_token, self.pad))
        self.sequences = torch.cat([self.sequences, next_token[:, None]], dim=-1)
        if self.streamer is not None:
            self.streamer.put(next_token.cpu())
        self.unfinished &= ~torch.isin(next_token, self.stops)
        return bool(self.unfinished.any())

    def result(self, cache: RecurrentKVCache):
        if self.streamer is not None:
            self.streamer.end()
        if self.config.return_dict_in_generate:
            return GenerateDecoderOnlyOutput(sequences=cast(torch.LongTensor, self.sequences), **_cache_kwargs(cache))
        return self.sequences


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know ``model_type="loopscope_raven"``. Safe to call twice."""
    AutoConfig.register(RavenReferenceConfig.model_type, RavenReferenceConfig, exist_ok=True)
    AutoModelForCausalLM.register(RavenReferenceConfig, RavenReferenceForCausalLM, exist_ok=True)
