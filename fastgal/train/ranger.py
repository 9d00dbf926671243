"""fastai's `ranger` (RAdam + Lookahead, fastai's defaults) stepped over flat buffers.

    learn = Learner(dls, model, opt_func=Ranger)   # where the seed passes opt_func=ranger
    fastgal train shards/synth --opt ranger         # the default; --opt fastai-ranger runs fastai's own

Why: fastai's ranger runs ~20 tensor ops per parameter tensor per step (2,442 for xresnet34, each a
kernel launch on a GPU, ~6 ms of host time). Here a step is ~12 ops over one flat buffer, with the
same arithmetic; tests/test_ranger.py checks the parameters against fastai's within 1e-5 over 30
steps, across Lookahead syncs and under a one-cycle schedule.
"""

from __future__ import annotations

import math

import torch
from fastai.optimizer import Optimizer, debias, ranger
from fastcore.foundation import L
from torch import nn


def _dense(t: torch.Tensor) -> bool:
    """True when t's elements fill a block of numel() slots exactly (contiguous, channels_last, ...)."""
    expect = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size != 1 and stride != expect:
            return False
        expect *= size
    return True


class _FlatPlan:
    """Parameters and Ranger's state as views into one flat buffer each, and a flat buffer the step copies
    the gradients into (one multi-tensor copy), so that each step of the update is one tensor op over
    every parameter (one kernel on a GPU, one loop on a CPU).

    Built when every parameter has (or had, see Ranger.zero_grad) a gradient, with one dtype and device
    and dense strides; laid out group by group, weight-decayed parameters first in each group. `valid()`
    says whether every parameter is still the view it was given (a model moved to another device or
    memory format replaces them; the optimizer then builds a new plan).
    """

    def __init__(self, opt: "Ranger"):
        params = [p for pg in opt.param_lists for p in pg]
        p0 = params[0]
        opt._had_grad.update(id(p) for p in params)
        self.groups, order, off = [], [], 0  # groups: (start, end of weight-decayed, end)
        for pg in opt.param_lists:
            sts = [opt.state.setdefault(p, {}) for p in pg]
            wd = [p for p, st in zip(pg, sts) if st.get("do_wd", True)]
            rest = [p for p, st in zip(pg, sts) if not st.get("do_wd", True)]
            start = off
            off += sum(p.numel() for p in wd)
            mid = off
            off += sum(p.numel() for p in rest)
            self.groups.append((start, mid, off))
            order += wd + rest
        self.total = off
        kw = dict(dtype=p0.dtype, device=p0.device)
        self.P, self.G, self.A, self.S, self.W = (torch.empty(off, **kw) for _ in range(5))
        slow = {id(p): w for p, w in zip(params, (w for pg in opt.slow_weights for w in pg))}
        new_slow, off = {}, 0
        self.entries, self.order, self.gviews = [], [], []
        for p in order:
            st = opt.state[p]
            views = [buf.as_strided(p.shape, p.stride(), off) for buf in (self.P, self.G, self.A, self.S, self.W)]
            pv, gv, av, sv, wv = views
            pv.copy_(p.detach())
            if "grad_avg" in st:
                av.copy_(st["grad_avg"])
                sv.copy_(st["sqr_avg"])
            else:
                av.zero_()
                sv.zero_()
            st["grad_avg"], st["sqr_avg"] = av, sv
            wv.copy_(slow[id(p)])
            new_slow[id(p)] = wv
            p.data = pv
            self.entries.append((p, pv.data_ptr()))
            self.order.append(p)
            self.gviews.append(gv)
            off += p.numel()
        opt.slow_weights = L(L(new_slow[id(p)] for p in pg) for pg in opt.param_lists)
        self.version = opt._version

    @staticmethod
    def fits(opt: "Ranger") -> bool:
        params = [p for pg in opt.param_lists for p in pg]
        if not params or any(p.grad is None and id(p) not in opt._had_grad for p in params):
            return False
        p0 = params[0]
        if any(p.dtype != p0.dtype or p.device != p0.device or not _dense(p) for p in params):
            return False
        for pg in opt.param_lists:  # one step count per group (fastai keeps one per parameter)
            if len({opt.state.setdefault(p, {}).get("step", 0) for p in pg}) > 1:
                return False
        return True

    def valid(self, opt: "Ranger") -> bool:
        if self.version != opt._version:
            return False
        for p, ptr in self.entries:
            if p.data_ptr() != ptr:
                return False
        return True

    def load_grads(self):
        """This step's gradients into G; a parameter without one this step counts as a zero gradient
        (what fastai's optimizer sees: it zeroes gradients in place instead of dropping them)."""
        grads = [p.grad for p in self.order]
        if all(g is not None for g in grads):
            torch._foreach_copy_(self.gviews, grads)
            return
        have = [(v, g) for v, g in zip(self.gviews, grads) if g is not None]
        if have:
            torch._foreach_copy_([v for v, _ in have], [g for _, g in have])
        for v, g in zip(self.gviews, grads):
            if g is None:
                v.zero_()


