"""Property tests of the collator (hypothesis): whatever the answers (unicode, digits, spacing, length), the page
sizes and modes and the mix of rows in a batch, the batch builds and its labels are exactly each answer's tokens
plus <end_of_utterance>."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from docvlm.training.collator import IGNORE_INDEX, DocVQACollator

# Letters and digits of several scripts, punctuation, currency and spaces inside the answer (the collator strips
# the ends, as training does); control characters are not answers.
TEXT = (
    st.text(
        alphabet=st.characters(
            whitelist_categories=("Lu", "Ll", "Lo", "Nd", "Po", "Sc", "Pd", "Zs"), blacklist_characters="\u3000"
        ),
        min_size=1,
        max_size=60,
    )
    .map(lambda s: " ".join(s.split()))
    .filter(bool)
)
MODES = st.sampled_from(["RGB", "L", "RGBA", "P", "CMYK", "LA", "I;16"])
SIZES = st.tuples(st.integers(8, 400), st.integers(8, 400))


@st.composite
def rows(draw):
    count = draw(st.integers(1, 4))
    out = []
    for i in range(count):
        mode, size = draw(MODES), draw(SIZES)
        answer = draw(st.one_of(TEXT, st.integers(-(10**6), 10**6).map(str)))
        out.append({"row": i, "image": Image.new(mode, size), "question": draw(TEXT) + "?", "answers": [answer]})
    return out


@pytest.fixture(scope="module")
def collator(processor):
    return DocVQACollator(processor, "Answer briefly.", max_length=None, answer_choice="first")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch_rows=rows())
def test_labels_are_exactly_the_answer_tokens_and_end_of_utterance(collator, batch_rows):
    batch = collator(batch_rows)
    tokenizer = collator.tokenizer
    for i, row in enumerate(batch_rows):
        labels = batch["labels"][i]
        kept = labels[labels != IGNORE_INDEX].tolist()
        assert kept[-1] == collator.end_of_turn_id
        assert tokenizer.decode(kept[:-1]).strip() == row["answers"][0].strip()
        # every label is the input token at its position, never padding
        positions = (labels != IGNORE_INDEX).nonzero().flatten()
        assert batch["input_ids"][i, positions].tolist() == kept
        assert batch["attention_mask"][i, positions].all()
