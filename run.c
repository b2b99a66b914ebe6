/* run.c: inference of LLaMA-family models with a Coupled-Quantization KV cache.

   One file, read top to bottom:
     1. configuration and checkpoint loading (llama2.c legacy files and our "CQKV" files)
     2. tokenizer (llama2.c's tokenizer.bin)
     3. sampler (greedy, temperature, top-p, xorshift* RNG)
     4. math helpers (RMSNorm, softmax, matmul, RoPE table)
     5. the KV cache: types, storage and attention through the cache
     6. the forward pass, one token at a time
     7. generation, chat, perplexity, benchmark
     8. command line
   The cache stores keys BEFORE RoPE and each cache type decides how to apply RoPE when it
   stores (fp32) or reads (CQ) them: this is what lets CQ quantize pre-RoPE keys as the paper does.

   Build: make (OpenMP, -Ofast -march=native); make run-noomp (no OpenMP).  */

#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* ------------------------------------------------------------------------------------------
   Errors: every bad input ends here with one line on stderr and exit code 1.  */

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

/* -Ofast lets the compiler assume no NaN or infinity exists, so isfinite() may be folded to 1:
   inputs are checked on the bits instead. */
static int is_finite_float(float x) {
    uint32_t bits;
    memcpy(&bits, &x, 4);
    return (bits & 0x7f800000u) != 0x7f800000u;
}

static void *xmalloc(size_t n) {
    void *p = calloc(1, n ? n : 1);
    if (!p) die("out of memory (asked for %zu bytes)", n);
    return p;
}

/* Big buffers that every token reads (the weights, the cache rows, CQ's codebooks) ask the
   kernel for 2 MB pages (transparent huge pages; a hint, ignored where they are off): with 4 KB
   pages the streams miss the TLB every 4 KB.  SmolLM2-shaped model, fp32, 16K positions,
   1 thread, side by side: the time outside the cache fell from 27-28 to 18-19 ms a token with
   the weights on 2 MB pages, and the whole token from 101-115 to 88-91 ms with the cache rows on
   them too.  cq1's codebooks (read at random by the key kernel), same model and context, 3 runs
   each: 34.2-35.4 against 36.8-38.9 ms a token in the cache.
   Zeroed like xmalloc.  Under AddressSanitizer they come from xmalloc, which it checks. */
#define HUGE_PAGE ((size_t)2 << 20)
#ifdef __SANITIZE_ADDRESS__
#define HUGE_MIN SIZE_MAX   // every buffer from xmalloc
#else
#define HUGE_MIN HUGE_PAGE  // smaller buffers from xmalloc
#endif

static size_t huge_size(size_t n) { return (n + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE; }

static void *huge_alloc(size_t n) {
    if (n < HUGE_MIN) return xmalloc(n);
    size_t size = huge_size(n);  // map one page more than needed and trim it to a 2 MB boundary
    char *base = mmap(NULL, size + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) die("out of memory (asked for %zu bytes)", n);
    char *p = base + (HUGE_PAGE - (uintptr_t)base % HUGE_PAGE) % HUGE_PAGE;
    if (p > base) munmap(base, p - base);
    munmap(p + size, base + HUGE_PAGE - p);
    madvise(p, size, MADV_HUGEPAGE);
    return p;
}

static void huge_free(void *p, size_t n) {  // n: the size given to huge_alloc
    if (n < HUGE_MIN) free(p);
    else if (p) munmap(p, huge_size(n));
}

static long time_in_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static double cpu_seconds(void) {  // CPU time of the whole process, all threads
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static double now_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* ==========================================================================================
   1. Configuration and checkpoint loading
   ========================================================================================== */

typedef struct {
    int dim;         // D: residual stream width
    int hidden_dim;  // F: FFN inner width
    int n_layers;    // L
    int n_heads;     // H: query heads
    int n_kv_heads;  // KVH: key/value heads (GQA when < H)
    int vocab_size;  // V
    int seq_len;     // maximum context
    int head_size;   // hs (dim / n_heads unless the checkpoint says otherwise)
    float rope_theta;
    float norm_eps;
    int bos_id, eos_id;
    int shared_classifier;
    int tokenizer_kind;  // 0: llama2.c sentencepiece-style BPE by scores
    int chat_template;   // 0: Llama-2 [INST], 1: ChatML
} Config;

typedef struct {        // all float32, row-major (out, in); see SPEC in README.md
    float *token_embedding;  // (V, D)
    float *attn_norm;        // (L, D)
    float *wq;               // (L, H*hs, D)
    float *wk;               // (L, KVH*hs, D)
    float *wv;               // (L, KVH*hs, D)
    float *wo;               // (L, D, H*hs)
    float *ffn_norm;         // (L, D)
    float *w1;               // (L, F, D)
    float *w2;               // (L, D, F)
    float *w3;               // (L, F, D)
    float *final_norm;       // (D)
    float *classifier;       // (V, D)
} Weights;

typedef struct {
    Config cfg;
    Weights w;
    void *file;        // the whole checkpoint, read into memory (huge_alloc)
    size_t file_size;
} Model;

#define CQKV_MAGIC 0x564B5143u  // "CQKV"
#define MAX_HEAD_SIZE 1024
#define CQKV_HEADER_BYTES 256
#define LEGACY_HEADER_BYTES 28

static int kv_dim_of(const Config *c) { return c->n_kv_heads * c->head_size; }
static int q_dim_of(const Config *c) { return c->n_heads * c->head_size; }

// Number of floats the weights take (excluding llama2.c's two obsolete RoPE tables).
static uint64_t weight_floats(const Config *c) {
    uint64_t D = c->dim, F = c->hidden_dim, L = c->n_layers, V = c->vocab_size;
    uint64_t QD = q_dim_of(c), KD = kv_dim_of(c);
    uint64_t n = V * D + L * D + L * QD * D + 2 * L * KD * D + L * D * QD + L * D + 3 * L * F * D + D;
    if (!c->shared_classifier) n += V * D;
    return n;
}

static void check_config(const Config *c, const char *path) {
    if (c->dim <= 0 || c->hidden_dim <= 0 || c->n_layers <= 0 || c->n_heads <= 0 ||
        c->n_kv_heads <= 0 || c->vocab_size <= 0 || c->seq_len <= 0 || c->head_size <= 0)
        die("%s: header has a zero or negative size (dim %d hidden %d layers %d heads %d kv_heads %d "
            "vocab %d seq_len %d head_size %d)", path, c->dim, c->hidden_dim, c->n_layers, c->n_heads,
            c->n_kv_heads, c->vocab_size, c->seq_len, c->head_size);
    if (c->dim > (1 << 16) || c->hidden_dim > (1 << 18) || c->n_layers > 1024 || c->n_heads > 1024 ||
        c->vocab_size > (1 << 22) || c->seq_len > (1 << 22) || c->head_size > MAX_HEAD_SIZE)
        die("%s: header values are implausibly large; is this a checkpoint?", path);
    if (c->n_heads % c->n_kv_heads != 0)
        die("%s: n_heads (%d) is not a multiple of n_kv_heads (%d)", path, c->n_heads, c->n_kv_heads);
    if (c->head_size % 2 != 0) die("%s: head_size %d is odd; RoPE needs pairs", path, c->head_size);
    if (!is_finite_float(c->rope_theta) || !is_finite_float(c->norm_eps) || !(c->rope_theta > 0) || !(c->norm_eps > 0))
        die("%s: rope_theta and norm_eps must be positive", path);
    if (c->bos_id < 0 || c->bos_id >= c->vocab_size || c->eos_id < 0 || c->eos_id >= c->vocab_size)
        die("%s: bos/eos ids (%d, %d) are outside the vocabulary", path, c->bos_id, c->eos_id);
    if (c->tokenizer_kind != 0 && c->tokenizer_kind != 1)
        die("%s: unknown tokenizer kind %d", path, c->tokenizer_kind);
    if (c->chat_template != 0 && c->chat_template != 1)
        die("%s: unknown chat template %d", path, c->chat_template);
}

static void load_model(Model *m, const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("cannot open checkpoint %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) die("%s is not a regular file", path);
    size_t size = (size_t)st.st_size;
    if (size < LEGACY_HEADER_BYTES) die("%s: too short to be a checkpoint (%zu bytes)", path, size);
    void *data = huge_alloc(size);  // read, not mmap'd: the page cache would give 4 KB pages
    for (size_t done = 0; done < size;) {
        ssize_t got = read(fd, (char *)data + done, size - done);
        if (got <= 0) die("cannot read %s: %s", path, got < 0 ? strerror(errno) : "file shrank while reading");
        done += (size_t)got;
    }
    close(fd);
    m->file = data;  // from here on, a header error's exit leaves no leak behind
    m->file_size = size;

    Config *c = &m->cfg;
    memset(c, 0, sizeof *c);
    const int32_t *h = (const int32_t *)data;
    size_t header_bytes;
    uint64_t extra_floats = 0;  // legacy files carry two unused RoPE tables before the classifier
    if ((uint32_t)h[0] == CQKV_MAGIC) {
        if (size < CQKV_HEADER_BYTES) die("%s: truncated header", path);
        if (h[1] != 1) die("%s: CQKV version %d is not supported (this program reads version 1)", path, h[1]);
        c->dim = h[2]; c->hidden_dim = h[3]; c->n_layers = h[4]; c->n_heads = h[5];
        c->n_kv_heads = h[6]; c->vocab_size = h[7]; c->seq_len = h[8]; c->head_size = h[9];
        memcpy(&c->rope_theta, &h[10], 4);
        memcpy(&c->norm_eps, &h[11], 4);
        c->bos_id = h[12]; c->eos_id = h[13]; c->shared_classifier = h[14];
        c->tokenizer_kind = h[15]; c->chat_template = h[16];
        if (c->shared_classifier != 0 && c->shared_classifier != 1)
            die("%s: shared_classifier must be 0 or 1, not %d", path, c->shared_classifier);
        header_bytes = CQKV_HEADER_BYTES;
    } else if ((uint32_t)h[0] == 0x616b3432u) {
        die("%s: llama2.c 'version 1/2' exports are not read; export the legacy format "
            "(llama2.c export.py --version 0) or convert with export.py", path);
    } else {
        c->dim = h[0]; c->hidden_dim = h[1]; c->n_layers = h[2]; c->n_heads = h[3];
        c->n_kv_heads = h[4]; c->vocab_size = h[5]; c->seq_len = h[6];
        c->shared_classifier = c->vocab_size > 0;
        if (c->vocab_size < 0 && c->vocab_size != INT_MIN) c->vocab_size = -c->vocab_size;
        c->head_size = c->n_heads > 0 && c->dim % c->n_heads == 0 ? c->dim / c->n_heads : 0;
        if (c->n_heads > 0 && c->dim > 0 && c->dim % c->n_heads != 0)
            die("%s: dim %d is not a multiple of n_heads %d (or this is not a checkpoint)", path,
                c->dim, c->n_heads);
        c->rope_theta = 10000.0f; c->norm_eps = 1e-5f;
        c->bos_id = 1; c->eos_id = 2;
        header_bytes = LEGACY_HEADER_BYTES;
        if (c->seq_len > 0 && c->head_size > 0) extra_floats = (uint64_t)c->seq_len * c->head_size;
    }
    check_config(c, path);

    // Validate the size before touching any weight.
    uint64_t floats = weight_floats(c) + extra_floats;
    uint64_t want = header_bytes + 4 * floats;
    if (size < want)
        die("%s: truncated: %zu bytes, but the header (dim %d, %d layers, vocab %d) needs %llu", path,
            size, c->dim, c->n_layers, c->vocab_size, (unsigned long long)want);
    if (size > want)
        die("%s: %zu bytes, but the header (dim %d, %d layers, vocab %d) needs exactly %llu: wrong format?",
            path, size, c->dim, c->n_layers, c->vocab_size, (unsigned long long)want);

    float *p = (float *)((char *)data + header_bytes);
    uint64_t D = c->dim, F = c->hidden_dim, L = c->n_layers, V = c->vocab_size;
    uint64_t QD = q_dim_of(c), KD = kv_dim_of(c);
    Weights *w = &m->w;
    w->token_embedding = p; p += V * D;
    w->attn_norm = p;       p += L * D;
    w->wq = p;              p += L * QD * D;
    w->wk = p;              p += L * KD * D;
    w->wv = p;              p += L * KD * D;
    w->wo = p;              p += L * D * QD;
    w->ffn_norm = p;        p += L * D;
    w->w1 = p;              p += L * F * D;
    w->w2 = p;              p += L * D * F;
    w->w3 = p;              p += L * F * D;
    w->final_norm = p;      p += D;
    p += extra_floats;
    w->classifier = c->shared_classifier ? w->token_embedding : p;
}

static void free_model(Model *m) { huge_free(m->file, m->file_size); }

/* ==========================================================================================
   2. Tokenizer: llama2.c's tokenizer.bin (sentencepiece-style BPE merged by piece score) and
      GPT-2-style byte-level BPE (merged by rank), in one file format
   ========================================================================================== */

/* File: uint32 max_token_length, then per id: float score, int32 length, the piece's bytes.
   Byte-level BPE files (tokenizer kind 1 in the checkpoint header) append, after the pieces:
     uint32 "BPE1", int32 pretokenizer (0: GPT-2 regex, 1: every number code point split off
     first, as SmolLM does), int32 n, n x (int32 left, int32 right) merges in rank order,
     int32 n, n x int32 special-token ids (matched verbatim in the text), int32 n,
     n x (uint32 first, uint32 last, int32 class) Unicode ranges: letters, numbers, white space.
   The Unicode table comes from export.py so that this file needs no Unicode database.  */

#define BPE_MAGIC 0x31455042u  // "BPE1"
enum { CLASS_OTHER = 0, CLASS_LETTER = 1, CLASS_NUMBER = 2, CLASS_SPACE = 3 };

typedef struct {
    const char *str;
    int len;
    int id;
} TokenIndex;

typedef struct {
    uint64_t pair;         // left << 32 | right; 0 marks an empty slot (no pair (0, 0) is stored)
    int rank, id;
} MergeRule;

typedef struct {
    uint32_t first, last;
    int32_t cls;
} CodeRange;

typedef struct {
    int kind;              // 0: sentencepiece-style, 1: byte-level BPE
    char **vocab;          // piece bytes per id (NUL-terminated for convenience)
    int *vocab_len;        // piece length in bytes (a byte-level piece may be the byte 0)
    float *scores;         // merge priority per id (kind 0)
    int vocab_size;
    unsigned max_token_length;
    TokenIndex *sorted;    // pieces sorted by bytes, for lookups
    int byte_piece[256];   // kind 0: id of "<0xHH>"; kind 1: id of the one-byte piece; or -1
    // kind 1 only
    int pretokenizer;
    MergeRule *merges;     // open-addressing hash table of merge_slots entries (a power of two)
    int merge_slots;
    int *specials, n_specials;  // longest first
    CodeRange *ranges;
    int n_ranges;
    unsigned char ascii_class[128];
} Tokenizer;

static int compare_bytes(const char *a, int la, const char *b, int lb) {
    int c = memcmp(a, b, la < lb ? la : lb);
    return c ? c : (la > lb) - (la < lb);
}

static int compare_tokens(const void *a, const void *b) {
    const TokenIndex *x = a, *y = b;
    return compare_bytes(x->str, x->len, y->str, y->len);
}

// Id of the piece with exactly these bytes, or -1.
static int lookup_piece(const Tokenizer *t, const char *s, int len) {
    TokenIndex key = {s, len, 0};
    TokenIndex *hit = bsearch(&key, t->sorted, t->vocab_size, sizeof(TokenIndex), compare_tokens);
    return hit ? hit->id : -1;
}

static uint64_t pair_key(int left, int right) { return (uint64_t)(uint32_t)left << 32 | (uint32_t)right; }

static MergeRule *merge_slot(const Tokenizer *t, uint64_t pair) {
    size_t i = (size_t)((pair * 0x9E3779B97F4A7C15ull) >> 20) & (t->merge_slots - 1);
    while (t->merges[i].pair && t->merges[i].pair != pair) i = (i + 1) & (t->merge_slots - 1);
    return &t->merges[i];
}

static void read_exact(void *dst, size_t size, size_t n, FILE *f, const char *path, const char *what) {
    if (fread(dst, size, n, f) != n) die("%s: truncated tokenizer (in the %s)", path, what);
}

// A count of `what`, each item_bytes long: checked against the bytes left before anything is allocated.
static int read_count(FILE *f, long size, const char *path, const char *what, int max, int item_bytes) {
    int32_t n;
    read_exact(&n, 4, 1, f, path, what);
    if (n < 0 || n > max) die("%s: corrupt tokenizer: %d %s", path, n, what);
    long left = size - ftell(f);
    if ((long)n * item_bytes > left)
        die("%s: truncated tokenizer: %d %s need %ld bytes, %ld are left", path, n, what, (long)n * item_bytes, left);
    return n;
}

/* Only for error messages: the number of whole pieces (float score, int32 length, bytes) from
   byte `from` of f up to the end of the file (stop 0) or up to a uint32 `stop` where a piece
   would begin; -1 when the bytes are not whole pieces. */
static long count_pieces(FILE *f, long from, unsigned max_len, uint32_t stop) {
    if (fseek(f, 0, SEEK_END) != 0) return -1;
    long size = ftell(f), pos = from, n = 0;
    if (fseek(f, from, SEEK_SET) != 0) return -1;
    while (pos < size) {
        uint32_t head[2];
        if (size - pos < 4 || fread(head, 4, 1, f) != 1) return -1;
        if (stop && head[0] == stop) return n;
        if (size - pos < 8 || fread(&head[1], 4, 1, f) != 1 || head[1] > max_len) return -1;
        pos += 8 + (long)head[1];
        if (pos > size || fseek(f, pos, SEEK_SET) != 0) return -1;
        n++;
    }
    return stop ? -1 : n;
}

static void load_bpe_tables(Tokenizer *t, FILE *f, long size, const char *path) {
    uint32_t magic;
    read_exact(&magic, 4, 1, f, path, "byte-level BPE header");
    if (magic != BPE_MAGIC) {
        long more = count_pieces(f, ftell(f) - 4, t->max_token_length, BPE_MAGIC);
        if (more > 0)
            die("%s has %ld pieces, but the checkpoint's vocabulary has %d: the tokenizer belongs to "
                "another model (name the right one with -z)", path, t->vocab_size + more, t->vocab_size);
        die("%s has no byte-level BPE tables, but the checkpoint expects a byte-level BPE tokenizer "
            "(make one with export.py tokenizer)", path);
    }
    int32_t pre;
    read_exact(&pre, 4, 1, f, path, "pre-tokenizer");
    if (pre != 0 && pre != 1) die("%s: unknown pre-tokenizer %d", path, pre);
    t->pretokenizer = pre;
    int n_merges = read_count(f, size, path, "merges", 1 << 24, 8);
    t->merge_slots = 64;
    while (t->merge_slots < 2 * n_merges) t->merge_slots *= 2;
    t->merges = xmalloc(t->merge_slots * sizeof(MergeRule));
    // buf lives only in this frame: it is freed before any error so that LeakSanitizer stays quiet
    char *buf = xmalloc(2 * (size_t)t->max_token_length + 1);
    for (int r = 0; r < n_merges; r++) {
        int32_t lr[2];
        if (fread(lr, 4, 2, f) != 2) { free(buf); die("%s: truncated tokenizer (in the merges)", path); }
        if (lr[0] < 0 || lr[0] >= t->vocab_size || lr[1] < 0 || lr[1] >= t->vocab_size || (lr[0] == 0 && lr[1] == 0)) {
            free(buf);
            die("%s: merge %d names tokens outside the vocabulary", path, r);
        }
        int la = t->vocab_len[lr[0]], lb = t->vocab_len[lr[1]];
        memcpy(buf, t->vocab[lr[0]], la);
        memcpy(buf + la, t->vocab[lr[1]], lb);
        int id = lookup_piece(t, buf, la + lb);
        if (id < 0) {
            free(buf);
            die("%s: merge %d (%d, %d) makes a piece that is not in the vocabulary", path, r, lr[0], lr[1]);
        }
        MergeRule *slot = merge_slot(t, pair_key(lr[0], lr[1]));
        if (!slot->pair) *slot = (MergeRule){pair_key(lr[0], lr[1]), r, id};  // a repeated pair keeps its first rank
    }
    free(buf);
    t->n_specials = read_count(f, size, path, "special tokens", t->vocab_size, 4);
    t->specials = xmalloc(t->n_specials * sizeof(int));
    read_exact(t->specials, 4, t->n_specials, f, path, "special tokens");
    for (int i = 0; i < t->n_specials; i++) {
        if (t->specials[i] < 0 || t->specials[i] >= t->vocab_size || t->vocab_len[t->specials[i]] == 0)
            die("%s: special token %d is not a piece of the vocabulary", path, t->specials[i]);
        for (int j = i; j > 0 && t->vocab_len[t->specials[j]] > t->vocab_len[t->specials[j - 1]]; j--) {
            int tmp = t->specials[j]; t->specials[j] = t->specials[j - 1]; t->specials[j - 1] = tmp;
        }
    }
    t->n_ranges = read_count(f, size, path, "Unicode ranges", 1 << 22, (int)sizeof(CodeRange));
    t->ranges = xmalloc(t->n_ranges * sizeof(CodeRange));
    read_exact(t->ranges, sizeof(CodeRange), t->n_ranges, f, path, "Unicode ranges");
    for (int i = 0; i < t->n_ranges; i++)
        if (t->ranges[i].first > t->ranges[i].last || (i && t->ranges[i].first <= t->ranges[i - 1].last) ||
            t->ranges[i].cls < CLASS_OTHER || t->ranges[i].cls > CLASS_SPACE)
            die("%s: corrupt Unicode table", path);
}

static int code_class(const Tokenizer *t, uint32_t cp);

/* The file has no count of its pieces: the checkpoint's vocab_size says how many to read, and
   the file must end where they (and, byte-level, the BPE tables) end; a tokenizer of another
   model is refused with the two sizes.  */
static void load_tokenizer(Tokenizer *t, const char *path, int vocab_size, int kind) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open tokenizer %s: %s (use -z to name one)", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) die("tokenizer %s is not a regular file", path);
    long size = (long)st.st_size;
    t->kind = kind;
    t->vocab_size = vocab_size;
    t->vocab = xmalloc(vocab_size * sizeof(char *));
    t->vocab_len = xmalloc(vocab_size * sizeof(int));
    t->scores = xmalloc(vocab_size * sizeof(float));
    read_exact(&t->max_token_length, 4, 1, f, path, "header");
    if (t->max_token_length == 0 || t->max_token_length > 4096)
        die("%s: max_token_length %u is implausible; is this a tokenizer.bin?", path, t->max_token_length);
    long pos = 4;
    int tables_at = -1;  // byte-level: the first piece whose score reads as "BPE1" (tables too early?)
    for (int i = 0; i < vocab_size; i++) {
        int32_t len = 0;
        if (pos == size)
            die("%s has %d pieces, but the checkpoint's vocabulary has %d: the tokenizer belongs to another "
                "model (name the right one with -z)", path, i, vocab_size);
        if (fread(&t->scores[i], 4, 1, f) != 1 || fread(&len, 4, 1, f) != 1 || len < 0 ||
            (unsigned)len > t->max_token_length || size - pos - 8 < len) {
            if (tables_at >= 0)
                die("%s has %d pieces before its byte-level BPE tables, but the checkpoint's vocabulary has %d: "
                    "the tokenizer belongs to another model (name the right one with -z)", path, tables_at, vocab_size);
            if (size - pos < 8 || (len >= 0 && (unsigned)len <= t->max_token_length))
                die("%s: truncated at token %d of %d (does the tokenizer belong to this model?)", path, i, vocab_size);
            die("%s: token %d has length %d (max %u): corrupt tokenizer", path, i, len, t->max_token_length);
        }
        uint32_t score_bits;
        memcpy(&score_bits, &t->scores[i], 4);
        if (kind == 1 && tables_at < 0 && score_bits == BPE_MAGIC) tables_at = i;
        t->vocab[i] = xmalloc(len + 1);
        if (len > 0 && fread(t->vocab[i], len, 1, f) != 1) die("%s: read error at token %d", path, i);
        t->vocab[i][len] = '\0';
        t->vocab_len[i] = len;
        pos += 8 + len;
    }
    t->sorted = xmalloc(vocab_size * sizeof(TokenIndex));
    for (int i = 0; i < vocab_size; i++) t->sorted[i] = (TokenIndex){t->vocab[i], t->vocab_len[i], i};
    qsort(t->sorted, vocab_size, sizeof(TokenIndex), compare_tokens);
    for (int b = 0; b < 256; b++) {
        char name[8] = {(char)b};
        if (kind == 0) snprintf(name, sizeof name, "<0x%02X>", b);
        t->byte_piece[b] = lookup_piece(t, name, kind == 0 ? 6 : 1);
    }
    if (kind == 1) {
        load_bpe_tables(t, f, size, path);
        for (int c = 0; c < 128; c++) t->ascii_class[c] = (unsigned char)code_class(t, c);
        long end = ftell(f);
        if (end != size)
            die("%s: %ld bytes follow the byte-level BPE tables: corrupt tokenizer", path, size - end);
    } else if (pos != size) {
        long more = count_pieces(f, pos, t->max_token_length, 0);
        if (more > 0)
            die("%s has %ld pieces, but the checkpoint's vocabulary has %d: the tokenizer belongs to another "
                "model (name the right one with -z)", path, vocab_size + more, vocab_size);
        die("%s: %ld bytes follow the %d pieces of the checkpoint's vocabulary: another model's tokenizer, "
            "or a corrupt one", path, size - pos, vocab_size);
    }
    fclose(f);
}

static void free_tokenizer(Tokenizer *t) {
    if (!t->vocab) return;
    for (int i = 0; i < t->vocab_size; i++) free(t->vocab[i]);
    free(t->vocab); free(t->vocab_len); free(t->scores); free(t->sorted);
    free(t->merges); free(t->specials); free(t->ranges);
}

/* BPE merging.  llama2.c rescans the whole sequence for the best pair after every merge, O(n^2):
   fine for a prompt, hopeless for a perplexity file of a million characters.  We produce the
   same result with a heap of candidate pairs ordered by (priority descending, position
   ascending) over a doubly linked list of symbols; a candidate whose symbols changed since it
   was pushed is skipped when popped.  Leftmost-wins ties match because merging never reorders
   symbols.  The priority is the merged piece's score (kind 0) or minus the merge's rank (kind 1). */

typedef struct { float score; int left; int right_version; int left_version; int id; } MergeCand;

typedef struct { MergeCand *a; int n, cap; } MergeHeap;

static int cand_before(const MergeCand *x, const MergeCand *y) {
    if (x->score != y->score) return x->score > y->score;
    return x->left < y->left;
}

static void heap_push(MergeHeap *h, MergeCand c) {
    if (h->n == h->cap) {
        h->cap = h->cap ? 2 * h->cap : 64;
        h->a = realloc(h->a, h->cap * sizeof(MergeCand));
        if (!h->a) die("out of memory in the tokenizer");
    }
    int i = h->n++;
    while (i > 0) {
        int parent = (i - 1) / 2;
        if (!cand_before(&c, &h->a[parent])) break;
        h->a[i] = h->a[parent];
        i = parent;
    }
    h->a[i] = c;
}

static MergeCand heap_pop(MergeHeap *h) {
    MergeCand top = h->a[0], last = h->a[--h->n];
    int i = 0;
    for (;;) {
        int child = 2 * i + 1;
        if (child >= h->n) break;
        if (child + 1 < h->n && cand_before(&h->a[child + 1], &h->a[child])) child++;
        if (!cand_before(&h->a[child], &last)) break;
        h->a[i] = h->a[child];
        i = child;
    }
    if (h->n > 0) h->a[i] = last;
    return top;
}

typedef struct {
    int *id, *prev, *next, *version;  // per symbol; a merged-away symbol has id -1
} Symbols;

// Pushes the pair (left, next[left]) when it can merge.
static void push_pair(const Tokenizer *t, MergeHeap *heap, const Symbols *s, int left, char *buf) {
    int right = s->next[left];
    if (right < 0) return;
    int a = s->id[left], b = s->id[right], id;
    float priority;
    if (t->kind == 1) {  // byte-level BPE: only the listed merges, by rank
        MergeRule *rule = merge_slot(t, pair_key(a, b));
        if (!rule->pair) return;
        id = rule->id;
        priority = -(float)rule->rank;
    } else {             // sentencepiece-style: any pair whose concatenation is a piece, by its score
        int la = t->vocab_len[a], lb = t->vocab_len[b];
        if ((unsigned)(la + lb) > t->max_token_length) return;  // cannot be a piece
        memcpy(buf, t->vocab[a], la);
        memcpy(buf + la, t->vocab[b], lb);
        id = lookup_piece(t, buf, la + lb);
        if (id < 0) return;
        priority = t->scores[id];
    }
    heap_push(heap, (MergeCand){priority, left, s->version[right], s->version[left], id});
}

// Merges the symbol ids in place (count of them), returns the new count.
static int bpe_merge(const Tokenizer *t, int *ids, int count) {
    if (count < 2) return count;
    Symbols s;
    int *mem = xmalloc(3 * (size_t)count * sizeof(int));
    s.id = ids; s.prev = mem; s.next = mem + count; s.version = mem + 2 * count;
    for (int i = 0; i < count; i++) {
        s.prev[i] = i - 1;
        s.next[i] = i + 1 < count ? i + 1 : -1;
        s.version[i] = 0;
    }
    char *buf = xmalloc(2 * (size_t)t->max_token_length + 1);
    MergeHeap heap = {0};
    for (int i = 0; i + 1 < count; i++) push_pair(t, &heap, &s, i, buf);
    while (heap.n > 0) {
        MergeCand c = heap_pop(&heap);
        int left = c.left, right = s.next[left];
        if (s.id[left] < 0 || right < 0 || s.version[left] != c.left_version ||
            s.version[right] != c.right_version)
            continue;  // stale: one of the two symbols changed after this candidate was pushed
        s.id[left] = c.id;
        s.version[left]++;
        s.id[right] = -1;
        s.next[left] = s.next[right];
        if (s.next[right] >= 0) s.prev[s.next[right]] = left;
        if (s.prev[left] >= 0) push_pair(t, &heap, &s, s.prev[left], buf);
        push_pair(t, &heap, &s, left, buf);
    }
    int n = 0;
    for (int i = 0; i >= 0; i = s.next[i]) ids[n++] = s.id[i];
    free(heap.a);
    free(buf);
    free(mem);
    return n;
}

/* A character (code point) that is not a piece: its bytes' "<0xHH>" pieces, as sentencepiece's
   byte fallback does (llama2.c's files have them at id byte + 3).  A vocabulary without them (a
   small one) gives one <unk>, id 0, per such character, as sentencepiece without byte fallback
   does: every id stays inside the vocabulary.  Returns the number of ids written. */
#define UNK_ID 0
static int unknown_char(const Tokenizer *t, const char *s, size_t len, int *tokens) {
    for (size_t j = 0; j < len; j++)
        if (t->byte_piece[(unsigned char)s[j]] < 0) { tokens[0] = UNK_ID; return 1; }
    for (size_t j = 0; j < len; j++) tokens[j] = t->byte_piece[(unsigned char)s[j]];
    return (int)len;
}

// Sentencepiece-style: the ids of text (no BOS); tokens needs room for strlen(text) + 1 ids.
static int encode_sentencepiece(const Tokenizer *t, const char *text, size_t len, int *tokens) {
    int n = 0;
    if (len > 0) {  // sentencepiece's "dummy prefix": the text is encoded as if it began with a space
        int space = lookup_piece(t, " ", 1);
        if (space >= 0) tokens[n++] = space;
        else n += unknown_char(t, " ", 1, tokens + n);
    }
    // One symbol per UTF-8 code point if the vocabulary has it, otherwise one per byte.
    for (size_t i = 0; i < len;) {
        size_t cp_len = 1;
        while (i + cp_len < len && cp_len < 4 && ((unsigned char)text[i + cp_len] & 0xC0) == 0x80) cp_len++;
        int id = lookup_piece(t, text + i, (int)cp_len);
        if (id >= 0) tokens[n++] = id;
        else n += unknown_char(t, text + i, cp_len, tokens + n);
        i += cp_len;
    }
    return bpe_merge(t, tokens, n);
}

/* Byte-level BPE.  The text is cut into "pre-tokens" by GPT-2's pattern
     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
   (after splitting off every number code point when pretokenizer is 1), written out below as a
   scanner over code-point classes; each pre-token's bytes are then merged by rank. */

static int code_class(const Tokenizer *t, uint32_t cp) {
    if (cp < 128 && t->ascii_class[cp]) return t->ascii_class[cp];
    int lo = 0, hi = t->n_ranges - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (cp < t->ranges[mid].first) hi = mid - 1;
        else if (cp > t->ranges[mid].last) lo = mid + 1;
        else return t->ranges[mid].cls;
    }
    return CLASS_OTHER;
}

// Decodes the UTF-8 code point at s (n bytes left) into *cp; returns its length (1 for a bad byte).
static int utf8_next(const unsigned char *s, size_t n, uint32_t *cp) {
    int len = s[0] < 0x80 ? 1 : (s[0] >> 5) == 6 ? 2 : (s[0] >> 4) == 14 ? 3 : (s[0] >> 3) == 30 ? 4 : 0;
    if (len == 0 || (size_t)len > n) { *cp = 0xFFFD; return 1; }
    uint32_t v = len == 1 ? s[0] : s[0] & (0x7F >> len);
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) { *cp = 0xFFFD; return 1; }
        v = v << 6 | (s[i] & 0x3F);
    }
    *cp = v;
    return len;
}

