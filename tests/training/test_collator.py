import pytest
import torch
from PIL import Image

from docvlm.errors import UserError
from docvlm.families import prompt_text
from docvlm.pages import to_rgb
from docvlm.training.collator import IGNORE_INDEX, DocVQACollator

ANSWERS = ["$56.78", "42", "12/03/2026", "Hugo Müller", "São Paulo, 1.250,00 €", "INV 2024 - 007", "日本語"]


def page(mode="L", size=(300, 400), color=255):
    return Image.new(mode, size, color)


def rows_for(answers, image=None):
    return [
        {"row": i, "image": image or page(), "question": f"What is field {i}?", "answers": [a]}
        for i, a in enumerate(answers)
    ]


def label_tokens(batch, i):
    labels = batch["labels"][i]
    return labels[labels != IGNORE_INDEX].tolist()


def test_only_answer_and_end_of_utterance_are_labels(processor):
    collator = DocVQACollator(processor, "Answer briefly.", max_length=512, answer_choice="first")
    batch = collator(rows_for(ANSWERS))
    for i, answer in enumerate(ANSWERS):
        decoded = processor.tokenizer.decode(label_tokens(batch, i))
        assert decoded == f"{answer}<end_of_utterance>", (answer, decoded)


def test_no_pad_image_fake_or_bos_token_is_a_label(processor):
    collator = DocVQACollator(processor, "Answer briefly.", max_length=512, answer_choice="first")
    batch = collator(rows_for(ANSWERS))
    tok = processor.tokenizer
    forbidden = {
        tok.pad_token_id,
        tok.bos_token_id,
        *tok.convert_tokens_to_ids(["<image>", "<fake_token_around_image>"]),
    }
    labelled = set(batch["labels"][batch["labels"] != IGNORE_INDEX].tolist())
    assert not labelled & forbidden
    # padding exists in this batch (answers differ in length) and is masked
    assert (batch["attention_mask"] == 0).any()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_training_prompt_is_the_generation_prompt_with_bos(processor):
    collator = DocVQACollator(processor, "Answer briefly.", max_length=512, answer_choice="first")
    batch = collator(rows_for(["$56.78"]))
    ids = batch["input_ids"][0].tolist()
    assert ids[0] == processor.tokenizer.bos_token_id
    prompt = processor(
        text=[prompt_text(processor, "Answer briefly.", "What is field 0?")], images=[[page()]], return_tensors="pt"
    )
    prompt_ids = prompt["input_ids"][0].tolist()
    assert ids[: len(prompt_ids)] == prompt_ids
    first_label = next(i for i, t in enumerate(batch["labels"][0].tolist()) if t != IGNORE_INDEX)
    assert first_label == len(prompt_ids)


def test_rendered_conversation_matches_idefics2_template(processor):
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the total?"}]}
    assistant = {"role": "assistant", "content": [{"type": "text", "text": "$56.78"}]}
    text = processor.apply_chat_template([user, assistant])
    assert text == "User:<image>What is the total?<end_of_utterance>\nAssistant: $56.78<end_of_utterance>\n"
    assert (
        prompt_text(processor, "", "What is the total?")
        == "User:<image>What is the total?<end_of_utterance>\nAssistant:"
    )
    image_run = ["<fake_token_around_image>"] + ["<image>"] * processor.image_seq_len + ["<fake_token_around_image>"]
    batch = DocVQACollator(processor, "", max_length=512)(
        [{"row": 0, "image": page(), "question": "Q?", "answers": ["A"]}]
    )
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    start = tokens.index("<fake_token_around_image>")
    assert tokens[start : start + len(image_run)] == image_run
    assert tokens.count("<image>") == processor.image_seq_len


def test_mixed_image_sizes_and_modes_in_one_batch(processor):
    images = [
        page("L", (300, 400)),
        page("RGB", (640, 200), (10, 20, 30)),
        page("RGBA", (120, 500), (0, 0, 0, 0)),
        page("P", (256, 256), 3),
        page("1", (500, 500), 1),
    ]
    rows = [{"row": i, "image": im, "question": "Q?", "answers": ["A"]} for i, im in enumerate(images)]
    batch = DocVQACollator(processor, "Answer briefly.", max_length=512)(rows)
    assert batch["pixel_values"].shape[0] == len(images)
    assert batch["pixel_values"].shape[2] == 3
    # each page keeps its own size inside the padded tensor
    real = batch["pixel_attention_mask"].flatten(2).sum(-1).squeeze(1)
    assert len(set(real.tolist())) > 1
    assert torch.isfinite(batch["pixel_values"]).all()


def test_transparent_pixels_become_white_paper():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(rgba, "Row 0").getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(page("L", (4, 4), 0), "Row 0").mode == "RGB"


def test_too_long_sample_fails_instead_of_truncating(processor):
    collator = DocVQACollator(processor, "Answer briefly.", max_length=20)
    with pytest.raises(UserError, match=r"Row 0 is \d+ tokens, over max_length=20"):
        collator(rows_for(["42"]))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"answers": []}, "no non-empty answer"),
        ({"answers": None}, "no non-empty answer"),
        ({"question": ""}, "question is empty"),
        ({"image": None}, "expected an image"),
    ],
)
def test_bad_rows_name_the_row(processor, bad, message):
    row = {"row": 7, "image": page(), "question": "Q?", "answers": ["A"], **bad}
    with pytest.raises(UserError, match=f"Row 7.*{message}"):
        DocVQACollator(processor, "Answer briefly.", max_length=512)([row])


