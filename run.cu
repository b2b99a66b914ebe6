/* run.cu: run.c's program on an NVIDIA GPU.

   All the host code comes from run.c (loading and validation, tokenizer, sampler, the modes,
   the command line): RUN_HOST_ONLY compiles out run.c's sections 6-8, and this file implements
   its section 5, the Decoder, on the device.  Read in this order:
     1. errors and device memory
     2. the forward pass's small kernels (each names its CPU counterpart)
     3. the KV cache on the device: layout, append (fp16 conversion, CQ's nearest-centroid
        encoder), the bench fill
     4. attention in the flash-decoding style: the context split over thread blocks, each block
        one kv head and one range of positions, reading the stored format directly; one combine
        step merges the blocks' partial softmaxes
     5. the Decoder: weights on the device, matrix products through cuBLAS, one decode step
        captured in a CUDA graph
   Cache types on the GPU: fp32, fp16 and every cq<c>c<b>b, mixed as -k K:V, with -w.
   Weights are fp32 on the device (number for number what ./run computes); random: models can
   keep them in bf16 (random:...,bf16) for the batched benchmark.
   Build: make runcu (sm_90 machine code plus PTX for other recent GPUs). */

#define RUN_HOST_ONLY
#include "run.c"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>
#include <type_traits>

/* ==========================================================================================
   1. Errors and device memory
   ========================================================================================== */

// Every CUDA call and launch is checked; a failure ends like any other error: one line, exit 1.
static void cuda_check(cudaError_t e, const char *what, int line) {
    if (e == cudaSuccess) return;
    if (e == cudaErrorMemoryAllocation) die("out of GPU memory (%s)", what);
    if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver)
        die("no usable CUDA GPU (%s): %s; use ./run for the CPU", what, cudaGetErrorString(e));
    die("CUDA: %s (%s, run.cu:%d)", cudaGetErrorString(e), what, line);
}
#define CUDA_CHECK(call) cuda_check((call), #call, __LINE__)
#define LAUNCH_CHECK(name) cuda_check(cudaGetLastError(), name, __LINE__)

static void cublas_check(cublasStatus_t s, const char *what, int line) {
    if (s == CUBLAS_STATUS_SUCCESS) return;
    if (s == CUBLAS_STATUS_ALLOC_FAILED) die("out of GPU memory (cuBLAS: %s)", what);
    die("cuBLAS error %d (%s, run.cu:%d)", (int)s, what, line);
}
#define CUBLAS_CHECK(call) cublas_check((call), #call, __LINE__)

// Zeroed device memory; running out ends in one line that says how much was asked for.
static void *device_alloc(size_t bytes, const char *what) {
    void *p = NULL;
    if (cudaMalloc(&p, bytes ? bytes : 1) != cudaSuccess) {
        cudaGetLastError();  // clear the error before asking for the free memory
        size_t free_b = 0, total = 0;
        cudaMemGetInfo(&free_b, &total);
        die("out of GPU memory: %s needs %.2f GB, %.2f GB of %.2f GB free", what, bytes / 1e9, free_b / 1e9, total / 1e9);
    }
    CUDA_CHECK(cudaMemset(p, 0, bytes ? bytes : 1));
    return p;
}

template <typename T>
static T *device_copy(const T *host, size_t n, const char *what) {
    T *d = (T *)device_alloc(n * sizeof(T), what);
    CUDA_CHECK(cudaMemcpy(d, host, n * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}

static int blocks_for(size_t n, int threads) { return (int)((n + threads - 1) / threads); }

/* ==========================================================================================
   2. The forward pass's small kernels
   ========================================================================================== */

// x (B, D) = the embedding rows of tokens (B).  CPU: the memcpy at the top of forward().
__global__ void embed_kernel(float *x, const float *emb, const int *tokens, int D) {
    int b = blockIdx.y;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < D; i += gridDim.x * blockDim.x)
        x[(size_t)b * D + i] = emb[(size_t)tokens[b] * D + i];
}

// Sum over a block of 256 threads (a few warps' partial sums through shared memory).
__device__ float block_sum(float v, float *shared32) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x % 32 == 0) shared32[threadIdx.x / 32] = v;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < (int)(blockDim.x + 31) / 32; w++) total += shared32[w];
    __syncthreads();
    return total;
}

// out (B, D) = RMSNorm(x) * weight, one block per sequence.  CPU: rmsnorm().
__global__ void rmsnorm_kernel(float *out, const float *x, const float *weight, int D, float eps) {
    __shared__ float partial[32];
    const float *xb = x + (size_t)blockIdx.x * D;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) ss += xb[i] * xb[i];
    ss = 1.0f / sqrtf(block_sum(ss, partial) / D + eps);
    for (int i = threadIdx.x; i < D; i += blockDim.x) out[(size_t)blockIdx.x * D + i] = weight[i] * (ss * xb[i]);
}

// h (B, 2F) = [w1 x | w3 x] -> out (B, F) = silu(w1 x) * (w3 x).  CPU: the loop after w1, w3.
__global__ void swiglu_kernel(float *out, const float *h, int F, int B) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)B * F) return;
    size_t b = i / F, j = i % F;
    float a = h[b * 2 * F + j];
    out[i] = a / (1.0f + expf(-a)) * h[b * 2 * F + F + j];
}

__global__ void to_bf16_kernel(__nv_bfloat16 *out, const float *x, size_t n) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n) out[i] = __float2bfloat16(x[i]);
}

/* RoPE of the new token: q (B, H*hs) rotated in place to pos, and a rotated copy of k
   (B, KD) for the cache rows and the window (k itself stays unrotated for CQ's encoder).
   cos_sin: run.c's exact table (seq_len, hs).  CPU: rope_rotate() in forward() and put_key(). */
__global__ void rope_kernel(float *qkv, float *k_rot, const float *cos_sin, const int *pos, int QD, int KD, int hs, int B) {
    int pairs = (QD + KD) / 2;
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)B * pairs) return;
    int b = (int)(i / pairs), p = (int)(i % pairs);
    float *row = qkv + (size_t)b * (QD + 2 * KD);
    int ch = 2 * p;                       // channel in q, or QD + channel in k
    const float *cs = cos_sin + (size_t)pos[0] * hs + (ch % hs);
    float *src = row + ch, *dst = ch < QD ? row + ch : k_rot + (size_t)b * KD + (ch - QD);
    float x0 = src[0], x1 = src[1];
    dst[0] = x0 * cs[0] - x1 * cs[1];
    dst[1] = x0 * cs[1] + x1 * cs[0];
}

/* ==========================================================================================
   3. The KV cache on the device
   ========================================================================================== */

/* Each side (keys, values) keeps, for every sequence b, layer l, kv head and position t, one row
   at ((b * L + l) * KVH + kvh) * S + t: hs floats (fp32), hs halves (fp16) or the G_h = hs / c
   codes of the head's groups (CQ: one byte each for b <= 8, two above).  A kv head's positions
   are contiguous, which is what an attention block reads.  As on the CPU, fp32 and fp16 keep
   keys after RoPE and CQ keeps them before.  With -w W both sides also keep the newest W
   tokens in fp32 (keys rotated), at slot t % W of [B][L][KVH][W][hs]. */
enum { ROW_F32, ROW_F16, ROW_CQ };

struct DeviceSide {
    KVType type;
    int kind;                  // ROW_F32, ROW_F16 or ROW_CQ
    size_t row_bytes;          // of one (kv head, position)
    uint8_t *rows;             // [B][L][KVH][S] rows
    float *window;             // [B][L][KVH][W][hs], or NULL
    int c, K, G_h, wide;       // CQ: channels per group, centroids, groups per head, two-byte codes
    float *centroids;          // CQ: (L, G, K, c) fp32, as run.c reads them
    float *sqnorm;             // CQ: (L, G, K)
};

__host__ __device__ static size_t row_index(int b, int layer, int kvh, int t, int L, int KVH, int S) {
    return (((size_t)b * L + layer) * KVH + kvh) * S + t;
}

/* The new token's row of every sequence: fp32 copied, fp16 rounded to nearest even, at slot pos
   (cache rows) or pos % ring (the window).  x: (B, KD), row b at x + b * x_stride.
   CPU: store_put() for fp32 and fp16. */
template <typename T>
__global__ void store_rows_kernel(T *rows, const float *x, size_t x_stride, const int *pos, int ring, int layer, int L,
                                  int KVH, int slots, int hs, int B) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    int KD = KVH * hs;
    if (i >= (size_t)B * KD) return;
    int b = (int)(i / KD), j = (int)(i % KD), slot = ring ? pos[0] % ring : pos[0];
    float v = x[(size_t)b * x_stride + j];
    T *row = rows + ((((size_t)b * L + layer) * KVH + j / hs) * slots + slot) * hs;
    if constexpr (sizeof(T) == 2) row[j % hs] = __float2half_rn(v);
    else row[j % hs] = v;
}

/* CQ's encoder, one warp per (sequence, group): the code of the group vector x (c floats) is
   argmin_j (||C_j||^2 - 2 x.C_j), the first index on ties, each sum taken in the CPU's order
   (fused multiply-adds over the channels).  Keys arrive before RoPE.  CPU: cq_encode_group(). */