// End (code-point index) of the pre-token starting at i in cp[0..n) with classes cls.
static int pretoken_end(const uint32_t *cp, const unsigned char *cls, int i, int n) {
    if (cp[i] == '\'' && i + 1 < n) {  // contractions
        uint32_t a = cp[i + 1], b = i + 2 < n ? cp[i + 2] : 0;
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
    }
    // " ?" before a letter, number or other run.  A table may class U+0020 as something other
    // than white space; before white space it then starts a run of its own class from i (the
    // regex's backtracking), which also keeps every pre-token at least one code point long.
    int j = cp[i] == ' ' && i + 1 < n && cls[i + 1] != CLASS_SPACE ? i + 1 : i;
    if (cls[j] != CLASS_SPACE) {
        int k = j;
        while (k < n && cls[k] == cls[j]) k++;
        return k;
    }
    int k = i;  // white space: \s+(?!\S) leaves the last one to the next pre-token, else \s+
    while (k < n && cls[k] == CLASS_SPACE) k++;
    return k < n && k - i >= 2 ? k - 1 : k;
}

// Byte-level BPE of text without special tokens; appends to tokens.
static void encode_plain_bytes(const Tokenizer *t, const char *text, size_t len, int *tokens, int *n) {
    if (len == 0) return;
    uint32_t *cp = xmalloc((len + 1) * sizeof(uint32_t));
    int *start = xmalloc((len + 1) * sizeof(int));
    unsigned char *cls = xmalloc(len + 1);
    int count = 0;
    for (size_t i = 0; i < len; count++) {
        start[count] = (int)i;
        i += utf8_next((const unsigned char *)text + i, len - i, &cp[count]);
        cls[count] = (unsigned char)code_class(t, cp[count]);
    }
    start[count] = (int)len;
    for (int piece = 0; piece < count;) {
        int piece_end = piece;  // with pretokenizer 1 every number is a piece of its own
        if (t->pretokenizer == 1 && cls[piece] == CLASS_NUMBER) piece_end = piece + 1;
        else while (piece_end < count && !(t->pretokenizer == 1 && cls[piece_end] == CLASS_NUMBER)) piece_end++;
        for (int i = piece; i < piece_end;) {
            int end = pretoken_end(cp + piece, cls + piece, i - piece, piece_end - piece) + piece;
            if (end <= i) die("internal error: the pre-tokenizer did not advance at code point %d", i);
            int first = *n;
            for (int b = start[i]; b < start[end]; b++) {  // a byte the vocabulary lacks is dropped, as HF's BPE does
                int id = t->byte_piece[(unsigned char)text[b]];
                if (id >= 0) tokens[(*n)++] = id;
            }
            *n = first + bpe_merge(t, tokens + first, *n - first);
            i = end;
        }
        piece = piece_end;
    }
    free(cp); free(start); free(cls);
}