def _radam_scalars(mom, sqr_mom, step):
    """radam_step's scalars: (debias1, debias2, v or None when the update is not rectified)."""
    debias1 = debias(mom, 1 - mom, step)
    debias2 = debias(sqr_mom, 1 - sqr_mom, step)
    r_inf = 2 / (1 - sqr_mom) - 1
    r = r_inf - 2 * step * sqr_mom**step / (1 - sqr_mom**step)
    v = math.sqrt(((r - 4) * (r - 2) * r_inf) / ((r_inf - 4) * (r_inf - 2) * r)) if r > 5 else None
    return debias1, debias2, v


def _radam(params, grads, grad_avg, sqr_avg, decay, step, lr, mom, sqr_mom, eps, wd, beta):
    """One step of fastai's RAdam, op for op, over lists of tensors (torch._foreach_*): weight_decay on
    `decay` (the do_wd ones among params, or views of them), average_grad(dampening=True),
    average_sqr_grad(dampening=True), radam_step at `step` (already counted by step_stat).

    The flat plan passes one-element lists (each op then runs once over a whole buffer); the fallback
    passes the parameters themselves."""
    if decay:
        torch._foreach_mul_(decay, 1 - lr * wd)
    torch._foreach_mul_(grad_avg, mom)
    torch._foreach_add_(grad_avg, grads, alpha=1 - mom)
    torch._foreach_mul_(sqr_avg, sqr_mom)
    torch._foreach_addcmul_(sqr_avg, grads, grads, value=1 - sqr_mom)
    debias1, debias2, v = _radam_scalars(mom, sqr_mom, step)
    if v is not None:
        denom = torch._foreach_div(sqr_avg, debias2)
        torch._foreach_sqrt_(denom)
        if eps:
            torch._foreach_add_(denom, eps)
        if beta:
            denom = [nn.functional.softplus(d, beta) for d in denom]
        torch._foreach_addcdiv_(params, grad_avg, denom, value=-lr * v / debias1)
    else:
        torch._foreach_add_(params, grad_avg, alpha=-lr / debias1)


