"""fusedops.patch on Hugging Face causal LMs: attention through fusedops, the fused LM loss.

Tiny random models (no downloads): GPT-2 (transposed Conv1D projections, tied head), Llama
with grouped-query heads and Mistral with a sliding window shorter than the sequence. Each is
compared with an unpatched deep copy running torch's SDPA: logits, logits under a left-padded
attention mask, the loss and every parameter gradient, and greedy generation with a KV cache
(where fusedops' bottom-right causal alignment is what decoding needs).
"""

import copy

import pytest
import torch
from reference import assert_close

import fusedops

transformers = pytest.importorskip("transformers")

VOCAB = 100
SEQLEN = 12
WINDOW = 5  # Mistral's sliding window, shorter than SEQLEN
KINDS = ["gpt2", "llama", "mistral"]


def make_model(kind):
    """A small random model on torch's SDPA, every dropout 0. initializer_range 0.2 keeps the
    logits far from uniform, so greedy decoding is sensitive to any attention error."""
    special = dict(bos_token_id=1, eos_token_id=None, pad_token_id=0, initializer_range=0.2,
                   attn_implementation="sdpa")
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32,
                                         n_layer=2, n_head=4, attn_pdrop=0.0, resid_pdrop=0.0,
                                         embd_pdrop=0.0, **special)
        model_class = transformers.GPT2LMHeadModel
    else:
        options = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=64, attention_dropout=0.0, **special)
        if kind == "llama":
            config = transformers.LlamaConfig(**options)
            model_class = transformers.LlamaForCausalLM
        else:
            config = transformers.MistralConfig(sliding_window=WINDOW, **options)
            model_class = transformers.MistralForCausalLM
    model = model_class(config)
    assert model.config._attn_implementation == "sdpa"
    return model


def patched_and_reference(kind):
    reference = make_model(kind)
    model = copy.deepcopy(reference)
    fusedops.patch(model)
    return model, reference


def tokens(batch=2):
    return torch.randint(3, VOCAB, (batch, SEQLEN))


def left_padded_mask(batch=2, pads=(3, 0)):
    mask = torch.ones(batch, SEQLEN, dtype=torch.long)
    for row, count in enumerate(pads[:batch]):
        mask[row, :count] = 0
    return mask


@pytest.fixture
def attention_calls(monkeypatch):
    """(op, query length, key length) of each call that reaches fusedops' attention."""
    calls = []
    real_attention, real_varlen = fusedops.attention, fusedops.attention_varlen

    def attention(q, k, v, **kwargs):
        calls.append(("attention", q.shape[2], k.shape[2]))
        return real_attention(q, k, v, **kwargs)

    def attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
        calls.append(("attention_varlen", max_q, max_k))
        return real_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)

    monkeypatch.setattr(fusedops, "attention", attention)
    monkeypatch.setattr(fusedops, "attention_varlen", attention_varlen)
    return calls


def assert_same_gradients(model, reference):
    names = [name for name, _ in model.named_parameters()]
    assert names == [name for name, _ in reference.named_parameters()]
    for (name, mine), (_, theirs) in zip(model.named_parameters(), reference.named_parameters()):
        assert mine.grad is not None, f"{name} got no gradient"
        assert_close(mine.grad, theirs.grad, torch.float32, f"grad of {name}")


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_without_padding(kind, attention_calls):
    model, reference = patched_and_reference(kind)
    assert model.config._attn_implementation == "fusedops"
    ids = tokens()
    out = model(ids)
    assert attention_calls == [("attention", SEQLEN, SEQLEN)] * 2  # one per layer
    assert_close(out.logits, reference(ids).logits, torch.float32, "logits")


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_with_a_left_padded_mask(kind, attention_calls):
    model, reference = patched_and_reference(kind)
    ids, mask = tokens(), left_padded_mask()
    logits = model(ids, attention_mask=mask).logits
    assert {op for op, _, _ in attention_calls} == {"attention_varlen"}
    ref_logits = reference(ids, attention_mask=mask).logits
    real = mask.bool()
    assert_close(logits[real], ref_logits[real], torch.float32, "logits of the real tokens")


def test_mistral_sliding_window_matters_at_this_length():
    """The window parity above means something: without it the reference differs."""
    reference = make_model("mistral")
    ids = tokens()
    windowed = reference(ids).logits
    reference.config.sliding_window = None
    assert (reference(ids).logits - windowed).abs().max() > 1e-3


@pytest.mark.parametrize("padded", [False, True], ids=["full", "left_padded"])
@pytest.mark.parametrize("kind", KINDS)
def test_loss_and_every_gradient_match(kind, padded):
    model, reference = patched_and_reference(kind)
    ids = tokens()
    labels = ids.clone()
    labels[1, 4:6] = -100
    kwargs = {}
    if padded:
        kwargs["attention_mask"] = mask = left_padded_mask()
        labels[mask == 0] = -100
    out = model(ids, labels=labels, **kwargs)
    ref = reference(ids, labels=labels, **kwargs)
    assert out.logits is None  # the fused loss never materialises the logits
    assert ref.logits is not None
    assert_close(out.loss, ref.loss, torch.float32, "loss")
    out.loss.backward()
    ref.loss.backward()
    assert_same_gradients(model, reference)


