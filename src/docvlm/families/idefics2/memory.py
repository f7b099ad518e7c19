"""Idefics2's costs: training FLOPs counted from the architecture (`make bench`'s MFU, `docvlm plan`'s step time),
and `docvlm plan`'s peak memory and step time from the calibration in calibration.yaml."""

from __future__ import annotations

import statistics
from functools import cache
from pathlib import Path

from docvlm.families.sized_memory import read_calibration


@cache
def calibration() -> dict:
    """calibration.yaml as plain numbers: each entry's value in bytes (or seconds, or a ratio), over `per`."""
    return read_calibration(Path(__file__).with_name("calibration.yaml"))


def training_flops(config, shapes: dict, tower_runs: bool = True) -> float:
    """Model FLOPs of one training micro-batch of Idefics2, counted from the architecture and the batch's real
    sizes (`docvlm.flops.batch_shapes`). The decoder and the connector run forward and backward: their base
    weights are frozen, so a linear layer's backward is one matmul (the input gradient) and an attention's is two.
    The frozen tower runs forward only, and not at all where a feature cache replaced it (`tower_runs`).
    Recomputation by checkpointing is not counted (model FLOPs, not hardware FLOPs); LoRA's rank-8 matmuls and
    the logits of the answer window are left out (small beside the rest)."""
    from docvlm.flops import counted_training_flops

    text, vision, perceiver = config.text_config, config.vision_config, config.perceiver_config
    d = text.hidden_size
    # the connector: a gated projection of every patch to the decoder's width (gate and up in, down out), then a
    # perceiver whose latents attend to each page's patches and to themselves
    patches, latents = shapes["patches"], perceiver.resampler_n_latents * shapes["pages"]
    linear = 2 * (2 * vision.hidden_size + d) * text.intermediate_size * patches
    p_heads, p_dim, p_kv = perceiver.resampler_n_heads, perceiver.resampler_head_dim, perceiver.num_key_value_heads
    per_layer = 2 * (2 * d * p_heads * p_dim) * latents  # the latents' queries and output
    per_layer += 2 * (2 * d * p_kv * p_dim) * (patches + latents)  # keys and values of patches and latents
    per_layer += 2 * 3 * d * 4 * d * latents  # the latents' MLP
    linear += perceiver.resampler_depth * per_layer
    attention = perceiver.resampler_depth * 4 * p_heads * p_dim * perceiver.resampler_n_latents * (patches + latents)
    # the decoder and the tower are counted as every family's are; the connector runs forward and backward
    return counted_training_flops(config, shapes, tower_runs) + 2 * linear + 3 * attention


def size_ratios(config, fitted_on: dict) -> dict[str, float]:
    """How much each memory term grows from the model it was fitted on to `config`'s, by the dimensions that set it:
    the decoder's activations with its width and depth (a checkpointed decoder keeps each layer's input; an unchecked
    one its attention and MLP activations too), the connector's a patch with the widths its projection passes
    through (the perceiver's with the text width), and the step's workspace with its largest layer (a dequantized
    4-bit weight). 1.0 for every term on the model it was fitted on."""
    text, vision = config.text_config, config.vision_config
    hidden, inner, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    ref = fitted_on
    return {
        "checkpointed_decoder": hidden * layers / (ref["text_hidden"] * ref["text_layers"]),
        "decoder": (hidden + inner) * layers / ((ref["text_hidden"] + ref["text_intermediate"]) * ref["text_layers"]),
        "connector": (vision.hidden_size + inner + hidden)
        / (ref["vision_hidden"] + ref["text_intermediate"] + ref["text_hidden"]),
        "perceiver": hidden / ref["text_hidden"],
        "workspace": hidden * inner / (ref["text_hidden"] * ref["text_intermediate"]),
    }


def layers_of(config) -> int:
    return config.text_config.num_hidden_layers


