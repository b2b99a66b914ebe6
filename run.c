/* run.c: inference of LLaMA-family models with a Coupled-Quantization (CQ) KV cache.

   One file, read top to bottom:
     1. configuration and checkpoint loading (llama2.c legacy files, our "CQKV" files, random:)
     2. tokenizer (llama2.c's tokenizer.bin, byte-level BPE)
     3. sampler (greedy, temperature, top-p, xorshift* RNG)
     4. what every compute path shares: RoPE angles, KV cache types, CQ codebooks
     5. the Decoder: the one interface between this host program and a compute path
     6. math on the CPU (RMSNorm, matrix-vector products, RoPE)
     7. the KV cache on the CPU: storage, the reference CQ attention, then the fast kernels
     8. the forward pass and the CPU Decoder
     9. generation, chat, perplexity, benchmark
    10. command line
   Sections 6-8 are the CPU's compute.  run.cu defines RUN_HOST_ONLY, includes this file for
   everything else and implements section 5's Decoder on an NVIDIA GPU.
   The cache is given keys BEFORE RoPE, and each cache type decides when to apply RoPE: when it
   stores them (fp32 and the scalar types, as llama2.c does) or when it reads them (CQ, as the
   paper does).

   Build: make (OpenMP, -Ofast -march=native); make run-noomp (no OpenMP); make runcu (CUDA).
   The file is C11 and also compiles as C++ (run.cu includes it).  */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
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
#define OMP(...) _Pragma(#__VA_ARGS__)  // an OpenMP directive: OMP(omp for) is #pragma omp for
#else                                   // one thread, and no unknown-pragma warnings
#define OMP(...)
static inline int omp_get_max_threads(void) { return 1; }
static inline int omp_get_num_threads(void) { return 1; }
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_in_parallel(void) { return 0; }
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

#define NEW(type, n) ((type *)xmalloc((size_t)(n) * sizeof(type)))  // n zeroed elements

