"""Idefics2's connector (a perceiver resampler and a gated MLP projection): recomputed in the backward pass a few
pages at a time, and made to keep fewer activations. These patches rely on the connector's call signature and
modules, so only the Idefics2 family offers them (docvlm.families)."""

from __future__ import annotations

import torch


class _RMSNormKeepingHalfInput(torch.autograd.Function):
    """Idefics2's RMSNorm (statistics in fp32, output cast back, then scaled) that saves its half-precision input and
    one fp32 scale a row for the backward pass, where autograd would save an fp32 copy of the whole input.

    Written by hand because no library offers it for these modules: the perceiver normalises the ~3,800-patch context
    of every page in each of its 3 layers, and those fp32 copies are ~180 MB a page on Idefics2-8B. What is saved
    instead is the half-precision context, one tensor the three layers share (~30 MB a page). The forward pass is
    the module's own, op for op.
    """

    @staticmethod
    def forward(ctx, hidden, weight, eps):
        full = hidden.float()
        scale = torch.rsqrt(full.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(hidden, weight, scale)
        return weight * (full * scale).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, scale = ctx.saved_tensors
        normed = hidden.float() * scale
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_normed = (grad * weight).float()
            grad_hidden = scale * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
            grad_hidden = grad_hidden.to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(hidden.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        return grad_hidden, grad_weight, None


class _SiluTimes(torch.autograd.Function):
    """silu(gate) * up that saves gate and up for the backward pass and recomputes silu(gate) there, instead of also
    keeping silu(gate): one 14,336-wide activation (~100 MB) a page less in Idefics2's connector MLP. The same
    kernels run, so forward and gradients are bit for bit autograd's."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * torch.nn.functional.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


SILU_MODULES = ("SiLU", "SiLUActivation")  # torch's, and transformers' own (its ACT2FN["silu"] since 5.x)


def lean_connector_activations(model) -> bool:
    """Make an Idefics2-style connector keep fewer activations for the backward pass (~0.28 GB a page less on
    Idefics2-8B, a fifth of what it keeps); returns whether the model has such a connector.

    Its RMSNorms keep their half-precision input instead of an fp32 copy, and its MLP keeps gate and up but not
    silu(gate) (see the two functions above). Less memory a page is what lets the connector be recomputed several
    pages at a time in the same memory. Only instance forwards are replaced: module names and weights are unchanged.
    """
    connector = getattr(getattr(model, "model", None), "connector", None)
    if connector is None:
        return False
    for module in connector.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = _lean_rms_norm(module)
    mlp = getattr(connector, "modality_projection", None)
    if mlp is not None and type(getattr(mlp, "act_fn", None)).__name__ in SILU_MODULES:
        mlp.forward = _lean_gated_mlp(mlp)
    return True


def _when_training(module, lean):
    """`module`'s forward, replaced by `lean` where autograd will keep activations; inference runs the original."""
    original = module.forward
    return lambda hidden: lean(hidden) if torch.is_grad_enabled() else original(hidden)


def _lean_rms_norm(norm):
    eps = norm.variance_epsilon
    return _when_training(norm, lambda hidden: _RMSNormKeepingHalfInput.apply(hidden, norm.weight, eps))


def _lean_gated_mlp(mlp):
    def forward(hidden):
        # gate before up, as the module does, so that LoRA dropout draws its masks in the same order
        gate = mlp.gate_proj(hidden)
        return mlp.down_proj(_SiluTimes.apply(gate, mlp.up_proj(hidden)))

    return _when_training(mlp, forward)


def checkpoint_connector(model, pages_per_chunk: int = 1) -> bool:
    """Recompute an Idefics2-style connector in the backward pass, `pages_per_chunk` pages at a time, instead of
    keeping its activations; returns whether the model has a connector to patch.

    The connector (modality projection + perceiver resampler) carries LoRA and runs on every patch of a page
    (~3,800 on Idefics2-8B, through a 14,336-wide MLP), so it keeps ~1.3 GB of activations a page (~1 GB lean), and HF's
    gradient checkpointing does not cover it. Checkpointed, it keeps only its input (~9 MB a page) and
    recomputes one chunk at a time: larger chunks mean fewer, larger kernels and more memory at the recompute.
    The math is unchanged: pages never interact in the connector. The module tree is left as it is (only the
    instance's forward is wrapped), so adapter weights keep their usual names.
    """
    from torch.utils.checkpoint import checkpoint

    connector = getattr(getattr(model, "model", None), "connector", None)
    if connector is None:
        return False
    original = connector.forward

    def forward(image_hidden_states, attention_mask=None):
        if not (connector.training and torch.is_grad_enabled()):
            return original(image_hidden_states, attention_mask)
        chunks = [
            checkpoint(
                original,
                image_hidden_states[i : i + pages_per_chunk],
                None if attention_mask is None else attention_mask[i : i + pages_per_chunk],
                use_reentrant=False,
            )
            for i in range(0, image_hidden_states.shape[0], pages_per_chunk)
        ]
        return torch.cat(chunks)

    connector.forward = forward
    return True
