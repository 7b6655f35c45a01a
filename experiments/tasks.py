"""The models, data and losses of the paper's optimizer comparisons, one task each.

A task turns a config (``model`` and ``data`` sections) into a model, a dict of
example tensors (indexed along dim 0) and a loss on a batch of them:

* ``seq2seq`` — the translation tutorial's Transformer (Tables 2, 6-9; German→English
  or random integer targets);
* ``classifier`` — BERT-small sentence classification (Table 1; IMDB, offline the
  Rotten Tomatoes stand-in; pretrained weights from a local path optional);
* ``lm`` — the language-modelling tutorial's Transformer (Tables 3-5; WikiText-2,
  offline the gensim Wikipedia stand-in, or random data), with the paper's
  uniform/normal initialisation gains;
* ``resnet`` — the CIFAR-10 tutorial's ResNet (Table 10; offline the MNIST-5k stand-in).

Example:
    >>> cfg = {"task": "seq2seq", "model": {"vocab": 16, "d_model": 8, "heads": 2, "enc_layers": 1,
    ...        "dec_layers": 1, "ff": 8}, "data": {"kind": "random_targets", "train_examples": 4,
    ...        "src_len": 3, "tgt_len": 3}}
    >>> task = get_task(cfg)
    >>> data = task.make_data(cfg, seed=0)
    >>> model = task.build(cfg, data)
    >>> task.loss(model, {k: v[:2] for k, v in data.items()}).shape
    torch.Size([])
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import data as datasets_
from data import BOS, PAD, build_vocab, encode

Batch = dict[str, Tensor]


class Task(Protocol):
    def make_data(self, cfg: dict, seed: int) -> Batch: ...

    def build(self, cfg: dict, data: Batch) -> nn.Module: ...

    def loss(self, model: nn.Module, batch: Batch) -> Tensor: ...


def init_weights_(model: nn.Module, init: dict | None) -> None:
    """The paper's Appendix A.1 initialisations: every weight matrix ``xavier_uniform_`` or
    ``xavier_normal_`` with ``gain`` (``{"kind": "uniform"|"normal", "gain": g}``); None keeps torch's."""
    if not init:
        return
    fill = {"uniform": nn.init.xavier_uniform_, "normal": nn.init.xavier_normal_}[init["kind"]]
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            fill(p, gain=init["gain"])


def _positional_encoding(max_len: int, d_model: int) -> Tensor:
    pos = torch.arange(max_len)[:, None] * torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(max_len, d_model)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos), torch.cos(pos)
    return pe


# --- seq2seq (Tables 2, 6-9) ------------------------------------------------------------------


class Seq2Seq(nn.Module):
    """The translation tutorial's model: embeddings + positional encoding, nn.Transformer, a vocabulary head."""

    def __init__(self, vocab: int, d_model: int, heads: int, enc_layers: int, dec_layers: int, ff: int,
                 max_len: int) -> None:
        super().__init__()
        self.src_embed = nn.Embedding(vocab, d_model)
        self.tgt_embed = nn.Embedding(vocab, d_model)
        self.register_buffer("pe", _positional_encoding(max_len, d_model))
        self.scale = math.sqrt(d_model)
        self.transformer = nn.Transformer(d_model, heads, enc_layers, dec_layers, ff, dropout=0.1, batch_first=True)
        self.generator = nn.Linear(d_model, vocab)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        n = tgt_in.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=tgt_in.device).triu(1)  # bool, like the padding masks
        s = self.src_embed(src) * self.scale + self.pe[: src.shape[1]]
        t = self.tgt_embed(tgt_in) * self.scale + self.pe[: tgt_in.shape[1]]
        h = self.transformer(s, t, tgt_mask=causal, tgt_is_causal=True, src_key_padding_mask=src == PAD,
                             tgt_key_padding_mask=tgt_in == PAD, memory_key_padding_mask=src == PAD)
        return self.generator(h)


def seq2seq_loss(model: nn.Module, src: Tensor, tgt: Tensor) -> Tensor:
    """Teacher-forced cross-entropy over the target tokens (padding ignored)."""
    tgt_in = torch.cat([torch.full_like(tgt[:, :1], BOS), tgt[:, :-1]], 1)
    logits = model(src, tgt_in)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=PAD)


class Seq2SeqTask:
    def make_data(self, cfg: dict, seed: int) -> Batch:
        """Token ids ``src``/``tgt`` of ``train_examples`` pairs: translation pairs or random integer targets."""
        g = torch.Generator().manual_seed(seed)
        m, d = cfg["model"], cfg["data"]
        n = d["train_examples"]
        if d.get("kind", "random_targets") == "random_targets":  # no padding: every token is a target
            return {"src": torch.randint(4, m["vocab"], (n, d["src_len"]), generator=g),
                    "tgt": torch.randint(4, m["vocab"], (n, d["tgt_len"]), generator=g)}
        pairs = datasets_.load_translation_pairs(d["source"], d.get("path"))
        if len(pairs) < n:
            raise ValueError(f"{d['source']} has {len(pairs)} pairs; the config asks for train_examples={n}")
        order = torch.randperm(len(pairs), generator=g)[:n].tolist()
        de, en = [pairs[i][0] for i in order], [pairs[i][1] for i in order]
        return {"src": encode(de, build_vocab(de, m["vocab"]), d["src_len"]),
                "tgt": encode(en, build_vocab(en, m["vocab"]), d["tgt_len"])}

    def build(self, cfg: dict, data: Batch) -> nn.Module:
        m = cfg["model"]
        model = Seq2Seq(m["vocab"], m["d_model"], m["heads"], m["enc_layers"], m["dec_layers"], m["ff"],
                        max(data["src"].shape[1], data["tgt"].shape[1]))
        init_weights_(model, m.get("init"))
        return model

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return seq2seq_loss(model, batch["src"], batch["tgt"])


