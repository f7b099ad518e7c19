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

import json
import random
import sys
from dataclasses import dataclass

from docvlm.config import UserError
from docvlm.families import family_of_processor
from docvlm.pages import PageProblem, open_page, to_rgb

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Prompt:
    """What the recipe wraps every question in: an instruction before the page(s), and an optional system turn."""

    instruction: str = ""
    system: str | None = None

    @classmethod
    def of(cls, data_args) -> Prompt:
        return cls(data_args.instruction, data_args.system_prompt)


def as_answers(value) -> list[str]:
    """Accepted answers as non-empty strings: a string, a number (converted: 42 -> '42', 3.5 -> '3.5'), or a list
    of them; None, booleans and blanks are not answers."""
    values = value if isinstance(value, list | tuple) else [value]
    out = []
    for item in values:
        if isinstance(item, bool) or item is None:
            continue
        if isinstance(item, float):
            item = str(int(item)) if item.is_integer() else repr(item)  # 42.0 -> '42', never '1.23457e+06'
        elif isinstance(item, int):
            item = str(item)
        if isinstance(item, str) and item.strip():
            out.append(item.strip())
    return out


def user_message(instruction: str, question: str, pages: int = 1) -> dict:
    """The user turn, in the seed's order: instruction, page(s), question."""
    content = [{"type": "image"} for _ in range(pages)] + [{"type": "text", "text": question}]
    if instruction:
        content.insert(0, {"type": "text", "text": instruction})
    return {"role": "user", "content": content}


def text_message(role: str, text: str) -> dict:
    return {"role": role, "content": [{"type": "text", "text": text}]}


def question_of(row: dict, where: str) -> str:
    """A question row's question, checked: non-empty text."""
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise UserError(f"{where}: the question is empty or not text. Check question_column.")
    return question


def pages_of(row: dict, where: str) -> list:
    """A row's pages as RGB images: `image` holds one page or a list of pages (a multi-page document), decoded or
    as stored ({bytes, path}, decoded here; docvlm.pages.PageProblem when one cannot be used)."""
    pages = row.get("image")
    pages = pages if isinstance(pages, list | tuple) else [pages]
    if not pages:
        raise UserError(f"{where}: no image. Check image_column.")
    return [open_page(page, where) if isinstance(page, dict) else to_rgb(page, where) for page in pages]


def normalize_messages(messages, where: str) -> list[dict]:
    """A conversation in the HF chat format, checked and reduced to {role, content: [text and image parts]}.

    Content may be a string or a list of parts; Arrow gives every part every key (`text: None` on an image part),
    so parts are rebuilt from their type. The last turn must be an assistant's: a trailing user turn would
    teach nothing and would be asked in evaluation with no gold answer."""
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as error:
            raise UserError(f"{where}: messages are not valid JSON ({error.msg}).") from None
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: messages must be a non-empty list of {{role, content}} turns.")
    turns = []
    for n, turn in enumerate(messages):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            raise UserError(f"{where}: turn {n} must be {{role, content}} with role one of {', '.join(ROLES)}.")
        content = turn.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise UserError(
                f"{where}: turn {n} content must be text or a list of parts, got {type(content).__name__} "
                f"{json.dumps(content, default=str)[:80]}."
            )
        clean = []
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                clean.append({"type": "image"})
            elif kind == "text" and isinstance(part.get("text"), str):
                clean.append({"type": "text", "text": part["text"]})
            else:
                raise UserError(f"{where}: turn {n} has a part that is neither text nor image: {part!r}.")
        if turn["role"] != "user" and any(p["type"] == "image" for p in clean):
            raise UserError(f"{where}: turn {n} ({turn['role']}) holds an image; only user turns may.")
        if turn["role"] == "assistant" and not "".join(p["text"] for p in clean).strip():
            raise UserError(f"{where}: turn {n} is an empty assistant turn; there is nothing to train on.")
        turns.append({"role": turn["role"], "content": clean})
    if turns[-1]["role"] != "assistant":
        raise UserError(f"{where}: the conversation ends with a {turns[-1]['role']} turn; end it with the answer.")
    return turns


