"""bpb accounting on the real stand-in corpus (REPO_ROOT/../shared/data) with the challenge's sp1024 and
sp8192 tokenizers (both encode the same validation text, so both must credit the same bytes).

The only test module that reads outside files; it skips, naming the missing path, when they are absent.
"""
from __future__ import annotations

import lzma
import shutil

import numpy as np
import pytest
import torch

from conftest import BOS, SHARED_DATA, tg

# From SHARED_DATA/README.md: the val shard's text is 12,793,422 bytes "as the tokenizer normalizes
# them (what bpb counts)", in 7,680 documents; 5,309,690 sp1024 tokens or 3,606,796 sp8192 tokens.
README_VAL_BYTES, README_VAL_DOCS = 12_793_422, 7_680
README_VAL_TOKENS = {1024: 5_309_690, 8192: 3_606_796}

if not SHARED_DATA.is_dir():
    pytest.skip(f"stand-in data folder {SHARED_DATA} is missing; these bpb checks need it",
                allow_module_level=True)


@pytest.fixture(scope="module", params=[1024, 8192], ids=["sp1024", "sp8192"])
def real(request, tmp_path_factory):
    vocab = request.param
    val_xz = SHARED_DATA / f"blogwiki_sp{vocab}" / "fineweb_val_000000.bin.xz"
    tokenizer = SHARED_DATA / "tokenizers" / f"fineweb_{vocab}_bpe.model"
    for path in (val_xz, tokenizer):
        if not path.is_file():
            pytest.skip(f"{path} is missing")
    shard = tmp_path_factory.mktemp(f"real{vocab}") / "fineweb_val_000000.bin"
    with lzma.open(val_xz) as src, open(shard, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 22)
    sp = tg.load_tokenizer(str(tokenizer), vocab)
    return np.asarray(tg.open_shard(str(shard))), sp


def test_real_shard_layout(real):
    tokens, sp = real
    assert tokens.size == README_VAL_TOKENS[sp.vocab_size()]
    assert tokens[0] == BOS and int((tokens == BOS).sum()) == README_VAL_DOCS
    tg.check_token_ids(tokens, sp.vocab_size(), "val")


def test_real_documents_bytes_match_decoded_text(real):
    """For the first 300 documents, target_bytes over [BOS, doc...] sums to len(decode(doc) in UTF-8)."""
    tokens, sp = real
    tables = tg.byte_tables(sp)
    starts = np.flatnonzero(tokens == BOS)[:301]
    n_byte_tokens = 0
    for s, e in zip(starts[:-1], starts[1:]):
        doc = tokens[s:e].astype(np.int64)
        ids = doc[1:].tolist()
        n_byte_tokens += sum(sp.is_byte(i) for i in ids)
        got = int(tg.target_bytes(torch.from_numpy(doc), tables).sum())
        assert got == len(sp.decode(ids).encode("utf-8")), f"document at token {s}"
    assert n_byte_tokens > 0


def test_real_total_bytes_match_readme(real):
    """Over the whole val stream the credited bytes equal the corpus README's normalised byte count."""
    tokens, sp = real
    total = int(tg.target_bytes(torch.from_numpy(tokens.astype(np.int64)), tg.byte_tables(sp)).sum())
    assert total == README_VAL_BYTES


def test_real_tokenizer_matches_its_shards(real):
    """The shards' own tokenizer re-encodes every validation document to the same ids (the check that
    main() runs on 200 documents), so that check needs no tolerance."""
    tokens, sp = real
    tg.check_tokenizer_matches(sp, tokens, "own", "real")
    bos = np.flatnonzero(tokens == BOS)
    docs = [tokens[a + 1 : b].tolist() for a, b in zip(bos, list(bos[1:]) + [tokens.size])]
    assert len(docs) == README_VAL_DOCS and sp.encode(sp.decode(docs)) == docs


@pytest.mark.parametrize("real", [1024], indirect=True)
def test_real_sp8192_tokenizer_on_sp1024_shards(real):
    """The sp8192 tokenizer with VOCAB_SIZE=8192 on sp1024 shards: every id is < 8192, so only the
    re-encoding check can tell; it fails, naming both paths."""
    tokens, _ = real
    path = SHARED_DATA / "tokenizers" / "fineweb_8192_bpe.model"
    sp8192 = tg.load_tokenizer(str(path), 8192)
    tg.check_token_ids(tokens, 8192, "val")
    with pytest.raises(ValueError, match=rf"shards in sp1024 were not made with tokenizer {path}: \d+ of 200 doc"):
        tg.check_tokenizer_matches(sp8192, tokens, str(path), "sp1024")