__global__ void encode_kernel(uint8_t *codes, const float *x, size_t x_stride, const float *centroids,
                              const float *sqnorm, const int *pos, int layer, int L, int KVH, int S, int G_h,
                              int c, int K, int wide, int B) {
    int warp = (int)((blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32), lane = threadIdx.x % 32;
    int G = KVH * G_h;
    if (warp >= B * G) return;  // whole warps leave together
    int b = warp / G, g = warp % G;
    const float *xg = x + (size_t)b * x_stride + (size_t)g * c;
    const float *cb = centroids + ((size_t)layer * G + g) * K * c, *sq = sqnorm + ((size_t)layer * G + g) * K;
    float best_d = INFINITY;
    int best_j = 0;  // stays 0 when x holds NaNs, as on the CPU
    for (int j = lane; j < K; j += 32) {
        float d = sq[j];
        for (int i = 0; i < c; i++) d = fmaf(-2.0f * xg[i], cb[(size_t)j * c + i], d);
        if (d < best_d) { best_d = d; best_j = j; }
    }
    for (int o = 16; o > 0; o >>= 1) {  // the warp's minimum; ties go to the smaller index
        float od = __shfl_xor_sync(0xffffffffu, best_d, o);
        int oj = __shfl_xor_sync(0xffffffffu, best_j, o);
        if (od < best_d || (od == best_d && oj < best_j)) { best_d = od; best_j = oj; }
    }
    if (lane == 0) {
        uint8_t *row = codes + row_index(b, layer, g / G_h, pos[0], L, KVH, S) * (size_t)G_h * (1 + wide);
        if (wide) ((uint16_t *)row)[g % G_h] = (uint16_t)best_j;
        else row[g % G_h] = (uint8_t)best_j;
    }
}

// Bench fill: a hash of the element's index, as uniform bits.
__device__ uint32_t hash_u32(uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdull; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ull; x ^= x >> 33;
    return (uint32_t)x;
}

/* Bench fill of positions [0, n) of every (sequence, layer, kv head): random codes below K, or
   random values in (-1, 1) for fp32/fp16 rows (the work of a step does not depend on them). */
template <typename T, bool CODES>
__global__ void fill_rows_kernel(T *rows, int n, int slots, int row_elems, size_t n_heads, uint64_t seed, int K) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x, per_head = (size_t)n * row_elems;
    if (i >= n_heads * per_head) return;
    uint32_t r = hash_u32(seed + i);
    T *dst = rows + (i / per_head) * slots * row_elems + i % per_head;
    if constexpr (CODES) *dst = (T)(r % K);
    else *dst = (T)((float)(r >> 8) / 8388608.0f - 1.0f);
}

/* ==========================================================================================
   4. Attention: split over thread blocks, one combine step
   ========================================================================================== */

/* One block of ATTN_THREADS threads takes one kv head, one range of P positions and a few
   sequences (one after another, so that what it stages in shared memory serves them all), and
   for each sequence the R query heads of that kv head.  It works in three phases, all in shared
   memory:
     1. scores s_rt = q_r . k_t / sqrt(hs) of its positions, from the stored format:
        fp32/fp16 rows with 16-byte loads, several lanes per row (CPU: row_key_scores), or CQ
        codes: the key gathered from the codebook, turned by RoPE at its position and dotted
        with the R queries in one pass (CPU: cq_key_scores; the reference: attend_reference);
     2. the block's softmax: m_r = max_t s_rt, weights e^(s_rt - m_r) and their sum l_r;
     3. o_r = sum_t w_rt v_t: fp32/fp16 rows (CPU: row_value_sum), or CQ codes either through
        per-group histograms of the weights, hist[g][j] = sum of w_t over the positions whose
        code in group g is j, then o = sum_j hist[g][j] C_g[j] (the default where the
        histograms fit), or by gathering C_g[code_t] for every position (CPU: cq_value_sums).
        Integer shared-memory adds per position and group against c reads and multiply-adds:
        3-8x faster on the H200 (docs/PERF.md); the CPU, where the bins do not fit L1, sums in
        registers.
   (m_r, l_r, o_r) is the block's partial softmax; combine_kernel merges the blocks.
   CQ keys: a warp takes 32 positions at once, lane b position t0 + b (t0 a multiple of 32), so
   RoPE's angle splits as on the CPU: q . R(t) k = (R(-t0) q) . (R(b) k).  The warp turns its
   queries back by t0 once per 32 positions (qc) and each lane turns its keys by its own b,
   from a 32-row table in shared memory. */
#define ATTN_THREADS 512
#define ATTN_WARPS (ATTN_THREADS / 32)
#define MAX_R 8       // query heads per kv head (H / KVH) that one block serves
#define TILE 32       // positions a warp scores at once
#define MAX_P 8192    // positions a block takes at most

enum { KM_ROWS32, KM_ROWS16, KM_CQ };                     // how keys are read
enum { VM_ROWS32, VM_ROWS16, VM_HIST, VM_GATHER };        // how values are summed

struct AttnArgs {
    const float *q;            // (B, q_stride): the query heads of sequence b, rotated to pos
    int q_stride;
    int H, KVH, hs, R, L, layer, B, seqs_per_block;
    const int *pos;            // device: the current position; n = pos + 1 positions
    int segment;               // 0: cache rows [0, n - W) (all of [0, n) when W = 0); 1: the window [n - W, n)
    int W;                     // -w
    int P;                     // positions per block
    int n_parts, part0;        // partial softmaxes per (b, head), this launch's first
    // keys and values: rows (or codes) at row_index(b, layer, kvh, slot, ...) * bytes
    const uint8_t *krows, *vrows;
    size_t krow_bytes, vrow_bytes;
    int slots, ring;           // rows per (b, layer, kv head); ring > 0: slot = t % ring (the window)
    int kc, kK, kG, kwide;     // CQ keys: c, 2^b, groups per head, two-byte codes
    int vc, vK, vG, vwide;     // CQ values
    const float *kcb;          // CQ keys: (L, G, K, c) codebooks
    int stage_k;               // copy this kv head's key codebook into shared memory first
    const float *vcb;          // CQ values: (L, G, K, c) fp32
    const float2 *fine;        // (TILE, hs/2): (cos, sin) of positions 0 .. 31
    const float2 *coarse;      // (S / TILE + 1, hs/2): of positions 0, 32, 64, ...
    float *part_o;             // [B][H][n_parts][hs]: unnormalized sums
    float2 *part_ml;           // [B][H][n_parts]: (m, l)
    size_t off_qc, off_fine, off_kcb, off_scores, off_hist, off_red, off_o, off_codes, smem;  // shared memory (attention_layout)
};

__host__ __device__ static size_t align16(size_t n) { return (n + 15) / 16 * 16; }


// Lanes that read one fp32/fp16 row with 16-byte loads (one chunk each), or 0: one thread per row.
__host__ __device__ static int lanes_per_row(int hs, int elem_bytes) {
    int chunks = hs * elem_bytes / 16;
    return hs * elem_bytes % 16 == 0 && chunks <= 32 && (chunks & (chunks - 1)) == 0 ? chunks : 0;
}

// Bytes from one staged row of codes to the next: one word more than the row when rows are whole
// words, so that the 32 lanes reading their own rows hit 32 different banks.
__host__ __device__ static size_t code_stride(size_t row_bytes) { return row_bytes % 4 ? row_bytes : row_bytes + 4; }

// The shared-memory layout of one block: queries, then what the modes need, for P positions.
static void attention_layout(AttnArgs *a, int km, int vm) {
    size_t off = align16((size_t)a->R * a->hs * 4);                      // q, scaled: (R, hs)
    a->off_qc = off;  if (km == KM_CQ) off += align16((size_t)ATTN_WARPS * a->R * a->hs * 4);  // per warp
    a->off_fine = off; if (km == KM_CQ) off += align16((size_t)TILE * (a->hs / 2 + 2) * 8);  // padded rows (fine_row)
    a->off_kcb = off;  if (km == KM_CQ && a->stage_k) off += align16((size_t)a->hs * a->kK * 4);
    a->off_scores = off; off += align16((size_t)a->R * a->P * 4);
    a->off_hist = off; if (vm == VM_HIST) off += align16((size_t)a->R * a->vG * a->vK * 4);
    a->off_red = off;
    if (vm == VM_ROWS32 || vm == VM_ROWS16) {
        int lpr = lanes_per_row(a->hs, vm == VM_ROWS32 ? 4 : 2);
        if (lpr) off += align16((size_t)(ATTN_THREADS / lpr) * a->R * a->hs * 4);  // row groups' sums
    }
    a->off_o = off; off += align16((size_t)a->R * a->hs * 4);             // phase 3's output (R, hs)
    a->off_codes = off;  // per warp, two tiles of CQ code rows (phases 1 and 3 in turn)
    size_t stride = 0;
    if (km == KM_CQ) stride = code_stride(a->krow_bytes);
    if ((vm == VM_HIST || vm == VM_GATHER) && code_stride(a->vrow_bytes) > stride) stride = code_stride(a->vrow_bytes);
    off += align16((size_t)ATTN_WARPS * 2 * TILE * stride);
    a->smem = off + (32 + MAX_R) * 4;                    // and 32 floats for reductions, R histogram scales
}

__device__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ float block_max(float v, float *shared32) {
    v = warp_max(v);
    if (threadIdx.x % 32 == 0) shared32[threadIdx.x / 32] = v;
    __syncthreads();
    float m = -INFINITY;
    for (int w = 0; w < ATTN_WARPS; w++) m = fmaxf(m, shared32[w]);
    __syncthreads();
    return m;
}

/* The fine RoPE table's rows in shared memory are padded to an even number of pairs plus two, so
   that a lane's 16-byte reads of two pairs land on other banks than its neighbours'. */
__host__ __device__ static int fine_row(int hp) { return (hp + 1) / 2 * 2 + 2; }

__device__ float to_float(float x) { return x; }
__device__ float to_float(__half x) { return __half2float(x); }

__device__ int code_at(const uint8_t *row, int g, int wide) { return wide ? ((const uint16_t *)row)[g] : row[g]; }