// Byte-level BPE: special tokens are matched verbatim first, the text between them is encoded.
static int encode_bytes(const Tokenizer *t, const char *text, size_t len, int *tokens) {
    int n = 0;
    size_t plain = 0;
    for (size_t i = 0; i < len;) {
        int special = -1;
        for (int s = 0; s < t->n_specials && special < 0; s++) {
            int id = t->specials[s], sl = t->vocab_len[id];
            if ((size_t)sl <= len - i && memcmp(text + i, t->vocab[id], sl) == 0) special = id;
        }
        if (special < 0) { i++; continue; }
        encode_plain_bytes(t, text + plain, i - plain, tokens, &n);
        tokens[n++] = special;
        i += t->vocab_len[special];
        plain = i;
    }
    encode_plain_bytes(t, text + plain, len - plain, tokens, &n);
    return n;
}

// text -> ids.  tokens needs room for strlen(text) + 3 ids.
static void encode(const Tokenizer *t, const char *text, int bos_id, int add_bos, int *tokens, int *n_tokens) {
    int n = 0;
    if (add_bos) tokens[n++] = bos_id;
    size_t len = strlen(text);
    n += t->kind == 1 ? encode_bytes(t, text, len, tokens + n) : encode_sentencepiece(t, text, len, tokens + n);
    *n_tokens = n;
}

/* Prints `token` following `prev_token`.  Sentencepiece-style, as llama2.c: no leading space
   right after BOS, "<0xHH>" prints its byte, and lone control bytes print nothing.
   Byte-level: the piece's bytes as they are (a UTF-8 character may span tokens). */
static void print_piece(const Tokenizer *t, int bos_id, int prev_token, int token) {
    const char *piece = t->vocab[token];
    if (t->kind == 1) {
        fwrite(piece, 1, t->vocab_len[token], stdout);
        return;
    }
    if (prev_token == bos_id && piece[0] == ' ') piece++;
    unsigned int byte;
    char byte_buf[2] = {0};
    if (strlen(piece) == 6 && sscanf(piece, "<0x%02X>", &byte) == 1) {
        byte_buf[0] = (char)byte;
        piece = byte_buf;
    }
    if (!piece[0]) return;
    if (piece[1] == '\0') {
        unsigned char b = (unsigned char)piece[0];
        if (!(isprint(b) || isspace(b))) return;
    }
    fputs(piece, stdout);
}

/* ==========================================================================================
   3. Sampler
   ========================================================================================== */

typedef struct {
    float prob;
    int index;
} ProbIndex;

typedef struct {
    int vocab_size;
    ProbIndex *candidates;  // top-p scratch
    float temperature;
    float topp;
    uint64_t rng_state;
} Sampler;

static uint32_t random_u32(uint64_t *state) {  // xorshift*
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}

static float random_f32(uint64_t *state) { return (random_u32(state) >> 8) / 16777216.0f; }

static int argmax(const float *p, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (p[i] > p[best]) best = i;
    return best;
}

static void softmax(float *x, int n) {
    float max = x[0];
    for (int i = 1; i < n; i++)
        if (x[i] > max) max = x[i];
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - max);
        sum += x[i];
    }
    for (int i = 0; i < n; i++) x[i] /= sum;
}

static int sample_multinomial(const float *probs, int n, float coin) {
    float cdf = 0.0f;
    for (int i = 0; i < n; i++) {
        cdf += probs[i];
        if (coin < cdf) return i;
    }
    return n - 1;  // rounding
}

// Descending probability; equal ones by ascending id, so the order is the same with any qsort
// (glibc's merge sort gave llama2.c that order; a quicksort would not).
static int compare_prob_desc(const void *a, const void *b) {
    const ProbIndex *x = a, *y = b;
    if (x->prob != y->prob) return x->prob > y->prob ? -1 : 1;
    return (x->index > y->index) - (x->index < y->index);
}

// Nucleus sampling: sample among the most likely tokens whose mass first exceeds topp.
static int sample_topp(const float *probs, int n, float topp, ProbIndex *cand, float coin) {
    /* llama2.c's shortcut: when some token reaches cutoff, the tokens below it hold less than
       (n - 1) * cutoff = 1 - topp and cannot be in the nucleus, so they are not sorted.  When
       none reaches it (a nearly uniform distribution, a small topp) every token is a candidate. */
    const float cutoff = (1.0f - topp) / (n - 1);  // n >= 2 (sample() answers n = 1 itself)
    int n_cand = 0;
    for (int i = 0; i < n; i++)
        if (probs[i] >= cutoff) cand[n_cand++] = (ProbIndex){probs[i], i};
    if (n_cand == 0)
        for (int i = 0; i < n; i++) cand[n_cand++] = (ProbIndex){probs[i], i};
    qsort(cand, n_cand, sizeof(ProbIndex), compare_prob_desc);
    float mass = 0.0f;
    int last = n_cand - 1;
    for (int i = 0; i < n_cand; i++) {
        mass += cand[i].prob;
        if (mass > topp) { last = i; break; }
    }
    float r = coin * mass, cdf = 0.0f;
    for (int i = 0; i <= last; i++) {
        cdf += cand[i].prob;
        if (r < cdf) return cand[i].index;
    }
    return cand[last].index;
}

/* softmax(logits / temperature) in place.  llama2.c divides first and then takes the softmax:
   kept (the samples match llama2.c's bit for bit) whenever no quotient can overflow.  A
   temperature so small that one would (-t 5e-38 makes logit / t infinite) takes the order that
   cannot overflow: (logit - max) / temperature <= 0, in double. */
static void softmax_temperature(float *x, int n, float temperature) {
    float max = x[0], min = x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] > max) max = x[i];
        if (x[i] < min) min = x[i];
    }
    if (fmax(fabs(max), fabs(min)) / temperature < FLT_MAX / 4) {  // quotients and their differences stay finite
        for (int i = 0; i < n; i++) x[i] /= temperature;
        softmax(x, n);
        return;
    }
    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        double z = ((double)x[i] - max) / temperature;
        x[i] = z < -200 ? 0.0f : (float)exp(z);  // exp(-200) is below float's smallest number
        sum += x[i];
    }
    for (int i = 0; i < n; i++) x[i] = (float)(x[i] / sum);  // sum >= 1: the max gives exp(0)
}

/* NaN or infinity in the logits comes from the weights (NaN, infinity, or values so large that
   the products overflow); no sample, argmax or perplexity of them would mean anything. */
static void check_logits(const float *logits, int n) {
    for (int i = 0; i < n; i++)
        if (!is_finite_float(logits[i]))
            die("the model computed a non-finite logit (token %d): the checkpoint (or, with -k cq*, the "
                "centroid file) holds NaN, infinity or values too large for float32", i);
}

static int sample(Sampler *s, float *logits) {
    check_logits(logits, s->vocab_size);
    if (s->vocab_size == 1) return 0;
    if (s->temperature == 0.0f) return argmax(logits, s->vocab_size);
    softmax_temperature(logits, s->vocab_size, s->temperature);
    float coin = random_f32(&s->rng_state);
    if (s->topp <= 0 || s->topp >= 1) return sample_multinomial(logits, s->vocab_size, coin);
    return sample_topp(logits, s->vocab_size, s->topp, s->candidates, coin);
}

/* ==========================================================================================
   4. Math helpers
   ========================================================================================== */

static void rmsnorm(float *out, const float *x, const float *weight, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    ss = 1.0f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) out[i] = weight[i] * (ss * x[i]);
}

/* out (d) = W (d, n) @ x (n), for one or several products that share x (q, k, v; w1, w3).
   The OpenMP fork/join costs a few microseconds, more than a small product takes (stories260K's
   largest is 512 x 64), so only large products are split across threads; products that share x
   are split in one parallel region (each thread takes its share of every product's rows), which
   saves two fork/joins per layer and lets k and v (192 x 576 on SmolLM2, too small alone) be
   split too (SmolLM2 shape, fp32, 1K, 2 threads, 3 runs each: 20.7-21.4 against 22.4-22.8 ms a
   token). */
#define PARALLEL_MIN_MACS (1 << 17)

typedef struct {
    float *out;       // (d)
    const float *w;   // (d, n)
    int d;
} Product;

static float dot(const float *a, const float *b, int n) {
    float v = 0.0f;
    for (int j = 0; j < n; j++) v += a[j] * b[j];
    return v;
}

static void matmuls(const float *x, int n, const Product *products, int count) {
    long macs = 0;
    for (int k = 0; k < count; k++) macs += (long)n * products[k].d;
#ifdef _OPENMP
#pragma omp parallel if (macs >= PARALLEL_MIN_MACS && omp_get_max_threads() > 1)
#else
    (void)macs;
#endif
    for (int k = 0; k < count; k++) {
        const Product *p = &products[k];
#ifdef _OPENMP
#pragma omp for schedule(static) nowait
#endif
        for (int i = 0; i < p->d; i++) p->out[i] = dot(p->w + (size_t)i * n, x, n);
    }
}

static void matmul(float *out, const float *x, const float *w, int n, int d) {
    Product p = {out, w, d};
    matmuls(x, n, &p, 1);
}

static int max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* RoPE.  Pair i of a head (channels 2i, 2i+1) at position t is rotated by the angle
   t * theta^(-2i/hs).  The cos/sin of every (position, pair) are computed once, with the same
   float expressions llama2.c uses so that outputs match it bit for bit: cos_sin (seq_len, hs).

   CQ rotates every cached key when it reads it, and a (seq_len, hs) table is as large as one
   layer's fp32 keys: streaming it from memory for every layer would cost CQ what it saves.  So
   CQ builds the rotation of position t = 64a + b from two small tables that stay in cache,
   e^{i w t} = e^{i w 64a} * e^{i w b} (one complex multiply; within a few float ulps of the
   direct cos/sin).  They use the layout cos2 = (cos, cos), sin2 = (-sin, sin) per pair, which
   turns a rotation into the element-wise x * cos2 + swap_pairs(x) * sin2.
   ROPE_FINE: the CQ key kernel turns the queries by the coarse angle once per ROPE_FINE
   positions, so larger is fewer query turns but a larger fine table (64 x 64 x 2 floats = 32 KB
   at head size 64).  SmolLM2 shape, cq1, 16K, 1 thread, 4 runs each: 39.1 ms a token in the
   cache (median) with 32, 37.4 with 64, 37.4 with 128, 37.3 with 256. */
#define ROPE_FINE 64

static int padded_head_size(int hs) { return (hs + 7) / 8 * 8; }  // whole 8-float vectors (section 5)

typedef struct {
    float *cos_sin;               // (seq_len, hs): (cos, sin) per pair, exact
    float *coarse_cos2, *coarse_sin2;  // (seq_len / ROPE_FINE + 1, width): positions 0, 64, 128, ...
    float *fine_cos2, *fine_sin2;      // (ROPE_FINE, width): positions 0 .. 63
    int half;                     // hs / 2
    int width;                    // hs rounded up to 8; the CQ tables' lanes past hs are zero
} RopeTable;

static void rope_angle(const Config *c, int t, int i, float *cs, float *sn) {
    float freq = 1.0f / powf(c->rope_theta, (2 * i) / (float)c->head_size);
    float angle = t * freq;
    *cs = cosf(angle);
    *sn = sinf(angle);
}

static void rope_init(RopeTable *r, const Config *c) {
    int hs = c->head_size, n_coarse = c->seq_len / ROPE_FINE + 1;
    int w = padded_head_size(hs);
    r->half = hs / 2;
    r->width = w;  // (xmalloc zeroes, so the padding lanes are 0)
    r->cos_sin = xmalloc((size_t)c->seq_len * hs * sizeof(float));
    r->coarse_cos2 = xmalloc((size_t)n_coarse * w * sizeof(float));
    r->coarse_sin2 = xmalloc((size_t)n_coarse * w * sizeof(float));
    r->fine_cos2 = xmalloc((size_t)ROPE_FINE * w * sizeof(float));
    r->fine_sin2 = xmalloc((size_t)ROPE_FINE * w * sizeof(float));
    for (int t = 0; t < c->seq_len; t++)
        for (int i = 0; i < r->half; i++)
            rope_angle(c, t, i, &r->cos_sin[(size_t)t * hs + 2 * i], &r->cos_sin[(size_t)t * hs + 2 * i + 1]);
    for (int i = 0; i < r->half; i++) {
        float cs, sn;
        for (int a = 0; a < n_coarse; a++) {
            rope_angle(c, a * ROPE_FINE, i, &cs, &sn);
            float *c2 = r->coarse_cos2 + (size_t)a * w + 2 * i, *s2 = r->coarse_sin2 + (size_t)a * w + 2 * i;
            c2[0] = c2[1] = cs; s2[0] = -sn; s2[1] = sn;
        }
        for (int b = 0; b < ROPE_FINE; b++) {
            rope_angle(c, b, i, &cs, &sn);
            float *c2 = r->fine_cos2 + (size_t)b * w + 2 * i, *s2 = r->fine_sin2 + (size_t)b * w + 2 * i;
            c2[0] = c2[1] = cs; s2[0] = -sn; s2[1] = sn;
        }
    }
}

static void rope_free(RopeTable *r) {
    free(r->cos_sin); free(r->coarse_cos2); free(r->coarse_sin2); free(r->fine_cos2); free(r->fine_sin2);
}

// Rotates n_heads heads of size 2*half in place to position t (exact table).
static void rope_rotate(const RopeTable *r, float *x, int n_heads, int t) {
    const float *cs = r->cos_sin + (size_t)t * r->half * 2;
    for (int h = 0; h < n_heads; h++) {
        float *v = x + (size_t)h * r->half * 2;
        for (int i = 0; i < r->half; i++) {
            float c = cs[2 * i], s = cs[2 * i + 1], a = v[2 * i], b = v[2 * i + 1];
            v[2 * i] = a * c - b * s;
            v[2 * i + 1] = a * s + b * c;
        }
    }
}

/* ==========================================================================================
   5. The KV cache
   ========================================================================================== */

/* The rest of the program sees the cache through four calls:
     kv_cache_init  - storage for every layer and position, of the chosen types
     kv_append      - store the key (BEFORE RoPE) and value of the token at `pos`, one layer
     kv_attend      - attention of all query heads against positions 0..pos of one layer
     kv_cache_free
   Keys and values each live in a KVStore of their own type, so keys can be kept at more bits
   than values (-k cq2:cq1).  Every type but CQ stores keys AFTER RoPE, as llama2.c and
   llama.cpp do; CQ stores them before RoPE, as the paper does, and rotates when it reads.

   Types and bits per channel (bits of a stored token / channels):
     fp32 32    fp16 16
     q8  8.5    int8 per channel, fp16 scale per block of 32 channels (symmetric)
     q4  5      4-bit, fp16 scale and minimum per block of 32 channels (asymmetric)
     q2  3      2-bit, same scheme
     q1  2      1-bit, same scheme: each channel is its block's minimum or maximum
     kivi4 5, kivi2 3: keys per channel over blocks of 32 tokens (4 or 2 bits, fp16 scale and
                minimum per channel and block; the newest tokens of an unfinished block stay
                fp32 until it fills), values per token as q4 / q2
     cq<c>c<b>b  b/c: one b-bit code per group of c channels (cq4 = 2c8b, cq2 = 4c8b, cq1 = 8c8b)
   With -w N the newest N tokens are also kept in fp32 and read from there. */

typedef _Float16 half;  // IEEE binary16: gcc 12+, and clang 15+ on x86-64 (clang 14 has it on arm64 only)

typedef enum { KV_FP32, KV_FP16, KV_Q8, KV_Q4, KV_Q2, KV_Q1, KV_KIVI4, KV_KIVI2, KV_CQ } KVKind;

typedef struct {
    KVKind kind;
    int c, b;        // CQ only: channels per group, bits per code
    char name[24];   // as printed
} KVType;

#define QBLOCK 32    // channels per block (q types), tokens per block (KIVI keys)

typedef struct {
    KVType type;
    int is_key;
    int n_layers, n_kv_heads, head_size, kv_dim, seq_len;
    size_t row_bytes;      // bytes of one (layer, position) row
    uint8_t *rows;         // (L, seq_len, row_bytes): every type except KIVI keys
    // KIVI keys: blocks of QBLOCK tokens quantized per channel
    size_t kivi_block_bytes;
    uint8_t *kivi_blocks;  // (L, seq_len / QBLOCK, kv_dim, kivi_block_bytes)
    float *kivi_recent;    // (L, QBLOCK, kv_dim) keys of the unfinished block, after RoPE
    // CQ: codebooks learned offline by export.py
    int n_groups;          // G = kv_dim / c
    int n_centroids;       // K = 2^b
    float *codebook;       // (L, G, K, c); keys before RoPE
    float *centroid_sqnorm;// (L, G, K): ||C||^2, for the nearest-centroid search
    // -w: the newest tokens in full precision
    int window;
    float *window_rows;    // (L, window, kv_dim), position t at slot t % window; keys after RoPE
} KVStore;

typedef enum { CQ_KEYS_AUTO, CQ_KEYS_LUT, CQ_KEYS_DECODE } CQKeyPath;

/* The scores of one chunk of positions live in a small per-thread matrix, att (H, ATTN_CHUNK):
   position t in column t % ATTN_CHUNK.  kv_attend never lets a chunk straddle a multiple of
   ATTN_CHUNK, so a chunk's columns are contiguous.  (An (H, seq_len) matrix put the H scores of
   one position 64 KB apart at 16K, all in one L1 set, and the value sums, which read them
   position by position, missed L1 for each: fp32 attention at 16K took ~97 ms a token, now ~75.) */
#define ATTN_CHUNK 256

/* The running maximum of the online softmax moves only when a chunk's maximum exceeds it by more
   than MAX_LAG: weights up to e^16 (times 16K positions, 1.5e11) are far from float overflow, the
   result is the same up to rounding, and the sums are rescaled about once per head instead of
   every time the maximum creeps up. */
#define MAX_LAG 16.0f

static inline float *att_at(float *att, int h, int t) { return att + (size_t)h * ATTN_CHUNK + t % ATTN_CHUNK; }

/* Per-thread scratch (scores, accumulators, rotated queries) sits in one buffer per kind, one
   slot per thread.  A slot is rounded up to 128 bytes and 128 more are left free after it, so
   that no two threads write to one cache line, nor to one pair of lines, which the prefetcher
   fetches together.  Slots that shared their edge lines cost cq1 about 1 ms a token in the cache
   with 2 threads (SmolLM2 shape, 16K positions: 15.9 -> 14.8, side by side). */
static size_t thread_slot(size_t floats) { return (floats + 31) / 32 * 32 + 32; }
static float *alloc_thread_slots(int n_threads, size_t floats) { return xmalloc(n_threads * thread_slot(floats) * sizeof(float)); }
// Thread tid's slot of a buffer from alloc_thread_slots(.., floats).
static float *thread_slot_of(float *buf, size_t floats, int tid) { return buf + (size_t)tid * thread_slot(floats); }

