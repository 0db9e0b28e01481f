"""A small decoder-only Switch-Transformer language model.

Pre-norm blocks of causal self-attention and a Switch FFN: a linear router picks
one expert per token (top-1) and scales the expert's output by the router
probability.  Each expert is ``wo(relu(wi(x)))`` without biases and its
parameters are named like Switch checkpoints
(``blocks.{i}.mlp.experts.expert_{j}.wi.weight`` / ``.wo.weight``), so the
``switch`` preset selects exactly the expert matrices.  Experts are separate
``nn.Linear`` modules so forward hooks on them see only their own tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

CONFIG_METADATA_KEY = "moe_config"
# The dtype the weights are stored in ("float32", "bfloat16"); the model computes in float32.
DTYPE_METADATA_KEY = "dtype"


@dataclass(frozen=True)
class MoEConfig:
    vocab_size: int = 256
    context: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512
    n_experts: int = 8
    # Weight of the Switch load-balancing loss; without it a few experts take all tokens.
    aux_loss_coef: float = 0.01

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MoEConfig:
        return cls(**json.loads(text))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Expert(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.relu(self.wi(x)))


class SwitchFFN(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleDict({f"expert_{j}": Expert(cfg) for j in range(cfg.n_experts)})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the output and the load-balancing loss (1.0 when perfectly balanced)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = torch.softmax(self.router(x).float(), dim=-1)
        gate, choice = probs.max(dim=-1)
        y = torch.zeros_like(x)
        for j, expert in enumerate(self.experts.values()):
            idx = torch.nonzero(choice == j).squeeze(1)
            if idx.numel():
                y.index_copy_(0, idx, gate[idx, None].to(x.dtype) * expert(x[idx]))
        n_experts = probs.shape[-1]
        fraction = torch.bincount(choice, minlength=n_experts).float() / choice.numel()
        aux = n_experts * torch.sum(fraction * probs.mean(dim=0))
        return y.reshape(shape), aux


class Block(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.ln1 = RMSNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = RMSNorm(cfg.d_model)
        self.mlp = SwitchFFN(cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.ln1(x))
        y, aux = self.mlp(self.ln2(x))
        return x + y, aux


class SwitchMoELM(nn.Module):
    """Byte-level Switch MoE LM; the output head is tied to the token embedding."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.context, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = RMSNorm(config.d_model)
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2 style: small normal init, residual-branch outputs shrunk by depth.
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            std = residual_std if name.endswith(("proj.weight", "wo.weight")) else 0.02
            nn.init.normal_(p, std=std)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, T, vocab] and the mean load-balancing loss over layers."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(positions)
        aux_total = x.new_zeros(())
        for block in self.blocks:
            x, aux = block(x)
            aux_total = aux_total + aux
        logits = F.linear(self.ln_f(x), self.tok_emb.weight)
        return logits, aux_total / len(self.blocks)

    def loss(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token cross-entropy and load-balancing loss of windows [B, T+1]."""
        logits, aux = self(windows[:, :-1])
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
        return ce, aux


def save_model(model: SwitchMoELM, path: str | Path, extra_metadata: dict[str, str] | None = None,
               dtype: torch.dtype = torch.float32) -> None:
    """Safetensors of the state dict with every floating tensor in `dtype` (rounded to
    nearest even: `Tensor.to`), the config JSON and that dtype's name in the header
    metadata. The bytes are a function of the weights and the metadata (its keys sorted;
    safetensors' own save_file orders them by a hash map). :func:`load_model` upcasts
    into the model's float32 parameters, so a bf16 file computes in float32."""
    from .._torch import numpy_of
    from ..io.checkpoint import dtype_of
    from ..io.safetensors_writer import SafetensorsWriter

    metadata = {CONFIG_METADATA_KEY: model.config.to_json(), DTYPE_METADATA_KEY: _dtype_name(dtype),
                **(extra_metadata or {})}
    tensors = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).cpu().contiguous()
               for k, v in model.state_dict().items()}
    arrays = {k: numpy_of(t) for k, t in tensors.items()}
    entries = [(k, dtype_of(a), a.shape) for k, a in arrays.items()]
    with SafetensorsWriter(path, entries, dict(sorted(metadata.items()))) as w:
        for k, a in arrays.items():
            w.write(k, a)


def round_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Round every floating parameter and buffer to `dtype` in place, keeping its own
    dtype: the model then computes with exactly the weights `save_model(..., dtype=dtype)`
    writes."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.copy_(t.to(dtype))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_model(path: str | Path, device: str | torch.device = "cpu") -> SwitchMoELM:
    """Model in eval mode from a checkpoint written by :func:`save_model`, its parameters
    float32 whatever the file's dtype (a bfloat16 file is upcast exactly)."""
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        config = MoEConfig.from_json(f.metadata()[CONFIG_METADATA_KEY])
        state = {k: f.get_tensor(k) for k in f.keys()}
    model = SwitchMoELM(config).to(device)
    model.load_state_dict(state, strict=True)
    return model.eval()


def token_windows(tokens: np.ndarray | torch.Tensor, context: int) -> torch.Tensor:
    """Non-overlapping windows [N, context+1] covering the stream (the tail is dropped).

    Consecutive windows share one token so every token after the first is predicted once.
    """
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    n = (len(tokens) - 1) // context
    return tokens[: n * context + 1].unfold(0, context + 1, context)


@torch.no_grad()
def heldout_loss(model: SwitchMoELM, tokens: np.ndarray | torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats/byte) of ``model`` over the token stream."""
    windows = token_windows(tokens, model.config.context)
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size].to(device)
        ce, _ = model.loss(batch)
        total += ce.item() * len(batch)
    return total / len(windows)
