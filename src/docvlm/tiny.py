"""Offline fixtures: a tiny Idefics2 and a synthetic document dataset, built locally.

They let the embedded default recipe, the tests and CI run with no GPU and no Hub. Both are built once into
a cache directory and then loaded *by path*, through exactly the code that loads `HuggingFaceM4/idefics2-8b`
and `nielsr/docvqa_1200_examples`. A recipe names them with the `docvlm:` prefix (see `resolve`).
"""

from __future__ import annotations

import functools
import io
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

TINY_MODEL = "docvlm:tiny-idefics2"
TINY_IDEFICS3 = "docvlm:tiny-idefics3"
TINY_LLAVA = "docvlm:tiny-llava"
TINY_PALIGEMMA = "docvlm:tiny-paligemma"
TINY_DATASET = "docvlm:tiny-docs"
TINY_RECEIPTS = "docvlm:tiny-receipts"
TINY_CHARTS = "docvlm:tiny-charts"
PREFIX = "docvlm:"
FIXTURES = (TINY_MODEL, TINY_IDEFICS3, TINY_LLAVA, TINY_PALIGEMMA, TINY_DATASET, TINY_RECEIPTS, TINY_CHARTS)

# Bump when the fixture's recipe changes, so stale caches are rebuilt rather than reused.
FIXTURE_VERSION = "13"

# Idefics2's chat template, as shipped in the model's processor config.
IDEFICS2_CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IDEFICS2_SPECIAL_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]

# The tiny architecture. Small enough for a CPU, shaped like the real one: a patch vision tower, a perceiver
# resampler and a Mistral decoder with the real 32003-token vocabulary.
TINY_IMAGE_LONGEST_EDGE = 224
TINY_IMAGE_SHORTEST_EDGE = 112
TINY_IMAGE_SEQ_LEN = 16
TINY_CONFIG = {
    "text": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32003,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=1024,
        sliding_window=None,
        pad_token_id=0,
        # as the tokenizer: otherwise transformers 5.17's trainer "aligns" them at every start, with a warning
        bos_token_id=1,
        eos_token_id=2,
    ),
    "vision": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        patch_size=14,
        image_size=TINY_IMAGE_LONGEST_EDGE,
    ),
    "perceiver": dict(
        hidden_size=128,
        resampler_n_latents=TINY_IMAGE_SEQ_LEN,
        resampler_depth=1,
        resampler_n_heads=4,
        resampler_head_dim=32,
        num_key_value_heads=2,
    ),
}


def cache_root() -> Path:
    """Where fixtures are built: $DOCVLM_CACHE, else ~/.cache/docvlm."""
    return Path(os.environ.get("DOCVLM_CACHE", Path.home() / ".cache" / "docvlm")).expanduser()


def resolve(name_or_path: str | None) -> str | None:
    """Turn a `docvlm:` fixture name into a local path, building the fixture on first use.

    Anything else (a Hub id or a local path) is returned unchanged.
    """
    if not name_or_path or not name_or_path.startswith(PREFIX):
        return name_or_path
    builders = {
        TINY_MODEL: build_tiny_model,
        TINY_IDEFICS3: build_tiny_idefics3,
        TINY_LLAVA: build_tiny_llava,
        TINY_PALIGEMMA: build_tiny_paligemma,
        TINY_DATASET: build_tiny_dataset,
        TINY_RECEIPTS: build_tiny_receipts,
        TINY_CHARTS: build_tiny_charts,
    }
    if name_or_path not in builders:
        raise ValueError(f"Unknown fixture {name_or_path!r}; the fixtures are {sorted(builders)}.")
    target = cache_root() / f"{name_or_path[len(PREFIX) :]}-v{FIXTURE_VERSION}"
    if not (target / "COMPLETE").exists():
        print(f"Building the offline fixture {name_or_path} into {target} (once; later runs reuse it)", file=sys.stderr)
        from docvlm.distributed import whole_model_loading

        with whole_model_loading():  # under ZeRO-3, the fixture is still built as one process builds it
            build_atomically(builders[name_or_path], target)
    return str(target)


