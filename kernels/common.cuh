// Device helpers and kernel parameter structs shared by token_logps.cu and dpo.cu.
//
// NVRTC cannot read this file after install, so the Rust side (src/cuda/source.rs) splices it
// in place of the `#include "common.cuh"` line of each kernel source. The host-C++ emulator
// compiles the `.cu` files as they are, so nothing here may depend on how it was included.
//
// Every parameter struct below is passed by value as a kernel's only argument and is mirrored
// field for field by a `#[repr(C)]` struct in src/cuda/params.rs. Fields are ordered 8-byte
// first and sized to a multiple of 8 bytes, so neither side has implicit padding.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifdef __CUDACC_RTC__
// NVRTC ships no <cstdint>; these match the LP64 widths every CUDA target uses.
typedef long long int64_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
#else
#include <cstdint>
#endif

// Loss family codes of DpoPairsParams::loss_kind (LossKind::kernel_code on the Rust side).
#define DPO_LOSS_SIGMOID 0
#define DPO_LOSS_ROBUST 1
#define DPO_LOSS_IPO 2
#define DPO_LOSS_HINGE 3

// Per-position status written by token_logps_fwd (TOKEN_STATUS_* on the Rust side).
#define TOKEN_STATUS_MASKED 0
#define TOKEN_STATUS_VALID 1
#define TOKEN_STATUS_NAN 2
#define TOKEN_STATUS_POS_INF 3
#define TOKEN_STATUS_ALL_NEG_INF 4
#define TOKEN_STATUS_BAD_LABEL 5

// Layout of DpoPairsParams::pair_out (f64), in units of B values, then the metrics block.
#define PAIR_OUT_LOSSES 0
#define PAIR_OUT_DLOSS_DMARGIN 1
#define PAIR_OUT_CHOSEN_REWARDS 2
#define PAIR_OUT_REJECTED_REWARDS 3
#define PAIR_OUT_SEQ_LOGPS 4 // 2B values: chosen rows then rejected rows
#define PAIR_OUT_METRICS 6   // METRIC_COUNT values after the 6B per-pair values

#define METRIC_LOSS 0
#define METRIC_REWARDS_CHOSEN 1
#define METRIC_REWARDS_REJECTED 2
#define METRIC_REWARDS_ACCURACY 3
#define METRIC_REWARDS_MARGIN 4
#define METRIC_LOGPS_CHOSEN 5
#define METRIC_LOGPS_REJECTED 6
#define METRIC_LOGITS_CHOSEN 7
#define METRIC_LOGITS_REJECTED 8
#define METRIC_COUNT 9

// Slots of DpoPairsParams::fault_report.
#define FAULT_REPORT_POSITION 0 // first faulty position p in index order, -1 when none
#define FAULT_REPORT_STATUS 1   // its TOKEN_STATUS_*
#define FAULT_REPORT_INFO 2     // its TokenLogpsFwdParams::fault_info entry
#define FAULT_REPORT_LEN 3

/// Column value meaning "no NaN or +inf seen" in the forward's fault tracking.
#define NO_FAULT_COLUMN 0x7fffffffffffffffLL

/// Arguments of token_logps_fwd_<dtype>_<label>. `P = 2B * T` positions, one logits row each.
struct TokenLogpsFwdParams {
    const void* logits;   // [P, W] T, read (valid positions only)
    const void* labels;   // [P] L, read
    float* row_max;       // [P] f32, written: m = max_{v<V} x[p, v]
    float* row_log_sum;   // [P] f32, written: log(sum_{v<V} exp(x[p, v] - m))
    double* target_logp;  // [P] f64, written: (x[p, y] - m) - log(sum exp(x - m))
    double* logit_sum;    // [P] f64, written: sum_{v<V} x[p, v]
    int64_t* fault_info;  // [P] i64, written: faulty column (NaN, +inf) or bad label, else -1
    int32_t* status;      // [P] i32, written: TOKEN_STATUS_*
    int64_t ignore_index; // label value that masks a position out
    int64_t positions;    // P
    int64_t vocab;        // V, real columns per row
    int64_t row_stride;   // W >= V, elements between consecutive rows
    int32_t warp_per_row; // 1: one warp per row; 0: one block per row
    int32_t reserved;     // 0; keeps the struct a multiple of 8 bytes
};

