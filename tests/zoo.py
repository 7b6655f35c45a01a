"""Tiny float64 models, each paired with a loss closure, for dense-Hessian checks.

Every model is in eval mode with the fast paths torch would take left on: the
engines must cope with the model as a user hands it over.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Case:
    name: str
    model: nn.Module
    loss: Callable[[], Tensor]
    layers: list[str]
    # the loss split at the network outputs (for the Gauss-Newton methods): loss() == criterion(outputs())
    outputs: Callable[[], Tensor] | None = None
    criterion: Callable[[Tensor], Tensor] | None = None


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mlp() -> Case:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    x = torch.randn(11, 5, dtype=torch.float64, generator=_gen(1))
    y = torch.randint(0, 3, (11,), generator=_gen(2))
    return Case(
        "mlp", model, lambda: F.cross_entropy(model(x), y), ["0.weight", "2.bias", "4.weight"],
        outputs=lambda: model(x), criterion=lambda out: F.cross_entropy(out, y),
    )


class AttentionBlock(nn.Module):
    """Post-norm attention block with a classification head: nn.MultiheadAttention + LayerNorm."""

    def __init__(self, d: int = 8, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x + self.attn(x, x, x, need_weights=False)[0])
        return self.head(h.mean(1))


def attention() -> Case:
    torch.manual_seed(0)
    model = AttentionBlock().double().eval()
    x = torch.randn(4, 5, 8, dtype=torch.float64, generator=_gen(1))
    y = torch.randint(0, 3, (4,), generator=_gen(2))
    return Case("mha", model, lambda: F.cross_entropy(model(x), y), ["attn.in_proj_weight", "attn.out_proj.weight"])


class EncoderClassifier(nn.Module):
    def __init__(self, d: int = 8, heads: int = 2, layers: int = 2, classes: int = 3) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=12, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor, pad: Tensor | None = None) -> Tensor:
        return self.head(self.encoder(x, src_key_padding_mask=pad)[:, 0])


def encoder() -> Case:
    torch.manual_seed(0)
    model = EncoderClassifier().double().eval()
    x = torch.randn(3, 6, 8, dtype=torch.float64, generator=_gen(1))
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:] = True
    y = torch.randint(0, 3, (3,), generator=_gen(2))
    return Case(
        "encoder",
        model,
        lambda: F.cross_entropy(model(x, pad), y),
        ["encoder.layers.0.self_attn.in_proj_weight", "encoder.layers.1.linear1.weight", "encoder.layers.1.norm2.weight"],
        outputs=lambda: model(x, pad),
        criterion=lambda out: F.cross_entropy(out, y),
    )


def decoder() -> Case:
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(8, 2, dim_feedforward=12, dropout=0.1, batch_first=True)
    model = nn.TransformerDecoder(layer, 2).double().eval()
    tgt = torch.randn(2, 5, 8, dtype=torch.float64, generator=_gen(1))
    memory = torch.randn(2, 4, 8, dtype=torch.float64, generator=_gen(2))
    mask = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    target = torch.randn(2, 5, 8, dtype=torch.float64, generator=_gen(3))
    return Case(
        "decoder",
        model,
        lambda: F.mse_loss(model(tgt, memory, tgt_mask=mask, tgt_is_causal=True), target),
        ["layers.0.multihead_attn.in_proj_weight", "layers.1.self_attn.out_proj.weight"],
    )


class CausalSDPA(nn.Module):
    """A decoder-only block calling F.scaled_dot_product_attention(is_causal=True) directly."""

    def __init__(self, d: int = 8, heads: int = 2, vocab: int = 11) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids)
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        return self.out(self.norm(x + self.proj(a)))


def sdpa_causal() -> Case:
    torch.manual_seed(0)
    model = CausalSDPA().double().eval()
    ids = torch.randint(0, 11, (3, 6), generator=_gen(1))
    return Case(
        "sdpa",
        model,
        lambda: F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()),
        ["qkv.weight", "proj.weight", "embed.weight"],
    )


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 3 * 3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def conv_bn() -> Case:
    torch.manual_seed(0)
    model = ConvBN().double()
    x = torch.randn(6, 2, 5, 5, dtype=torch.float64, generator=_gen(1))
    with torch.no_grad():  # give batch norm non-trivial running statistics
        model.train()
        for _ in range(3):
            model(x)
    model.eval()
    y = torch.randint(0, 2, (6,), generator=_gen(2))
    return Case("conv_bn", model, lambda: F.cross_entropy(model(x), y), ["conv.weight", "bn.weight", "fc.weight"])


def hf_bert() -> Case:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=23, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=12,
        max_position_embeddings=16, num_labels=3,
    )
    model = BertForSequenceClassification(config).double().eval()
    ids = torch.randint(0, 23, (3, 7), generator=_gen(1))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[2, 5:] = 0
    labels = torch.randint(0, 3, (3,), generator=_gen(2))
    return Case(
        "hf_bert",
        model,
        lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss,
        [
            "bert.encoder.layer.0.attention.self.query",
            "bert.encoder.layer.1.attention.output.dense.weight",
            "bert.encoder.layer.1.output.LayerNorm.weight",
        ],
    )


def hf_gpt2() -> Case:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=19, n_embd=8, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).double().eval()
    ids = torch.randint(0, 19, (2, 6), generator=_gen(1))
    return Case(
        "hf_gpt2",
        model,
        # Not model(..., labels=ids).loss: HF's causal-LM loss casts logits with .float(),
        # which rounds a float64 model's logits to float32.
        lambda: F.cross_entropy(model(input_ids=ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()),
        ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight", "transformer.ln_f.weight"],
    )


ZOO: dict[str, Callable[[], Case]] = {
    "mlp": mlp,
    "mha": attention,
    "encoder": encoder,
    "decoder": decoder,
    "sdpa": sdpa_causal,
    "conv_bn": conv_bn,
    "hf_bert": hf_bert,
    "hf_gpt2": hf_gpt2,
}


def dense_hessian_diagonals(case: Case, names: list[str]) -> dict[str, Tensor]:
    """Ground truth: the diagonal of each named parameter's full float64 Hessian."""
    return {name: full_hessian(case, name).diagonal().clone() for name in names}


