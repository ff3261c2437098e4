/* Hashed n-gram columns of one prompt, in C: the request path's share of router/features.py.
 *
 * features._sparse_one computes the same numbers with numpy; that version stays the reference (and
 * the fallback when this module is not built), and tests/test_classifier.py checks that both agree
 * column for column on every held-out prompt. Here one pass over the bytes replaces some thirty
 * numpy calls, whose fixed cost and cache footprint dominate a short prompt.
 *
 * sparse_one(user, system) -> (columns, counts, system_start, char_start, n_words, word_bytes)
 *   user, system   the lowercased UTF-8 bytes (already truncated by the caller), unframed
 *   columns        bytes: sorted distinct uint16 columns (user words, then system words, then user
 *                  char n-grams: the three TF-IDF blocks, in column order)
 *   counts         bytes: uint16 occurrences of each column
 *   system_start, char_start   where the system and char blocks begin in `columns`
 *   n_words, word_bytes        the user turn's word count and word bytes (handcrafted features)
 *
 * feeds(columns, counts, system_start, char_start, log1p_table) -> (indices, weights)
 *   sparse_one's output as the ONNX model's inputs for a batch of one (features.onnx_feeds):
 *   indices  bytes: the columns as int64
 *   weights  bytes: float32 (6, n): row k < 3 holds TF-IDF block k's tf at its columns and zeros
 *            elsewhere, row 3 + k the squares; tf = log1p_table[count], a float32 table numpy
 *            computed, so the numbers are numpy's to the bit
 *
 * handcrafted(user, user_chars, system_chars, user_turns, assistant_turns, has_system, user_len,
 *             ends_with_question, n_words, word_bytes) -> bytes
 *   the first N_HANDCRAFTED float32 numbers of handcrafted.handcrafted_numbers, in its order, from the
 *   same inputs (features.py appends the task-term counts, a set intersection that is no faster here)
 *   (user_len: the user turn's length in characters; ends_with_question: 0 or 1).
 *
 * Every constant below is the one of the same name in router/features.py or router/handcrafted.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define P 0x100000001B3ULL
#define MIX 0x9E3779B97F4A7C15ULL
#define SALT_USER_WORD 0x51ED270BULL
#define SALT_USER_BIGRAM 0xA24BAED4ULL
#define SALT_FIRST_WORD 0x3C6EF372ULL
#define SALT_SYSTEM_WORD 0x7F4A7C15ULL
#define WORD_BITS 14
#define SYSTEM_BITS 11
#define CHAR_BITS 14
#define SYSTEM_OFFSET (1u << WORD_BITS)
#define CHAR_OFFSET (SYSTEM_OFFSET + (1u << SYSTEM_BITS))

static inline uint16_t bucket(uint64_t h, int bits) {
    h ^= h >> 29;
    h *= MIX;
    return (uint16_t)(h >> (64 - bits));
}

/* Word bytes: ASCII letters, digits, underscore, every non-ASCII byte. */
static inline int is_word_byte(unsigned char c) {
    return c >= 128 || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

/* Digits fold to '0' before word hashing; NUL (the frame) is never part of a word. */
static inline uint64_t fold(unsigned char c) {
    return (c >= '1' && c <= '9') ? (uint64_t)'0' : (uint64_t)c;
}

/* Word hashes of `text` framed as features._words_one frames it (NUL bytes read as spaces): each
 * word's polynomial hash sum(b_j * P**j). Writes at most len / 2 + 1 hashes; returns how many. */
static Py_ssize_t word_hashes(const unsigned char *text, Py_ssize_t len, uint64_t *out, Py_ssize_t *word_bytes) {
    Py_ssize_t n = 0, bytes = 0, i = 0;
    while (i < len) {
        if (!is_word_byte(text[i])) {
            i++;
            continue;
        }
        uint64_t h = 0, power = 1;
        while (i < len && is_word_byte(text[i])) {
            h += fold(text[i]) * power;
            power *= P;
            i++;
            bytes++;
        }
        out[n++] = h;
    }
    *word_bytes = bytes;
    return n;
}

/* Stable LSD radix sort of uint16 keys, two byte passes; `tmp` has room for n keys. */
static void radix_sort16(uint16_t *keys, uint16_t *tmp, Py_ssize_t n) {
    Py_ssize_t count[256];
    for (int shift = 0; shift < 16; shift += 8) {
        memset(count, 0, sizeof(count));
        for (Py_ssize_t i = 0; i < n; i++) count[(keys[i] >> shift) & 0xFF]++;
        Py_ssize_t at = 0;
        for (int b = 0; b < 256; b++) {
            Py_ssize_t c = count[b];
            count[b] = at;
            at += c;
        }
        for (Py_ssize_t i = 0; i < n; i++) tmp[count[(keys[i] >> shift) & 0xFF]++] = keys[i];
        memcpy(keys, tmp, (size_t)n * sizeof(uint16_t));
    }
}

/* n-gram of `g` bytes at `s`, as features._char_ngrams reads it: little endian, salted with g. */
static inline uint64_t ngram(const unsigned char *s, int g) {
    uint64_t v = 0;
    for (int k = g - 1; k >= 0; k--) v = (v << 8) | s[k];
    return v | ((uint64_t)g << 56);
}

static PyObject *sparse_one(PyObject *self, PyObject *args) {
    Py_buffer user, system;
    if (!PyArg_ParseTuple(args, "y*y*", &user, &system)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t ulen = user.len, slen = system.len;
    /* framed copy of the user bytes: NUL + text (NULs as spaces) + NUL */
    Py_ssize_t size = ulen + 2;
    Py_ssize_t max_words = ulen / 2 + 1, max_sys_words = slen / 2 + 1;
    Py_ssize_t max_keys = 2 * max_words + 2 * max_sys_words + 2 * size;
    unsigned char *raw = PyMem_Malloc((size_t)size);
    uint64_t *words = PyMem_Malloc((size_t)(max_words + max_sys_words) * sizeof(uint64_t));
    uint16_t *cols = PyMem_Malloc((size_t)max_keys * sizeof(uint16_t) * 2);
    if (!raw || !words || !cols) {
        PyErr_NoMemory();
        goto done;
    }
    uint16_t *tmp = cols + max_keys;
    raw[0] = 0;
    raw[size - 1] = 0;
    const unsigned char *u = user.buf;
    for (Py_ssize_t i = 0; i < ulen; i++) raw[i + 1] = u[i] ? u[i] : ' ';

    Py_ssize_t word_bytes, sys_word_bytes, n = 0;
    Py_ssize_t n_words = word_hashes(raw, size, words, &word_bytes);
    for (Py_ssize_t i = 0; i < n_words; i++) cols[n++] = bucket(words[i] ^ SALT_USER_WORD, WORD_BITS);
    for (Py_ssize_t i = 0; i + 1 < n_words; i++)
        cols[n++] = bucket((words[i] * P + words[i + 1]) ^ SALT_USER_BIGRAM, WORD_BITS);
    if (n_words) cols[n++] = bucket(words[0] ^ SALT_FIRST_WORD, WORD_BITS);

    /* the system prompt: NULs read as spaces, which are not word bytes either, so no copy needed */
    uint64_t *sys_words = words + n_words;
    Py_ssize_t m = word_hashes(system.buf, slen, sys_words, &sys_word_bytes);
    for (Py_ssize_t i = 0; i < m; i++)
        cols[n++] = (uint16_t)(SYSTEM_OFFSET + bucket(sys_words[i] ^ SALT_SYSTEM_WORD, SYSTEM_BITS));
    for (Py_ssize_t i = 0; i + 1 < m; i++)
        cols[n++] = (uint16_t)(SYSTEM_OFFSET + bucket((sys_words[i] * P + sys_words[i + 1]) ^ SALT_USER_BIGRAM, SYSTEM_BITS));

    /* char 3- and 4-grams over the framed bytes, every window inside them */
    for (int g = 3; g <= 4; g++) {
        for (Py_ssize_t i = 0; i + g <= size; i++)
            cols[n++] = (uint16_t)(CHAR_OFFSET + bucket(ngram(raw + i, g), CHAR_BITS));
    }

    radix_sort16(cols, tmp, n);
    /* distinct columns and their counts, in place: cols[0..d) and tmp[0..d) */
    Py_ssize_t d = 0, system_start = 0, char_start = 0;
    for (Py_ssize_t i = 0; i < n;) {
        Py_ssize_t j = i + 1;
        while (j < n && cols[j] == cols[i]) j++;
        cols[d] = cols[i];
        tmp[d] = (uint16_t)(j - i < 65535 ? j - i : 65535);
        d++;
        i = j;
    }
    while (system_start < d && cols[system_start] < SYSTEM_OFFSET) system_start++;
    char_start = system_start;
    while (char_start < d && cols[char_start] < CHAR_OFFSET) char_start++;
    result = Py_BuildValue("(y#y#nnnn)", (const char *)cols, d * (Py_ssize_t)sizeof(uint16_t), (const char *)tmp,
                           d * (Py_ssize_t)sizeof(uint16_t), system_start, char_start, n_words, word_bytes);
done:
    PyMem_Free(raw);
    PyMem_Free(words);
    PyMem_Free(cols);
    PyBuffer_Release(&user);
    PyBuffer_Release(&system);
    return result;
}

/* How often `pat` occurs in `s`, not overlapping (bytes.count). */
static Py_ssize_t count_of(const unsigned char *s, Py_ssize_t len, const char *pat) {
    Py_ssize_t m = (Py_ssize_t)strlen(pat), n = 0;
    for (Py_ssize_t i = 0; i + m <= len;) {
        if (s[i] == (unsigned char)pat[0] && memcmp(s + i, pat, (size_t)m) == 0) {
            n++;
            i += m;
        } else {
            i++;
        }
    }
    return n;
}

/* End of the option line starting at the newline s[i] ("\n(a) ", "\na. ", "\na) "), or 0:
 * handcrafted._OPTION_LINE, rb"\n\(?[a-j][.)] ". */
static Py_ssize_t option_line_end(const unsigned char *s, Py_ssize_t len, Py_ssize_t i) {
    Py_ssize_t j = i + 1;
    if (j < len && s[j] == '(') j++;
    if (j + 2 < len && s[j] >= 'a' && s[j] <= 'j' && (s[j + 1] == '.' || s[j + 1] == ')') && s[j + 2] == ' ')
        return j + 3;
    return 0;
}

#define N_HANDCRAFTED 24  /* handcrafted.HANDCRAFTED up to the task-term counts */
static const char *CODE_WORDS[] = {"def ", "return", "import ", "class ", "function", "print(", "#include", "const "};

static PyObject *handcrafted(PyObject *self, PyObject *args) {
    Py_buffer user;
    Py_ssize_t user_chars, system_chars, user_turns, assistant_turns, user_len, n_words, word_bytes;
    int has_system, ends_q;
    if (!PyArg_ParseTuple(args, "y*nnnnpnpnn", &user, &user_chars, &system_chars, &user_turns, &assistant_turns,
                          &has_system, &user_len, &ends_q, &n_words, &word_bytes))
        return NULL;
    const unsigned char *s = user.buf;
    Py_ssize_t size = user.len, n = size > 1 ? size : 1;
    Py_ssize_t digits = 0, backslashes = 0, dollars = 0, braces = 0, operators = 0, questions = 0, newlines = 0;
    Py_ssize_t first_option = -1, first_option_end = 0, options = 0, stem_digits = 0;
    for (Py_ssize_t i = 0; i < size; i++) {
        unsigned char c = s[i];
        if (c >= '0' && c <= '9') digits++;
        else if (c == '\\') backslashes++;
        else if (c == '$') dollars++;
        else if (c == '{' || c == '}' || c == ';') braces++;
        else if (c == '=' || c == '+' || c == '^' || c == '*' || c == '<' || c == '>') operators++;
        else if (c == '?') questions++;
        else if (c == '\n') {
            newlines++;
            if (first_option < 0 || i >= first_option_end) {
                Py_ssize_t end = option_line_end(s, size, i);
                if (end && first_option < 0) {
                    first_option = i, first_option_end = end, stem_digits = digits;
                    options = 1;
                } else if (end) {
                    options++;
                }
            }
        }
    }
    Py_ssize_t code_words = 0;
    for (size_t w = 0; w < sizeof(CODE_WORDS) / sizeof(CODE_WORDS[0]); w++) code_words += count_of(s, size, CODE_WORDS[w]);
    double f[N_HANDCRAFTED] = {
        log1p((double)user_chars) / 8.0,
        log1p((double)system_chars) / 8.0,
        log1p((double)user_turns),
        log1p((double)assistant_turns),
        has_system ? 1.0 : 0.0,
        (double)digits / (double)n,
        (double)(size - user_len > 0 ? size - user_len : 0) / (double)n,
        log1p((double)backslashes),
        log1p((double)dollars),
        log1p((double)count_of(s, size, "```")),
        log1p((double)code_words),
        log1p((double)braces),
        log1p((double)(count_of(s, size, "\n    ") + count_of(s, size, "\n\t"))),
        log1p((double)operators),
        log1p((double)questions),
        ends_q ? 1.0 : 0.0,
        log1p((double)newlines),
        log1p((double)n_words) / 4.0,
        n_words ? fmin((double)word_bytes / (double)n_words, 20.0) / 10.0 : 0.0,
    };
    if (first_option < 0) {
        f[19] = log1p((double)size) / 8.0, f[20] = 0.0, f[21] = 0.0, f[22] = log1p((double)digits), f[23] = 0.0;
    } else {
        f[19] = log1p((double)first_option) / 8.0;
        f[20] = log1p((double)options);
        f[21] = log1p((double)(size - first_option) / (double)options) / 5.0;
        f[22] = log1p((double)stem_digits);
        f[23] = log1p((double)(digits - stem_digits));
    }
    float out[N_HANDCRAFTED];
    for (int k = 0; k < N_HANDCRAFTED; k++) out[k] = (float)f[k];
    PyBuffer_Release(&user);
    return PyBytes_FromStringAndSize((const char *)out, sizeof(out));
}

static PyObject *feeds(PyObject *self, PyObject *args) {
    Py_buffer cols, counts, table;
    Py_ssize_t system_start, char_start;
    if (!PyArg_ParseTuple(args, "y*y*nny*", &cols, &counts, &system_start, &char_start, &table)) return NULL;
    PyObject *result = NULL, *indices = NULL, *weights = NULL;
    Py_ssize_t n = cols.len / (Py_ssize_t)sizeof(uint16_t), table_len = table.len / (Py_ssize_t)sizeof(float);
    if (counts.len != cols.len || table_len < 65536) {
        PyErr_SetString(PyExc_ValueError, "feeds: counts must match columns, and the table must cover every uint16");
        goto done;
    }
    indices = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(int64_t));
    weights = PyBytes_FromStringAndSize(NULL, 6 * n * (Py_ssize_t)sizeof(float));
    if (!indices || !weights) goto done;
    int64_t *ix = (int64_t *)PyBytes_AS_STRING(indices);
    float *w = (float *)PyBytes_AS_STRING(weights);
    memset(w, 0, (size_t)(6 * n) * sizeof(float));
    const uint16_t *c = cols.buf, *k = counts.buf;
    const float *log1p_of = table.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t block = i < system_start ? 0 : i < char_start ? 1 : 2;
        float tf = log1p_of[k[i]];
        ix[i] = c[i];
        w[block * n + i] = tf;
        w[(3 + block) * n + i] = tf * tf;
    }
    result = Py_BuildValue("(OO)", indices, weights);
done:
    Py_XDECREF(indices);
    Py_XDECREF(weights);
    PyBuffer_Release(&cols);
    PyBuffer_Release(&counts);
    PyBuffer_Release(&table);
    return result;
}

static PyMethodDef methods[] = {
    {"sparse_one", sparse_one, METH_VARARGS, "Hashed n-gram columns and counts of one prompt (see the module source)."},
    {"feeds", feeds, METH_VARARGS, "sparse_one's output as the ONNX inputs of a batch of one (see the module source)."},
    {"handcrafted", handcrafted, METH_VARARGS, "handcrafted.handcrafted_numbers's numbers as float32 bytes (see the module source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ngrams", "router/features.py's n-gram hashing, in C.", -1, methods};

PyMODINIT_FUNC PyInit__ngrams(void) { return PyModule_Create(&module); }
