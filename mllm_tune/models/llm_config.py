"""Decoder configuration: `RopeConfig` and `LLMConfig` (Llama / Qwen2 / Mistral, and Qwen3 as
Qwen3-VL's text model), parsed from and written to HF `config.json` dicts, and `ConfigError`.
`models.config` re-exports all of it; the multimodal configs (`config.py`, `qwen_vl_config.py`)
build on it.

M-RoPE (Qwen2-VL / Qwen2.5-VL, `RopeConfig.mrope_section`): transformers'
`Qwen2VLRotaryEmbedding.recomposition_frequencies` rule, read from `rope_parameters` (v5) or
`rope_scaling={"type": "mrope", ...}` (hub configs); `mrope` is plain RoPE with per-frequency
position axes, so its rope type is "default" (as 5.x normalises it). Qwen3-VL interleaves the
axes over the slots (`mrope_interleaved`; `qwen_vl_config` sets it for that family whatever the
config's flag says, as transformers' Qwen3-VL rotary embedding ignores it).
"""
from __future__ import annotations

import dataclasses
from typing import Any

LLM_TYPES = ("llama", "qwen2", "mistral")
LLM_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                     "mistral": "MistralForCausalLM"}
# the Qwen3 decoder (q/k norms, head_dim of its own, no biases): only as Qwen3-VL's text model
TEXT_TYPES = LLM_TYPES + ("qwen3",)
ROPE_TYPES = ("default", "linear", "llama3")
DEFAULT_MROPE_SECTION = (16, 24, 24)  # transformers' Qwen2VLRotaryEmbedding default