def test_answer_choice(processor):
    rows = [{"row": 0, "image": page(), "question": "Q?", "answers": ["alpha", "beta", "gamma"]}]
    first = DocVQACollator(processor, "", max_length=512, answer_choice="first")
    assert {processor.tokenizer.decode(label_tokens(first(rows), 0)) for _ in range(5)} == {"alpha<end_of_utterance>"}
    rand = DocVQACollator(processor, "", max_length=512, answer_choice="random", seed=0)
    seen = {processor.tokenizer.decode(label_tokens(rand(rows), 0)) for _ in range(30)}
    assert len(seen) > 1
    single = [{"row": 0, "image": page(), "question": "Q?", "answers": "just one"}]
    assert processor.tokenizer.decode(label_tokens(first(single), 0)) == "just one<end_of_utterance>"


def test_a_conversation_is_asked_its_last_question_with_the_turns_training_saw_before_it(processor):
    import json

    from docvlm.prompts import Prompt

    turns = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Total?"}]},
        {"role": "assistant", "content": "$3"},
        {"role": "user", "content": "Currency?"},
        {"role": "assistant", "content": "USD"},
    ]
    row = {"row": 0, "image": [page()], "messages": json.dumps(turns)}
    prompt = Prompt("Answer briefly.", "Be terse.")
    batch = DocVQACollator(processor, prompt, max_length=512)([row])
    asked = processor(text=[prompt_text(processor, prompt, row)], images=[[page().convert("RGB")]])["input_ids"][0]
    ids = batch["input_ids"][0].tolist()
    assert ids[: len(asked)] == list(asked)  # generation's prompt is training's text up to the last answer
    assert processor.tokenizer.decode(ids[len(asked) :]) == "USD<end_of_utterance>\n"
    assert processor.tokenizer.decode(label_tokens(batch, 0)) == "$3<end_of_utterance> USD<end_of_utterance>"


def test_16_bit_and_float_scans_keep_their_contrast():
    import numpy as np

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64)
    for image in (Image.fromarray(ramp.astype(np.uint16)), Image.fromarray(ramp.astype(np.int32)), page("F")):
        rgb = np.asarray(to_rgb(image, "Row 0"))
        assert rgb.shape[-1] == 3 and rgb.dtype == np.uint8
        if image.mode != "F":
            # black stays black, white white, mid-grey mid-grey: not clipped to a white page
            assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255 and 120 < rgb[32, 0, 0] < 135, image.mode
    eight_bit = Image.fromarray(np.full((4, 4), 200, dtype=np.int32))  # 8-bit values in an I-mode image
    assert np.asarray(to_rgb(eight_bit, "Row 0"))[0, 0, 0] == 200


def test_a_page_that_no_longer_reads_is_skipped_in_its_batch_not_a_crash(processor, tmp_path, capsys):
    """Training batches decode their pages as stored (docvlm.pages.undecoded_pages): a page that breaks after the
    check before training costs its row, said and counted, never the run."""
    import io

    from PIL import Image

    from docvlm.errors import UserError

    buffer = io.BytesIO()
    Image.new("RGB", (60, 40), "white").save(buffer, format="PNG")
    good = {"bytes": buffer.getvalue(), "path": None}
    broken = {"bytes": buffer.getvalue()[:50], "path": None}
    rows = [{"row": i, "image": page, "question": "Total?", "answers": ["7"]} for i, page in enumerate([good, broken])]
    collator = DocVQACollator(processor, "Answer briefly.", None, "first")
    batch = collator(rows)
    assert batch["input_ids"].shape[0] == 1 and collator.skipped == 1
    assert "Row 1: skipped in this batch, its page cannot be read now" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"No row of this batch can be read any more \(1\)"):
        collator(rows[1:])


@pytest.mark.parametrize(
    ("fixture", "longest_edge", "end"),
    [("docvlm:tiny-idefics3", 224, "<end_of_utterance>"), ("docvlm:tiny-granite-docling", 512, "<|end_of_text|>")],
)
def test_pages_split_into_crops_keep_labels_on_the_answer_alone(fixture, longest_edge, end):
    # Idefics3's processor writes newlines between rows of crops: they are the image's, not a text segment
    from docvlm.fixtures import resolve
    from docvlm.recipe.schema import ModelArguments
    from docvlm.training.modeling import load_processor, model_type_at

    path = resolve(fixture)
    options = ModelArguments(do_image_splitting=True, image_longest_edge=longest_edge)
    split = load_processor(options, path, model_type_at(path))
    collator = DocVQACollator(split, "Answer briefly.", max_length=2048, answer_choice="first")
    batch = collator(rows_for(ANSWERS[:3], image=page(size=(600, 800))))
    tokens = split.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    assert "<row_2_col_2>" in tokens  # the page was split into at least 2 x 2 crops
    for i, answer in enumerate(ANSWERS[:3]):
        assert split.tokenizer.decode(label_tokens(batch, i)) == f"{answer}{end}"
