"""Latency-aware routers: static (a target -> per-layer widths) and input-adaptive (per-token MLP widths, per-sequence
head counts), trained through a surrogate model (SM) with Gumbel-softmax and a latency loss.

Target encoding: a latency target ``t`` (a fraction of the full model's predicted latency) is encoded as the linear
interpolation between the one-hots of its two neighbouring anchors (0.2, 0.3, ..., 1.0), as in NVIDIA's descendant
router code.

- :class:`StaticRouter`: ``enc(t) -> Linear -> LeakyReLU(0.1) -> per layer: logits over MLP widths, logits over
  head counts``. One subnet per target.
- :class:`DynamicRouter`: per layer, an MLP-width router reading ``[layernorm(x_token), enc(t)]`` (``x`` the MLP
  block's input) and a head router reading ``[layernorm(mean_s x_s), enc(t)]`` (the attention block's input,
  mean-pooled over the sequence): heads are chosen per sequence at prefill and kept for decode, so the KV cache
  stays valid; MLP widths per token run in the grouped ``nested_mlp`` launches.

Training (:func:`train_routers`; Flextron Fig. 3; the details the figure leaves open are choices of this package):

1. SM phase, LLM frozen. Each step draws a target per sequence, samples choices with hard Gumbel-softmax at an
   annealed temperature (exponential ``tau0 -> tau1``), runs the LLM on the sampled sub-network (each sequence its
   own), and records each sequence's LM loss. The SM is scored on these fresh samples and then fitted to them. After
   ``sm_warmup`` steps, and only while the SM's running relative error is under ``sm_threshold``, the routers step
   on ``SM(straight-through samples) + lam * (E[latency]/full - t)^2``, the expected latency read off the table.
2. Joint phase: the SM is dropped; routers (and, with ``lr_model > 0``, the LLM) are fine-tuned on the LM loss
   through the straight-through samples plus the same latency loss.

Sub-networks are run during training as soft masks over the full-width blocks (``a * mask`` before the down
projection, ``o_h * mask_h`` before the o-projection): for a one-hot sample this is exactly the prefix sub-network
(a masked neuron or head contributes nothing), and it lets every sequence and token of a batch have its own choice
and carry a gradient.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .attention import apply_rotary, attention_core
from .latency import LatencyTable, check_table
from .model import FlextronModel
from .space import Subnet
from .surrogate import Surrogate

ANCHORS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def check_target(target) -> float:
    """``target`` as a float in (0, 1]; ``ValueError`` naming it otherwise."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < float(target) <= 1.0 \
            or math.isnan(float(target)):
        raise ValueError(f"target must be a latency fraction in (0, 1], got {target!r}")
    return float(target)


def encode_target(t: torch.Tensor, anchors=ANCHORS) -> torch.Tensor:
    """``t [...]`` -> ``[..., len(anchors)]``: linear interpolation between the neighbouring anchors' one-hots."""
    a = torch.tensor(anchors, dtype=torch.float32, device=t.device)
    t = t.float().clamp(a[0], a[-1])
    hi = torch.searchsorted(a, t.contiguous()).clamp(1, len(anchors) - 1)
    lo = hi - 1
    w = ((t - a[lo]) / (a[hi] - a[lo])).unsqueeze(-1)
    return F.one_hot(lo, len(anchors)) * (1 - w) + F.one_hot(hi, len(anchors)) * w


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, d_out))