/* Starts copying the code rows of n <= 32 consecutive positions (contiguous in the cache) into a
   warp's tile buffer, `stride` bytes a row: asynchronously (cp.async, 4-byte words) where the rows
   are whole words, else byte by byte.  Without it each lane read its position's codes one group at
   a time from global memory, a chain of dependent loads (LLaMA-2-7B's layer, cq1, 64K: 1225 us). */
__device__ void stage_codes(uint8_t *dst, const uint8_t *src, size_t row_bytes, int n, int lane) {
    size_t stride = code_stride(row_bytes);
    if (row_bytes % 4 == 0) {
        int rw = (int)(row_bytes / 4), words = n * rw;
        for (int w = lane; w < words; w += 32)
            __pipeline_memcpy_async(dst + (w / rw) * stride + (w % rw) * 4, src + (size_t)w * 4, 4);
    } else {
        for (int i = lane; i < n * (int)row_bytes; i += 32) dst[(i / row_bytes) * stride + i % row_bytes] = src[i];
    }
    __pipeline_commit();
}

/* A warp's walk over the 32-position tiles t0 = first, first + step, ... below hi, with the next
   tile's codes on their way while the current one is computed: body(t0, n, codes of its lane). */
template <typename Body>
__device__ void for_each_tile(const AttnArgs &a, const uint8_t *rows, size_t row_bytes, int b, int kvh, int first,
                              int step, int hi, uint8_t *buf, Body body) {
    int lane = threadIdx.x % 32;
    size_t stride = code_stride(row_bytes), tile_bytes = TILE * stride;
    auto src = [&](int t) { return rows + row_index(b, a.layer, kvh, t, a.L, a.KVH, a.slots) * row_bytes; };
    if (first < hi) stage_codes(buf, src(first), row_bytes, min(TILE, hi - first), lane);
    for (int t0 = first, i = 0; t0 < hi; t0 += step, i++) {
        int next = t0 + step;
        if (next < hi) stage_codes(buf + ((i + 1) & 1) * tile_bytes, src(next), row_bytes, min(TILE, hi - next), lane);
        if (next < hi) __pipeline_wait_prior(1);
        else __pipeline_wait_prior(0);
        __syncwarp();
        body(t0, min(TILE, hi - t0), buf + (i & 1) * tile_bytes + lane * stride);
        __syncwarp();  // the buffer is refilled two tiles on
    }
}

/* Phase 1 for CQ keys: the scores of positions [lo, hi) into sc (R, P).  C: the group size as a
   constant (2, 4, 8), or 0 for any c (c = 1 splits RoPE pairs between groups). */
template <int C, int RM>
__device__ void cq_key_scores(const AttnArgs &a, int b, int kvh, int lo, int hi, const float *qs, float *qc_all,
                              const float2 *fine, const float *cbk, float *sc, uint8_t *codes_all) {
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, hp = a.hs / 2, K = a.kK, c = C ? C : a.kc;
    float *qc = qc_all + (size_t)warp * a.R * a.hs;
    uint8_t *buf = codes_all + (size_t)warp * 2 * TILE * code_stride(a.krow_bytes);
    for_each_tile(a, a.krows, a.krow_bytes, b, kvh, lo + warp * TILE, ATTN_WARPS * TILE, hi, buf,
                  [&](int t0, int n, const uint8_t *codes) {
        const float2 *cs = a.coarse + (size_t)(t0 / TILE) * hp;  // qc = R(-t0) q
        for (int i = lane; i < a.R * hp; i += 32) {
            float2 x = ((const float2 *)qs)[i], r = cs[i % hp];
            ((float2 *)qc)[i] = make_float2(x.x * r.x + x.y * r.y, x.y * r.x - x.x * r.y);
        }
        __syncwarp();
        if (lane >= n) return;
        const float2 *f = fine + (size_t)lane * fine_row(hp);
        float s[RM] = {0};
        if constexpr (C >= 4) {  // two pairs at a time: 16-byte reads of the fine angles and the queries
#pragma unroll 2
            for (int g = 0; g < a.kG; g++) {  // (two groups' reads in flight together)
                const float *cent = cbk + (g * K + code_at(codes, g, a.kwide)) * C;  // < 2^31: one head's codebook
#pragma unroll
                for (int jq = 0; jq < C / 4; jq++) {
                    int p = g * (C / 2) + 2 * jq;
                    float4 x = *(const float4 *)(cent + 4 * jq), r = *(const float4 *)(f + p);
                    float k0 = x.x * r.x - x.y * r.y, k1 = x.x * r.y + x.y * r.x;  // R(b) applied to pair p
                    float k2 = x.z * r.z - x.w * r.w, k3 = x.z * r.w + x.w * r.z;  // and to pair p + 1
#pragma unroll
                    for (int h = 0; h < RM; h++)
                        if (h < a.R) {
                            float4 qq = *(const float4 *)(qc + (size_t)h * a.hs + 2 * p);
                            s[h] += qq.x * k0 + qq.y * k1 + qq.z * k2 + qq.w * k3;
                        }
                }
            }
        } else if constexpr (C == 2) {
            for (int g = 0; g < a.kG; g++) {
                const float *cent = cbk + (g * K + code_at(codes, g, a.kwide)) * C;
#pragma unroll
                for (int jp = 0; jp < C / 2; jp++) {
                    int p = g * (C / 2) + jp;
                    float2 x = *(const float2 *)(cent + 2 * jp), r = f[p];
                    float k0 = x.x * r.x - x.y * r.y, k1 = x.x * r.y + x.y * r.x;  // R(b) applied to the pair
#pragma unroll
                    for (int h = 0; h < RM; h++)
                        if (h < a.R) {
                            float2 qq = ((const float2 *)qc)[h * hp + p];
                            s[h] += qq.x * k0 + qq.y * k1;
                        }
                }
            }
        } else {
            for (int p = 0; p < hp; p++) {
                int g0 = 2 * p / c, g1 = (2 * p + 1) / c;
                float x0 = cbk[(g0 * K + code_at(codes, g0, a.kwide)) * c + (2 * p) % c];
                float x1 = cbk[(g1 * K + code_at(codes, g1, a.kwide)) * c + (2 * p + 1) % c];
                float2 r = f[p];
                float k0 = x0 * r.x - x1 * r.y, k1 = x0 * r.y + x1 * r.x;
#pragma unroll
                for (int h = 0; h < RM; h++)
                    if (h < a.R) {
                        float2 qq = ((const float2 *)qc)[h * hp + p];
                        s[h] += qq.x * k0 + qq.y * k1;
                    }
            }
        }
#pragma unroll
        for (int h = 0; h < RM; h++)
            if (h < a.R) sc[(size_t)h * a.P + (t0 + lane - lo)] = s[h];
    });
}

// The row of position t (cache rows or the window's ring).
__device__ const uint8_t *row_at(const uint8_t *rows, size_t row_bytes, const AttnArgs &a, int b, int kvh, int t) {
    int slot = a.ring ? t % a.ring : t;
    return rows + row_index(b, a.layer, kvh, slot, a.L, a.KVH, a.slots) * row_bytes;
}

// Phase 1 for fp32/fp16 rows: a group of lanes_per_row lanes per row, each one 16-byte chunk.
template <typename T, int RM>
__device__ void row_key_scores(const AttnArgs &a, int b, int kvh, int lo, int hi, const float *qs, float *sc) {
    int lpr = lanes_per_row(a.hs, sizeof(T));
    if (lpr == 0) {  // any head size: one thread per position
        for (int t = lo + threadIdx.x; t < hi; t += ATTN_THREADS) {
            const T *row = (const T *)row_at(a.krows, a.krow_bytes, a, b, kvh, t);
            for (int h = 0; h < a.R; h++) {
                float s = 0.0f;
                for (int i = 0; i < a.hs; i++) s += qs[h * a.hs + i] * to_float(row[i]);
                sc[(size_t)h * a.P + (t - lo)] = s;
            }
        }
        return;
    }
    const int VEC = 16 / sizeof(T), U = 4;  // U rows per lane group in flight at once
    int lane = threadIdx.x % 32, part = lane % lpr, rows_per_warp = 32 / lpr;
    for (int t0 = lo + (threadIdx.x / 32) * rows_per_warp * U; t0 < hi; t0 += ATTN_WARPS * rows_per_warp * U) {
        uint4 raw[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            int t = t0 + u * rows_per_warp + lane / lpr;
            raw[u] = t < hi ? *(const uint4 *)(row_at(a.krows, a.krow_bytes, a, b, kvh, t) + part * 16) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            int t = t0 + u * rows_per_warp + lane / lpr;
            const T *v = (const T *)&raw[u];
            float s[RM] = {0};
#pragma unroll
            for (int h = 0; h < RM; h++)
                if (h < a.R)
#pragma unroll
                    for (int e = 0; e < VEC; e++) s[h] += qs[h * a.hs + part * VEC + e] * to_float(v[e]);
#pragma unroll
            for (int h = 0; h < RM; h++)
                for (int o = lpr / 2; o > 0; o >>= 1) s[h] += __shfl_xor_sync(0xffffffffu, s[h], o);
            if (t < hi && part == 0)
#pragma unroll
                for (int h = 0; h < RM; h++)
                    if (h < a.R) sc[(size_t)h * a.P + (t - lo)] = s[h];
        }
    }
}

