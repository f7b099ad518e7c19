"""Idefics2's connector (a perceiver resampler and a gated MLP projection): recomputed in the backward pass a few
pages at a time, and made to keep fewer activations; its decoder's layers compiled and its norms fused. These
patches rely on the connector's call signature and modules, so only the Idefics2 family offers them
(docvlm.families)."""

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


def _connector(model):
    """An Idefics2-style model's connector (`model.model.connector`), or None."""
    return getattr(getattr(model, "model", None), "connector", None)


def lean_connector_activations(model) -> bool:
    """Make an Idefics2-style connector keep fewer activations for the backward pass (~0.28 GB a page less on
    Idefics2-8B, a fifth of what it keeps); returns whether the model has such a connector.

    Its RMSNorms keep their half-precision input instead of an fp32 copy, and its MLP keeps gate and up but not
    silu(gate) (see the two functions above). Less memory a page is what lets the connector be recomputed several
    pages at a time in the same memory. Only instance forwards are replaced: module names and weights are unchanged.
    """
    connector = _connector(model)
    if connector is None:
        return False
    for norm in _rms_norms(connector):
        norm.forward = _lean_rms_norm(norm)
    mlp = getattr(connector, "modality_projection", None)
    if mlp is not None and type(getattr(mlp, "act_fn", None)).__name__ in SILU_MODULES:
        mlp.forward = _lean_gated_mlp(mlp)
    return True


def run_connector_in_compute_dtype(model) -> bool:
    """Hand an Idefics2-style connector the vision tower's features in autocast's dtype (bf16 or fp16); returns
    whether the model has a connector.

    Under autocast the tower's last LayerNorm returns fp32, and bitsandbytes' 4-bit layers return their input's
    dtype, so the whole connector (a 14,336-wide MLP on ~3,800 patches a page, then the perceiver) computes and
    keeps fp32 activations, where an unquantized linear layer would give autocast's half precision. Rounding the
    features once, as the connector takes them, halves those activations. The 4-bit matmuls see the same input
    (they round it to their compute dtype anyway); LoRA's dropout and A matrix take the rounded features. Without
    autocast (fp32 training) there is nothing to round.
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

    Written by hand because transformers' RMSNorm is eight elementwise kernels forward and sixteen backward, and a
    flagship step runs ~100 norms three times (forward, recompute, backward), ~2,700 of its ~15,500 launches by
    count, on a host that cannot launch them as fast as the GPU runs them (docs/benchmarks.md). The fused kernel
    computes the same statistics in fp32 and rounds once, after the scale, where the module rounds before it too:
    outputs differ by at most one half-precision step. On CUDA it keeps the half-precision input and one fp32 scale
    a row for the backward pass, as connector_lean_activations does; elsewhere torch's rms_norm runs the same math
    op by op. Only instance forwards change: names and weights stay."""
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

    The connector (modality projection + perceiver resampler) carries LoRA and runs on every patch of a page
    (~3,800 on Idefics2-8B, through a 14,336-wide MLP), so it keeps ~1.3 GB of activations a page (~1 GB lean), and HF's
    gradient checkpointing does not cover it. Checkpointed, it keeps only its input (~9 MB a page) and
    recomputes one chunk at a time: larger chunks mean fewer, larger kernels and more memory at the recompute.
    The math is unchanged: pages never interact in the connector. The module tree is left as it is (only the
    instance's forward is wrapped), so adapter weights keep their usual names.

    `perceiver_pages` (more than `pages_per_chunk`): the projection is recomputed `pages_per_chunk` pages at a time,
    and the perceiver runs `perceiver_pages` at a time with each of its layers recomputed by itself, just before
    its own backward pass, so that only one layer's activations are alive at once (a third of the whole perceiver's
    on Idefics2-8B). The projection holds most of the memory a page (its 14,336-wide MLP) and the perceiver most of
    the kernel launches (3 layers of small matmuls, each with LoRA), so this trades the projected pages' 4,096-wide
    outputs (~31 MB a page, kept for the perceiver) for fewer, larger launches.
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
        if not training():
            return original(image_hidden_states, attention_mask)
        pages = image_hidden_states.shape[0]
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


def compile_text_layers(model) -> bool:
    """Compile each of Idefics2's decoder layers with torch.compile, in place (names and weights unchanged);
    returns whether the model has them.

    A QLoRA step launches ~18,000 kernels on Idefics2-8B, most of them small ones around the 4-bit matmuls (LoRA's
    dropout, casts, scale and add, the norms, the rotary embedding, the gated activation), and at batch 16 the
    host cannot launch them as fast as the GPU runs them (docs/benchmarks.md). Compiled, the decoder's fuse into
    fewer kernels. The layers share their code, so one graph serves all 32. The connector is not compiled: its
    custom autograd functions (connector_lean_activations) under checkpoint_connector save a different number of
    tensors when compiled, which checkpointing refuses."""
    layers = getattr(getattr(getattr(model, "model", None), "text_model", None), "layers", None)
    if layers is None:
        return False
    for layer in layers:
        layer.compile()
    return True


