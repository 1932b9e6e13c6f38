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
the experts' share comes first or last. Each group's tokens go expert by expert, as transformers'
own experts loop adds them.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import nn


class _RoutingRecorder(nn.Module):
    """Stands in for a layer's experts module while its dense part runs."""

    def __init__(self):
        super().__init__()
        self.routed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """hidden_states: (tokens, d_model), the experts' input; top_k_*: (tokens, k)."""
        self.routed = (hidden_states, top_k_index, top_k_weights)
        return torch.zeros_like(hidden_states)

    def take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        routed, self.routed = self.routed, None
        return routed


@dataclass
class _RoutedBatch:
    """One batch between the dense part and the last group of experts."""

    hidden: torch.Tensor  # (rows, L, d_model): the layer's output so far (its experts' share added per group)
    inputs: torch.Tensor  # (rows * L, d_model): what the router handed the experts
    index: torch.Tensor  # (rows * L, k): the experts each token was routed to
    weights: torch.Tensor  # (rows * L, k): their routing weights

    def add_group(self, experts: nn.Module, first: int, end: int, device: torch.device) -> None:
        """Add experts first..end-1's output (`experts` holds just their weights) for their tokens."""
        token, slot = ((self.index >= first) & (self.index < end)).nonzero(as_tuple=True)
        if not len(token):
            return
        order = torch.argsort(self.index[token, slot], stable=True)  # expert by expert, as transformers does
        token, slot = token[order], slot[order]
        # each routed (token, expert) pair is a row with top-k 1, so the module runs only routed work
        out = experts(self.inputs[token].to(device), (self.index[token, slot] - first)[:, None].to(device),
                      self.weights[token, slot][:, None].to(device))
        flat = self.hidden.view(-1, self.hidden.shape[-1])
        flat.index_add_(0, token.to(flat.device), out.to(flat.device, flat.dtype))


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
        self.recorder = _RoutingRecorder()
        setattr(self.parent, self.attr, self.recorder)
        self.keep_on = keep_on
        self.batches: list[_RoutedBatch] = []

    def keep(self, hidden: torch.Tensor) -> None:
        """hidden: (rows, L, d_model), the next batch's layer output without experts."""
        inputs, index, weights = self.recorder.take()
        self.batches.append(_RoutedBatch(*(t.to(self.keep_on) for t in (hidden, inputs, index, weights))))

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
                batch.add_group(self.experts, first, end, device)
        finally:
            self.experts.num_experts = total
            self.experts._parameters.update(meta)

    def output(self, b: int) -> torch.Tensor:
        return self.batches[b].hidden

    def restore(self) -> None:
        setattr(self.parent, self.attr, self.experts)
        self.batches.clear()