def full_hessian(case: Case, name: str, decomposed: bool = True) -> Tensor:
    """The dense ``(n, n)`` float64 Hessian of one parameter.

    Computed reverse-over-reverse (``jacrev(jacrev)``), so the ground truth trusts
    no forward-mode AD rule, under the decompositions that keep the fused kernels'
    missing double-backward rules out of the way (``decomposed=False``: torch's own
    ops, for a model whose ops all have double-backward rules).
    """
    import contextlib

    import fasthess
    from torch.func import jacrev

    p = dict(case.model.named_parameters())[name].detach()
    with fasthess.autodiff_safe() if decomposed else contextlib.nullcontext():
        H = jacrev(jacrev(lambda w: _loss_with(case, name, w)))(p)
    return H.detach().reshape(p.numel(), p.numel())


def dense_ggn(case: Case, name: str) -> Tensor:
    """The dense ``(n, n)`` float64 generalised Gauss-Newton matrix ``Jᵀ H_ℓ J`` of one parameter."""
    import fasthess
    from torch.func import hessian, jacrev

    p = dict(case.model.named_parameters())[name].detach()
    with fasthess.autodiff_safe():
        J = jacrev(lambda w: _loss_with(case, name, w, case.outputs))(p)
        out = case.outputs().detach()
        HL = hessian(lambda o: case.criterion(o.reshape(out.shape)))(out.reshape(-1))
    J = J.detach().reshape(out.numel(), p.numel())
    return J.T @ HL.detach() @ J


def _loss_with(case: Case, name: str, w: Tensor, fn: Callable[[], Tensor] | None = None) -> Tensor:
    from torch.func import functional_call

    class Run(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = case.model

        def forward(self) -> Tensor:
            return (fn or case.loss)()

    return functional_call(Run(), {"model." + name: w}, ())
