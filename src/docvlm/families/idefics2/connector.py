"""Idefics2's patches for the speed switches: its connector (a gated MLP projection and a perceiver resampler)
recomputed in the backward pass a few pages at a time, made to keep fewer activations and fed half-precision
features; its decoder's layers compiled and its RMSNorms fused. They rely on the connector's call signature and
modules, so only this family offers them. Only instance forwards are replaced: module names and weights stay, so
adapters save and load as usual."""

from __future__ import annotations

import torch


class _RMSNormKeepingHalfInput(torch.autograd.Function):
    """Idefics2's RMSNorm (statistics in fp32, output cast back, then scaled) that saves its half-precision input and
    one fp32 scale a row for the backward pass, where autograd would save an fp32 copy of the whole input.

    Written by hand because no library offers it: the perceiver normalises every page's whole patch context in each
    of its layers, and what is saved instead of each fp32 copy is the half-precision context, one tensor the layers
    share. The forward pass is the module's own, op for op.
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
    keeping silu(gate), the connector MLP's widest activation. The same kernels run, so forward and gradients are bit
    for bit autograd's."""

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


def _connector(model):
    """An Idefics2-style model's connector (`model.model.connector`), or None."""
    return getattr(getattr(model, "model", None), "connector", None)


def lean_connector_activations(model) -> bool:
    """Make an Idefics2-style connector keep fewer activations for the backward pass; returns whether the model has
    such a connector. Its RMSNorms keep their half-precision input instead of an fp32 copy, and its MLP keeps gate
    and up but not silu(gate), so that the connector can be recomputed several pages at a time in the same memory."""
    connector = _connector(model)
    if connector is None:
        return False
    for norm in _rms_norms(connector):
        norm.forward = _lean_rms_norm(norm)
    mlp = getattr(connector, "modality_projection", None)
    if mlp is not None and type(getattr(mlp, "act_fn", None)).__name__ in SILU_MODULES:
        mlp.forward = _lean_gated_mlp(mlp)
    return True


def half_precision_connector_input(model) -> bool:
    """Hand an Idefics2-style connector the vision tower's features in autocast's dtype (bf16 or fp16); returns
    whether the model has a connector.

    Under autocast the tower's last LayerNorm returns fp32 and bitsandbytes' 4-bit layers return their input's dtype,
    so the whole connector would compute and keep fp32 activations. Rounding the features once, as the connector
    takes them, halves those. The 4-bit matmuls see the same input (they round it to their compute dtype anyway);
    LoRA's dropout and A matrix take the rounded features. Without autocast (fp32 training) nothing is rounded.
    """
    connector = _connector(model)
    if connector is None:
        return False
    original = connector.forward

    def forward(image_hidden_states, attention_mask=None):
        device = image_hidden_states.device.type
        if torch.is_autocast_enabled(device):
            image_hidden_states = image_hidden_states.to(torch.get_autocast_dtype(device))
        return original(image_hidden_states, attention_mask)

    connector.forward = forward
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


def fuse_rms_norms(model) -> int:
    """Run every RMSNorm of Idefics2's decoder and connector as one fused kernel forward and one backward; returns
    how many norms were changed.

    Written by hand because transformers' RMSNorm is many small elementwise kernels each way, launched on a host that
    cannot keep up with the GPU. The fused kernel computes the same statistics in fp32 and rounds once, after the
    scale, where the module rounds before it too: outputs differ by at most one half-precision step. On CUDA it keeps
    the half-precision input and one fp32 scale a row for the backward pass; elsewhere torch's rms_norm runs the same
    math op by op."""
    inner = getattr(model, "model", None)
    norms = _rms_norms(getattr(inner, "text_model", None)) + _rms_norms(getattr(inner, "connector", None))
    for norm in norms:
        norm.forward = _fused_rms_norm(norm)
    return len(norms)