class MemoryModel:
    """`docvlm plan`'s model of an Idefics2 QLoRA micro-batch (docvlm.families.base.Family.memory_model): what the
    activations add at their peak to the weights and optimizer state (the connector's for its largest chunk of pages,
    padded to the batch's largest page; the decoder's; the logits; the batch's pages and features), and how long a
    step takes. `terms`: docvlm.speedups.base.PlanTerms, as the switches left them."""

    @property
    def calibration(self) -> dict:
        return calibration()

    def activation_bytes(self, config, terms) -> tuple[float, float]:
        """(allocated, reserved) bytes the activations add at the peak."""
        calibrated, args = self.calibration, terms.args
        size = size_ratios(config, calibrated["fitted_on"])
        patches = terms.largest_page_patches
        connector = calibrated["connector_bytes_per_patch"] * size["connector"] * terms.connector_pages * patches
        perceiver = calibrated["perceiver_bytes_per_patch"] * size["perceiver"]
        connector += perceiver * (terms.perceiver_pages - terms.connector_pages) * patches
        connector *= terms.connector_share
        tokens = terms.batch * terms.p95_tokens
        unchecked_a_layer = (
            calibrated["unchecked_decoder_bytes_per_token"] * size["decoder"] * tokens / layers_of(config)
        )
        if args.gradient_checkpointing:
            decoder = calibrated["decoder_bytes_per_token"] * size["checkpointed_decoder"] * tokens
            decoder += unchecked_a_layer * terms.kept_decoder_layers  # the layers that keep their activations
            activations = connector + decoder
        else:
            decoder = unchecked_a_layer * layers_of(config)
            # a recomputed connector peaks after the decoder's backward pass has freed the decoder's activations
            activations = max(connector, decoder) if terms.connector_recomputed else connector + decoder
        activations += calibrated["step_workspace_bytes"] * size["workspace"]
        # loss_logits auto means all on a GPU, which is what plan predicts for
        logit_rows = terms.p95_tokens if args.loss_logits != "answer" else terms.p95_answer_tokens
        activations += (
            calibrated["logit_bytes_per_vocab_entry"] * terms.batch * logit_rows * config.text_config.vocab_size
        )
        # the batch's pages on the GPU, padded to the largest: fp32 pixels and their half-precision copy, and the
        # tower's (or the cache's) half-precision features of every patch
        vision = config.vision_config
        pixels_a_patch = 3 * vision.patch_size**2 * (4 + 2)
        activations += terms.pages * patches * (pixels_a_patch + 2 * vision.hidden_size)
        return activations, calibrated["reserved_over_activations"] * activations

    def step_seconds(self, config, terms, peak_tflops: float) -> float:
        """An optimizer step's time: a fixed cost a micro-batch, then the model FLOPs at the calibrated share of the
        card's peak (nested quantization dequantizes twice)."""
        calibrated, args = self.calibration, terms.args
        tokens, batch = terms.tokens, terms.batch
        mean = {
            "tokens": batch * statistics.fmean(tokens),
            "causal_pairs": batch * statistics.fmean(t * (t + 1) / 2 for t in tokens),
            "pages": terms.pages,
            "patches": batch * statistics.fmean(terms.patches),
            "patch_pairs": batch * statistics.fmean(p * p / max(1, terms.pages_a_row) for p in terms.patches),
        }
        flops = training_flops(config, mean, terms.tower_runs)
        rate = calibrated["achieved_fraction_of_peak"] * peak_tflops * 1e12
        seconds = args.gradient_accumulation_steps * (calibrated["seconds_per_micro_batch"] + flops / rate)
        return seconds * (calibrated["nested_quant_slowdown"] if terms.nested_quant else 1.0)

    def notes(self, terms) -> list[str]:
        """What the model leaves out for this recipe: the perceiver's own chunks were fitted on one page a row."""
        if terms.perceiver_own_chunks and terms.pages_a_row > 1:
            return [
                f"not modelled: {terms.perceiver_own_chunks} with several images a row (measured on the 8B model with "
                "5 crops a page, 8 x 2: 4 crops +8 GiB; docs/benchmark-history.md)"
            ]
        return []


MEMORY_MODEL = MemoryModel()