/// Arguments of dpo_pairs_fwd: the per-sequence sums and the pair step of the forward.
struct DpoPairsParams {
    const double* target_logp;    // [P] f64, read where status == VALID
    const double* logit_sum;      // [P] f64, read where status == VALID
    const int32_t* status;        // [P] i32, read
    const int64_t* fault_info;    // [P] i64, read at the first faulty position
    const float* reference_logps; // [2B] f32, read; null means reference-free (all 0)
    float* seq_coef;              // [2B] f32, written: c[r] = d loss / d seq_logp[r]
    int32_t* seq_valid;           // [2B] i32, written: valid positions per sequence
    double* pair_out;             // [6B + METRIC_COUNT] f64, written: see PAIR_OUT_*
    int64_t* fault_report;        // [FAULT_REPORT_LEN] i64, written: see FAULT_REPORT_*
    int64_t pairs;                // B
    int64_t seq_len;              // T
    int64_t vocab;                // V, for the mean-logit metrics
    float beta;                   // inverse temperature, > 0
    float label_smoothing;        // eps of the sigmoid and robust losses
    int32_t loss_kind;            // DPO_LOSS_*
    int32_t length_normalize;     // 1: divide each sequence sum by its valid count
};

/// Arguments of token_logps_bwd_<dtype>_<label>_<grad dtype>.
struct TokenLogpsBwdParams {
    const void* logits;      // [P, W] T, read (valid positions only)
    const void* labels;      // [P] L, read
    const float* row_max;    // [P] f32, read: m from the forward
    const float* row_log_sum; // [P] f32, read: log_sum from the forward
    const float* seq_coef;   // [2B] f32, read: c[r] from dpo_pairs_fwd
    void* grad;              // [P, W] G, written; may equal logits when G == T
    int64_t ignore_index;    // label value that masks a position out
    int64_t positions;       // P
    int64_t seq_len;         // T, so position p belongs to sequence p / T
    int64_t vocab;           // V
    int64_t row_stride;      // W, shared by logits and grad
    float grad_loss;         // upstream gradient of the loss
    int32_t warp_per_row;    // 1: one warp per row; 0: one block per row
};

// The Rust mirrors in src/cuda/params.rs assert the same sizes.
static_assert(sizeof(TokenLogpsFwdParams) == 104, "TokenLogpsFwdParams has no padding");
static_assert(sizeof(DpoPairsParams) == 112, "DpoPairsParams has no padding");
static_assert(sizeof(TokenLogpsBwdParams) == 96, "TokenLogpsBwdParams has no padding");

/// Returns +inf. NVRTC defines neither INFINITY nor a builtin for it, so the bits go through a
/// union, which both CUDA C++ and GCC define for type punning.
__device__ __forceinline__ float positive_inf()
{
    union {
        uint32_t bits;
        float value;
    } pun;
    pun.bits = 0x7f800000u;
    return pun.value;
}

/// Widens a logits element to f32 (exact for float, __half and __nv_bfloat16).
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

/// Rounds an f32 to `T` to nearest even (identity for float).
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x)
{
    return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x)
{
    return __float2bfloat16_rn(x);
}

/// `N` elements of `T` moved as one aligned vector access of `N * sizeof(T)` bytes.
/// T: element type; N: element count, with `N * sizeof(T)` a power of two up to 16.
template <typename T, int N> struct alignas(sizeof(T) * N) PackN {
    static_assert(sizeof(T) * N <= 16, "a pack is one vector access of at most 16 bytes");
    static_assert((sizeof(T) * N & (sizeof(T) * N - 1)) == 0, "vector accesses are 2^k bytes");
    T v[N];
};

/// 16 bytes of `T` (4 floats or 8 halves), the widest single global load on every CUDA arch.
template <typename T> using Pack16 = PackN<T, 16 / sizeof(T)>;

/// Elements per 16-byte pack of `T`.
template <typename T> struct PackWidth {
    static constexpr int value = 16 / sizeof(T);
};

/// Loads one 16-byte pack starting at `src` (16-byte aligned) and widens it to f32.
/// T: element type; out: PackWidth<T> floats.
template <typename T>
__device__ __forceinline__ void load_pack_f32(const T* src, float (&out)[PackWidth<T>::value])
{
    const Pack16<T> pack = *reinterpret_cast<const Pack16<T>*>(src);
#pragma unroll
    for (int i = 0; i < PackWidth<T>::value; ++i) {
        out[i] = to_f32(pack.v[i]);
    }
}