def build_atomically(builder, target: Path) -> None:
    """Build into a temporary sibling and rename it into place, so an interrupted build is never reused."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        builder(tmp)
        (tmp / "COMPLETE").write_text("ok\n")
        if (target / "COMPLETE").exists():  # another process finished the same build first: keep theirs
            shutil.rmtree(tmp)
            return
        if target.exists():  # a stale, incomplete build
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------------------------
# Tokenizer, processor and model
# --------------------------------------------------------------------------------------------------------------


def mistral_tokenizer_file() -> Path:
    """The Mistral v1 sentencepiece model (identical to Idefics2's) that ships inside `mistral-common`."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall mistral-common (pip install -U mistral-common).")
    return path


def build_tokenizer():
    """Idefics2's tokenizer: Mistral v1 + the three Idefics2 special tokens, padding with <unk>."""
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(mistral_tokenizer_file(), Path(tmp) / "tokenizer.model")
        # from_pretrained on a directory: the vocab_file= constructor silently builds a 3-token vocabulary, and
        # without add_bos_token=True no <s> is added.
        tokenizer = LlamaTokenizer.from_pretrained(tmp, add_bos_token=True)
    tokenizer.add_special_tokens({"additional_special_tokens": IDEFICS2_SPECIAL_TOKENS})
    tokenizer.pad_token = tokenizer.unk_token
    ids = tokenizer.convert_tokens_to_ids(IDEFICS2_SPECIAL_TOKENS)
    assert ids == [32000, 32001, 32002], f"unexpected Idefics2 special token ids {ids}"
    return tokenizer


def image_processor_class(name: str):
    """transformers' image processor class `name`, or its PIL twin where torchvision is missing (transformers 5.17
    has no automatic fallback when a processor is constructed directly)."""
    import transformers
    from transformers.utils import is_torchvision_available

    return getattr(transformers, name if is_torchvision_available() else f"{name}Pil")


def text_config(model_type: str, **changes) -> dict:
    """The tiny decoder's settings for another decoder family (Llama, Gemma), which has no sliding window."""
    settings = {k: v for k, v in TINY_CONFIG["text"].items() if k != "sliding_window"}
    return {"model_type": model_type, **settings, **changes}


def small_vision_config(model_type: str, image_size: int, projection_dim: int) -> dict:
    """A CLIP- or SigLIP-style tower as small as the tiny Idefics2's (2 layers, 4 heads, 14 px patches)."""
    depth = {k: TINY_CONFIG["vision"][k] for k in ("num_hidden_layers", "num_attention_heads", "patch_size")}
    return {
        "model_type": model_type,
        **depth,
        "hidden_size": 64,
        "intermediate_size": 128,
        "image_size": image_size,
        "projection_dim": projection_dim,
    }


def save_random_model(model_class, config, processor, out_dir: Path, seed: int, eos_token_id) -> None:
    """Save a randomly initialised model (safetensors) and its processor, like a Hub snapshot."""
    import torch
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=eos_token_id, pad_token_id=0)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)


def build_processor(
    image_seq_len: int = TINY_IMAGE_SEQ_LEN,
    shortest_edge: int = TINY_IMAGE_SHORTEST_EDGE,
    longest_edge: int = TINY_IMAGE_LONGEST_EDGE,
):
    """Idefics2's processor (Idefics2's defaults are 64 tokens a page and 378-980 px; the tiny model's are less)."""
    from transformers import Idefics2Processor

    image_processor = image_processor_class("Idefics2ImageProcessor")(
        do_image_splitting=False,
        size={"shortest_edge": shortest_edge, "longest_edge": longest_edge},
    )
    return Idefics2Processor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        image_seq_len=image_seq_len,
        chat_template=IDEFICS2_CHAT_TEMPLATE,
    )


