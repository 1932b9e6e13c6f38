"""Expert streaming: a mixture-of-experts layer run in steps, for devices smaller than the layer.

The steps of one layer (contract/shards.py) are shard steps like any other — loaded, the next one
prefetched, every batch of the round through each. First the dense part: the decoder layer runs
through transformers' own modules with its experts module swapped for `_RoutingRecorder`, which
keeps what the router sent the experts (their input rows, the top-k expert ids and weights) and
gives back zeros, so the layer's output is its output without the experts. Then each group of
experts: transformers' experts module holds just the group's weights (expert e of the group is
slice [e] of the fused tensors) and runs on every token routed to one of them, across the whole
batch set; its output is added to that token's row. After the last group the layer's output is
complete.

Exact, because the MoE layers of the tested types add their experts' output to the residual stream
unscaled (`residual + mlp(x)`, with mlp = experts [+ shared expert]): the sum does not care whether
the experts' share comes first or last (Granite MoE scales the MLP's output by its residual
multiplier in the decoder layer's forward, not a module: each group's share is scaled so). Whatever a layout does to the experts' input or output
happens inside the modules we keep: DeepSeek's, GLM's and dots' routed scaling factor is in the
router's weights, gpt-oss's clamp and biases in its experts module, and Llama 4's router score
scales the experts' input before its experts module is called (the recorder keeps that input).
Each group's tokens go expert by expert, as transformers' own experts loop adds them.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import nn


class _RoutingRecorder(nn.Module):
    """Stands in for a layer's experts module while its dense part runs."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.routed: _Routed | None = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None):
        """hidden_states: (tokens, d_model), the experts' input, with top_k_*: (tokens, k); or, called
        with the input alone (Llama 4), (experts * tokens, d_model): expert e's copy of the tokens
        (rows e * tokens ...) scaled by its router score, 0 where the token is not routed to it."""
        if top_k_index is not None:
            self.routed = _Routed.of_top_k(hidden_states, top_k_index, top_k_weights)
        else:
            self.routed = _Routed.of_scaled(hidden_states.view(self.num_experts, -1, hidden_states.shape[-1]))
        return torch.zeros_like(hidden_states)

    def take(self) -> _Routed:
        routed, self.routed = self.routed, None
        return routed