class ConfigError(ValueError):
  """A config.json field is missing, unsupported or inconsistent."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """RoPE frequencies: HF `rope_parameters` (v5) or `rope_theta` + `rope_scaling` (v4)."""
  theta: float = 10000.0
  rope_type: str = "default"  # default | linear | llama3
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192
  # M-RoPE (Qwen2-VL): frequency chunk i (of these sizes, summing to head_dim / 2) takes its
  # angle from position axis i % 3 (t, h, w) of (3, B, T) positions; () = 1D RoPE
  mrope_section: tuple[int, ...] = ()
  # Qwen3-VL: the t / h / w axes interleave over the frequency slots (`rope.mrope_axes`)
  mrope_interleaved: bool = False

  def __post_init__(self):
    object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  model_type: str = "llama"
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 128
  rms_norm_eps: float = 1e-6
  rope: RopeConfig = RopeConfig()
  max_position_embeddings: int = 4096
  qkv_bias: bool = False      # Qwen2: True; Llama `attention_bias` also biases o_proj
  o_bias: bool = False
  qk_norm: bool = False       # Qwen3: RMSNorm over each head of q and k, before RoPE
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  # HF's padding_idx of the token embedding (config pad_token_id): as torch's
  # nn.Embedding(padding_idx), the lookup of that id passes no gradient to the table (nor to
  # LoRA or trainable-token rows on it); the forward is unchanged
  pad_token_id: int | None = None
  sliding_window: int | None = None  # Mistral
  hidden_act: str = "silu"
  dtype: str = "float32"        # compute dtype of activations
  param_dtype: str = "float32"  # dtype params are created/loaded in
  remat_policy: str = "none"    # none | full | dots_saveable | dots_with_no_batch_dims_saveable
  attention_impl: str = "auto"  # ATTENTION_IMPLS (models.attention)
  scan_unroll: int = 1          # decoder layers per scan iteration (lax.scan unroll)
  # decoding copies each layer's weights into its own buffer for the call (no per-token slicing
  # of the stacked arrays; costs one more copy of the LLM weights while generating); False:
  # decode through the scanned stack
  decode_per_layer: bool = True
  # False: one module per layer (params llm/layers_0.., models.kv_cache.unstack_layers); decoding
  # uses it internally (eval/decoding.py). Checkpoints, tuning and training use the stacked form.
  scan_layers: bool = True
  # mixture of experts (Qwen3-VL-MoE's text model): every layer's MLP is `num_experts` gated
  # MLPs of width `moe_intermediate_size`, each token routed to its `num_experts_per_tok` best
  # (softmax router, top-k weights renormalised to sum to 1); 0 = the dense MLP
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int = 0
  # expert parallelism only (models/moe.py: routed_experts_sharded): pairs each expert keeps
  # of its dispatch group, as a multiple of the average (GShard's capacity factor); 0 = dropless
  moe_capacity_factor: float = 0.0

  def __post_init__(self):
    if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
      raise ConfigError(f"num_experts_per_tok {self.num_experts_per_tok} must be in 1.."
                        f"{self.num_experts} (num_experts)")
    if self.num_experts and self.moe_intermediate_size < 1:
      raise ConfigError("a mixture-of-experts LLM needs moe_intermediate_size >= 1")
    cf = self.moe_capacity_factor
    if isinstance(cf, bool) or not isinstance(cf, (int, float)) or not 0 <= cf < float("inf"):
      raise ConfigError(f"moe_capacity_factor must be a number >= 0 (0 = dropless), got {cf!r}")

  @property
  def kv_groups(self) -> int:
    return self.num_heads // self.num_kv_heads

  @property
  def mrope(self) -> bool:
    """Whether positions are (3, B, T) M-RoPE ids (Qwen2-VL); (B, T) positions still work."""
    return bool(self.rope.mrope_section)


# ----------------------------------------------------------------------------- HF -> ours
def _need(d: dict, key: str, where: str) -> Any:
  if key not in d or d[key] is None:
    raise ConfigError(f"{where}: required field '{key}' is missing")
  return d[key]


def _rope_from_hf(d: dict, where: str, mrope: bool = False) -> RopeConfig:
  params = d.get("rope_parameters") or {}
  if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
    raise ConfigError(f"{where}: per-layer-type 'rope_parameters' are not supported")
  legacy = d.get("rope_scaling") or {}
  merged = {**legacy, **params}
  theta = merged.get("rope_theta", d.get("rope_theta", 10000.0))
  rope_type = merged.get("rope_type", merged.get("type", "default"))
  section = merged.get("mrope_section")
  if rope_type == "mrope" or section is not None:
    if not mrope:
      raise ConfigError(f"{where}: M-RoPE ('mrope_section') is for the Qwen2-VL families, not "
                        "a plain decoder")
    rope_type = "default"  # transformers 5 maps 'mrope' to a default RoPE with sections
  if mrope and section is None:
    section = DEFAULT_MROPE_SECTION
  if rope_type not in ROPE_TYPES:
    raise ConfigError(f"{where}: rope type '{rope_type}' is not supported "
                      f"(supported: {ROPE_TYPES})")
  if merged.get("partial_rotary_factor", 1.0) != 1.0:
    raise ConfigError(f"{where}: 'partial_rotary_factor' != 1 is not supported")
  return RopeConfig(
      theta=float(theta), rope_type=rope_type, factor=float(merged.get("factor", 1.0)),
      low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
      high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
      original_max_position_embeddings=int(merged.get(
          "original_max_position_embeddings", d.get("max_position_embeddings", 8192))),
      mrope_section=tuple(section or ()))


def llm_config_from_hf(d: dict, where: str = "config.json", mrope: bool = False,
                       **overrides) -> LLMConfig:
  """Parse a Llama / Qwen2 / Mistral `config.json` dict (or a Llava `text_config`). `mrope`:
  the dict is a Qwen2-VL text config (M-RoPE sections expected, default [16, 24, 24])."""
  mt = d.get("model_type", "llama")
  if mt not in (TEXT_TYPES if mrope else LLM_TYPES):
    raise ConfigError(f"{where}: model_type '{mt}' is not supported (supported: {LLM_TYPES})")
  act = d.get("hidden_act", "silu")
  if act != "silu":
    raise ConfigError(f"{where}: hidden_act '{act}' is not supported (only 'silu')")
  hidden = int(_need(d, "hidden_size", where))
  heads = int(_need(d, "num_attention_heads", where))
  kv = int(d.get("num_key_value_heads") or heads)
  if heads % kv:
    raise ConfigError(f"{where}: num_attention_heads={heads} is not a multiple of "
                      f"num_key_value_heads={kv}")
  sliding = None
  if mt == "mistral":
    sliding = d.get("sliding_window")
  elif mt == "qwen2":
    layer_types = d.get("layer_types") or []
    if d.get("use_sliding_window") or "sliding_attention" in layer_types:
      raise ConfigError(f"{where}: Qwen2 sliding-window attention is not supported")
  attn_bias = bool(d.get("attention_bias", False))
  fields = dict(
      model_type=mt, vocab_size=int(_need(d, "vocab_size", where)), hidden_size=hidden,
      intermediate_size=int(_need(d, "intermediate_size", where)),
      num_layers=int(_need(d, "num_hidden_layers", where)), num_heads=heads, num_kv_heads=kv,
      head_dim=int(d.get("head_dim") or hidden // heads),
      rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope=_rope_from_hf(d, where, mrope),
      max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
      qkv_bias=True if mt == "qwen2" else attn_bias,
      o_bias=attn_bias and mt in ("llama", "qwen3"), qk_norm=mt == "qwen3",
      mlp_bias=bool(d.get("mlp_bias", False)) and mt == "llama",
      tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
      pad_token_id=_pad_id(d.get("pad_token_id"), where),
      sliding_window=int(sliding) if sliding else None, **_moe_from_hf(d, where, mt))
  try:
    cfg = LLMConfig(**fields)
  except ConfigError as e:
    raise ConfigError(f"{where}: {e}") from None
  half = cfg.head_dim // 2
  if cfg.rope.mrope_section and (len(cfg.rope.mrope_section) != 3
                                 or sum(cfg.rope.mrope_section) != half):
    raise ConfigError(f"{where}: mrope_section {list(cfg.rope.mrope_section)} must be 3 sizes "
                      f"summing to head_dim / 2 = {half}")
  return dataclasses.replace(cfg, **overrides)


def _moe_from_hf(d: dict, where: str, mt: str) -> dict:
  """Mixture-of-experts fields of a Qwen3-MoE-style text config ({} for a dense one). Only
  configs whose every layer is sparse are supported (`decoder_sparse_step` 1, no
  `mlp_only_layers`), as in the released Qwen3-VL-MoE checkpoints."""
  experts = d.get("num_experts", d.get("num_local_experts")) or 0
  if not experts:
    return {}
  if mt != "qwen3":
    raise ConfigError(f"{where}: mixture-of-experts layers are supported in Qwen3-VL-MoE's text "
                      f"model only, not model_type '{mt}'")
  if int(d.get("decoder_sparse_step", 1)) != 1 or d.get("mlp_only_layers"):
    raise ConfigError(f"{where}: decoder_sparse_step {d.get('decoder_sparse_step')} / "
                      f"mlp_only_layers {d.get('mlp_only_layers')}: only configs whose every "
                      "layer is a mixture of experts are supported (step 1, no dense layers)")
  if d.get("norm_topk_prob") is False:
    raise ConfigError(f"{where}: norm_topk_prob false is not supported (Qwen3-VL-MoE "
                      "renormalises the top-k router weights)")
  try:
    return dict(num_experts=int(experts),
                num_experts_per_tok=int(_need(d, "num_experts_per_tok", where)),
                moe_intermediate_size=int(_need(d, "moe_intermediate_size", where)))
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------- ours -> HF
def _rope_to_hf(r: RopeConfig) -> dict:
  out: dict[str, Any] = {"rope_type": r.rope_type, "rope_theta": r.theta}
  if r.rope_type in ("linear", "llama3"):
    out["factor"] = r.factor
  if r.mrope_section:
    out["mrope_section"] = list(r.mrope_section)
  if r.mrope_interleaved:
    out["mrope_interleaved"] = True
  if r.rope_type == "llama3":
    out.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor,
               original_max_position_embeddings=r.original_max_position_embeddings)
  return out


def _pad_id(v, where: str) -> int | None:
  if v is None:
    return None
  if isinstance(v, bool) or not isinstance(v, int) or v < 0:
    raise ConfigError(f"{where}: pad_token_id must be a token id, got {v!r}")
  return v


def llm_config_to_hf(c: LLMConfig) -> dict:
  d = {"model_type": c.model_type, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
       "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
       "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
       "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps, "hidden_act": c.hidden_act,
       "max_position_embeddings": c.max_position_embeddings,
       "tie_word_embeddings": c.tie_word_embeddings, "rope_parameters": _rope_to_hf(c.rope)}
  if c.model_type in ("llama", "qwen3"):
    if c.qkv_bias != c.o_bias:
      raise ConfigError(f"a {c.model_type} config.json cannot express qkv_bias != o_bias")
    d["attention_bias"] = c.qkv_bias
    if c.model_type == "llama":
      d["mlp_bias"] = c.mlp_bias
  elif c.qkv_bias is False and c.model_type == "qwen2":
    raise ConfigError("Qwen2 always has q/k/v biases; qkv_bias=False cannot be exported")
  if c.pad_token_id is not None:
    d["pad_token_id"] = c.pad_token_id
  if c.model_type == "mistral":
    d["sliding_window"] = c.sliding_window
  if c.num_experts:
    d.update(num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
             moe_intermediate_size=c.moe_intermediate_size, decoder_sparse_step=1,
             mlp_only_layers=[])
  return d