@pytest.mark.parametrize("kind", ["llama"])
def test_loss_with_num_items_in_batch_matches(kind):
    model, reference = patched_and_reference(kind)
    ids = tokens()
    labels = ids.clone()
    labels[0, :5] = -100
    count = torch.tensor(int((labels[:, 1:] != -100).sum()) + 3)
    out = model(ids, labels=labels, num_items_in_batch=count)
    ref = reference(ids, labels=labels, num_items_in_batch=count)
    assert_close(out.loss, ref.loss, torch.float32, "loss summed over num_items_in_batch")


@pytest.mark.parametrize("kind", KINDS)
def test_report_mentions_the_attention_switch_and_the_loss(kind):
    model, _ = patched_and_reference(kind)
    report = model.fusedops_report
    text = str(report)
    name = type(model).__name__
    assert f"{name} attention (sdpa) -> fusedops" in text
    assert f"{name} lm_head + loss (with labels)" in text
    assert "fusedops.linear_cross_entropy (logits=None)" in text
    replaced = {old for _, old, _ in report.replaced}
    assert ("Conv1D" if kind == "gpt2" else "Linear") in replaced
    assert report.left_alone == []


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_matches_with_a_kv_cache(kind, attention_calls):
    model, reference = patched_and_reference(kind)
    ids = tokens()
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    expected = reference.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, SEQLEN + 4)
    assert torch.equal(generated, expected), f"{generated[:, SEQLEN:]} != {expected[:, SEQLEN:]}"
    # the prefill, then one query per layer and step against the cache: the query is the
    # last position, which fusedops' bottom-right alignment puts there
    assert attention_calls[:2] == [("attention", SEQLEN, SEQLEN)] * 2
    decoding = attention_calls[2:]
    assert len(decoding) == 2 * 3 and all(sq == 1 for _, sq, _ in decoding)
    key_lengths = [sk for _, _, sk in decoding]
    if kind == "mistral":  # a sliding-window cache keeps only the last keys
        assert all(1 < sk < SEQLEN for sk in key_lengths)
    else:
        assert key_lengths == [SEQLEN + 1] * 2 + [SEQLEN + 2] * 2 + [SEQLEN + 3] * 2


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral"])
def test_greedy_generation_matches_with_left_padding(kind):
    model, reference = patched_and_reference(kind)
    ids, mask = tokens(), left_padded_mask(pads=(4, 1))
    ids[mask == 0] = 0
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, expected), f"{generated[:, SEQLEN:]} != {expected[:, SEQLEN:]}"


@pytest.mark.parametrize("kind", KINDS)
def test_unpatch_restores_attention_forward_and_modules(kind):
    model = make_model(kind)
    reference = copy.deepcopy(model)
    modules = dict(model.named_modules())
    fusedops.patch(model)
    fusedops.patch(model)  # patching twice is fine
    assert model.config._attn_implementation == "fusedops"
    assert "forward" in vars(model)
    fusedops.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    assert "forward" not in vars(model)
    assert not hasattr(model, "fusedops_report")
    restored = dict(model.named_modules())
    assert list(restored) == list(modules)
    assert all(restored[name] is module for name, module in modules.items())

    ids = tokens()
    out, ref = model(ids, labels=ids), reference(ids, labels=ids)
    assert out.logits is not None
    assert_close(out.logits, ref.logits, torch.float32, "logits after unpatch")
    assert_close(out.loss, ref.loss, torch.float32, "loss after unpatch")


def test_a_deep_copy_of_a_patched_model_uses_its_own_weights():
    model, reference = patched_and_reference("llama")
    twin, reference_twin = copy.deepcopy(model), copy.deepcopy(reference)
    with torch.no_grad():
        for parameter in (*twin.parameters(), *reference_twin.parameters()):
            parameter.mul_(1.5)
    ids = tokens()
    with torch.no_grad():
        assert_close(twin(ids).logits, reference_twin(ids).logits, torch.float32,
                     "logits of the copy")
        assert_close(twin(ids, labels=ids).loss, reference_twin(ids, labels=ids).loss,
                     torch.float32, "loss of the copy")


def test_return_dict_false_returns_a_tuple_with_the_loss_first():
    model, reference = patched_and_reference("llama")
    ids = tokens()
    out = model(ids, labels=ids, return_dict=False)
    ref = reference(ids, labels=ids, return_dict=False)
    assert isinstance(ref, tuple)
    assert isinstance(out, tuple)
    assert_close(out[0], ref[0], torch.float32, "loss")
