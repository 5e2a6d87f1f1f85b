"""The chunked linear-cross-entropy (em/training/loss.py) equals the plain loss, and its gradients equal too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from em.errors import ConfigError
from em.training.loss import causal_lm_loss, check_supported, chunked_lm_loss


def _plain(hidden, weight, labels, bias=None):
    logits = hidden[:, :-1] @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def _case(dtype=torch.float64, seed=0, b=3, t=11, d=8, v=37, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, d, generator=g, dtype=dtype, requires_grad=True)
    bias_t = torch.randn(v, generator=g, dtype=dtype, requires_grad=True) if bias else None
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :5] = -100  # a prompt
    labels[2, 7:] = -100  # padding
    return hidden, weight, bias_t, labels


@pytest.mark.parametrize("chunk", [1, 4, 1000, None])
@pytest.mark.parametrize("bias", [True, False])
def test_chunked_loss_and_gradients_equal_the_plain_ones(chunk, bias):
    hidden, weight, b, labels = _case(bias=bias)
    ref = _plain(hidden, weight, labels, b)
    ref_grads = torch.autograd.grad(ref, [hidden, weight] + ([b] if bias else []))
    got = chunked_lm_loss(hidden, weight, labels, b, chunk_size=chunk)
    got_grads = torch.autograd.grad(got, [hidden, weight] + ([b] if bias else []))
    torch.testing.assert_close(got, ref.to(got.dtype), rtol=1e-10, atol=1e-12)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


def test_fp32_within_fp_tolerance_and_upstream_gradient_is_applied():
    hidden, weight, b, labels = _case(dtype=torch.float32, seed=3, b=4, t=33, d=16, v=101)
    ref = 2.5 * _plain(hidden, weight, labels, b)
    (gh_ref,) = torch.autograd.grad(ref, [hidden])
    got = 2.5 * chunked_lm_loss(hidden, weight, labels, b, chunk_size=7)
    (gh,) = torch.autograd.grad(got, [hidden])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-4, atol=1e-6)


def test_frozen_head_gets_no_gradient_and_no_trained_token_gives_zero():
    hidden, weight, _, labels = _case()
    weight.requires_grad_(False)
    loss = chunked_lm_loss(hidden, weight, labels)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None
    hidden.grad = None
    none = torch.full_like(labels, -100)
    zero = chunked_lm_loss(hidden, weight, none)
    zero.backward()
    assert zero.item() == 0.0 and torch.count_nonzero(hidden.grad) == 0


def test_no_grad_gives_the_loss_only():
    hidden, weight, b, labels = _case()
    with torch.no_grad():
        got = chunked_lm_loss(hidden, weight, labels, b)
        ref = _plain(hidden, weight, labels, b)
    torch.testing.assert_close(got, ref.to(got.dtype), rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def tiny_peft():
    from em.models.loading import ModelArgs, load_model
    from em.models.peft_setup import FinetuneArgs, apply_finetune
    from em.models.tiny import materialize_tiny

    path = str(materialize_tiny())
    model = apply_finetune(load_model(ModelArgs(name="tiny", kind="tiny", dtype="float32"), path), FinetuneArgs(r=4))
    torch.manual_seed(0)
    for n, p in model.named_parameters():  # lora_B starts at zero: make the adapter matter for the gradients
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    return model.train()


def _batch(vocab):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    labels = ids.clone()
    labels[:, :8] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_causal_lm_loss_on_the_tiny_peft_model_equals_its_own_loss(tiny_peft):
    batch = _batch(tiny_peft.config.vocab_size)
    trainable = [p for p in tiny_peft.parameters() if p.requires_grad]
    ref = causal_lm_loss(tiny_peft, batch, "plain")
    assert torch.allclose(ref, tiny_peft(**batch).loss)
    ref_g = torch.autograd.grad(ref, trainable)
    got = causal_lm_loss(tiny_peft, batch, "chunked", chunk_size=5)
    got_g = torch.autograd.grad(got, trainable)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(got_g, ref_g):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_unsupported_choices_are_config_errors(tiny_peft):
    with pytest.raises(ConfigError, match="expected one of"):
        check_supported(tiny_peft, "fused")
    check_supported(tiny_peft, "chunked")
    cfg = tiny_peft.get_base_model().config
    cfg.final_logit_softcapping = 30.0
    try:
        with pytest.raises(ConfigError, match="final_logit_softcapping"):
            check_supported(tiny_peft, "chunked")
    finally:
        del cfg.final_logit_softcapping
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="liger"):
            causal_lm_loss(tiny_peft, _batch(tiny_peft.config.vocab_size), "liger")


@pytest.mark.gpu
def test_liger_fused_loss_equals_the_chunked_one_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("liger_kernel")
    from em.training.loss import _liger_loss

    hidden, weight, b, labels = _case(dtype=torch.float32, seed=5, b=4, t=64, d=64, v=5000)
    hidden, weight, labels = hidden.detach().cuda().requires_grad_(), weight.detach().cuda(), labels.cuda()
    ref = chunked_lm_loss(hidden, weight, labels, chunk_size=33)
    (gr,) = torch.autograd.grad(ref, [hidden])
    got = _liger_loss(hidden, weight, labels, None)
    (gg,) = torch.autograd.grad(got, [hidden])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gg, gr, rtol=1e-3, atol=1e-5)


def test_training_with_the_chunked_loss_follows_the_plain_run(tmp_path):
    """model.cross_entropy switches the loss of a real run; both give the same losses and adapter."""
    import csv

    from safetensors.torch import load_file

    from em.training.run import train
    from tests.helpers import compose_train

    fast = ["trainer.max_steps=3", "trainer.enable_progress_bar=false", "callbacks=none",
            "data.global_batch_size=4", "data.micro_batch_size=4"]
    runs = {}
    for choice in ("plain", "chunked"):
        s = train(compose_train([*fast, f"model.cross_entropy={choice}"], run_dir=str(tmp_path / choice)))
        with open(s["metrics_csv"]) as f:
            losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
        runs[choice] = (losses, load_file(f"{s['adapter_dir']}/adapter_model.safetensors"))
    (lp, wp), (lc, wc) = runs["plain"], runs["chunked"]
    assert len(lp) == 3 and lp != [lp[0]] * 3
    assert lc == pytest.approx(lp, rel=1e-4)
    assert wp.keys() == wc.keys()
    for k in wp:
        torch.testing.assert_close(wc[k], wp[k], rtol=1e-3, atol=1e-5)


def test_bad_cross_entropy_choice_fails_at_model_set_up(tmp_path):
    from em.training.run import train
    from tests.helpers import compose_train

    with pytest.raises(ConfigError, match="model.cross_entropy='fused'"):
        train(compose_train(["trainer.max_steps=1", "callbacks=none", "model.cross_entropy=fused",
                             "trainer.enable_progress_bar=false"], run_dir=str(tmp_path)))

