"""Pruning (quant/pruning.py) against a reimplementation, in this file, of Wanda's reference code (locuslab/wanda,
lib/prune.py and lib/layerwrapper.py), written the way it is written there: `WrappedGPT.add_batch` (the running
`scaler_row`), `prune_wanda` (`W_metric = |W| * sqrt(scaler_row)`, a stable sort per row for unstructured sparsity,
`topk(largest=False)` in groups of prune_m columns for N:M, block by block over a Hugging Face Llama with a
`Catcher` on the first layer) and `prune_magnitude` (a threshold over the whole layer); plus invariants: exact
sparsity, the N:M pattern, the statistic against a direct sum, Wanda beating magnitude where activations have
outlier channels, and everything refused before any work."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from hf_reference import hf_and_lmforge
from lmforge.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.quant.calibration import CalibrationError, run_block
from lmforge.quant.pruning import (
    InputNorms,
    PruningError,
    magnitude_scores,
    nm_mask,
    parse_pattern,
    prune_mask,
    prune_model,
    sparsity_of,
    unstructured_mask,
    wanda_scores,
)

# ----------------------------------------------------------------------------------------------------- reference


class RefWrappedGPT:
    """lib/layerwrapper.py WrappedGPT: scaler_row, the running mean over samples of each channel's squared norm."""

    def __init__(self, layer: nn.Linear) -> None:
        self.layer = layer
        self.columns = layer.weight.data.shape[1]
        self.scaler_row = torch.zeros((self.columns), device=layer.weight.device)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if len(inp.shape) == 3:
            inp = inp.reshape((-1, inp.shape[-1]))
        inp = inp.t()
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = inp.type(torch.float32)
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


def ref_wanda_mask(W: torch.Tensor, scaler_row: torch.Tensor, sparsity_ratio: float = 0.0, prune_n: int = 0,
                   prune_m: int = 0) -> torch.Tensor:  # fmt: skip
    """prune_wanda's mask for one layer (True: pruned); prune_n is the number pruned in each group of prune_m."""
    W_metric = torch.abs(W) * torch.sqrt(scaler_row.reshape((1, -1)))
    W_mask = torch.zeros_like(W_metric) == 1
    if prune_n != 0:
        for ii in range(W_metric.shape[1]):
            if ii % prune_m == 0:
                tmp = W_metric[:, ii : (ii + prune_m)].float()
                W_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    else:
        sort_res = torch.sort(W_metric, dim=-1, stable=True)
        indices = sort_res[1][:, : int(W_metric.shape[1] * sparsity_ratio)]
        W_mask.scatter_(1, indices, True)
    return W_mask


def ref_magnitude_mask(W: torch.Tensor, sparsity_ratio: float) -> torch.Tensor:
    """prune_magnitude's unstructured mask for one layer (True: pruned)."""
    W_metric = torch.abs(W)
    thresh = torch.sort(W_metric.flatten())[0][int(W.numel() * sparsity_ratio)]
    return W_metric <= thresh


@torch.no_grad()
def ref_prune_wanda(hf: nn.Module, windows: torch.Tensor, sparsity_ratio: float = 0.0, prune_n: int = 0,
                    prune_m: int = 0) -> None:  # fmt: skip
    """prune_wanda on a transformers Llama: inputs of layer 0 caught per sample, each layer's linears wrapped and
    pruned, then the pruned layer rerun to give the next one its inputs."""
    layers = hf.model.layers
    inps, cache = [], {}

    class Catcher(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, inp, **kwargs):
            inps.append(inp)
            cache.update(kwargs)
            raise ValueError

    layers[0] = Catcher(layers[0])
    for batch in windows:
        with contextlib.suppress(ValueError):
            hf(batch[None])
    layers[0] = layers[0].module
    kwargs = {k: cache[k] for k in ("attention_mask", "position_ids", "position_embeddings")}
    for layer in layers:
        subset = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        wrapped = {n: RefWrappedGPT(m) for n, m in subset.items()}
        handles = [subset[n].register_forward_hook(lambda _, inp, out, w=w: w.add_batch(inp[0].data, out.data))
                   for n, w in wrapped.items()]  # fmt: skip
        for inp in inps:
            layer(inp, **kwargs)
        for h in handles:
            h.remove()
        for name in subset:
            W = subset[name].weight.data
            W[ref_wanda_mask(W, wrapped[name].scaler_row, sparsity_ratio, prune_n, prune_m)] = 0
        inps = [layer(inp, **kwargs) for inp in inps]


# ----------------------------------------------------------------------------------------------------- helpers