def last_exchange(messages: list[dict]) -> tuple[str, str]:
    """(last user text, last assistant text): what a conversation's evaluation asks and expects."""

    def text(turn):
        return " ".join(p["text"] for p in turn["content"] if p["type"] == "text").strip()

    users = [turn for turn in messages if turn["role"] == "user"]
    return (text(users[-1]) if users else ""), text(messages[-1])


def prompt_messages(row: dict, prompt: Prompt, pages: int) -> list[dict]:
    """The turns the model sees before it answers (generation ends here); shared by training and inference.

    A question row becomes [system], user(instruction, pages, question). A conversation keeps its turns up to its
    last answer, with the instruction put first in its first user turn and the system text first."""
    if row.get("messages") is not None:
        turns = [dict(turn) for turn in normalize_messages(row["messages"], "Row")[:-1]]
        first_user = next((i for i, turn in enumerate(turns) if turn["role"] == "user"), None)
        if prompt.instruction and first_user is not None:
            turns[first_user] = {
                "role": "user",
                "content": [{"type": "text", "text": prompt.instruction}, *turns[first_user]["content"]],
            }
    else:
        turns = [user_message(prompt.instruction, row["question"], pages)]
    if prompt.system and turns[0]["role"] != "system":
        turns.insert(0, text_message("system", prompt.system))
    return turns


def prompt_text(processor, prompt: Prompt | str, row: dict | str, pages: int = 1) -> str:
    """The text the model sees before it answers a row (or one question about one page): the chat up to the answer,
    or, for a family prompted by a prefix, that prefix."""
    prompt = prompt if isinstance(prompt, Prompt) else Prompt(prompt)
    row = {"question": row} if isinstance(row, str) else row
    family = family_of_processor(processor)
    if family.prefix_prompts:
        if row.get("messages") is not None or prompt.system:
            raise UserError(
                f"{family.name} models answer a prefix (pages and question), not a chat: conversations "
                "(messages_column) and system_prompt do not apply to them. Use question/answers columns."
            )
        return family.prefix_text(prompt.instruction, row["question"], pages, str(processor.image_token))
    return processor.apply_chat_template(prompt_messages(row, prompt, pages), add_generation_prompt=True)