typedef struct {
    KVStore k, v;
    const RopeTable *rope;
    int n_heads;
    CQKeyPath key_path;
    int n_threads;
    float *att;            // per thread: (H, ATTN_CHUNK) the current chunk's scores (att_at)
    float *lut;            // CQ keys, LUT path: (KVH, hs/c, K, R, c) query-centroid products (cq_build_key_lut_c)
    float *qpad;           // CQ keys, decode path: (H, hs rounded up to 8) the query, scaled, zero-padded
    float *qrot;           // per thread: qpad turned back by a coarse RoPE angle (cq_decode_scores_shape)
    float *acc;            // per thread: running maxima (H), sums (H), partial outputs (H, hs); acc_floats()
    float *kbuf;           // per thread: one decoded row (kv_dim)
    double seconds;        // time spent in kv_append + kv_attend (bench reports it)
} KVCache;

static size_t acc_floats(const KVCache *kv) { return 2 * (size_t)kv->n_heads + (size_t)kv->n_heads * kv->k.head_size; }

static int is_quantized(const KVType *t) { return t->kind != KV_FP32; }

static int parse_kv_type(const char *s, KVType *out) {
    static const struct { const char *name; KVKind kind; int c, b; } named[] = {
        {"fp32", KV_FP32, 0, 0}, {"fp16", KV_FP16, 0, 0}, {"q8", KV_Q8, 0, 0}, {"q4", KV_Q4, 0, 0},
        {"q2", KV_Q2, 0, 0}, {"q1", KV_Q1, 0, 0}, {"kivi4", KV_KIVI4, 0, 0}, {"kivi2", KV_KIVI2, 0, 0},
        {"cq4", KV_CQ, 2, 8}, {"cq2", KV_CQ, 4, 8}, {"cq1", KV_CQ, 8, 8}};
    memset(out, 0, sizeof *out);
    for (size_t i = 0; i < sizeof named / sizeof *named; i++)
        if (!strcmp(s, named[i].name)) {
            out->kind = named[i].kind; out->c = named[i].c; out->b = named[i].b;
            snprintf(out->name, sizeof out->name, "%s", s);
            return 1;
        }
    int c, b, used = 0;
    if (sscanf(s, "cq%dc%db%n", &c, &b, &used) == 2 && used == (int)strlen(s)) {
        if (c < 1 || (c & (c - 1))) die("-k %s: c must be a power of two", s);
        if (b < 1 || b > 16) die("-k %s: b must be in [1, 16]", s);
        out->kind = KV_CQ; out->c = c; out->b = b;
        snprintf(out->name, sizeof out->name, "%s", s);
        return 1;
    }
    return 0;
}

static double kv_type_bits(const KVType *t) {
    switch (t->kind) {
    case KV_FP32: return 32;
    case KV_FP16: return 16;
    case KV_Q8: return 8 + 16.0 / QBLOCK;
    case KV_Q4: case KV_KIVI4: return 4 + 32.0 / QBLOCK;
    case KV_Q2: case KV_KIVI2: return 2 + 32.0 / QBLOCK;
    case KV_Q1: return 1 + 32.0 / QBLOCK;
    case KV_CQ: return (double)t->b / t->c;
    }
    return 0;
}

static int scalar_bits(KVKind k) {
    return k == KV_Q4 || k == KV_KIVI4 ? 4 : k == KV_Q2 || k == KV_KIVI2 ? 2 : k == KV_Q1 ? 1 : 8;
}

/* ---- scalar blocks: the building block of q8/q4/q2/q1 rows and of KIVI's per-channel keys.
   An asymmetric block of n <= 32 values: half scale, half min, then n codes of `bits` bits
   packed from the low bits up; x ~= min + code * scale.  q8 is symmetric: half scale, n int8. */

static size_t block_bytes(int bits) { return bits == 8 ? 2 + QBLOCK : 4 + QBLOCK * bits / 8; }

static void quantize_block(const float *x, int n, int stride, int bits, uint8_t *dst) {
    if (bits == 8) {
        float amax = 0.0f;
        for (int i = 0; i < n; i++) amax = fmaxf(amax, fabsf(x[i * stride]));
        half scale = (half)(amax / 127.0f);
        float inv = (float)scale > 0 ? 1.0f / (float)scale : 0.0f;
        memcpy(dst, &scale, 2);
        for (int i = 0; i < n; i++) {
            float r = roundf(x[i * stride] * inv);
            ((int8_t *)dst)[2 + i] = (int8_t)fmaxf(-127.0f, fminf(127.0f, r));
        }
        return;
    }
    float lo = x[0], hi = x[0];
    for (int i = 1; i < n; i++) { lo = fminf(lo, x[i * stride]); hi = fmaxf(hi, x[i * stride]); }
    int levels = (1 << bits) - 1;
    half scale = (half)((hi - lo) / levels), min = (half)lo;
    float inv = (float)scale > 0 ? 1.0f / (float)scale : 0.0f;
    memcpy(dst, &scale, 2);
    memcpy(dst + 2, &min, 2);
    uint8_t *codes = dst + 4;
    memset(codes, 0, QBLOCK * bits / 8);
    for (int i = 0; i < n; i++) {
        float r = roundf((x[i * stride] - (float)min) * inv);
        int q = (int)fmaxf(0.0f, fminf((float)levels, r));
        codes[i * bits / 8] |= (uint8_t)(q << (i * bits % 8));
    }
}

static void dequantize_block(const uint8_t *src, int n, int bits, float *out) {
    half scale;
    memcpy(&scale, src, 2);
    float s = scale;
    if (bits == 8) {
        for (int i = 0; i < n; i++) out[i] = s * ((const int8_t *)src)[2 + i];
        return;
    }
    half min;
    memcpy(&min, src + 2, 2);
    float m = min;
    const uint8_t *codes = src + 4;
    int mask = (1 << bits) - 1;
    for (int i = 0; i < n; i++) out[i] = m + s * ((codes[i * bits / 8] >> (i * bits % 8)) & mask);
}

static float block_value(const uint8_t *src, int i, int bits) {  // one value of an asymmetric block
    half scale, min;
    memcpy(&scale, src, 2);
    memcpy(&min, src + 2, 2);
    int q = (src[4 + i * bits / 8] >> (i * bits % 8)) & ((1 << bits) - 1);
    return (float)min + (float)scale * q;
}

/* ---- 8-float vectors, for the CQ encoder and the attention kernels below.  GCC's and clang's
   vector extension: + and * work lane by lane and an f32x8 lives in one AVX register (two NEON
   registers on arm64).  Plain loops left the compiler one horizontal sum per dot product, which
   cost more than the multiplications themselves; with vectors, 8 dot products share one
   transposed sum (lane_sums8). */
#define CQ_INLINE static inline __attribute__((always_inline))
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef float f32x2 __attribute__((vector_size(8)));

static inline f32x8 load8(const float *p) { f32x8 v; memcpy(&v, p, sizeof v); return v; }
static inline f32x8 swap_pairs(f32x8 x) { return __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6); }

