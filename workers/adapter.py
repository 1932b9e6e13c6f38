"""Runs a Hugging Face causal LM as separate stages: embeddings → decoder layers → norm → lm head.

Any `*ForCausalLM` whose decoder has that shape runs here (Llama, Gemma 1-3, Qwen, Mixtral, OLMo,
Granite, ...): the skeleton is built from the config with every parameter on the meta device (no
weight memory) while buffers — rotary frequencies, Gemma's embedding scale — are real, computed by
transformers itself. Weights are assigned per layer as they stream in and dropped back to meta
afterwards, so every architecture's arithmetic is transformers' own modules (attention soft-capping,
Granite's residual multiplier, MoE routers and experts included); we supply masks and positions,
and apply the few scalars transformers applies in the model's forward rather than in a module
(`Scaling`).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flexorch.contract.errors import UserError
from flexorch.contract.manifest import DECODER, EMBED, LM_HEAD, NORM
from flexorch.contract.models import check_model_type


# Both context managers below patch process-wide state (nn.Module.register_parameter, the default
# dtype) while a skeleton is built. Engines on several threads of one process (pipeline stages in
# tests) take turns, and `assign` (which registers parameters) waits for a build in progress, or
# its weights would be swapped for meta ones.
_SKELETON_LOCK = threading.Lock()


@contextlib.contextmanager
def _parameters_on_meta():
    """Create parameters on the meta device and leave buffers real (accelerate's
    init_empty_weights(include_buffers=False), in a few lines)."""
    original = nn.Module.register_parameter

    def register_parameter(module, name, param):
        original(module, name, param)
        if param is not None:
            meta = nn.Parameter(module._parameters[name].to("meta"), requires_grad=False)
            module._parameters[name] = meta

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    # Buffers made in __init__ (e.g. Gemma's embed scale) take the default dtype, as in from_pretrained.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@dataclass(frozen=True)
class PackedBatch:
    """Prompts packed as rows: row r is prefix + suffix_1 + ... + suffix_n, right-padded.

    input_ids, position_ids, segment_ids: (rows, length); segment 0 is the prefix, j the j-th
    suffix, -1 padding. Positions restart after the prefix for each suffix, so each suffix token
    sits where it would in prefix + suffix alone.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)


