"""Turn document rows into training batches whose loss covers the assistant's answers only.

Written by hand because TRL's vision collator either trains on every token (messages rows: prompt, padding and
image tokens included) or drops BOS in training while generation adds it (prompt/completion rows), and
`assistant_only_loss` is refused for VLMs. Here labels are -100 everywhere except each trained assistant turn and
the token that closes it (the model family's end of turn, `docvlm.families`), and prompts are built by the same
function that inference uses.

A row is one question about one or more pages (`question`, `answers`, `image`: a page or a list of pages), or a
conversation (`messages`: JSON of the TRL/HF chat `messages` format, with `{"type": "image"}` parts): every
assistant turn of a conversation is trained, every system and user turn masked.
"""

from __future__ import annotations

import random
import sys

from docvlm.conversations import as_answers, normalize_messages
from docvlm.errors import UserError
from docvlm.families import family_of_processor
from docvlm.pages import PageProblem, pages_of
from docvlm.prompts import Prompt, prompt_messages, question_of, special_tokens_for, text_message

IGNORE_INDEX = -100


class DocVQACollator:
    """Builds chat batches from question rows and conversations; see the module docstring for what is trained."""

    def __init__(
        self,
        processor,
        prompt: Prompt | str,
        max_length: int | None,
        answer_choice: str = "random",
        seed: int = 0,
    ):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.prompt = prompt if isinstance(prompt, Prompt) else Prompt(prompt)
        self.max_length = max_length
        self.answer_choice = answer_choice
        self.rng = random.Random(seed)
        self.family = family_of_processor(processor)
        self.end_of_turn_id = self.family.end_of_turn_id(self.tokenizer, processor.chat_template)
        # the placeholder the chat template writes per image, and the special tokens the processor may expand it to
        self.image_token_ids = {self.tokenizer.convert_tokens_to_ids(str(getattr(processor, "image_token", "<image>")))}
        self.special_ids = set(self.tokenizer.all_special_ids) | {
            token_id for token_id, token in self.tokenizer.added_tokens_decoder.items() if token.special
        }

    def pick_answer(self, answers, where: str) -> str:
        answers = as_answers(answers)
        if not answers:
            raise UserError(f"{where}: no non-empty answer. Drop such rows or fix answers_column.")
        return self.rng.choice(answers) if self.answer_choice == "random" else answers[0]

    def __call__(self, rows: list[dict]) -> dict:
        """A batch of rows, in the family's format (chat turns for most: chat_batch)."""
        return self.family.make_batch(self, self._readable(rows))

    def chat_batch(self, rows: list[dict]) -> dict:
        """The rows' conversations through the chat template, labels on the answers only."""
        conversations, images = self._conversations_and_images(rows)
        texts = [self.processor.apply_chat_template(turns) for turns in conversations]
        # No truncation: cutting image tokens breaks the model ("Image features and image tokens do not match").
        extra = special_tokens_for(self.tokenizer, texts)
        batch = self.processor(
            text=texts, images=images, padding=True, padding_side="right", return_tensors="pt", **extra
        )
        batch["labels"] = self._answer_labels(batch, conversations, texts, rows)
        return batch

    skipped = 0  # rows dropped from batches because a page could no longer be read

    def _readable(self, rows: list[dict]) -> list[dict]:
        """The rows with their pages decoded, less any whose page cannot be read any more (a file changed or
        removed after the check before training): each is skipped, said and counted, never a crash mid-run."""
        readable = []
        for row in rows:
            where = f"Row {row.get('row', '?')}"
            try:
                readable.append({**row, "image": pages_of(row, where)})
            except PageProblem as problem:
                self.skipped += 1
                print(
                    f"{where}: skipped in this batch, its page cannot be read now ({problem}), though it could "
                    f"before training ({self.skipped} row(s) so far).",
                    file=sys.stderr,
                )
        if not readable:
            raise UserError(
                f"No row of this batch can be read any more ({', '.join(str(r.get('row', '?')) for r in rows)}): "
                "the dataset's files changed after the check before training. Train again to check them anew."
            )
        return readable

    def lengths(self, rows: list[dict]) -> list[int]:
        """Each row's length in tokens, image tokens included, as a batch would hold it (for checks up front)."""
        rows = [{**row, "image": pages_of(row, f"Row {row.get('row', '?')}")} for row in rows]
        return self.family.lengths(self, rows)

    def chat_lengths(self, rows: list[dict]) -> list[int]:
        conversations, images = self._conversations_and_images(rows)
        texts = [self.processor.apply_chat_template(turns) for turns in conversations]
        extra = special_tokens_for(self.tokenizer, texts)
        return [len(ids) for ids in self.processor(text=texts, images=images, **extra)["input_ids"]]

    def conversation(self, row: dict, where: str, pages: int) -> list[dict]:
        """The whole training conversation of a row: its prompt turns and the answer(s)."""
        if row.get("messages") is not None:
            turns = normalize_messages(row["messages"], where)
            return [*prompt_messages(row, self.prompt, pages), turns[-1]]
        question_of(row, where)
        answer = self.pick_answer(row.get("answers"), where).strip()
        return [*prompt_messages(row, self.prompt, pages), text_message("assistant", answer)]

    def _conversations_and_images(self, rows):
        conversations, images = [], []
        for row in rows:
            where = f"Row {row.get('row', '?')}"
            pages = row["image"]
            turns = self.family.training_turns(self.conversation(row, where, len(pages)), self.tokenizer)
            placeholders = sum(p["type"] == "image" for turn in turns for p in turn["content"])
            if placeholders != len(pages):
                raise UserError(
                    f"{where}: the conversation has {placeholders} image part(s) but the row has {len(pages)} "
                    'page(s); each page needs one {"type": "image"} part in a user turn.'
                )
            conversations.append(turns)
            images.append(pages)
        return conversations, images

    def _answer_labels(self, batch, conversations, texts, rows):
        """Keep labels on every assistant turn and the token that closes it; mask everything else.

        Each turn's tokens are found in the *unexpanded* text (the chat template before the processor turns each
        image placeholder into many image tokens): the tokens of the prompt up to that turn are a prefix of the
        tokens up to its end. Those labels are carried onto the batch text segment by text segment (the tokens
        between images), counted from each segment's end: the first token after an image may tokenize differently
        once the image is expanded ("What" / "▁What"), the tokens before the next image never do."""
        input_ids = batch["input_ids"]
        labels = input_ids.new_full(input_ids.shape, IGNORE_INDEX)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        for i, (length, turns, text) in enumerate(zip(lengths, conversations, texts, strict=True)):
            where = f"Row {rows[i].get('row', '?')}"
            if self.max_length is not None and length > self.max_length:
                fewer = f" or {self.family.smaller_pages}" if self.family.smaller_pages else ""
                raise UserError(
                    f"{where} is {length} tokens, over max_length={self.max_length}. Raise max_length in the "
                    f"recipe{fewer}; image tokens cannot be truncated."
                )
            plain = self._tokens(text)
            plain_labels = [IGNORE_INDEX] * len(plain)
            for start, end in self._assistant_spans(turns, plain, where):
                plain_labels[start:end] = plain[start:end]
            expanded = input_ids[i, :length].tolist()
            image_tokens = self.image_token_ids | (self.special_ids & set(expanded)) - set(plain)
            plain_segments = _text_segments(plain, self.image_token_ids, self._is_blank)
            expanded_segments = _text_segments(expanded, image_tokens, self._is_blank)
            if len(plain_segments) != len(expanded_segments):
                raise RuntimeError(f"{where}: the processor expanded the images into an unexpected layout.")
            for (p_start, p_end), (e_start, e_end) in zip(plain_segments, expanded_segments, strict=True):
                for back in range(1, p_end - p_start + 1):
                    label = plain_labels[p_end - back]
                    if label == IGNORE_INDEX:
                        continue
                    if back > e_end - e_start or expanded[e_end - back] != label:
                        raise RuntimeError(f"{where}: processor and tokenizer disagree on the answer tokens.")
                    labels[i, e_end - back] = label
        return labels

    def _is_blank(self, ids: list[int]) -> bool:
        return not self.tokenizer.decode(ids).strip()

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, **special_tokens_for(self.tokenizer, [text]))["input_ids"]

    def _assistant_spans(self, turns, plain, where):
        """(start, end) token ranges of each assistant turn in the unexpanded tokens, through its end token; the
        "\\n" a template puts after that token is not the answer."""
        for k, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            before = self._tokens(self.processor.apply_chat_template(turns[:k], add_generation_prompt=True))
            through = self._tokens(self.processor.apply_chat_template(turns[: k + 1]))
            if through[: len(before)] != before or plain[: len(before)] != before:
                raise UserError(f"{where}: an answer changes how the prompt is tokenized; cannot mask it.")
            answer = through[len(before) :]
            if self.end_of_turn_id not in answer:
                raise RuntimeError(
                    f"{where}: the chat template closed no assistant turn with {self.family.name}'s end of turn "
                    f"({self.tokenizer.convert_ids_to_tokens(self.end_of_turn_id)})."
                )
            end = len(before) + len(answer) - answer[::-1].index(self.end_of_turn_id)
            if plain[len(before) : end] != through[len(before) : end]:
                raise UserError(f"{where}: a later turn changes how an answer is tokenized; cannot mask it.")
            yield len(before), end


def _text_segments(ids: list[int], image_tokens: set[int], is_blank) -> list[tuple[int, int]]:
    """(start, end) of the runs of tokens between images (runs of image tokens): the text before the first image,
    after the last, and between two images unless it is only whitespace (`is_blank`): a processor that splits a page
    into crops may write newlines between its rows of crops, and those belong to the image, not the text."""
    runs, start = [], 0
    for position, token in enumerate(ids):
        if token in image_tokens:
            if start is not None:
                runs.append((start, position))
                start = None
        elif start is None:
            start = position
    runs.append((start if start is not None else len(ids), len(ids)))
    inner = runs[1:-1]
    return [runs[0], *(r for r in inner if not is_blank(ids[r[0] : r[1]])), runs[-1]] if inner else runs