// Phase 3 for fp32/fp16 rows: o (R, hs) = sum_t w_t v_t; row groups of lanes_per_row threads.
template <typename T, int RM>
__device__ void row_value_sums(const AttnArgs &a, int b, int kvh, int lo, int hi, const float *sc, float *red, float *o) {
    int lpr = lanes_per_row(a.hs, sizeof(T));
    if (lpr == 0) {  // any head size: one thread per output channel
        for (int k = threadIdx.x; k < a.R * a.hs; k += ATTN_THREADS) {
            int h = k / a.hs, i = k % a.hs;
            float acc = 0.0f;
            for (int t = lo; t < hi; t++)
                acc += sc[(size_t)h * a.P + (t - lo)] * to_float(((const T *)row_at(a.vrows, a.vrow_bytes, a, b, kvh, t))[i]);
            o[k] = acc;
        }
        return;
    }
    const int VEC = 16 / sizeof(T);
    int groups = ATTN_THREADS / lpr, group = threadIdx.x / lpr, part = threadIdx.x % lpr;
    const int U = 4;  // rows in flight at once
    float acc[RM][16 / sizeof(T)] = {{0}};
    for (int t0 = lo + group; t0 < hi; t0 += groups * U) {
        uint4 raw[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            int t = t0 + u * groups;
            raw[u] = t < hi ? *(const uint4 *)(row_at(a.vrows, a.vrow_bytes, a, b, kvh, t) + part * 16) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            int t = t0 + u * groups;
            if (t >= hi) break;
            const T *v = (const T *)&raw[u];
#pragma unroll
            for (int h = 0; h < RM; h++)
                if (h < a.R) {
                    float w = sc[(size_t)h * a.P + (t - lo)];
#pragma unroll
                    for (int e = 0; e < VEC; e++) acc[h][e] += w * to_float(v[e]);
                }
        }
    }
#pragma unroll
    for (int h = 0; h < RM; h++)
        if (h < a.R)
#pragma unroll
            for (int e = 0; e < VEC; e++) red[((size_t)group * a.R + h) * a.hs + part * VEC + e] = acc[h][e];
    __syncthreads();
    for (int k = threadIdx.x; k < a.R * a.hs; k += ATTN_THREADS) {
        float s = 0.0f;
        for (int g = 0; g < groups; g++) s += red[(size_t)g * a.R * a.hs + k];
        o[k] = s;
    }
}

/* Phase 3 for CQ values, through histograms of the weights (see the comment above ATTN_THREADS).
   The bins are 32-bit fixed-point sums, a weight w counted as w 2^31 / l_h (bin_scale[h]), where
   l_h is head h's sum of the block's weights: no bin can exceed 2^31, and each weight is rounded
   to 2^-32 of the sum that o is divided by in the end.  atomicAdd on a float in shared memory is a
   compare-and-swap loop on this GPU, on an integer one instruction; and integer sums do not
   depend on the order of the adds. */
__device__ void cq_value_hist(const AttnArgs &a, int b, int kvh, int lo, int hi, const float *sc, const float *bin_scale,
                              uint32_t *hist, float *o, uint8_t *codes_all) {
    int n_bins = a.R * a.vG * a.vK, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int i = threadIdx.x; i < n_bins; i += ATTN_THREADS) hist[i] = 0;
    __syncthreads();
    uint8_t *buf = codes_all + (size_t)warp * 2 * TILE * code_stride(a.vrow_bytes);
    for_each_tile(a, a.vrows, a.vrow_bytes, b, kvh, lo + warp * TILE, ATTN_WARPS * TILE, hi, buf,
                  [&](int t0, int n, const uint8_t *codes) {
        if (lane >= n) return;
        for (int h = 0; h < a.R; h++) {
            uint32_t w = __float2uint_rn(sc[(size_t)h * a.P + (t0 + lane - lo)] * bin_scale[h]);
            uint32_t *bins = hist + (size_t)h * a.vG * a.vK;
            for (int g = 0; g < a.vG; g++) atomicAdd(&bins[g * a.vK + code_at(codes, g, a.vwide)], w);
        }
    });
    __syncthreads();
    // o[h][i] = sum_j bin[h][g][j] C_g[j][e] (i = g c + e): four lanes an output, each a quarter of the bins
    const float *cb = a.vcb + ((size_t)a.layer * a.KVH + kvh) * a.vG * a.vK * a.vc;  // this kv head's groups
    int quarter = threadIdx.x % 4, n_out = a.R * a.hs;
    for (int base = 0; base < n_out; base += ATTN_THREADS / 4) {  // the same trips for every lane (shuffles)
        int k = base + threadIdx.x / 4;
        float acc = 0.0f;
        if (k < n_out) {
            int h = k / a.hs, i = k % a.hs, g = i / a.vc, e = i % a.vc;
            const uint32_t *bins = hist + ((size_t)h * a.vG + g) * a.vK;
            const float *cg = cb + (size_t)g * a.vK * a.vc + e;
            for (int j = quarter; j < a.vK; j += 4) acc += (float)bins[j] * cg[(size_t)j * a.vc];
            acc /= bin_scale[h];
        }
        acc += __shfl_xor_sync(0xffffffffu, acc, 1);
        acc += __shfl_xor_sync(0xffffffffu, acc, 2);
        if (k < n_out && quarter == 0) o[k] = acc;
    }
}

// Phase 3 for CQ values, gathering each position's centroid (one thread per output channel).
__device__ void cq_value_gather(const AttnArgs &a, int b, int kvh, int lo, int hi, const float *sc, float *o) {
    const float *cb = a.vcb + ((size_t)a.layer * a.KVH + kvh) * a.vG * a.vK * a.vc;
    for (int k = threadIdx.x; k < a.R * a.hs; k += ATTN_THREADS) {
        int h = k / a.hs, i = k % a.hs, g = i / a.vc, e = i % a.vc;
        const float *cg = cb + (size_t)g * a.vK * a.vc + e;
        float acc = 0.0f;
        for (int t = lo; t < hi; t++)
            acc += sc[(size_t)h * a.P + (t - lo)] * cg[(size_t)code_at(row_at(a.vrows, a.vrow_bytes, a, b, kvh, t), g, a.vwide) * a.vc];
        o[k] = acc;
    }
}

// RM: the most query heads per kv head the instance serves (1, 4 or 8): its register arrays' size.
template <int KM, int VM, int C, int RM>
__global__ void __launch_bounds__(ATTN_THREADS) attention_kernel(AttnArgs a) {
    extern __shared__ float4 smem4[];
    char *smem = (char *)smem4;
    float *qs = (float *)smem, *qc = (float *)(smem + a.off_qc), *sc = (float *)(smem + a.off_scores);
    float2 *fine = (float2 *)(smem + a.off_fine);
    float *kcb_shared = (float *)(smem + a.off_kcb);  // the key codebook, where a.stage_k
    uint32_t *hist = (uint32_t *)(smem + a.off_hist);
    float *red = (float *)(smem + a.off_red), *o_s = (float *)(smem + a.off_o);
    uint8_t *codes = (uint8_t *)(smem + a.off_codes);
    float *red32 = (float *)(smem + a.smem - (32 + MAX_R) * 4), *bin_scale = red32 + 32;  // cq_value_hist's, per head
    int kvh = blockIdx.y, n = a.pos[0] + 1, hp = a.hs / 2;
    int seg_lo = a.segment ? (n - a.W > 0 ? n - a.W : 0) : 0;
    int seg_hi = a.segment ? n : (a.W ? (n - a.W > 0 ? n - a.W : 0) : n);
    int lo = seg_lo + blockIdx.x * a.P, hi = lo + a.P < seg_hi ? lo + a.P : seg_hi;
    const float *kcb_global = NULL;
    if constexpr (KM == KM_CQ) {  // this kv head's fine RoPE table and key codebook, once for all sequences
        for (int i = threadIdx.x; i < TILE * hp; i += ATTN_THREADS) fine[(i / hp) * fine_row(hp) + i % hp] = a.fine[i];
        kcb_global = a.kcb + ((size_t)a.layer * a.KVH + kvh) * a.hs * a.kK;
        if (a.stage_k && hi > lo) {
            size_t n16 = (size_t)a.hs * a.kK * 4 / 16;  // cp.async: all of it in flight at once
            for (size_t i = threadIdx.x; i < n16; i += ATTN_THREADS) __pipeline_memcpy_async((uint4 *)kcb_shared + i, (const uint4 *)kcb_global + i, 16);
            __pipeline_commit();
            __pipeline_wait_prior(0);
        }
    }
    for (int bi = 0; bi < a.seqs_per_block; bi++) {
        int b = blockIdx.z * a.seqs_per_block + bi;
        if (b >= a.B) break;
        float scale = rsqrtf((float)a.hs);
        for (int i = threadIdx.x; i < a.R * a.hs; i += ATTN_THREADS)
            qs[i] = scale * a.q[(size_t)b * a.q_stride + (size_t)kvh * a.R * a.hs + i];
        __syncthreads();
        size_t part = ((size_t)b * a.H + (size_t)kvh * a.R) * a.n_parts + a.part0 + blockIdx.x;  // head r: + r * n_parts
        if (hi <= lo) {  // nothing in this range (a short context): an empty partial
            for (int k = threadIdx.x; k < a.R * a.hs; k += ATTN_THREADS)
                a.part_o[(part + (size_t)(k / a.hs) * a.n_parts) * a.hs + k % a.hs] = 0.0f;
            if (threadIdx.x < a.R) a.part_ml[part + (size_t)threadIdx.x * a.n_parts] = make_float2(-INFINITY, 0.0f);
            __syncthreads();
            continue;
        }
        // 1. scores
        if constexpr (KM == KM_CQ) {  // two calls: each knows its codebook's memory (shared or global loads, not generic)
            if (a.stage_k) cq_key_scores<C, RM>(a, b, kvh, lo, hi, qs, qc, fine, kcb_shared, sc, codes);
            else cq_key_scores<C, RM>(a, b, kvh, lo, hi, qs, qc, fine, kcb_global, sc, codes);
        }
        else row_key_scores<typename std::conditional<KM == KM_ROWS32, float, __half>::type, RM>(a, b, kvh, lo, hi, qs, sc);
        __syncthreads();
        // 2. the block's softmax, head by head
        float ml_m[RM], ml_l[RM];
        for (int h = 0; h < a.R; h++) {
            float *s = sc + (size_t)h * a.P, m = -INFINITY;
            for (int i = threadIdx.x; i < hi - lo; i += ATTN_THREADS) m = fmaxf(m, s[i]);
            m = block_max(m, red32);
            float l = 0.0f;
            for (int i = threadIdx.x; i < hi - lo; i += ATTN_THREADS) { s[i] = expf(s[i] - m); l += s[i]; }
            l = block_sum(l, red32);
            ml_m[h] = m; ml_l[h] = l;
            if (threadIdx.x == 0) bin_scale[h] = 0x1p31f / l;
        }
        __syncthreads();
        // 3. weighted values into o_s (R, hs)
        if constexpr (VM == VM_ROWS32) row_value_sums<float, RM>(a, b, kvh, lo, hi, sc, red, o_s);
        else if constexpr (VM == VM_ROWS16) row_value_sums<__half, RM>(a, b, kvh, lo, hi, sc, red, o_s);
        else if constexpr (VM == VM_HIST) cq_value_hist(a, b, kvh, lo, hi, sc, bin_scale, hist, o_s, codes);
        else cq_value_gather(a, b, kvh, lo, hi, sc, o_s);
        __syncthreads();
        for (int k = threadIdx.x; k < a.R * a.hs; k += ATTN_THREADS)
            a.part_o[(part + (size_t)(k / a.hs) * a.n_parts) * a.hs + k % a.hs] = o_s[k];
        for (int h = threadIdx.x; h < a.R; h += ATTN_THREADS) a.part_ml[part + (size_t)h * a.n_parts] = make_float2(ml_m[h], ml_l[h]);
        __syncthreads();
    }
}

