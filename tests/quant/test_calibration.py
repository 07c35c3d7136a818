"""The block-by-block calibration pass (quant/calibration.py) against the model's own forward."""

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.quant.calibration import CalibrationError, calibration_windows, for_each_block


def _model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=100, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
    return Transformer(cfg).eval()


def test_windows_are_evenly_spaced_and_a_short_stream_is_refused() -> None:
    ids = torch.arange(100)
    w = calibration_windows(ids, 3, 10)
    assert w[:, 0].tolist() == [0, 45, 90] and w[2, -1].item() == 99
    with pytest.raises(CalibrationError, match="100 tokens; 11 windows of 10 need 110"):
        calibration_windows(ids, 11, 10)


def test_each_block_sees_the_inputs_the_full_forward_gives_it_in_any_batch_size() -> None:
    model = _model()
    windows = calibration_windows(torch.randint(0, 100, (400,), generator=torch.Generator().manual_seed(1)), 5, 16)
    seen = []
    hooks = [b.register_forward_pre_hook(lambda _, args: seen.append(args[0])) for b in model.blocks]
    with torch.no_grad():
        final = model.hidden_states(windows)
    for h in hooks:
        h.remove()
    got, outputs = [], []

    def record(i, block, x, inputs):
        got.append(x)
        outputs.append(block(x, inputs))

    with torch.no_grad():
        for_each_block(model, windows, record, batch_size=2, progress=False)
    for expected, x in zip(seen, got, strict=True):
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.norm(outputs[-1]), final, rtol=0, atol=1e-5)


def test_a_block_changed_by_process_feeds_its_changed_output_on() -> None:
    model = _model()
    windows = calibration_windows(torch.randint(0, 100, (200,)), 2, 8)
    got = []

    def zero_first_block(i, block, x, _):
        got.append(x)
        if i == 0:
            for p in block.parameters():
                p.data.zero_()  # norm weights 0: attention and MLP add 0, the block is the identity

    for_each_block(model, windows, zero_first_block, progress=False)
    torch.testing.assert_close(got[1], got[0])