class _Router(nn.Module):
    kind = ""

    def __init__(self, mlp_choices: list[list[int]], head_choices: list[list[int]], hidden: int) -> None:
        super().__init__()
        self.mlp_choices = [list(map(int, c)) for c in mlp_choices]
        self.head_choices = [list(map(int, c)) for c in head_choices]
        self.hidden = hidden

    @property
    def num_layers(self) -> int:
        return len(self.mlp_choices)

    def config(self) -> dict:
        return {"kind": self.kind, "mlp_choices": self.mlp_choices, "head_choices": self.head_choices,
                "hidden": self.hidden, **self._extra_config()}

    def _extra_config(self) -> dict:
        return {}

    def check(self, fm: FlextronModel) -> None:
        """``ValueError`` unless the router's choices are the model's space, layer by layer."""
        if self.num_layers != fm.num_layers:
            raise ValueError(f"routers were built for {self.num_layers} layers, the model has {fm.num_layers}")
        for i in range(fm.num_layers):
            for name, mine, theirs in (("mlp", self.mlp_choices[i], fm.mlp_choices(i)),
                                       ("heads", self.head_choices[i], fm.head_choices(i))):
                if mine != theirs:
                    raise ValueError(f"routers do not match the model's space: layer {i} {name} choices are "
                                     f"{mine} in the routers, {theirs} in the model")