/* The partial softmaxes of one (sequence, head) merged: m = max_p m_p, and
   out = sum_p e^(m_p - m) o_p / sum_p e^(m_p - m) l_p.  CPU: the merge at the end of attend_fast. */
__global__ void combine_kernel(float *out, const float *part_o, const float2 *part_ml, int n_parts, int hs, int H) {
    int h = blockIdx.x, b = blockIdx.y;
    size_t base = ((size_t)b * H + h) * n_parts;
    float m = -INFINITY, den = 0.0f;
    for (int p = 0; p < n_parts; p++) m = fmaxf(m, part_ml[base + p].x);
    for (int p = 0; p < n_parts; p++)
        if (part_ml[base + p].y > 0.0f) den += expf(part_ml[base + p].x - m) * part_ml[base + p].y;
    for (int i = threadIdx.x; i < hs; i += blockDim.x) {
        float acc = 0.0f;
        for (int p = 0; p < n_parts; p++)
            if (part_ml[base + p].y > 0.0f) acc += expf(part_ml[base + p].x - m) * part_o[(base + p) * hs + i];
        out[((size_t)b * H + h) * hs + i] = acc / den;
    }
}

/* ==========================================================================================
   5. The Decoder on the GPU
   ========================================================================================== */

typedef void (*AttnKernel)(AttnArgs);

/* The instances: keys as fp32 rows, fp16 rows or CQ codes, with the group sizes 2, 4, 8 unrolled
   and any other through the general loop; values as rows, histograms or gathers; each for up to
   1, 4 or 8 query heads per kv head.  Rarer mixes (CQ keys with row values, gathered values)
   take the general group loop only. */
template <int RM>
static AttnKernel kernel_for(int km, int vm, int c) {
    if (km != KM_CQ) {
        AttnKernel rows32[4] = {attention_kernel<KM_ROWS32, VM_ROWS32, 0, RM>, attention_kernel<KM_ROWS32, VM_ROWS16, 0, RM>,
                                attention_kernel<KM_ROWS32, VM_HIST, 0, RM>, attention_kernel<KM_ROWS32, VM_GATHER, 0, RM>};
        AttnKernel rows16[4] = {attention_kernel<KM_ROWS16, VM_ROWS32, 0, RM>, attention_kernel<KM_ROWS16, VM_ROWS16, 0, RM>,
                                attention_kernel<KM_ROWS16, VM_HIST, 0, RM>, attention_kernel<KM_ROWS16, VM_GATHER, 0, RM>};
        return km == KM_ROWS32 ? rows32[vm] : rows16[vm];
    }
    if (vm != VM_HIST) {
        AttnKernel f[4] = {attention_kernel<KM_CQ, VM_ROWS32, 0, RM>, attention_kernel<KM_CQ, VM_ROWS16, 0, RM>, NULL,
                           attention_kernel<KM_CQ, VM_GATHER, 0, RM>};
        return f[vm];
    }
    switch (c) {
    case 2: return attention_kernel<KM_CQ, VM_HIST, 2, RM>;
    case 4: return attention_kernel<KM_CQ, VM_HIST, 4, RM>;
    case 8: return attention_kernel<KM_CQ, VM_HIST, 8, RM>;
    default: return attention_kernel<KM_CQ, VM_HIST, 0, RM>;
    }
}

static AttnKernel attention_kernel_for(int km, int vm, int c, int R) {
    return R <= 1 ? kernel_for<1>(km, vm, c) : R <= 4 ? kernel_for<4>(km, vm, c) : kernel_for<8>(km, vm, c);
}

struct Segment {               // one attention launch: the cache rows, or the window
    AttnKernel kernel;
    AttnArgs args;             // all but P, n_parts, part0 and the layout, which follow the context
    int km, vm, P_max, P, n_splits;
};

struct Decoder {
    Model *model;
    int B, bf16, sms;
    size_t smem_optin;
    // weights, per layer back to back: wqkv (QD + 2 KD, D), wo (D, QD), w13 (2F, D), w2 (D, F)
    float *emb, *attn_norm, *ffn_norm, *final_norm;
    void *wqkv, *wo, *w13, *w2, *cls;
    // activations: x (B, D), xb (B, max(D, QD)), qkv (B, QD + 2 KD), krot (B, KD), att (B, QD),
    // h13 (B, 2F), hb (B, F), logits (B, V); act16: a bf16 copy of a product's input
    float *x, *xb, *qkv, *krot, *att, *h13, *hb, *logits;
    __nv_bfloat16 *act16;
    int *io, *io_host;         // pos, tokens[B]: pinned on the host, copied in by the graph
    float *logits_host;        // pinned (B, V)
    float *cos_sin;            // (S, hs): run.c's RoPE table
    float2 *fine, *coarse;     // CQ keys' split RoPE tables (section 4)
    DeviceSide k, v;
    int W;
    Segment main_seg, win_seg;
    float *part_o;
    float2 *part_ml;
    int max_parts;
    cudaStream_t stream;
    cublasHandle_t blas;
    void *blas_ws;
    cudaGraphExec_t step, step_bench, cache_only, append_only;  // step_bench: without the logits' copy
    int step_key[4], bench_key[4], cache_key[4], append_key[4];  // the splits each graph was captured with
    cudaEvent_t ev0, ev1;
    char device[256];
};

// Weights of random: models, made on the device: N(0, scale^2) from a hash, or 1 for norms (scale 0).
template <typename T>
__global__ void random_weights_kernel(T *w, size_t n, float scale, uint64_t seed) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= n) return;
    float u1 = (hash_u32(seed + 2 * i) + 1.0f) / 4294967296.0f, u2 = hash_u32(seed + 2 * i + 1) / 4294967296.0f;
    float v = scale > 0 ? scale * sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2) : 1.0f;
    if constexpr (sizeof(T) == 2) w[i] = __float2bfloat16(v);
    else w[i] = v;
}

/* A weight matrix on the device: layer by layer, the parts' rows stacked ((sum of rows, cols)
   each layer), from the host model, or random.  bf16 only for random models. */
static void *upload_weights(Decoder *d, const float *const *parts, const int *rows, int n_parts, int cols,
                            int layers, float scale, uint64_t seed, const char *what) {
    int total_rows = 0;
    for (int p = 0; p < n_parts; p++) total_rows += rows[p];
    size_t per_layer = (size_t)total_rows * cols, n = per_layer * layers, elem = d->bf16 ? 2 : 4;
    void *w = device_alloc(n * elem, what);
    if (d->model->random) {
        if (d->bf16) random_weights_kernel<<<blocks_for(n, 256), 256>>>((__nv_bfloat16 *)w, n, scale, seed);
        else random_weights_kernel<<<blocks_for(n, 256), 256>>>((float *)w, n, scale, seed);
        LAUNCH_CHECK("random_weights_kernel");
        return w;
    }
    for (int l = 0; l < layers; l++) {
        size_t off = 0;
        for (int p = 0; p < n_parts; p++) {
            size_t bytes = (size_t)rows[p] * cols * 4;
            CUDA_CHECK(cudaMemcpy((float *)w + l * per_layer + off, parts[p] + (size_t)l * rows[p] * cols, bytes,
                                  cudaMemcpyHostToDevice));
            off += (size_t)rows[p] * cols;
        }
    }
    return w;
}

