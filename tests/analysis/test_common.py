import pytest
import torch

from rpsft.analysis._common import WeightReader, completion_nll, encode_records, matrix_names, prompt_texts


def test_encoding_marks_completion_tokens(tiny):
    from rpsft.models import load_tokenizer

    tok = load_tokenizer(tiny["base"])
    rec = tiny["records"][0]
    (e,) = encode_records(tok, [rec])
    prompt = prompt_texts(tok, [rec])[0]
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tok.decode(e.input_ids[:e.completion_start]) == prompt
    assert tok.decode(e.input_ids[e.completion_start:]).startswith("Two plus three is five.")


@pytest.mark.numerics
def test_completion_nll_matches_hf_loss_and_ignores_padding(tiny):
    from rpsft.models import load_model

    model, tok = load_model(tiny["base"])
    enc = encode_records(tok, tiny["records"])
    singles = []
    for e in enc:
        ids = torch.tensor([e.input_ids])
        labels = ids.clone()
        labels[:, :e.completion_start] = -100
        ref = model(input_ids=ids, labels=labels).loss
        ours = completion_nll(model, [e], tok.pad_token_id)[0]
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        singles.append(ours)
    batched = completion_nll(model, enc, tok.pad_token_id)  # right-padded to the longest
    torch.testing.assert_close(batched, torch.stack(singles), rtol=1e-4, atol=1e-5)


def test_weight_reader_and_meta_selection(tiny):
    names = matrix_names(tiny["base"], ["v_proj"], layers="1")
    assert names == [("model.layers.1.self_attn.v_proj.weight", (16, 32))]
    w = WeightReader(tiny["tuned"]).get(names[0][0])
    b = WeightReader(tiny["base"]).get(names[0][0])
    torch.testing.assert_close(w - b, tiny["delta"][names[0][0]], rtol=1e-5, atol=1e-6)


@pytest.mark.numerics
def test_weight_reader_merges_peft_adapter(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    from rpsft.models import load_model

    model, _ = load_model(tiny["base"])
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.1)  # B = 0 at init would make the merge a no-op and the test vacuous
    peft_model.save_pretrained(tmp_path / "adapter")
    name = "model.layers.0.self_attn.q_proj.weight"
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    expected = layer.base_layer.weight + layer.get_delta_weight("default")
    got = WeightReader(str(tmp_path / "adapter")).get(name)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, WeightReader(tiny["base"]).get(name))