class StaticRouter(_Router):
    """Latency target -> per-layer logits over MLP widths and head counts."""

    kind = "static"

    def __init__(self, mlp_choices, head_choices, hidden: int = 64) -> None:
        super().__init__(mlp_choices, head_choices, hidden)
        self.body = nn.Sequential(nn.Linear(len(ANCHORS), hidden), nn.LeakyReLU(0.1))
        self.mlp_heads = nn.ModuleList(nn.Linear(hidden, len(c)) for c in self.mlp_choices)
        self.attn_heads = nn.ModuleList(nn.Linear(hidden, len(c)) for c in self.head_choices)

    def forward(self, target: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``target [B]`` -> (per layer MLP logits ``[B, C]``, per layer head logits ``[B, C]``)."""
        z = self.body(encode_target(target.to(self.body[0].weight.device)))
        return [h(z) for h in self.mlp_heads], [h(z) for h in self.attn_heads]

    @torch.no_grad()
    def choose(self, target: float) -> Subnet:
        """The argmax subnet for ``target``."""
        t = torch.tensor([check_target(target)])
        ml, hl = self(t)
        return Subnet(mlp=[c[int(x.argmax())] for c, x in zip(self.mlp_choices, ml)],
                      heads=[c[int(x.argmax())] for c, x in zip(self.head_choices, hl)])


class DynamicRouter(_Router):
    """Per layer: token hidden state + target -> MLP width logits; pooled sequence state + target -> head logits."""

    kind = "dynamic"

    def __init__(self, mlp_choices, head_choices, hidden_size: int, hidden: int = 32, calibration=None) -> None:
        super().__init__(mlp_choices, head_choices, hidden)
        self.hidden_size = hidden_size
        # [[router input, realised predicted latency fraction], ...] from budget.calibrate_adaptive, or None.
        self.calibration = None if calibration is None else [[float(a), float(b)] for a, b in calibration]
        d = hidden_size + len(ANCHORS)
        self.mlp_routers = nn.ModuleList(_mlp(d, hidden, len(c)) for c in self.mlp_choices)
        self.head_routers = nn.ModuleList(_mlp(d, hidden, len(c)) for c in self.head_choices)

    def _extra_config(self) -> dict:
        return {"hidden_size": self.hidden_size, **({"calibration": self.calibration} if self.calibration else {})}

    def _inp(self, x: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.detach().float(), x.shape[-1:])
        return torch.cat([x, enc.expand(*x.shape[:-1], enc.shape[-1])], -1)

    def mlp_logits(self, layer: int, x: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        """``x [B, S, H]``, ``enc [B, K]`` -> ``[B, S, C]``."""
        return self.mlp_routers[layer](self._inp(x, enc[:, None, :]))

    def head_logits(self, layer: int, x: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        """``x [B, S, H]`` (pooled over S), ``enc [B, K]`` -> ``[B, C]``."""
        return self.head_routers[layer](self._inp(x.mean(1), enc))


def build_router(config: dict) -> _Router:
    kind = config.get("kind")
    if kind == "static":
        return StaticRouter(config["mlp_choices"], config["head_choices"], config["hidden"])
    if kind == "dynamic":
        return DynamicRouter(config["mlp_choices"], config["head_choices"], config["hidden_size"], config["hidden"],
                             config.get("calibration"))
    raise ValueError(f"router config kind must be 'static' or 'dynamic', got {kind!r}")


# -- soft-masked sub-networks (training) ------------------------------------------------------------
def prefix_masks(choices: list[int], full: int, device=None) -> torch.Tensor:
    """``[C, full]``: row ``j`` keeps the first ``choices[j]`` units."""
    c = torch.tensor(choices, device=device)
    return (torch.arange(full, device=device)[None, :] < c[:, None]).float()


def _masked_mlp(m, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    up, down = getattr(m, m._up), getattr(m, m._down)
    h = F.linear(x, m.up_weight(), up.bias)
    a = getattr(m, m._act)(F.linear(x, m.gate_weight(), m.gate_proj.bias)) * h if m.gated else getattr(m, m._act)(h)
    return F.linear(a * mask.to(a.dtype), m.down_weight(), down.bias)


def _masked_attention(a, x: torch.Tensor, mask: torch.Tensor, position_embeddings, attention_mask) -> torch.Tensor:
    """Full-head attention with each head's output scaled by ``mask [B, Hq]`` (training only: no cache)."""
    h, d, kv = a.num_heads, a.head_dim, a.num_kv_heads
    (wq, bq), (wk, bk), (wv, bv) = a.qkv_weights()
    shape = x.shape[:-1]
    q = F.linear(x, wq, bq).view(*shape, h, d).transpose(1, 2)
    k = F.linear(x, wk, bk).view(*shape, kv, d).transpose(1, 2)
    v = F.linear(x, wv, bv).view(*shape, kv, d).transpose(1, 2)
    if position_embeddings is not None:
        q, k = apply_rotary(q, k, *position_embeddings)
    o = attention_core(q, k, v, attention_mask, scaling=a.scaling)  # [B, S, h, D]
    o = o * mask[:, None, :, None].to(o.dtype)
    return F.linear(o.reshape(*shape, h * d), a.out_weight(), a.out_proj().bias)


class _Sampler:
    """Draws the choices of one training forward and keeps what the losses need (per layer, per sequence):
    ``y`` straight-through samples ``[B, C]`` (token means for per-token MLP choices), ``p`` probabilities."""

    def __init__(self, router: _Router, fm: FlextronModel, enc: torch.Tensor, tau: float, hard: bool,
                 detach_masks: bool, statics=None) -> None:
        self.router, self.enc, self.tau, self.hard, self.detach = router, enc, tau, hard, detach_masks
        dev = enc.device
        self.mlp_masks = [prefix_masks(c, m.full_width, dev) for c, m in zip(router.mlp_choices, fm.mlp_blocks)]
        self.head_masks = [prefix_masks(c, a.num_heads, dev) for c, a in zip(router.head_choices, fm.attention_blocks)]
        n = router.num_layers
        self.y_mlp, self.p_mlp, self.y_head, self.p_head = [None] * n, [None] * n, [None] * n, [None] * n
        self.statics = statics  # (mlp logits, head logits) of a static router, or None

    def _sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = F.gumbel_softmax(logits, tau=self.tau, hard=self.hard, dim=-1)
        return y, F.softmax(logits, -1)

    def mlp_mask(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            if self.statics is not None:
                y, p = self._sample(self.statics[0][layer])  # [B, C]
                self.y_mlp[layer], self.p_mlp[layer] = y, p
                y = y[:, None, :]
            else:
                y, p = self._sample(self.router.mlp_logits(layer, x, self.enc))  # [B, S, C]
                self.y_mlp[layer], self.p_mlp[layer] = y.mean(1), p.mean(1)
            mask = y @ self.mlp_masks[layer]
        return mask.detach() if self.detach else mask

    def head_mask(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            logits = self.statics[1][layer] if self.statics is not None else self.router.head_logits(layer, x, self.enc)
            y, p = self._sample(logits)
            self.y_head[layer], self.p_head[layer] = y, p
            mask = y @ self.head_masks[layer]
        return mask.detach() if self.detach else mask

    def entropy(self) -> torch.Tensor:
        """Mean entropy of the routers' distributions (pushes them to commit, so argmax ~ sample ~ expectation)."""
        ps = self.p_mlp + self.p_head
        return sum(-(p * p.clamp(min=1e-9).log()).sum(-1).mean() for p in ps) / len(ps)

    def sm_input(self) -> torch.Tensor:
        return torch.cat(self.y_mlp + self.y_head, -1)


@contextlib.contextmanager
def routed(fm: FlextronModel, sampler: _Sampler):
    """Run ``fm``'s blocks as soft-masked full-width blocks whose masks ``sampler`` draws."""
    for i, (m, a) in enumerate(zip(fm.mlp_blocks, fm.attention_blocks)):
        m.forward = lambda x, widths=None, i=i, m=m: _masked_mlp(m, x, sampler.mlp_mask(i, x))

        def attn_forward(hidden_states, position_embeddings=None, attention_mask=None, *args, i=i, a=a, **kw):
            return _masked_attention(a, hidden_states, sampler.head_mask(i, hidden_states), position_embeddings,
                                     attention_mask), None

        a.forward = attn_forward
    try:
        yield
    finally:
        for m, a in zip(fm.mlp_blocks, fm.attention_blocks):
            del m.forward
            del a.forward


# -- training ---------------------------------------------------------------------------------------
@dataclass
class RouterTrainConfig:
    sm_steps: int = 400  # SM phase (routers step through the SM once it is trusted)
    sm_warmup: int = 60  # SM-only steps at the start
    joint_steps: int = 100  # joint fine-tuning (SM dropped)
    batch_size: int = 16  # sequences per step, each with its own target
    target_range: tuple = (0.35, 1.0)
    tau0: float = 5.0
    tau1: float = 0.3
    lam: float = 20.0  # weight of the latency loss (E[lat]/full - t)^2
    entropy: float = 0.05  # entropy penalty (ramped up over the SM phase, full in the joint phase)
    sm_threshold: float = 0.05  # routers step only while the SM's running relative error is under this
    lr_router: float = 3e-3
    lr_sm: float = 1e-3
    lr_model: float = 0.0  # > 0: fine-tune the LLM in the joint phase too
    seed: int = 0
    log_every: int = 50


def _tau(cfg: RouterTrainConfig, step: int, total: int) -> float:
    return cfg.tau0 * (cfg.tau1 / cfg.tau0) ** min(1.0, step / max(1, total - 1))


def _seq_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean next-token cross-entropy ``[B]``."""
    lg = logits[:, :-1].float()
    ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return ce.view(ids.shape[0], -1).mean(1)


def train_routers(fm: FlextronModel, router: _Router, table: LatencyTable, windows: torch.Tensor,
                  cfg: RouterTrainConfig | None = None, *, progress: bool = False) -> list[dict]:
    """Train ``router`` (static or dynamic) for ``fm`` against ``table`` on token ``windows [N, S]``.

    Returns the log: one record per ``log_every`` steps with the phase, temperature, SM error, LM loss, and
    expected vs requested latency. The LLM stays frozen unless ``cfg.lr_model > 0`` (joint phase only).
    """
    from tqdm.auto import tqdm

    cfg = cfg or RouterTrainConfig()
    router.check(fm)
    check_table(table, fm, check_device=False)  # a router may be trained here for another device's table
    device = next(fm.model.parameters()).device
    router.to(device)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    full = table.full_ms()
    mt, at = table.tensors(device)
    n_in = sum(len(c) for c in router.mlp_choices) + sum(len(c) for c in router.head_choices)
    sm = Surrogate(n_in).to(device)
    opt_sm = torch.optim.Adam(sm.parameters(), lr=cfg.lr_sm)
    opt_r = torch.optim.Adam(router.parameters(), lr=cfg.lr_router)
    params = [p for p in fm.model.parameters() if p.requires_grad]
    was_training, flags = fm.training, [p.requires_grad for p in params]
    fm.eval()  # no dropout; grads still flow
    for p in fm.model.parameters():
        p.requires_grad_(False)
    opt_m = None
    log: list[dict] = []
    router_steps = 0  # SM-phase steps on which the SM was trusted and the routers stepped
    total = cfg.sm_steps + cfg.joint_steps
    bar = tqdm(total=total, desc=f"route {router.kind}", disable=not progress, leave=False)

    def expected_fraction(s: _Sampler) -> torch.Tensor:
        e = table.fixed_ms + sum((s.p_mlp[i] * mt[i]).sum(-1) + (s.p_head[i] * at[i]).sum(-1)
                                 for i in range(router.num_layers))
        return e / full

    try:
        for step in range(total):
            joint = step >= cfg.sm_steps
            if joint and cfg.lr_model > 0 and opt_m is None:
                for p in params:
                    p.requires_grad_(True)
                opt_m = torch.optim.AdamW(params, lr=cfg.lr_model, weight_decay=0.0)
            tau = _tau(cfg, step, cfg.sm_steps) if not joint else cfg.tau1
            idx = rng.integers(0, windows.shape[0], cfg.batch_size)
            ids = windows[torch.as_tensor(idx)].to(device)
            t = torch.as_tensor(rng.uniform(*cfg.target_range, cfg.batch_size), dtype=torch.float32, device=device)
            enc = encode_target(t)
            statics = router(t) if isinstance(router, StaticRouter) else None
            s = _Sampler(router, fm, enc, tau, hard=True, detach_masks=not joint, statics=statics)
            rec = {"step": step, "phase": "joint" if joint else "sm", "tau": tau}
            if not joint:
                with torch.no_grad():
                    base = _seq_ce(fm(input_ids=ids, use_cache=False).logits, ids)  # the full model's loss
                    with routed(fm, s):
                        loss = _seq_ce(fm(input_ids=ids, use_cache=False).logits, ids)
                # The SM predicts the loss a subnet adds to the full model's on the same text: the text's own
                # difficulty (which the router outputs cannot know) is not its job.
                err = sm.observe(s.sm_input(), loss - base, opt_sm, scale=loss)
                rec.update(lm_loss=float(loss.mean()), sm_error=err, sm_error_ema=sm.error_ema)
                if step >= cfg.sm_warmup and sm.trusted(cfg.sm_threshold):
                    ef = expected_fraction(s)
                    r_loss = sm(s.sm_input()).mean() + cfg.lam * ((ef - t) ** 2).mean() \
                        + cfg.entropy * (step / max(1, cfg.sm_steps)) * s.entropy()
                    opt_r.zero_grad(set_to_none=True)
                    r_loss.backward()
                    opt_r.step()
                    rec["router_step"] = True
                    router_steps += 1
            else:
                with routed(fm, s):
                    loss = _seq_ce(fm(input_ids=ids, use_cache=False).logits, ids)
                ef = expected_fraction(s)
                total_loss = loss.mean() + cfg.lam * ((ef - t) ** 2).mean() + cfg.entropy * s.entropy()
                opt_r.zero_grad(set_to_none=True)
                if opt_m:
                    opt_m.zero_grad(set_to_none=True)
                total_loss.backward()
                opt_r.step()
                if opt_m:
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt_m.step()
                rec.update(lm_loss=float(loss.detach().mean()))
            with torch.no_grad():
                rec["expected_minus_target"] = float((expected_fraction(s) - t).mean())
            rec["router_steps_so_far"] = router_steps
            if step % cfg.log_every == 0 or step == total - 1:
                log.append(rec)
                bar.set_postfix_str(f"{rec['phase']} loss {rec['lm_loss']:.3f} sm_err {sm.error_ema or 0:.3f}")
            bar.update(1)
    finally:
        bar.close()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        fm.train(was_training)
    router.eval()
    return log
