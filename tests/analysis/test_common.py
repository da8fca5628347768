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