/* Big buffers that every token reads (weights, cache rows, codebooks) ask for 2 MB pages (a hint):
   4 KB pages miss the TLB every 4 KB (docs/PERF.md).  Zeroed; under ASan they come from xmalloc. */
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
    char *base = (char *)mmap(NULL, size + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
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

static double clock_seconds(clockid_t clock) {
    struct timespec t;
    clock_gettime(clock, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static double now_seconds(void) { return clock_seconds(CLOCK_MONOTONIC); }
static double cpu_seconds(void) { return clock_seconds(CLOCK_PROCESS_CPUTIME_ID); }  // all threads

/* xorshift*: the sampler's generator, also used for random models and bench fills. */
static uint32_t random_u32(uint64_t *state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}

static float random_f32(uint64_t *state) { return (random_u32(state) >> 8) / 16777216.0f; }

// Standard normal numbers (Box-Muller).
static float random_normal(uint64_t *state) {
    float u1 = (random_u32(state) + 1.0f) / 4294967296.0f, u2 = random_f32(state);
    return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853f * u2);
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

typedef struct {        // all float32, row-major (out, in), in file order (docs/FORMATS.md)
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
    int random;        // a random: model: no file; each compute path makes random weights itself
    int bf16;          // random: models: the GPU keeps the weights in bf16 (for the batched bench)
} Model;

#define CQKV_MAGIC 0x564B5143u  // "CQKV"
#define MAX_HEAD_SIZE 1024
#define CQKV_HEADER_BYTES 256
#define LEGACY_HEADER_BYTES 28

static int kv_dim_of(const Config *c) { return c->n_kv_heads * c->head_size; }
static int q_dim_of(const Config *c) { return c->n_heads * c->head_size; }

/* The weights in file order: where each tensor's pointer goes, its floats, and its input width
   (random weights are N(0, 1/in); 0: a norm, all ones).  A shared classifier takes no floats.
   Returns the number of floats (without llama2.c's two obsolete RoPE tables). */
#define N_TENSORS 12
typedef struct { float **at; uint64_t n, in; } Tensor;

static uint64_t weight_tensors(const Config *c, Weights *w, Tensor t[N_TENSORS]) {
    uint64_t D = c->dim, F = c->hidden_dim, L = c->n_layers, V = c->vocab_size, QD = q_dim_of(c), KD = kv_dim_of(c);
    Tensor all[N_TENSORS] = {
        {&w->token_embedding, V * D, 1}, {&w->attn_norm, L * D, 0}, {&w->wq, L * QD * D, D},
        {&w->wk, L * KD * D, D}, {&w->wv, L * KD * D, D}, {&w->wo, L * D * QD, QD}, {&w->ffn_norm, L * D, 0},
        {&w->w1, L * F * D, D}, {&w->w2, L * D * F, F}, {&w->w3, L * F * D, D}, {&w->final_norm, D, 0},
        {&w->classifier, c->shared_classifier ? 0 : V * D, D}};
    memcpy(t, all, sizeof all);
    uint64_t floats = 0;
    for (int i = 0; i < N_TENSORS; i++) floats += t[i].n;
    return floats;
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
    if (c->tokenizer_kind != 0 && c->tokenizer_kind != 1) die("%s: unknown tokenizer kind %d", path, c->tokenizer_kind);
    if (c->chat_template != 0 && c->chat_template != 1) die("%s: unknown chat template %d", path, c->chat_template);
}

static void parse_random_model(Model *m, const char *spec);

static void load_model(Model *m, const char *path) {
    memset(m, 0, sizeof *m);
    if (!strncmp(path, "random:", 7)) { parse_random_model(m, path + 7); return; }
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
    const int32_t *h = (const int32_t *)data;
    size_t header_bytes;
    uint64_t extra_floats = 0;  // legacy files carry two unused RoPE tables before the classifier
    if ((uint32_t)h[0] == CQKV_MAGIC) {
        if (size < CQKV_HEADER_BYTES) die("%s: truncated header", path);
        if (h[1] != 1) die("%s: CQKV version %d is not supported (this program reads version 1)", path, h[1]);
        c->dim = h[2]; c->hidden_dim = h[3]; c->n_layers = h[4]; c->n_heads = h[5];
        c->n_kv_heads = h[6]; c->vocab_size = h[7]; c->seq_len = h[8]; c->head_size = h[9];
        memcpy(&c->rope_theta, &h[10], 4); memcpy(&c->norm_eps, &h[11], 4);
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
            die("%s: dim %d is not a multiple of n_heads %d (or this is not a checkpoint)", path, c->dim, c->n_heads);
        c->rope_theta = 10000.0f; c->norm_eps = 1e-5f; c->bos_id = 1; c->eos_id = 2;
        header_bytes = LEGACY_HEADER_BYTES;
        if (c->seq_len > 0 && c->head_size > 0) extra_floats = (uint64_t)c->seq_len * c->head_size;
    }
    check_config(c, path);

    // Validate the size before touching any weight.
    Tensor t[N_TENSORS];
    uint64_t want = header_bytes + 4 * (weight_tensors(c, &m->w, t) + extra_floats);
    if (size < want)
        die("%s: truncated: %zu bytes, but the header (dim %d, %d layers, vocab %d) needs %llu", path,
            size, c->dim, c->n_layers, c->vocab_size, (unsigned long long)want);
    if (size > want)
        die("%s: %zu bytes, but the header (dim %d, %d layers, vocab %d) needs exactly %llu: wrong format?",
            path, size, c->dim, c->n_layers, c->vocab_size, (unsigned long long)want);

    float *p = (float *)((char *)data + header_bytes);
    for (int i = 0; i < N_TENSORS; i++) {
        if (i == N_TENSORS - 1) p += extra_floats;  // the classifier comes after the RoPE tables
        *t[i].at = p;
        p += t[i].n;
    }
    if (c->shared_classifier) m->w.classifier = m->w.token_embedding;
}

/* "random:PRESET[,key=value...]": a model of that shape with random weights, for benchmarks of
   large shapes (nothing is read; -m bench needs no tokenizer), e.g. one layer at 128K:
   random:llama2-7b,layers=1,seq_len=131072.  The flag bf16 (GPU only) keeps weights in bf16. */
static void parse_random_model(Model *m, const char *spec) {
    Config *c = &m->cfg;
    char buf[256];
    if (strlen(spec) >= sizeof buf) die("random model spec too long: '%s'", spec);
    strcpy(buf, spec);
    m->random = 1;
    c->rope_theta = 10000.0f; c->norm_eps = 1e-5f; c->bos_id = 1; c->eos_id = 2;
    c->shared_classifier = 1;
    for (char *item = strtok(buf, ","); item; item = strtok(NULL, ",")) {
        char *eq = strchr(item, '=');
        if (!eq) {
            if (!strcmp(item, "bf16")) { m->bf16 = 1; continue; }
            if (!strcmp(item, "smollm2-135m")) {
                c->dim = 576; c->hidden_dim = 1536; c->n_layers = 30; c->n_heads = 9; c->n_kv_heads = 3;
                c->vocab_size = 49152; c->seq_len = 8192; c->rope_theta = 100000.0f; c->eos_id = 2;
            } else if (!strcmp(item, "llama2-7b")) {
                c->dim = 4096; c->hidden_dim = 11008; c->n_layers = 32; c->n_heads = 32; c->n_kv_heads = 32;
                c->vocab_size = 32000; c->seq_len = 4096; c->shared_classifier = 0;
            } else die("random:%s: unknown preset '%s' (smollm2-135m, llama2-7b, or bf16)", spec, item);
            c->head_size = c->dim / c->n_heads;
            continue;
        }
        *eq = '\0';
        const char *keys[] = {"dim", "hidden", "layers", "heads", "kv_heads", "head_size", "vocab", "seq_len", "theta"};
        int *fields[] = {&c->dim, &c->hidden_dim, &c->n_layers, &c->n_heads, &c->n_kv_heads, &c->head_size,
                         &c->vocab_size, &c->seq_len, NULL};
        int k = 0;
        while (k < 9 && strcmp(item, keys[k])) k++;
        if (k == 9) die("random:%s: unknown key '%s' (dim hidden layers heads kv_heads head_size vocab seq_len theta)", spec, item);
        char *end;
        errno = 0;
        double v = strtod(eq + 1, &end);
        if (end == eq + 1 || *end || errno || v <= 0 || v > INT_MAX || (fields[k] && v != (int)v))
            die("random:%s: %s must be a positive number, got '%s'", spec, item, eq + 1);
        if (fields[k]) *fields[k] = (int)v;
        else c->rope_theta = (float)v;
        if (!strcmp(item, "dim") || !strcmp(item, "heads"))  // head_size follows unless given after
            c->head_size = c->n_heads > 0 ? c->dim / c->n_heads : 0;
    }
    check_config(c, "random model");
}

static void free_model(Model *m) { huge_free(m->file, m->file_size); }

/* ==========================================================================================
   2. Tokenizer: llama2.c's tokenizer.bin (sentencepiece-style BPE merged by piece score) and
      GPT-2-style byte-level BPE (merged by rank), in one file format
   ========================================================================================== */

/* File (docs/FORMATS.md): uint32 max_token_length, then per id: float score, int32 length, the
   piece's bytes.  Byte-level files append "BPE1", the pre-tokenizer, the merges in rank order,
   the special tokens and a Unicode class table (from export.py: no Unicode database here). */

#define BPE_MAGIC 0x31455042u  // "BPE1"
#define MAX_PIECE_BYTES 4096
enum { CLASS_OTHER = 0, CLASS_LETTER = 1, CLASS_NUMBER = 2, CLASS_SPACE = 3 };

typedef struct { const char *str; int len, id; } TokenIndex;
// pair: left << 32 | right; 0 marks an empty slot (no pair (0, 0) is stored)
typedef struct { uint64_t pair; int rank, id; } MergeRule;
typedef struct { uint32_t first, last; int32_t cls; } CodeRange;

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

static int compare_tokens(const void *a, const void *b) {  // by bytes, a prefix first
    const TokenIndex *x = (const TokenIndex *)a, *y = (const TokenIndex *)b;
    int c = memcmp(x->str, y->str, x->len < y->len ? x->len : y->len);
    return c ? c : (x->len > y->len) - (x->len < y->len);
}

// Id of the piece with exactly these bytes, or -1.
static int lookup_piece(const Tokenizer *t, const char *s, int len) {
    TokenIndex key = {s, len, 0};
    TokenIndex *hit = (TokenIndex *)bsearch(&key, t->sorted, t->vocab_size, sizeof(TokenIndex), compare_tokens);
    return hit ? hit->id : -1;
}

// Id of the piece whose bytes are piece a's followed by piece b's, or -1.
static int joined_piece(const Tokenizer *t, int a, int b) {
    char buf[2 * MAX_PIECE_BYTES];
    int la = t->vocab_len[a], lb = t->vocab_len[b];
    if ((unsigned)(la + lb) > t->max_token_length) return -1;  // cannot be a piece
    memcpy(buf, t->vocab[a], la);
    memcpy(buf + la, t->vocab[b], lb);
    return lookup_piece(t, buf, la + lb);
}

// The class of a code point (CLASS_*), from the file's Unicode table.
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

/* For error messages: the whole pieces from byte `from` to the end (stop 0) or to a uint32
   `stop` where a piece would begin; -1 when the bytes are not whole pieces. */
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

static void die_other_model(const char *path, long pieces, const char *where, int vocab_size) {
    die("%s has %ld pieces%s, but the checkpoint's vocabulary has %d: the tokenizer belongs to another "
        "model (name the right one with -z)", path, pieces, where, vocab_size);
}

static void load_bpe_tables(Tokenizer *t, FILE *f, long size, const char *path) {
    uint32_t magic;
    read_exact(&magic, 4, 1, f, path, "byte-level BPE header");
    if (magic != BPE_MAGIC) {
        long more = count_pieces(f, ftell(f) - 4, t->max_token_length, BPE_MAGIC);
        if (more > 0) die_other_model(path, t->vocab_size + more, "", t->vocab_size);
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
    t->merges = NEW(MergeRule, t->merge_slots);
    for (int r = 0; r < n_merges; r++) {
        int32_t lr[2];
        read_exact(lr, 4, 2, f, path, "merges");
        if (lr[0] < 0 || lr[0] >= t->vocab_size || lr[1] < 0 || lr[1] >= t->vocab_size || (lr[0] == 0 && lr[1] == 0))
            die("%s: merge %d names tokens outside the vocabulary", path, r);
        int id = joined_piece(t, lr[0], lr[1]);
        if (id < 0) die("%s: merge %d (%d, %d) makes a piece that is not in the vocabulary", path, r, lr[0], lr[1]);
        MergeRule *slot = merge_slot(t, pair_key(lr[0], lr[1]));
        if (!slot->pair) {  // a repeated pair keeps its first rank
            MergeRule rule = {pair_key(lr[0], lr[1]), r, id};
            *slot = rule;
        }
    }
    t->n_specials = read_count(f, size, path, "special tokens", t->vocab_size, 4);
    t->specials = NEW(int, t->n_specials);
    read_exact(t->specials, 4, t->n_specials, f, path, "special tokens");
    for (int i = 0; i < t->n_specials; i++) {
        if (t->specials[i] < 0 || t->specials[i] >= t->vocab_size || t->vocab_len[t->specials[i]] == 0)
            die("%s: special token %d is not a piece of the vocabulary", path, t->specials[i]);
        for (int j = i; j > 0 && t->vocab_len[t->specials[j]] > t->vocab_len[t->specials[j - 1]]; j--) {
            int tmp = t->specials[j]; t->specials[j] = t->specials[j - 1]; t->specials[j - 1] = tmp;
        }
    }
    t->n_ranges = read_count(f, size, path, "Unicode ranges", 1 << 22, (int)sizeof(CodeRange));
    t->ranges = NEW(CodeRange, t->n_ranges);
    read_exact(t->ranges, sizeof(CodeRange), t->n_ranges, f, path, "Unicode ranges");
    for (int i = 0; i < t->n_ranges; i++)
        if (t->ranges[i].first > t->ranges[i].last || (i && t->ranges[i].first <= t->ranges[i - 1].last) ||
            t->ranges[i].cls < CLASS_OTHER || t->ranges[i].cls > CLASS_SPACE)
            die("%s: corrupt Unicode table", path);
}

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
    t->vocab = NEW(char *, vocab_size); t->vocab_len = NEW(int, vocab_size);
    t->scores = NEW(float, vocab_size); t->sorted = NEW(TokenIndex, vocab_size);
    read_exact(&t->max_token_length, 4, 1, f, path, "header");
    if (t->max_token_length == 0 || t->max_token_length > MAX_PIECE_BYTES)
        die("%s: max_token_length %u is implausible; is this a tokenizer.bin?", path, t->max_token_length);
    long pos = 4;
    int tables_at = -1;  // byte-level: the first piece whose score reads as "BPE1" (tables too early?)
    for (int i = 0; i < vocab_size; i++) {
        int32_t len = 0;
        if (pos == size) die_other_model(path, i, "", vocab_size);
        if (fread(&t->scores[i], 4, 1, f) != 1 || fread(&len, 4, 1, f) != 1 || len < 0 ||
            (unsigned)len > t->max_token_length || size - pos - 8 < len) {
            if (tables_at >= 0) die_other_model(path, tables_at, " before its byte-level BPE tables", vocab_size);
            if (size - pos < 8 || (len >= 0 && (unsigned)len <= t->max_token_length))
                die("%s: truncated at token %d of %d (does the tokenizer belong to this model?)", path, i, vocab_size);
            die("%s: token %d has length %d (max %u): corrupt tokenizer", path, i, len, t->max_token_length);
        }
        uint32_t score_bits;
        memcpy(&score_bits, &t->scores[i], 4);
        if (kind == 1 && tables_at < 0 && score_bits == BPE_MAGIC) tables_at = i;
        t->vocab[i] = NEW(char, len + 1);
        if (len > 0 && fread(t->vocab[i], len, 1, f) != 1) die("%s: read error at token %d", path, i);
        t->vocab[i][len] = '\0';
        t->vocab_len[i] = len;
        TokenIndex entry = {t->vocab[i], len, i};
        t->sorted[i] = entry;
        pos += 8 + len;
    }
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
        if (end != size) die("%s: %ld bytes follow the byte-level BPE tables: corrupt tokenizer", path, size - end);
    } else if (pos != size) {
        long more = count_pieces(f, pos, t->max_token_length, 0);
        if (more > 0) die_other_model(path, vocab_size + more, "", vocab_size);
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

/* BPE merging.  llama2.c rescans the sequence after every merge, O(n^2): hopeless for a
   perplexity file of a million characters.  The same merges come from a heap of candidate pairs,
   best priority first and leftmost on ties, over a linked list of symbols; a candidate whose
   symbols changed since it was pushed is skipped.  Priority: the merged piece's score (kind 0)
   or minus the merge's rank (kind 1). */

typedef struct { float score; int left; int right_version; int left_version; int id; } MergeCand;
typedef struct { MergeCand *a; int n, cap; } MergeHeap;

static int cand_before(const MergeCand *x, const MergeCand *y) {
    return x->score != y->score ? x->score > y->score : x->left < y->left;
}

static void heap_push(MergeHeap *h, MergeCand c) {
    if (h->n == h->cap) {
        h->cap = h->cap ? 2 * h->cap : 64;
        h->a = (MergeCand *)realloc(h->a, h->cap * sizeof(MergeCand));
        if (!h->a) die("out of memory in the tokenizer");
    }
    int i = h->n++;
    while (i > 0 && cand_before(&c, &h->a[(i - 1) / 2])) {  // sift up
        h->a[i] = h->a[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    h->a[i] = c;
}

static MergeCand heap_pop(MergeHeap *h) {
    MergeCand top = h->a[0], last = h->a[--h->n];
    int i = 0, child;
    while ((child = 2 * i + 1) < h->n) {  // sift down
        if (child + 1 < h->n && cand_before(&h->a[child + 1], &h->a[child])) child++;
        if (!cand_before(&h->a[child], &last)) break;
        h->a[i] = h->a[child];
        i = child;
    }
    if (h->n > 0) h->a[i] = last;
    return top;
}

typedef struct { int id, prev, next, version; } Symbol;  // a merged-away symbol has id -1

// Pushes the pair (left, its next symbol) when it can merge.
static void push_pair(const Tokenizer *t, MergeHeap *heap, const Symbol *sym, int left) {
    int right = sym[left].next;
    if (right < 0) return;
    int a = sym[left].id, b = sym[right].id, id;
    float priority;
    if (t->kind == 1) {  // byte-level BPE: only the listed merges, by rank
        MergeRule *rule = merge_slot(t, pair_key(a, b));
        if (!rule->pair) return;
        id = rule->id;
        priority = -(float)rule->rank;
    } else {             // sentencepiece-style: any pair whose concatenation is a piece, by its score
        if ((id = joined_piece(t, a, b)) < 0) return;
        priority = t->scores[id];
    }
    MergeCand cand = {priority, left, sym[right].version, sym[left].version, id};
    heap_push(heap, cand);
}

// Merges the symbol ids in place (count of them), returns the new count.
static int bpe_merge(const Tokenizer *t, int *ids, int count) {
    if (count < 2) return count;
    Symbol *sym = NEW(Symbol, count);
    for (int i = 0; i < count; i++) {
        Symbol si = {ids[i], i - 1, i + 1 < count ? i + 1 : -1, 0};
        sym[i] = si;
    }
    MergeHeap heap = {NULL, 0, 0};
    for (int i = 0; i + 1 < count; i++) push_pair(t, &heap, sym, i);
    while (heap.n > 0) {
        MergeCand c = heap_pop(&heap);
        Symbol *left = &sym[c.left], *right = left->next >= 0 ? &sym[left->next] : NULL;
        if (left->id < 0 || !right || left->version != c.left_version || right->version != c.right_version)
            continue;  // stale: one of the two symbols changed after this candidate was pushed
        left->id = c.id;
        left->version++;
        right->id = -1;
        left->next = right->next;
        if (right->next >= 0) sym[right->next].prev = c.left;
        if (left->prev >= 0) push_pair(t, &heap, sym, left->prev);
        push_pair(t, &heap, sym, c.left);
    }
    int n = 0;
    for (int i = 0; i >= 0; i = sym[i].next) ids[n++] = sym[i].id;
    free(heap.a);
    free(sym);
    return n;
}

/* The ids of one character (code point): its piece, or else its bytes' "<0xHH>" pieces
   (sentencepiece's byte fallback); a vocabulary without them gives one <unk>, id 0, as
   sentencepiece without byte fallback does.  Returns the number of ids written. */
#define UNK_ID 0
static int char_ids(const Tokenizer *t, const char *s, size_t len, int *tokens) {
    int id = lookup_piece(t, s, (int)len);
    if (id >= 0) { tokens[0] = id; return 1; }
    for (size_t j = 0; j < len; j++)
        if (t->byte_piece[(unsigned char)s[j]] < 0) { tokens[0] = UNK_ID; return 1; }
    for (size_t j = 0; j < len; j++) tokens[j] = t->byte_piece[(unsigned char)s[j]];
    return (int)len;
}

// Sentencepiece-style: the ids of text (no BOS); tokens needs room for strlen(text) + 1 ids.
static int encode_sentencepiece(const Tokenizer *t, const char *text, size_t len, int *tokens) {
    // sentencepiece's "dummy prefix": the text is encoded as if it began with a space
    int n = len > 0 ? char_ids(t, " ", 1, tokens) : 0;
    for (size_t i = 0; i < len;) {  // one symbol per UTF-8 code point
        size_t cp_len = 1;
        while (i + cp_len < len && cp_len < 4 && ((unsigned char)text[i + cp_len] & 0xC0) == 0x80) cp_len++;
        n += char_ids(t, text + i, cp_len, tokens + n);
        i += cp_len;
    }
    return bpe_merge(t, tokens, n);
}

/* Byte-level BPE.  The text is cut into "pre-tokens" by GPT-2's pattern
     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
   (after splitting off every number code point when pretokenizer is 1), written out below as a
   scanner over code-point classes; each pre-token's bytes are then merged by rank. */

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
    uint32_t *cp = NEW(uint32_t, len + 1);
    int *start = NEW(int, len + 1);
    unsigned char *cls = NEW(unsigned char, len + 1);
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

// text -> ids (*n of them; the caller frees them).
static int *encode(const Tokenizer *t, const char *text, int bos_id, int add_bos, int *n) {
    size_t len = strlen(text);
    int *tokens = NEW(int, len + 3), b = 0;  // room for the BOS and the encoders' worst case
    if (add_bos) tokens[b++] = bos_id;
    *n = b + (t->kind == 1 ? encode_bytes(t, text, len, tokens + b) : encode_sentencepiece(t, text, len, tokens + b));
    return tokens;
}

/* Prints `token` following `prev_token`.  Sentencepiece-style, as llama2.c: no leading space
   right after BOS, "<0xHH>" prints its byte, and lone control bytes print nothing.
   Byte-level: the piece's bytes as they are (a UTF-8 character may span tokens). */
static void print_piece(const Tokenizer *t, int bos_id, int prev_token, int token) {
    const char *piece = t->vocab[token];
    if (t->kind == 1) { fwrite(piece, 1, t->vocab_len[token], stdout); return; }
    if (prev_token == bos_id && piece[0] == ' ') piece++;
    unsigned int byte;
    char byte_buf[2] = {0};
    if (strlen(piece) == 6 && sscanf(piece, "<0x%02X>", &byte) == 1) {
        byte_buf[0] = (char)byte;
        piece = byte_buf;
    }
    unsigned char b = (unsigned char)piece[0];
    if (!b || (!piece[1] && !isprint(b) && !isspace(b))) return;  // nothing, or a lone control byte
    fputs(piece, stdout);
}

/* ==========================================================================================
   3. Sampler
   ========================================================================================== */

typedef struct { float prob; int index; } ProbIndex;

typedef struct {
    int vocab_size;
    ProbIndex *candidates;  // top-p scratch
    float temperature, topp;
    uint64_t rng_state;
} Sampler;

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
    const ProbIndex *x = (const ProbIndex *)a, *y = (const ProbIndex *)b;
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
    for (int all = 0; all < 2 && n_cand == 0; all++)  // all: none reached it
        for (int i = 0; i < n; i++)
            if (all || probs[i] >= cutoff) {
                ProbIndex c = {probs[i], i};
                cand[n_cand++] = c;
            }
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
   4. What every compute path shares: RoPE angles, KV cache types, CQ codebooks
   ========================================================================================== */

/* RoPE.  Pair i of a head (channels 2i, 2i+1 in llama2.c's interleaved layout) at position t
   is rotated by the angle t * theta^(-2i/hs).  The float expressions are llama2.c's, so outputs
   match it bit for bit; both compute paths read their (cos, sin) from this one table. */
static void rope_angle(const Config *c, int t, int i, float *cs, float *sn) {
    float freq = 1.0f / powf(c->rope_theta, (2 * i) / (float)c->head_size), angle = t * freq;
    *cs = cosf(angle);
    *sn = sinf(angle);
}

// (seq_len, hs): (cos, sin) of every position and pair.
static float *rope_table(const Config *c) {
    float *cs = NEW(float, (size_t)c->seq_len * c->head_size);
    for (int t = 0; t < c->seq_len; t++)
        for (int i = 0; i < c->head_size / 2; i++)
            rope_angle(c, t, i, &cs[(size_t)t * c->head_size + 2 * i], &cs[(size_t)t * c->head_size + 2 * i + 1]);
    return cs;
}

/* KV cache types and their bits per channel (bits of a stored token / channels):
     fp32 32    fp16 16
     q8  8.5    int8 per channel, fp16 scale per block of 32 channels (symmetric)
     q4  5      4-bit, fp16 scale and minimum per block of 32 channels (asymmetric)
     q2  3      2-bit, same scheme
     q1  2      1-bit, same scheme: each channel is its block's minimum or maximum
     kivi4 5, kivi2 3: keys per channel over blocks of 32 tokens (4 or 2 bits, fp16 scale and
                minimum per channel and block; the newest tokens of an unfinished block stay
                fp32 until it fills), values per token as q4 / q2
     cq<c>c<b>b  b/c: one b-bit code per group of c channels (cq4 = 2c8b, cq2 = 4c8b, cq1 = 8c8b)
   Keys and values each have a type (-k K:V).  With -w N the newest N tokens are also kept in
   full precision and read from there. */

typedef enum { KV_FP32, KV_FP16, KV_Q8, KV_Q4, KV_Q2, KV_Q1, KV_KIVI4, KV_KIVI2, KV_CQ } KVKind;

typedef struct {
    KVKind kind;
    int c, b;        // CQ only: channels per group, bits per code
    double bits;     // per channel: a stored token's bits over its channels
    char name[24];   // as printed
} KVType;

#define QBLOCK 32    // channels per block (q types), tokens per block (KIVI keys)

static int parse_kv_type(const char *s, KVType *out) {
    static const struct { const char *name; KVKind kind; int c, b; double bits; } named[] = {  // bits: block scales included
        {"fp32", KV_FP32, 0, 0, 32}, {"fp16", KV_FP16, 0, 0, 16}, {"q8", KV_Q8, 0, 0, 8 + 16.0 / QBLOCK},
        {"q4", KV_Q4, 0, 0, 4 + 32.0 / QBLOCK}, {"q2", KV_Q2, 0, 0, 2 + 32.0 / QBLOCK}, {"q1", KV_Q1, 0, 0, 1 + 32.0 / QBLOCK},
        {"kivi4", KV_KIVI4, 0, 0, 4 + 32.0 / QBLOCK}, {"kivi2", KV_KIVI2, 0, 0, 2 + 32.0 / QBLOCK},
        {"cq4", KV_CQ, 2, 8, 4}, {"cq2", KV_CQ, 4, 8, 2}, {"cq1", KV_CQ, 8, 8, 1}};
    memset(out, 0, sizeof *out);
    snprintf(out->name, sizeof out->name, "%s", s);
    for (size_t i = 0; i < sizeof named / sizeof *named; i++)
        if (!strcmp(s, named[i].name)) {
            out->kind = named[i].kind; out->c = named[i].c; out->b = named[i].b; out->bits = named[i].bits;
            return 1;
        }
    int c, b, used = 0;
    if (sscanf(s, "cq%dc%db%n", &c, &b, &used) != 2 || used != (int)strlen(s)) return 0;
    if (c < 1 || (c & (c - 1))) die("-k %s: c must be a power of two", s);
    if (b < 1 || b > 16) die("-k %s: b must be in [1, 16]", s);
    out->kind = KV_CQ; out->c = c; out->b = b; out->bits = (double)b / c;
    return 1;
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

/* ---- CQ codebooks.  One per (layer, keys or values, group): 2^b centroids of c floats, learned
   offline by export.py centroids.  Files ("CQCB", docs/FORMATS.md) hold, after a 64-byte
   header, float32 codebooks [n_layers][2: keys, values][n_groups][2^b][c], group g being
   channels g*c .. g*c+c-1 of the kv vector (keys before RoPE). */

typedef struct {
    int c, b;              // channels per group, bits per code
    int n_groups;          // G = kv_dim / c
    int n_centroids;       // K = 2^b
    float *centroids;      // (L, G, K, c)
    float *sqnorm;         // (L, G, K): ||C_j||^2, for the nearest-centroid search
} Codebooks;

typedef struct {           // what the cache keeps: the same on every compute path
    KVType k, v;           // types of keys and values
    int window;            // -w: the newest `window` tokens also in fp32 (0: none)
    Codebooks kcb, vcb;    // CQ sides only
    int reference;         // --kernels ref: the plain reference attention instead of the fast one
} CacheSpec;

#define CQCB_MAGIC 0x42435143u  // "CQCB"
#define CQCB_HEADER_BYTES 64

static size_t codebook_floats(const Codebooks *cb, const Config *c) {
    return (size_t)c->n_layers * cb->n_groups * cb->n_centroids * cb->c;
}

static uint64_t model_fingerprint(const float *wk_layer0, size_t n_floats) {  // sum of the words
    uint64_t sum = 0;
    for (size_t i = 0; i < n_floats; i++) sum += ((const uint32_t *)wk_layer0)[i];
    return sum;
}

// Reads the keys' (is_key) or the values' codebooks of `path` after checking its header.
static void read_centroid_file(Codebooks *cb, const KVType *t, int is_key, const char *path,
                               const char *checkpoint, const Model *m) {
    const Config *c = &m->cfg;
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
    if (m->random) die("%s: a random: model takes no centroid file (its codebooks are random)", path);
    if (fingerprint != model_fingerprint(m->w.wk, (size_t)kv_dim_of(c) * c->dim))
        die("%s was learned on another model (fingerprint differs) of the same shape", path);
    size_t per_side = (size_t)cb->n_groups * cb->n_centroids * t->c;  // floats per layer and K/V
    if (fseek(f, 0, SEEK_END) != 0) die("cannot seek in %s", path);
    long size = ftell(f);
    long want = CQCB_HEADER_BYTES + (long)(4 * per_side * 2 * c->n_layers);
    if (size != want) die("%s: %ld bytes, expected %ld: truncated or corrupt", path, size, want);
    for (int l = 0; l < c->n_layers; l++) {
        long offset = CQCB_HEADER_BYTES + (long)(4 * per_side * (2 * l + (is_key ? 0 : 1)));
        if (fseek(f, offset, SEEK_SET) != 0 ||
            fread(cb->centroids + (size_t)l * per_side, 4, per_side, f) != per_side)
            die("%s: read error", path);
    }
    fclose(f);
    for (size_t i = 0; i < per_side * c->n_layers; i++)
        if (!is_finite_float(cb->centroids[i])) die("%s: codebook holds a non-finite value", path);
}

/* The codebooks of one CQ side: from the centroid file (-c, or the default name next to the
   checkpoint), or random ones for a random: model. */
static void load_codebooks(Codebooks *cb, const KVType *t, int is_key, const Model *m,
                           const char *checkpoint, const char *centroid_path) {
    const Config *c = &m->cfg;
    if (t->c > c->head_size || c->head_size % t->c)
        die("-k %s: c = %d must divide the head size %d", t->name, t->c, c->head_size);
    cb->c = t->c; cb->b = t->b;
    cb->n_groups = kv_dim_of(c) / t->c; cb->n_centroids = 1 << t->b;
    size_t n = codebook_floats(cb, c);
    cb->centroids = (float *)huge_alloc(n * sizeof(float));  // read at random by the key kernel: few TLB entries
    cb->sqnorm = NEW(float, n / t->c);
    if (m->random && !centroid_path) {
        uint64_t rng = 99 + is_key;
        for (size_t i = 0; i < n; i++) cb->centroids[i] = random_normal(&rng);
    } else {
        char path[4096];
        size_t len = strlen(checkpoint);  // the default: <checkpoint minus .bin>.<c>c<b>b.cent
        if (len > 4 && !strcmp(checkpoint + len - 4, ".bin")) len -= 4;
        if (centroid_path) snprintf(path, sizeof path, "%s", centroid_path);
        else snprintf(path, sizeof path, "%.*s.%dc%db.cent", (int)len, checkpoint, t->c, t->b);
        read_centroid_file(cb, t, is_key, path, checkpoint, m);
    }
    for (size_t j = 0; j < n / t->c; j++) {
        const float *cj = cb->centroids + j * t->c;
        float n2 = 0.0f;
        for (int i = 0; i < t->c; i++) n2 += cj[i] * cj[i];
        cb->sqnorm[j] = n2;
    }
}

static void free_codebooks(Codebooks *cb, const Config *c) {
    if (cb->centroids) huge_free(cb->centroids, codebook_floats(cb, c) * sizeof(float));
    free(cb->sqnorm);
}

static void cache_spec_init(CacheSpec *s, KVType k, KVType v, int window, int reference, const Model *m,
                            const char *checkpoint, const char *centroids) {
    memset(s, 0, sizeof *s);
    s->k = k; s->v = v; s->window = window; s->reference = reference;
    if (centroids && k.kind == KV_CQ && v.kind == KV_CQ && (k.c != v.c || k.b != v.b))
        die("-c names one centroid file, but keys and values use two CQ configurations; "
            "keep the default file names instead");
    if (k.kind == KV_CQ) load_codebooks(&s->kcb, &k, 1, m, checkpoint, centroids);
    if (v.kind == KV_CQ) load_codebooks(&s->vcb, &v, 0, m, checkpoint, centroids);
}

static void cache_spec_free(CacheSpec *s, const Config *c) { free_codebooks(&s->kcb, c); free_codebooks(&s->vcb, c); }

// label: "cq1", or "cq2:q4" for two types; bits per channel; bytes per token: this cache and fp32;
// window_bytes: a token's second copy while it is among the -w newest (fp32, the non-fp32 sides)
typedef struct { char label[64]; double bits, bytes, fp32, window_bytes; } CacheSize;

// What one token takes in the cache, keys and values, all layers (codebooks excluded).
static CacheSize cache_size(const CacheSpec *s, const Config *c) {
    CacheSize z;
    if (strcmp(s->k.name, s->v.name) == 0) snprintf(z.label, sizeof z.label, "%s", s->k.name);
    else snprintf(z.label, sizeof z.label, "%s:%s", s->k.name, s->v.name);
    z.bits = (s->k.bits + s->v.bits) / 2;
    z.bytes = (s->k.bits + s->v.bits) / 8.0 * kv_dim_of(c) * c->n_layers;
    z.fp32 = 2.0 * 4 * kv_dim_of(c) * c->n_layers;
    z.window_bytes = s->window ? ((s->k.kind != KV_FP32) + (s->v.kind != KV_FP32)) * z.fp32 / 2 : 0;
    return z;
}

/* ==========================================================================================
   5. The Decoder: the one interface between the host program and a compute path
   ========================================================================================== */

/* run.c implements this interface on the CPU (sections 6-8), run.cu on an NVIDIA GPU; the modes
   talk to nothing else.  A Decoder holds a model's weights in its own memory and `batch` KV
   caches of one CacheSpec; all sequences advance one position per call. */
typedef struct Decoder Decoder;

static Decoder *decoder_new(Model *m, const CacheSpec *spec, int batch);
// Runs tokens[b] at position pos of sequence b; returns the logits (batch, V), host memory,
// valid until the next call (NULL unless want_logits: the batched bench needs none).  Every
// token goes through the cache, the current one included.
static float *decoder_forward(Decoder *d, const int *tokens, int pos, int want_logits);
// Bench: positions 0 .. n-1 of every cache hold random keys and values (the work of a step does
// not depend on them).
static void decoder_fill(Decoder *d, int n);
// Bench: milliseconds one step spends in the KV cache (append and attention, all layers).
static double decoder_cache_ms(Decoder *d);
// Bench: where the program runs, for the report ("cpu threads=2", the GPU's name).
static const char *decoder_device(const Decoder *d);
static void decoder_free(Decoder *d);

#ifndef RUN_HOST_ONLY  // sections 6-8: the CPU's compute (run.cu brings its own)

/* ==========================================================================================
   6. Math on the CPU
   ========================================================================================== */

static void rmsnorm(float *out, const float *x, const float *weight, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    ss = 1.0f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) out[i] = weight[i] * (ss * x[i]);
}

/* out (d) = W (d, n) @ x (n), for one or several products that share x (q, k, v; w1, w3).  A
   fork/join costs more than a small product (stories260K's largest is 512 x 64), so only large
   ones are split across threads, those that share x in one parallel region (each thread takes
   its share of every product's rows): fewer fork/joins, and k and v, too small alone, split too. */
#define PARALLEL_MIN_MACS (1 << 17)

typedef struct { float *out; const float *w; int d; } Product;  // out (d) = w (d, n) @ x (n)

static float dot(const float *a, const float *b, int n) {
    float v = 0.0f;
    for (int j = 0; j < n; j++) v += a[j] * b[j];
    return v;
}

static void matmuls(const float *x, int n, const Product *products, int count) {
    long macs = 0;
    for (int k = 0; k < count; k++) macs += (long)n * products[k].d;
    (void)macs;  // read only by OpenMP
    OMP(omp parallel if (macs >= PARALLEL_MIN_MACS && omp_get_max_threads() > 1))
    for (int k = 0; k < count; k++) {
        const Product *p = &products[k];
        OMP(omp for schedule(static) nowait)
        for (int i = 0; i < p->d; i++) p->out[i] = dot(p->w + (size_t)i * n, x, n);
    }
}

static void matmul(float *out, const float *x, const float *w, int n, int d) {
    Product p = {out, w, d};
    matmuls(x, n, &p, 1);
}

/* RoPE on the CPU: keys and queries rotate with section 4's exact table.  The fast CQ key kernel
   rotates every cached key it reads, and a (seq_len, hs) table is as large as a layer's fp32
   keys: streaming it would cost what CQ saves.  So position t = 64a + b turns by
   e^{i w t} = e^{i w 64a} * e^{i w b} from two small tables that stay in cache: the queries turn
   back by the coarse angle once per ROPE_FINE positions, each key by its fine angle.  Rows hold
   cos2 = (cos, cos), sin2 = (-sin, sin) per pair: a rotation is x * cos2 + swap_pairs(x) * sin2. */
#define ROPE_FINE 64

static int padded_head_size(int hs) { return (hs + 7) / 8 * 8; }  // whole 8-float vectors (section 7.3)

typedef struct {                       // hsv = padded_head_size(hs); lanes past hs are zero
    float *cos_sin;                    // (seq_len, hs): (cos, sin) per pair, exact (rope_table)
    float *coarse_cos2, *coarse_sin2;  // (seq_len / ROPE_FINE + 1, hsv): positions 0, 64, 128, ...
    float *fine_cos2, *fine_sin2;      // (ROPE_FINE, hsv): positions 0 .. 63
    int half;                          // hs / 2
} RopeTable;

static void rope_pairs(const Config *c, int t, float *cos2, float *sin2) {  // one row of those tables
    for (int i = 0; i < c->head_size / 2; i++) {
        float cs, sn;
        rope_angle(c, t, i, &cs, &sn);
        cos2[2 * i] = cos2[2 * i + 1] = cs; sin2[2 * i] = -sn; sin2[2 * i + 1] = sn;
    }
}

static void rope_init(RopeTable *r, const Config *c) {
    int n_coarse = c->seq_len / ROPE_FINE + 1, w = padded_head_size(c->head_size);
    r->half = c->head_size / 2;
    r->cos_sin = rope_table(c);
    r->coarse_cos2 = NEW(float, (size_t)n_coarse * w); r->coarse_sin2 = NEW(float, (size_t)n_coarse * w);
    r->fine_cos2 = NEW(float, (size_t)ROPE_FINE * w); r->fine_sin2 = NEW(float, (size_t)ROPE_FINE * w);
    for (int a = 0; a < n_coarse; a++) rope_pairs(c, a * ROPE_FINE, r->coarse_cos2 + (size_t)a * w, r->coarse_sin2 + (size_t)a * w);
    for (int b = 0; b < ROPE_FINE; b++) rope_pairs(c, b, r->fine_cos2 + (size_t)b * w, r->fine_sin2 + (size_t)b * w);
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
   7. The KV cache on the CPU
   ========================================================================================== */

/* The forward pass sees the cache through four calls:
     kv_cache_init  storage for every layer and position, of the CacheSpec's types
     kv_append      stores the key (BEFORE RoPE) and value of the token at `pos`, one layer
     kv_attend      attention of all query heads against positions 0..pos of one layer
     kv_cache_free
   Below: 7.1 storage (how each type writes and reads a row; CQ's nearest-centroid encoder), 7.2
   the reference attention (--kernels ref), 7.3 the fast one (the default; CQ's fused kernels). */

/* ---- 7.1 Storage */

typedef _Float16 f16;  // IEEE binary16: gcc 12+, and clang 15+ on x86-64

typedef struct {
    KVType type;
    int is_key;
    int n_layers, n_kv_heads, head_size, kv_dim, seq_len;
    size_t row_bytes;      // bytes of one (layer, position) row
    uint8_t *rows;         // (L, seq_len, row_bytes): every type except KIVI keys
    // KIVI keys: blocks of QBLOCK tokens quantized per channel
    size_t kivi_block_bytes;
    uint8_t *kivi_blocks;  // (L, seq_len / QBLOCK + 1, kv_dim, kivi_block_bytes)
    float *kivi_recent;    // (L, QBLOCK, kv_dim) keys of the unfinished block, after RoPE
    const Codebooks *cb;   // CQ: the CacheSpec's codebooks, (L, G, K, c); keys before RoPE
    // -w: the newest tokens in full precision
    int window;
    float *window_rows;    // (L, window, kv_dim), position t at slot t % window; keys after RoPE
} KVStore;

typedef struct {
    KVStore k, v;
    const RopeTable *rope;
    int n_heads;
    int reference;         // --kernels ref
} KVCache;

static int scalar_bits(KVKind k) {
    return k == KV_Q4 || k == KV_KIVI4 ? 4 : k == KV_Q2 || k == KV_KIVI2 ? 2 : k == KV_Q1 ? 1 : 8;
}

/* Scalar blocks: the building block of q8/q4/q2/q1 rows and of KIVI's per-channel keys.
   An asymmetric block of n <= 32 values: f16 scale, f16 min, then n codes of `bits` bits packed
   from the low bits up; x ~= min + code * scale.  q8 is symmetric: f16 scale, n int8. */

static size_t block_bytes(int bits) { return bits == 8 ? 2 + QBLOCK : 4 + QBLOCK * bits / 8; }

static void quantize_block(const float *x, int n, int stride, int bits, uint8_t *dst) {
    if (bits == 8) {
        float amax = 0.0f;
        for (int i = 0; i < n; i++) amax = fmaxf(amax, fabsf(x[i * stride]));
        f16 scale = (f16)(amax / 127.0f);
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
    f16 scale = (f16)((hi - lo) / levels), min = (f16)lo;
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
    f16 scale;
    memcpy(&scale, src, 2);
    float s = scale;
    if (bits == 8) {
        for (int i = 0; i < n; i++) out[i] = s * ((const int8_t *)src)[2 + i];
        return;
    }
    f16 min;
    memcpy(&min, src + 2, 2);
    float m = min;
    const uint8_t *codes = src + 4;
    int mask = (1 << bits) - 1;
    for (int i = 0; i < n; i++) out[i] = m + s * ((codes[i * bits / 8] >> (i * bits % 8)) & mask);
}

static float block_value(const uint8_t *src, int i, int bits) {  // one value of an asymmetric block
    f16 scale, min;
    memcpy(&scale, src, 2);
    memcpy(&min, src + 2, 2);
    int q = (src[4 + i * bits / 8] >> (i * bits % 8)) & ((1 << bits) - 1);
    return (float)min + (float)scale * q;
}

/* CQ's encoder: the nearest centroid.  ||x - C_j||^2 = ||C_j||^2 - 2 x.C_j + ||x||^2, and the
   last term is the same for every j, so the code is argmin_j (||C_j||^2 - 2 x.C_j); the first
   index on ties.  With c a compile-time constant (cq_encode_group) the loop over the K
   centroids vectorizes though the codebook is stored centroid by centroid, (K, c). */
static inline int cq_encode_group_c(const float *x, const float *cb, const float *sqnorm, int K, const int c) {
    float mm[c];  // -2x
    for (int i = 0; i < c; i++) mm[i] = -2.0f * x[i];
    int best = 0;  // stays 0 only when x holds NaNs
    float best_d = INFINITY;
    for (int j0 = 0; j0 < K; j0 += 256) {  // 256 distances at a time, on the stack
        int n = K - j0 < 256 ? K - j0 : 256;
        float dist[256];
        for (int j = 0; j < n; j++) {
            float d = sqnorm[j0 + j];
            for (int i = 0; i < c; i++) d += mm[i] * cb[(size_t)(j0 + j) * c + i];
            dist[j] = d;
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
    switch (c) {  // a constant c lets the compiler keep the c products in registers
    case 2: return cq_encode_group_c(x, cb, sqnorm, K, 2);
    case 4: return cq_encode_group_c(x, cb, sqnorm, K, 4);
    case 8: return cq_encode_group_c(x, cb, sqnorm, K, 8);
    default: return cq_encode_group_c(x, cb, sqnorm, K, c);
    }
}

// Code g of a row: one byte for b <= 8, two above (wide).
static inline int cq_code(const uint8_t *row, int g, int wide) { return wide ? ((const uint16_t *)row)[g] : row[g]; }

static size_t kivi_blocks_size(const KVStore *s) {  // bytes of the KIVI key blocks, all layers
    return (size_t)s->n_layers * (s->seq_len / QBLOCK + 1) * s->kv_dim * s->kivi_block_bytes;
}

static uint8_t *kivi_block(const KVStore *s, int layer, int block) {  // (kv_dim, kivi_block_bytes)
    return s->kivi_blocks + (((size_t)layer * (s->seq_len / QBLOCK + 1) + block) * s->kv_dim) * s->kivi_block_bytes;
}

static size_t rows_size(const KVStore *s) { return (size_t)s->n_layers * s->seq_len * s->row_bytes; }  // all layers
static uint8_t *store_row(const KVStore *s, int layer, int t) { return s->rows + ((size_t)layer * s->seq_len + t) * s->row_bytes; }

static void kv_store_init(KVStore *s, KVType type, int is_key, int window, const Codebooks *cb, const Config *c) {
    memset(s, 0, sizeof *s);
    s->type = type; s->is_key = is_key;
    s->n_layers = c->n_layers; s->n_kv_heads = c->n_kv_heads; s->head_size = c->head_size;
    s->kv_dim = kv_dim_of(c); s->seq_len = c->seq_len;
    s->window = type.kind != KV_FP32 ? window : 0;
    size_t L = s->n_layers, KD = s->kv_dim, n_blocks = (KD + QBLOCK - 1) / QBLOCK;
    switch (type.kind) {
    case KV_FP32: s->row_bytes = KD * 4; break;
    case KV_FP16: s->row_bytes = KD * 2; break;
    case KV_CQ: s->cb = cb; s->row_bytes = (size_t)cb->n_groups * (type.b <= 8 ? 1 : 2); break;
    default:  // blocks of channels per token; KIVI keys: blocks of tokens per channel (KIVI values are rows)
        if ((type.kind == KV_KIVI4 || type.kind == KV_KIVI2) && is_key) {
            s->kivi_block_bytes = block_bytes(scalar_bits(type.kind));
            s->kivi_blocks = (uint8_t *)huge_alloc(kivi_blocks_size(s));
            s->kivi_recent = NEW(float, L * QBLOCK * KD);
        } else {
            s->row_bytes = n_blocks * block_bytes(scalar_bits(type.kind));
        }
    }
    if (s->row_bytes) s->rows = (uint8_t *)huge_alloc(rows_size(s));
    if (s->window) s->window_rows = NEW(float, L * s->window * KD);
}

static void kv_store_free(KVStore *s) {
    huge_free(s->rows, rows_size(s));
    huge_free(s->kivi_blocks, kivi_blocks_size(s));
    free(s->kivi_recent);
    free(s->window_rows);
}

static float *window_row(const KVStore *s, int layer, int t) {  // the -w copy of position t
    return s->window_rows + ((size_t)layer * s->window + t % s->window) * s->kv_dim;
}

static const float *layer_codebook(const KVStore *s, int layer) {  // (G, K, c) of one layer
    return s->cb->centroids + (size_t)layer * s->cb->n_groups * s->cb->n_centroids * s->type.c;
}

// Stores x (kv_dim) for position pos.  Keys arrive rotated, except for CQ: see kv_append.
static void store_put(KVStore *s, int layer, int pos, const float *x) {
    int KD = s->kv_dim;
    if (s->window) memcpy(window_row(s, layer, pos), x, KD * sizeof(float));
    uint8_t *row = s->rows ? store_row(s, layer, pos) : NULL;
    switch (s->type.kind) {
    case KV_FP32: memcpy(row, x, KD * sizeof(float)); break;
    case KV_FP16: for (int i = 0; i < KD; i++) ((f16 *)row)[i] = (f16)x[i]; break;
    case KV_CQ: {  // one code per group: the nearest of the group's centroids
        int c = s->type.c, K = s->cb->n_centroids, G = s->cb->n_groups;
        for (int g = 0; g < G; g++) {
            size_t lg = (size_t)layer * G + g;
            int code = cq_encode_group(x + g * c, s->cb->centroids + lg * K * c, s->cb->sqnorm + lg * K, K, c);
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
                uint8_t *blk = kivi_block(s, layer, pos / QBLOCK);
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

/* The stored vector of position t as floats (keys: after RoPE), in the cache or in buf (kv_dim).
   `pos`, the newest position, says which KIVI blocks are finished and what the window holds.  For
   CQ this is the decoding the fast kernels avoid: gather the centroids, rotate a key. */
static const float *store_get(const KVStore *s, const RopeTable *rope, int layer, int t, int pos, float *buf) {
    int KD = s->kv_dim;
    if (s->window && t > pos - s->window) return window_row(s, layer, t);
    const uint8_t *row = s->rows ? store_row(s, layer, t) : NULL;
    switch (s->type.kind) {
    case KV_FP32: return (const float *)row;
    case KV_FP16: for (int i = 0; i < KD; i++) buf[i] = ((const f16 *)row)[i]; return buf;
    case KV_CQ: {
        int c = s->type.c, K = s->cb->n_centroids;
        const float *cb = layer_codebook(s, layer);
        for (int g = 0; g < s->cb->n_groups; g++)  // x_g = C_g[code_g]
            memcpy(buf + g * c, cb + ((size_t)g * K + cq_code(row, g, s->type.b > 8)) * c, c * sizeof(float));
        if (s->is_key) rope_rotate(rope, buf, s->n_kv_heads, t);  // CQ keys were stored before RoPE
        return buf;
    }
    default:
        if (s->kivi_blocks) {
            int block = t / QBLOCK, bits = scalar_bits(s->type.kind);
            if (block * QBLOCK + QBLOCK - 1 > pos)  // unfinished block: still full precision
                return s->kivi_recent + ((size_t)layer * QBLOCK + t % QBLOCK) * KD;
            const uint8_t *blk = kivi_block(s, layer, block);
            for (int ch = 0; ch < KD; ch++) buf[ch] = block_value(blk + ch * s->kivi_block_bytes, t % QBLOCK, bits);
        } else {
            int bits = scalar_bits(s->type.kind);
            for (int b0 = 0, i = 0; b0 < KD; b0 += QBLOCK, i++)
                dequantize_block(row + i * block_bytes(bits), KD - b0 < QBLOCK ? KD - b0 : QBLOCK, bits, buf + b0);
        }
        return buf;
    }
}

/* ---- The cache, and the scratch its attention works in */

/* Per-thread scratch, one slot per thread in one buffer: rounded up to 128 bytes, 128 more left
   free, so that no two threads write to one cache line or to one pair (the prefetcher's unit). */
typedef struct { float *base; size_t stride; } Slots;  // stride: floats from one thread's slot to the next

static Slots slots_new(int n_threads, size_t floats) {
    Slots s = {NULL, (floats + 31) / 32 * 32 + 32};
    s.base = NEW(float, n_threads * s.stride);
    return s;
}

static float *slot(Slots s, int tid) { return s.base + (size_t)tid * s.stride; }

#define ATTN_CHUNK 256  // positions whose scores are live at once in the fast path (7.3)

typedef struct {           // what kv_append and kv_attend work in; the Decoder owns it
    int n_threads;
    Slots att;             // per thread: (H, ATTN_CHUNK) the current chunk's scores (att_at)
    Slots acc;             // per thread: running maxima (H), sums (H), partial outputs (H, hs)
    Slots row;             // per thread: one decoded or rotated row (kv_dim)
    Slots qrot;            // per thread: (H, hsv) qpad turned back by a coarse RoPE angle (CQ keys)
    float *qpad;           // (H, hsv): the query scaled by 1/sqrt(hs), zero-padded (CQ keys)
    float *scores;         // (H, seq_len): the reference path's scores
} KVScratch;

static void kv_scratch_init(KVScratch *sc, const Config *c) {
    int H = c->n_heads, hs = c->head_size, hsv = padded_head_size(hs);
    sc->n_threads = omp_get_max_threads();
    sc->att = slots_new(sc->n_threads, (size_t)H * ATTN_CHUNK);
    sc->acc = slots_new(sc->n_threads, 2 * (size_t)H + (size_t)H * hs);
    sc->row = slots_new(sc->n_threads, kv_dim_of(c));
    sc->qrot = slots_new(sc->n_threads, (size_t)H * hsv);
    sc->qpad = NEW(float, (size_t)H * hsv);
    sc->scores = NEW(float, (size_t)H * c->seq_len);
}

static void kv_scratch_free(KVScratch *sc) {
    free(sc->att.base); free(sc->acc.base); free(sc->row.base); free(sc->qrot.base); free(sc->qpad); free(sc->scores);
}

static void kv_cache_init(KVCache *kv, const CacheSpec *spec, const Config *c, const RopeTable *rope) {
    memset(kv, 0, sizeof *kv);
    kv_store_init(&kv->k, spec->k, 1, spec->window, &spec->kcb, c);
    kv_store_init(&kv->v, spec->v, 0, spec->window, &spec->vcb, c);
    kv->rope = rope; kv->n_heads = c->n_heads; kv->reference = spec->reference;
}

static void kv_cache_free(KVCache *kv) { kv_store_free(&kv->k); kv_store_free(&kv->v); }

// k: (kv_dim) before RoPE.  buf: scratch for the rotated key.
static void put_key(KVCache *kv, int layer, int pos, const float *k, float *buf) {
    KVStore *ks = &kv->k;
    if (ks->type.kind == KV_CQ) {
        store_put(ks, layer, pos, k);  // CQ codes the key before RoPE, but its window holds rotated keys
        if (ks->window) rope_rotate(kv->rope, window_row(ks, layer, pos), ks->n_kv_heads, pos);
    } else {
        memcpy(buf, k, ks->kv_dim * sizeof(float));
        rope_rotate(kv->rope, buf, ks->n_kv_heads, pos);
        store_put(ks, layer, pos, buf);
    }
}

static void kv_append(KVCache *kv, int layer, int pos, const float *k, const float *v, KVScratch *sc) {
    // CQ encoding (K x c multiply-adds a group) is the costly part: two threads code the key and
    // the value side by side (not inside a parallel region: the bench fill runs layers in parallel)
    if (kv->k.type.kind == KV_CQ && kv->v.type.kind == KV_CQ && sc->n_threads > 1 && !omp_in_parallel()) {
        OMP(omp parallel sections num_threads(2))
        {
            OMP(omp section)
            put_key(kv, layer, pos, k, slot(sc->row, omp_get_thread_num()));
            OMP(omp section)
            store_put(&kv->v, layer, pos, v);
        }
        return;
    }
    put_key(kv, layer, pos, k, slot(sc->row, omp_get_thread_num()));
    store_put(&kv->v, layer, pos, v);
}

/* ---- 7.2 The reference attention (--kernels ref): every type, and for CQ the paper's formulas
   read literally.  A stored CQ key of kv head j at position t is the concatenation of the
   centroids its codes name, in the layer's codebooks of j's groups g (keys before RoPE):
       k_t  = [ C_g[code_{t,g}] ]_g                     gather
       s_ht = q_h . RoPE_t(k_t) / sqrt(hs)              rotate, dot
       p_h  = softmax_t(s_h),  t = 0 .. pos
       out_h = sum_t p_ht v_t,  v_t = [ C'_g[code'_{t,g}] ]_g    gather, weighted sum
   store_get does the gathering and the rotation (and every other type's decoding).  q is
   already rotated to its own position; h's kv head is h / R (grouped-query attention).  The
   fast path (7.3) computes the same sums without ever writing k_t or v_t out; the tests check
   it against this one for every CQ shape. */
static void attend_reference(const KVCache *kv, int layer, int pos, const float *q, float *out, KVScratch *sc) {
    const KVStore *ks = &kv->k, *vs = &kv->v;
    int H = kv->n_heads, hs = ks->head_size, R = H / ks->n_kv_heads, n = pos + 1;
    float *s = sc->scores, *buf = slot(sc->row, 0);  // s: (H, n)
    for (int t = 0; t < n; t++) {
        const float *k = store_get(ks, kv->rope, layer, t, pos, buf);
        for (int h = 0; h < H; h++) s[(size_t)h * n + t] = dot(q + (size_t)h * hs, k + (size_t)(h / R) * hs, hs) / sqrtf((float)hs);
    }
    for (int h = 0; h < H; h++) softmax(s + (size_t)h * n, n);
    memset(out, 0, (size_t)H * hs * sizeof(float));
    for (int t = 0; t < n; t++) {
        const float *v = store_get(vs, kv->rope, layer, t, pos, buf);
        for (int h = 0; h < H; h++)
            for (int i = 0; i < hs; i++) out[(size_t)h * hs + i] += s[(size_t)h * n + t] * v[(size_t)(h / R) * hs + i];
    }
}

/* ---- 7.3 The fast attention (the default).
   One pass over the positions, in chunks of ATTN_CHUNK, with an online softmax (as flash
   attention does): per head a running maximum m and sum s of exp(score - m); a chunk's scores
   become exp(score - m) and are added into the value sums, rescaled by exp(m_old - m_new) when
   the maximum grows.  One chunk of scores is live at a time, so scores, codes and codebooks stay
   in cache.  Threads take chunks as they come (a dynamic schedule: on a shared machine one core
   is often slower), each with its own (m, s, sums), merged at the end.  CQ reads its codes in
   place (cq_key_scores, cq_value_sums); every other type, and the -w window, decodes rows with
   store_get.  att (H, ATTN_CHUNK), per thread: the chunk's scores, position t in column
   t % ATTN_CHUNK (an (H, seq_len) matrix put a position's H scores one L1 set apart); chunks
   never straddle a multiple of ATTN_CHUNK, so a chunk's columns are contiguous. */
static inline float *att_at(float *att, int h, int t) { return att + (size_t)h * ATTN_CHUNK + t % ATTN_CHUNK; }

// The running maximum moves only when a chunk's exceeds it by MAX_LAG: weights up to e^16 cannot
// overflow, and the sums are rescaled about once per head, not every time the maximum creeps up.
#define MAX_LAG 16.0f

/* 8-float vectors (GCC's and clang's vector extension; an f32x8 is one AVX register).  Plain
   loops left one horizontal sum per dot product, costlier than the products; with vectors, the
   scores of 8 positions share one transposed sum (lane_sums8). */
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef float f32x2 __attribute__((vector_size(8)));
#define CQ_INLINE static inline __attribute__((always_inline))

static inline f32x8 load8(const float *p) { f32x8 v; memcpy(&v, p, sizeof v); return v; }
static inline f32x8 zero8(void) { f32x8 z = {0, 0, 0, 0, 0, 0, 0, 0}; return z; }
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

#define CQ_BLOCK 8   // positions scored together (one lane_sums8); divides ROPE_FINE
#define KEY_PIECE 8  // vectors of a head held in registers at once (64 channels)

/* Channels i .. i+7 of a kv head, gathered by its codes from the codebook: part of a centroid for
   c >= 8, 8/c centroids for c = 2 or 4 put together in registers (through memory they stalled on
   store forwarding).  Zeros past the head size. */
CQ_INLINE f32x8 group_lanes(const float *cb, const uint8_t *codes, int i, int hs, int K, const int c, const int wide) {
#define CENTROID(gl) (cb + ((size_t)(gl) * K + cq_code(codes, (gl), wide)) * c)
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
    float lanes[8] = {0};  // the last vector of a head whose size is not a multiple of 8 (c is 1, 2 or 4 here)
    for (int j = 0; j < 8 && i + j < hs; j += c) memcpy(lanes + j, CENTROID((i + j) / c), (c & 7) * sizeof(float));
    return load8(lanes);
#undef CENTROID
}

/* Calls kernel(args..., hsv, c, wide) with the padded head size and c as compile-time constants
   for common shapes (head sizes 64 and 128, c = 2, 4, 8), so that the loops over a head and a
   group unroll (about 2x faster); the general case otherwise.  Both CQ kernels dispatch here. */
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

/* CQ keys: scores of positions [t0, t1) straight from the codes.  With q rotated to its own
   position and a RoPE pair written as a complex number, group g of position t adds
       Re( sum over pairs p of g:  conj(q_p) * C_g[code][p] * e^{i theta_p t} )
   to q . k_t: the reference's gather, rotate and dot, fused, CQ_BLOCK positions at a time.  A
   gathered key is turned by its fine angle once for the R query heads of its kv head, which were
   turned back by the block's coarse angle (qrot, once per ROPE_FINE positions):
       q . R(t) k = (R(-ROPE_FINE a) q) . (R(b) k),   t = ROPE_FINE a + b.
   The angle rows and the key stay in registers: fixed-size arrays of KEY_PIECE vectors.
   qpad: (H, hsv) the query heads scaled by 1/sqrt(hs), zeros in the padding; qrot: (H, hsv). */
CQ_INLINE void cq_key_scores_shape(const KVStore *s, const RopeTable *rope, int H, int layer, int t0, int t1,
                                   const float *qpad, float *qrot, float *att, const int hsv, const int c, const int wide) {
    int K = s->cb->n_centroids, hs = s->head_size, gh = hs / c, R = H / s->n_kv_heads, nv = hsv / 8;
    const float *codebook = layer_codebook(s, layer);
    int coarse = -1;
    for (int tb = t0, te; tb < t1; tb = te) {
        te = (tb / CQ_BLOCK + 1) * CQ_BLOCK;  // blocks end at multiples of CQ_BLOCK
        if (te > t1) te = t1;
        int nb = te - tb;
        if (tb / ROPE_FINE != coarse) {  // turn the queries back by the block's coarse angle
            coarse = tb / ROPE_FINE;
            const float *cos2 = rope->coarse_cos2 + (size_t)coarse * hsv, *sin2 = rope->coarse_sin2 + (size_t)coarse * hsv;
            for (int h = 0; h < H; h++)
                for (int m = 0; m < nv; m++) {
                    f32x8 x = load8(qpad + (size_t)h * hsv + 8 * m);
                    f32x8 y = x * load8(cos2 + 8 * m) - swap_pairs(x) * load8(sin2 + 8 * m);
                    memcpy(qrot + (size_t)h * hsv + 8 * m, &y, sizeof y);
                }
        }
        f32x8 dots[H][CQ_BLOCK];  // lane-wise products; dots[h][j]'s lanes sum to the score
        for (int h = 0; h < H; h++)
            for (int j = nb; j < CQ_BLOCK; j++) dots[h][j] = zero8();  // past the end of a short block
        for (int j = 0; j < nb; j++) {
            const float *fine_cos2 = rope->fine_cos2 + (size_t)((tb + j) % ROPE_FINE) * hsv;
            const float *fine_sin2 = rope->fine_sin2 + (size_t)((tb + j) % ROPE_FINE) * hsv;
            const uint8_t *row = store_row(s, layer, tb + j);
            for (int m0 = 0; m0 < nv; m0 += KEY_PIECE) {  // one piece of the head: vectors m0 .. m0+np-1
                int np = nv - m0 < KEY_PIECE ? nv - m0 : KEY_PIECE;
                f32x8 cos2[KEY_PIECE], sin2[KEY_PIECE];  // the position's fine angle, for every kv head
                for (int m = 0; m < np; m++) {
                    cos2[m] = load8(fine_cos2 + 8 * (m0 + m));
                    sin2[m] = load8(fine_sin2 + 8 * (m0 + m));
                }
                for (int kvh = 0; kvh < s->n_kv_heads; kvh++) {
                    const float *cb = codebook + (size_t)kvh * gh * K * c;  // this kv head's groups
                    const uint8_t *codes = row + (size_t)kvh * gh * (1 + wide);
                    f32x8 key[KEY_PIECE];  // this piece of the key, turned by its fine angle
#pragma GCC unroll 8
                    for (int m = 0; m < np; m++) {  // (without the pragma GCC kept it rolled for c = 2)
                        f32x8 x = group_lanes(cb, codes, 8 * (m0 + m), hs, K, c, wide);
                        key[m] = x * cos2[m] + swap_pairs(x) * sin2[m];
                    }
                    for (int r = 0; r < R; r++) {
                        const float *qh = qrot + (size_t)(kvh * R + r) * hsv + 8 * m0;
                        f32x8 acc = m0 ? dots[kvh * R + r][j] : zero8();
                        for (int m = 0; m < np; m++) acc += load8(qh + 8 * m) * key[m];
                        dots[kvh * R + r][j] = acc;
                    }
                }
            }
        }
        for (int h = 0; h < H; h++) {  // the block's scores of head h (a whole block: one store)
            f32x8 scores = lane_sums8(dots[h]);
            if (nb == CQ_BLOCK) memcpy(att_at(att, h, tb), &scores, sizeof scores);
            else memcpy(att_at(att, h, tb), &scores, nb * sizeof(float));
        }
    }
}

static void cq_key_scores(const KVCache *kv, int layer, int t0, int t1, const float *qpad, float *qrot, float *att) {
    int hsv = padded_head_size(kv->k.head_size);
    CQ_SHAPES(kv->k.type, hsv, cq_key_scores_shape, &kv->k, kv->rope, kv->n_heads, layer, t0, t1, qpad, qrot, att);
}

/* CQ values: out_h += sum_t p_t C[code_t], the reference's gather and weighted sum with each
   centroid vector gathered straight into registers.  Per kv head, up to VALUE_HEADS query heads
   and KEY_PIECE vectors of the head at a time: their sums (24 of AVX-512's 32 registers) stay in
   registers over all positions, and each gathered vector serves every head of the set.  (The
   GPU's per-group weight histograms measured slower here: a load-add-store at a random bin per
   position and group; docs/PERF.md.) */
#define VALUE_HEADS 3

CQ_INLINE void cq_value_sums_shape(const KVStore *s, int H, int layer, int t0, int t1, float *att, float *out,
                                   const int nr, const int hsv, const int c, const int wide) {
    int K = s->cb->n_centroids, hs = s->head_size, gh = hs / c, R = H / s->n_kv_heads, nv = hsv / 8;
    const float *codebook = layer_codebook(s, layer);
    for (int kvh = 0; kvh < s->n_kv_heads; kvh++) {
        const float *cb = codebook + (size_t)kvh * gh * K * c;
        for (int r0 = 0; r0 < R; r0 += nr)  // query heads r0 .. r0+nr-1 of the kv head (zero weights past R)
            for (int m0 = 0; m0 < nv; m0 += KEY_PIECE) {  // vectors m0 .. m0+np-1 of the head
                int np = nv - m0 < KEY_PIECE ? nv - m0 : KEY_PIECE;
                f32x8 sums[VALUE_HEADS][KEY_PIECE];  // fixed sizes, so that they can live in registers
                for (int r = 0; r < nr; r++)
                    for (int m = 0; m < KEY_PIECE; m++) sums[r][m] = zero8();
                for (int t = t0; t < t1; t++) {
                    const uint8_t *codes = store_row(s, layer, t) + (size_t)kvh * gh * (1 + wide);
                    float p[VALUE_HEADS];
                    for (int r = 0; r < nr; r++) p[r] = r0 + r < R ? *att_at(att, kvh * R + r0 + r, t) : 0.0f;
#pragma GCC unroll 8
                    for (int m = 0; m < np; m++) {
                        f32x8 x = group_lanes(cb, codes, 8 * (m0 + m), hs, K, c, wide);
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

// out_h += sum over t in [t0, t1) of p_t v_t, from CQ codes.  att: the chunk's weights; out: (H, hs)
static void cq_value_sums(const KVCache *kv, int layer, int t0, int t1, float *att, float *out) {
    // query heads per pass: up to VALUE_HEADS, the last pass padded with zero weights
    int R = kv->n_heads / kv->v.n_kv_heads, nr = R < VALUE_HEADS ? R : VALUE_HEADS, hsv = padded_head_size(kv->v.head_size);
    if (nr == 1) CQ_SHAPES(kv->v.type, hsv, cq_value_sums_shape, &kv->v, kv->n_heads, layer, t0, t1, att, out, 1);
    else if (nr == 2) CQ_SHAPES(kv->v.type, hsv, cq_value_sums_shape, &kv->v, kv->n_heads, layer, t0, t1, att, out, 2);
    else CQ_SHAPES(kv->v.type, hsv, cq_value_sums_shape, &kv->v, kv->n_heads, layer, t0, t1, att, out, 3);
}

// Scores for t in [t0, t1) from whole key rows (every type but CQ, and the window).
static void row_key_scores(const KVCache *kv, int layer, int pos, const float *q, int t0, int t1, float *att, float *buf) {
    const KVStore *s = &kv->k;
    int hs = s->head_size, R = kv->n_heads / s->n_kv_heads;
    float scale = 1.0f / sqrtf((float)hs);
    for (int t = t0; t < t1; t++) {
        const float *row = store_get(s, kv->rope, layer, t, pos, buf);
        for (int h = 0; h < kv->n_heads; h++)
            *att_at(att, h, t) = dot(q + (size_t)h * hs, row + (size_t)(h / R) * hs, hs) * scale;
    }
}

// out_h += sum over t in [t0, t1) of p_t v_t, from whole value rows.  out: (H, hs)
static void row_value_sum(const KVCache *kv, int layer, int pos, int t0, int t1, float *att, float *out, float *buf) {
    const KVStore *s = &kv->v;
    int hs = s->head_size, R = kv->n_heads / s->n_kv_heads;
    for (int t = t0; t < t1; t++) {
        const float *row = store_get(s, kv->rope, layer, t, pos, buf);
        for (int h = 0; h < kv->n_heads; h++) {
            const float *vt = row + (size_t)(h / R) * hs;
            float p = *att_at(att, h, t), *oh = out + (size_t)h * hs;
            for (int i = 0; i < hs; i++) oh[i] += p * vt[i];
        }
    }
}

// Attention for one layer: q (H, hs) already rotated to `pos`; out (H, hs).
static void attend_fast(const KVCache *kv, int layer, int pos, const float *q, float *out, KVScratch *sc) {
    const KVStore *ks = &kv->k, *vs = &kv->v;
    int H = kv->n_heads, hs = ks->head_size, n = pos + 1;
    // positions below n_codes_k (n_codes_v) are read through codes; the rest from the window
    int n_codes_k = ks->window ? (n - ks->window > 0 ? n - ks->window : 0) : n;
    int n_codes_v = vs->window ? (n - vs->window > 0 ? n - vs->window : 0) : n;
    int cq_keys = ks->type.kind == KV_CQ && ks->type.c >= 2;  // c = 1 splits RoPE pairs: row path
    int cq_values = vs->type.kind == KV_CQ;
    int parallel = sc->n_threads > 1 && (long)n * H * hs >= PARALLEL_MIN_MACS / 4;
    (void)parallel;  // read only by OpenMP
    if (cq_keys) {
        int hsv = padded_head_size(hs);
        float scale = 1.0f / sqrtf((float)hs);
        for (int h = 0; h < H; h++)
            for (int i = 0; i < hsv; i++) sc->qpad[(size_t)h * hsv + i] = i < hs ? scale * q[(size_t)h * hs + i] : 0.0f;
    }
    OMP(omp parallel num_threads(parallel ? sc->n_threads : 1))
    {
        int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        float *buf = slot(sc->row, tid), *att = slot(sc->att, tid), *qrot = slot(sc->qrot, tid);
        float *mx = slot(sc->acc, tid), *sum = mx + H, *rows = sum + H;  // running maxima, sums, value sums (H, hs)
        for (int h = 0; h < H; h++) { mx[h] = -FLT_MAX; sum[h] = 0.0f; }
        memset(rows, 0, (size_t)H * hs * sizeof(float));
        int n_chunks = (n + ATTN_CHUNK - 1) / ATTN_CHUNK;
        OMP(omp for schedule(dynamic) nowait)
        for (int chunk = 0; chunk < n_chunks; chunk++) {
            int a = chunk * ATTN_CHUNK, b = a + ATTN_CHUNK < n ? a + ATTN_CHUNK : n;
            // 1. scores of positions a..b-1
            int coded = cq_keys ? (b < n_codes_k ? b : n_codes_k) : a;  // [a, coded) through codes
            if (coded > a) cq_key_scores(kv, layer, a, coded, sc->qpad, qrot, att);
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
        OMP(omp barrier)
        OMP(omp for schedule(static))
        for (int h = 0; h < H; h++) {  // merge the threads: weight of thread th = e^(m_th - m) / total
            float m = -FLT_MAX, total = 0.0f;
            for (int th = 0; th < nth; th++) m = fmaxf(m, slot(sc->acc, th)[h]);
            for (int th = 0; th < nth; th++) total += slot(sc->acc, th)[H + h] * expf(slot(sc->acc, th)[h] - m);
            float *o = out + (size_t)h * hs;
            for (int i = 0; i < hs; i++) o[i] = 0.0f;
            for (int th = 0; th < nth; th++) {
                const float *a = slot(sc->acc, th);
                float w = a[H + h] > 0.0f ? expf(a[h] - m) / total : 0.0f;
                const float *r = a + 2 * H + (size_t)h * hs;
                for (int i = 0; i < hs; i++) o[i] += w * r[i];
            }
        }
    }
}

static void kv_attend(const KVCache *kv, int layer, int pos, const float *q, float *out, KVScratch *sc) {
    if (kv->reference) attend_reference(kv, layer, pos, q, out, sc);
    else attend_fast(kv, layer, pos, q, out, sc);
}

/* ==========================================================================================
   8. The forward pass and the CPU Decoder
   ========================================================================================== */

typedef struct {       // activations of the current token
    float *x;          // (D) residual stream
    float *xb;         // (max(D, H*hs)) normed input / attention output
    float *xb2;        // (D)
    float *hb, *hb2;   // (F)
    float *q;          // (H*hs)
    float *k, *v;      // (KVH*hs), k before RoPE
} RunState;

static void run_state_init(RunState *s, const Config *c) {
    int wide = c->dim > q_dim_of(c) ? c->dim : q_dim_of(c);
    s->x = NEW(float, c->dim); s->xb = NEW(float, wide); s->xb2 = NEW(float, c->dim);
    s->hb = NEW(float, c->hidden_dim); s->hb2 = NEW(float, c->hidden_dim);
    s->q = NEW(float, q_dim_of(c)); s->k = NEW(float, kv_dim_of(c)); s->v = NEW(float, kv_dim_of(c));
}

static void run_state_free(RunState *s) {
    free(s->x); free(s->xb); free(s->xb2); free(s->hb); free(s->hb2); free(s->q); free(s->k); free(s->v);
}

struct Decoder {
    const Model *model;
    RopeTable rope;
    int batch;
    KVCache *caches;       // one per sequence
    RunState state;        // the sequences run one after another
    KVScratch scratch;
    float *logits;         // (batch, V)
    double cache_seconds;  // time in kv_append + kv_attend, and forward steps, since decoder_cache_ms
    int steps;
    char device[64];
};

// Runs `token` at position `pos` through the model, reading and extending `kv`; logits (V).
static void forward(Decoder *d, KVCache *kv, int token, int pos, float *logits) {
    const Config *c = &d->model->cfg;
    const Weights *w = &d->model->w;
    RunState *s = &d->state;
    int D = c->dim, F = c->hidden_dim, QD = q_dim_of(c), KD = kv_dim_of(c);
    memcpy(s->x, w->token_embedding + (size_t)token * D, D * sizeof(float));

    for (int l = 0; l < c->n_layers; l++) {
        // attention block
        rmsnorm(s->xb, s->x, w->attn_norm + (size_t)l * D, D, c->norm_eps);
        Product qkv[3] = {{s->q, w->wq + (size_t)l * QD * D, QD}, {s->k, w->wk + (size_t)l * KD * D, KD},
                          {s->v, w->wv + (size_t)l * KD * D, KD}};
        matmuls(s->xb, D, qkv, 3);
        rope_rotate(&d->rope, s->q, c->n_heads, pos);
        double t0 = now_seconds();
        kv_append(kv, l, pos, s->k, s->v, &d->scratch);  // the current token, too, is read back through the cache
        kv_attend(kv, l, pos, s->q, s->xb, &d->scratch);
        d->cache_seconds += now_seconds() - t0;
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
    matmul(logits, s->x, w->classifier, D, c->vocab_size);
}

/* The random weights of a random: model in host memory (the CPU path; run.cu makes its own on
   the device): matrices N(0, 1/in), norms 1, embeddings N(0, 1). */
static void make_random_weights(Model *m) {
    Tensor t[N_TENSORS];
    m->file_size = 4 * weight_tensors(&m->cfg, &m->w, t);
    float *p = (float *)huge_alloc(m->file_size);
    m->file = p;
    uint64_t rng = 1234;
    for (int i = 0; i < N_TENSORS; i++) {
        float scale = t[i].in ? 1.0f / sqrtf((float)t[i].in) : 1.0f;
        *t[i].at = p;
        for (uint64_t j = 0; j < t[i].n; j++) p[j] = t[i].in ? scale * random_normal(&rng) : 1.0f;
        p += t[i].n;
    }
    if (m->cfg.shared_classifier) m->w.classifier = m->w.token_embedding;
}

static Decoder *decoder_new(Model *m, const CacheSpec *spec, int batch) {
    const Config *c = &m->cfg;
    if (m->bf16) die("random:...,bf16: bf16 weights are kept by the GPU path only (./runcu)");
    if (m->random && !m->file) make_random_weights(m);
    Decoder *d = NEW(Decoder, 1);
    d->model = m; d->batch = batch;
    rope_init(&d->rope, c);
    d->caches = NEW(KVCache, batch);
    for (int b = 0; b < batch; b++) kv_cache_init(&d->caches[b], spec, c, &d->rope);
    run_state_init(&d->state, c);
    kv_scratch_init(&d->scratch, c);
    d->logits = NEW(float, (size_t)batch * c->vocab_size);
    snprintf(d->device, sizeof d->device, "cpu threads=%d", omp_get_max_threads());
    return d;
}

static float *decoder_forward(Decoder *d, const int *tokens, int pos, int want_logits) {
    for (int b = 0; b < d->batch; b++)
        forward(d, &d->caches[b], tokens[b], pos, d->logits + (size_t)b * d->model->cfg.vocab_size);
    d->steps++;
    return want_logits ? d->logits : NULL;
}

static void decoder_fill(Decoder *d, int n) {
    const Config *c = &d->model->cfg;
    int KD = kv_dim_of(c);
    for (int b = 0; b < d->batch; b++) {
        // layers are independent, so they are filled in parallel, each from its own random stream
        OMP(omp parallel for schedule(dynamic))
        for (int l = 0; l < c->n_layers; l++) {
            uint64_t rng = 42 + l + (uint64_t)b * c->n_layers;
            float *k = NEW(float, KD), *v = NEW(float, KD);
            for (int pos = 0; pos < n; pos++) {
                for (int i = 0; i < KD; i++) { k[i] = random_normal(&rng); v[i] = random_normal(&rng); }
                kv_append(&d->caches[b], l, pos, k, v, &d->scratch);
            }
            free(k); free(v);
            if (omp_get_thread_num() == 0) fprintf(stderr, "\rbench: filling the cache, layer %d/%d", l + 1, c->n_layers);
        }
    }
}

static double decoder_cache_ms(Decoder *d) {  // measured inside forward, over the steps since the last call
    double ms = d->steps ? 1000 * d->cache_seconds / d->steps : 0.0;
    d->cache_seconds = 0; d->steps = 0;
    return ms;
}

static const char *decoder_device(const Decoder *d) { return d->device; }

static void decoder_free(Decoder *d) {
    for (int b = 0; b < d->batch; b++) kv_cache_free(&d->caches[b]);
    free(d->caches);
    rope_free(&d->rope);
    run_state_free(&d->state);
    kv_scratch_free(&d->scratch);
    free(d->logits);
    free(d);
}

#endif  // RUN_HOST_ONLY

/* ==========================================================================================
   9. Generation, chat, perplexity, benchmark
   ========================================================================================== */

typedef struct {           // everything the command line chooses
    const char *checkpoint, *tokenizer, *mode, *prompt, *system_prompt;
    const char *kv_spec, *centroids, *text_file, *logits_file;
    float temperature, topp;
    long long seed;
    int steps, window, length, batch;
    int ids_input, kl, lines, reference, steps_given;
} Options;

typedef struct {           // a model ready to run: weights, tokenizer, what its cache keeps
    Model model;
    Tokenizer tok;
    CacheSpec spec;
} Runtime;

static FILE *open_logits(const Options *o) {
    if (!o->logits_file) return NULL;
    FILE *f = fopen(o->logits_file, "wb");
    if (!f) die("cannot write %s: %s", o->logits_file, strerror(errno));
    return f;
}

static void write_logits(FILE *f, const float *logits, int n) {
    if (f && fwrite(logits, sizeof(float), n, f) != (size_t)n) die("writing logits failed: %s", strerror(errno));
}

// After generate and chat, on stderr: the speed since `start`, and what the cache held against fp32.
static void report_run(const Runtime *rt, int positions, double start) {
    if (start > 0 && positions > 1) fprintf(stderr, "achieved tok/s: %f\n", (positions - 1) / (now_seconds() - start));
    CacheSize z = cache_size(&rt->spec, &rt->model.cfg);
    int window = rt->spec.window, in_window = positions < window ? positions : window;
    fprintf(stderr, "KV cache %s: %.0f bytes per token, %.1f KB for %d positions", z.label, z.bytes, z.bytes * positions / 1024, positions);
    if (z.window_bytes > 0) fprintf(stderr, " + %.1f KB for the fp32 window of %d", z.window_bytes * in_window / 1024, window);
    fprintf(stderr, "; fp32 would take %.0f bytes per token (%.1fx more)\n", z.fp32, z.fp32 / z.bytes);
}

static void generate(Runtime *rt, Sampler *sampler, const Options *o) {
    const Config *c = &rt->model.cfg;
    int n_prompt;
    int *prompt_ids = encode(&rt->tok, o->prompt ? o->prompt : "", c->bos_id, 1, &n_prompt);
    if (n_prompt > c->seq_len)
        die("the prompt is %d tokens long but the model's context is %d", n_prompt, c->seq_len);
    Decoder *d = decoder_new(&rt->model, &rt->spec, 1);
    FILE *logits_out = open_logits(o);
    double start = 0;
    int token = prompt_ids[0], pos = 0;
    while (pos < o->steps) {
        float *logits = decoder_forward(d, &token, pos, 1);
        write_logits(logits_out, logits, c->vocab_size);
        // inside the prompt the next token is forced, after it the model chooses
        int next = pos < n_prompt - 1 ? prompt_ids[pos + 1] : sample(sampler, logits);
        pos++;
        // llama2.c stops when the model starts a new sequence; byte-level BPE models also end on eos
        if (next == c->bos_id || (rt->tok.kind == 1 && next == c->eos_id)) break;
        print_piece(&rt->tok, c->bos_id, token, next);
        fflush(stdout);
        token = next;
        if (start == 0) start = now_seconds();  // the first step is excluded: it warms up
    }
    printf("\n");
    report_run(rt, pos, start);
    if (logits_out) fclose(logits_out);
    free(prompt_ids);
    decoder_free(d);
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

// Renders one user turn with the checkpoint's chat template (the caller frees it).
static char *render_turn(int chat_template, int first, const char *sys, const char *user) {
    char *out;
    int len, with_sys = first && sys[0];
    if (chat_template == 1 && with_sys)  // ChatML
        len = asprintf(&out, "<|im_start|>system\n%s<|im_end|>\n"
                       "<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n", sys, user);
    else if (chat_template == 1) len = asprintf(&out, "<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n", user);
    else if (with_sys) len = asprintf(&out, "[INST] <<SYS>>\n%s\n<</SYS>>\n\n%s [/INST]", sys, user);  // Llama-2-chat
    else len = asprintf(&out, "[INST] %s [/INST]", user);
    if (len < 0) die("out of memory rendering a chat turn");
    return out;
}

static void chat(Runtime *rt, Sampler *sampler, const Options *o) {
    const Config *c = &rt->model.cfg;
    char *system_line = NULL, *user_line = NULL;  // lines read from stdin (getline's buffers)
    size_t system_cap = 0, user_cap = 0;
    const char *system_prompt = o->system_prompt ? o->system_prompt : "";
    int *prompt_ids = NULL;
    int n_prompt = 0, user_idx = 0, user_turn = 1, next = 0, token, pos = 0;
    Decoder *d = decoder_new(&rt->model, &rt->spec, 1);
    double start = 0;  // tok/s counts the time after the first step, as in generate
    while (pos < o->steps) {
        if (pos == 1) start = now_seconds();
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
            // Llama-2-chat starts every turn with BOS; ChatML's turns start with their own marker
            prompt_ids = encode(&rt->tok, rendered, c->bos_id, c->chat_template == 0, &n_prompt);
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
        next = sample(sampler, decoder_forward(d, &token, pos, 1));
        pos++;
        if (user_idx >= n_prompt && next != c->eos_id) {
            print_piece(&rt->tok, c->bos_id, token, next);
            fflush(stdout);
        }
        if (next == c->eos_id) printf("\n");
    }
    printf("\n");
    report_run(rt, pos, start);
    free(prompt_ids);
    free(system_line);
    free(user_line);
    decoder_free(d);
}

static char *read_file(const char *path, size_t *len_out) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open %s: %s", path, strerror(errno));
    size_t cap = 1 << 16, len = 0, got;
    char *buf = NEW(char, cap + 1);
    while ((got = fread(buf + len, 1, cap - len, f)) > 0) {
        len += got;
        if (len == cap) {
            cap *= 2;
            buf = (char *)realloc(buf, cap + 1);
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
    char *text = read_file(o->text_file, &len), *p = text, *end;
    int *ids, n = 0, V = rt->model.cfg.vocab_size;
    if (o->ids_input) {
        ids = NEW(int, len + 3);
        for (;;) {
            while (isspace((unsigned char)*p)) p++;
            if (!*p) break;
            errno = 0;
            long v = strtol(p, &end, 10);
            if (end == p || errno || v < 0 || v >= V) die("%s: token id #%d is not an integer in [0, %d)", o->text_file, n + 1, V);
            ids[n++] = (int)v;
            p = end;
        }
    } else {
        ids = encode(&rt->tok, text, rt->model.cfg.bos_id, 0, &n);
    }
    free(text);
    if (n < 1) die("%s holds no tokens to score", o->text_file);
    *n_out = n;
    return ids;
}

// log(sum_i exp(x_i)) in double: a row of logits minus it is its log-softmax.
static double log_sum_exp(const float *x, int n) {
    double max = x[0], sum = 0.0;
    for (int i = 1; i < n; i++) if (x[i] > max) max = x[i];
    for (int i = 0; i < n; i++) sum += exp(x[i] - max);
    return max + log(sum);
}

// log p(target) from logits.
static double log_prob(const float *logits, int n, int target) {
    check_logits(logits, n);
    return logits[target] - log_sum_exp(logits, n);
}

// KL(p_ref || p) from two rows of logits.
static double kl_divergence(const float *ref, const float *logits, int n) {
    double lse_ref = log_sum_exp(ref, n), lse = log_sum_exp(logits, n), kl = 0.0;
    for (int i = 0; i < n; i++) {
        double lp = ref[i] - lse_ref, lq = logits[i] - lse;
        kl += exp(lp) * (lp - lq);
    }
    return kl;
}

// ppl: the tokens of window w after its BOS, ids[w chunk ..]: chunk of them, fewer in the last.
static int window_length(int n_tokens, int chunk, int w) {
    return n_tokens - w * chunk < chunk ? n_tokens - w * chunk : chunk;
}

/* -b B: B windows run side by side, one sequence each (the GPU batches their products); the
   sums and the --logits rows come out as one window after another would give them. */
static void perplexity(Runtime *rt, const Options *o) {
    const Config *c = &rt->model.cfg;
    int n_tokens, V = c->vocab_size;
    int *ids = read_eval_tokens(rt, o, &n_tokens);
    int chunk = (o->length > 0 ? o->length : c->seq_len) - 1;  // a window: BOS, then chunk tokens
    int n_windows = (n_tokens + chunk - 1) / chunk, B = o->batch < n_windows ? o->batch : n_windows;
    KVType f32;
    parse_kv_type("fp32", &f32);
    CacheSpec fp32;  // --kl: an fp32 cache runs side by side
    cache_spec_init(&fp32, f32, f32, 0, rt->spec.reference, &rt->model, NULL, NULL);
    Decoder *d = decoder_new(&rt->model, &rt->spec, B), *ref = o->kl ? decoder_new(&rt->model, &fp32, B) : NULL;
    FILE *logits_out = open_logits(o);
    int seek_rows = logits_out && B > 1;  // rows of B windows come out interleaved: written in place
    if (seek_rows && fseeko(logits_out, 0, SEEK_SET))
        die("--logits with -b > 1 needs a file it can seek in (%s): %s", o->logits_file, strerror(errno));
    int *tokens = NEW(int, B);
    double nll = 0.0, kl = 0.0, *window_nll = NEW(double, B), *window_kl = NEW(double, B);
    long scored = 0;
    double t0 = now_seconds(), last_report = t0;
    for (int w0 = 0; w0 < n_windows; w0 += B) {  // sequence b: window w0 + b, idle past the last
        int nb = n_windows - w0 < B ? n_windows - w0 : B, steps = window_length(n_tokens, chunk, w0);  // the longest
        for (int b = 0; b < B; b++) window_nll[b] = window_kl[b] = 0.0;
        for (int j = 0; j <= steps; j++) {  // step j of window w: reads ids[w chunk + j - 1] (BOS first), predicts ids[w chunk + j]
            for (int b = 0; b < B; b++)
                tokens[b] = j > 0 && b < nb && j <= window_length(n_tokens, chunk, w0 + b) ? ids[(w0 + b) * chunk + j - 1] : c->bos_id;
            float *logits = decoder_forward(d, tokens, j, 1);
            float *ref_logits = ref && j < steps ? decoder_forward(ref, tokens, j, 1) : NULL;
            for (int b = 0; b < nb; b++) {
                int w = w0 + b, len = window_length(n_tokens, chunk, w);
                if (j > len) continue;
                const float *row = logits + (size_t)b * V;
                if (seek_rows && fseeko(logits_out, ((off_t)w * (chunk + 1) + j) * V * (off_t)sizeof(float), SEEK_SET))
                    die("seeking in %s failed: %s", o->logits_file, strerror(errno));
                write_logits(logits_out, row, V);
                if (j == len) continue;  // the last token's prediction lies outside the window
                window_nll[b] -= log_prob(row, V, ids[w * chunk + j]);
                if (ref) window_kl[b] += kl_divergence(ref_logits + (size_t)b * V, row, V);
                scored++;
            }
            double now = now_seconds();
            if (now - last_report > 1.0) {
                fprintf(stderr, "\rppl: %ld/%d tokens, %.0f tok/s", scored, n_tokens, scored / (now - t0));
                if (w0) fprintf(stderr, ", ppl %.4f over the first %d windows", exp(nll / (w0 * (double)chunk)), w0);
                fprintf(stderr, "   ");
                last_report = now;
            }
        }
        for (int b = 0; b < B; b++) { nll += window_nll[b]; kl += window_kl[b]; }
    }
    fprintf(stderr, "\rppl: %ld/%d tokens, ppl %.4f, %.0f tok/s   \n", scored, n_tokens, exp(nll / scored),
            scored / (now_seconds() - t0));
    CacheSize z = cache_size(&rt->spec, c);
    printf("type=%s bits_per_channel=%.3f kv_bytes_per_token=%.1f ratio_fp32=%.4f tokens=%ld nll=%.6f ppl=%.6f",
           z.label, z.bits, z.bytes, z.bytes / z.fp32, scored, nll / scored, exp(nll / scored));
    if (o->kl) printf(" kl=%.6f", fmax(kl / scored, 0.0));  // KL >= 0; rounding can leave -1e-12
    printf("\n");
    if (logits_out) fclose(logits_out);
    free(ids); free(tokens); free(window_nll); free(window_kl);
    decoder_free(d);
    if (ref) decoder_free(ref);
    cache_spec_free(&fp32, c);
}

/* Decode speed at context L: positions 0 .. L-n-1 of every cache get random keys and values (not
   timed), then n timed steps run at L-n .. L-1.  One sequence feeds back its greedy token; -b B
   decodes B sequences side by side, each fed BOS (the work is the same; no logits come back). */
static void benchmark(Runtime *rt, const Options *o) {
    const Config *c = &rt->model.cfg;
    int context = o->length > 0 ? o->length : (c->seq_len < 1024 ? c->seq_len : 1024);
    int steps = o->steps_given ? o->steps : 16, B = o->batch;
    if (steps < 1 || steps > context) die("bench: -n must be in [1, %d] for a context of %d", context, context);
    Decoder *d = decoder_new(&rt->model, &rt->spec, B);
    int fill = context - steps;
    double t0 = now_seconds();
    if (fill > 0) {
        decoder_fill(d, fill);
        fprintf(stderr, "\rbench: filled %d positions in %.1f s\n", fill, now_seconds() - t0);
    }
    int *tokens = NEW(int, B);
    for (int b = 0; b < B; b++) tokens[b] = c->bos_id;
    decoder_forward(d, tokens, fill, B == 1);  // a warm-up step, not timed (the same position again below)
    decoder_cache_ms(d);
    double start = now_seconds(), cpu_start = cpu_seconds();
    for (int pos = fill; pos < context; pos++) {
        float *logits = decoder_forward(d, tokens, pos, B == 1);
        if (B == 1) tokens[0] = argmax(logits, c->vocab_size);
    }
    double elapsed = now_seconds() - start, cpu = cpu_seconds() - cpu_start;
    CacheSize z = cache_size(&rt->spec, c);
    printf("type=%s device=%s context=%d batch=%d steps=%d tok_per_s=%.2f ms_per_step=%.3f cache_ms=%.3f "
           "cpu_ms_per_step=%.3f kv_bytes_per_token=%.1f kv_bytes_total=%.0f\n",
           z.label, decoder_device(d), context, B, steps, B * steps / elapsed, 1000 * elapsed / steps,
           decoder_cache_ms(d), 1000 * cpu / steps, z.bytes, z.bytes * context * B);
    free(tokens);
    decoder_free(d);
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
    for (char *line = text; line;) {
        char *newline = o->lines ? strchr(line, '\n') : NULL;
        if (newline) *newline = '\0';
        int n, *ids = encode(&rt->tok, line, rt->model.cfg.bos_id, !o->lines, &n);
        for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
        printf("\n");
        free(ids);
        line = newline && newline[1] ? newline + 1 : NULL;
    }
    free(text);
}

/* ==========================================================================================
   10. Command line
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
        "  -b <int>    bench: sequences decoded side by side; ppl: windows side by side; default 1\n"
        "  --ids       ppl: -f holds whitespace-separated token ids instead of text\n"
        "  --kl        ppl: also report mean KL(p_fp32 || p_type) over scored tokens\n"
        "  --lines     encode: encode each line of -f on its own, print one line of ids each\n"
        "  --logits <path>  write the float32 logits of every forward step to a file\n"
        "  --kernels fast|ref  attention through the fast kernels (default) or the plain\n"
        "              reference path (decode every row, then softmax and sums)\n"
        "  -h, --help  this text\n"
        "The checkpoint random:PRESET[,key=value...] is a model with random weights, for -m bench\n"
        "(presets smollm2-135m, llama2-7b; keys dim hidden layers heads kv_heads head_size vocab\n"
        "seq_len theta; e.g. random:llama2-7b,layers=1,seq_len=65536).\n");
}

static long long parse_ll(const char *flag, const char *s) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (end == s || *end || errno) die("%s expects an integer, got '%s'", flag, s);
    return v;
}

static int parse_int(const char *flag, const char *s) {
    long long v = parse_ll(flag, s);
    if (v < INT_MIN || v > INT_MAX) die("%s expects an integer, got '%s'", flag, s);
    return (int)v;
}

static float parse_float(const char *flag, const char *s) {
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (end == s || *end || errno || !is_finite_float(v)) die("%s expects a number, got '%s'", flag, s);
    return v;
}

static void parse_args(int argc, char **argv, Options *o) {
    memset(o, 0, sizeof *o);
    o->tokenizer = "tokenizer.bin"; o->mode = "generate"; o->kv_spec = "fp32";
    o->temperature = 1.0f; o->topp = 0.9f; o->steps = 256; o->batch = 1;
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
        int takes_value = !strcmp(a, "--logits") || !strcmp(a, "--kernels") ||
                          (a[0] == '-' && a[1] && !a[2] && strchr("tpsnizmykwcflb", a[1]));
        if (!takes_value) die("unknown option '%s' (see --help)", a);
        if (i + 1 >= argc) die("option %s needs a value", a);
        const char *v = argv[++i];
        if (!strcmp(a, "--logits")) { o->logits_file = v; continue; }
        if (!strcmp(a, "--kernels")) {
            if (strcmp(v, "fast") && strcmp(v, "ref")) die("--kernels expects fast or ref, got '%s'", v);
            o->reference = !strcmp(v, "ref");
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
        case 'b': o->batch = parse_int(a, v); break;
        }
    }
    const char *modes[] = {"generate", "chat", "ppl", "bench", "encode", "decode"};
    int known = 0;
    for (size_t i = 0; i < sizeof modes / sizeof *modes; i++) known |= !strcmp(o->mode, modes[i]);
    if (!known) die("unknown mode '%s' (generate, chat, ppl, bench, encode, decode)", o->mode);
    int ppl = !strcmp(o->mode, "ppl"), decode = !strcmp(o->mode, "decode");
    if (decode) o->ids_input = 1;  // decode reads ids, like ppl --ids
    if (decode && !o->text_file) die("-m decode needs -f FILE of token ids");
    if (o->temperature < 0) die("-t must be >= 0, got %g", o->temperature);
    if (o->topp < 0 || o->topp > 1) die("-p must be in [0, 1], got %g", o->topp);
    if (o->steps < 0) die("-n must be >= 0, got %d", o->steps);
    if (o->window < 0) die("-w must be >= 0, got %d", o->window);
    if (o->batch < 1) die("-b must be >= 1, got %d", o->batch);
    if (o->batch > 1 && strcmp(o->mode, "bench") && strcmp(o->mode, "ppl")) die("-b only applies to -m bench and -m ppl");
    if (ppl && !o->text_file) die("-m ppl needs -f FILE");
    if (o->ids_input && !ppl && !decode) die("--ids only applies to -m ppl");
    if (o->kl && !ppl) die("--kl only applies to -m ppl");
    if (o->lines && (strcmp(o->mode, "encode") || !o->text_file)) die("--lines only applies to -m encode -f FILE");
}

int main(int argc, char **argv) {
    Options o;
    parse_args(argc, argv, &o);
    Runtime rt;
    memset(&rt, 0, sizeof rt);
    KVType ktype, vtype;
    parse_kv_spec(o.kv_spec, &ktype, &vtype);
    load_model(&rt.model, o.checkpoint);
    const Config *c = &rt.model.cfg;
    if (o.steps == 0 || o.steps > c->seq_len) o.steps = c->seq_len;
    if (o.window > c->seq_len) o.window = c->seq_len;  // a window longer than the context is the context
    if (o.length && (o.length < 2 || o.length > c->seq_len))
        die("-l must be in [2, %d] (the model's context), got %d", c->seq_len, o.length);
    if (!strcmp(o.mode, "ppl") && c->seq_len < 2)  // a window is BOS plus at least one scored token
        die("-m ppl needs a context of at least 2 positions; this model's is %d", c->seq_len);
    if (strcmp(o.mode, "bench") && !(strcmp(o.mode, "ppl") == 0 && o.ids_input))  // these need no tokenizer
        load_tokenizer(&rt.tok, o.tokenizer, c->vocab_size, c->tokenizer_kind);
    cache_spec_init(&rt.spec, ktype, vtype, o.window, o.reference, &rt.model, o.checkpoint, o.centroids);

    if (!strcmp(o.mode, "encode")) print_encoding(&rt, &o);
    else if (!strcmp(o.mode, "decode")) print_decoding(&rt, &o);
    else if (!strcmp(o.mode, "ppl")) perplexity(&rt, &o);
    else if (!strcmp(o.mode, "bench")) benchmark(&rt, &o);
    else {
        Sampler sampler = {c->vocab_size, NEW(ProbIndex, c->vocab_size), o.temperature, o.topp,
                           o.seed > 0 ? (uint64_t)o.seed : (uint64_t)time(NULL)};
        if (!strcmp(o.mode, "generate")) generate(&rt, &sampler, &o);
        else chat(&rt, &sampler, &o);
        free(sampler.candidates);
    }
    cache_spec_free(&rt.spec, c);
    free_tokenizer(&rt.tok);
    free_model(&rt.model);
    return 0;
}