# --- classifier (Table 1) ----------------------------------------------------------------------


class ClassifierTask:
    """BERT-small (HF ``BertForSequenceClassification``) on sentiment labels.

    ``model``: ``hidden``, ``layers``, ``heads``, ``intermediate``, ``vocab``; or
    ``pretrained``: a local folder with weights and tokenizer (no downloads).
    """

    def make_data(self, cfg: dict, seed: int) -> Batch:
        d, m = cfg["data"], cfg["model"]
        texts, labels = datasets_.load_sentiment(d["source"], d.get("path"))
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(texts), generator=g)[: d["train_examples"]].tolist()
        texts, labels = [texts[i] for i in order], [labels[i] for i in order]
        if m.get("pretrained"):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(m["pretrained"])
            enc = tok(texts, padding="max_length", truncation=True, max_length=d["seq_len"], return_tensors="pt")
            ids, mask = enc["input_ids"], enc["attention_mask"]
        else:
            ids = encode(texts, build_vocab(texts, m["vocab"]), d["seq_len"])
            mask = (ids != PAD).long()
        return {"ids": ids, "mask": mask, "labels": torch.tensor(labels)}

    def build(self, cfg: dict, data: Batch) -> nn.Module:
        from transformers import BertConfig, BertForSequenceClassification

        m = cfg["model"]
        if m.get("pretrained"):
            return BertForSequenceClassification.from_pretrained(m["pretrained"], num_labels=2)
        config = BertConfig(vocab_size=m["vocab"], hidden_size=m["hidden"], num_hidden_layers=m["layers"],
                            num_attention_heads=m["heads"], intermediate_size=m["intermediate"],
                            max_position_embeddings=data["ids"].shape[1], num_labels=2, pad_token_id=PAD)
        config._attn_implementation = "eager"  # the math path: differentiable to any order
        return BertForSequenceClassification(config)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        logits = model(input_ids=batch["ids"], attention_mask=batch["mask"]).logits
        return F.cross_entropy(logits, batch["labels"])


# --- language model (Tables 3-5) ---------------------------------------------------------------


class LanguageModel(nn.Module):
    """The language-modelling tutorial's model: embedding, positional encoding, causal TransformerEncoder, decoder."""

    def __init__(self, vocab: int, d_model: int, heads: int, layers: int, ff: int, max_len: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.register_buffer("pe", _positional_encoding(max_len, d_model))
        self.scale = math.sqrt(d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.2, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.decoder = nn.Linear(d_model, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        n = ids.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).triu(1)
        h = self.encoder(self.embed(ids) * self.scale + self.pe[:n], mask=causal, is_causal=True)
        return self.decoder(h)


class LanguageModelTask:
    def make_data(self, cfg: dict, seed: int) -> Batch:
        """``(n, bptt)`` inputs and next-token targets: chunks of a token stream, or random integers."""
        d, m = cfg["data"], cfg["model"]
        g = torch.Generator().manual_seed(seed)
        n, length = d["train_examples"], d["bptt"]
        if d["source"] == "random":
            return {"x": torch.randint(4, m["vocab"], (n, length), generator=g),
                    "y": torch.randint(4, m["vocab"], (n, length), generator=g)}
        text = datasets_.load_lm_text(d["source"], d.get("path"))
        vocab = build_vocab([text], m["vocab"])
        stream = encode([text], vocab, len(text.split()) * 2 + 1)[0]
        stream = stream[stream != PAD]
        chunks = (stream.numel() - 1) // length
        if chunks < n:
            raise ValueError(f"{d['source']} gives {chunks} sequences of {length} tokens; asked for {n}")
        order = torch.randperm(chunks, generator=g)[:n]
        starts = order[:, None] * length + torch.arange(length)
        return {"x": stream[starts], "y": stream[starts + 1]}

    def build(self, cfg: dict, data: Batch) -> nn.Module:
        m = cfg["model"]
        model = LanguageModel(m["vocab"], m["d_model"], m["heads"], m["layers"], m["ff"], data["x"].shape[1])
        init_weights_(model, m.get("init"))
        return model

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        logits = model(batch["x"])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["y"].reshape(-1))


# --- ResNet (Table 10) -------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """The CIFAR-10 tutorial's ResNet: a 3×3 stem, three stages (16, 32, 64 channels), average pool, linear."""

    def __init__(self, in_channels: int, blocks: list[int], classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        stages, cin = [], 16
        for i, (cout, n) in enumerate(zip((16, 32, 64), blocks)):
            for j in range(n):
                stages.append(ResidualBlock(cin, cout, 2 if i > 0 and j == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.layers(F.relu(self.bn(self.conv(x))))
        return self.fc(h.mean((2, 3)))


class ResNetTask:
    def make_data(self, cfg: dict, seed: int) -> Batch:
        d = cfg["data"]
        images, labels = datasets_.load_images(d["source"], d.get("path"))
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(images.shape[0], generator=g)[: d["train_examples"]]
        x = images[order].float() / 255.0
        x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
        return {"x": x, "y": labels[order]}

    def build(self, cfg: dict, data: Batch) -> nn.Module:
        return ResNet(data["x"].shape[1], cfg["model"]["blocks"], cfg["model"].get("classes", 10))

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return F.cross_entropy(model(batch["x"]), batch["y"])


TASKS: dict[str, Task] = {"seq2seq": Seq2SeqTask(), "classifier": ClassifierTask(), "lm": LanguageModelTask(),
                          "resnet": ResNetTask()}


def get_task(cfg: dict) -> Task:
    name = cfg.get("task", "seq2seq")
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]