def training_flops(config, shapes: dict, tower_runs: bool = True) -> float:
    """Model FLOPs of one training micro-batch of Idefics2, counted from the architecture and the batch's real
    sizes (`docvlm.flops.batch_shapes`). The decoder and the connector run forward and backward: their base
    weights are frozen, so a linear layer's backward is one matmul (the input gradient) and an attention's is two.
    The frozen tower runs forward only, and not at all where a feature cache replaced it (`tower_runs`).
    Recomputation by checkpointing is not counted (model FLOPs, not hardware FLOPs); LoRA's rank-8 matmuls and
    the logits of the answer window are left out (under 1%)."""
    text, vision, perceiver = config.text_config, config.vision_config, config.perceiver_config
    d, heads = text.hidden_size, text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or d // heads
    kv = text.num_key_value_heads * head_dim
    layers = text.num_hidden_layers
    linear = 2 * layers * (2 * d * heads * head_dim + 2 * d * kv + 3 * d * text.intermediate_size) * shapes["tokens"]
    attention = 4 * heads * head_dim * layers * shapes["causal_pairs"]
    # the connector: a gated projection of every patch to the decoder's width (gate and up in, down out), then a
    # perceiver whose latents attend to each page's patches and to themselves
    patches, latents = shapes["patches"], perceiver.resampler_n_latents * shapes["pages"]
    linear += 2 * (2 * vision.hidden_size + d) * text.intermediate_size * patches
    p_heads, p_dim, p_kv = perceiver.resampler_n_heads, perceiver.resampler_head_dim, perceiver.num_key_value_heads
    per_layer = 2 * (2 * d * p_heads * p_dim) * latents  # the latents' queries and output
    per_layer += 2 * (2 * d * p_kv * p_dim) * (patches + latents)  # keys and values of patches and latents
    per_layer += 2 * 3 * d * 4 * d * latents  # the latents' MLP
    linear += perceiver.resampler_depth * per_layer
    attention += perceiver.resampler_depth * 4 * p_heads * p_dim * perceiver.resampler_n_latents * (patches + latents)
    flops = 2 * linear + 3 * attention
    if tower_runs:
        dv, tower_layers = vision.hidden_size, vision.num_hidden_layers
        flops += 2 * 3 * vision.patch_size**2 * dv * patches  # the patch embedding
        flops += 2 * tower_layers * (4 * dv * dv + 2 * dv * vision.intermediate_size) * patches
        flops += 4 * dv * tower_layers * shapes["patch_pairs"]
    return float(flops)


GIB = 2**30
# `docvlm plan`'s memory and speed model of Idefics2-8B QLoRA training, calibrated on `make bench` runs L and M on
# an H100 (docs/benchmarks.md, "Calibrating docvlm plan"; run N checks it). Activations are what a micro-batch adds
# to the weights and optimizer state at its peak: the connector's for its largest chunk of pages (padded to the
# batch's largest page), the checkpointed decoder's, and the batch's pages and features.
PLAN_CALIBRATION = {
    # the model the terms below were fitted on, Idefics2-8B: each term is scaled from it by the dimensions that set
    # it (docvlm.plan.size_ratios), so that other sizes of the architecture (the embedded default's tiny model) are
    # planned too
    "fitted_on": {"text_hidden": 4096, "text_intermediate": 14336, "text_layers": 32, "vision_hidden": 1152},
    "connector_bytes_per_patch": 1.235 * GIB / 3780,  # a page of 70 x 54 patches: 1.235 GiB
    # the perceiver run more pages at a time than the projection (connector_perceiver_pages), one layer recomputed
    # at a time: each page more in its chunk, ~0.2 GiB reserved, fitted on runs AX and AY (4, 8 and 16 pages; the
    # whole perceiver recomputed at once held ~0.43 GiB a page, runs R and T)
    "perceiver_bytes_per_patch": 0.20 * GIB / 3780,
    # the connector fed rounded features (connector_in_compute_dtype) keeps half-precision activations, not fp32:
    # this share of the terms above, fitted on runs BA and BB
    "connector_in_compute_dtype_share": 0.45,
    "decoder_bytes_per_token": 0.02 * GIB / 220,  # checkpointed layers' inputs, all layers: ~0.02 GiB a row
    # without gradient checkpointing every layer keeps its activations (LoRA dropout's masks and copies included):
    # ~11.5 GiB at 16 rows of ~99 tokens, fitted on docvqa_qlora_fast with the connector in half precision, whose
    # peak is then the decoder's (run BB); the fp32 connector's recompute peaked above it (runs AY, R)
    "unchecked_decoder_bytes_per_token": 11.5 * GIB / (16 * 99),
    "step_workspace_bytes": 0.10 * GIB,  # the loss's and the kernels' workspace
    # the logits the loss reads (every position with loss_logits all, as on CUDA; else the answer's), in bf16 and
    # in the loss's fp32 copy: brings the high-resolution recipe's ~380-token rows within 11% (run X)
    "logit_bytes_per_vocab_entry": 2 + 4,
    "reserved_over_activations": 1.2,  # the CUDA cache holds ~20% more than the activations at their peak
    # step time: a fixed cost a micro-batch (host work, launches, syncs), then the model FLOPs at a fraction of the
    # card's peak; nested quantization dequantizes twice (lowmem against docvqa_qlora at the same batch). The fixed
    # cost and the slowdown were fitted again on runs AK and AL (H200), after the host's share shrank.
    "seconds_per_micro_batch": 0.26,
    "achieved_fraction_of_peak": 0.163,
    "nested_quant_slowdown": 1.6,
}