def activations(tokens: int, features: int, seed: int = 0, outliers: tuple[int, ...] = ()) -> torch.Tensor:
    """(tokens, features) inputs whose channels have unequal scales (and a few 30x outlier channels)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(features, generator=g) * 2 + 0.1
    scale[list(outliers)] = 30.0
    return torch.randn(tokens, features, generator=g) * scale


def weight(out: int, features: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(out, features, generator=torch.Generator().manual_seed(seed))


def block_masks(model: Transformer) -> dict[str, torch.Tensor]:
    """The zero pattern of every linear in the blocks, by `model.named_modules()` name."""
    return {n: m.weight == 0 for n, m in model.blocks.named_modules() if isinstance(m, nn.Linear)}


def hf_masks(hf: nn.Module) -> dict[str, torch.Tensor]:
    """The zero pattern of every linear in a transformers Llama's layers, under lmforge's names."""
    rename = {"self_attn": "attn"}
    out = {}
    for n, m in hf.model.layers.named_modules():
        if isinstance(m, nn.Linear):
            i, group, proj = n.split(".")
            out[f"{i}.{rename.get(group, group)}.{proj}"] = m.weight == 0
    return out


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    config = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64)
    return Transformer(ModelConfig(**{**config, **overrides})).eval()


def windows(n: int = 6, t: int = 24, seed: int = 2, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------- one layer


def test_input_norms_are_the_per_channel_squared_norm_over_every_token() -> None:
    x = activations(70, 12).double()
    norms = InputNorms(12, dtype=torch.float64)
    wrapped = RefWrappedGPT(nn.Linear(12, 3))
    for chunk, shape in ((x[:10], (2, 5, 12)), (x[10:11], (1, 12)), (x[11:], (59, 12))):
        norms.add(chunk.reshape(shape))
        wrapped.add_batch(chunk.reshape(shape), None)
    direct = (x * x).sum(dim=0)
    torch.testing.assert_close(norms.squared, direct, rtol=1e-12, atol=0)
    assert norms.tokens == 70
    torch.testing.assert_close(wrapped.scaler_row.double() * wrapped.nsamples, direct, rtol=1e-5, atol=0)
    with pytest.raises(PruningError, match=r"activations=\(4, 11\): a layer of 12 input features"):
        norms.add(torch.zeros(4, 11))


@pytest.mark.parametrize(("shape", "sparsity"), [((16, 64), 0.5), ((9, 37), 0.3), ((5, 40), 0.9), ((7, 10), 0.05)])
def test_unstructured_wanda_masks_equal_the_reference(shape: tuple[int, int], sparsity: float) -> None:
    out, features = shape
    x, w = activations(50, features), weight(out, features)
    norms = InputNorms(features)
    norms.add(x)
    wrapped = RefWrappedGPT(nn.Linear(features, out))
    for row in x.split(10):
        wrapped.add_batch(row[None], None)
    keep = unstructured_mask(wanda_scores(w, norms.squared), sparsity, "row")
    assert torch.equal(keep, ~ref_wanda_mask(w, wrapped.scaler_row, sparsity))
    assert (keep.sum(dim=1) == features - int(features * sparsity)).all()  # exact, in every row


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 2)])
def test_nm_wanda_masks_equal_the_reference_and_keep_n_of_every_m(n: int, m: int) -> None:
    x, w = activations(40, 48, outliers=(3, 17)), weight(24, 48)
    norms = InputNorms(48)
    norms.add(x)
    wrapped = RefWrappedGPT(nn.Linear(48, 24))
    wrapped.add_batch(x[None], None)
    keep = nm_mask(wanda_scores(w, norms.squared), n, m)
    assert torch.equal(keep, ~ref_wanda_mask(w, wrapped.scaler_row, prune_n=m - n, prune_m=m))
    assert (keep.view(24, -1, m).sum(dim=-1) == n).all()
    assert torch.equal(prune_mask(wanda_scores(w, norms.squared), pattern=(n, m)), keep)


def test_magnitude_per_layer_is_the_reference_threshold_without_its_extra_weight() -> None:
    w = weight(24, 40)
    keep = unstructured_mask(magnitude_scores(w), 0.5, "layer")
    ref = ref_magnitude_mask(w, 0.5)
    k = int(w.numel() * 0.5)
    assert (~keep).sum() == k and ref.sum() == k + 1  # exact here; the reference's `<=` takes one more
    assert torch.equal(~keep & ref, ~keep)
    extra = (ref & keep).nonzero()
    assert len(extra) == 1 and w.abs()[tuple(extra[0])] == w.abs().flatten().sort().values[k]
    assert not torch.equal(keep.sum(dim=1), keep.sum(dim=1)[:1].expand(24))  # rows lose unequal fractions


def test_magnitude_per_row_and_ties_prune_the_lower_index_first() -> None:
    w = weight(10, 30)
    keep = unstructured_mask(magnitude_scores(w), 0.4, "row")
    assert torch.equal(keep, ~ref_wanda_mask(w, torch.ones(30), 0.4))
    ties = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0, 2.0]])
    assert unstructured_mask(ties, 0.5).tolist() == [[False, False, False, True, True, True]]
    assert nm_mask(ties[:, :4], 2, 4).tolist() == [[False, False, True, True]]


def test_wanda_beats_magnitude_on_the_layer_output_when_channels_have_outliers() -> None:
    x, w = activations(200, 64, outliers=(5, 20, 41)), weight(32, 64)
    norms = InputNorms(64)
    norms.add(x)

    def error(keep: torch.Tensor) -> float:
        return (x @ (w * ~keep).T).norm().item()

    for rule in ({"sparsity": 0.5}, {"pattern": (2, 4)}):
        wanda = error(prune_mask(wanda_scores(w, norms.squared), **rule))
        magnitude = error(prune_mask(magnitude_scores(w), **rule))
        assert wanda < 0.8 * magnitude


# ----------------------------------------------------------------------------------------------------- a model


@pytest.mark.parametrize("rule", [{"sparsity": 0.5}, {"pattern": "2:4"}])
def test_prune_model_wanda_equals_the_reference_on_a_transformers_llama(tmp_path, rule: dict) -> None:
    hf, model = hf_and_lmforge("llama", tmp_path)
    hf, model = hf.double(), model.double()
    ids = windows(5, 20, vocab=hf.config.vocab_size)
    n_m = parse_pattern(rule["pattern"]) if "pattern" in rule else (0, 0)
    ref_prune_wanda(hf, ids, rule.get("sparsity", 0.0), n_m[1] - n_m[0], n_m[1])
    report = prune_model(model, "wanda", windows=ids, batch_size=2, progress=False, **rule)
    ours, theirs = block_masks(model), hf_masks(hf)
    assert ours.keys() == theirs.keys() == {n.removeprefix("blocks.") for n in report}
    for name, mask in ours.items():
        assert torch.equal(mask, theirs[name]), name
        assert report[f"blocks.{name}"] == 0.5
    with torch.no_grad():
        # the same pruned model: equal up to transformers' rotary angles, computed in float32 in a float64 model
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
    assert sparsity_of(model) == 0.5


def test_wanda_calibrates_each_block_on_the_pruned_blocks_before_it() -> None:
    model, ids = tiny_model().double(), windows()
    dense = copy.deepcopy(model)
    prune_model(model, "wanda", sparsity=0.6, windows=ids, progress=False)
    # block 1 pruned from the dense model's block-1 inputs: a different mask
    x = dense.embed_tokens(ids, torch.arange(ids.shape[1]).expand_as(ids))
    norms = InputNorms(32, dtype=torch.float64)
    hook = dense.blocks[1].attn.q_proj.register_forward_hook(lambda _, args, __: norms.add(args[0]))
    run_block(dense, dense.blocks[1], run_block(dense, dense.blocks[0], x))
    hook.remove()
    from_dense = unstructured_mask(wanda_scores(dense.blocks[1].attn.q_proj.weight, norms.squared), 0.6)
    assert not torch.equal(from_dense, model.blocks[1].attn.q_proj.weight != 0)


@pytest.mark.parametrize(("rule", "scope"), [({"sparsity": 0.5}, None), ({"sparsity": 0.3}, "row"),
                                             ({"pattern": "2:4"}, None)])  # fmt: skip
def test_prune_model_magnitude_prunes_the_block_linears_only(rule: dict, scope: str | None) -> None:
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    report = prune_model(model, "magnitude", scope=scope, progress=False, **rule)
    assert sorted(report) == sorted(f"blocks.{n}" for n in block_masks(model))
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name in report:
            w = before[f"{name}.weight"]
            kept = module.weight != 0
            if "pattern" in rule:
                assert torch.equal(kept, ~ref_wanda_mask(w, torch.ones(w.shape[1]), prune_n=2, prune_m=4))
            elif scope == "row":
                assert torch.equal(kept, ~ref_wanda_mask(w, torch.ones(w.shape[1]), rule["sparsity"]))
            else:
                k = int(w.numel() * rule["sparsity"])  # the k lowest |w|: at or under the k-th smallest
                assert torch.equal(~kept, w.abs() <= w.abs().flatten().kthvalue(k).values)
            assert torch.equal(module.weight[kept], w[kept])
    for name in ("embed.weight", "lm_head.weight", "norm.weight", "blocks.0.attn_norm.weight"):
        assert torch.equal(model.state_dict()[name], before[name])


@pytest.fixture
def no_work(monkeypatch):
    """Any pruning or calibration work fails the test: the refusal must come first."""

    def fail(*_args, **_kwargs):
        raise AssertionError("work started before the settings were checked")

    from lmforge.quant import pruning

    monkeypatch.setattr(pruning, "for_each_block", fail)
    monkeypatch.setattr(pruning, "_prune", fail)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "sparsegpt", "sparsity": 0.5}, "method='sparsegpt': choose one of magnitude, wanda"),
    ({"sparsity": 0.0}, r"sparsity=0.0: must be a fraction of weights in \(0, 1\)"),
    ({"sparsity": 1}, r"sparsity=1: must be a fraction"),
    ({"sparsity": 1.5}, r"sparsity=1.5: must be a fraction"),
    ({"sparsity": -0.2}, r"sparsity=-0.2: must be a fraction"),
    ({"sparsity": float("nan")}, r"sparsity=nan: must be a fraction"),
    ({}, "give a sparsity or an N:M pattern, not both nor neither"),
    ({"sparsity": 0.5, "pattern": "2:4"}, "give a sparsity or an N:M pattern, not both"),
    ({"pattern": "4:4"}, "pattern='4:4': N:M keeps N of every M weights: needs integers 1 <= N < M"),
    ({"pattern": "5:4"}, "pattern='5:4': N:M keeps N"),
    ({"pattern": "0:4"}, "pattern='0:4': N:M keeps N"),
    ({"pattern": "2/4"}, "pattern='2/4': must be N:M"),
    ({"pattern": "2:4", "scope": "row"}, "scope='row': applies to unstructured sparsity"),
    ({"sparsity": 0.5, "scope": "column"}, "scope='column': choose one of row, layer"),
    ({"sparsity": 0.5, "where": "lm_head"}, r"where='lm_head': selects linears outside model.blocks \(lm_head\)"),
    ({"sparsity": 0.5, "where": "blocks.*.nothing"}, "selects no nn.Linear inside model.blocks"),
    ({"method": "wanda", "sparsity": 0.5}, "method='wanda': needs calibration windows"),
    ({"sparsity": 0.5, "windows": windows()}, "method='magnitude': takes no calibration data"),
])  # fmt: skip
def test_bad_settings_are_refused_before_any_work(no_work, kwargs: dict, message: str) -> None:
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningError, match=message):
        prune_model(model, **{"method": "magnitude", **kwargs}, progress=False)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def test_a_pattern_that_does_not_fit_a_layer_names_it_before_any_work(no_work) -> None:
    model = tiny_model(d_ff=30)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningError, match=r"pattern='2:4': the 30 input features of blocks\.0\.mlp\.down_proj are "
                                           r"not a multiple of M=4") as error:  # fmt: skip
        prune_model(model, "wanda", pattern="2:4", windows=windows(), progress=False)
    assert error.value.cli_message.startswith("--pattern='2:4': the 30 input features")
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    with pytest.raises(PruningError, match=r"needs a 2-D \(out, in\) matrix with in a multiple of 4"):
        nm_mask(torch.ones(3, 30), 2, 4)


def test_a_selected_linear_that_its_block_never_calls_is_refused() -> None:
    model = tiny_model()
    model.blocks[0].unused = nn.Linear(32, 32)
    with pytest.raises(CalibrationError, match=r"no calibration tokens reached blocks\.0\.unused"):
        prune_model(model, "wanda", sparsity=0.5, windows=windows(), where="blocks.0.unused", progress=False)


def test_mask_functions_refuse_bad_inputs() -> None:
    with pytest.raises(PruningError, match=r"squared_norms=\(5,\): a weight of shape \(2, 4\) needs one per input"):
        wanda_scores(torch.ones(2, 4), torch.ones(5))
    with pytest.raises(PruningError, match=r"scores=\(4,\): must be a 2-D"):
        unstructured_mask(torch.ones(4), 0.5)
    with pytest.raises(PruningError, match="give a sparsity or an N:M pattern"):
        prune_mask(torch.ones(2, 4), 0.5, (2, 4))
    assert parse_pattern(" 2 : 4 ") == (2, 4) and parse_pattern((1, 4)) == (1, 4)
