"""Prompt features for the task-type and difficulty classifier: hashed n-grams plus handcrafted numbers.

Shared by training (router/train.py) and the runtime (router/classifier.py), so it imports only numpy
and the standard library. It hashes a `Prompt`: the conversation as router/messages.py reads it, already
cut to what the features use. Two rules shape everything here:

- Never raise. Whatever the Prompt holds (nothing, only a system prompt, binary junk, emoji), the
  request path gets a feature vector.
- Be fast and identical for one prompt or a batch. Word and character n-grams are hashed with
  vectorised numpy over the UTF-8 bytes of the whole batch at once (no per-token Python loop), and
  a prompt's row does not depend on which other prompts share its batch.

The vector is: [hashed user word/bigram counts | hashed system-prompt word/bigram counts | hashed
user char n-gram counts | handcrafted numbers], with counts sublinear (log1p). Inverse document
frequency, the L2 norms and the linear heads are applied inside the ONNX model (scikit-learn's
TfidfTransformer and heads, converted by skl2onnx).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from router.handcrafted import HANDCRAFTED, TERMS_FORMAT, handcrafted_numbers, task_term_counts
from router.messages import Prompt, prompt_from_messages

try:  # the same hashing in C (router/_ngrams.c), built by `pip install`; numpy below is the reference
    from router import _ngrams as _native
except ImportError:  # not built (no compiler): the numpy path gives the same numbers, slower
    _native = None

# Bump when anything below changes the vector for the same prompt: the artifact card records it and
# the runtime refuses an artifact trained on another version (it would silently score garbage).
FEATURE_VERSION = 4  # 4: task-term counts; 3: 14-bit word and char hashing, multiple-choice layout numbers

# Byte caps bound the cost of non-Latin text (up to 4 bytes a character) in the n-gram pass.
MAX_USER_BYTES = 4000
MAX_SYSTEM_BYTES = 1500
CHUNK_BYTES = 16384  # featurize() vectorises over groups of prompts about this big

WORD_BITS = 14
SYSTEM_BITS = 11
CHAR_BITS = 14
N_WORD = 1 << WORD_BITS
N_SYSTEM = 1 << SYSTEM_BITS  # the system prompt has its own block: its own TF-IDF norm, so a long
N_CHAR = 1 << CHAR_BITS  # user turn cannot drown it out
N_HASHED = N_WORD + N_SYSTEM + N_CHAR
SYSTEM_OFFSET = N_WORD
CHAR_OFFSET = N_WORD + N_SYSTEM
# 3- and 4-grams: dropping 5-grams cut the n-grams per prompt by 30% (and the time that scales with
# them) with equal or better validation scores (docs/classifier.md, "Latency").
CHAR_NGRAMS = (3, 4)
assert N_HASHED <= 1 << 16  # featurize_sparse sorts columns as uint16 (radix sort)
assert WORD_BITS == CHAR_BITS  # _sparse_one buckets user words and chars in one pass

N_HANDCRAFTED = len(HANDCRAFTED)
N_FEATURES = N_HASHED + N_HANDCRAFTED


# ---------------------------------------------------------------------------------------------
# Hashing. Everything is uint64 arithmetic that wraps modulo 2**64 (numpy does not check integer
# overflow on arrays), which is exactly what a polynomial rolling hash needs.

_P = 0x100000001B3  # odd, so invertible modulo 2**64
_P_INV = pow(_P, -1, 1 << 64)
_MIX = 0x9E3779B97F4A7C15
_SALT_USER_WORD = 0x51ED270B
_SALT_USER_BIGRAM = 0xA24BAED4
_SALT_FIRST_WORD = 0x3C6EF372
_SALT_SYSTEM_WORD = 0x7F4A7C15
_SEP = 0  # byte between prompts in a batch buffer; never part of a word

# Word bytes: ASCII letters, digits, underscore, and every non-ASCII byte (so any script forms words).
_WORD_BYTE = np.zeros(256, dtype=bool)
for _b in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_":
    _WORD_BYTE[_b] = True
_WORD_BYTE[128:] = True
# Digits are folded to '0' before hashing: "17" and "42" should look alike, the exact value rarely
# says anything about task type or difficulty (their count and length still do).
_FOLD = np.arange(256, dtype=np.uint8)
_FOLD[ord("1") : ord("9") + 1] = ord("0")
_FOLD[_SEP] = _SEP

_powers_cache = (np.ones(1, dtype=np.uint64), np.ones(1, dtype=np.uint64))


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P**i and P**-i modulo 2**64 for i < n, grown on demand and kept (a few hundred KB).

    One tuple swapped in one assignment, so a thread never sees powers and inverses of two sizes.
    """
    global _powers_cache
    cache = _powers_cache
    if len(cache[0]) < n:
        size = max(n, 2 * len(cache[0]), 8192)
        ones = np.ones(1, dtype=np.uint64)
        cache = (
            np.concatenate((ones, np.cumprod(np.full(size - 1, _P, dtype=np.uint64)))),
            np.concatenate((ones, np.cumprod(np.full(size - 1, _P_INV, dtype=np.uint64)))),
        )
        _powers_cache = cache
    return cache[0][:n], cache[1][:n]