class DocVQACollator:
    """Builds chat batches from question rows and conversations; see the module docstring for what is trained."""

    def __init__(
        self,
        processor,
        prompt: Prompt | str,
        max_length: int | None,
        answer_choice: str = "random",
        seed: int = 0,
        page_keys=None,
    ):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.prompt = prompt if isinstance(prompt, Prompt) else Prompt(prompt)
        self.max_length = max_length
        self.answer_choice = answer_choice
        self.rng = random.Random(seed)
        # with a vision feature cache (vision_cache.PageKeys): each page's digest (its key there), and features it
        # holds, made here in the DataLoader workers
        self.page_keys = page_keys
        self.family = family_of_processor(processor)
        self.end_of_turn_id = self.family.end_of_turn_id(self.tokenizer)
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
        rows = self._readable(rows)
        if self.family.prefix_prompts:
            return self._prefix_batch(rows)
        conversations, images = self._conversations_and_images(rows)
        texts = [self.processor.apply_chat_template(turns) for turns in conversations]
        # No truncation: cutting image tokens breaks the model ("Image features and image tokens do not match").
        batch = self.processor(text=texts, images=images, padding=True, padding_side="right", return_tensors="pt")
        batch["labels"] = self._answer_labels(batch, conversations, texts, rows)
        if self.page_keys is not None:
            batch.update(self.page_keys(batch))
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
        if self.family.prefix_prompts:
            texts, answers, images = self._prefixes_answers_and_images(rows)
            return [  # one row at a time: the processor's own labels need rows of one length
                len(self.processor(text=[t], images=[i], suffix=[a])["input_ids"][0])
                for t, a, i in zip(texts, answers, images, strict=True)
            ]
        conversations, images = self._conversations_and_images(rows)
        texts = [self.processor.apply_chat_template(turns) for turns in conversations]
        return [len(ids) for ids in self.processor(text=texts, images=images)["input_ids"]]

    def conversation(self, row: dict, where: str, pages: int) -> list[dict]:
        """The whole training conversation of a row: its prompt turns and the answer(s)."""
        if row.get("messages") is not None:
            turns = normalize_messages(row["messages"], where)
            return [*prompt_messages(row, self.prompt, pages), turns[-1]]
        question_of(row, where)
        answer = self.pick_answer(row.get("answers"), where).strip()
        return [*prompt_messages(row, self.prompt, pages), text_message("assistant", answer)]

    def _prefixes_answers_and_images(self, rows):
        texts, answers, images = [], [], []
        for row in rows:
            where = f"Row {row.get('row', '?')}"
            pages = pages_of(row, where)
            if row.get("messages") is None:  # prompt_text refuses a conversation with its own message
                question_of(row, where)
            texts.append(prompt_text(self.processor, self.prompt, row, len(pages)))
            answers.append(self.pick_answer(row.get("answers"), where).strip())
            images.append(pages)
        return texts, answers, images

    def _prefix_batch(self, rows):
        """A prefix-prompted family's batch: the processor appends each answer and the end of sequence as the
        suffix and labels the suffix alone (token types mark the prefix, which the model attends to both ways)."""
        texts, answers, images = self._prefixes_answers_and_images(rows)
        batch = self.processor(
            text=texts, images=images, suffix=answers, padding=True, padding_side="right", return_tensors="pt"
        )
        if self.max_length is not None:
            for i, length in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
                if length > self.max_length:
                    raise UserError(
                        f"Row {rows[i].get('row', '?')} is {length} tokens, over max_length={self.max_length}. Raise "
                        "max_length in the recipe; image tokens cannot be truncated."
                    )
        return batch

    def _conversations_and_images(self, rows):
        conversations, images = [], []
        for row in rows:
            where = f"Row {row.get('row', '?')}"
            pages = pages_of(row, where)
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
                raise UserError(
                    f"{where} is {length} tokens, over max_length={self.max_length}. Raise max_length in the "
                    "recipe or lower image_longest_edge; image tokens cannot be truncated."
                )
            plain = self.tokenizer(text)["input_ids"]
            plain_labels = [IGNORE_INDEX] * len(plain)
            for start, end in self._assistant_spans(turns, plain, where):
                plain_labels[start:end] = plain[start:end]
            expanded = input_ids[i, :length].tolist()
            image_tokens = self.image_token_ids | (self.special_ids & set(expanded)) - set(plain)
            plain_segments = _text_segments(plain, self.image_token_ids)
            expanded_segments = _text_segments(expanded, image_tokens)
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

    def _assistant_spans(self, turns, plain, where):
        """(start, end) token ranges of each assistant turn in the unexpanded tokens, through its end token; the
        "\\n" a template puts after that token is not the answer."""
        for k, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            before = self.tokenizer(self.processor.apply_chat_template(turns[:k], add_generation_prompt=True))
            through = self.tokenizer(self.processor.apply_chat_template(turns[: k + 1]))
            before, through = before["input_ids"], through["input_ids"]
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


def _text_segments(ids: list[int], image_tokens: set[int]) -> list[tuple[int, int]]:
    """(start, end) of the runs of tokens between images (runs of image tokens), one more than there are images."""
    segments, start = [], 0
    for position, token in enumerate(ids):
        if token in image_tokens:
            if start is not None:
                segments.append((start, position))
                start = None
        elif start is None:
            start = position
    segments.append((start if start is not None else len(ids), len(ids)))
    return segments
