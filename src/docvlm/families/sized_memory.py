"""`docvlm plan`'s memory and step-time model for a family without one of its own: the activations of a QLoRA
micro-batch counted from the architecture's sizes (the decoder's width and depth, the vision tower's, the
vocabulary) with the few constants in sized_memory.yaml, fitted on `make bench FAMILIES=1`."""

from __future__ import annotations

import statistics
from functools import cache
from pathlib import Path

GIB = 2**30
UNITS = {"GiB": GIB, "bytes": 1, "seconds": 1, "none": 1}
BF16 = 2  # bytes


def read_calibration(path: Path) -> dict:
    """A calibration file (sized_memory.yaml, a family's calibration.yaml) as plain numbers: each entry's value in
    bytes, seconds or a ratio, over `per` where it is a rate; `fitted_on` as written."""
    import yaml

    data = yaml.safe_load(path.read_text())
    values = {"fitted_on": data["fitted_on"]}
    for section in ("memory", "speed"):
        for name, entry in data[section].items():
            values[name] = entry["value"] * UNITS[entry["unit"]] / entry.get("per", 1)
    return values


@cache
def calibration() -> dict:
    return read_calibration(Path(__file__).with_name("sized_memory.yaml"))


class SizedMemoryModel:
    """What a micro-batch's activations add at their peak, counted in bf16 values: every checkpointed decoder
    layer's input and one layer's activations while it is recomputed (or every layer's without checkpointing), the
    logits the loss reads, the frozen tower's largest layer over the batch's pages where it runs, the pixels, and a
    dequantized weight; the CUDA cache holds a calibrated share more. `terms`: docvlm.speedups.base.PlanTerms."""

    @property
    def calibration(self) -> dict:
        return calibration()

    def activation_bytes(self, config, terms) -> tuple[float, float]:
        """(allocated, reserved) bytes the activations add at the peak."""
        from docvlm.flops import tower_sizes

        calibrated, args = self.calibration, terms.args
        text, vision = config.text_config, config.vision_config
        d, inner, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
        tokens = terms.batch * terms.p95_tokens
        layer = (
            calibrated["values_a_token_a_layer_per_width"] * d + calibrated["values_a_token_a_layer_per_mlp"] * inner
        )
        if args.gradient_checkpointing:  # each layer's input, one layer recomputed, and the layers kept whole
            decoder = BF16 * tokens * (d * layers + layer * (1 + terms.kept_decoder_layers))
        else:
            decoder = BF16 * tokens * layer * layers
        # the answer positions' logits only: docvlm's answer-span loss, and on CUDA TRL's compacting loss (measured:
        # logits over every position would exceed these families' whole measured peaks)
        logits = calibrated["logit_bytes_per_vocab_entry"] * terms.batch * terms.p95_answer_tokens * text.vocab_size
        patches = terms.pages * terms.largest_page_patches
        tower = 0.0
        if terms.tower_runs:
            width, tower_inner, _ = tower_sizes(vision)
            tower = BF16 * patches * (calibrated["tower_values_a_patch_per_width"] * width + tower_inner)
        frames = getattr(vision, "temporal_patch_size", 1)
        pixels = patches * 3 * frames * vision.patch_size**2 * (4 + BF16)  # fp32 pixels and their bf16 copy
        workspace = 2 * BF16 * d * inner  # a dequantized 4-bit weight and its transposed use in the backward pass
        activations = calibrated["activations_over_counted"] * (decoder + logits + tower + pixels + workspace)
        return activations, calibrated["reserved_over_activations"] * activations

    def step_seconds(self, config, terms, peak_tflops: float) -> float:
        """A fixed cost a micro-batch, then the counted model FLOPs at the calibrated share of the card's peak."""
        from docvlm.flops import counted_training_flops

        calibrated, batch = self.calibration, terms.batch
        mean = {
            "tokens": batch * statistics.fmean(terms.tokens),
            "causal_pairs": batch * statistics.fmean(t * (t + 1) / 2 for t in terms.tokens),
            "pages": terms.pages,
            "patches": batch * statistics.fmean(terms.patches),
            "patch_pairs": batch * statistics.fmean(p * p / max(1, terms.pages_a_row) for p in terms.patches),
        }
        flops = counted_training_flops(config, mean, terms.tower_runs)
        rate = calibrated["achieved_fraction_of_peak"] * peak_tflops * 1e12
        seconds = terms.args.gradient_accumulation_steps * (calibrated["seconds_per_micro_batch"] + flops / rate)
        return seconds * (calibrated["nested_quant_slowdown"] if terms.nested_quant else 1.0)

    def notes(self, terms) -> list[str]:
        return [f"counted from the architecture's sizes ({self.calibration['fitted_on']})"]


SIZED_MEMORY_MODEL = SizedMemoryModel()
