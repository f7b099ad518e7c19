"""The PaliGemma family: trained on a prefix (the pages, the instruction and the question) and a suffix (the answer
and the end of sequence), not on chat turns; its processor builds the labels and the token types that mark the
prefix, which the model attends to both ways. Its tower is called positionally (run without grad, but whole)."""

from __future__ import annotations

from docvlm.errors import UserError
from docvlm.families.base import Family
from docvlm.families.llava import POSITIONAL_TOWER
from docvlm.families.sized_memory import SIZED_MEMORY_MODEL
from docvlm.prompts import Prompt, question_of


class PaliGemma(Family):
    name = "PaliGemma"
    memory_model = SIZED_MEMORY_MODEL  # counted from the architecture's sizes
    model_types = ("paligemma",)
    processor_classes = ("PaliGemmaProcessor",)
    why_not = POSITIONAL_TOWER
    frozen_tower = True

    def prompt_text(self, processor, prompt: Prompt, row: dict, pages: int) -> str:
        """One image token a page, then the instruction and the question (the processor adds the begin-of-sequence
        token after the images and a newline at the end)."""
        if row.get("messages") is not None or prompt.system:
            raise UserError(
                f"{self.name} models answer a prefix (pages and question), not a chat: conversations "
                "(messages_column) and system_prompt do not apply to them. Use question/answers columns."
            )
        instruction, question = prompt.instruction.strip(), row["question"].strip()
        return str(processor.image_token) * pages + " ".join(part for part in (instruction, question) if part)

    def _prefixes_answers_and_images(self, collator, rows):
        texts, answers, images = [], [], []
        for row in rows:
            where = f"Row {row.get('row', '?')}"
            if row.get("messages") is None:  # prompt_text refuses a conversation with its own message
                question_of(row, where)
            texts.append(self.prompt_text(collator.processor, collator.prompt, row, len(row["image"])))
            answers.append(collator.pick_answer(row.get("answers"), where).strip())
            images.append(row["image"])
        return texts, answers, images

    def make_batch(self, collator, rows: list[dict]) -> dict:
        """The processor appends each answer and the end of sequence as the suffix and labels the suffix alone."""
        texts, answers, images = self._prefixes_answers_and_images(collator, rows)
        batch = collator.processor(
            text=texts, images=images, suffix=answers, padding=True, padding_side="right", return_tensors="pt"
        )
        if collator.max_length is not None:
            for i, length in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
                if length > collator.max_length:
                    raise UserError(
                        f"Row {rows[i].get('row', '?')} is {length} tokens, over max_length={collator.max_length}. "
                        "Raise max_length in the recipe; image tokens cannot be truncated."
                    )
        return batch

    def lengths(self, collator, rows: list[dict]) -> list[int]:
        texts, answers, images = self._prefixes_answers_and_images(collator, rows)
        return [  # one row at a time: the processor's own labels need rows of one length
            len(collator.processor(text=[t], images=[i], suffix=[a])["input_ids"][0])
            for t, a, i in zip(texts, answers, images, strict=True)
        ]


PALIGEMMA = PaliGemma()