/// Rounds `N` floats to `G` and stores them at `dst` with vector stores of at most 16 bytes.
/// G: stored type; N: count; dst: aligned to min(16, N * sizeof(G)) bytes.
template <typename G, int N>
__device__ __forceinline__ void store_f32_as(G* dst, const float (&values)[N])
{
    constexpr int kPerStore = (N * sizeof(G) > 16) ? int(16 / sizeof(G)) : N;
    static_assert(N % kPerStore == 0, "stores split the pack evenly");
#pragma unroll
    for (int part = 0; part < N / kPerStore; ++part) {
        PackN<G, kPerStore> pack;
#pragma unroll
        for (int i = 0; i < kPerStore; ++i) {
            pack.v[i] = from_f32<G>(values[part * kPerStore + i]);
        }
        *reinterpret_cast<PackN<G, kPerStore>*>(dst + part * kPerStore) = pack;
    }
}

/// Returns the number of leading elements of `row` before its first 16-byte boundary, capped
/// at `n`. `row` must be aligned to sizeof(T), which every typed device allocation is.
template <typename T> __device__ __forceinline__ int64_t head_before_pack(const T* row, int64_t n)
{
    const uint64_t address = reinterpret_cast<uint64_t>(row);
    const int64_t head = int64_t((16 - (address & 15)) & 15) / int64_t(sizeof(T));
    return head < n ? head : n;
}

/// Visits columns `[0, n)` of one row, split among the `team` threads of a row (this thread is
/// `lane`): scalar columns `[0, head)`, packs of `kWidth` columns from `head` while whole packs
/// fit, and scalar columns for the tail. Each thread visits its columns in increasing order.
/// scalar(col) and pack(col) are called with the column index (int64).
template <int kWidth, typename ScalarFn, typename PackFn>
__device__ __forceinline__ void for_each_column(int64_t n, int64_t head, int lane, int team,
                                                ScalarFn scalar, PackFn pack)
{
    // 1. Scalar head up to the first 16-byte boundary (all of the row when it is unaligned).
    for (int64_t col = lane; col < head; col += team) {
        scalar(col);
    }

    // 2. Whole packs: no bounds check inside, because the pack count is computed up front.
    const int64_t packs = (n - head) / kWidth;
    for (int64_t i = lane; i < packs; i += team) {
        pack(head + i * kWidth);
    }

    // 3. Scalar tail after the last whole pack.
    for (int64_t col = head + packs * kWidth + lane; col < n; col += team) {
        scalar(col);
    }
}

/// Scale of SoftmaxAcc::logit_sum_scaled. Summing x * 2^-32 instead of x keeps the f32 sum
/// finite for any logits (V * FLT_MAX * 2^-32 < FLT_MAX for V < 2^32) at the cost of one FMA
/// per element. Scaling by a power of two is exact except for |x| < 2^-94, whose total effect
/// on a sum stays below V * 2^-126.
#define LOGIT_SUM_SCALE 2.3283064365386963e-10f // 2^-32
#define LOGIT_SUM_UNSCALE 4294967296.0         // 2^32

/// Running log-softmax state of one row: max `m`, `sum = sum exp(x - m)`, the logit sum times
/// LOGIT_SUM_SCALE and the lowest column holding NaN or +inf (NO_FAULT_COLUMN when none).
struct SoftmaxAcc {
    float max;
    float sum;
    float logit_sum_scaled;
    int64_t fault_col;
};

/// Returns the empty state: m = -inf, sums 0, no fault.
__device__ __forceinline__ SoftmaxAcc softmax_acc_empty()
{
    SoftmaxAcc acc;
    acc.max = -positive_inf();
    acc.sum = 0.0f;
    acc.logit_sum_scaled = 0.0f;
    acc.fault_col = NO_FAULT_COLUMN;
    return acc;
}

