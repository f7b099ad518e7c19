"""The Idefics2 family: its chat format (`<end_of_utterance>` closes a turn), its processor's page sizes, the patches
behind the connector and decoder speed switches (connector.py), and its training FLOPs and `docvlm plan`'s memory
model (memory.py, calibrated in calibration.yaml)."""

from __future__ import annotations

from docvlm.families.base import Family
from docvlm.families.idefics2 import connector
from docvlm.families.idefics2.memory import MEMORY_MODEL, training_flops

IDEFICS2_8B = {  # the config Idefics2-8B's 8.4 B-parameter architecture is built from (make bench, tests)
    "text": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32003,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=4096,
        max_position_embeddings=32768,
        pad_token_id=0,
    ),
    "vision": dict(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        patch_size=14,
        image_size=980,
    ),
    "perceiver": dict(
        resampler_n_latents=64, resampler_depth=3, resampler_n_heads=16, resampler_head_dim=96, num_key_value_heads=4
    ),
}


class Idefics2(Family):
    name = "Idefics2"
    model_types = ("idefics2",)
    processor_classes = ("Idefics2Processor",)
    end_of_turn = "<end_of_utterance>"
    processor_options = frozenset({"do_image_splitting", "image_longest_edge", "image_shortest_edge"})
    smaller_pages = "lower image_longest_edge"
    frozen_tower = True
    tower_in_chunks = True
    feature_cache = True
    packs_rows = True
    checkpoint_connector = staticmethod(connector.checkpoint_connector)
    lean_connector = staticmethod(connector.lean_connector_activations)
    half_precision_connector_input = staticmethod(connector.half_precision_connector_input)
    fuse_rms_norms = staticmethod(connector.fuse_rms_norms)
    compile_decoder_layers = staticmethod(connector.compile_decoder_layers)
    training_flops = staticmethod(training_flops)
    memory_model = MEMORY_MODEL
    published_docvqa_run = (
        "Reverb/Idefics2-8b-docVQA-finetuned: ~38 h of training alone on one A100-80GB (0.557 samples/s)"
    )

    def configure_processor(self, processor, model_args) -> None:
        """Pages split into crops or not, and resized to the recipe's edges (the processor's own otherwise)."""
        image_processor = processor.image_processor
        image_processor.do_image_splitting = model_args.do_image_splitting
        if model_args.image_longest_edge or model_args.image_shortest_edge:
            size = dict(image_processor.size)
            size["longest_edge"] = model_args.image_longest_edge or size["longest_edge"]
            size["shortest_edge"] = model_args.image_shortest_edge or size["shortest_edge"]
            image_processor.size = size


IDEFICS2 = Idefics2()
