"""Grouping policies: who decides, per forward, how many query heads each KV head serves.

A policy turns the key-head norms of one layer into a :class:`Grouping`. It owns whatever state it needs
(DGQA's window statistics and allocation history live in buffers, so they travel in the state dict) and any
randomness comes from a generator it owns, never from the global RNG.

``compat="paper"`` follows the paper (``docs/method.md``: the spec, with every place the authors' code departs
from the paper); ``compat="official"`` reproduces the authors' code, quirks included, for replication, except
that it never hangs or produces NaN.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Type

import torch
from torch import Tensor, nn

from .apportion import (
    largest_remainder,
    min_max_shares,
    normalise_shares,
    official_round,
    query_to_kv,
    uniform_allocation,
)
from .rules import BOOLEAN, Rule, integer, number, one_of

__all__ = [
    'Grouping', 'GroupingPolicy', 'MHAPolicy', 'GQAPolicy', 'KDGQAPolicy', 'DGQAPolicy', 'PGQAPolicy',
    'POLICIES', 'create_policy', 'start_epoch',
]

COMPAT_MODES = ('paper', 'official')


@dataclass
class Grouping:
    """One forward's grouping of a layer.

    allocation: ``(G,)`` shared by the batch or ``(B, G)`` per sample; query heads per KV head.
    query_to_kv: the KV head of every query head, ``(H,)`` or ``(B, H)``.
    shares: the normalised ratios the allocation was apportioned from, same shape as ``allocation``.
    uniform: the grouping is the uniform one (H / G consecutive query heads per KV head), which the fused
        kernel runs natively (``enable_gqa``) without routing K/V through ``query_to_kv``.
    """
    allocation: Tensor
    query_to_kv: Tensor
    shares: Tensor
    uniform: bool = False


class GroupingPolicy(nn.Module):
    """Base class. Subclasses set ``name`` and their capabilities, declare their ``OPTIONS`` and override
    :meth:`forward`.

    Capabilities, so no caller needs to switch on a policy's name:
    ``uses_key_norms`` -- the grouping is computed from the keys' norms;
    :attr:`fixed_at_inference` -- one grouping serves every input in eval mode (the layer is then exactly a
    multi-head attention with repeated K/V heads); :meth:`allocation_history` -- how the grouping changed in
    training.
    """
    name: str = ''
    uses_key_norms: bool = False
    # Each constructor option as configs and command lines may give it (:mod:`gqa_core.core.rules`): the single
    # description of an option, read by config validation and by the trainer.
    OPTIONS: Dict[str, Rule] = {
        'compat': one_of(*COMPAT_MODES),
        'seed': integer(0, 2**31 - 1),
    }

    def __init__(self, num_heads: int, num_kv_heads: int, compat: str = 'paper', seed: int = 0) -> None:
        super().__init__()
        GroupingPolicy.check_options(dict(compat=compat, seed=seed))
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(
                f'{self.name}: num_kv_heads={num_kv_heads} must be a positive divisor of num_heads={num_heads}')
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.compat = compat
        self.seed = seed
        self.stream = 0  # set per layer by convert(), so layers draw different noise from one seed
        self._generators: Dict[torch.device, torch.Generator] = {}
        self.register_buffer('uniform', uniform_allocation(num_heads, num_kv_heads), persistent=False)
        self.register_buffer('uniform_index', query_to_kv(self.uniform, num_heads), persistent=False)

    @classmethod
    def check_options(cls, options: Dict[str, Any]) -> Dict[str, Any]:
        """``options`` checked against :attr:`OPTIONS` (configs are data); ValueError naming the first bad one."""
        for key, value in options.items():
            if key not in cls.OPTIONS:
                raise ValueError(f'{cls.name}: bad policy options {sorted(options)}: {key!r} is not one '
                                 f'(allowed: {", ".join(sorted(cls.OPTIONS))})')
            if not cls.OPTIONS[key](value):
                raise ValueError(f'{cls.name or "policy"}: {key} must be {cls.OPTIONS[key].says}, got {value!r}')
        return dict(options)

    # -- capabilities ---------------------------------------------------------------------------------------
    @property
    def fixed_at_inference(self) -> bool:
        """True when, in eval mode, the grouping does not depend on the input."""
        return True

    @property
    def consecutive_at_inference(self) -> bool:
        """True when, in eval mode, every input gets the consecutive grouping (query head h reads KV head
        h // (H / G)): the one timm's ``num_kv_heads`` and a plain repetition of each KV head express."""
        return self.fixed_at_inference and torch.equal(getattr(self, 'allocation', self.uniform), self.uniform)

    def allocation_history(self) -> Optional[Tuple[Tensor, Tensor]]:
        """``(steps, allocations)`` of every training-time change, or None for a policy that never changes."""
        return None

    def wants_key_norms(self) -> bool:
        """Whether this forward reads the key norms (a frozen grouping does not: the layer skips computing them)."""
        return self.uses_key_norms

    # -- randomness -----------------------------------------------------------------------------------------
    def generator(self, device: torch.device) -> torch.Generator:
        """The policy's own generator for ``device``, seeded from ``seed`` on first use."""
        device = torch.device(device)
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed * 100_003 + self.stream)
        return self._generators[device]

    # -- the grouping -----------------------------------------------------------------------------------------
    def uniform_grouping(self) -> Grouping:
        shares = self.uniform.float() / self.num_heads
        return Grouping(self.uniform, self.uniform_index, shares, uniform=True)

    def forward(self, key_norms: Optional[Tensor]) -> Grouping:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- hooks for PGQA; identity for everyone else -------------------------------------------------------------
    def perturbs_attention_map(self) -> bool:
        """True when this forward needs the explicit post-softmax map (no fused kernel)."""
        return False

    def perturb_attention_map(self, attn: Tensor) -> Tensor:
        return attn

    def perturb_output(self, out: Tensor) -> Tensor:
        return out

    def options(self) -> Dict[str, Any]:
        """Constructor options beyond the head counts, for saving and re-creating the policy."""
        return {}

    def config(self) -> Dict[str, Any]:
        return dict(variant=self.name, num_kv_heads=self.num_kv_heads, compat=self.compat, seed=self.seed,
                    **self.options())

    def extra_repr(self) -> str:
        return ', '.join(f'{k}={v}' for k, v in self.config().items())