def idefics2_config(spec: dict = TINY_CONFIG):
    """An Idefics2Config from a {text, vision, perceiver} spec: the tiny one by default, or bench.IDEFICS2_8B."""
    from transformers import Idefics2Config

    return Idefics2Config(
        text_config={"model_type": "mistral", **spec["text"]},
        vision_config=spec["vision"],
        perceiver_config=spec["perceiver"],
        image_token_id=32001,
        tie_word_embeddings=False,
    )


def build_tiny_model(out_dir: Path, seed: int = 0) -> None:
    """Save a randomly initialised tiny Idefics2 (safetensors) and its processor, like a Hub snapshot."""
    import torch
    from transformers import GenerationConfig, Idefics2ForConditionalGeneration

    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(idefics2_config())
    # transformers initialises the resampler's latents to one constant, so every latent is the same vector: they
    # attend alike, get the same gradients and never tell pages apart, and a random model could never learn to
    # read. A pretrained Idefics2 has distinct latents; give the tiny one distinct random latents.
    resampler = model.model.connector.perceiver_resampler
    torch.nn.init.normal_(resampler.latents, std=1.0)
    # At the usual std 0.02 the resampler's queries and keys are so small that every latent attends to every
    # patch alike and carries only the page average. Larger random queries and keys make each latent attend to
    # its own mix of patches, as a pretrained resampler does, and the tiny model learns to tell values apart
    # sooner (600 steps, two seeds: held-out ANLS 0.59 and 0.40 at std 0.02, 0.67 and 0.77 at std 0.2).
    for layer in resampler.layers:
        torch.nn.init.normal_(layer.self_attn.q_proj.weight, std=0.2)
        torch.nn.init.normal_(layer.self_attn.k_proj.weight, std=0.2)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=[2, 32002], pad_token_id=0)
    model.save_pretrained(out_dir, safe_serialization=True)
    build_processor().save_pretrained(out_dir)


# Idefics3's chat template (HuggingFaceM4/Idefics3-8B-Llama3), less the Llama-3 BOS it writes as text: the tiny
# fixture's Mistral tokenizer adds its own <s>. SmolVLM's differs only in that first token (<|im_start|>).
IDEFICS3_CHAT_TEMPLATE = IDEFICS2_CHAT_TEMPLATE
# The special tokens Idefics3's processor looks up: the image markers, the end of a turn, the whole-page tag and
# the tags of the crops it makes when it splits a page (6 x 6 at most).
IDEFICS3_SPECIAL_TOKENS = [
    *IDEFICS2_SPECIAL_TOKENS,
    "<global-img>",
    *(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)),
]
TINY_IDEFICS3_EDGE = 112  # one 112 px page is 8 x 8 patches of 14, pixel-shuffled by 2: 16 image tokens