// (sum of v[0]'s lanes, ..., sum of v[7]'s lanes).  Each round adds the two halves of every
// vector and packs two vectors into one: 8 -> 4 -> 2 -> 1 vectors, 7 additions in all.
static inline f32x8 lane_sums8(const f32x8 v[8]) {
    f32x8 a[4], b[2];
    for (int k = 0; k < 4; k++)  // a[k]: v[2k]'s half sums in lanes 0-3, v[2k+1]'s in lanes 4-7
        a[k] = __builtin_shufflevector(v[2 * k], v[2 * k + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
               __builtin_shufflevector(v[2 * k], v[2 * k + 1], 4, 5, 6, 7, 12, 13, 14, 15);
    for (int k = 0; k < 2; k++)  // b[k] lanes hold v[4k], v[4k], v[4k+2], v[4k+2], v[4k+1], v[4k+1], v[4k+3], v[4k+3]
        b[k] = __builtin_shufflevector(a[2 * k], a[2 * k + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
               __builtin_shufflevector(a[2 * k], a[2 * k + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    f32x8 s = __builtin_shufflevector(b[0], b[1], 0, 8, 2, 10, 4, 12, 6, 14) +  // lanes: v0 v4 v2 v6 v1 v5 v3 v7
              __builtin_shufflevector(b[0], b[1], 1, 9, 3, 11, 5, 13, 7, 15);
    return __builtin_shufflevector(s, s, 0, 4, 2, 6, 1, 5, 3, 7);
}

/* ---- CQ: nearest centroid.  ||x - C_j||^2 = ||C_j||^2 - 2 x.C_j + ||x||^2, and the last term
   is the same for every j, so the code is argmin_j (||C_j||^2 - 2 x.C_j); first index on ties.
   With c a compile-time constant the loop over the K centroids vectorizes even though the
   codebook is stored centroid by centroid, (K, c).  A transposed copy, (c, K), encoded about
   1.3x faster, but it is a second copy to bring into the caches for every layer and token:
   at 1K positions that cost more than the encoding itself.
   For c a multiple of 8 (cq1 and wider groups) one centroid's c products fill whole vectors, and
   8 centroids' sums come out of one lane_sums8: cq1 on SmolLM2's shape at 1K positions, 1 thread,
   2.60 -> 2.43 ms a token in the cache (the encoder's share of a step 3.9 % -> 3.0 %, by perf).
   Encoding reads the layer's codebooks from memory, so it gains less than its arithmetic. */

#define CQ_ENCODE_CHUNK 256  // centroids whose distances are held at once (on the stack)

CQ_INLINE int cq_encode_group_c(const float *x, const float *cb, const float *sqnorm, int K, const int c) {
    float m[c];
    for (int i = 0; i < c; i++) m[i] = -2.0f * x[i];
    int best = 0;  // stays 0 only when x holds NaNs
    float best_d = INFINITY;
    for (int j0 = 0; j0 < K; j0 += CQ_ENCODE_CHUNK) {
        int n = K - j0 < CQ_ENCODE_CHUNK ? K - j0 : CQ_ENCODE_CHUNK;
        float dist[CQ_ENCODE_CHUNK];
        if (c % 8 == 0 && n % 8 == 0) {  // 8 centroids at a time, each one's products lane by lane
            for (int j = 0; j < n; j += 8) {
                f32x8 prod[8];
                for (int k = 0; k < 8; k++) {
                    const float *cj = cb + (size_t)(j0 + j + k) * c;
                    prod[k] = load8(m) * load8(cj);
                    for (int i = 8; i < c; i += 8) prod[k] += load8(m + i) * load8(cj + i);
                }
                f32x8 d = load8(sqnorm + j0 + j) + lane_sums8(prod);
                memcpy(dist + j, &d, sizeof d);
            }
        } else {
            for (int j = 0; j < n; j++) {
                float d = sqnorm[j0 + j];
                for (int i = 0; i < c; i++) d += m[i] * cb[(size_t)(j0 + j) * c + i];
                dist[j] = d;
            }
        }
        float min = dist[0];  // two passes, both vectorize: the minimum, then its first index
        for (int j = 1; j < n; j++) min = fminf(min, dist[j]);
        if (min < best_d)     // strictly: on a tie the earlier chunk keeps it
            for (int j = 0; j < n; j++)
                if (dist[j] == min) { best = j0 + j; best_d = min; break; }
    }
    return best;
}

static int cq_encode_group(const float *x, const float *cb, const float *sqnorm, int K, int c) {
    switch (c) {  // a constant c lets the compiler keep the c partial products in registers
    case 2: return cq_encode_group_c(x, cb, sqnorm, K, 2);
    case 4: return cq_encode_group_c(x, cb, sqnorm, K, 4);
    case 8: return cq_encode_group_c(x, cb, sqnorm, K, 8);
    default: return cq_encode_group_c(x, cb, sqnorm, K, c);
    }
}

// Code g of a row: one byte for b <= 8, two above (wide).
static inline int cq_code(const uint8_t *row, int g, int wide) { return wide ? ((const uint16_t *)row)[g] : row[g]; }

// The codes of one (layer, position) row as ints; they are bytes for b <= 8, else uint16.
static void cq_read_codes(const KVStore *s, const uint8_t *row, int *codes) {
    for (int g = 0; g < s->n_groups; g++) codes[g] = cq_code(row, g, s->type.b > 8);
}

/* ---- centroid files (written by export.py centroids; format in README.md) */

#define CQCB_MAGIC 0x42435143u  // "CQCB"
#define CQCB_HEADER_BYTES 64

static uint64_t model_fingerprint(const float *wk_layer0, size_t n_floats) {
    uint64_t sum = 0;
    const uint32_t *words = (const uint32_t *)wk_layer0;
    for (size_t i = 0; i < n_floats; i++) sum += words[i];
    return sum;
}

static void default_centroid_path(char *out, size_t size, const char *checkpoint, const KVType *t) {
    size_t len = strlen(checkpoint);
    if (len > 4 && !strcmp(checkpoint + len - 4, ".bin")) len -= 4;
    snprintf(out, size, "%.*s.%dc%db.cent", (int)len, checkpoint, t->c, t->b);
}

// Loads the keys' or the values' codebooks of `path` into s->codebook after checking the header.
static void load_centroids(KVStore *s, const char *path, const char *checkpoint, const Model *m) {
    const Config *c = &m->cfg;
    const KVType *t = &s->type;
    FILE *f = fopen(path, "rb");
    if (!f)
        die("no centroids for -k %s at %s (%s); create them with: "
            "python3 export.py centroids %s -z TOKENIZER --calib TEXT --types %s  (or name a file with -c)",
            t->name, path, strerror(errno), checkpoint, t->name);
    int32_t h[10];
    uint64_t fingerprint;
    if (fread(h, 4, 10, f) != 10 || fread(&fingerprint, 8, 1, f) != 1) die("%s: truncated centroid header", path);
    if ((uint32_t)h[0] != CQCB_MAGIC) die("%s is not a centroid file (bad magic)", path);
    if (h[1] != 1) die("%s: centroid file version %d is not supported", path, h[1]);
    if (h[2] != c->n_layers || h[3] != c->n_kv_heads || h[4] != c->head_size)
        die("%s was made for a model with %d layers, %d kv heads, head size %d; this model has %d, %d, %d",
            path, h[2], h[3], h[4], c->n_layers, c->n_kv_heads, c->head_size);
    if (h[5] != t->c || h[6] != t->b)
        die("%s holds CQ-%dc%db centroids, but -k asks for %s (CQ-%dc%db)", path, h[5], h[6], t->name, t->c, t->b);
    size_t wk_floats = (size_t)kv_dim_of(c) * c->dim;
    if (fingerprint != model_fingerprint(m->w.wk, wk_floats))
        die("%s was learned on another model (fingerprint differs) of the same shape", path);
    size_t per_side = (size_t)s->n_groups * s->n_centroids * t->c;  // floats per layer and K/V
    if (fseek(f, 0, SEEK_END) != 0) die("cannot seek in %s", path);
    long size = ftell(f);
    long want = CQCB_HEADER_BYTES + (long)(4 * per_side * 2 * c->n_layers);
    if (size != want) die("%s: %ld bytes, expected %ld: truncated or corrupt", path, size, want);
    for (int l = 0; l < c->n_layers; l++) {
        long offset = CQCB_HEADER_BYTES + (long)(4 * per_side * (2 * l + (s->is_key ? 0 : 1)));
        if (fseek(f, offset, SEEK_SET) != 0 ||
            fread(s->codebook + (size_t)l * per_side, 4, per_side, f) != per_side)
            die("%s: read error", path);
    }
    fclose(f);
    for (size_t i = 0; i < per_side * c->n_layers; i++)
        if (!is_finite_float(s->codebook[i])) die("%s: codebook holds a non-finite value", path);
    int K = s->n_centroids;
    for (size_t lg = 0; lg < (size_t)c->n_layers * s->n_groups; lg++)
        for (int j = 0; j < K; j++) {
            const float *cj = s->codebook + (lg * K + j) * t->c;
            float n2 = 0.0f;
            for (int i = 0; i < t->c; i++) n2 += cj[i] * cj[i];
            s->centroid_sqnorm[lg * K + j] = n2;
        }
}

/* ---- one store (keys or values) */

static size_t kivi_blocks_size(const KVStore *s) {  // bytes of the KIVI key blocks, all layers
    return (size_t)s->n_layers * (s->seq_len / QBLOCK + 1) * s->kv_dim * s->kivi_block_bytes;
}

static size_t rows_size(const KVStore *s) {  // bytes of the cache rows, all layers
    return (size_t)s->n_layers * s->seq_len * s->row_bytes;
}

static size_t codebook_size(const KVStore *s) {  // bytes of the CQ codebooks, all layers
    return (size_t)s->n_layers * s->n_groups * s->n_centroids * s->type.c * sizeof(float);
}

static void kv_store_init(KVStore *s, KVType type, int is_key, int window, const Model *m,
                          const char *checkpoint, const char *centroid_path) {
    const Config *c = &m->cfg;
    memset(s, 0, sizeof *s);
    s->type = type;
    s->is_key = is_key;
    s->n_layers = c->n_layers;
    s->n_kv_heads = c->n_kv_heads;
    s->head_size = c->head_size;
    s->kv_dim = kv_dim_of(c);
    s->seq_len = c->seq_len;
    s->window = is_quantized(&type) ? window : 0;
    size_t L = s->n_layers, KD = s->kv_dim, n_blocks = (KD + QBLOCK - 1) / QBLOCK;
    switch (type.kind) {
    case KV_FP32: s->row_bytes = KD * 4; break;
    case KV_FP16: s->row_bytes = KD * 2; break;
    case KV_CQ:
        if (type.c > c->head_size || c->head_size % type.c)
            die("-k %s: c = %d must divide the head size %d", type.name, type.c, c->head_size);
        s->n_groups = (int)(KD / type.c);
        s->n_centroids = 1 << type.b;
        s->row_bytes = (size_t)s->n_groups * (type.b <= 8 ? 1 : 2);
        s->codebook = huge_alloc(codebook_size(s));  // read at random by the key kernel: few TLB entries
        s->centroid_sqnorm = xmalloc(L * s->n_groups * s->n_centroids * sizeof(float));
        {
            char path[4096];
            if (centroid_path) snprintf(path, sizeof path, "%s", centroid_path);
            else default_centroid_path(path, sizeof path, checkpoint, &type);
            load_centroids(s, path, checkpoint, m);
        }
        break;
    case KV_KIVI4: case KV_KIVI2:
        if (is_key) {
            s->kivi_block_bytes = block_bytes(scalar_bits(type.kind));
            s->kivi_blocks = huge_alloc(kivi_blocks_size(s));
            s->kivi_recent = xmalloc(L * QBLOCK * KD * sizeof(float));
        } else {  // KIVI values are quantized per token like q4 / q2
            s->row_bytes = n_blocks * block_bytes(scalar_bits(type.kind));
        }
        break;
    default:
        s->row_bytes = n_blocks * block_bytes(scalar_bits(type.kind));
    }
    if (s->row_bytes) s->rows = huge_alloc(rows_size(s));
    if (s->window) s->window_rows = xmalloc(L * s->window * KD * sizeof(float));
}

static void kv_store_free(KVStore *s) {
    huge_free(s->rows, rows_size(s));
    huge_free(s->kivi_blocks, kivi_blocks_size(s));
    free(s->kivi_recent);
    huge_free(s->codebook, codebook_size(s));
    free(s->centroid_sqnorm); free(s->window_rows);
}

static uint8_t *store_row(const KVStore *s, int layer, int t) {
    return s->rows + ((size_t)layer * s->seq_len + t) * s->row_bytes;
}

// Bytes one token takes in this store, over all layers (codebooks and window excluded).
static double kv_store_bytes_per_token(const KVStore *s) {
    return kv_type_bits(&s->type) / 8.0 * s->kv_dim * s->n_layers;
}

// Stores x (kv_dim) for position pos.  Keys arrive rotated, except for CQ: see kv_append.
static void store_put(KVStore *s, int layer, int pos, const float *x) {
    int KD = s->kv_dim;
    if (s->window) memcpy(s->window_rows + ((size_t)layer * s->window + pos % s->window) * KD, x, KD * sizeof(float));
    uint8_t *row = s->rows ? store_row(s, layer, pos) : NULL;
    switch (s->type.kind) {
    case KV_FP32: memcpy(row, x, KD * sizeof(float)); break;
    case KV_FP16: for (int i = 0; i < KD; i++) ((half *)row)[i] = (half)x[i]; break;
    case KV_CQ: {
        int c = s->type.c, K = s->n_centroids;
        for (int g = 0; g < s->n_groups; g++) {
            size_t lg = (size_t)layer * s->n_groups + g;
            int code = cq_encode_group(x + g * c, s->codebook + lg * K * c, s->centroid_sqnorm + lg * K, K, c);
            if (s->type.b <= 8) row[g] = (uint8_t)code;
            else ((uint16_t *)row)[g] = (uint16_t)code;
        }
        break;
    }
    default:
        if (s->kivi_blocks) {  // KIVI keys: wait for the block to fill, then quantize per channel
            float *recent = s->kivi_recent + (size_t)layer * QBLOCK * KD;
            memcpy(recent + (size_t)(pos % QBLOCK) * KD, x, KD * sizeof(float));
            if (pos % QBLOCK == QBLOCK - 1) {
                uint8_t *blk = s->kivi_blocks + (((size_t)layer * (s->seq_len / QBLOCK + 1) + pos / QBLOCK) * KD) * s->kivi_block_bytes;
                for (int ch = 0; ch < KD; ch++)
                    quantize_block(recent + ch, QBLOCK, KD, scalar_bits(s->type.kind), blk + ch * s->kivi_block_bytes);
            }
        } else {
            int bits = scalar_bits(s->type.kind);
            for (int b0 = 0, i = 0; b0 < KD; b0 += QBLOCK, i++)
                quantize_block(x + b0, KD - b0 < QBLOCK ? KD - b0 : QBLOCK, 1, bits, row + i * block_bytes(bits));
        }
    }
}

/* The stored vector of position t as floats (keys: after RoPE), for the types read row by row
   (every type except CQ's fused path).  Returns a pointer into the cache or into buf (kv_dim).
   `pos` is the newest position: it says which KIVI blocks are finished. */
static const float *store_get(const KVStore *s, const RopeTable *rope, int layer, int t, int pos, float *buf) {
    int KD = s->kv_dim;
    if (s->window && t > pos - s->window) return s->window_rows + ((size_t)layer * s->window + t % s->window) * KD;
    const uint8_t *row = s->rows ? store_row(s, layer, t) : NULL;
    switch (s->type.kind) {
    case KV_FP32: return (const float *)row;
    case KV_FP16: for (int i = 0; i < KD; i++) buf[i] = ((const half *)row)[i]; return buf;
    case KV_CQ: {
        int c = s->type.c, K = s->n_centroids, codes[s->n_groups];
        cq_read_codes(s, row, codes);
        for (int g = 0; g < s->n_groups; g++)
            memcpy(buf + g * c, s->codebook + (((size_t)layer * s->n_groups + g) * K + codes[g]) * c, c * sizeof(float));
        if (s->is_key) rope_rotate(rope, buf, s->n_kv_heads, t);  // CQ keys were stored before RoPE
        return buf;
    }
    default:
        if (s->kivi_blocks) {
            int block = t / QBLOCK, bits = scalar_bits(s->type.kind);
            if (block * QBLOCK + QBLOCK - 1 > pos)  // unfinished block: still full precision
                return s->kivi_recent + ((size_t)layer * QBLOCK + t % QBLOCK) * KD;
            const uint8_t *blk = s->kivi_blocks + (((size_t)layer * (s->seq_len / QBLOCK + 1) + block) * KD) * s->kivi_block_bytes;
            for (int ch = 0; ch < KD; ch++) buf[ch] = block_value(blk + ch * s->kivi_block_bytes, t % QBLOCK, bits);
        } else {
            int bits = scalar_bits(s->type.kind);
            for (int b0 = 0, i = 0; b0 < KD; b0 += QBLOCK, i++)
                dequantize_block(row + i * block_bytes(bits), KD - b0 < QBLOCK ? KD - b0 : QBLOCK, bits, buf + b0);
        }
        return buf;
    }
}

/* ---- the cache */

static void kv_cache_init(KVCache *kv, KVType ktype, KVType vtype, int window, CQKeyPath key_path,
                          const Model *m, const RopeTable *rope, const char *checkpoint, const char *centroids) {
    const Config *c = &m->cfg;
    memset(kv, 0, sizeof *kv);
    if (centroids && ktype.kind == KV_CQ && vtype.kind == KV_CQ && (ktype.c != vtype.c || ktype.b != vtype.b))
        die("-c names one centroid file, but keys and values use two CQ configurations; "
            "keep the default file names instead");
    kv_store_init(&kv->k, ktype, 1, window, m, checkpoint, centroids);
    kv_store_init(&kv->v, vtype, 0, window, m, checkpoint, centroids);
    kv->rope = rope;
    kv->n_heads = c->n_heads;
    kv->n_threads = max_threads();
    int H = c->n_heads, hs = c->head_size;
    kv->att = alloc_thread_slots(kv->n_threads, (size_t)H * ATTN_CHUNK);
    kv->key_path = key_path;
    if (key_path == CQ_KEYS_LUT && ktype.kind == KV_CQ && ktype.c % 2 == 0)  // only the lut path needs it
        kv->lut = xmalloc((size_t)H * hs * kv->k.n_centroids * sizeof(float));
    if (ktype.kind == KV_CQ) {
        kv->qpad = xmalloc((size_t)H * padded_head_size(hs) * sizeof(float));
        kv->qrot = alloc_thread_slots(kv->n_threads, (size_t)H * padded_head_size(hs));
    }
    kv->acc = alloc_thread_slots(kv->n_threads, acc_floats(kv));
    kv->kbuf = alloc_thread_slots(kv->n_threads, kv_dim_of(c));
}

static void kv_cache_free(KVCache *kv) {
    kv_store_free(&kv->k);
    kv_store_free(&kv->v);
    free(kv->att); free(kv->lut); free(kv->qpad); free(kv->qrot); free(kv->acc); free(kv->kbuf);
}

// k: (kv_dim) before RoPE, v: (kv_dim).  kbuf is scratch for the rotated key.
static void put_key(KVCache *kv, int layer, int pos, const float *k) {
    KVStore *ks = &kv->k;
    if (ks->type.kind == KV_CQ) {
        store_put(ks, layer, pos, k);  // CQ codes the key before RoPE ...
        if (ks->window) {              // ... but its full-precision window holds rotated keys
            float *w = ks->window_rows + ((size_t)layer * ks->window + pos % ks->window) * ks->kv_dim;
            rope_rotate(kv->rope, w, ks->n_kv_heads, pos);
        }
    } else {
        float *rotated = thread_slot_of(kv->kbuf, ks->kv_dim, thread_id());
        memcpy(rotated, k, ks->kv_dim * sizeof(float));
        rope_rotate(kv->rope, rotated, ks->n_kv_heads, pos);
        store_put(ks, layer, pos, rotated);
    }
}

static void kv_append(KVCache *kv, int layer, int pos, const float *k, const float *v) {
#ifdef _OPENMP
    /* CQ encoding (K x c multiply-adds per group) is the one costly part of appending: with two
       threads, the key and the value are coded side by side.  Not from inside a parallel region
       (bench fills the layers in parallel), where kbuf's slot is that of the calling thread. */
    if (kv->k.type.kind == KV_CQ && kv->v.type.kind == KV_CQ && kv->n_threads > 1 && !omp_in_parallel()) {
#pragma omp parallel sections num_threads(2)
        {
#pragma omp section
            put_key(kv, layer, pos, k);
#pragma omp section
            store_put(&kv->v, layer, pos, v);
        }
        return;
    }
#endif
    put_key(kv, layer, pos, k);
    store_put(&kv->v, layer, pos, v);
}

/* CQ keys, fused path.  With q already rotated to its own position and the key's RoPE pairs
   written as complex numbers, the contribution of group g of token t to q.k is
       Re( sum over pairs p of g:  conj(q_p) * C_g[code][p] * e^{i theta_p t} ).
   Two ways to compute it (kv_attend picks one, with the figures): the decode path gathers
   C_g[code], rotates it and takes the dot product; the LUT path builds conj(q_p) * C_g[j][p]
   for every centroid once per query and needs no rotation per key.  In both, `c` and the head
   size are compile-time constants in the calls below (see CQ_SHAPES), so loops unroll. */

/* Scores for t in [t0, t1): CQ decode path.  In blocks of CQ_BLOCK tokens.  Per token: its fine
   (cos, sin) row, loaded once for all kv heads; per kv head, the key before RoPE gathered from
   the centroids and rotated, then one dot product with each of the R query heads of the group.
   The lane-wise products are summed for the whole block at the end (lane_sums8).  Nothing is
   built per query, and the rotation is shared by the R query heads.
   The rotation is split as in rope_init, t = ROPE_FINE a + b:  q . R(t) k = (R(-ROPE_FINE a) q) . (R(b) k).
   The queries are turned back by the coarse angle once per ROPE_FINE positions (qrot) and each
   key is turned by its fine angle straight from the small fine table, so no (cos, sin) row is
   computed per position (that took about an eighth of the key scoring's time).
   The (cos, sin) row and the key stay in registers: they are fixed-size arrays of KEY_PIECE
   vectors, which the compiler keeps in registers once the loops are unrolled (it cannot do so
   for arrays sized by the head), and a longer head is taken KEY_PIECE vectors at a time.  The
   previous version went kv head by kv head through a block, stored the 8 rotated keys and
   reloaded them for every query head, and reloaded the (cos, sin) row for every kv head.
   SmolLM2 shape, 16K positions, ms a token in the cache (./run -m bench -l 16384 -k T, the two
   builds side by side, medians of 3-6 rounds): cq1 34.4 -> 31.0 with 1 thread, 19.2 -> 17.4
   with 2; cq2 65.5 -> 52.0; cq4 99.7 -> 87.2.  At 1K, cq1 with 2 threads: 2.71 -> 2.41.
   What bounds it is the instructions, not the misses: with the codes masked to 16 centroids,
   so that every centroid read hits L1 (a timing-only build), cq1 at 16K took 27.9-28.7 ms a
   token in the cache against 27.1-28.6 unmasked.
   hsv is the head size rounded up to 8 lanes: kv->qpad holds the query heads, scaled by
   1/sqrt(hs), with zeros in the padding, so padded lanes add nothing. */
#define CQ_BLOCK 8   // divides ROPE_FINE, so an aligned block has one coarse angle
#define KEY_PIECE 8  // vectors of a head held in registers at once (64 channels)

// Stores the scores of the nb <= CQ_BLOCK positions tb .. tb+nb-1 of head h.
static inline void store_block_scores(float *att, int h, int tb, int nb, f32x8 scores) {
    float *dst = att_at(att, h, tb);
    if (nb == CQ_BLOCK) memcpy(dst, &scores, sizeof scores);  // a constant size: one store
    else memcpy(dst, &scores, nb * sizeof(float));
}

/* Channels i .. i+7 of a kv head, looked up by its codes in a table that holds, per group, one
   c-float entry per centroid, `stride` floats apart: the codebook (stride c; the key before
   RoPE) or the LUT (stride R*c).  One group's entry (or part of it) for c >= 8, 8/c entries for
   c = 2 or 4, put together in registers (writing them to memory and reading them back as one
   vector stalled on store forwarding: a load that spans several smaller stores waits for them
   to reach the cache).  Zeros past the head size. */
CQ_INLINE f32x8 group_lanes(const float *table, const uint8_t *codes, int i, int hs, int K, const int c, int stride,
                            const int wide_codes) {
#define CENTROID(gl) (table + ((size_t)(gl) * K + cq_code(codes, (gl), wide_codes)) * stride)
    if (c % 8 == 0) return load8(CENTROID(i / c) + i % c);
    if (i + 8 <= hs && c == 4) {
        f32x4 a, b;
        memcpy(&a, CENTROID(i / 4), sizeof a);
        memcpy(&b, CENTROID(i / 4 + 1), sizeof b);
        return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7);
    }
    if (i + 8 <= hs && c == 2) {
        f32x2 a, b, d, e;
        memcpy(&a, CENTROID(i / 2), sizeof a);
        memcpy(&b, CENTROID(i / 2 + 1), sizeof b);
        memcpy(&d, CENTROID(i / 2 + 2), sizeof d);
        memcpy(&e, CENTROID(i / 2 + 3), sizeof e);
        return __builtin_shufflevector(__builtin_shufflevector(a, b, 0, 1, 2, 3), __builtin_shufflevector(d, e, 0, 1, 2, 3),
                                       0, 1, 2, 3, 4, 5, 6, 7);
    }
    float lanes[8] = {0};  // the last vector of a head whose size is not a multiple of 8 (c is 2 or 4 here)
    for (int j = 0; j < 8 && i + j < hs; j += c) memcpy(lanes + j, CENTROID((i + j) / c), (c & 7) * sizeof(float));
    return load8(lanes);
#undef CENTROID
}

/* Calls kernel(args..., hsv, c, wide_codes) with the padded head size and c as compile-time
   constants for the shapes most models have (head sizes 64 and 128, c = 2, 4, 8), so that the
   loops over a head and a group unroll (about 2x faster than the general case on SmolLM2's
   shape for the key kernel); the general case otherwise.  All three CQ kernels go through it. */
#define CQ_SHAPES(type, hsv, kernel, ...)                                              \
    do {                                                                               \
        int c_ = (type).c;                                                             \
        if ((type).b > 8) kernel(__VA_ARGS__, hsv, c_, 1);  /* two-byte codes */       \
        else if (hsv == 64 && c_ == 8) kernel(__VA_ARGS__, 64, 8, 0);                  \
        else if (hsv == 64 && c_ == 4) kernel(__VA_ARGS__, 64, 4, 0);                  \
        else if (hsv == 64 && c_ == 2) kernel(__VA_ARGS__, 64, 2, 0);                  \
        else if (hsv == 128 && c_ == 8) kernel(__VA_ARGS__, 128, 8, 0);                \
        else if (hsv == 128 && c_ == 4) kernel(__VA_ARGS__, 128, 4, 0);                \
        else if (hsv == 128 && c_ == 2) kernel(__VA_ARGS__, 128, 2, 0);                \
        else kernel(__VA_ARGS__, hsv, c_, 0);                                          \
    } while (0)

CQ_INLINE void cq_decode_scores_shape(KVCache *kv, int layer, int t0, int t1, float *att, const int hsv, const int c,
                                      const int wide_codes) {
    const KVStore *s = &kv->k;
    const RopeTable *rope = kv->rope;
    int K = s->n_centroids, hs = s->head_size, gh = hs / c, R = kv->n_heads / s->n_kv_heads, nv = hsv / 8;
    float *qrot = thread_slot_of(kv->qrot, (size_t)kv->n_heads * hsv, thread_id());  // (H, hsv)
    int coarse = -1;
    for (int tb = t0, te; tb < t1; tb = te) {
        te = (tb / CQ_BLOCK + 1) * CQ_BLOCK;  // blocks end at multiples of CQ_BLOCK
        if (te > t1) te = t1;
        int nb = te - tb;
        if (tb / ROPE_FINE != coarse) {  // turn the queries back by the block's coarse angle
            coarse = tb / ROPE_FINE;
            const float *cos2 = rope->coarse_cos2 + (size_t)coarse * hsv, *sin2 = rope->coarse_sin2 + (size_t)coarse * hsv;
            for (int h = 0; h < kv->n_heads; h++)
                for (int m = 0; m < nv; m++) {
                    f32x8 x = load8(kv->qpad + (size_t)h * hsv + 8 * m);
                    f32x8 y = x * load8(cos2 + 8 * m) - swap_pairs(x) * load8(sin2 + 8 * m);
                    memcpy(qrot + (size_t)h * hsv + 8 * m, &y, sizeof y);
                }
        }
        f32x8 dots[kv->n_heads][CQ_BLOCK];  // lane-wise products; dots[h][j]'s lanes sum to the score
        for (int h = 0; h < kv->n_heads; h++)
            for (int j = nb; j < CQ_BLOCK; j++) dots[h][j] = (f32x8){0};  // past the end of a short block
        for (int j = 0; j < nb; j++) {
            const float *fine_cos2 = rope->fine_cos2 + (size_t)((tb + j) % ROPE_FINE) * hsv;
            const float *fine_sin2 = rope->fine_sin2 + (size_t)((tb + j) % ROPE_FINE) * hsv;
            const uint8_t *row = store_row(s, layer, tb + j);
            for (int m0 = 0; m0 < nv; m0 += KEY_PIECE) {  // one piece of the head: vectors m0 .. m0+np-1
                int np = nv - m0 < KEY_PIECE ? nv - m0 : KEY_PIECE;
                f32x8 cos2[KEY_PIECE], sin2[KEY_PIECE];  // the token's fine angle, for every kv head
                for (int m = 0; m < np; m++) {
                    cos2[m] = load8(fine_cos2 + 8 * (m0 + m));
                    sin2[m] = load8(fine_sin2 + 8 * (m0 + m));
                }
                for (int kvh = 0; kvh < s->n_kv_heads; kvh++) {
                    const float *cb = s->codebook + ((size_t)layer * s->n_groups + kvh * gh) * K * c;
                    const uint8_t *codes = row + (size_t)kvh * gh * (1 + wide_codes);  // this kv head's codes
                    f32x8 key[KEY_PIECE];  // this piece of the key, turned by its fine angle
                    // without the pragma GCC kept this loop rolled for c = 2 (cq4: 147 ms a token in the cache, not 87)
#pragma GCC unroll 8
                    for (int m = 0; m < np; m++) {
                        f32x8 x = group_lanes(cb, codes, 8 * (m0 + m), hs, K, c, c, wide_codes);
                        key[m] = x * cos2[m] + swap_pairs(x) * sin2[m];
                    }
                    for (int r = 0; r < R; r++) {
                        const float *qh = qrot + (size_t)(kvh * R + r) * hsv + 8 * m0;
                        f32x8 acc = m0 ? dots[kvh * R + r][j] : (f32x8){0};
                        for (int m = 0; m < np; m++) acc += load8(qh + 8 * m) * key[m];
                        dots[kvh * R + r][j] = acc;
                    }
                }
            }
        }
        for (int h = 0; h < kv->n_heads; h++) store_block_scores(att, h, tb, nb, lane_sums8(dots[h]));
    }
}

static void cq_key_scores_decode(KVCache *kv, int layer, int t0, int t1, float *att) {
    int hsv = padded_head_size(kv->k.head_size);
    CQ_SHAPES(kv->k.type, hsv, cq_decode_scores_shape, kv, layer, t0, t1, att);
}

/* ---- LUT path.  lut holds conj(q_p) * C_g[j][p] for every centroid j, stored as (re, -im) so
   that a token costs one c-float dot product per group and head with the (cos, sin) row of its
   position.  Layout (KVH, hs/c, K, R, c) where R = H/KVH: the R query heads that share a kv
   head sit side by side, so one code reads one contiguous block for all of them.  1/sqrt(hs)
   is folded in. */
CQ_INLINE void cq_build_key_lut_c(KVCache *kv, int layer, const float *q, int h, const int c) {
    const KVStore *s = &kv->k;
    int K = s->n_centroids, hs = s->head_size, gh = hs / c, R = kv->n_heads / s->n_kv_heads;
    int kvh = h / R, r = h % R;
    float scale = 1.0f / sqrtf((float)hs);
    for (int gl = 0; gl < gh; gl++) {
        const float *qg = q + (size_t)h * hs + gl * c;
        const float *cb = s->codebook + ((size_t)layer * s->n_groups + kvh * gh + gl) * K * c;
        float *out = kv->lut + ((size_t)(kvh * gh + gl) * K * R + r) * c;
        for (int j = 0; j < K; j++, out += R * c)
            for (int p = 0; p < c; p += 2) {
                float qr = qg[p], qi = qg[p + 1], cr = cb[j * c + p], ci = cb[j * c + p + 1];
                out[p] = scale * (qr * cr + qi * ci);
                out[p + 1] = scale * (qi * cr - qr * ci);
            }
    }
}

static void cq_build_key_lut(KVCache *kv, int layer, const float *q, int h) {
    switch (kv->k.type.c) {
    case 2: cq_build_key_lut_c(kv, layer, q, h, 2); break;
    case 4: cq_build_key_lut_c(kv, layer, q, h, 4); break;
    case 8: cq_build_key_lut_c(kv, layer, q, h, 8); break;
    default: cq_build_key_lut_c(kv, layer, q, h, kv->k.type.c);
    }
}

/* Scores for t in [t0, t1): LUT path.  Per token, its position's (cos, sin) row, one vector
   per 8 lanes: the coarse row times the fine row (one complex product per pair, written as
   cos2 * fine + sin2 * swap_pairs(fine)), shared by every head.  Then per query head one
   multiply-add per vector with the LUT entry of the vector's code, left as lane-wise sums and
   finished for 8 tokens at once (lane_sums8).  No rotation per key.
   LUT entries are read as the decode path reads centroids (group_lanes), R*c floats apart. */
CQ_INLINE void cq_lut_scores_shape(KVCache *kv, int layer, int t0, int t1, float *att, const int hsv, const int c,
                                   const int wide_codes) {
    const KVStore *s = &kv->k;
    const RopeTable *rope = kv->rope;
    int K = s->n_centroids, hs = s->head_size, gh = hs / c, R = kv->n_heads / s->n_kv_heads, nv = hsv / 8;
    for (int tb = t0, te; tb < t1; tb = te) {
        te = (tb / CQ_BLOCK + 1) * CQ_BLOCK;
        if (te > t1) te = t1;
        int nb = te - tb;
        f32x8 dots[kv->n_heads][CQ_BLOCK];  // lane-wise products; dots[h][j]'s lanes sum to the score
        for (int j = 0; j < CQ_BLOCK; j++) {
            if (j >= nb) {
                for (int h = 0; h < kv->n_heads; h++) dots[h][j] = (f32x8){0};
                continue;
            }
            int t = tb + j;
            const float *cc = rope->coarse_cos2 + (size_t)(t / ROPE_FINE) * hsv, *sc = rope->coarse_sin2 + (size_t)(t / ROPE_FINE) * hsv;
            const float *fc = rope->fine_cos2 + (size_t)(t % ROPE_FINE) * hsv, *fs = rope->fine_sin2 + (size_t)(t % ROPE_FINE) * hsv;
            f32x8 cs[nv];  // (cos, sin) of each pair at position t; zeros in the padding lanes
            for (int m = 0; m < nv; m++) {
                f32x8 fine = __builtin_shufflevector(load8(fc + 8 * m), load8(fs + 8 * m), 0, 9, 2, 11, 4, 13, 6, 15);
                cs[m] = load8(cc + 8 * m) * fine + load8(sc + 8 * m) * swap_pairs(fine);
            }
            const uint8_t *row = store_row(s, layer, t);
            for (int kvh = 0; kvh < s->n_kv_heads; kvh++) {
                const float *lut = kv->lut + (size_t)kvh * gh * K * R * c;  // (gh, K, R, c)
                const uint8_t *codes = row + (size_t)kvh * gh * (1 + wide_codes);  // this kv head's codes
                for (int r = 0; r < R; r++) {
                    f32x8 acc = {0};
                    for (int m = 0; m < nv; m++) acc += group_lanes(lut + (size_t)r * c, codes, 8 * m, hs, K, c, R * c, wide_codes) * cs[m];
                    dots[kvh * R + r][j] = acc;
                }
            }
        }
        for (int h = 0; h < kv->n_heads; h++) store_block_scores(att, h, tb, nb, lane_sums8(dots[h]));
    }
}

static void cq_key_scores_lut(KVCache *kv, int layer, int t0, int t1, float *att) {
    int hsv = padded_head_size(kv->k.head_size);
    CQ_SHAPES(kv->k.type, hsv, cq_lut_scores_shape, kv, layer, t0, t1, att);
}

// Scores for t in [t0, t1) from whole key rows (every other type, CQ's decode path, the window).
static void row_key_scores(KVCache *kv, int layer, int pos, const float *q, int t0, int t1, float *att, float *buf) {
    const KVStore *s = &kv->k;
    int hs = s->head_size, group = kv->n_heads / s->n_kv_heads;
    float scale = 1.0f / sqrtf((float)hs);
    for (int t = t0; t < t1; t++) {
        const float *row = store_get(s, kv->rope, layer, t, pos, buf);
        for (int h = 0; h < kv->n_heads; h++) {
            const float *kt = row + (size_t)(h / group) * hs, *qh = q + (size_t)h * hs;
            float score = 0.0f;
            for (int i = 0; i < hs; i++) score += qh[i] * kt[i];
            *att_at(att, h, t) = score * scale;
        }
    }
}

/* CQ values: out_h += sum_t p_t C[code_t] for the query heads h of each kv head, gathered from
   the codebook by code straight into registers and never written out as a row.
   Per kv head, a set of up to VALUE_HEADS query heads and a piece of KEY_PIECE vectors of the
   head: their sums (3 x 8 vectors: 24 of AVX-512's 32 registers) stay in registers over all the
   tokens, and each centroid vector, once gathered, serves every head of the set.
   CQ.md's other way, a histogram of the weights per group (sum of p_t over the tokens whose code
   is j), then one 2^b x c product per group, costs fewer operations past 2^b tokens, and run.c
   used it up to commit d93f5f8 (4-float bins holding R = 3 heads side by side).  It measured
   slower: each token and group is a load-add-store at a random bin of a table (98 KB a layer
   for cq1) that does not fit L1, and it slows down further when nearby tokens share a code (a
   load that waits for the store before it: codes masked to 32 centroids, a timing-only hack,
   took cq1 from 28 to 43 ms a token in the cache).  The speed of the sums does not depend on
   which codes occur.  ms a token in the cache, both builds side by side, best of 3 runs,
   1 thread (./run -m bench -k T; SmolLM2's shape at 16K positions, and random 4-layer models
   at 8K with R query heads per kv head, head size 64), histogram -> sums:
       SmolLM2 (R = 3)  cq1 28.0 -> 27.5, cq2 44.9 -> 39.9, cq4 82.9 -> 60.3
       R = 1            cq1 4.69 -> 4.02, cq4 15.3 -> 11.4
       R = 2            cq1 5.77 -> 5.32, cq4 16.7 -> 12.4
       R = 4            cq1 3.74 -> 4.18, cq4 8.22 -> 8.34 (the one shape where the bins won)
       R = 8            cq1 7.24 -> 6.61, cq4 16.2 -> 11.8 */
#define VALUE_HEADS 3

CQ_INLINE void cq_value_sums_shape(const KVCache *kv, int layer, int t0, int t1, float *att, float *out, const int nr,
                                   const int hsv, const int c, const int wide_codes) {
    const KVStore *s = &kv->v;
    int K = s->n_centroids, hs = s->head_size, gh = hs / c, R = kv->n_heads / s->n_kv_heads, nv = hsv / 8;
    for (int kvh = 0; kvh < s->n_kv_heads; kvh++) {
        const float *cb = s->codebook + ((size_t)layer * s->n_groups + kvh * gh) * K * c;
        for (int r0 = 0; r0 < R; r0 += nr)  // query heads r0 .. r0+nr-1 of the kv head (zero weights past R)
            for (int m0 = 0; m0 < nv; m0 += KEY_PIECE) {  // vectors m0 .. m0+np-1 of the head
                int np = nv - m0 < KEY_PIECE ? nv - m0 : KEY_PIECE;
                f32x8 sums[VALUE_HEADS][KEY_PIECE];  // fixed sizes, so that they can live in registers
                for (int r = 0; r < nr; r++)
                    for (int m = 0; m < KEY_PIECE; m++) sums[r][m] = (f32x8){0};
                for (int t = t0; t < t1; t++) {
                    const uint8_t *codes = store_row(s, layer, t) + (size_t)kvh * gh * (1 + wide_codes);
                    float p[VALUE_HEADS];
                    for (int r = 0; r < nr; r++) p[r] = r0 + r < R ? *att_at(att, kvh * R + r0 + r, t) : 0.0f;
#pragma GCC unroll 8
                    for (int m = 0; m < np; m++) {
                        f32x8 x = group_lanes(cb, codes, 8 * (m0 + m), hs, K, c, c, wide_codes);
                        for (int r = 0; r < nr; r++) sums[r][m] += p[r] * x;
                    }
                }
                for (int r = 0; r < nr && r0 + r < R; r++) {
                    float *o = out + (size_t)(kvh * R + r0 + r) * hs;
                    for (int m = 0; m < np; m++)
                        for (int i = 0; i < 8 && 8 * (m0 + m) + i < hs; i++) o[8 * (m0 + m) + i] += sums[r][m][i];
                }
            }
    }
}

CQ_INLINE void cq_value_sums_heads(const KVCache *kv, int layer, int t0, int t1, float *att, float *out,
                                   const int nr) {
    int hsv = padded_head_size(kv->v.head_size);
    CQ_SHAPES(kv->v.type, hsv, cq_value_sums_shape, kv, layer, t0, t1, att, out, nr);
}

// out_h += sum over t in [t0, t1) of p_t v_t, from CQ codes.  att: the chunk's weights; out: (H, hs)
static void cq_value_sums(const KVCache *kv, int layer, int t0, int t1, float *att, float *out) {
    // query heads per pass: up to VALUE_HEADS, the last pass padded with zero weights (R = 8
    // in passes of 2 took 7.0 ms, and 13.6 with cq4, against 6.6 and 11.8 in passes of 3)
    int R = kv->n_heads / kv->v.n_kv_heads, nr = R < VALUE_HEADS ? R : VALUE_HEADS;
    if (nr == 1) cq_value_sums_heads(kv, layer, t0, t1, att, out, 1);
    else if (nr == 2) cq_value_sums_heads(kv, layer, t0, t1, att, out, 2);
    else cq_value_sums_heads(kv, layer, t0, t1, att, out, 3);
}

// out_h += sum over t in [t0, t1) of p_t v_t, from whole value rows.  out: (H, hs)
static void row_value_sum(const KVCache *kv, int layer, int pos, int t0, int t1, float *att, float *out, float *buf) {
    const KVStore *s = &kv->v;
    int hs = s->head_size, group = kv->n_heads / s->n_kv_heads;
    for (int t = t0; t < t1; t++) {
        const float *row = store_get(s, kv->rope, layer, t, pos, buf);
        for (int h = 0; h < kv->n_heads; h++) {
            const float *vt = row + (size_t)(h / group) * hs;
            float p = *att_at(att, h, t), *oh = out + (size_t)h * hs;
            for (int i = 0; i < hs; i++) oh[i] += p * vt[i];
        }
    }
}

/* Attention for one layer: q (H, hs) already rotated to `pos`; out (H, hs).

   One pass over the positions, in chunks of ATTN_CHUNK, with an online softmax (as flash
   attention does): per head a running maximum m and sum s of exp(score - m); a chunk's scores
   become exp(score - m) at once and are added into the value sums, which are rescaled by
   exp(m_old - m_new) when the maximum grows (by more than MAX_LAG).  Only one chunk of scores
   is live at a time, so scores, codes and codebooks stay in cache: with all 16K positions'
   scores written before the softmax, CQ's codebooks fell out of L2 and its key scoring got 4x
   slower from 8K to 16K.  Threads take chunks as they come (a dynamic schedule: on a shared
   machine one core is often slower than the other, and fixed halves left the fast thread
   waiting for up to a fifth of the time), each with its own (m, s, sums); the threads are
   merged at the end.  The value sums are plain rows (H, hs) for every cache type. */

static void kv_attend(KVCache *kv, int layer, int pos, const float *q, float *out) {
    const KVStore *ks = &kv->k, *vs = &kv->v;
    int H = kv->n_heads, hs = ks->head_size, n = pos + 1;
    // positions below n_codes_k (n_codes_v) are read through codes; the rest from the window
    int n_codes_k = ks->window ? (n - ks->window > 0 ? n - ks->window : 0) : n;
    int n_codes_v = vs->window ? (n - vs->window > 0 ? n - vs->window : 0) : n;
    int cq_keys = ks->type.kind == KV_CQ && ks->type.c >= 2;  // c = 1 splits RoPE pairs: row path
    /* Keys: decode+rotate+dot unless --cq-keys lut.  Measured on a SmolLM2-shaped model, 1 thread
       (./run -m bench -l L -k cq1 --cq-keys lut|decode, side by side, two runs each), ms per token
       in the cache: 16K 45.9-55.1 (lut) against 30.4-30.8 (decode), 4K 13.8-14.3 against 8.6-8.8,
       1K 5.4-5.6 against 3.3-3.4.  The LUT (H x hs x 2^b floats, 590 KB a layer, R = 3 times the
       codebook) is read at random, R x c floats per group and token; decoding reads c floats
       and rotates them once for the R query heads, and that arithmetic costs less than the
       LUT's R reads.  Not only for the traffic: with the codes masked to 16 centroids, so that
       the LUT stayed in L1, 16K took 41-42 ms, against 46 unmasked and 34-37 for the decode
       path of the time.  (Prefetching the LUT entries a few tokens ahead made it slower.) */
    int key_lut = cq_keys && kv->lut && kv->key_path == CQ_KEYS_LUT;
    int cq_values = vs->type.kind == KV_CQ;
    int parallel = kv->n_threads > 1 && (long)n * H * hs >= PARALLEL_MIN_MACS / 4;
    if (cq_keys && !key_lut) {
        int hsv = padded_head_size(hs);
        float scale = 1.0f / sqrtf((float)hs);
        for (int h = 0; h < H; h++)
            for (int i = 0; i < hsv; i++) kv->qpad[(size_t)h * hsv + i] = i < hs ? scale * q[(size_t)h * hs + i] : 0.0f;
    }

#ifdef _OPENMP
#pragma omp parallel num_threads(parallel ? kv->n_threads : 1)
#else
    (void)parallel;
#endif
    {
        int tid = thread_id(), nth = 1;
#ifdef _OPENMP
        nth = omp_get_num_threads();
#endif
        float *buf = thread_slot_of(kv->kbuf, ks->kv_dim, tid);
        // this thread's running maxima (H), sums (H) and value sums (H, hs)
        size_t acc_n = acc_floats(kv);
        float *mx = thread_slot_of(kv->acc, acc_n, tid), *sum = mx + H, *rows = sum + H;
        for (int h = 0; h < H; h++) { mx[h] = -FLT_MAX; sum[h] = 0.0f; }
        memset(rows, 0, (size_t)H * hs * sizeof(float));
        if (key_lut) {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (int h = 0; h < H; h++) cq_build_key_lut(kv, layer, q, h);
        }
        if (cq_keys && !key_lut) {
            /* The decode path reads the layer's codebook at random, and the weights that stream
               through the caches between two tokens have evicted it.  The thread that has just
               encoded the new key read it in order already; every other thread would miss on
               most lines at short contexts, so it asks for them in order first (SmolLM2 shape,
               cq1, 1K, 2 threads: 2.4-2.9 ms a token in the cache with this, 2.7-3.0 without;
               1 thread: no difference). */
            const char *cb = (const char *)(ks->codebook + (size_t)layer * ks->n_groups * ks->n_centroids * ks->type.c);
            size_t bytes = (size_t)ks->n_groups * ks->n_centroids * ks->type.c * sizeof(float);
            for (size_t i = 0; i < bytes; i += 64) __builtin_prefetch(cb + i);
        }
        float *att = thread_slot_of(kv->att, (size_t)H * ATTN_CHUNK, tid);
        int n_chunks = (n + ATTN_CHUNK - 1) / ATTN_CHUNK;
#ifdef _OPENMP
#pragma omp for schedule(dynamic) nowait
#endif
        for (int chunk = 0; chunk < n_chunks; chunk++) {
            int a = chunk * ATTN_CHUNK, b = a + ATTN_CHUNK < n ? a + ATTN_CHUNK : n;  // (see att_at)
            // 1. scores of positions a..b-1
            int coded = cq_keys ? (b < n_codes_k ? b : n_codes_k) : a;  // [a, coded) through codes
            if (coded > a) {
                if (key_lut) cq_key_scores_lut(kv, layer, a, coded, att);
                else cq_key_scores_decode(kv, layer, a, coded, att);
            }
            if (b > coded) row_key_scores(kv, layer, pos, q, coded > a ? coded : a, b, att, buf);
            // 2. online softmax: att becomes exp(score - running max)
            for (int h = 0; h < H; h++) {
                float *row = att_at(att, h, a), m = row[0];
                for (int i = 1; i < b - a; i++) m = fmaxf(m, row[i]);
                if (m > mx[h] + MAX_LAG) {
                    if (sum[h] > 0.0f) {
                        float f = expf(mx[h] - m);
                        sum[h] *= f;
                        for (int i = 0; i < hs; i++) rows[(size_t)h * hs + i] *= f;
                    }
                    mx[h] = m;
                }
                float s = 0.0f, mh = mx[h];  // a local: row[] might alias mx[] for all the compiler knows
                for (int i = 0; i < b - a; i++) {
                    row[i] = expf(row[i] - mh);
                    s += row[i];
                }
                sum[h] += s;
            }
            // 3. weighted values
            int coded_v = cq_values ? (b < n_codes_v ? b : n_codes_v) : a;  // [a, coded_v) through codes
            if (coded_v > a) cq_value_sums(kv, layer, a, coded_v, att, rows);
            if (b > coded_v) row_value_sum(kv, layer, pos, coded_v > a ? coded_v : a, b, att, rows, buf);
        }
#ifdef _OPENMP
#pragma omp barrier
#pragma omp for schedule(static)
#endif
        for (int h = 0; h < H; h++) {  // merge the threads: weight of thread th = e^(m_th - m) / total
            float m = -FLT_MAX, total = 0.0f;
            for (int th = 0; th < nth; th++) m = fmaxf(m, thread_slot_of(kv->acc, acc_n, th)[h]);
            for (int th = 0; th < nth; th++) {
                const float *a = thread_slot_of(kv->acc, acc_n, th);
                total += a[H + h] * expf(a[h] - m);
            }
            float *o = out + (size_t)h * hs;
            for (int i = 0; i < hs; i++) o[i] = 0.0f;
            for (int th = 0; th < nth; th++) {
                const float *a = thread_slot_of(kv->acc, acc_n, th);
                float w = a[H + h] > 0.0f ? expf(a[h] - m) / total : 0.0f;
                const float *r = a + 2 * H + (size_t)h * hs;
                for (int i = 0; i < hs; i++) o[i] += w * r[i];
            }
        }
    }
}

/* ==========================================================================================
   6. The forward pass
   ========================================================================================== */

typedef struct {       // activations of the current token
    float *x;          // (D) residual stream
    float *xb;         // (max(D, H*hs)) normed input / attention output
    float *xb2;        // (D)
    float *hb, *hb2;   // (F)
    float *q;          // (H*hs)
    float *k, *v;      // (KVH*hs), k before RoPE
    float *logits;     // (V)
} RunState;

static void run_state_init(RunState *s, const Config *c) {
    int wide = c->dim > q_dim_of(c) ? c->dim : q_dim_of(c);
    s->x = xmalloc(c->dim * sizeof(float));
    s->xb = xmalloc(wide * sizeof(float));
    s->xb2 = xmalloc(c->dim * sizeof(float));
    s->hb = xmalloc(c->hidden_dim * sizeof(float));
    s->hb2 = xmalloc(c->hidden_dim * sizeof(float));
    s->q = xmalloc(q_dim_of(c) * sizeof(float));
    s->k = xmalloc(kv_dim_of(c) * sizeof(float));
    s->v = xmalloc(kv_dim_of(c) * sizeof(float));
    s->logits = xmalloc(c->vocab_size * sizeof(float));
}

static void run_state_free(RunState *s) {
    free(s->x); free(s->xb); free(s->xb2); free(s->hb); free(s->hb2);
    free(s->q); free(s->k); free(s->v); free(s->logits);
}

// Runs `token` at position `pos` through the model, reading and extending `kv`.  Returns logits (V).
static float *forward(const Model *m, RunState *s, KVCache *kv, const RopeTable *rope, int token, int pos) {
    const Config *c = &m->cfg;
    const Weights *w = &m->w;
    int D = c->dim, F = c->hidden_dim, QD = q_dim_of(c), KD = kv_dim_of(c);
    memcpy(s->x, w->token_embedding + (size_t)token * D, D * sizeof(float));

    for (int l = 0; l < c->n_layers; l++) {
        // attention block
        rmsnorm(s->xb, s->x, w->attn_norm + (size_t)l * D, D, c->norm_eps);
        Product qkv[3] = {{s->q, w->wq + (size_t)l * QD * D, QD}, {s->k, w->wk + (size_t)l * KD * D, KD},
                          {s->v, w->wv + (size_t)l * KD * D, KD}};
        matmuls(s->xb, D, qkv, 3);
        rope_rotate(rope, s->q, c->n_heads, pos);
        double t0 = now_seconds();
        kv_append(kv, l, pos, s->k, s->v);  // the current token, too, is read back through the cache
        kv_attend(kv, l, pos, s->q, s->xb);
        kv->seconds += now_seconds() - t0;
        matmul(s->xb2, s->xb, w->wo + (size_t)l * D * QD, QD, D);
        for (int i = 0; i < D; i++) s->x[i] += s->xb2[i];

        // SwiGLU feed-forward block
        rmsnorm(s->xb, s->x, w->ffn_norm + (size_t)l * D, D, c->norm_eps);
        Product w13[2] = {{s->hb, w->w1 + (size_t)l * F * D, F}, {s->hb2, w->w3 + (size_t)l * F * D, F}};
        matmuls(s->xb, D, w13, 2);
        for (int i = 0; i < F; i++) {
            float a = s->hb[i];
            s->hb[i] = a / (1.0f + expf(-a)) * s->hb2[i];
        }
        matmul(s->xb, s->hb, w->w2 + (size_t)l * D * F, F, D);
        for (int i = 0; i < D; i++) s->x[i] += s->xb[i];
    }
    rmsnorm(s->x, s->x, w->final_norm, D, c->norm_eps);
    matmul(s->logits, s->x, w->classifier, D, c->vocab_size);
    return s->logits;
}

/* ==========================================================================================
   7. Generation, chat, perplexity, benchmark
   ========================================================================================== */

typedef struct {           // everything the command line chooses
    const char *checkpoint, *tokenizer, *mode, *prompt, *system_prompt;
    const char *kv_spec, *centroids, *text_file, *logits_file;
    float temperature, topp;
    long long seed;
    int steps, window, length;
    int ids_input, kl, lines;
    int steps_given;
    CQKeyPath cq_key_path;
} Options;

typedef struct {           // a model ready to run: weights, RoPE table, one cache and its state
    Model model;
    RopeTable rope;
    Tokenizer tok;
    KVType ktype, vtype;
} Runtime;

static void new_cache(const Runtime *rt, const Options *o, KVCache *kv, KVType k, KVType v) {
    kv_cache_init(kv, k, v, o->window, o->cq_key_path, &rt->model, &rt->rope, o->checkpoint, o->centroids);
}

static FILE *open_logits(const Options *o) {
    if (!o->logits_file) return NULL;
    FILE *f = fopen(o->logits_file, "wb");
    if (!f) die("cannot write %s: %s", o->logits_file, strerror(errno));
    return f;
}

static void write_logits(FILE *f, const float *logits, int n) {
    if (f && fwrite(logits, sizeof(float), n, f) != (size_t)n) die("writing logits failed: %s", strerror(errno));
}

static int *encode_prompt(const Runtime *rt, const char *text, int *n) {
    int *ids = xmalloc((strlen(text) + 3) * sizeof(int));
    encode(&rt->tok, text, rt->model.cfg.bos_id, 1, ids, n);
    return ids;
}

static void kv_type_label(char *buf, size_t n, const KVType *k, const KVType *v) {
    if (strcmp(k->name, v->name) == 0) snprintf(buf, n, "%s", k->name);
    else snprintf(buf, n, "%s:%s", k->name, v->name);
}

// One line on stderr: what the cache held, against an fp32 cache of the same positions.
static void report_kv_memory(const KVCache *kv, const Config *c, int positions) {
    double bytes = kv_store_bytes_per_token(&kv->k) + kv_store_bytes_per_token(&kv->v);
    double fp32 = 2.0 * 4 * kv_dim_of(c) * c->n_layers;
    char label[64];
    kv_type_label(label, sizeof label, &kv->k.type, &kv->v.type);
    fprintf(stderr, "KV cache %s: %.0f bytes per token, %.1f KB for %d positions; fp32 would take %.0f bytes "
            "per token (%.1fx more)\n", label, bytes, bytes * positions / 1024, positions, fp32, fp32 / bytes);
}

static void generate(Runtime *rt, Sampler *sampler, const Options *o) {
    const Config *c = &rt->model.cfg;
    const char *prompt = o->prompt ? o->prompt : "";
    int n_prompt;
    int *prompt_ids = encode_prompt(rt, prompt, &n_prompt);
    if (n_prompt > c->seq_len)
        die("the prompt is %d tokens long but the model's context is %d", n_prompt, c->seq_len);
    int steps = o->steps;
    RunState s;
    KVCache kv;
    run_state_init(&s, c);
    new_cache(rt, o, &kv, rt->ktype, rt->vtype);
    FILE *logits_out = open_logits(o);

    long start = 0;
    int token = prompt_ids[0], pos = 0;
    while (pos < steps) {
        float *logits = forward(&rt->model, &s, &kv, &rt->rope, token, pos);
        write_logits(logits_out, logits, c->vocab_size);
        // inside the prompt the next token is forced, after it the model chooses
        int next = pos < n_prompt - 1 ? prompt_ids[pos + 1] : sample(sampler, logits);
        pos++;
        // llama2.c stops when the model starts a new sequence; byte-level BPE models also end on eos
        if (next == c->bos_id || (rt->tok.kind == 1 && next == c->eos_id)) break;
        print_piece(&rt->tok, c->bos_id, token, next);
        fflush(stdout);
        token = next;
        if (start == 0) start = time_in_ms();  // the first step is excluded: it warms up
    }
    printf("\n");
    if (pos > 1) {
        long end = time_in_ms();
        fprintf(stderr, "achieved tok/s: %f\n", (pos - 1) / (double)(end - start) * 1000);
    }
    report_kv_memory(&kv, c, pos);
    if (logits_out) fclose(logits_out);
    free(prompt_ids);
    run_state_free(&s);
    kv_cache_free(&kv);
}

// Reads a line of any length from stdin into *buf (grown as needed) without the newline; 0 at end of input.
static int read_line(const char *guide, char **buf, size_t *cap) {
    printf("%s", guide);
    fflush(stdout);
    ssize_t len = getline(buf, cap, stdin);
    if (len < 0) return 0;
    if (len > 0 && (*buf)[len - 1] == '\n') (*buf)[len - 1] = '\0';
    return 1;
}

// printf into a buffer of the right size.
static char *format_alloc(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *format_alloc(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int len = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (len < 0) die("cannot format a string: %s", strerror(errno));
    char *out = xmalloc((size_t)len + 1);
    va_start(ap, fmt);
    vsnprintf(out, (size_t)len + 1, fmt, ap);
    va_end(ap);
    return out;
}

// Renders one user turn with the checkpoint's chat template (the caller frees it).
static char *render_turn(int template, int first, const char *sys, const char *user) {
    if (template == 1) {  // ChatML
        if (first && sys[0])
            return format_alloc("<|im_start|>system\n%s<|im_end|>\n<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n", sys, user);
        return format_alloc("<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n", user);
    }
    if (first && sys[0]) return format_alloc("[INST] <<SYS>>\n%s\n<</SYS>>\n\n%s [/INST]", sys, user);  // Llama-2-chat
    return format_alloc("[INST] %s [/INST]", user);
}

static void chat(Runtime *rt, Sampler *sampler, const Options *o) {
    const Config *c = &rt->model.cfg;
    char *system_line = NULL, *user_line = NULL;  // lines read from stdin (getline's buffers)
    size_t system_cap = 0, user_cap = 0;
    const char *system_prompt = o->system_prompt ? o->system_prompt : "";
    int *prompt_ids = NULL;
    int n_prompt = 0, user_idx = 0, user_turn = 1, next = 0, token, pos = 0;
    RunState s;
    KVCache kv;
    run_state_init(&s, c);
    new_cache(rt, o, &kv, rt->ktype, rt->vtype);
    int steps = o->steps;
    double chat_start = 0;  // tok/s counts the time after the first step, as in generate
    while (pos < steps) {
        if (pos == 1) chat_start = now_seconds();
        if (user_turn) {
            if (pos == 0 && !o->system_prompt) {
                if (!read_line("Enter system prompt (optional): ", &system_line, &system_cap)) break;
                system_prompt = system_line;
            }
            const char *user_prompt = o->prompt;
            if (pos != 0 || !o->prompt) {
                if (!read_line("User: ", &user_line, &user_cap)) break;
                user_prompt = user_line;
            }
            char *rendered = render_turn(c->chat_template, pos == 0, system_prompt, user_prompt);
            free(prompt_ids);
            prompt_ids = xmalloc((strlen(rendered) + 3) * sizeof(int));
            // Llama-2-chat starts every turn with BOS; ChatML's turns start with their own marker
            encode(&rt->tok, rendered, c->bos_id, c->chat_template == 0, prompt_ids, &n_prompt);
            free(rendered);
            if (pos + n_prompt > c->seq_len)
                die("chat: this turn (%d tokens) does not fit in the remaining context (%d of %d positions)",
                    n_prompt, c->seq_len - pos, c->seq_len);
            user_idx = 0;
            user_turn = 0;
            printf("Assistant: ");
        }
        int from_prompt = user_idx < n_prompt;
        token = from_prompt ? prompt_ids[user_idx++] : next;
        if (!from_prompt && token == c->eos_id) user_turn = 1;  // ChatML prompts contain eos themselves
        float *logits = forward(&rt->model, &s, &kv, &rt->rope, token, pos);
        next = sample(sampler, logits);
        pos++;
        if (user_idx >= n_prompt && next != c->eos_id) {
            print_piece(&rt->tok, c->bos_id, token, next);
            fflush(stdout);
        }
        if (next == c->eos_id) printf("\n");
    }
    printf("\n");
    if (chat_start > 0 && pos > 1) fprintf(stderr, "achieved tok/s: %f\n", (pos - 1) / (now_seconds() - chat_start));
    report_kv_memory(&kv, c, pos);
    free(prompt_ids);
    free(system_line);
    free(user_line);
    run_state_free(&s);
    kv_cache_free(&kv);
}

static char *read_file(const char *path, size_t *len_out) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open %s: %s", path, strerror(errno));
    size_t cap = 1 << 16, len = 0, got;
    char *buf = xmalloc(cap + 1);
    while ((got = fread(buf + len, 1, cap - len, f)) > 0) {
        len += got;
        if (len == cap) {
            cap *= 2;
            buf = realloc(buf, cap + 1);
            if (!buf) die("out of memory reading %s", path);
        }
    }
    if (ferror(f)) die("error reading %s", path);
    fclose(f);
    buf[len] = '\0';
    if (strlen(buf) != len) die("%s contains NUL bytes: not a text file", path);
    *len_out = len;
    return buf;
}

// The token stream a perplexity run scores: the text's ids (no BOS), or ids given directly.
static int *read_eval_tokens(const Runtime *rt, const Options *o, int *n_out) {
    size_t len;
    char *text = read_file(o->text_file, &len);
    int *ids = xmalloc((len + 3) * sizeof(int)), n = 0;
    if (o->ids_input) {
        char *p = text, *end;
        for (;;) {
            while (isspace((unsigned char)*p)) p++;
            if (!*p) break;
            errno = 0;
            long v = strtol(p, &end, 10);
            if (end == p || errno || v < 0 || v >= rt->model.cfg.vocab_size)
                die("%s: token id #%d is not an integer in [0, %d)", o->text_file, n + 1, rt->model.cfg.vocab_size);
            ids[n++] = (int)v;
            p = end;
        }
    } else {
        encode(&rt->tok, text, rt->model.cfg.bos_id, 0, ids, &n);
    }
    free(text);
    if (n < 1) die("%s holds no tokens to score", o->text_file);
    *n_out = n;
    return ids;
}

// log p(target) from logits, and KL(p_ref || p) when ref is given; in double.
static double log_prob(const float *logits, int n, int target) {
    check_logits(logits, n);
    double max = logits[0], sum = 0.0;
    for (int i = 1; i < n; i++) if (logits[i] > max) max = logits[i];
    for (int i = 0; i < n; i++) sum += exp(logits[i] - max);
    return logits[target] - max - log(sum);
}

static double kl_divergence(const float *ref, const float *logits, int n) {
    double mr = ref[0], ml = logits[0], sr = 0.0, sl = 0.0, kl = 0.0;
    for (int i = 1; i < n; i++) { if (ref[i] > mr) mr = ref[i]; if (logits[i] > ml) ml = logits[i]; }
    for (int i = 0; i < n; i++) { sr += exp(ref[i] - mr); sl += exp(logits[i] - ml); }
    double lsr = log(sr), lsl = log(sl);
    for (int i = 0; i < n; i++) {
        double lp = ref[i] - mr - lsr, lq = logits[i] - ml - lsl;
        kl += exp(lp) * (lp - lq);
    }
    return kl;
}


static void perplexity(Runtime *rt, const Options *o) {
    const Config *c = &rt->model.cfg;
    int n_tokens;
    int *ids = read_eval_tokens(rt, o, &n_tokens);
    int window = o->length > 0 ? o->length : c->seq_len;
    int chunk = window - 1;
    RunState s, ref_s;
    KVCache kv, ref_kv;
    KVType fp32;
    parse_kv_type("fp32", &fp32);
    run_state_init(&s, c);
    new_cache(rt, o, &kv, rt->ktype, rt->vtype);
    if (o->kl) {
        run_state_init(&ref_s, c);
        new_cache(rt, o, &ref_kv, fp32, fp32);
    }
    FILE *logits_out = open_logits(o);

    double nll = 0.0, kl = 0.0;
    long scored = 0;
    double t0 = now_seconds(), last_report = t0;
    for (int start = 0; start < n_tokens; start += chunk) {
        int len = n_tokens - start < chunk ? n_tokens - start : chunk;
        // window: bos, ids[start .. start+len-1]; step j predicts ids[start + j]
        int token = c->bos_id;
        for (int j = 0; j <= len; j++) {
            float *logits = forward(&rt->model, &s, &kv, &rt->rope, token, j);
            write_logits(logits_out, logits, c->vocab_size);
            if (j == len) break;  // the last token's prediction lies outside the window
            int target = ids[start + j];
            nll -= log_prob(logits, c->vocab_size, target);
            if (o->kl) {
                float *ref = forward(&rt->model, &ref_s, &ref_kv, &rt->rope, token, j);
                kl += kl_divergence(ref, logits, c->vocab_size);
            }
            scored++;
            token = target;
        }
        double now = now_seconds();
        if (now - last_report > 1.0 || start + chunk >= n_tokens) {
            fprintf(stderr, "\rppl: %ld/%d tokens, ppl %.4f, %.0f tok/s   ", scored, n_tokens,
                    exp(nll / scored), scored / (now - t0));
            last_report = now;
        }
    }
    fprintf(stderr, "\n");
    char label[64];
    kv_type_label(label, sizeof label, &rt->ktype, &rt->vtype);
    double bytes = kv_store_bytes_per_token(&kv.k) + kv_store_bytes_per_token(&kv.v);
    double fp32_bytes = 2.0 * 4 * kv_dim_of(c) * c->n_layers;
    printf("type=%s bits_per_channel=%.3f kv_bytes_per_token=%.1f ratio_fp32=%.4f tokens=%ld nll=%.6f ppl=%.6f",
           label, (kv_type_bits(&rt->ktype) + kv_type_bits(&rt->vtype)) / 2, bytes, bytes / fp32_bytes,
           scored, nll / scored, exp(nll / scored));
    if (o->kl) printf(" kl=%.6f", fmax(kl / scored, 0.0));  // KL >= 0; rounding can leave -1e-12
    printf("\n");
    if (logits_out) fclose(logits_out);
    free(ids);
    run_state_free(&s);
    kv_cache_free(&kv);
    if (o->kl) { run_state_free(&ref_s); kv_cache_free(&ref_kv); }
}

// Standard normal numbers from the xorshift* generator (Box-Muller), for filling caches.
static float random_normal(uint64_t *state) {
    float u1 = (random_u32(state) + 1.0f) / 4294967296.0f, u2 = random_f32(state);
    return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853f * u2);
}

/* Round trip of one cache line between threads 0 and 1, in ns (0 without two threads).  On a
   virtual machine the host may put the two virtual CPUs on neighbouring cores or far apart, and
   that moves the 2-thread figures (README.md, "Two placements"); bench prints it so that each run
   says which placement it had.  Gives up after a second (a thread that never gets a CPU). */
static double core_round_trip_ns(void) {
    double ns = 0.0;
#ifdef _OPENMP
    if (omp_get_max_threads() < 2) return ns;
    static int ball, give_up;
    const int trips = 20000;
    ball = give_up = 0;
#pragma omp parallel num_threads(2)
    if (omp_get_num_threads() == 2) {
        int me = omp_get_thread_num();
        double t0 = omp_get_wtime();
        for (int i = 0; i < trips; i++) {
            if (me == 0) __atomic_store_n(&ball, 2 * i + 1, __ATOMIC_RELEASE);  // serve ...
            int want = me == 0 ? 2 * i + 2 : 2 * i + 1;                         // ... and wait for the return
            for (long spin = 1; __atomic_load_n(&ball, __ATOMIC_ACQUIRE) != want; spin++)
                if (spin % 4096 == 0 && (__atomic_load_n(&give_up, __ATOMIC_RELAXED) || omp_get_wtime() - t0 > 1.0)) {
                    __atomic_store_n(&give_up, 1, __ATOMIC_RELAXED);
                    break;
                }
            if (__atomic_load_n(&give_up, __ATOMIC_RELAXED)) break;
            if (me == 1) __atomic_store_n(&ball, 2 * i + 2, __ATOMIC_RELEASE);
        }
        if (me == 0 && !__atomic_load_n(&give_up, __ATOMIC_RELAXED)) ns = 1e9 * (omp_get_wtime() - t0) / trips;
    }
#endif
    return ns;
}

/* Decode speed at context L: positions 0 .. L-n-1 are filled with random keys and values
   (the cache's content does not change the work a step does), then n decode steps run at
   positions L-n .. L-1 and are timed; the last step attends to all L positions. */
static void benchmark(Runtime *rt, const Options *o) {
    const Config *c = &rt->model.cfg;
    int context = o->length > 0 ? o->length : (c->seq_len < 1024 ? c->seq_len : 1024);
    int steps = o->steps_given ? o->steps : 16;
    if (steps < 1 || steps > context) die("bench: -n must be in [1, %d] for a context of %d", context, context);
    RunState s;
    KVCache kv;
    run_state_init(&s, c);
    new_cache(rt, o, &kv, rt->ktype, rt->vtype);
    int KD = kv_dim_of(c), fill = context - steps;
    double t0 = now_seconds();
    // layers are independent, so they are filled in parallel, each from its own random stream
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic)
#endif
    for (int l = 0; l < c->n_layers; l++) {
        uint64_t rng = 42 + l;
        float *k = xmalloc(KD * sizeof(float)), *v = xmalloc(KD * sizeof(float));
        for (int pos = 0; pos < fill; pos++) {
            for (int i = 0; i < KD; i++) { k[i] = random_normal(&rng); v[i] = random_normal(&rng); }
            kv_append(&kv, l, pos, k, v);
        }
        free(k); free(v);
        if (thread_id() == 0) fprintf(stderr, "\rbench: filling the cache, layer %d/%d", l + 1, c->n_layers);
    }
    double fill_time = now_seconds() - t0;
    kv.seconds = 0;
    if (fill > 0) fprintf(stderr, "\rbench: filled %d positions in %.1f s\n", fill, fill_time);
    int token = c->bos_id;
    double rtt_before = core_round_trip_ns();
    double start = now_seconds(), cpu_start = cpu_seconds();
    for (int pos = fill; pos < context; pos++) {
        float *logits = forward(&rt->model, &s, &kv, &rt->rope, token, pos);
        token = argmax(logits, c->vocab_size);
    }
    double elapsed = now_seconds() - start, cpu = cpu_seconds() - cpu_start;
    double rtt_after = core_round_trip_ns();
    char label[64];
    kv_type_label(label, sizeof label, &rt->ktype, &rt->vtype);
    double bytes = kv_store_bytes_per_token(&kv.k) + kv_store_bytes_per_token(&kv.v);
    int threads = max_threads();
    printf("type=%s threads=%d context=%d steps=%d tok_per_s=%.2f ms_per_token=%.3f attention_ms=%.3f "
           "cpu_ms_per_token=%.3f kv_bytes_per_token=%.1f kv_bytes_total=%.0f core_rtt_ns=%.0f,%.0f\n",
           label, threads, context, steps, steps / elapsed, 1000 * elapsed / steps, 1000 * kv.seconds / steps,
           1000 * cpu / steps, bytes, bytes * context, rtt_before, rtt_after);
    run_state_free(&s);
    kv_cache_free(&kv);
}

// -m decode: prints the text of the ids in -f (whitespace-separated), as generation prints it.
static void print_decoding(Runtime *rt, const Options *o) {
    int n;
    int *ids = read_eval_tokens(rt, o, &n);
    for (int i = 0; i < n; i++) print_piece(&rt->tok, rt->model.cfg.bos_id, i ? ids[i - 1] : -1, ids[i]);
    free(ids);
}

// -m encode: prints the ids of the prompt (-i) or of a file (-f), BOS first.  With --lines,
// every line of the file is encoded on its own (without its newline) and printed without BOS.
static void print_encoding(Runtime *rt, const Options *o) {
    size_t len;
    char *text = o->text_file ? read_file(o->text_file, &len) : strdup(o->prompt ? o->prompt : "");
    int *ids = xmalloc((strlen(text) + 3) * sizeof(int)), n;
    char *line = text;
    do {
        char *newline = o->lines ? strchr(line, '\n') : NULL;
        if (newline) *newline = '\0';
        encode(&rt->tok, line, rt->model.cfg.bos_id, !o->lines, ids, &n);
        for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
        printf("\n");
        line = newline ? newline + 1 : NULL;
    } while (line && *line);
    free(ids);
    free(text);
}

/* ==========================================================================================
   8. Command line
   ========================================================================================== */

static void usage(FILE *f) {
    fprintf(f,
        "Usage:   run <checkpoint> [options]\n"
        "Example: run model.bin -k cq1 -n 256 -i \"Once upon a time\"\n"
        "Options:\n"
        "  -t <float>  temperature in [0,inf), default 1.0 (0 = greedy)\n"
        "  -p <float>  top-p in [0,1], default 0.9 (0 or 1 = plain sampling)\n"
        "  -s <int>    random seed, default: time\n"
        "  -n <int>    steps including the prompt, default 256, 0 = the model's context\n"
        "  -i <string> prompt\n"
        "  -z <path>   tokenizer, default tokenizer.bin\n"
        "  -m <mode>   generate (default) | chat | ppl | bench | encode | decode\n"
        "  -y <string> system prompt (chat)\n"
        "  -k <type>   KV cache type, or KEYTYPE:VALUETYPE; default fp32\n"
        "              types: fp32 fp16 q8 q4 q2 q1 kivi4 kivi2 cq4 cq2 cq1 cq<c>c<b>b\n"
        "              (cq4 = cq2c8b, cq2 = cq4c8b, cq1 = cq8c8b: b/c bits per channel)\n"
        "  -w <int>    keep the newest N tokens in full precision, default 0 (at most the context)\n"
        "  -c <path>   CQ centroid file, default <checkpoint minus .bin>.<c>c<b>b.cent\n"
        "  -f <path>   ppl/encode: input text file; decode: token ids\n"
        "  -l <int>    ppl: window length (default the model's context); bench: context length\n"
        "  --ids       ppl: -f holds whitespace-separated token ids instead of text\n"
        "  --kl        ppl: also report mean KL(p_fp32 || p_type) over scored tokens\n"
        "  --lines     encode: encode each line of -f on its own, print one line of ids each\n"
        "  --logits <path>  write the float32 logits of every forward step to a file\n"
        "  --cq-keys auto|lut|decode  how CQ keys are scored: precomputed query-centroid\n"
        "              products (lut) or decode+rotate+dot (decode; auto = decode, measured faster)\n"
        "  -h, --help  this text\n");
}

static int parse_int(const char *flag, const char *s) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end || errno || v < INT_MIN || v > INT_MAX)
        die("%s expects an integer, got '%s'", flag, s);
    return (int)v;
}

static long long parse_ll(const char *flag, const char *s) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (end == s || *end || errno) die("%s expects an integer, got '%s'", flag, s);
    return v;
}