class MHAPolicy(GroupingPolicy):
    """Multi-head attention: every query head has its own KV head (G = H)."""
    name = 'mha'

    def __init__(self, num_heads: int, num_kv_heads: Optional[int] = None, **kwargs: Any) -> None:
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads != num_heads:
            raise ValueError(f'mha: num_kv_heads must equal num_heads={num_heads}, got {num_kv_heads}')
        super().__init__(num_heads, num_kv_heads, **kwargs)

    def forward(self, key_norms: Optional[Tensor]) -> Grouping:
        return self.uniform_grouping()


class GQAPolicy(GroupingPolicy):
    """Static uniform groups of H / G consecutive query heads (Ainslie et al. 2023)."""
    name = 'gqa'

    def forward(self, key_norms: Optional[Tensor]) -> Grouping:
        return self.uniform_grouping()


class KDGQAPolicy(GroupingPolicy):
    """Key-driven GQA: every forward, KV heads with larger key norms serve more query heads.

    paper: per sample -- each image gets its own allocation from its own keys, so a prediction never
    depends on the rest of the batch. official: one allocation per batch from batch-summed norms, with the
    authors' rounding.
    """
    name = 'kdgqa'
    uses_key_norms = True

    @property
    def fixed_at_inference(self) -> bool:
        return False  # every image (paper) or batch (official) gets its own allocation

    def forward(self, key_norms: Optional[Tensor]) -> Grouping:
        assert key_norms is not None
        if self.compat == 'official':
            shares = min_max_shares(key_norms.sum(0))
            allocation = official_round(shares, self.num_heads)
        else:
            shares = min_max_shares(key_norms)
            allocation = largest_remainder(shares, self.num_heads)
        return Grouping(allocation, query_to_kv(allocation, self.num_heads), shares)