def _rms_norms(part) -> list[torch.nn.Module]:
    """The RMSNorms of `part` (none where it is None): Mistral's in the decoder, Idefics2's in the connector."""
    modules = part.modules() if part is not None else ()
    return [m for m in modules if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon")]


def _fused_rms_norm(norm):
    eps, original = norm.variance_epsilon, norm.forward

    def forward(hidden):
        weight = norm.weight
        if weight.dtype != hidden.dtype:  # the module's output takes the wider dtype of the two: keep its forward
            return original(hidden)
        shape = (hidden.shape[-1],)
        if hidden.is_cuda and hasattr(torch.ops.aten, "_fused_rms_norm"):  # torch's fused kernel and its backward
            return torch.ops.aten._fused_rms_norm(hidden, list(shape), weight, eps)[0]
        return torch.nn.functional.rms_norm(hidden, shape, weight, eps)  # the same math, op by op

    return forward


def checkpoint_connector(model, pages_per_chunk: int = 1, perceiver_pages: int | None = None) -> bool:
    """Recompute an Idefics2-style connector in the backward pass, `pages_per_chunk` pages at a time, instead of
    keeping its activations; returns whether the model has a connector to patch.

    The connector (modality projection + perceiver resampler) carries LoRA and runs on every patch of a page, so it
    keeps the largest activations of a step, and HF's gradient checkpointing does not cover it. Checkpointed, it
    keeps only its input and recomputes one chunk at a time: larger chunks mean fewer, larger kernels and more
    memory at the recompute. The math is unchanged: pages never interact in the connector. Without grad
    (generation) it runs in the same chunks, which bounds its memory at evaluation's larger batches.

    `perceiver_pages` (more than `pages_per_chunk`): the projection is recomputed `pages_per_chunk` pages at a time,
    and the perceiver runs `perceiver_pages` at a time with each of its layers recomputed by itself, just before its
    own backward pass, so that one layer's activations are alive at once. The projection holds most of the memory a
    page and the perceiver most of the kernel launches, so this trades keeping the projected pages for fewer, larger
    launches.
    """
    from torch.utils.checkpoint import checkpoint

    connector = _connector(model)
    if connector is None:
        return False
    original = connector.forward
    perceiver_pages = max(perceiver_pages or pages_per_chunk, pages_per_chunk)

    def training():
        return connector.training and torch.is_grad_enabled()

    def chunked(function, pages, step, *tensors, recompute=True):
        chunks = [[None if t is None else t[i : i + step] for t in tensors] for i in range(0, pages, step)]
        if recompute:
            return torch.cat([checkpoint(function, *chunk, use_reentrant=False) for chunk in chunks])
        return torch.cat([function(*chunk) for chunk in chunks])

    def perceive(context, attention_mask):
        return connector.perceiver_resampler(context=context, attention_mask=attention_mask)

    if perceiver_pages > pages_per_chunk:
        for layer in connector.perceiver_resampler.layers:
            layer.forward = _recomputed_by_itself(layer.forward, training)

    def forward(image_hidden_states, attention_mask=None):
        pages = image_hidden_states.shape[0]
        if not torch.is_grad_enabled():  # generation: the same chunks bound its memory, nothing is kept
            projected = chunked(
                connector.modality_projection, pages, pages_per_chunk, image_hidden_states, recompute=False
            )
            return chunked(perceive, pages, perceiver_pages, projected, attention_mask, recompute=False)
        if not training():
            return original(image_hidden_states, attention_mask)
        if perceiver_pages == pages_per_chunk:
            return chunked(original, pages, pages_per_chunk, image_hidden_states, attention_mask)
        projected = chunked(connector.modality_projection, pages, pages_per_chunk, image_hidden_states)
        return chunked(perceive, pages, perceiver_pages, projected, attention_mask, recompute=False)

    connector.forward = forward
    return True


def _recomputed_by_itself(forward, training):
    """A perceiver layer's `forward`, checkpointed on its own while `training()`: it keeps its inputs (the latents,
    and the page context every layer shares) and recomputes the rest just before its backward pass."""
    from torch.utils.checkpoint import checkpoint

    def layer_forward(*args, **kwargs):
        if training():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return layer_forward


def compile_decoder_layers(model) -> bool:
    """Compile each of Idefics2's decoder layers with torch.compile, in place (names and weights unchanged);
    returns whether the model has them.

    Most of a QLoRA step's kernels are small ones around the 4-bit matmuls (LoRA's dropout, casts, scale and add, the
    norms, the rotary embedding), launched faster than the host can at large batches; compiled, they fuse. The layers
    share their code, so one graph serves them all. The connector is not compiled: its custom autograd functions
    under checkpoint_connector save a different number of tensors when compiled, which checkpointing refuses."""
    layers = getattr(getattr(getattr(model, "model", None), "text_model", None), "layers", None)
    if layers is None:
        return False
    for layer in layers:
        layer.compile()
    return True