def build_tiny_idefics3(out_dir: Path, seed: int = 0) -> None:
    """Save a randomly initialised tiny Idefics3 (Idefics3's real config, processor and chat template; the Mistral
    tokenizer with Idefics3's special tokens) and its processor, like a Hub snapshot."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": IDEFICS3_SPECIAL_TOKENS})
    config = Idefics3Config(
        text_config=text_config("llama", vocab_size=len(tokenizer)),
        vision_config={**TINY_CONFIG["vision"], "image_size": TINY_IDEFICS3_EDGE},
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
    )
    image_processor = image_processor_class("Idefics3ImageProcessor")(
        do_image_splitting=False,
        size={"longest_edge": TINY_IDEFICS3_EDGE},
        max_image_size={"longest_edge": TINY_IDEFICS3_EDGE},
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=16, chat_template=IDEFICS3_CHAT_TEMPLATE
    )
    end = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    save_random_model(Idefics3ForConditionalGeneration, config, processor, out_dir, seed, [2, end])


# LLaVA-1.5's chat template (llava-hf/llava-1.5-7b-hf): "USER: <image>\n<text> ASSISTANT: <answer> ", with no end
# token after the answer (docvlm.families appends </s> in training).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
TINY_LLAVA_EDGE = 112  # a page is resized and center-cropped to 112 x 112, as LLaVA-1.5's to 336: 64 image tokens


def build_tiny_llava(out_dir: Path, seed: int = 0) -> None:
    """Save a randomly initialised tiny LLaVA-1.5 (a CLIP tower, a two-layer projector and a Llama decoder, with
    LLaVA's processor and chat template; the Mistral tokenizer with its <image> token) and its processor."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = build_tokenizer()
    config = LlavaConfig(
        text_config=text_config("llama"),
        vision_config=small_vision_config("clip_vision_model", TINY_LLAVA_EDGE, projection_dim=64),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    image_processor = image_processor_class("CLIPImageProcessor")(
        size={"shortest_edge": TINY_LLAVA_EDGE}, crop_size={"height": TINY_LLAVA_EDGE, "width": TINY_LLAVA_EDGE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=TINY_CONFIG["vision"]["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, which the "default" strategy drops
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    save_random_model(LlavaForConditionalGeneration, config, processor, out_dir, seed, eos_token_id=2)


TINY_PALIGEMMA_EDGE = 112  # a page is resized to 112 x 112, as PaliGemma's to 224, 448 or 896: 64 image tokens


def build_tiny_paligemma(out_dir: Path, seed: int = 0) -> None:
    """Save a randomly initialised tiny PaliGemma (a SigLIP tower, a linear projector and a Gemma decoder, with
    PaliGemma's processor, which adds its <image>, <locNNNN> and <segNNN> tokens; the Mistral tokenizer stands in for
    Gemma's, which no installed package ships) and its processor."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    image_processor = image_processor_class("SiglipImageProcessor")(
        size={"height": TINY_PALIGEMMA_EDGE, "width": TINY_PALIGEMMA_EDGE}
    )
    image_processor.image_seq_length = (TINY_PALIGEMMA_EDGE // TINY_CONFIG["vision"]["patch_size"]) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=build_tokenizer())
    hidden, heads = TINY_CONFIG["text"]["hidden_size"], TINY_CONFIG["text"]["num_attention_heads"]
    config = PaliGemmaConfig(
        text_config=text_config("gemma", vocab_size=len(processor.tokenizer), head_dim=hidden // heads),
        vision_config=small_vision_config("siglip_vision_model", TINY_PALIGEMMA_EDGE, projection_dim=hidden),
        image_token_index=processor.image_token_id,
        projection_dim=hidden,
        hidden_size=hidden,
    )
    save_random_model(PaliGemmaForConditionalGeneration, config, processor, out_dir, seed, eos_token_id=2)


# --------------------------------------------------------------------------------------------------------------
# Synthetic documents in DocVQA's schema
# --------------------------------------------------------------------------------------------------------------

TINY_TRAIN_SIZE = 4800  # one epoch of the tiny recipe (600 steps of 8): no page is trained on twice
TINY_TEST_SIZE = 100

# A bounded answer space (4 values a field, of different lengths and shapes) in large type, so that telling them
# apart is within a tiny model's reach. The values of a field share few characters, so a blind guess earns
# little partial ANLS.
_VALUES = {
    "total": ["$5", "$48.10", "$1,205.99", "$730"],
    "date": ["3 JAN", "17/04/2026", "JULY 25", "9.10.26"],
    "number": ["7", "4821", "A-190-22", "365"],
    "name": ["Bo Chen", "Inés", "Emma Schmidt", "Farid H."],
}
FIELDS_PER_PAGE = 1
_DOC_TYPES = {  # the label each kind of document gives a field; questions name fields by these labels
    "invoice": {"total": "Total due", "date": "Date", "number": "Invoice No", "name": "Customer"},
    "receipt": {"total": "Total", "date": "Date", "number": "Receipt No", "name": "Cashier"},
    "form": {"total": "Amount", "date": "Date", "number": "Form No", "name": "Name"},
}


def _question(field: str, label: str) -> str:
    person = field == "name" and label != "Name"
    return f"{'Who' if person else 'What'} is the {label.lower()}?"


@functools.cache  # a few sizes a page: load each once, not per page
def font(size: int):
    """DejaVu Sans (shipped with matplotlib) covers accented names; PIL's default font is the fallback."""
    from PIL import ImageFont

    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans", fallback_to_default=False), size)
    except Exception:  # noqa: BLE001 - no matplotlib or no font: still render, with fewer glyphs
        return ImageFont.load_default(size=size)


def render_document(rng: random.Random, values: list[str]):
    """Draw a page: each value in large type, one under the other, from the top-left margin. Page size and
    shape, type size, line spacing, ink and paper vary; nothing else is on the page.

    What the tiny model can learn in a few CPU minutes set this design (600 steps, held-out ANLS, blind guess
    ~0.29, resampler at transformers' init): with the value at a fixed margin, after 0.61-0.64; moved by up to
    8 px, or with a title or labels also on the page, 0.26-0.59 depending on the seed; placed anywhere,
    0.38-0.39. A tiny vision tower trained from scratch pools the whole page and has not yet learned where to
    look; a pretrained one has.
    """
    from PIL import Image, ImageDraw

    width, height = rng.choice([(480, 360), (520, 400), (440, 440)])
    page = Image.new("L", (width, height), color=rng.randint(225, 255))
    draw = ImageDraw.Draw(page)
    x, y = 6, 6
    for value in values:
        size = rng.randint(60, 72)
        while size > 40 and draw.textlength(value, font=font(size)) > width - x - 5:
            size -= 4  # the longest names: smaller type rather than clipped off the page edge
        draw.text((x, y), value, fill=rng.randint(0, 40), font=font(size))
        y += size + rng.randint(12, 24)
    return page


def page_digest(image) -> str:
    """A page's pixel content, whatever its file encoding."""
    import hashlib

    return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()


def make_rows(n: int, seed: int, avoid: set[str] | frozenset = frozenset()) -> list[dict]:
    """Synthetic rows with DocVQA's columns (id, image, query by language, answers list) plus doc_type and field.

    Each page shows FIELDS_PER_PAGE of the four fields' values; the question names a field by the document
    type's label for it, never its value, and the answer is that field's value on the page. A page whose pixels
    are in `avoid` (page_digest) is drawn again: a held-out split avoids the training pages.
    """
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    rows = []
    bar = tqdm(total=n, desc="Rendering synthetic pages", unit="page", leave=False)
    while len(rows) < n:
        i = len(rows)
        doc_type = rng.choice(sorted(_DOC_TYPES))
        labels = _DOC_TYPES[doc_type]
        fields = rng.sample(sorted(_VALUES), FIELDS_PER_PAGE)
        values = {field: rng.choice(_VALUES[field]) for field in fields}
        asked = rng.choice(fields)
        answer = values[asked]
        answers = [answer, answer.lstrip("$")] if answer.startswith("$") else [answer]
        page = render_document(rng, [values[f] for f in fields])
        if avoid and page_digest(page) in avoid:
            continue
        bar.update()
        rows.append(
            {
                "id": f"{seed}-{i}",
                "image": page,
                "query": {"en": _question(asked, labels[asked])},
                "answers": answers,
                "doc_type": doc_type,
                "field": asked,
            }
        )
    bar.close()
    return rows


def build_tiny_dataset(out_dir: Path) -> None:
    """Render train and held-out test splits as parquet files, loadable with `datasets.load_dataset(out_dir)`."""
    from datasets import Dataset, Features, Image, List, Value

    features = Features(
        {
            "id": Value("string"),
            "image": Image(),
            "query": {"en": Value("string")},
            "answers": List(Value("string")),
            "doc_type": Value("string"),
            "field": Value("string"),
        }
    )
    train = make_rows(TINY_TRAIN_SIZE, seed=1)
    test = make_rows(TINY_TEST_SIZE, seed=2, avoid={page_digest(row["image"]) for row in train})  # truly unseen
    for split, rows in (("train", train), ("test", test)):
        Dataset.from_list(rows, features=features).to_parquet(str(out_dir / f"{split}.parquet"))
    # A dataset card with a metadata block: without one, `datasets` logs "Repo card metadata block was not found".
    (out_dir / "README.md").write_text(
        "---\npretty_name: docvlm tiny documents\nlicense: apache-2.0\n---\n\n"
        "Synthetic documents rendered by docvlm.tiny (invoices, receipts, order forms) in DocVQA's schema.\n"
    )
    (out_dir / "fixture.json").write_text(json.dumps({"train": TINY_TRAIN_SIZE, "test": TINY_TEST_SIZE}))


# Receipts in the key-information-extraction layout: one row per receipt, one column per field, as receipt
# datasets ship them (recipes/receipts_kie_qlora.yaml turns the fields into questions).
TINY_RECEIPTS_SIZE = 400
_RECEIPT_VALUES = {
    "company": ["ACME TRADING", "SUNRISE MART", "KEDAI BUKU ALI", "NORTHWIND CAFE", "BLUE OAK HARDWARE"],
    "date": ["03/01/2026", "17-04-2026", "25 JUL 2026", "2026.10.09", "11/12/2025"],
    "address": [
        "12 JALAN BESAR, 50000 KUALA LUMPUR",
        "4 HARBOUR ROAD, SPRINGFIELD 62704",
        "NO. 8, LORONG 3, TAMAN JAYA, 81100 JOHOR",
        "221B MARKET STREET, LEEDS LS1 6DP",
        "",  # a receipt without an address: the field is empty and skipped
    ],
    "total": ["5.00", "48.10", "1,205.99", "730.50", "12.35"],
}


def render_receipt(rng: random.Random, values: list[str]):
    """A receipt-shaped page: the company, address, date and total one under the other, in smaller type than the
    single-field documents, as receipts print them."""
    from PIL import Image, ImageDraw

    width, height = rng.choice([(360, 520), (400, 560)])
    page = Image.new("L", (width, height), color=rng.randint(225, 255))
    draw = ImageDraw.Draw(page)
    y = 10
    for value in values:
        size = rng.randint(22, 28)
        while size > 12 and draw.textlength(value, font=font(size)) > width - 12:
            size -= 2
        draw.text((6, y), value, fill=rng.randint(0, 40), font=font(size))
        y += size + rng.randint(16, 30)
    return page


def build_tiny_receipts(out_dir: Path) -> None:
    """One parquet file of receipts, one row per receipt with company, date, address (sometimes empty) and total
    columns, and no held-out split: the recipe carves one (eval_split_size)."""
    from datasets import Dataset, Features, Image, Value
    from tqdm.auto import tqdm

    rng = random.Random(3)
    rows = []
    for _ in tqdm(range(TINY_RECEIPTS_SIZE), desc="Rendering synthetic receipts", unit="page", leave=False):
        values = {field: rng.choice(options) for field, options in _RECEIPT_VALUES.items()}
        lines = [values["company"], values["address"], values["date"], f"TOTAL {values['total']}"]
        rows.append({"image": render_receipt(rng, [line for line in lines if line]), **values})
    features = Features({"image": Image(), **{field: Value("string") for field in _RECEIPT_VALUES}})
    Dataset.from_list(rows, features=features).to_parquet(str(out_dir / "receipts.parquet"))
    (out_dir / "README.md").write_text(
        "---\npretty_name: docvlm tiny receipts\nlicense: apache-2.0\n---\n\n"
        "Synthetic receipts rendered by docvlm.tiny: one row per receipt, a column per field.\n"
    )


# Bar charts in ChartQA's schema (image, query, label: a list of answers, human_or_machine: a class label) with
# train / val / test splits, as HuggingFaceM4/ChartQA has them (recipes/chartqa_qlora.yaml).
TINY_CHARTS_SIZES = {"train": 240, "val": 20, "test": 40}
_CHART_CATEGORIES = ["2019", "2020", "2021", "2022", "2023", "North", "South", "East", "West", "Retail", "Online"]


def render_chart(rng: random.Random, categories: list[str], values: list[int], axes):
    """A small bar chart with its values printed on the bars, as ChartQA's statistics-site charts print them. One
    figure is redrawn for every chart: making a figure costs more than drawing one."""
    import numpy as np
    from PIL import Image

    axes.clear()
    bars = axes.bar(categories, values, color=rng.choice(["#4472c4", "#ed7d31", "#70ad47", "#5b9bd5"]))
    axes.bar_label(bars, fontsize=8)
    axes.set_title(rng.choice(["Sales", "Visitors", "Revenue (million)", "Share of users (%)"]), fontsize=9)
    axes.tick_params(labelsize=7)
    axes.figure.canvas.draw()
    return Image.fromarray(np.asarray(axes.figure.canvas.buffer_rgba())).convert("RGB")


def chart_row(rng: random.Random, axes) -> dict:
    """A chart with one question: a value read off a bar (machine-written) or a comparison (human-written)."""
    categories = rng.sample(_CHART_CATEGORIES, rng.randint(3, 5))
    values = [rng.randint(2, 99) for _ in categories]
    kind = rng.random()
    if kind < 0.6:
        pick = rng.randrange(len(categories))
        query, label, source = f"What is the value of {categories[pick]}?", str(values[pick]), 1
    elif kind < 0.8:
        best = max(range(len(values)), key=values.__getitem__)
        query, label, source = "Which category has the highest value?", categories[best], 0
    else:
        a, b = rng.sample(range(len(categories)), 2)
        query = f"What is the difference between {categories[a]} and {categories[b]}?"
        label, source = str(abs(values[a] - values[b])), 0
    image = render_chart(rng, categories, values, axes)
    return {"image": image, "query": query, "label": [label], "human_or_machine": source}


def build_tiny_charts(out_dir: Path) -> None:
    from datasets import ClassLabel, Dataset, Features, Image, List, Value
    from tqdm.auto import tqdm

    features = Features(
        {
            "image": Image(),
            "query": Value("string"),
            "label": List(Value("string")),
            "human_or_machine": ClassLabel(names=["human", "machine"]),
        }
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = random.Random(5)
    figure, axes = plt.subplots(figsize=(3.2, 2.4), dpi=70)
    figure.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.88)
    with tqdm(total=sum(TINY_CHARTS_SIZES.values()), desc="Rendering synthetic charts", unit="chart") as bar:
        for split, size in TINY_CHARTS_SIZES.items():
            rows = []
            for _ in range(size):
                rows.append(chart_row(rng, axes))
                bar.update()
            Dataset.from_list(rows, features=features).to_parquet(str(out_dir / f"{split}.parquet"))
    plt.close(figure)
    (out_dir / "README.md").write_text(
        "---\npretty_name: docvlm tiny charts\nlicense: apache-2.0\n---\n\n"
        "Synthetic bar charts rendered with matplotlib by docvlm.tiny, in ChartQA's schema.\n"
    )


def export_pages(out_dir: Path, count: int, metadata_csv: bool = False) -> Path:
    """Write the first `count` held-out pages as PNG files with a questions.jsonl beside them, to try `predict` on,
    or with a metadata.csv (file_name,question,answer): a folder of scans as recipes/local_folder_qlora.yaml reads.

    They come from the test split, which training never sees. Returns the questions.jsonl / metadata.csv path."""
    import csv

    import pyarrow.parquet as pq
    from PIL import Image

    table = pq.read_table(Path(resolve(TINY_DATASET)) / "test.parquet", columns=["image", "query", "answers"])
    rows = table.slice(0, count).to_pylist()
    if len(rows) < count:
        raise ValueError(f"The held-out split has {len(rows)} pages; ask for at most that many.")
    out_dir.mkdir(parents=True, exist_ok=True)
    items = []
    for index, row in enumerate(rows):
        name = f"page-{index:03d}.png"
        with Image.open(io.BytesIO(row["image"]["bytes"])) as page:
            page.save(out_dir / name)
        items.append({"image": name, "question": row["query"]["en"], "answers": row["answers"]})
    if metadata_csv:
        path = out_dir / "metadata.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file_name", "question", "answer"])
            writer.writerows([item["image"], item["question"], item["answers"][0]] for item in items)
        return path
    path = out_dir / "questions.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path
