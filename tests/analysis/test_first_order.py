import pytest
import torch

from rpsft.analysis._common import WeightReader, encode_records
from rpsft.analysis.first_order import inner_products, mean_gradient, per_layer
from rpsft.selection import select_matrices


@pytest.mark.numerics
def test_inner_products_and_mean_gradient(tiny):
    from rpsft.models import load_model
    model, tok = load_model(tiny["base"])
    enc = encode_records(tok, tiny["records"])
    params = select_matrices(model, ["q_proj", "up_proj"])
    g = mean_gradient(model, tok, enc, params, batch_size=2)  # batches of 2, 2, 1 (padded)
    # reference: mean over samples of each sample's own gradient, no padding
    from rpsft.analysis._common import completion_nll

    name, p = params[0]
    ref = sum(torch.autograd.grad(completion_nll(model, [e], tok.pad_token_id)[0], p)[0] for e in enc) / len(enc)
    torch.testing.assert_close(g[name], ref, rtol=1e-4, atol=1e-7)
    rows = inner_products(g, WeightReader(tiny["base"]), WeightReader(tiny["tuned"]))
    for r in rows:
        expected = float((g[r["name"]].double() * tiny["delta"][r["name"]].double()).sum())
        assert r["inner"] == pytest.approx(expected, rel=1e-3, abs=1e-7)
    layers = per_layer(rows)
    assert [x["layer"] for x in layers] == [0, 1] and all(x["types"] == 2 for x in layers)
    assert layers[0]["mean_inner"] == pytest.approx(
        sum(r["inner"] for r in rows if r["layer"] == 0) / 2)