def _bucket(h: np.ndarray, bits: int) -> np.ndarray:
    """Finalise 64-bit hashes and keep the top `bits` bits (multiplicative hashing). Overwrites h.

    In place because batches make these arrays large, and fresh large arrays cost page faults.
    """
    tmp = np.right_shift(h, np.uint64(29))
    np.bitwise_xor(h, tmp, out=h)
    np.multiply(h, np.uint64(_MIX), out=h)
    np.right_shift(h, np.uint64(64 - bits), out=h)
    return h.view(np.int64)  # < 2**bits, so the same bits read as int64


def _pack(texts: Sequence[bytes]) -> tuple[bytes, np.ndarray | None]:
    """One buffer for the batch, each text framed by separators; each byte's row (None for one text).

    The framing makes every word start after a non-word byte, so no bounds checks are needed, and
    marks the start and end of a prompt in the character n-grams.
    """
    framed = [b"\0" + t.replace(b"\0", b" ") + b"\0" for t in texts]
    if len(framed) == 1:
        return framed[0], None
    rows = np.repeat(np.arange(len(framed), dtype=np.intp), [len(f) for f in framed])
    return b"".join(framed), rows


def _word_hashes(raw: bytes, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Position-independent polynomial hash of every word: (hashes, row of each word, word bytes a row)."""
    buf = _FOLD[np.frombuffer(raw, dtype=np.uint8)]
    is_word = _WORD_BYTE[buf]
    starts = np.flatnonzero(is_word[1:] > is_word[:-1]) + 1
    n_rows = 1 if rows is None else int(rows[-1]) + 1
    word_rows = np.zeros(len(starts), dtype=np.intp) if rows is None else rows[starts]
    word_bytes = np.bincount(rows[is_word], minlength=n_rows) if rows is not None else np.array([is_word.sum()])
    if len(starts) == 0:
        return np.zeros(0, dtype=np.uint64), word_rows, word_bytes
    pw, inv = _powers(len(buf))
    terms = buf.astype(np.uint64) * pw
    terms[~is_word] = 0  # so a segment sum from one word start to the next covers just the word
    return np.add.reduceat(terms, starts) * inv[starts], word_rows, word_bytes


_LOW_BYTES = {n: np.uint64((1 << (8 * n)) - 1) for n in CHAR_NGRAMS}
_NGRAM_SALT = {n: np.uint64(n << 56) for n in CHAR_NGRAMS}


def _char_ngrams(raw: bytes, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Hashed byte n-grams (CHAR_NGRAMS) that stay inside one prompt: (bucket, row)."""
    size = len(raw)
    counts = [max(size - n + 1, 0) for n in CHAR_NGRAMS]
    grams = np.empty(sum(counts), dtype=np.uint64)
    # Each element of this strided view is the 8 bytes starting at one position (little endian, so
    # masking the low n bytes gives the n-gram there): all n-grams with no Python loop over bytes.
    windows = np.ndarray(shape=(size,), dtype="<u8", buffer=raw + bytes(8), strides=(1,))
    at = 0
    for n, count in zip(CHAR_NGRAMS, counts):
        part = grams[at : at + count]
        np.bitwise_and(windows[:count], _LOW_BYTES[n], out=part)
        np.bitwise_or(part, _NGRAM_SALT[n], out=part)
        at += count
    if rows is None:
        return _bucket(grams, CHAR_BITS), np.zeros(len(grams), dtype=np.intp)
    # In a batch, drop n-grams that start in one prompt and end in the next.
    starts = np.concatenate([rows[:count] for count in counts])
    ends = np.concatenate([rows[n - 1 : n - 1 + count] for n, count in zip(CHAR_NGRAMS, counts)])
    inside = starts == ends
    return _bucket(grams[inside], CHAR_BITS), starts[inside]


def _encode(text: str, limit: int) -> bytes:
    # "replace" also covers lone surrogates, which plain utf-8 encoding rejects.
    return text.lower().encode("utf-8", "replace")[:limit]


# ---------------------------------------------------------------------------------------------
# Sparse features: a batch in vectorised numpy (featurize_sparse, _chunk_keys), or one prompt, the
# request path (_sparse_one: router/_ngrams.c when built, else _sparse_one_numpy, the same numbers).
class SparseFeatures(NamedTuple):
    """The hashed part of a batch as sorted (column, log1p count) pairs, plus the handcrafted numbers.

    Row r's pairs are indices[bounds[3r]:bounds[3r+3]], in three segments, one per TF-IDF block
    (user words, system words, user chars): segment s of the batch is bounds[s]:bounds[s+1]. This is
    what the ONNX model reads (router/train_onnx.py builds it): it gathers only the weights of the n-grams
    a prompt has (a few hundred) instead of multiplying an 18k-wide, mostly-zero row.
    """

    indices: np.ndarray  # (nnz,) int64, column in [0, N_HASHED)
    tf: np.ndarray  # (nnz,) float32, log1p(count)
    bounds: np.ndarray  # (3 * batch + 1,) int64
    handcrafted: np.ndarray  # (batch, N_HANDCRAFTED) float32


_BLOCK_STARTS = np.array([0, SYSTEM_OFFSET, CHAR_OFFSET], dtype=np.int64)
_EMPTY_INT = np.zeros(0, dtype=np.int64)
_ZERO_BOUND = np.zeros(1, dtype=np.int64)


def featurize_sparse(prompts: Sequence[Prompt]) -> SparseFeatures:
    """SparseFeatures for a batch. Same numbers as featurize(), without the dense matrix."""
    if len(prompts) == 1:
        return _sparse_one(prompts[0])
    if _native is not None:
        return _concat_rows([_sparse_one(p) for p in prompts])
    indices, tf, bounds, hand = [], [], [_ZERO_BOUND], []
    nnz = 0
    for chunk, chunk_bytes in _chunks(prompts):
        cols, rows, chunk_hand = _chunk_keys(chunk, chunk_bytes)
        # Sort by (row, column) and merge repeats. Columns fit in 16 bits, where numpy's stable sort
        # is a radix sort (~10x faster than sorting int64 keys): a column pass, then a row pass.
        cols16 = cols.astype(np.uint16)
        if rows is None:
            cols16.sort(kind="stable")
            rows_sorted = None
        else:
            order = np.argsort(cols16, kind="stable")
            by_row = np.argsort(rows[order].astype(np.uint16), kind="stable")
            order = order[by_row]
            cols16, rows_sorted = cols16[order], rows[order]
        n = len(cols16)
        if n:
            new = np.empty(n, dtype=bool)
            new[0] = True
            np.not_equal(cols16[1:], cols16[:-1], out=new[1:])
            if rows_sorted is not None:
                new[1:] |= rows_sorted[1:] != rows_sorted[:-1]
            starts = np.flatnonzero(new)
            counts = _run_lengths(starts, n)
            cols16 = cols16[starts]
            keys = cols16.astype(np.int64)
            if rows_sorted is not None:
                keys += rows_sorted[starts].astype(np.int64) * N_FEATURES
        else:
            counts, keys = np.zeros(0, dtype=np.float32), _EMPTY_INT
        edges = (np.arange(len(chunk), dtype=np.int64)[:, None] * N_FEATURES + _BLOCK_STARTS).reshape(-1)
        bounds.append(np.append(np.searchsorted(keys, edges[1:]), len(keys)) + nnz)
        indices.append(cols16.astype(np.int64))
        tf.append(np.log1p(counts))
        hand += chunk_hand
        nnz += len(keys)
    if len(indices) == 1:
        return SparseFeatures(indices[0], tf[0], np.concatenate(bounds), _hand_matrix(hand))
    return SparseFeatures(
        np.concatenate(indices) if indices else _EMPTY_INT,
        np.concatenate(tf) if tf else np.zeros(0, dtype=np.float32),
        np.concatenate(bounds),
        _hand_matrix(hand),
    )


def _chunks(prompts: Sequence[Prompt]):
    """Groups of prompts of about CHUNK_BYTES, with their encoded user turns: large enough to
    amortise numpy's per-call cost, small enough for the temporaries to stay in cache."""
    if len(prompts) == 1:
        yield prompts, [_encode(prompts[0].user, MAX_USER_BYTES)]
        return
    user_bytes = [_encode(p.user, MAX_USER_BYTES) for p in prompts]
    start, size = 0, 0
    for end, ub in enumerate(user_bytes, 1):
        size += len(ub)
        if size >= CHUNK_BYTES or end == len(prompts):
            yield prompts[start:end], user_bytes[start:end]
            start, size = end, 0


def _chunk_keys(prompts: Sequence[Prompt], user_bytes: list[bytes]) -> tuple[np.ndarray, np.ndarray | None, list[list[float]]]:
    """Every hashed n-gram occurrence: (column, row or None for one prompt), unsorted and repeated,
    and the handcrafted numbers of each prompt."""
    batch = len(prompts)
    raw, rows = _pack(user_bytes)
    words, word_rows, word_bytes = _word_hashes(raw, rows)
    same = word_rows[:-1] == word_rows[1:]
    bigrams = words[:-1][same] * np.uint64(_P) + words[1:][same]
    if batch == 1:
        first = np.zeros(min(len(words), 1), dtype=np.intp)
    else:  # each row's first word
        first = np.flatnonzero(np.concatenate((np.ones(min(len(words), 1), dtype=bool), ~same)))
    char_idx, char_rows = _char_ngrams(raw, rows)
    word_keys = np.concatenate(
        (words ^ np.uint64(_SALT_USER_WORD), bigrams ^ np.uint64(_SALT_USER_BIGRAM), words[first] ^ np.uint64(_SALT_FIRST_WORD))
    )
    index = [_bucket(word_keys, WORD_BITS), char_idx + CHAR_OFFSET]
    index_rows = [word_rows, word_rows[:-1][same], word_rows[first], char_rows]
    if any(p.system for p in prompts):  # most requests have none: skip the pass
        sys_raw, sys_rows = _pack([_encode(p.system, MAX_SYSTEM_BYTES) for p in prompts])
        sys_words, sys_word_rows, _ = _word_hashes(sys_raw, sys_rows)
        sys_same = sys_word_rows[:-1] == sys_word_rows[1:]
        sys_bigrams = sys_words[:-1][sys_same] * np.uint64(_P) + sys_words[1:][sys_same]
        index += [
            _bucket(sys_words ^ np.uint64(_SALT_SYSTEM_WORD), SYSTEM_BITS) + SYSTEM_OFFSET,
            _bucket(sys_bigrams ^ np.uint64(_SALT_USER_BIGRAM), SYSTEM_BITS) + SYSTEM_OFFSET,
        ]
        index_rows += [sys_word_rows, sys_word_rows[:-1][sys_same]]
    cols = np.concatenate(index)
    rows_of = np.concatenate(index_rows) if batch > 1 else None
    n_words = np.bincount(word_rows, minlength=batch)
    hand = [handcrafted_numbers(p, ub, float(n_words[i]), float(word_bytes[i]))
            for i, (p, ub) in enumerate(zip(prompts, user_bytes))]
    return cols, rows_of, hand


def _concat_rows(rows: list[SparseFeatures]) -> SparseFeatures:
    """One SparseFeatures from single-prompt ones, in order."""
    sizes = np.array([len(r.indices) for r in rows], dtype=np.int64)
    starts = np.cumsum(sizes) - sizes
    shifted = [r.bounds[:-1] + start for r, start in zip(rows, starts.tolist())]
    bounds = np.concatenate(shifted + [sizes.sum(keepdims=True)])
    return SparseFeatures(
        np.concatenate([r.indices for r in rows]),
        np.concatenate([r.tf for r in rows]),
        bounds,
        np.concatenate([r.handcrafted for r in rows]),
    )


def _sparse_one(p: Prompt) -> SparseFeatures:
    """featurize_sparse for one prompt (the request path): router/_ngrams.c when built, else numpy."""
    if _native is None:
        return _sparse_one_numpy(p)
    user_bytes, (cols, counts, system_start, char_start, n_words, word_bytes) = _native_columns(p)
    counts = np.frombuffer(counts, dtype=np.uint16)
    return SparseFeatures(
        np.frombuffer(cols, dtype=np.uint16).astype(np.int64),
        np.log1p(counts, dtype=np.float32),
        np.array((0, system_start, char_start, len(counts)), dtype=np.int64),
        _native_handcrafted(p, user_bytes, n_words, word_bytes),
    )


def _native_columns(p: Prompt) -> tuple[bytes, tuple]:
    """The user turn's bytes as hashed, and router/_ngrams.c's sparse_one of the prompt."""
    user_bytes = _encode(p.user, MAX_USER_BYTES)
    system_bytes = _encode(p.system, MAX_SYSTEM_BYTES) if p.system else b""
    return user_bytes, _native.sparse_one(user_bytes, system_bytes)


def _native_handcrafted(p: Prompt, user_bytes: bytes, n_words: int, word_bytes: int) -> np.ndarray:
    return np.frombuffer(_native.handcrafted(user_bytes, p.user_chars, p.system_chars, p.user_turns, p.assistant_turns,
                                             bool(p.system), len(p.user), p.user.rstrip().endswith("?"), n_words,
                                             word_bytes) + TERMS_FORMAT.pack(*task_term_counts(user_bytes)),
                         dtype=np.float32).reshape(1, N_HANDCRAFTED)


_SYSTEM_EDGES = np.array([SYSTEM_OFFSET, CHAR_OFFSET], dtype=np.uint16)


def _sparse_one_numpy(p: Prompt) -> SparseFeatures:
    """_sparse_one in numpy: the same arithmetic as the batch path with no row bookkeeping, in about
    half the numpy calls (their fixed cost dominates short prompts)."""
    user_bytes = _encode(p.user, MAX_USER_BYTES)
    raw = b"\0" + user_bytes.replace(b"\0", b" ") + b"\0"
    words, word_bytes = _words_one(raw)
    n = len(words)
    # One uint64 buffer for every user key: words, bigrams (n - 1), first word, then the char
    # n-grams; bucketed in one pass (WORD_BITS == CHAR_BITS) and cut to uint16 columns.
    size = len(raw)
    counts = [max(size - g + 1, 0) for g in CHAR_NGRAMS]
    n_word_keys = 2 * n if n else 0
    keys = np.empty(n_word_keys + sum(counts), dtype=np.uint64)
    if n:
        np.bitwise_xor(words, np.uint64(_SALT_USER_WORD), out=keys[:n])
        bigrams = keys[n : 2 * n - 1]
        np.multiply(words[:-1], np.uint64(_P), out=bigrams)
        bigrams += words[1:]
        bigrams ^= np.uint64(_SALT_USER_BIGRAM)
        keys[2 * n - 1] = words[0] ^ np.uint64(_SALT_FIRST_WORD)
    windows = np.ndarray(shape=(size,), dtype="<u8", buffer=raw + bytes(8), strides=(1,))
    at = n_word_keys
    for g, count in zip(CHAR_NGRAMS, counts):
        part = keys[at : at + count]
        np.bitwise_and(windows[:count], _LOW_BYTES[g], out=part)
        np.bitwise_or(part, _NGRAM_SALT[g], out=part)
        at += count
    cols = _bucket(keys, WORD_BITS).astype(np.uint16)
    cols[n_word_keys:] += np.uint16(CHAR_OFFSET)
    if p.system:
        sys_words, _ = _words_one(b"\0" + _encode(p.system, MAX_SYSTEM_BYTES).replace(b"\0", b" ") + b"\0")
        m = len(sys_words)
        if m:
            sys_keys = np.empty(2 * m - 1, dtype=np.uint64)
            np.bitwise_xor(sys_words, np.uint64(_SALT_SYSTEM_WORD), out=sys_keys[:m])
            sys_bigrams = sys_keys[m:]
            np.multiply(sys_words[:-1], np.uint64(_P), out=sys_bigrams)
            sys_bigrams += sys_words[1:]
            sys_bigrams ^= np.uint64(_SALT_USER_BIGRAM)
            sys_cols = _bucket(sys_keys, SYSTEM_BITS).astype(np.uint16)
            sys_cols += np.uint16(SYSTEM_OFFSET)
            cols = np.concatenate((cols, sys_cols))
    cols.sort(kind="stable")  # radix sort on 16 bits
    total = len(cols)
    if total:
        new = np.empty(total, dtype=bool)
        new[0] = True
        np.not_equal(cols[1:], cols[:-1], out=new[1:])
        starts = np.flatnonzero(new)
        tf = np.log1p(_run_lengths(starts, total))
        cols = cols[starts]
    else:
        tf = np.zeros(0, dtype=np.float32)
    edges = np.searchsorted(cols, _SYSTEM_EDGES).tolist()
    hand = handcrafted_numbers(p, user_bytes, float(n), float(word_bytes))
    return SparseFeatures(
        cols.astype(np.int64),
        tf,
        np.array((0, edges[0], edges[1], len(cols)), dtype=np.int64),
        np.array((hand,), dtype=np.float32),
    )


def _words_one(raw: bytes) -> tuple[np.ndarray, int]:
    """_word_hashes for one framed text: (word hashes, word bytes)."""
    buf = _FOLD[np.frombuffer(raw, dtype=np.uint8)]
    is_word = _WORD_BYTE[buf]
    starts = np.flatnonzero(is_word[1:] > is_word[:-1])
    if len(starts) == 0:
        return np.zeros(0, dtype=np.uint64), 0
    starts += 1
    pw, inv = _powers(len(buf))
    terms = np.multiply(buf * is_word, pw)  # non-word bytes are 0, so a segment sum covers one word
    words = np.add.reduceat(terms, starts)
    words *= inv[starts]
    return words, int(np.count_nonzero(is_word))


def _run_lengths(starts: np.ndarray, total: int) -> np.ndarray:
    """Lengths of the runs beginning at `starts` in a sorted array of `total` items, as float32
    (np.diff(..., append=) costs ~6 us of Python around it)."""
    ends = np.empty(len(starts), dtype=np.intp)
    ends[:-1] = starts[1:]
    ends[-1] = total
    ends -= starts
    return ends.astype(np.float32)


def _hand_matrix(hand: list[list[float]]) -> np.ndarray:
    return np.asarray(hand, dtype=np.float32).reshape(len(hand), N_HANDCRAFTED)


# ---------------------------------------------------------------------------------------------
# The ONNX model's inputs (router/train_onnx.py builds the graph), per session call of b prompts padded
# to L n-gram slots: "indices" (b, L) the columns each prompt has (padding: column 0), "weights"
# (b, 6, L) where row k < 3 holds block k's tf values at its n-grams (zero elsewhere and in the
# padding) and row 3 + k their squares, and "handcrafted" (b, N_HANDCRAFTED). The model multiplies each
# prompt's weights by its gathered weight rows: one small batched MatMul gives every block's head
# sums and squared norm.
ONNX_INPUTS = ("indices", "weights", "handcrafted")
MAX_SLOTS = 1 << 14  # b * L per session call (the weights input is 6x that, 384 KB); longer batches are cut


def onnx_feeds(sf: SparseFeatures) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """[(rows of the batch, feeds)] for the ONNX session: one call for one prompt; a batch is sorted
    by n-gram count and cut into calls of prompts of similar length, so padding stays small."""
    batch = len(sf.handcrafted)
    if batch == 1:
        return [(_ONE_ROW, _feeds_one(sf))]
    lengths = sf.bounds[3::3] - sf.bounds[:-1:3]
    order = np.argsort(lengths, kind="stable")
    block = np.repeat(np.arange(3 * batch) % 3, np.diff(sf.bounds))  # TF-IDF block of each n-gram
    out, start = [], 0
    while start < batch:
        end = start + 1
        while end < batch and (end + 1 - start) * max(int(lengths[order[end]]), 1) <= MAX_SLOTS:
            end += 1
        rows = order[start:end]
        out.append((rows, _feeds_rows(sf, rows, lengths[rows], block)))
        start = end
    return out


_ONE_ROW = np.zeros(1, dtype=np.intp)
# log1p of every uint16 count as float32, computed by numpy once: the C feeds read tf from it, so their
# numbers are the numpy path's to the bit (256 KB; only the first few entries are ever touched).
_LOG1P_TABLE = np.log1p(np.arange(1 << 16, dtype=np.uint16), dtype=np.float32).tobytes() if _native else b""


def onnx_feeds_one(p: Prompt) -> dict[str, np.ndarray]:
    """onnx_feeds(featurize_sparse([p])) for the request path: with the C extension, the ONNX inputs
    come out of two C calls and three np.frombuffer views, instead of a dozen numpy calls whose
    fixed cost and cache footprint are most of a short prompt's time."""
    if _native is None:
        return _feeds_one(_sparse_one_numpy(p))
    user_bytes, (cols, counts, system_start, char_start, n_words, word_bytes) = _native_columns(p)
    indices, weights = _native.feeds(cols, counts, system_start, char_start, _LOG1P_TABLE)
    n = len(indices) // 8
    return {
        "indices": np.frombuffer(indices, dtype=np.int64).reshape(1, n),
        "weights": np.frombuffer(weights, dtype=np.float32).reshape(1, 6, n),
        "handcrafted": _native_handcrafted(p, user_bytes, n_words, word_bytes),
    }


def _feeds_one(sf: SparseFeatures) -> dict[str, np.ndarray]:
    n = len(sf.indices)
    weights = np.zeros((1, 6, n), dtype=np.float32)
    b = sf.bounds.tolist()
    for k in range(3):
        weights[0, k, b[k] : b[k + 1]] = sf.tf[b[k] : b[k + 1]]
    np.multiply(weights[:, :3], weights[:, :3], out=weights[:, 3:])
    return {"indices": sf.indices.reshape(1, n), "weights": weights, "handcrafted": sf.handcrafted}


def _feeds_rows(sf: SparseFeatures, rows: np.ndarray, lengths: np.ndarray, blocks: np.ndarray) -> dict[str, np.ndarray]:
    b, width = len(rows), max(int(lengths.max()), 1)
    total = int(lengths.sum())
    indices = np.zeros((b, width), dtype=np.int64)
    weights = np.zeros((b, 6, width), dtype=np.float32)
    if total:
        first = sf.bounds[3 * rows]  # each row's first element in sf
        offset = np.cumsum(lengths) - lengths  # its first element in this call
        row = np.repeat(np.arange(b), lengths)
        pos = np.arange(total) - np.repeat(offset, lengths)  # slot within the row
        elem = pos + np.repeat(first, lengths)  # element of sf
        block = blocks[elem]
        tf = sf.tf[elem]
        indices[row, pos] = sf.indices[elem]
        weights[row, block, pos] = tf
        weights[row, block + 3, pos] = tf * tf
    return {"indices": indices, "weights": weights, "handcrafted": sf.handcrafted[rows]}


# ---------------------------------------------------------------------------------------------
# Dense features and `messages` in (tests, tools, training).
def featurize(prompts: Sequence[Prompt]) -> np.ndarray:
    """Dense feature matrix (len(prompts), N_FEATURES) float32 (tests, tools; the runtime and
    training use featurize_sparse). A row depends only on its own prompt."""
    sparse = featurize_sparse(prompts)
    out = np.zeros((len(prompts), N_FEATURES), dtype=np.float32)
    rows = np.repeat(np.arange(len(prompts)), np.diff(sparse.bounds[::3]))
    out[rows, sparse.indices] = sparse.tf
    out[:, N_HASHED:] = sparse.handcrafted
    return out


def featurize_messages(batch: Sequence[Any]) -> np.ndarray:
    """Dense features for a batch of `messages` lists (or strings). Never raises on malformed items."""
    return featurize([prompt_from_messages(m) for m in batch])


def featurize_messages_sparse(batch: Sequence[Any]) -> SparseFeatures:
    return featurize_sparse([prompt_from_messages(m) for m in batch])
