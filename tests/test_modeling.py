import json

import pytest
import torch
from transformers import AutoModel, AutoModelForImageTextToText, DynamicCache, SiglipVisionConfig

from tokenpacker_hf import TokenPackerConfig, TokenPackerForConditionalGeneration, TokenPackerModel
from tokenpacker_hf.image_processing_tokenpacker import num_tiles
from tokenpacker_hf.modeling_tokenpacker import tiles_per_image

from builders import TOKENS, make_model, pixels, prompt
from tiny import IMAGE_TOKEN_ID, tiny_config, vision_config


def count_runs(module: torch.nn.Module, calls: list[int], index: int = 0) -> None:
    """Counts runs of `module.forward` in `calls[index]`. Wrapping `forward` (not a hook on `__call__`) also
    counts an activation-checkpointing recompute, during which torch does not fire module hooks."""
    forward = module.forward

    def counted(*args, **kwargs):
        calls[index] += 1
        return forward(*args, **kwargs)

    module.forward = counted


class LayerCounter:
    """Counts runs of each vision encoder layer (through its MLP, which every run of the layer calls)."""

    def __init__(self, model: TokenPackerForConditionalGeneration):
        self.calls = [0] * len(model.model.vision_tower.encoder.layers)
        for index, layer in enumerate(model.model.vision_tower.encoder.layers):
            count_runs(layer.mlp, self.calls, index)


# --- forward and features ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "projector_type, scale_factor, tokens",
    [
        ("tokenpacker", 1, 16),
        ("tokenpacker", 2, 4),
        ("tokenpacker", 4, 1),
        ("mlp", 2, 16),
        ("avg_pool", 2, 4),
        ("pixel_shuffle", 4, 1),
    ],
)
def test_forward_shapes_for_every_projector(projector_type, scale_factor, tokens):
    model = make_model(projector_type=projector_type, scale_factor=scale_factor)
    ids = torch.tensor([prompt(tokens=tokens)])
    out = model(input_ids=ids, pixel_values=pixels(1))
    assert out.logits.shape == (1, ids.shape[1], model.config.text_config.vocab_size)
    assert out.image_hidden_states.shape == (tokens, model.config.text_config.hidden_size)


def test_vision_tower_stops_at_the_deepest_needed_layer():
    model = make_model()  # 4 layers; query -2 = layer 3, regions [1, 2, 3]
    counter = LayerCounter(model)
    model(input_ids=torch.tensor([prompt()]), pixel_values=pixels(1))
    assert counter.calls == [1, 1, 1, 0]

    baseline = make_model(projector_type="avg_pool", vision_feature_layer=2)
    counter = LayerCounter(baseline)
    baseline(input_ids=torch.tensor([prompt()]), pixel_values=pixels(1))
    assert counter.calls == [1, 1, 0, 0]


def test_projector_inputs_equal_the_full_towers_hidden_states():
    model = make_model(region_feature_layers=[0, 2, 3])
    pv = pixels(3)
    query, region = model.model.get_vision_features(pv)
    with torch.no_grad():
        hidden = model.model.vision_tower(pv, output_hidden_states=True).hidden_states
    assert len(hidden) == 5
    torch.testing.assert_close(query, hidden[-2][:, 1:], rtol=0, atol=0)
    expected = torch.cat([hidden[0][:, 1:], hidden[2][:, 1:], hidden[3][:, 1:]], dim=-1)
    torch.testing.assert_close(region, expected, rtol=0, atol=0)


def test_siglip_tower_without_cls_uses_full_strategy():
    siglip = SiglipVisionConfig(
        **{k: v for k, v in vision_config().items() if k not in ("model_type", "projection_dim")}
    )
    config = TokenPackerConfig(
        **{**tiny_config().to_dict(), "vision_config": siglip.to_dict(), "vision_feature_select_strategy": "full"}
    )
    model = TokenPackerForConditionalGeneration(config).eval()
    assert type(model.model.vision_tower).__name__ == "SiglipVisionModel"
    out = model(input_ids=torch.tensor([prompt()]), pixel_values=pixels(1))
    assert out.image_hidden_states.shape == (TOKENS, config.text_config.hidden_size)


