"""Every method is registered with an honest anchor policy, and docs/baselines.md documents each one's command."""

from __future__ import annotations

from pathlib import Path

import pytest

from rpsft.methods import available, get_method

ALL = ["complement", "dft", "iw", "l2init", "lora", "osf", "rpsft", "rpsft_lora", "sft"]
DOCS = Path(__file__).resolve().parents[2] / "docs" / "baselines.md"


def test_all_methods_registered_with_their_anchor_policy():
    assert available() == ALL
    policy = {name: get_method(name).anchor for name in ALL}
    assert policy == {"complement": "on", "dft": "optional", "iw": "optional", "l2init": "full", "lora": "off",
                      "osf": "off", "rpsft": "on", "rpsft_lora": "on", "sft": "optional"}
    assert {name: get_method(name).anchor_form for name in ALL if name != "complement"} == dict.fromkeys(
        [n for n in ALL if n != "complement"], "block") and get_method("complement").anchor_form == "complement"
    assert get_method("dft").sft_overrides == {"loss_type": "dft"}
    for name in ("lora", "rpsft_lora", "osf"):
        m = get_method(name)
        assert m.prepare_model is not None and m.finalize is not None
    assert get_method("rpsft_lora").wrap_anchor is not None
    assert get_method("iw").trainer_class is not None


@pytest.mark.parametrize("name", ALL)
def test_docs_give_the_one_line_command(name):
    text = DOCS.read_text()
    assert f"rpsft train --config configs/demo.yaml --set method={name}" in text
