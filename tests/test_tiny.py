from pathlib import Path

from docvlm import tiny


def test_tokenizer_is_idefics2s(processor):
    tok = processor.tokenizer
    assert len(tok) == 32003
    assert tok.convert_tokens_to_ids(["<fake_token_around_image>", "<image>", "<end_of_utterance>"]) == [
        32000,
        32001,
        32002,
    ]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok("Total")["input_ids"][0] == 1  # BOS is added


def test_tiny_model_matches_its_processor(tiny_model_path):
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(tiny_model_path)
    processor = AutoProcessor.from_pretrained(tiny_model_path)
    assert config.text_config.vocab_size == len(processor.tokenizer) == 32003
    assert config.image_token_id == 32001
    assert config.perceiver_config.resampler_n_latents == processor.image_seq_len
    assert (Path(tiny_model_path) / "model.safetensors").is_file()


def test_synthetic_rows_are_docvqa_shaped_and_do_not_leak_answers():
    rows = tiny.make_rows(200, seed=5)
    assert {r["doc_type"] for r in rows} == {"invoice", "receipt", "form"}
    assert {r["field"] for r in rows} == {"total", "date", "number", "name"}
    for row in rows:
        assert set(row["query"]) == {"en"} and row["answers"]
        assert all(answer not in row["query"]["en"] for answer in row["answers"])
        assert row["image"].mode == "L"
    # the answer is on the page: same seed, same page
    assert tiny.make_rows(3, seed=5)[2]["answers"] == rows[2]["answers"]


def test_no_test_page_is_a_training_page(tiny_dataset_path):
    """Every held-out page against every training page, by pixels: the test split is truly unseen."""
    from datasets import load_dataset

    splits = load_dataset(tiny_dataset_path)
    train_pages = {tiny.page_digest(image) for image in splits["train"]["image"]}
    assert len(splits["train"]) == tiny.TINY_TRAIN_SIZE and len(splits["test"]) == tiny.TINY_TEST_SIZE
    assert not [tiny.page_digest(image) for image in splits["test"]["image"] if tiny.page_digest(image) in train_pages]


def test_a_held_out_draw_redraws_a_page_it_must_avoid():
    """Without `avoid` the seed-2 draw repeats pages of the seed-1 draw; with it, none (what build_tiny_dataset
    relies on)."""
    first = tiny.make_rows(400, seed=1)
    seen = {tiny.page_digest(row["image"]) for row in first}
    plain = tiny.make_rows(400, seed=2)
    assert any(tiny.page_digest(row["image"]) in seen for row in plain)  # the draw alone does repeat pages
    avoided = tiny.make_rows(400, seed=2, avoid=seen)
    assert len(avoided) == 400 and not any(tiny.page_digest(row["image"]) in seen for row in avoided)


def test_incomplete_fixture_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCVLM_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny, "TINY_TRAIN_SIZE", 4)
    monkeypatch.setattr(tiny, "TINY_TEST_SIZE", 2)
    stale = tmp_path / f"tiny-docs-v{tiny.FIXTURE_VERSION}"
    stale.mkdir()
    (stale / "junk").write_text("half a build")
    path = Path(tiny.resolve(tiny.TINY_DATASET))
    assert path == stale and (path / "COMPLETE").exists() and not (path / "junk").exists()
    assert (path / "train.parquet").is_file()
    assert tiny.resolve("some/hub-id") == "some/hub-id"