def test_image_features_are_grouped_per_image_by_slice_grid():
    model = make_model()
    grids = torch.tensor([[1, 1], [2, 3], [1, 2]])  # 1, 6+1 and 2+1 tiles
    features = model.get_image_features(pixels(11), image_grids=grids).pooler_output
    assert [f.shape[0] for f in features] == [1 * TOKENS, 7 * TOKENS, 3 * TOKENS]
    with pytest.raises(ValueError, match=r"describe 11 tiles, but pixel_values holds 10"):
        model.get_image_features(pixels(10), image_grids=grids)


def test_inputs_embeds_path_finds_image_positions_by_embedding():
    model = make_model()
    ids = torch.tensor([prompt()])
    embeds = model.get_input_embeddings()(ids)
    by_ids = model(input_ids=ids, pixel_values=pixels(1)).logits
    by_embeds = model(inputs_embeds=embeds, pixel_values=pixels(1)).logits
    torch.testing.assert_close(by_ids, by_embeds)


# --- bad input -----------------------------------------------------------------------------------


def test_image_token_count_mismatch_names_both_numbers():
    model = make_model()
    with pytest.raises(ValueError, match=r"text holds 8 <image> tokens but the images give 4 features"):
        model(input_ids=torch.tensor([prompt(images=2)]), pixel_values=pixels(1))


def test_wrong_pixel_size_names_expected_and_found_shape():
    model = make_model()
    with pytest.raises(ValueError, match=r"\[tiles, 3, 16, 16\].*got \[1, 3, 32, 32\]"):
        model(input_ids=torch.tensor([prompt()]), pixel_values=torch.zeros(1, 3, 32, 32))


# --- save / load ---------------------------------------------------------------------------------


def test_save_load_round_trip_twice_and_auto_classes(tmp_path):
    model = make_model()
    ids, pv = torch.tensor([prompt()]), pixels(1)
    expected = model(input_ids=ids, pixel_values=pv).logits
    model.save_pretrained(tmp_path / "a")
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "configuration_tokenpacker.py",
        "modeling_tokenpacker.py",
        "projector_tokenpacker.py",
    } <= files
    auto_map = json.loads((tmp_path / "a" / "config.json").read_text())["auto_map"]
    assert set(auto_map) >= {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"}

    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "a")
    assert type(reloaded) is TokenPackerForConditionalGeneration
    reloaded.save_pretrained(tmp_path / "b")
    twice = TokenPackerForConditionalGeneration.from_pretrained(tmp_path / "b")
    torch.testing.assert_close(twice(input_ids=ids, pixel_values=pv).logits, expected, rtol=0, atol=0)

    base = AutoModel.from_pretrained(tmp_path / "a")
    assert type(base) is TokenPackerModel
    hidden = base(input_ids=ids, pixel_values=pv).last_hidden_state
    torch.testing.assert_close(model.lm_head(hidden), expected, rtol=0, atol=0)


