"""The Qwen-VL processors without their video half, for machines where torchvision does not import.

The stock processors (Qwen2VLProcessor, Qwen2_5_VLProcessor, Qwen3VLProcessor) check a video processor in their
constructor, and transformers can build none without torchvision, so the stock processor cannot be made there at
all. docvlm trains on pages only: the image-only twin takes the PIL image processor, the tokenizer and the chat
template, gives the same tokens (pages resized by PIL rather than torchvision), and keeps the stock class's name, so
that what it saves loads as the stock processor wherever torchvision is installed (every GPU machine)."""

from __future__ import annotations

from functools import cache

STOCK_PROCESSORS = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor", "Qwen3VLProcessor")


def torchvision_imports() -> bool:
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


@cache
def image_only(stock_name: str):
    """The stock processor class `stock_name` less its video processor (same name, same call)."""
    import transformers
    from transformers import ProcessorMixin

    stock = getattr(transformers, stock_name)

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # what the stock constructor sets before it checks its video processor
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        for name in ("vision_start", "vision_end"):  # Qwen3-VL's processor reads these
            token = getattr(tokenizer, f"{name}_token", None) or f"<|{name}|>"
            setattr(self, f"{name}_token", token)
            setattr(self, f"{name}_token_id", tokenizer.convert_tokens_to_ids(token))
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return type(stock_name, (stock,), {"__init__": __init__, "__module__": __name__, "image_only": True})


def load_processor(path: str, revision: str | None, stock_name: str):
    """The stock processor where torchvision imports; its image-only twin where it does not."""
    from transformers import AutoProcessor

    if torchvision_imports():
        return AutoProcessor.from_pretrained(path, revision=revision)
    return image_only(stock_name).from_pretrained(path, revision=revision)