@dataclass
class _Routed:
    """What a router sent the experts of one batch, as (token, expert) pairs."""

    inputs: torch.Tensor  # (n, d_model): the experts' input rows
    row: torch.Tensor  # (pairs,): each pair's row of `inputs`
    token: torch.Tensor  # (pairs,): the token (row of the flattened layer output) it adds to
    expert: torch.Tensor  # (pairs,)
    weights: torch.Tensor | None  # (pairs,): its routing weight, None where the input carries it

    @classmethod
    def of_top_k(cls, inputs: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> "_Routed":
        token = torch.arange(index.shape[0], device=index.device).repeat_interleave(index.shape[1])
        return cls(inputs, token, token, index.reshape(-1), weights.reshape(-1))

    @classmethod
    def of_scaled(cls, scaled: torch.Tensor) -> "_Routed":
        """scaled: (experts, tokens, d_model). An unrouted pair's input is 0 and, the experts having
        no bias, so is its output: only routed pairs are kept."""
        expert, token = scaled.ne(0).any(-1).nonzero(as_tuple=True)
        return cls(scaled[expert, token], torch.arange(len(token), device=token.device), token, expert, None)

    def to(self, device: torch.device) -> "_Routed":
        return _Routed(*(None if t is None else t.to(device)
                         for t in (self.inputs, self.row, self.token, self.expert, self.weights)))


@dataclass
class _RoutedBatch:
    """One batch between the dense part and the last group of experts."""

    hidden: torch.Tensor  # (rows, L, d_model): the layer's output so far (its experts' share added per group)
    routed: _Routed

    def add_group(self, experts: nn.Module, first: int, end: int, device: torch.device, scale: float) -> None:
        """Add experts first..end-1's output (`experts` holds just their weights), times `scale`, for
        their tokens."""
        r = self.routed
        (pairs,) = ((r.expert >= first) & (r.expert < end)).nonzero(as_tuple=True)
        if not len(pairs):
            return
        pairs = pairs[torch.argsort(r.expert[pairs], stable=True)]  # expert by expert, as transformers does
        expert, inputs = r.expert[pairs] - first, r.inputs[r.row[pairs]].to(device)
        if r.weights is not None:
            # each routed (token, expert) pair is a row with top-k 1, so the module runs only routed work
            out = experts(inputs, expert[:, None].to(device), r.weights[pairs][:, None].to(device))
        else:
            out = _per_expert_batches(experts, inputs, expert.to(device), end - first)
        if scale != 1.0:
            out = out * scale
        flat = self.hidden.view(-1, self.hidden.shape[-1])
        flat.index_add_(0, r.token[pairs].to(flat.device), out.to(flat.device, flat.dtype))


def _per_expert_batches(experts: nn.Module, inputs: torch.Tensor, expert: torch.Tensor, group: int) -> torch.Tensor:
    """The output of an experts module that takes (group * n, d_model) rows, n per expert (Llama 4's
    batched matmul), for `inputs` (pairs, d_model) sorted by `expert` (pairs,): padded with zero rows
    to the largest expert's count, run once, the pairs' rows taken back."""
    counts = torch.bincount(expert, minlength=group)
    slot = torch.arange(len(expert), device=expert.device) - (torch.cumsum(counts, 0) - counts)[expert]
    padded = inputs.new_zeros(group, int(counts.max()), inputs.shape[-1])
    padded[expert, slot] = inputs
    return experts(padded.view(-1, inputs.shape[-1])).view(padded.shape)[expert, slot]


class StreamedExperts:
    """One MoE decoder layer between its dense step and its last group of experts.

    `expert_tensors`: the layer's fused experts tensors (manifest), e.g. "mlp.experts.gate_up_proj";
    their module ("mlp.experts") is swapped for a recorder until `restore`. `keep_on`: where the
    batches wait between steps (the activation storage's device: RAM unless storage is gpu)."""

    def __init__(self, layer: nn.Module, expert_tensors: tuple[str, ...], keep_on: torch.device):
        self.path = expert_tensors[0].rsplit(".", 1)[0]
        parent, _, self.attr = self.path.rpartition(".")
        self.parent = layer.get_submodule(parent)
        self.experts = getattr(self.parent, self.attr)
        self.recorder = _RoutingRecorder(self.experts.num_experts)
        setattr(self.parent, self.attr, self.recorder)
        self.keep_on = keep_on
        self.scale = getattr(layer, "residual_multiplier", 1.0)  # Granite MoE: residual + mlp(x) * multiplier
        self.batches: list[_RoutedBatch] = []

    def keep(self, hidden: torch.Tensor) -> None:
        """hidden: (rows, L, d_model), the next batch's layer output without experts."""
        self.batches.append(_RoutedBatch(hidden.to(self.keep_on), self.recorder.take().to(self.keep_on)))

    def add_group(self, first: int, end: int, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        """Run experts first..end-1 (`tensors`: their slices of the fused tensors, on the device) over
        every batch."""
        meta = dict(self.experts._parameters)  # the skeleton's, all experts: put back afterwards
        total = self.experts.num_experts
        # The module holds end - first experts now (load_state_dict would refuse the smaller shape),
        # and transformers' experts size their dispatch by num_experts (grouped_mm's histogram,
        # eager's one-hot).
        for name, tensor in tensors.items():
            self.experts._parameters[name.removeprefix(self.path + ".")] = nn.Parameter(tensor, requires_grad=False)
        self.experts.num_experts = end - first
        try:
            for batch in self.batches:
                batch.add_group(self.experts, first, end, device, self.scale)
        finally:
            self.experts.num_experts = total
            self.experts._parameters.update(meta)

    def output(self, b: int) -> torch.Tensor:
        return self.batches[b].hidden

    def restore(self) -> None:
        setattr(self.parent, self.attr, self.experts)
        self.batches.clear()