static float parse_float(const char *flag, const char *s) {
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (end == s || *end || errno || !is_finite_float(v)) die("%s expects a number, got '%s'", flag, s);
    return v;
}

static void parse_args(int argc, char **argv, Options *o) {
    *o = (Options){.tokenizer = "tokenizer.bin", .mode = "generate", .kv_spec = "fp32",
                   .temperature = 1.0f, .topp = 0.9f, .steps = 256};
    if (argc >= 2 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))) { usage(stdout); exit(0); }
    if (argc < 2) { usage(stderr); die("no checkpoint given"); }
    o->checkpoint = argv[1];
    if (o->checkpoint[0] == '-') die("the first argument must be the checkpoint, not the flag %s", argv[1]);
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); exit(0); }
        if (!strcmp(a, "--ids")) { o->ids_input = 1; continue; }
        if (!strcmp(a, "--kl")) { o->kl = 1; continue; }
        if (!strcmp(a, "--lines")) { o->lines = 1; continue; }
        int takes_value = !strcmp(a, "--logits") || !strcmp(a, "--cq-keys") || (a[0] == '-' && a[1] && !a[2] && strchr("tpsnizmykwcfl", a[1]));
        if (!takes_value) die("unknown option '%s' (see --help)", a);
        if (i + 1 >= argc) die("option %s needs a value", a);
        const char *v = argv[++i];
        if (!strcmp(a, "--logits")) { o->logits_file = v; continue; }
        if (!strcmp(a, "--cq-keys")) {
            if (!strcmp(v, "auto")) o->cq_key_path = CQ_KEYS_AUTO;
            else if (!strcmp(v, "lut")) o->cq_key_path = CQ_KEYS_LUT;
            else if (!strcmp(v, "decode")) o->cq_key_path = CQ_KEYS_DECODE;
            else die("--cq-keys expects auto, lut or decode, got '%s'", v);
            continue;
        }
        switch (a[1]) {
        case 't': o->temperature = parse_float(a, v); break;
        case 'p': o->topp = parse_float(a, v); break;
        case 's': o->seed = parse_ll(a, v); break;
        case 'n': o->steps = parse_int(a, v); o->steps_given = 1; break;
        case 'i': o->prompt = v; break;
        case 'z': o->tokenizer = v; break;
        case 'm': o->mode = v; break;
        case 'y': o->system_prompt = v; break;
        case 'k': o->kv_spec = v; break;
        case 'w': o->window = parse_int(a, v); break;
        case 'c': o->centroids = v; break;
        case 'f': o->text_file = v; break;
        case 'l': o->length = parse_int(a, v); break;
        }
    }
    const char *modes[] = {"generate", "chat", "ppl", "bench", "encode", "decode"};
    int known = 0;
    for (size_t i = 0; i < sizeof modes / sizeof *modes; i++) known |= !strcmp(o->mode, modes[i]);
    if (!known) die("unknown mode '%s' (generate, chat, ppl, bench, encode, decode)", o->mode);
    if (!strcmp(o->mode, "decode")) o->ids_input = 1;  // decode reads ids, like ppl --ids
    if (!strcmp(o->mode, "decode") && !o->text_file) die("-m decode needs -f FILE of token ids");
    if (o->temperature < 0) die("-t must be >= 0, got %g", o->temperature);
    if (o->topp < 0 || o->topp > 1) die("-p must be in [0, 1], got %g", o->topp);
    if (o->steps < 0) die("-n must be >= 0, got %d", o->steps);
    if (o->window < 0) die("-w must be >= 0, got %d", o->window);
    if (!strcmp(o->mode, "ppl") && !o->text_file) die("-m ppl needs -f FILE");
    if (o->ids_input && strcmp(o->mode, "ppl") && strcmp(o->mode, "decode")) die("--ids only applies to -m ppl");
    if (o->kl && strcmp(o->mode, "ppl")) die("--kl only applies to -m ppl");
    if (o->lines && (strcmp(o->mode, "encode") || !o->text_file)) die("--lines only applies to -m encode -f FILE");
}