def pack_rows(rows: list[tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]]) -> PackedBatch:
    """Pack (prefix_ids, suffix_ids) rows into one right-padded batch."""
    length = max(len(prefix) + sum(len(s) for s in suffixes) for prefix, suffixes in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    pos = torch.zeros(len(rows), length, dtype=torch.long)
    seg = torch.full((len(rows), length), -1, dtype=torch.long)
    for r, (prefix, suffixes) in enumerate(rows):
        p = len(prefix)
        ids[r, :p] = torch.tensor(prefix, dtype=torch.long)
        pos[r, :p] = torch.arange(p)
        seg[r, :p] = 0
        start = p
        for j, suffix in enumerate(suffixes, start=1):
            n = len(suffix)
            if n:
                ids[r, start:start + n] = torch.tensor(suffix, dtype=torch.long)
            pos[r, start:start + n] = torch.arange(p, p + n)
            seg[r, start:start + n] = j
            start += n
    return PackedBatch(ids, pos, seg)


def attention_allowed(batch: PackedBatch, sliding_window: int | None, queries: int | None = None,
                      chunk: int | None = None) -> torch.Tensor:
    """(rows, 1, Q, L) bool: may query q attend to key k; the queries are the last Q columns of
    `batch` (all of them by default; a generation step's new tokens against the KV cache, whose
    columns `batch` lays out first).

    A prefix token sees the earlier prefix; a suffix token sees the whole prefix and the earlier
    tokens of its own suffix — exactly its view in the un-split prefix + suffix sequence. A sliding
    window keeps keys with q_pos - k_pos < window, as transformers' sliding_window_overlay does; an
    attention chunk (Llama 4's local layers) keeps keys of the query's chunk of positions,
    q_pos // chunk == k_pos // chunk, as its chunked_overlay does.
    Padding queries see only themselves, so no row is fully masked (NaN-free softmax).
    """
    seg, pos = batch.segment_ids, batch.position_ids
    length = seg.shape[1]
    first = length - (length if queries is None else queries)
    index = torch.arange(length, device=seg.device)
    q_index = index[first:]
    causal = q_index[None, :, None] >= index[None, None, :]  # (1, q, k)
    seg_q, seg_k = seg[:, first:, None], seg[:, None, :]
    allowed = causal & ((seg_k == seg_q) | (seg_k == 0)) & (seg_k >= 0) & (seg_q >= 0)
    if sliding_window is not None:
        allowed &= (pos[:, first:, None] - pos[:, None, :]) < sliding_window
    if chunk is not None:
        allowed &= (pos[:, first:, None] // chunk) == (pos[:, None, :] // chunk)
    allowed |= (seg_q < 0) & (q_index[:, None] == index[None, :])
    return allowed[:, None]


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask → the additive float mask transformers' eager and sdpa attention both accept."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


@dataclass(frozen=True)
class LayerKind:
    """What a decoder layer's mask and rotary table depend on; layers of one kind share them.

    rotary_type: the layer type whose rotary table the layer takes where the model keeps one per
    type (Gemma 3: local and global attention use different bases), else None.
    window: the sliding window, None for full attention.
    chunk: the attention chunk of a chunked_attention layer (Llama 4's local layers), else None."""

    rotary_type: str | None
    window: int | None
    chunk: int | None = None


@dataclass(frozen=True)
class Scaling:
    """Scalars transformers applies in a model's forward rather than in one of its modules, from the
    config: they must be applied between our stages."""

    embedding: float = 1.0  # Granite: GraniteModel.forward multiplies the embeddings
    logits_divisor: float = 1.0  # Granite: GraniteForCausalLM.forward divides the logits
    logits_factor: float = 1.0  # Cohere: CohereForCausalLM.forward multiplies them by logit_scale
    softcap: float | None = None  # Gemma 2/3: the final logits are tanh soft-capped

    @classmethod
    def from_config(cls, config) -> "Scaling":
        return cls(embedding=getattr(config, "embedding_multiplier", None) or 1.0,
                   logits_divisor=getattr(config, "logits_scaling", None) or 1.0,
                   logits_factor=getattr(config, "logit_scale", None) or 1.0,
                   softcap=getattr(config, "final_logit_softcapping", None) or None)


@dataclass(frozen=True)
class DecoderParts:
    """The modules of a `*ForCausalLM` in forward order, as transformers names them."""

    embed: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    head: nn.Module
    rotary: nn.Module


def decoder_parts(model: nn.Module, where: str) -> DecoderParts:
    """The stages of `model`, or a UserError when its decoder is not embeddings → layers → norm → head
    with one rotary embedding (those are the models the engine can cut into shards)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not hasattr(base, "layers"):  # Llama 4's get_decoder returns the model itself
        base = getattr(model, "model", None)
    found = {name: getattr(base, name, None) for name in ("embed_tokens", "layers", "norm", "rotary_emb")}
    found["lm_head"] = model.get_output_embeddings()
    missing = [name for name, module in found.items() if module is None]
    if missing or not isinstance(found["layers"], nn.ModuleList):
        raise UserError(f"{where}: {type(model).__name__} is not embeddings → decoder layers → norm → lm head "
                        f"with rotary positions (missing: {', '.join(missing) or 'a list of layers'})")
    return DecoderParts(found["embed_tokens"], found["layers"], found["norm"], found["lm_head"], found["rotary_emb"])


def layer_kinds(config, rotary: nn.Module) -> tuple[LayerKind, ...]:
    """Each decoder layer's kind. With `layer_types`, only sliding_attention layers have a window
    (Gemma 2/3, Qwen with use_sliding_window) and chunked_attention ones a chunk (Llama 4); without,
    every layer takes config.sliding_window (Mistral, Phi-3)."""
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    per_type = "layer_type" in inspect.signature(rotary.forward).parameters  # Gemma3RotaryEmbedding
    if not types:
        return tuple(LayerKind(None, window) for _ in range(config.num_hidden_layers))
    chunk = getattr(config, "attention_chunk_size", None)
    return tuple(LayerKind(t if per_type else None, window if t == "sliding_attention" else None,
                           chunk if t == "chunked_attention" else None)
                 for t in types[:config.num_hidden_layers])


class QueryTemperature:
    """Llama 4's attention temperature on its no-rope layers (arXiv 2501.19399): each query times
    log1p(floor((p + 1) / floor_scale)) * attn_scale + 1, p the token's position in its sequence.

    transformers takes p from the token's column (arange over the layer's input plus the cache's
    length), which is its position only in a row holding one sequence: in a packed row each suffix
    restarts at the prefix's end, and a generation step's cache holds padding columns. Below
    floor_scale (8192 in the releases) every p gives 1, so that showed only on rows that long. Here
    transformers' own scaling is turned off on those layers and this forward hook on their q_proj
    applies it from our position ids: on a no-rope layer nothing (no rope, no qk norm) comes between
    q_proj and the scaling, so scaling q_proj's output per token is the same product."""

    def __init__(self, floor_scale: float, attn_scale: float):
        self.floor_scale, self.attn_scale = floor_scale, attn_scale
        self.positions: torch.Tensor | None = None  # (rows, Q): of the decoder layer call in progress

    @classmethod
    def install(cls, layers: nn.ModuleList) -> "QueryTemperature | None":
        """One hook on the q_proj of every layer transformers would temper, or None (no such layer)."""
        tempered = [layer.self_attn for layer in layers
                    if getattr(getattr(layer, "self_attn", None), "attn_temperature_tuning", False)
                    and not getattr(layer.self_attn, "use_rope", True)]
        if not tempered:
            return None
        temperature = cls(tempered[0].floor_scale, tempered[0].attn_scale)
        for attention in tempered:
            attention.attn_temperature_tuning = False
            attention.q_proj.register_forward_hook(temperature)
        return temperature

    @contextlib.contextmanager
    def at(self, position_ids: torch.Tensor):
        """position_ids: (rows, Q), the queries' positions while a decoder layer runs."""
        self.positions = position_ids
        try:
            yield
        finally:
            self.positions = None

    def __call__(self, module: nn.Module, inputs, queries: torch.Tensor) -> torch.Tensor:
        """queries: (rows, Q, heads * head_dim) → the same, each token's row scaled (in float32, cast
        back, as transformers does)."""
        if self.positions is None:
            raise RuntimeError("a tempered no-rope layer ran outside ModelAdapter.decoder_layer")
        scales = torch.log1p(torch.floor((self.positions.float() + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
        return (queries * scales[..., None]).to(queries.dtype)


def _cache_kwarg(forward) -> str:
    """The name a decoder layer takes its KV cache under: transformers renamed it from
    `past_key_value` (4.x) to `past_key_values` (5.x) to `cache` (5.2x, the old name deprecated).
    Read from the signature (decorators keep it through functools.wraps)."""
    parameters = inspect.signature(forward).parameters
    return next((name for name in ("cache", "past_key_values", "past_key_value") if name in parameters),
                "past_key_values")


class ModelAdapter:
    """A meta skeleton of the model and the calls that run each stage on `device`."""

    def __init__(self, model_dir: str | Path, device: torch.device, dtype: torch.dtype,
                 allow_remote_code: bool = False, allow_untested: bool = False):
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=allow_remote_code)
        check_model_type(config.model_type, allow_untested, str(model_dir))
        # transformers' default attention, as the un-split from_pretrained picks it: sdpa, or eager where
        # sdpa cannot express the model's attention (Gemma 2's soft-capping). Both take our 4D mask.
        with _SKELETON_LOCK, _parameters_on_meta(), _default_dtype(dtype):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=allow_remote_code)
        model.eval().requires_grad_(False)
        parts = decoder_parts(model, str(model_dir))
        self.config = config
        self.device, self.dtype = device, dtype
        self._modules: dict[str, nn.Module] = {EMBED: parts.embed, NORM: parts.norm, LM_HEAD: parts.head}
        self._layers = parts.layers
        for module in (parts.embed, parts.rotary):  # the real buffers (rotary, embed scale)
            for name, buffer in module.named_buffers(recurse=False):
                setattr(module, name, buffer.to(device))
        self.rotary = parts.rotary.to(device)
        self.scaling = Scaling.from_config(config)
        self.layer_kinds = layer_kinds(config, parts.rotary)
        self._cache_kwarg = _cache_kwarg(type(self._layers[0]).forward)
        self._temperature = QueryTemperature.install(parts.layers)  # Llama 4's no-rope layers

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def module(self, kind: str, index: int | None = None) -> nn.Module:
        return self._layers[index] if kind == DECODER else self._modules[kind]

    def assign(self, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Give `module` these weights (already on the device, in the compute dtype), no copy."""
        with _SKELETON_LOCK:
            module.load_state_dict(tensors, strict=True, assign=True)

    @staticmethod
    def assign_rows(module: nn.Module, weight: torch.Tensor) -> None:
        """Give an embedding or head some rows of its (vocab, hidden) weight: the gathered rows of a
        pass's tokens, or a step of the head's vocabulary (load_state_dict would refuse the shape;
        both modules read nothing but `weight` in their forward)."""
        if isinstance(module, nn.Embedding):
            # padding_idx only keeps a row's gradient at zero; counted in the full vocabulary it points
            # past the gathered rows (Qwen's 151643), which F.embedding refuses.
            module.padding_idx = None
        module._parameters["weight"] = nn.Parameter(weight, requires_grad=False)

    @staticmethod
    def release(module: nn.Module) -> None:
        """Drop a module's weights back to meta so their memory can be reused."""
        for sub in module.modules():
            for name, param in sub._parameters.items():
                if param is not None and not param.is_meta:
                    sub._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    # -- stages ------------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (rows, L) → hidden: (rows, L, d_model)."""
        hidden = self._modules[EMBED](input_ids)
        return hidden * self.scaling.embedding if self.scaling.embedding != 1.0 else hidden

    def position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor, kind: LayerKind):
        """The (cos, sin) the decoder layers of `kind` take; position_ids: (rows, L)."""
        if kind.rotary_type is not None:
            return self.rotary(hidden, position_ids, kind.rotary_type)
        return self.rotary(hidden, position_ids)

    def decoder_layer(self, index: int, hidden: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor,
                      position_embeddings, cache=None) -> torch.Tensor:
        """hidden: (rows, Q, d_model) → same; mask: additive (rows, 1, Q, K); `cache`: an object with
        transformers' `update(keys, values, layer_idx, ...) -> (keys, values)` (workers/kvcache.py),
        or None: the keys are the Q tokens' own (K == Q)."""
        extra = {self._cache_kwarg: cache} if cache is not None else {}
        with self._temperature.at(position_ids) if self._temperature else contextlib.nullcontext():
            out = self._layers[index](hidden, attention_mask=mask, position_ids=position_ids,
                                      position_embeddings=position_embeddings, **extra)
        return out[0] if isinstance(out, tuple) else out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (n, d_model) of the positions to score → float32 logits (n, vocab)."""
        return self.head_logits(self.final_norm(hidden))

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (n, d_model) → the same, normed: what the head reads."""
        return self._modules[NORM](hidden)

    def head_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """normed: (n, d_model) → float32 logits (n, rows) of the rows the head holds (all, or a
        step of them): every scalar below is per logit, so a step's logits are those columns'."""
        logits = self._modules[LM_HEAD](normed)
        scaling = self.scaling
        if scaling.logits_factor != 1.0:
            logits = logits * scaling.logits_factor
        if scaling.logits_divisor != 1.0:
            logits = logits / scaling.logits_divisor
        logits = logits.float()
        if scaling.softcap:
            logits = torch.tanh(logits / scaling.softcap) * scaling.softcap
        return logits