class Ranger(Optimizer):
    """fastai's `ranger` (RAdam wrapped in Lookahead), the same optimizer stepped with a few big tensor ops.

        Learner(dls, model, opt_func=Ranger)  # where fastai would take opt_func=ranger

    The arithmetic is fastai's, op for op (weight_decay, average_grad with dampening, average_sqr_grad,
    step_stat, radam_step, Lookahead.step), with fastai's defaults (mom 0.95, sqr_mom 0.99, eps 1e-6,
    wd 0.01, k 6, alpha 0.5). fastai runs ~20 ops per parameter tensor per step (2,442 for xresnet34).
    Here, on the first step the parameters and the optimizer state become views into one flat buffer
    each (`_FlatPlan`); a step copies the gradients into a flat buffer (one multi-tensor copy) and runs
    ~9 ops over the whole buffer per parameter group (3 more for the Lookahead sync every k steps). The
    arithmetic is written once, over lists of tensors (`_radam`, torch._foreach_* ops): the flat plan hands
    it one-element lists, the whole buffer each. zero_grad then drops those gradients (None, as torch's
    optimizers do), so the next backward writes fresh ones instead of adding into zeros, one kernel less
    per parameter; a parameter left without a gradient counts as a zero gradient, as in fastai, which
    zeroes in place. Where the layout does not fit (parameters that never had a gradient, e.g. frozen
    ones; mixed dtypes) `_radam` gets the parameters themselves as its lists.

    Why a fastai Optimizer subclass and not OptimWrapper(torch.optim.RAdam): Learner.create_opt marks
    norm and bias parameters `do_wd=False` (and BN `force_train`) in the optimizer's per-parameter
    state, which torch's optimizers ignore (they would decay BN weights and biases); torch's RAdam
    adds eps after dividing by the bias correction's root, fastai before; and the base class keeps
    fastai's hypers (one-cycle's lr/mom, lr_find, discriminative lr slices), freeze_to/param groups
    and state_dict in the format of fastai's Lookahead(RAdam), so a checkpoint saved with either
    optimizer loads into the other.
    """

    def __init__(self, params, lr, mom=0.95, sqr_mom=0.99, eps=1e-6, wd=0.01, beta=0.0, k=6, alpha=0.5,
                 decouple_wd=True):
        if not decouple_wd:
            raise ValueError("Ranger implements decoupled weight decay only (fastai's ranger default)")
        super().__init__(params, cbs=[], lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd, beta=beta)
        self.k, self.alpha = k, alpha
        self._version, self._plan, self.plans_built = 0, None, 0
        self._had_grad: set[int] = set()  # ids of parameters whose gradients zero_grad dropped
        self._init_state()

    def _init_state(self):
        self.count, self.slow_weights = 0, None
        self._version += 1  # any plan's state views are stale

    def _copy_weights(self):
        self.slow_weights = L(L(p.clone().detach() for p in pg) for pg in self.param_lists)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise NotImplementedError("fastai optimizers currently do not support closure")
        if self.slow_weights is None:
            self._copy_weights()
        plan = self._plan
        if plan is None or not plan.valid(self):
            plan = self._plan = _FlatPlan(self) if _FlatPlan.fits(self) else None
            self.plans_built += plan is not None
        if plan is not None:
            plan.load_grads()
            self._flat_step(plan)
        else:
            had = self._had_grad
            for pg, hyper in zip(self.param_lists, self.hypers):
                ps = [p for p in pg if p.grad is not None or id(p) in had]
                if ps:
                    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ps]
                    self._foreach_step(ps, grads, hyper)
        self.count += 1
        if self.count % self.k == 0:  # Lookahead: slow += alpha * (fast - slow); fast = slow
            if plan is not None:
                fast, slow = [plan.P], [plan.W]
            else:
                fast = [p for pg in self.param_lists for p in pg]
                slow = [p for pg in self.slow_weights for p in pg]
            diff = torch._foreach_sub(fast, slow)
            torch._foreach_add_(slow, diff, alpha=self.alpha)
            torch._foreach_copy_(fast, slow)

    @staticmethod
    def _hypers(h):
        return (float(h[k]) for k in ("lr", "mom", "sqr_mom", "eps", "wd", "beta"))

    def _flat_step(self, plan: _FlatPlan):
        """Each group's slice of the flat buffers as one-element lists: one tensor op per step of the update."""
        one = len(plan.groups) == 1
        for (start, mid, end), pg, h in zip(plan.groups, self.param_lists, self.hypers):
            if end == start:
                continue
            lr, mom, sqr_mom, eps, wd, beta = self._hypers(h)
            sl = slice(start, end)
            P, G, A, S = ([t] if one else [t[sl]] for t in (plan.P, plan.G, plan.A, plan.S))
            decay = [plan.P[start:mid]] if wd != 0 and mid > start else []  # the do_wd parameters come first
            step = self.state[pg[0]].get("step", 0) + 1  # step_stat (one count per group in a plan)
            for p in pg:
                self.state[p]["step"] = step
            _radam(P, G, A, S, decay, step, lr, mom, sqr_mom, eps, wd, beta)

    def _foreach_step(self, ps, all_grads, h):
        """The parameters one by one (as lists), bucketed by their step count (all of them in one bucket,
        unless some skipped steps)."""
        lr, mom, sqr_mom, eps, wd, beta = self._hypers(h)
        states = [self.state.setdefault(p, {}) for p in ps]
        buckets: dict[int, list[int]] = {}
        for i, (p, st) in enumerate(zip(ps, states)):
            if "grad_avg" not in st:
                st["grad_avg"], st["sqr_avg"] = torch.zeros_like(all_grads[i]), torch.zeros_like(all_grads[i])
            buckets.setdefault(st.get("step", 0), []).append(i)
        for step, idx in buckets.items():
            sub = [ps[i] for i in idx]
            sts = [states[i] for i in idx]
            decay = [p for p, st in zip(sub, sts) if st.get("do_wd", True)] if wd != 0 else []
            step += 1
            for st in sts:
                st["step"] = step
            _radam(sub, [all_grads[i] for i in idx], [st["grad_avg"] for st in sts], [st["sqr_avg"] for st in sts],
                   decay, step, lr, mom, sqr_mom, eps, wd, beta)

    def zero_grad(self):
        """Drops the gradients of the parameters a flat plan covers (the next backward writes fresh ones
        instead of adding into zeros: one kernel less per parameter), remembering that they had one so
        the next step sees a zero gradient where fastai's would; zeroes the others in place as fastai does."""
        grads, had = [], self._had_grad
        for pg in self.param_lists:
            for p in pg:
                g = p.grad
                if g is None:
                    continue
                if id(p) in had:
                    p.grad = None
                else:
                    grads.append(g)
        for g in grads:
            if g.requires_grad:  # fastai detaches; a grad made by create_graph=True would need it
                g.detach_()
        if grads:
            torch._foreach_zero_(grads)

    def clear_state(self):
        super().clear_state()
        self._init_state()

    def state_dict(self):
        state = super().state_dict()
        state.update({"count": self.count, "slow_weights": self.slow_weights})
        return state

    def load_state_dict(self, sd):
        self.count = sd.pop("count")
        self.slow_weights = sd.pop("slow_weights")
        super().load_state_dict(sd)
        self._version += 1


def optimizer(name: str):
    """The opt_func for --opt (options.OPTIMIZERS): 'ranger' (fastgal's flat-buffer Ranger) or 'fastai-ranger'
    (fastai's own)."""
    return {"ranger": Ranger, "fastai-ranger": ranger}[name]

