"""Turn (image, question, answers) rows into a training batch whose loss covers the answer only.

Written by hand because TRL's vision collator either trains on every token (messages rows: prompt, padding and
image tokens included) or drops BOS in training while generation adds it (prompt/completion rows), and
`assistant_only_loss` is refused for VLMs. Here labels are -100 everywhere except the answer tokens and the
closing `<end_of_utterance>`, and the prompt is built by the same function that inference uses.
"""

from __future__ import annotations

import random

from docvlm.config import UserError

END_OF_UTTERANCE = "<end_of_utterance>"
IGNORE_INDEX = -100


def user_message(instruction: str, question: str) -> dict:
    """The user turn, in the seed's order: instruction, page, question."""
    content = [{"type": "image"}, {"type": "text", "text": question}]
    if instruction:
        content.insert(0, {"type": "text", "text": instruction})
    return {"role": "user", "content": content}


def prompt_text(processor, instruction: str, question: str) -> str:
    """The text the model sees before it answers; shared by training and generation."""
    return processor.apply_chat_template([user_message(instruction, question)], add_generation_prompt=True)


def to_rgb(image, where: str):
    """Pages arrive as L, RGB, RGBA, P, CMYK...; the processor wants RGB. Transparency is laid on white paper."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise UserError(f"{where}: expected an image, got {type(image).__name__}. Check image_column.")
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "P", "PA"):
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(paper, rgba).convert("RGB")
    return image.convert("RGB")


class DocVQACollator:
    """Builds Idefics2-style chat batches; see the module docstring for what is trained."""

    def __init__(
        self, processor, instruction: str, max_length: int | None, answer_choice: str = "random", seed: int = 0
    ):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.instruction = instruction
        self.max_length = max_length
        self.answer_choice = answer_choice
        self.rng = random.Random(seed)
        self.end_of_utterance_id = self.tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE)
        if self.end_of_utterance_id == self.tokenizer.unk_token_id:
            raise UserError(f"The tokenizer has no {END_OF_UTTERANCE} token; is this an Idefics2 processor?")

    def pick_answer(self, answers, where: str) -> str:
        if isinstance(answers, str):
            answers = [answers]
        answers = [a for a in (answers or []) if isinstance(a, str) and a.strip()]
        if not answers:
            raise UserError(f"{where}: no non-empty answer. Drop such rows or fix answers_column.")
        return self.rng.choice(answers) if self.answer_choice == "random" else answers[0]

    def __call__(self, rows: list[dict]) -> dict:
        prompts, fulls, images = self._texts_and_images(rows)
        # No truncation: cutting image tokens breaks the model ("Image features and image tokens do not match").
        batch = self.processor(text=fulls, images=images, padding=True, padding_side="right", return_tensors="pt")
        batch["labels"] = self._answer_labels(batch, prompts, fulls, rows)
        return batch

    def lengths(self, rows: list[dict]) -> list[int]:
        """Each row's length in tokens, image tokens included, as a batch would hold it (for checks up front)."""
        _, fulls, images = self._texts_and_images(rows)
        return [len(ids) for ids in self.processor(text=fulls, images=images)["input_ids"]]

    def _texts_and_images(self, rows: list[dict]):
        prompts, fulls, images = [], [], []
        for row in rows:
            where = f"Row {row.get('row', '?')}"
            question = row.get("question")
            if not isinstance(question, str) or not question.strip():
                raise UserError(f"{where}: the question is empty or not text. Check question_column.")
            answer = self.pick_answer(row.get("answers"), where).strip()
            user = user_message(self.instruction, question)
            assistant = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
            prompts.append(prompt_text(self.processor, self.instruction, question))
            fulls.append(self.processor.apply_chat_template([user, assistant]))
            images.append([to_rgb(row.get("image"), where)])
        return prompts, fulls, images

    def _answer_labels(self, batch, prompts, fulls, rows):
        """Keep labels on the answer and its <end_of_utterance>, counted from the end of each sequence.

        The completion's tokens are found by tokenizing the unexpanded prompt and full text: the processor only
        expands `<image>` inside the prompt, so the completion's tokens are the same in the batch.
        """
        input_ids = batch["input_ids"]
        labels = input_ids.new_full(input_ids.shape, IGNORE_INDEX)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        prompt_ids = self.tokenizer(prompts)["input_ids"]
        full_ids = self.tokenizer(fulls)["input_ids"]
        for i, (length, p_ids, f_ids) in enumerate(zip(lengths, prompt_ids, full_ids, strict=True)):
            where = f"Row {rows[i].get('row', '?')}"
            if self.max_length is not None and length > self.max_length:
                raise UserError(
                    f"{where} is {length} tokens, over max_length={self.max_length}. Raise max_length in the "
                    "recipe or lower image_longest_edge; image tokens cannot be truncated."
                )
            if f_ids[: len(p_ids)] != p_ids:
                raise UserError(f"{where}: the answer changes how the prompt is tokenized; cannot mask it.")
            completion = f_ids[len(p_ids) :]
            # Train up to and including the last <end_of_utterance>; what follows it ("\n") is not the answer.
            end = len(completion) - completion[::-1].index(self.end_of_utterance_id)
            start = length - len(completion)
            if input_ids[i, start:length].tolist() != completion:
                raise RuntimeError(f"{where}: processor and tokenizer disagree on the answer tokens.")
            labels[i, start : start + end] = input_ids[i, start : start + end]
        return labels