static void upload_model(Decoder *d) {
    const Config *c = &d->model->cfg;
    const Weights *w = &d->model->w;
    int D = c->dim, F = c->hidden_dim, L = c->n_layers, QD = q_dim_of(c), KD = kv_dim_of(c), V = c->vocab_size;
    float sD = 1.0f / sqrtf((float)D);
    const float *qkv[3] = {w->wq, w->wk, w->wv}, *w13[2] = {w->w1, w->w3};
    int qkv_rows[3] = {QD, KD, KD}, w13_rows[2] = {F, F};
    d->wqkv = upload_weights(d, qkv, qkv_rows, 3, D, L, sD, 11, "the q, k, v weights");
    d->wo = upload_weights(d, &w->wo, &D, 1, QD, L, 1.0f / sqrtf((float)QD), 12, "the output weights");
    d->w13 = upload_weights(d, w13, w13_rows, 2, D, L, sD, 13, "the w1, w3 weights");
    d->w2 = upload_weights(d, &w->w2, &D, 1, F, L, 1.0f / sqrtf((float)F), 14, "the w2 weights");
    int saved = d->bf16;
    d->bf16 = 0;  // embeddings and norms stay fp32
    d->emb = (float *)upload_weights(d, &w->token_embedding, &V, 1, D, 1, 1.0f, 15, "the embeddings");
    d->attn_norm = (float *)upload_weights(d, &w->attn_norm, &D, 1, 1, L, 0.0f, 0, "the norms");
    d->ffn_norm = (float *)upload_weights(d, &w->ffn_norm, &D, 1, 1, L, 0.0f, 0, "the norms");
    d->final_norm = (float *)upload_weights(d, &w->final_norm, &D, 1, 1, 1, 0.0f, 0, "the norms");
    d->bf16 = saved;
    if (c->shared_classifier && !d->bf16) d->cls = d->emb;
    else d->cls = upload_weights(d, &w->classifier, &V, 1, D, 1, sD, 16, "the classifier");
}