/// Adds `N` consecutive logits starting at column `col0` to `acc`: one rescale of the running
/// sum when they raise the max, then one exp per value. While m is -inf (only -inf seen so
/// far) no exp runs, because exp(-inf - -inf) would be NaN.
template <int N>
__device__ __forceinline__ void softmax_acc_add(SoftmaxAcc& acc, const float (&x)[N], int64_t col0)
{
    const float inf = positive_inf();
    float chunk_max = x[0];
#pragma unroll
    for (int i = 0; i < N; ++i) {
        // NaN and +inf both fail `x < inf`; keep the lowest such column.
        if (!(x[i] < inf) && col0 + i < acc.fault_col) {
            acc.fault_col = col0 + i;
        }
        chunk_max = fmaxf(chunk_max, x[i]);
        acc.logit_sum_scaled = fmaf(x[i], LOGIT_SUM_SCALE, acc.logit_sum_scaled);
    }
    if (chunk_max > acc.max) {
        acc.sum *= expf(acc.max - chunk_max);
        acc.max = chunk_max;
    }
    if (acc.max > -inf) {
#pragma unroll
        for (int i = 0; i < N; ++i) {
            acc.sum += expf(x[i] - acc.max);
        }
    }
}

/// Merges two partial row states: `m = max(m_a, m_b)`, `s = s_a exp(m_a - m) + s_b exp(m_b - m)`.
/// Both orders give the same bits, so every lane of a butterfly ends with the same value.
__device__ __forceinline__ SoftmaxAcc softmax_acc_merge(const SoftmaxAcc& a, const SoftmaxAcc& b)
{
    SoftmaxAcc out;
    out.max = fmaxf(a.max, b.max);
    if (out.max == -positive_inf()) {
        out.sum = 0.0f;
    } else {
        out.sum = a.sum * expf(a.max - out.max) + b.sum * expf(b.max - out.max);
    }
    out.logit_sum_scaled = a.logit_sum_scaled + b.logit_sum_scaled;
    out.fault_col = a.fault_col < b.fault_col ? a.fault_col : b.fault_col;
    return out;
}

/// Returns the state of lane `lane ^ mask` of this warp (all 32 lanes must call it).
__device__ __forceinline__ SoftmaxAcc shfl_xor(const SoftmaxAcc& a, int mask)
{
    SoftmaxAcc out;
    out.max = __shfl_xor_sync(0xffffffffu, a.max, mask);
    out.sum = __shfl_xor_sync(0xffffffffu, a.sum, mask);
    out.logit_sum_scaled = __shfl_xor_sync(0xffffffffu, a.logit_sum_scaled, mask);
    out.fault_col = __shfl_xor_sync(0xffffffffu, a.fault_col, mask);
    return out;
}

/// Combines `a` over the 32 lanes of a warp with `merge`, in a fixed butterfly order; every
/// lane returns the result. Acc: a plain struct with an `shfl_xor(Acc, int)` overload.
template <typename Acc, typename MergeFn>
__device__ __forceinline__ Acc warp_reduce(Acc a, MergeFn merge)
{
#pragma unroll
    for (int mask = 16; mask > 0; mask >>= 1) {
        a = merge(a, shfl_xor(a, mask));
    }
    return a;
}

/// Combines `a` over every thread of the block in a fixed order (lanes, then warps); every
/// thread returns the result. blockDim.x must be a multiple of 32 and at most 1024, and every
/// thread of the block must call it, since it runs two __syncthreads.
template <typename Acc, typename MergeFn>
__device__ __forceinline__ Acc block_reduce(Acc a, MergeFn merge)
{
    // Slots 0..31 take one partial per warp and slot 32 carries the result. A second call
    // can then write slots 0..31 while slower threads still read slot 32.
    __shared__ Acc slots[33];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;

    // 1. Reduce inside each warp.
    a = warp_reduce(a, merge);
    if (lane == 0) {
        slots[warp] = a;
    }
    __syncthreads();

    // 2. The first warp merges the per-warp partials, and lane 0 ends with all of them. At
    //    mask m it merges lane m, which by then carries slots m + 2km (k >= 0) below `warps`.
    //    Partners at or past `warps` carry no slot that lane 0 needs, so they are skipped and
    //    no identity value is required.
    if (warp == 0) {
        Acc partial = slots[lane < warps ? lane : 0];
#pragma unroll
        for (int mask = 16; mask > 0; mask >>= 1) {
            const Acc other = shfl_xor(partial, mask);
            if ((lane ^ mask) < warps) {
                partial = merge(partial, other);
            }
        }
        if (lane == 0) {
            slots[32] = partial;
        }
    }
    __syncthreads();
    return slots[32];
}
