"""`lora_lean_forward`: a leaner forward for peft's LoRA linear layers, the same update in fewer kernel launches.

A QLoRA step of the flagship recipe launches many small kernels, and the host, not the GPU, sets its pace
(docs/benchmarks.md). peft's forward of a LoRA linear layer copies the base layer's output (a defensive clone for
4-bit layers), then scales the adapter's output and adds it in two more kernels, around every adapted layer, twice a
step under gradient checkpointing. Here the update is added in one kernel,
`base + scaling * B(A(dropout(x)))` (torch.add with alpha), and the output is not cloned: the addition is out of
place, which is all the clone guarded against. Submodules are called as peft calls them, so their hooks run and
the adapter's names, saving and loading are unchanged. Calls this does not cover go to peft's forward.
"""

from __future__ import annotations

import torch

from docvlm.modes import FSDP, ZERO3
from docvlm.speedups.base import WITH_TRAINER, Setting, Switch


def lean_lora_forward(model) -> int:
    """Give each LoRA linear layer of `model` (a peft model) the lean forward; returns how many were patched."""
    from peft.tuners.lora import LoraLayer

    patched = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), torch.nn.Linear):
            module.forward = _lean(module, module.forward)
            patched += 1
    return patched


def _lean(layer, peft_forward):
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = _single_plain_adapter(layer)
        if name is None or kwargs or args:  # mixed adapters a batch, variant arguments: peft's own forward
            return peft_forward(x, *args, **kwargs)
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        if not torch.is_autocast_enabled(x.device.type) and x.dtype != lora_a.weight.dtype:
            return peft_forward(x)  # peft casts the input to the adapter's dtype and back
        result = layer.base_layer(x)
        update = lora_b(lora_a(layer.lora_dropout[name](x)))
        return torch.add(result, update.to(result.dtype), alpha=layer.scaling[name])

    return forward


def _single_plain_adapter(layer) -> str | None:
    """The one active adapter when it is plain LoRA (no DoRA or other variant) and applied unmerged."""
    if layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}):
        return None
    return active[0]


def _check(args, model_args) -> None:
    if args.lora_lean_forward and not model_args.use_peft:
        raise ValueError("lora_lean_forward is true, but use_peft is false: there is no LoRA layer to make leaner.")


SHARDED_ADAPTER = "not tested under {mode}, whose hooks gather the adapter's shards"
SWITCH = Switch(
    settings=(
        Setting(
            "lora_lean_forward",
            bool,
            False,
            "Each LoRA linear layer adds its update in one kernel (base + scaling * B(A(x))) and does not copy the "
            "base output first, as peft's forward does: 3 fewer kernel launches a layer call (forward and backward), "
            "the same math (one rounding fewer). Needs use_peft.",
        ),
    ),
    is_on=lambda args: bool(args.lora_lean_forward),
    lacks="LoRA linear layers to make leaner",
    check=_check,
    turned_off_in={ZERO3: SHARDED_ADAPTER, FSDP: SHARDED_ADAPTER},
    apply={WITH_TRAINER: lambda run: lean_lora_forward(run.trainer.model) > 0},
)