// "-k K" or "-k K:V"
static void parse_kv_spec(const char *spec, KVType *k, KVType *v) {
    char buf[64];
    if (strlen(spec) >= sizeof buf) die("-k value too long: '%s'", spec);
    strcpy(buf, spec);
    char *colon = strchr(buf, ':');
    if (colon) *colon = '\0';
    const char *kname = buf, *vname = colon ? colon + 1 : buf;
    if (!parse_kv_type(kname, k)) die("unknown KV cache type '%s' (see --help for the types)", kname);
    if (!parse_kv_type(vname, v)) die("unknown KV cache type '%s' (see --help for the types)", vname);
}

int main(int argc, char **argv) {
    Options o;
    parse_args(argc, argv, &o);
    Runtime rt;
    memset(&rt, 0, sizeof rt);
    parse_kv_spec(o.kv_spec, &rt.ktype, &rt.vtype);
    load_model(&rt.model, o.checkpoint);
    const Config *c = &rt.model.cfg;
    if (o.steps == 0 || o.steps > c->seq_len) o.steps = c->seq_len;
    if (o.window > c->seq_len) o.window = c->seq_len;  // a window longer than the context is the context
    if (o.length && (o.length < 2 || o.length > c->seq_len))
        die("-l must be in [2, %d] (the model's context), got %d", c->seq_len, o.length);
    if (!strcmp(o.mode, "ppl") && c->seq_len < 2)  // a window is BOS plus at least one scored token
        die("-m ppl needs a context of at least 2 positions; this model's is %d", c->seq_len);
    int needs_tokenizer = strcmp(o.mode, "bench") && !(strcmp(o.mode, "ppl") == 0 && o.ids_input);
    if (needs_tokenizer) load_tokenizer(&rt.tok, o.tokenizer, c->vocab_size, c->tokenizer_kind);
    rope_init(&rt.rope, c);

    if (!strcmp(o.mode, "encode")) {
        print_encoding(&rt, &o);
    } else if (!strcmp(o.mode, "decode")) {
        print_decoding(&rt, &o);
    } else if (!strcmp(o.mode, "ppl")) {
        perplexity(&rt, &o);
    } else if (!strcmp(o.mode, "bench")) {
        benchmark(&rt, &o);
    } else {
        Sampler sampler = {c->vocab_size, xmalloc(c->vocab_size * sizeof(ProbIndex)), o.temperature, o.topp,
                           o.seed > 0 ? (uint64_t)o.seed : (uint64_t)time(NULL)};
        if (!strcmp(o.mode, "generate")) generate(&rt, &sampler, &o);
        else chat(&rt, &sampler, &o);
        free(sampler.candidates);
    }
    rope_free(&rt.rope);
    free_tokenizer(&rt.tok);
    free_model(&rt.model);
    return 0;
}
