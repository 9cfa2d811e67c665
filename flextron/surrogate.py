"""The surrogate model (SM): predicts the LM loss of a sub-network from the routers' outputs.

Flextron (Fig. 3 caption) trains the routers through an SM "trained to approximate the LLM language loss
value given only routers logits"; the routers step only while the SM's error is under a threshold. Here the SM
reads the concatenation, over layers, of the router's (one-hot or soft) choice distributions for MLP width and head
count (for input-adaptive routers: the share of tokens/sequences at each choice), and is an MLP trained with MSE on
observed losses of sampled sub-networks (in :func:`flextron.router.train_routers`: the loss a sub-network adds to
the full model's on the same sequence, so the text's own difficulty is not noise the SM has to explain). Its error
is tracked as an exponential moving average of
``|SM - loss| / loss`` on fresh samples before they are trained on, so the gate reads held-out error.
"""

from __future__ import annotations

import torch
from torch import nn


class Surrogate(nn.Module):
    """``SM(p) -> predicted LM loss``; ``p [..., in_features]`` the concatenated per-layer choice distributions."""

    def __init__(self, in_features: int, hidden: int = 256, layers: int = 2) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        d = in_features
        for _ in range(layers):
            mods += [nn.Linear(d, hidden), nn.GELU()]
            d = hidden
        mods.append(nn.Linear(d, 1))
        self.net = nn.Sequential(*mods)
        self.register_buffer("loss_offset", torch.zeros(()))  # the mean loss, so the net learns a residual
        self.error_ema: float | None = None

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return self.net(p).squeeze(-1) + self.loss_offset

    def observe(self, p: torch.Tensor, loss: torch.Tensor, optimizer: torch.optim.Optimizer, *,
                scale: torch.Tensor | None = None, ema: float = 0.9, steps: int = 1) -> float:
        """Score the SM on fresh ``(p, loss)`` pairs (updating ``error_ema``), then fit them (``steps`` MSE steps).

        Returns the relative error ``|SM - loss| / scale`` (``scale`` defaults to ``loss``: pass the total LM loss
        when the SM predicts a part of it) measured before fitting."""
        p, loss = p.detach(), loss.detach().float()
        scale = (loss if scale is None else scale.detach().float()).abs().clamp(min=1e-6)
        if self.error_ema is None:
            self.loss_offset.fill_(float(loss.mean()))
        with torch.no_grad():
            err = float(((self(p) - loss).abs() / scale).mean())
        self.error_ema = err if self.error_ema is None else ema * self.error_ema + (1 - ema) * err
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.mse_loss(self(p), loss).backward()
            optimizer.step()
        return err

    def trusted(self, threshold: float) -> bool:
        """True while the SM's running relative error is under ``threshold`` (the router-update gate)."""
        return self.error_ema is not None and self.error_ema < threshold