class DGQAPolicy(GroupingPolicy):
    """Dynamic GQA: the allocation follows key-norm dynamics during training, fixed within a window.

    paper: a global step counter; every ``window`` training steps the allocation is recomputed from
    ``stat`` -- ``"diff"``: |batch-mean key norms now - at the previous window start|, or ``"ema"``: the
    recursive ``ema <- beta * ema + (1 - beta) * norms`` updated every training step. Frozen in eval.
    The allocation, the statistics and the allocation history (with the step of each change) are buffers.

    official: the authors' code -- step restarting every epoch (call :func:`start_epoch`), the cache update
    ``c <- (c + m) / W``, the non-recursive "EMA" ``0.9 m + 0.1 c``, random sum repair, and recomputation
    from every eval batch (which mutates state in eval: that is their behaviour, reproduced on purpose).
    """
    name = 'dgqa'
    uses_key_norms = True
    OPTIONS = {
        **GroupingPolicy.OPTIONS,
        'stat': one_of('diff', 'ema'),
        'window': integer(1, 10**9),
        'beta': number(0, 1, high_open=True),
    }

    @property
    def fixed_at_inference(self) -> bool:
        return self.compat == 'paper'  # official mode recomputes from every eval batch

    def allocation_history(self) -> Optional[Tuple[Tensor, Tensor]]:
        return self.history_steps, self.history

    def wants_key_norms(self) -> bool:
        return self.training or self.compat == 'official'  # paper eval: the allocation is frozen

    def __init__(
            self,
            num_heads: int,
            num_kv_heads: int,
            stat: str = 'ema',
            window: int = 300,
            beta: float = 0.9,
            **kwargs: Any,
    ) -> None:
        super().__init__(num_heads, num_kv_heads, **kwargs)
        self.check_options(dict(stat=stat, window=window, beta=beta))
        self.stat, self.window, self.beta = stat, int(window), float(beta)
        self.register_buffer('allocation', self.uniform.clone())
        self.register_buffer('shares', self.uniform.float() / num_heads)
        self.register_buffer('step', torch.zeros((), dtype=torch.long))
        self.register_buffer('reference', torch.zeros(num_kv_heads))  # diff: norms at window start; official: cache c
        self.register_buffer('ema', torch.zeros(num_kv_heads))
        self.register_buffer('history', self.uniform[None].clone())  # (changes, G)
        self.register_buffer('history_steps', torch.zeros(1, dtype=torch.long))
        self._step = 0  # host mirror of `step`: window decisions without a device sync
        self._eval_grouping: Optional[Grouping] = None

    def options(self) -> Dict[str, Any]:
        return dict(stat=self.stat, window=self.window, beta=self.beta)

    def start_epoch(self) -> None:
        """Official mode counts steps within an epoch (the authors' batch index); paper mode ignores this."""
        if self.compat == 'official':
            self._step = 0
            self.step.zero_()

    def _set_allocation(self, shares: Tensor, allocation: Tensor) -> None:
        self.shares.copy_(shares)
        self.allocation.copy_(allocation)
        if self.training:  # the history is of training; official eval recomputes every batch
            self.history = torch.cat([self.history, allocation[None]])
            self.history_steps = torch.cat([self.history_steps, self.step.reshape(1)])
        self._eval_grouping = None

    def _official_allocation(self, weights: Tensor) -> tuple:
        """round(shares * H) then the authors' random repair: while too many, decrement a uniformly chosen
        non-empty KV head; while too few, increment a uniformly chosen one. Bounded: rounding is off by at
        most G / 2 in total."""
        shares = normalise_shares(weights)
        allocation = torch.round(shares * self.num_heads).long()
        gen = self.generator(allocation.device)
        for _ in range(self.num_kv_heads // 2 + 1):
            excess = allocation.sum() - self.num_heads
            score = torch.rand(allocation.shape, generator=gen, device=allocation.device)
            down = torch.where(allocation > 0, score, torch.full_like(score, -1.0)).argmax()
            allocation = allocation.index_add(0, down[None], -(excess > 0).long()[None])
            allocation = allocation.index_add(0, score.argmax()[None], (excess < 0).long()[None])
        return shares, allocation

    def _official_weights(self, m: Tensor) -> Tensor:
        if self.stat == 'diff':
            return (self.reference - m).abs()
        return 0.9 * m + 0.1 * self.reference

    @staticmethod
    def _across_processes(stat: Tensor, op: str) -> Tensor:
        """Under data parallelism every process must take the same decision: combine the batch statistic
        over all processes (one all-reduce of G floats; training only)."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return stat
        stat = stat.clone()
        dist.all_reduce(stat)
        return stat / dist.get_world_size() if op == 'mean' else stat

    @torch.no_grad()
    def _update(self, key_norms: Tensor) -> None:
        window_start = self._step % self.window == 0
        if self.compat == 'official':
            if not self.training or window_start:  # the batch statistic is used only here
                m = key_norms.float().sum(0)
                if self.training:
                    m = self._across_processes(m, 'sum')
                self._set_allocation(*self._official_allocation(self._official_weights(m)))
                self.reference.copy_(m if not self.training else (self.reference + m) / self.window)
            if self.training:
                self._step += 1
                self.step.add_(1)
            return

        if self.stat == 'ema' or window_start:  # diff reads the norms only at window starts
            n = self._across_processes(key_norms.float().mean(0), 'mean')
        if self.stat == 'ema':
            self.ema.copy_(n if self._step == 0 else self.beta * self.ema + (1 - self.beta) * n)
        if window_start:
            if self.stat == 'ema':
                shares = normalise_shares(self.ema)
                self._set_allocation(shares, largest_remainder(shares, self.num_heads))
            else:
                if self._step > 0:
                    shares = normalise_shares((n - self.reference).abs())
                    self._set_allocation(shares, largest_remainder(shares, self.num_heads))
                self.reference.copy_(n)
        self._step += 1
        self.step.add_(1)

    def forward(self, key_norms: Optional[Tensor]) -> Grouping:
        if self.training or self.compat == 'official':
            assert key_norms is not None
            self._update(key_norms)
            return Grouping(self.allocation, query_to_kv(self.allocation, self.num_heads), self.shares)
        if self._eval_grouping is None:
            # Frozen in eval: decide once (one host sync) whether the kernel can take it as uniform.
            uniform = bool(torch.equal(self.allocation, self.uniform))
            self._eval_grouping = Grouping(self.allocation, query_to_kv(self.allocation, self.num_heads),
                                           self.shares, uniform)
        return self._eval_grouping

    def train(self, mode: bool = True) -> 'DGQAPolicy':
        self._eval_grouping = None
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        self._eval_grouping = None  # it holds tensors of the old device / dtype
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # The history grows during training: take the saved length rather than failing on a size mismatch.
        for name in ('history', 'history_steps'):
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._check_loaded(prefix)
        self._step = int(self.step)
        self._eval_grouping = None

    def _check_loaded(self, prefix: str) -> None:
        """Saved allocations are data (a Hub repo's weights): ``ValueError`` naming the buffer unless every
        allocation gives each KV head 0..H query heads, H in all, and the history has one step per change."""
        heads, groups = self.num_heads, self.num_kv_heads
        for name, rows in (('allocation', self.allocation[None]), ('history', self.history)):
            if (rows.ndim != 2 or rows.shape[1] != groups or bool((rows < 0).any())
                    or bool((rows.sum(dim=1) != heads).any())):
                raise ValueError(f'{prefix}{name} must give each of the {groups} KV heads 0..{heads} query heads, '
                                 f'{heads} in all')
        steps = self.history_steps
        if steps.ndim != 1 or steps.shape[0] != self.history.shape[0] or bool((steps < 0).any()):
            raise ValueError(f'{prefix}history_steps must hold one step (0 or more) per row of history')


class PGQAPolicy(GroupingPolicy):
    """Perturbed GQA: uniform groups, noise subtracted to reduce similarity within a group.

    paper: Gaussian noise matched per row to the post-softmax map's mean and std, diagonal zeroed, times
    ``noise_scale``, subtracted from the map in training. ``noise_in_eval=True`` keeps it in eval, drawn
    from ``seed`` afresh every forward and shared by the batch, so evaluation stays deterministic.
    official: the authors' standardised uniform noise subtracted from the attention *outputs*, train and
    eval, computed in float32 (their version crashes in bf16).
    """
    name = 'pgqa'
    OPTIONS = {
        **GroupingPolicy.OPTIONS,
        'noise_scale': number(0, 100),
        'noise_in_eval': BOOLEAN,
    }

    @property
    def fixed_at_inference(self) -> bool:
        return self.compat == 'paper' and not self.noise_in_eval  # official noise is drawn afresh each forward

    def __init__(self, num_heads: int, num_kv_heads: int, noise_scale: float = 0.1, noise_in_eval: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(num_heads, num_kv_heads, **kwargs)
        self.check_options(dict(noise_scale=noise_scale, noise_in_eval=noise_in_eval))
        self.noise_scale = float(noise_scale)
        self.noise_in_eval = bool(noise_in_eval)

    def options(self) -> Dict[str, Any]:
        return dict(noise_scale=self.noise_scale, noise_in_eval=self.noise_in_eval)

    def forward(self, key_norms: Optional[Tensor]) -> Grouping:
        return self.uniform_grouping()

    def perturbs_attention_map(self) -> bool:
        return self.compat == 'paper' and self.noise_scale > 0 and (self.training or self.noise_in_eval)

    def perturb_attention_map(self, attn: Tensor) -> Tensor:
        B, H, T, _ = attn.shape
        if self.training:
            z = torch.randn(attn.shape, generator=self.generator(attn.device), device=attn.device)
        else:
            gen = torch.Generator(device=attn.device).manual_seed(self.seed * 100_003 + self.stream)
            z = torch.randn((1, H, T, T), generator=gen, device=attn.device)
        a = attn.float()
        noise = z * a.std(-1, keepdim=True) + a.mean(-1, keepdim=True)
        noise = noise * (1 - torch.eye(T, device=attn.device))
        return (a - self.noise_scale * noise).to(attn.dtype)

    def perturb_output(self, out: Tensor) -> Tensor:
        if self.compat != 'official':
            return out
        B, H, T, d = out.shape
        G, g = self.num_kv_heads, H // self.num_kv_heads
        o = out.float().reshape(B, G, g, T * d)
        u = torch.rand((G, g, T * d), generator=self.generator(out.device), device=out.device)
        eye = torch.eye(g, T * d, device=out.device)
        u = u * (1 - eye)
        std = u.std(-1, keepdim=True)
        u = (u - u.mean(-1, keepdim=True)) / torch.where(std == 0, torch.ones_like(std), std)
        noise = u * o.std(-1, keepdim=True) + o.mean(-1, keepdim=True)
        return (o - noise).reshape(B, H, T, d).to(out.dtype)


POLICIES: Dict[str, Type[GroupingPolicy]] = {
    p.name: p for p in (MHAPolicy, GQAPolicy, KDGQAPolicy, DGQAPolicy, PGQAPolicy)
}


def create_policy(variant: str, num_heads: int, num_kv_heads: Optional[int], **options: Any) -> GroupingPolicy:
    """Build a policy by name; unknown names and options raise ``ValueError`` naming them."""
    if variant not in POLICIES:
        raise ValueError(f'unknown variant {variant!r}; choose one of {sorted(POLICIES)}')
    if num_kv_heads is None and variant != 'mha':
        raise ValueError(f'{variant}: num_kv_heads is required')
    POLICIES[variant].check_options(options)
    return POLICIES[variant](num_heads, num_kv_heads, **options)


def start_epoch(model: nn.Module) -> None:
    """Tell every policy in ``model`` that an epoch starts (only official-mode DGQA cares)."""
    for module in model.modules():
        if isinstance(module, DGQAPolicy):
            module.start_epoch()