def test_tied_embeddings_are_not_saved_twice(tmp_path):
    model = make_model(text={"tie_word_embeddings": True})
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    model.save_pretrained(tmp_path)
    reloaded = TokenPackerForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(reloaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("tie", [True, False])
def test_embedding_accessors_reach_the_language_model(tie):
    """The models define no embedding accessors: transformers' fallbacks must find the LLM's table through
    `language_model` (TokenPackerModel) and `model` (the LM head model), so that resizing grows the table the
    forward uses and the LM head with it, tied or not."""
    model = make_model(text={"tie_word_embeddings": tie})
    table = model.model.language_model.embed_tokens
    assert model.get_input_embeddings() is table and model.model.get_input_embeddings() is table
    assert model.get_output_embeddings() is model.lm_head and model.model.get_output_embeddings() is None
    vocab = table.num_embeddings
    model.resize_token_embeddings(vocab + 3)
    table = model.model.language_model.embed_tokens
    assert model.get_input_embeddings() is table and table.num_embeddings == vocab + 3
    assert model.lm_head.out_features == vocab + 3 == model.config.text_config.vocab_size
    assert (model.lm_head.weight.data_ptr() == table.weight.data_ptr()) == tie
    assert model(input_ids=torch.tensor([[1, vocab + 2]])).logits.shape[-1] == vocab + 3
    replacement = torch.nn.Embedding(vocab + 3, table.embedding_dim)
    model.set_input_embeddings(replacement)
    assert model.model.language_model.embed_tokens is replacement


def test_bfloat16_load_runs(tmp_path):
    make_model().save_pretrained(tmp_path)
    model = TokenPackerForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = model(input_ids=torch.tensor([prompt()]), pixel_values=pixels(1))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    generated = model.generate(input_ids=torch.tensor([prompt()]), pixel_values=pixels(1), max_new_tokens=3)
    assert generated.shape[1] == len(prompt()) + 3


def test_sdpa_and_eager_agree_and_the_projector_follows_the_choice(tmp_path):
    make_model().save_pretrained(tmp_path)
    ids, pv = torch.tensor([prompt(images=2)]), pixels(2)
    sdpa = TokenPackerForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa")
    eager = TokenPackerForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager")
    assert sdpa.model.multi_modal_projector.region_attn.config._attn_implementation == "sdpa"
    assert eager.model.multi_modal_projector.region_attn.config._attn_implementation == "eager"
    assert eager.config.vision_config._attn_implementation == "eager"
    torch.testing.assert_close(
        sdpa(input_ids=ids, pixel_values=pv).logits, eager(input_ids=ids, pixel_values=pv).logits, rtol=1e-4, atol=1e-5
    )

    calls = []
    from tokenpacker_hf import projector_tokenpacker

    original = projector_tokenpacker.eager_attention_forward
    sdpa.set_attn_implementation("eager")
    projector_tokenpacker.eager_attention_forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        sdpa(input_ids=ids, pixel_values=pv)
    finally:
        projector_tokenpacker.eager_attention_forward = original
    assert calls, "set_attn_implementation('eager') did not reach the projector's attention"


def test_device_map_auto_splits_at_layer_boundaries_and_matches(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    ids, pv = torch.tensor([prompt()]), pixels(1)
    # With no GPU here, a tiny CPU budget forces accelerate to place the rest on disk: a real split.
    mapped = TokenPackerForConditionalGeneration.from_pretrained(
        tmp_path, device_map="auto", max_memory={"cpu": "150KB"}, offload_folder=tmp_path / "offload"
    )
    placement = mapped.hf_device_map
    assert set(placement.values()) == {"cpu", "disk"}
    # Never split inside a no-split block: the projector and each encoder layer stay whole.
    assert "model.multi_modal_projector" in placement or "model" in placement
    assert not any(key.startswith("model.multi_modal_projector.") for key in placement)
    assert not any(".layers.0." in key for key in placement)
    assert {"CLIPEncoderLayer", "LlamaDecoderLayer", "TokenPackerProjector"} <= set(mapped._no_split_modules)
    torch.testing.assert_close(
        mapped(input_ids=ids, pixel_values=pv).logits, model(input_ids=ids, pixel_values=pv).logits
    )


# --- generation ----------------------------------------------------------------------------------


def greedy_by_recomputation(model, ids: torch.Tensor, pv: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding that re-runs the whole sequence every step, with no cache."""
    for _ in range(steps):
        logits = model(input_ids=ids, pixel_values=pv, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_greedy_with_cache_equals_recomputation_without_cache():
    model = make_model()
    ids, pv = torch.tensor([prompt(images=2)]), pixels(2)
    cached = model.generate(input_ids=ids, pixel_values=pv, max_new_tokens=6, do_sample=False)
    uncached = model.generate(input_ids=ids, pixel_values=pv, max_new_tokens=6, do_sample=False, use_cache=False)
    manual = greedy_by_recomputation(model, ids, pv, 6)
    assert torch.equal(cached, manual) and torch.equal(uncached, manual)


def test_left_padded_batch_generates_what_each_prompt_does_alone():
    model = make_model(seed=3)
    short, long = prompt(text=(80,)), prompt(text=(81, 82, 83, 84))
    pv = pixels(2)
    pad = len(long) - len(short)
    batch = torch.tensor([[0] * pad + short, long])
    mask = torch.tensor([[0] * pad + [1] * len(short), [1] * len(long)])
    together = model.generate(input_ids=batch, attention_mask=mask, pixel_values=pv, max_new_tokens=5, do_sample=False)
    for row, ids, tile in ((0, short, 0), (1, long, 1)):
        alone = model.generate(
            input_ids=torch.tensor([ids]), pixel_values=pv[tile : tile + 1], max_new_tokens=5, do_sample=False
        )
        assert together[row, -5:].tolist() == alone[0, -5:].tolist()


def test_beam_search_and_several_return_sequences_with_images_of_different_grids():
    model = make_model(seed=4)
    grids = torch.tensor([[1, 1], [1, 2]])  # image 0: 1 tile; image 1: 2 tiles + thumbnail
    a = prompt(tokens=TOKENS)
    b = prompt(tokens=3 * TOKENS)
    pad = len(b) - len(a)
    batch = torch.tensor([[0] * pad + a, b])
    mask = torch.tensor([[0] * pad + [1] * len(a), [1] * len(b)])
    pv = pixels(4)
    beams = model.generate(
        input_ids=batch,
        attention_mask=mask,
        pixel_values=pv,
        image_grids=grids,
        max_new_tokens=4,
        num_beams=3,
        num_return_sequences=2,
        do_sample=False,
    )
    assert beams.shape == (4, len(b) + 4)
    # The best beam for each prompt equals that prompt's beam search alone.
    alone = model.generate(
        input_ids=torch.tensor([b]),
        pixel_values=pv[1:],
        image_grids=grids[1:],
        max_new_tokens=4,
        num_beams=3,
        do_sample=False,
    )
    assert beams[2, -4:].tolist() == alone[0, -4:].tolist()
    sampled = model.generate(
        input_ids=batch,
        attention_mask=mask,
        pixel_values=pv,
        image_grids=grids,
        max_new_tokens=4,
        do_sample=True,
        num_return_sequences=3,
    )
    assert sampled.shape == (6, len(b) + 4)


def test_generate_encodes_images_once():
    model = make_model()
    counter = LayerCounter(model)
    model.generate(input_ids=torch.tensor([prompt(images=2)]), pixel_values=pixels(2), max_new_tokens=5)
    assert counter.calls == [1, 1, 1, 0]


def test_prefill_cache_then_one_step_matches_full_forward():
    model = make_model()
    ids, pv = torch.tensor([prompt()]), pixels(1)
    cache = DynamicCache(config=model.config.text_config)
    model(input_ids=ids[:, :-1], pixel_values=pv, past_key_values=cache, use_cache=True)
    step = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
    full = model(input_ids=ids, pixel_values=pv).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


# --- training ------------------------------------------------------------------------------------


def test_gradients_reach_projector_and_llm_but_not_the_frozen_tower():
    model = make_model().train()
    model.model.vision_tower.requires_grad_(False)
    ids = torch.tensor([prompt()])
    labels = ids.masked_fill(ids == IMAGE_TOKEN_ID, -100)
    counter_grad_modes = []
    model.model.vision_tower.encoder.layers[0].register_forward_hook(
        lambda *_: counter_grad_modes.append(torch.is_grad_enabled())
    )
    loss = model(input_ids=ids, pixel_values=pixels(1), labels=labels).loss
    loss.backward()
    assert counter_grad_modes == [False], "a frozen tower must build no autograd graph"
    assert all(p.grad is None for p in model.model.vision_tower.parameters())
    for name, p in model.named_parameters():
        if not name.startswith("model.vision_tower."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_frozen_tower_builds_no_graph_under_activation_checkpointing():
    model = make_model().train()
    model.model.vision_tower.requires_grad_(False)
    model.activation_checkpointing_enable()
    counter = LayerCounter(model)
    decoder_calls = [0]
    count_runs(model.model.language_model.layers[0].mlp, decoder_calls)
    ids = torch.tensor([prompt()])
    loss = model(input_ids=ids, pixel_values=pixels(1), labels=ids.masked_fill(ids == IMAGE_TOKEN_ID, -100)).loss
    loss.backward()
    # Checkpointed layers in the graph run twice (forward + recompute in backward); the tower's ran once.
    assert decoder_calls == [2]
    assert counter.calls == [1, 1, 1, 0]
    assert model.model.multi_modal_projector.output_proj.fc2.weight.grad is not None


def test_tiles_per_image_follows_the_image_processors_layout_rule():
    """The model splits `pixel_values` per image with its own tensor version of the slice-mode rule; it must
    agree with the image processor's (`num_tiles`) for every grid, 1×1 included."""
    grids = [(rows, cols) for rows in range(1, 6) for cols in range(1, 6)]
    assert tiles_per_image(torch.tensor(grids)) == [num_tiles(grid) for grid in grids]
