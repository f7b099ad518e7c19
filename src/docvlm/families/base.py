"""What a model family plugs into docvlm: how its answers end, how its prompts and batches are built, which
processor options and speed switches it offers (docvlm.speedups asks for the capabilities by name), its training
FLOPs and `docvlm plan`'s calibration. A family is one subclass of Family in its own module; generic code asks the
family and never branches on which one it is (docs/new_family.md)."""

from __future__ import annotations

from docvlm.errors import UserError
from docvlm.prompts import Prompt, prompt_messages


class Family:
    """A chat-templated family with none of docvlm's patches: the defaults every family starts from."""

    name = "a model family"
    model_types: tuple[str, ...] = ()
    processor_classes: tuple[str, ...] = ()
    # The token that closes an assistant turn in the family's chat template; None: the tokenizer's end of sequence; a
    # tuple: the first of these that the model's chat template writes (None in it: the end of sequence).
    end_of_turn: str | tuple[str | None, ...] | None = None
    why_not = "docvlm has no family module for it: only switches that do not reach into the model apply"
    # Processor options a recipe may set (ModelArguments fields) for this family, and the one that makes a page fewer
    # tokens (said when a row is over max_length; None: the family's pages have a fixed size).
    processor_options: frozenset[str] = frozenset()
    smaller_pages: str | None = None
    # Capabilities the speed switches ask for (docvlm.speedups): a tower docvlm can run without grad, one called with
    # keywords (so a few pages at a time), one whose features the cache can serve, a batch whose rows can be packed
    # into one sequence (its pages a list, its positions plain), and the family's own patches (functions of the model).
    frozen_tower = False
    tower_in_chunks = False
    feature_cache = False
    packs_rows = False
    checkpoint_connector = None
    lean_connector = None
    half_precision_connector_input = None
    fuse_rms_norms = None
    compile_decoder_layers = None
    # `docvlm plan`'s memory and step-time model, calibrated with `make bench` (docvlm.families.idefics2.memory is
    # one); None: plan predicts neither
    memory_model = None
    # a published DocVQA fine-tune of the family, that `docvlm plan` and `make bench` put their projection beside
    published_docvqa_run: str | None = None

    def __init__(self, name: str | None = None, model_types: tuple[str, ...] | None = None, **capabilities):
        """A family of another name or with other capabilities (an unknown model type; tests)."""
        if name is not None:
            self.name = name
        if model_types is not None:
            self.model_types = model_types
        for key, value in capabilities.items():
            if not hasattr(type(self), key):
                raise TypeError(f"A family has no {key!r}.")
            setattr(self, key, value)

    def training_flops(self, config, shapes: dict, tower_runs: bool = True) -> float:
        """Model FLOPs of a training micro-batch (bench's MFU, plan's step time), counted from the decoder's and the
        tower's sizes (docvlm.flops); a family with more to count (a perceiver connector) counts its own."""
        from docvlm.flops import counted_training_flops

        return counted_training_flops(config, shapes, tower_runs)

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    def end_of_turn_id(self, tokenizer, chat_template: str | None = None) -> int:
        """The id that closes an assistant turn, checked against the tokenizer. A family whose models close turns
        in one of several ways (end_of_turn a tuple) takes the first that `chat_template` writes."""
        end = self.end_of_turn
        if isinstance(end, tuple):
            written = [token for token in end if token is None or chat_template is None or token in chat_template]
            end = (written or end)[0]
        if end is None:
            if tokenizer.eos_token_id is None:
                raise UserError(f"The tokenizer has no end-of-sequence token, which closes a {self.name} answer.")
            return tokenizer.eos_token_id
        token_id = tokenizer.convert_tokens_to_ids(end)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise UserError(
                f"The tokenizer has no {end} token, which closes an answer in {self.name} models: "
                "is the processor the model's own?"
            )
        return token_id

    def stop_ids(self, tokenizer, chat_template: str | None = None) -> list[int]:
        """Where generation stops: the end of a turn, and the end of the sequence."""
        ids = [self.end_of_turn_id(tokenizer, chat_template), tokenizer.eos_token_id]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def load_processor(self, path: str, revision: str | None, model_type: str):
        """The processor saved at `path` (a folder or a Hub id); `model_type` is the model config's."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, revision=revision)

    def configure_processor(self, processor, model_args) -> None:
        """Set the recipe's processor options (those in processor_options) on a loaded processor."""

    def training_turns(self, turns: list[dict], tokenizer) -> list[dict]:
        """The turns as training renders them (the chat template writes the end-of-turn token after an answer)."""
        return turns

    def prompt_text(self, processor, prompt: Prompt, row: dict, pages: int) -> str:
        """The text the model sees before it answers a row: the chat up to the answer."""
        return processor.apply_chat_template(prompt_messages(row, prompt, pages), add_generation_prompt=True)

    def make_batch(self, collator, rows: list[dict]) -> dict:
        """A training batch of rows with decoded pages: the chat batch, labels on the answers."""
        return collator.chat_batch(rows)

    def lengths(self, collator, rows: list[dict]) -> list[int]:
        """Each row's length in tokens as a batch would hold it (for the checks before training)."""
        return collator.chat_lengths(rows)
