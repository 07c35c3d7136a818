"""Log-likelihood of continuations (eval/loglikelihood.py) against lm-evaluation-harness's own `HFLM.loglikelihood`
on the same tiny random Llama and tokenizer (transformers), request by request."""

from __future__ import annotations

import pytest
import torch

import lmforge
from lmforge.eval.loglikelihood import (
    LoglikelihoodInputError,
    encode,
    encode_pair,
    loglikelihood,
    loglikelihood_tokens,
)

REQUESTS = [
    ("Question: Who is the Prince of Denmark?\nAnswer:", " Hamlet"),
    ("To be, or not to be, ", "that is the question"),  # trailing space moves to the continuation
    ("The king is dead.  \n", "Long live the king."),  # several trailing whitespace characters
    ("", "Something is rotten in the state of Denmark."),  # empty context: the prefix token
    ("Speak the speech, I pray you,<|endoftext|>", " as I pronounced it"),  # a special token in the text
    ("O", "phelia"),  # the split falls inside a word
    ("Horatio: " + "Well, sit we down, and let us hear Bernardo speak of this. " * 4, " Last night of all"),  # cut
]


def hflm(directory, **options):
    import transformers as T
    from lm_eval.models.huggingface import HFLM

    model = T.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return HFLM(pretrained=model, tokenizer=T.AutoTokenizer.from_pretrained(directory), **options)


def lm_eval_loglikelihood(lm, requests):
    from lm_eval.api.instance import Instance

    instances = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(requests)]
    return lm.loglikelihood(instances, disable_tqdm=True)


def check_close(got, want):
    assert len(got) == len(want)
    for (ll, greedy), (ll_ref, greedy_ref) in zip(got, want, strict=True):
        assert ll == pytest.approx(ll_ref, abs=1e-4)
        assert greedy == greedy_ref


@pytest.mark.parametrize("max_length", [None, 24])  # 24: the long requests are cut from the left
def test_matches_lm_evals_hflm(model_dir, loaded, max_length):
    lm = hflm(model_dir, batch_size=3, max_length=max_length)
    want = lm_eval_loglikelihood(lm, REQUESTS)
    model, tok = loaded
    assert tok.add_bos_token is False
    got = loglikelihood(model, tok, REQUESTS, batch_size=2, max_length=max_length)
    check_close(got, want)
    assert len({round(ll, 3) for ll, _ in got}) == len(REQUESTS)  # the requests are told apart


def test_bos_added_as_the_tokenizer_adds_it(bos_model_dir):
    """A tokenizer.json whose post-processor puts <s> first: HFLM's default (add_bos_token=None) encodes with it;
    lmforge's loader does not read post-processors, so the rule is asked for with add_bos=True."""
    lm = hflm(bos_model_dir, batch_size=4)
    want = lm_eval_loglikelihood(lm, REQUESTS)
    model, tok = lmforge.load(bos_model_dir)
    got = loglikelihood(model, tok, REQUESTS, add_bos=True, batch_size=4)
    check_close(got, want)
    assert got != loglikelihood(model, tok, REQUESTS, add_bos=False, batch_size=4)  # the bos token matters


def test_hflm_add_bos_token_false_is_add_bos_false(bos_model_dir):
    lm = hflm(bos_model_dir, batch_size=1, add_bos_token=False)
    model, tok = lmforge.load(bos_model_dir)
    check_close(loglikelihood(model, tok, REQUESTS, add_bos=False), lm_eval_loglikelihood(lm, REQUESTS))


def test_batch_size_does_not_change_the_results(loaded):
    model, _ = loaded
    g = torch.Generator().manual_seed(0)
    requests = [
        (torch.randint(2, 400, (int(n),), generator=g).tolist(), torch.randint(2, 400, (int(m),), generator=g).tolist())
        for n, m in zip(torch.randint(1, 60, (23,), generator=g), torch.randint(1, 12, (23,), generator=g), strict=True)
    ]  # fmt: skip
    one, four, sixteen = (loglikelihood_tokens(model, requests, batch_size=b) for b in (1, 4, 16))
    for a, b, c in zip(one, four, sixteen, strict=True):
        assert b[0] == pytest.approx(a[0], abs=1e-4) and c[0] == pytest.approx(a[0], abs=1e-4)
        assert a[1] == b[1] == c[1]
    assert len({len(r[0]) + len(r[1]) for r in requests}) > 10  # padded batches of mixed lengths


def test_scores_are_the_sum_of_next_token_log_probabilities(loaded):
    model, _ = loaded
    context, continuation = [5, 17, 33, 90], [41, 7, 250]
    ((ll, greedy),) = loglikelihood_tokens(model, [(context, continuation)])
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0].double(), -1)
    want = sum(logp[len(context) - 1 + j, t].item() for j, t in enumerate(continuation))
    assert ll == pytest.approx(want, abs=1e-5)
    assert greedy == all(logp[len(context) - 1 + j].argmax().item() == t for j, t in enumerate(continuation))
    # the greedy continuation is greedy
    top = logp[len(context) - 1].argmax().item()
    assert loglikelihood_tokens(model, [(context, [top])])[0][1] is True


def test_encode_pair_moves_trailing_whitespace_and_splits_the_whole(loaded):
    _, tok = loaded
    context, continuation = encode_pair(tok, "To be, or not to be, ", "that")
    assert context == tok.encode("To be, or not to be,")
    assert context + continuation == tok.encode("To be, or not to be, that")
    assert tok.decode(continuation) == " that"
    bos = tok.token_to_id("<s>")
    assert encode(tok, "Hamlet", add_bos=True) == [bos, *tok.encode("Hamlet")]
    assert encode(tok, "<s>Hamlet", add_bos=True) == [bos, *tok.encode("Hamlet")]  # already led by bos
    assert encode_pair(tok, "", "Hamlet") == ([bos], tok.encode("Hamlet"))  # empty context: bos


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (([1, 2], []), "requests[0]: the continuation has no tokens"),
        (([], [3]), "requests[0]: the context has no tokens"),
        (([1], list(range(2, 200))), "requests[0]: the continuation has 198 tokens, more than max_length 128"),
    ],
)
def test_errors_name_the_request(loaded, request_, message):
    model, _ = loaded
    with pytest.raises(LoglikelihoodInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        loglikelihood_tokens(model, [request_])


def test_settings_errors(loaded):
    model, _ = loaded
    with pytest.raises(LoglikelihoodInputError, match=r"^max_length=129: must be 1 … the model's max_seq_len \(128\)"):
        loglikelihood_tokens(model, [([1], [2])], max_length=129)
    with pytest.raises(LoglikelihoodInputError, match=r"^batch_size=0: must be at least 1"):
        loglikelihood_tokens(model, [([1], [2])], batch_size=0)