// out (B, d) = beta * out + x (B, n) W^T for W (d, n) row-major: one cuBLAS call.  CPU: matmul().
static void matmul(Decoder *d, float *out, const float *x, const void *W, int n, int rows, float beta) {
    const float one = 1.0f;
    if (d->bf16) {  // bf16 operands, fp32 sums (cublasGemmEx)
        size_t count = (size_t)d->B * n;
        to_bf16_kernel<<<blocks_for(count, 256), 256, 0, d->stream>>>(d->act16, x, count);
        LAUNCH_CHECK("to_bf16_kernel");
        CUBLAS_CHECK(cublasGemmEx(d->blas, CUBLAS_OP_T, CUBLAS_OP_N, rows, d->B, n, &one, W, CUDA_R_16BF, n, d->act16,
                                  CUDA_R_16BF, n, &beta, out, CUDA_R_32F, rows, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    } else if (d->B == 1) {  // a matrix-vector product (cublasSgemv)
        CUBLAS_CHECK(cublasSgemv(d->blas, CUBLAS_OP_T, n, rows, &one, (const float *)W, n, x, 1, &beta, out, 1));
    } else {  // a matrix-matrix product (cublasSgemm)
        CUBLAS_CHECK(cublasSgemm(d->blas, CUBLAS_OP_T, CUBLAS_OP_N, rows, d->B, n, &one, (const float *)W, n, x, n, &beta,
                                 out, rows));
    }
}

static void init_side(Decoder *d, DeviceSide *s, const KVType *t, const Codebooks *cb, int is_key) {
    const Config *c = &d->model->cfg;
    int hs = c->head_size, L = c->n_layers, KVH = c->n_kv_heads, S = c->seq_len;
    memset(s, 0, sizeof *s);
    s->type = *t;
    if (t->kind == KV_FP32) { s->kind = ROW_F32; s->row_bytes = (size_t)hs * 4; }
    else if (t->kind == KV_FP16) { s->kind = ROW_F16; s->row_bytes = (size_t)hs * 2; }
    else if (t->kind == KV_CQ) {
        s->kind = ROW_CQ;
        s->c = t->c; s->K = 1 << t->b; s->G_h = hs / t->c; s->wide = t->b > 8;
        s->row_bytes = (size_t)s->G_h * (1 + s->wide);
        size_t n = codebook_floats(cb, c);
        s->centroids = device_copy(cb->centroids, n, "the CQ codebooks");
        s->sqnorm = device_copy(cb->sqnorm, n / t->c, "the CQ codebooks");
    } else {
        die("-k %s: this cache type is not on the GPU path (fp32, fp16 and cq<c>c<b>b are); use ./run", t->name);
    }
    char what[64];
    snprintf(what, sizeof what, "the KV cache (%s %s)", t->name, is_key ? "keys" : "values");
    s->rows = (uint8_t *)device_alloc((size_t)d->B * L * KVH * S * s->row_bytes, what);
    if (d->W) s->window = (float *)device_alloc((size_t)d->B * L * KVH * d->W * hs * 4, "the -w window");
}

static void free_side(DeviceSide *s) {
    cudaFree(s->rows); cudaFree(s->window); cudaFree(s->centroids); cudaFree(s->sqnorm);
}

/* The attention launch of one segment.  CQ keys stage their kv head's codebook in shared memory
   where it fits for P >= 256 positions, else read it from global memory (an fp16 copy would fit
   more often and ran up to 20 % faster, but moved results by up to 4.6e-3 from ./run's: PERF.md);
   CQ values use the weight histograms where those fit too, else gather.  The largest power of
   two of positions per block that fits is the segment's P_max. */
static void init_segment(Decoder *d, Segment *g, int segment) {
    const Config *c = &d->model->cfg;
    AttnArgs *a = &g->args;
    memset(g, 0, sizeof *g);
    a->H = c->n_heads; a->KVH = c->n_kv_heads; a->hs = c->head_size; a->R = c->n_heads / c->n_kv_heads;
    a->L = c->n_layers; a->B = d->B; a->segment = segment; a->W = d->W;
    a->q = d->qkv;
    a->q_stride = q_dim_of(c) + 2 * kv_dim_of(c);
    a->pos = d->io;
    a->fine = d->fine; a->coarse = d->coarse;
    a->part_o = d->part_o; a->part_ml = d->part_ml;
    a->seqs_per_block = d->B * a->KVH / (4 * d->sms);
    if (a->seqs_per_block < 1) a->seqs_per_block = 1;
    if (a->seqs_per_block > 16) a->seqs_per_block = 16;
    const DeviceSide *k = &d->k, *v = &d->v;
    size_t budget = d->smem_optin;
    if (segment) {  // the window: fp32 rows, rotated keys
        g->km = KM_ROWS32; g->vm = VM_ROWS32;
        a->krows = (const uint8_t *)k->window; a->vrows = (const uint8_t *)v->window;
        a->krow_bytes = a->vrow_bytes = (size_t)a->hs * 4;
        a->slots = a->ring = d->W;
        budget = budget < 96 * 1024 ? budget : 96 * 1024;  // leave room for more blocks per SM
    } else {
        g->km = k->kind == ROW_F32 ? KM_ROWS32 : k->kind == ROW_F16 ? KM_ROWS16 : KM_CQ;
        g->vm = v->kind == ROW_F32 ? VM_ROWS32 : v->kind == ROW_F16 ? VM_ROWS16 : VM_HIST;
        a->krows = k->rows; a->vrows = v->rows; a->krow_bytes = k->row_bytes; a->vrow_bytes = v->row_bytes;
        a->slots = c->seq_len;
        a->kc = k->c; a->kK = k->K; a->kG = k->G_h; a->kwide = k->wide;
        a->vc = v->c; a->vK = v->K; a->vG = v->G_h; a->vwide = v->wide;
        a->kcb = k->centroids; a->vcb = v->centroids;  // NULL for row types
        if (g->km != KM_CQ && g->vm != VM_HIST) budget = budget < 96 * 1024 ? budget : 96 * 1024;
    }
    const char *force_gather = getenv("RUNCU_VALUES");  // a measurement knob (docs/PERF.md)
    if (g->vm == VM_HIST && force_gather && !strcmp(force_gather, "gather")) g->vm = VM_GATHER;
    // best first: the key codebook staged, then read from global memory; the same with values gathered
    // (a codebook is hs x 2^b floats, hs even and b >= 1: whole 16-byte pieces for cp.async)
    for (int attempt = 0; attempt < 4; attempt++) {
        int vm = attempt >= 2 && g->vm == VM_HIST ? VM_GATHER : g->vm;
        a->stage_k = g->km == KM_CQ && attempt % 2 == 0;
        a->P = 256;
        attention_layout(a, g->km, vm);
        if (a->smem > budget) continue;
        g->vm = vm;
        break;
    }
    if (a->smem > budget) die("attention for this shape does not fit in the GPU's shared memory (%zu bytes)", budget);
    for (g->P_max = 256; g->P_max < MAX_P; g->P_max *= 2) {
        a->P = 2 * g->P_max;
        attention_layout(a, g->km, g->vm);
        if (a->smem > budget) break;
    }
    g->kernel = attention_kernel_for(g->km, g->vm, a->kc, a->R);
    CUDA_CHECK(cudaFuncSetAttribute(g->kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)d->smem_optin));
}

/* Positions per block, and blocks per kv head, for a segment of n positions: a wave of blocks.
   The blocks cover the next power of two of n (those past n leave an empty partial), so that the
   split, and with it the step's graph, changes only when n crosses a power of two. */
static int split_target(const Decoder *d, const Segment *g) {
    // CQ blocks stage a codebook (one block an SM fits): one wave of them; row blocks: four an SM
    int units = d->model->cfg.n_kv_heads * ((d->B + g->args.seqs_per_block - 1) / g->args.seqs_per_block);
    int per_sm = g->km == KM_CQ ? 1 : 4;
    return per_sm * d->sms / units > 1 ? per_sm * d->sms / units : 1;
}

static void choose_split(const Decoder *d, Segment *g, int n) {
    int cover = 32, target = split_target(d, g);
    while (cover < n) cover *= 2;
    g->P = 32;
    while (g->P < g->P_max && cover / g->P > target) g->P *= 2;
    g->n_splits = (cover + g->P - 1) / g->P;
}

static void launch_segment(Decoder *d, Segment *g, int layer, int part0, int n_parts) {
    AttnArgs a = g->args;
    a.layer = layer; a.P = g->P; a.part0 = part0; a.n_parts = n_parts;
    attention_layout(&a, g->km, g->vm);
    dim3 grid(g->n_splits, a.KVH, (d->B + a.seqs_per_block - 1) / a.seqs_per_block);
    g->kernel<<<grid, ATTN_THREADS, a.smem, d->stream>>>(a);
    LAUNCH_CHECK("attention_kernel");
}

// The new token into one side's cache (and window) of one layer.  CPU: kv_append().
static void append(Decoder *d, DeviceSide *s, int layer, const float *x, size_t x_stride, const float *rotated,
                   size_t rot_stride) {
    const Config *c = &d->model->cfg;
    int L = c->n_layers, KVH = c->n_kv_heads, S = c->seq_len, hs = c->head_size, B = d->B;
    int blocks = blocks_for((size_t)B * KVH * hs, 256);
    if (s->kind == ROW_F32)
        store_rows_kernel<float><<<blocks, 256, 0, d->stream>>>((float *)s->rows, rotated, rot_stride, d->io, 0, layer, L, KVH, S, hs, B);
    else if (s->kind == ROW_F16)
        store_rows_kernel<__half><<<blocks, 256, 0, d->stream>>>((__half *)s->rows, rotated, rot_stride, d->io, 0, layer, L, KVH, S, hs, B);
    else
        encode_kernel<<<blocks_for((size_t)B * KVH * s->G_h * 32, 256), 256, 0, d->stream>>>(
            s->rows, x, x_stride, s->centroids, s->sqnorm, d->io, layer, L, KVH, S, s->G_h, s->c, s->K, s->wide, B);
    LAUNCH_CHECK("append");
    if (s->window) {
        store_rows_kernel<float><<<blocks, 256, 0, d->stream>>>(s->window, rotated, rot_stride, d->io, d->W, layer, L, KVH, d->W, hs, B);
        LAUNCH_CHECK("append to the window");
    }
}

// RoPE and the new token into the caches of one layer.
static void append_step(Decoder *d, int layer) {
    const Config *c = &d->model->cfg;
    int QD = q_dim_of(c), KD = kv_dim_of(c), B = d->B, stride = QD + 2 * KD;
    rope_kernel<<<blocks_for((size_t)B * (QD + KD) / 2, 256), 256, 0, d->stream>>>(d->qkv, d->krot, d->cos_sin, d->io, QD, KD,
                                                                                  c->head_size, B);
    LAUNCH_CHECK("rope_kernel");
    // keys: CQ codes them before RoPE (qkv), the rows and the window hold them rotated (krot)
    append(d, &d->k, layer, d->qkv + QD, stride, d->krot, KD);
    append(d, &d->v, layer, d->qkv + QD + KD, stride, d->qkv + QD + KD, stride);
}

// Append and attention of one layer: what -m bench reports as the time in the KV cache.
static void cache_step(Decoder *d, int layer) {
    const Config *c = &d->model->cfg;
    append_step(d, layer);
    int n_parts = d->main_seg.n_splits + (d->W ? d->win_seg.n_splits : 0);
    launch_segment(d, &d->main_seg, layer, 0, n_parts);
    if (d->W) launch_segment(d, &d->win_seg, layer, d->main_seg.n_splits, n_parts);
    combine_kernel<<<dim3(c->n_heads, d->B), 128, 0, d->stream>>>(d->att, d->part_o, d->part_ml, n_parts, c->head_size, c->n_heads);
    LAUNCH_CHECK("combine_kernel");
}

static void enqueue_cache(Decoder *d) {
    for (int l = 0; l < d->model->cfg.n_layers; l++) cache_step(d, l);
}

static void enqueue_append(Decoder *d) {
    for (int l = 0; l < d->model->cfg.n_layers; l++) append_step(d, l);
}

// One decode step of every sequence, enqueued on the stream (captured into a graph).  CPU: forward().
static void enqueue_logits(Decoder *d, int copy_logits) {
    const Config *c = &d->model->cfg;
    int D = c->dim, F = c->hidden_dim, QD = q_dim_of(c), KD = kv_dim_of(c), V = c->vocab_size, B = d->B;
    size_t elem = d->bf16 ? 2 : 4;
    CUDA_CHECK(cudaMemcpyAsync(d->io, d->io_host, (1 + B) * sizeof(int), cudaMemcpyHostToDevice, d->stream));
    embed_kernel<<<dim3(blocks_for(D, 256), B), 256, 0, d->stream>>>(d->x, d->emb, d->io + 1, D);
    LAUNCH_CHECK("embed_kernel");
    for (int l = 0; l < c->n_layers; l++) {
        rmsnorm_kernel<<<B, 256, 0, d->stream>>>(d->xb, d->x, d->attn_norm + (size_t)l * D, D, c->norm_eps);
        LAUNCH_CHECK("rmsnorm_kernel");
        matmul(d, d->qkv, d->xb, (const char *)d->wqkv + (size_t)l * (QD + 2 * KD) * D * elem, D, QD + 2 * KD, 0.0f);
        cache_step(d, l);
        matmul(d, d->x, d->att, (const char *)d->wo + (size_t)l * D * QD * elem, QD, D, 1.0f);  // x += wo att
        rmsnorm_kernel<<<B, 256, 0, d->stream>>>(d->xb, d->x, d->ffn_norm + (size_t)l * D, D, c->norm_eps);
        LAUNCH_CHECK("rmsnorm_kernel");
        matmul(d, d->h13, d->xb, (const char *)d->w13 + (size_t)l * 2 * F * D * elem, D, 2 * F, 0.0f);
        swiglu_kernel<<<blocks_for((size_t)B * F, 256), 256, 0, d->stream>>>(d->hb, d->h13, F, B);
        LAUNCH_CHECK("swiglu_kernel");
        matmul(d, d->x, d->hb, (const char *)d->w2 + (size_t)l * D * F * elem, F, D, 1.0f);  // x += w2 h
    }
    rmsnorm_kernel<<<B, 256, 0, d->stream>>>(d->x, d->x, d->final_norm, D, c->norm_eps);
    LAUNCH_CHECK("rmsnorm_kernel");
    matmul(d, d->logits, d->x, d->cls, D, V, 0.0f);
    if (copy_logits)
        CUDA_CHECK(cudaMemcpyAsync(d->logits_host, d->logits, (size_t)B * V * sizeof(float), cudaMemcpyDeviceToHost, d->stream));
}

static void enqueue_step(Decoder *d) { enqueue_logits(d, 1); }
static void enqueue_step_no_logits(Decoder *d) { enqueue_logits(d, 0); }

/* A decode step is several hundred small launches for a small model (SmolLM2: 30 layers of about
   ten), far more than the GPU takes to run them one by one, so the step is captured once into a
   CUDA graph and replayed.  Its kernels read the position from device memory; only the attention
   splits depend on the context, so the graph is captured again when they change (every P
   positions). */
static void run_graph(Decoder *d, cudaGraphExec_t *exec, int *key, void (*enqueue)(Decoder *)) {
    static const char *graphs = getenv("RUNCU_GRAPHS");  // "0": launch one by one (a measurement knob, docs/PERF.md)
    if (graphs && !strcmp(graphs, "0")) { enqueue(d); return; }
    int now[4] = {d->main_seg.P, d->main_seg.n_splits, d->win_seg.P, d->win_seg.n_splits};
    if (!*exec || memcmp(now, key, sizeof now)) {
        if (*exec) CUDA_CHECK(cudaGraphExecDestroy(*exec));
        cudaGraph_t graph;
        CUDA_CHECK(cudaStreamBeginCapture(d->stream, cudaStreamCaptureModeThreadLocal));
        enqueue(d);
        CUDA_CHECK(cudaStreamEndCapture(d->stream, &graph));
        CUDA_CHECK(cudaGraphInstantiate(exec, graph, 0));
        CUDA_CHECK(cudaGraphDestroy(graph));
        memcpy(key, now, sizeof now);
    }
    CUDA_CHECK(cudaGraphLaunch(*exec, d->stream));
}

static void set_position(Decoder *d, int pos) {
    int n = pos + 1, W = d->W;
    choose_split(d, &d->main_seg, W ? (n - W > 0 ? n - W : 0) : n);
    if (W) choose_split(d, &d->win_seg, n < W ? n : W);
    if (d->main_seg.n_splits + (W ? d->win_seg.n_splits : 0) > d->max_parts) die("internal: too many attention splits");
}

static Decoder *decoder_new(Model *m, const CacheSpec *spec, int batch) {
    const Config *c = &m->cfg;
    int n_dev = 0;
    CUDA_CHECK(cudaGetDeviceCount(&n_dev));
    if (n_dev < 1) die("no CUDA GPU found; use ./run for the CPU");
    if (spec->reference) die("--kernels ref: the reference attention runs on the CPU; use ./run --kernels ref");
    if (c->n_heads / c->n_kv_heads > MAX_R)
        die("%d query heads per kv head: the GPU's attention takes up to %d", c->n_heads / c->n_kv_heads, MAX_R);
    Decoder *d = NEW(Decoder, 1);
    d->model = m;
    d->B = batch;
    d->bf16 = m->bf16;
    d->W = spec->k.kind == KV_FP32 && spec->v.kind == KV_FP32 ? 0 : spec->window;  // fp32 rows are the window
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    d->sms = prop.multiProcessorCount;
    d->smem_optin = prop.sharedMemPerBlockOptin;
    snprintf(d->device, sizeof d->device, "%s", prop.name);
    for (char *p = d->device; *p; p++)
        if (*p == ' ') *p = '_';  // one word in bench's key=value line
    CUDA_CHECK(cudaStreamCreateWithFlags(&d->stream, cudaStreamNonBlocking));
    CUBLAS_CHECK(cublasCreate(&d->blas));
    CUBLAS_CHECK(cublasSetStream(d->blas, d->stream));
    size_t ws = 32 << 20;  // cuBLAS's workspace, given up front so that graph capture allocates nothing
    d->blas_ws = device_alloc(ws, "cuBLAS's workspace");
    CUBLAS_CHECK(cublasSetWorkspace(d->blas, d->blas_ws, ws));
    CUDA_CHECK(cudaEventCreate(&d->ev0));
    CUDA_CHECK(cudaEventCreate(&d->ev1));
    upload_model(d);

    int D = c->dim, F = c->hidden_dim, QD = q_dim_of(c), KD = kv_dim_of(c), V = c->vocab_size, B = batch, hs = c->head_size;
    size_t wide = D > QD ? D : QD;
    d->x = (float *)device_alloc((size_t)B * D * 4, "activations");
    d->xb = (float *)device_alloc((size_t)B * wide * 4, "activations");
    d->qkv = (float *)device_alloc((size_t)B * (QD + 2 * KD) * 4, "activations");
    d->krot = (float *)device_alloc((size_t)B * KD * 4, "activations");
    d->att = (float *)device_alloc((size_t)B * QD * 4, "activations");
    d->h13 = (float *)device_alloc((size_t)B * 2 * F * 4, "activations");
    d->hb = (float *)device_alloc((size_t)B * F * 4, "activations");
    d->logits = (float *)device_alloc((size_t)B * V * 4, "the logits");
    size_t widest = (size_t)(F > D ? F : D) > wide ? (size_t)(F > D ? F : D) : wide;
    if (d->bf16) d->act16 = (__nv_bfloat16 *)device_alloc((size_t)B * widest * 2, "activations");
    d->io = (int *)device_alloc((1 + B) * sizeof(int), "the inputs");
    CUDA_CHECK(cudaMallocHost((void **)&d->io_host, (1 + B) * sizeof(int)));
    CUDA_CHECK(cudaMallocHost((void **)&d->logits_host, (size_t)B * V * sizeof(float)));

    float *cs = rope_table(c);  // run.c's exact angles, and the split tables from the same function
    d->cos_sin = device_copy(cs, (size_t)c->seq_len * hs, "the RoPE table");
    free(cs);
    int hp = hs / 2, n_coarse = c->seq_len / TILE + 1;
    float2 *fine = NEW(float2, (size_t)TILE * hp), *coarse = NEW(float2, (size_t)n_coarse * hp);
    for (int i = 0; i < hp; i++) {
        for (int b = 0; b < TILE; b++) rope_angle(c, b, i, &fine[(size_t)b * hp + i].x, &fine[(size_t)b * hp + i].y);
        for (int a = 0; a < n_coarse; a++) rope_angle(c, a * TILE, i, &coarse[(size_t)a * hp + i].x, &coarse[(size_t)a * hp + i].y);
    }
    d->fine = device_copy(fine, (size_t)TILE * hp, "the RoPE table");
    d->coarse = device_copy(coarse, (size_t)n_coarse * hp, "the RoPE table");
    free(fine); free(coarse);

    init_side(d, &d->k, &spec->k, &spec->kcb, 1);
    init_side(d, &d->v, &spec->v, &spec->vcb, 0);
    init_segment(d, &d->main_seg, 0);
    if (d->W) init_segment(d, &d->win_seg, 1);
    // partial softmaxes: at most the splits of a whole context, plus the window's
    d->max_parts = split_target(d, &d->main_seg) + 2 * c->seq_len / d->main_seg.P_max + 2;
    if (d->W) d->max_parts += split_target(d, &d->win_seg) + 2 * d->W / d->win_seg.P_max + 2;
    d->part_o = (float *)device_alloc((size_t)B * c->n_heads * d->max_parts * hs * 4, "attention's partial sums");
    d->part_ml = (float2 *)device_alloc((size_t)B * c->n_heads * d->max_parts * 8, "attention's partial sums");
    d->main_seg.args.part_o = d->win_seg.args.part_o = d->part_o;
    d->main_seg.args.part_ml = d->win_seg.args.part_ml = d->part_ml;
    return d;
}

static float *decoder_forward(Decoder *d, const int *tokens, int pos, int want_logits) {
    d->io_host[0] = pos;
    memcpy(d->io_host + 1, tokens, d->B * sizeof(int));
    set_position(d, pos);
    if (want_logits) run_graph(d, &d->step, d->step_key, enqueue_step);
    else run_graph(d, &d->step_bench, d->bench_key, enqueue_step_no_logits);
    CUDA_CHECK(cudaStreamSynchronize(d->stream));
    return want_logits ? d->logits_host : NULL;
}

static void decoder_fill(Decoder *d, int n) {
    const Config *c = &d->model->cfg;
    size_t heads = (size_t)d->B * c->n_layers * c->n_kv_heads;
    DeviceSide *sides[2] = {&d->k, &d->v};
    for (int i = 0; i < 2; i++) {
        DeviceSide *s = sides[i];
        size_t elems = heads * n * (s->kind == ROW_CQ ? s->G_h : c->head_size);
        int blocks = blocks_for(elems, 256);
        if (s->kind == ROW_F32) fill_rows_kernel<float, false><<<blocks, 256>>>((float *)s->rows, n, c->seq_len, c->head_size, heads, 7 + i, 0);
        else if (s->kind == ROW_F16) fill_rows_kernel<__half, false><<<blocks, 256>>>((__half *)s->rows, n, c->seq_len, c->head_size, heads, 7 + i, 0);
        else if (s->wide) fill_rows_kernel<uint16_t, true><<<blocks, 256>>>((uint16_t *)s->rows, n, c->seq_len, s->G_h, heads, 7 + i, s->K);
        else fill_rows_kernel<uint8_t, true><<<blocks, 256>>>(s->rows, n, c->seq_len, s->G_h, heads, 7 + i, s->K);
        LAUNCH_CHECK("fill_rows_kernel");
        if (s->window) {
            fill_rows_kernel<float, false><<<blocks_for(heads * d->W * c->head_size, 256), 256>>>(s->window, d->W, d->W, c->head_size, heads, 9 + i, 0);
            LAUNCH_CHECK("fill_rows_kernel");
        }
    }
    CUDA_CHECK(cudaDeviceSynchronize());
}

// Milliseconds of one replay of a graph, the median of up to 20 (fewer when each takes long).
static double graph_ms(Decoder *d, cudaGraphExec_t *exec, int *key, void (*enqueue)(Decoder *)) {
    float ms[20];
    int reps = 0;
    run_graph(d, exec, key, enqueue);  // the warm-up, and the capture
    for (double spent = 0; reps < 20 && (reps < 3 || spent < 500); reps++) {
        CUDA_CHECK(cudaEventRecord(d->ev0, d->stream));
        run_graph(d, exec, key, enqueue);
        CUDA_CHECK(cudaEventRecord(d->ev1, d->stream));
        CUDA_CHECK(cudaEventSynchronize(d->ev1));
        CUDA_CHECK(cudaEventElapsedTime(&ms[reps], d->ev0, d->ev1));
        spent += ms[reps];
    }
    for (int i = 1; i < reps; i++)  // insertion sort of a few
        for (int j = i; j > 0 && ms[j] < ms[j - 1]; j--) { float t = ms[j]; ms[j] = ms[j - 1]; ms[j - 1] = t; }
    return ms[reps / 2];
}

/* The cache's part of the last step (append and attention of every layer) replayed as a graph
   of its own, and its append alone (stderr).  It rewrites the last position's rows with the
   last layer's activations: -m bench's random rows, nothing a result depends on. */
static double decoder_cache_ms(Decoder *d) {
    double cache = graph_ms(d, &d->cache_only, d->cache_key, enqueue_cache);
    double append_ms = graph_ms(d, &d->append_only, d->append_key, enqueue_append);
    fprintf(stderr, "bench: append (with CQ encoding) %.3f ms of the cache's %.3f ms a step\n", append_ms, cache);
    return cache;
}

static const char *decoder_device(const Decoder *d) { return d->device; }

static void decoder_free(Decoder *d) {
    if (d->step) cudaGraphExecDestroy(d->step);
    if (d->step_bench) cudaGraphExecDestroy(d->step_bench);
    if (d->cache_only) cudaGraphExecDestroy(d->cache_only);
    if (d->append_only) cudaGraphExecDestroy(d->append_only);
    free_side(&d->k);
    free_side(&d->v);
    void *bufs[] = {d->emb, d->attn_norm, d->ffn_norm, d->final_norm, d->wqkv, d->wo, d->w13, d->w2,
                    d->cls == d->emb ? NULL : d->cls, d->x, d->xb, d->qkv, d->krot, d->att, d->h13, d->hb,
                    d->logits, d->act16, d->io, d->cos_sin, d->fine, d->coarse, d->part_o, d->part_ml, d->blas_ws};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) cudaFree(bufs[i]);
    cudaFreeHost(d->io_host);
    cudaFreeHost(d->logits_host);
    cublasDestroy(d->blas);
    cudaEventDestroy(d->ev0);
    cudaEventDestroy(d->ev1);
    cudaStreamDestroy(d->stream);
    free(d);
}
