// Token log-probs of the policy: the one pass over the logits that the DPO forward needs, and
// the matching backward that writes d loss / d logits. Both read each valid logits row once.
// The forward keeps O(P) per-row state (max, log-sum, status), so the backward needs no
// second reduction. Nothing of size P x V is allocated besides the caller's buffers.

#include "common.cuh"

// ------------------------------------------------------------------------------------------
// token_logps_fwd_<dtype>_<label>
//
// Computes: per position p with label y = labels[p] != ignore_index, in one pass over the row
//   m[p]        = max_{v<V} x[p, v]
//   log_sum[p]  = log(sum_{v<V} exp(x[p, v] - m[p]))
//   logp[p]     = (x[p, y] - m[p]) - log_sum[p]      (formed in f64)
//   logit_sum[p] = sum_{v<V} x[p, v]                (stored in f64)
// Shapes: P = 2B * T positions, V vocabulary, W >= V row stride. Read: logits [P, W] T and
//   labels [P] L. Written for every position, masked ones included: row_max, row_log_sum
//   [P] f32, target_logp, logit_sum [P] f64, fault_info [P] i64 and status [P] i32.
// Strides: row p starts at element p * W (int64); columns are contiguous. Rows need not be
//   16-byte aligned: each row is split at its own first 16-byte boundary.
// Grid: V > 1024: one block of 256 threads per row (512 when V > 16384), so a 128k row is
//   spread over enough threads to keep ~64 bytes per thread in flight; the row reduction
//   costs two __syncthreads. V <= 1024: one warp per row, 8 rows per 256-thread block, so
//   short rows do not idle a whole block and reduce with shuffles only. Rows are visited in
//   a grid-stride loop, so any P fits in the grid.
// Traffic: reads V * sizeof(T) per valid row plus P * sizeof(L) of labels; writes 36 bytes
//   per position. Masked rows are not read.
// Numerics: f32 per element. Each thread keeps an online (max, sum) and rescales its sum
//   once per 16-byte pack that raises the max; partials merge by rescaling to the larger max.
//   The target log-prob is formed as (x_y - m) - log(s), never x_y - lse, so large logits lose
//   no digits. That last step runs in f64 once per row, so a log-prob beyond the f32 range
//   (logits near +-FLT_MAX) reaches the pair kernel finite and is reported as an overflow, as
//   on the CPU. The logit sum is accumulated as x * 2^-32 (LOGIT_SUM_SCALE), so it cannot
//   overflow. A row whose real columns are all -inf gets status ALL_NEG_INF. NaN and +inf
//   give status NAN / POS_INF with the lowest such column in fault_info (its outputs are then
//   meaningless). A label outside [0, V) that is not ignore_index gives BAD_LABEL and is not
//   used as an index.
// LIMIT: logits must be aligned to sizeof(T); blockDim.x must be a multiple of 32, <= 1024.
// LIMIT: bf16 needs sm_80 or newer for native conversions (cuda_bf16.h emulates older archs).
// ------------------------------------------------------------------------------------------

/// Forward of one row `pos`, run by the `team` threads of its warp or block (this one is
/// `lane`). block_team selects the block-wide reduction.
template <typename T, typename L>
__device__ __forceinline__ void token_logps_fwd_row(const TokenLogpsFwdParams& p, int64_t pos,
                                                    int lane, int team, bool block_team)
{
    // 1. Masked positions and bad labels are recorded without reading the row.
    const int64_t y = static_cast<int64_t>(static_cast<const L*>(p.labels)[pos]);
    const bool masked = y == p.ignore_index;
    if (masked || y < 0 || y >= p.vocab) {
        if (lane == 0) {
            p.row_max[pos] = 0.0f;
            p.row_log_sum[pos] = 0.0f;
            p.target_logp[pos] = 0.0;
            p.logit_sum[pos] = 0.0;
            p.fault_info[pos] = masked ? -1 : y;
            p.status[pos] = masked ? TOKEN_STATUS_MASKED : TOKEN_STATUS_BAD_LABEL;
        }
        return;
    }

    // 2. One pass: scalar head to the first 16-byte boundary, 16-byte packs, scalar tail.
    const T* row = static_cast<const T*>(p.logits) + pos * p.row_stride;
    constexpr int kWidth = PackWidth<T>::value;
    SoftmaxAcc acc = softmax_acc_empty();
    auto scalar = [&](int64_t col) {
        const float x[1] = {to_f32(row[col])};
        softmax_acc_add(acc, x, col);
    };
    auto pack = [&](int64_t col) {
        float x[kWidth];
        load_pack_f32(row + col, x);
        softmax_acc_add(acc, x, col);
    };
    for_each_column<kWidth>(p.vocab, head_before_pack(row, p.vocab), lane, team, scalar, pack);

    // 3. Merge the team's partial states in a fixed order (bit-identical run to run).
    auto merge = [](const SoftmaxAcc& a, const SoftmaxAcc& b) { return softmax_acc_merge(a, b); };
    acc = block_team ? block_reduce(acc, merge) : warp_reduce(acc, merge);

    // 4. Classify the row and write its outputs. The target logit is re-read by one thread:
    //    one element, almost always still in L2 from step 2.
    if (lane != 0) {
        return;
    }
    float log_sum = 0.0f;
    double logp = 0.0;
    int32_t status = TOKEN_STATUS_VALID;
    int64_t info = -1;
    if (acc.fault_col != NO_FAULT_COLUMN) {
        status = isnan(to_f32(row[acc.fault_col])) ? TOKEN_STATUS_NAN : TOKEN_STATUS_POS_INF;
        info = acc.fault_col;
    } else if (acc.max == -positive_inf()) {
        status = TOKEN_STATUS_ALL_NEG_INF;
    } else {
        const double log_sum_f64 = log(double(acc.sum));
        log_sum = float(log_sum_f64);
        logp = (double(to_f32(row[y])) - double(acc.max)) - log_sum_f64;
    }
    p.row_max[pos] = acc.max;
    p.row_log_sum[pos] = log_sum;
    p.target_logp[pos] = logp;
    p.logit_sum[pos] = double(acc.logit_sum_scaled) * LOGIT_SUM_UNSCALE;
    p.fault_info[pos] = info;
    p.status[pos] = status;
}

/// Forward over every position: a grid-stride loop over rows, one warp or one block per row.
template <typename T, typename L> __device__ void token_logps_fwd(const TokenLogpsFwdParams& p)
{
    if (p.warp_per_row) {
        const int rows_per_block = blockDim.x >> 5;
        const int64_t first = int64_t(blockIdx.x) * rows_per_block + (threadIdx.x >> 5);
        const int64_t step = int64_t(gridDim.x) * rows_per_block;
        for (int64_t pos = first; pos < p.positions; pos += step) {
            token_logps_fwd_row<T, L>(p, pos, threadIdx.x & 31, 32, false);
        }
    } else {
        // Every thread of the block runs the same trip count, so the __syncthreads inside
        // block_reduce are reached by all of them.
        for (int64_t pos = blockIdx.x; pos < p.positions; pos += gridDim.x) {
            token_logps_fwd_row<T, L>(p, pos, threadIdx.x, blockDim.x, true);
        }
    }
}

// ------------------------------------------------------------------------------------------
// token_logps_bwd_<dtype>_<label>_<grad dtype>
//
// Computes: per position p of sequence r = p / T with label y = labels[p],
//   grad[p, v] = grad_loss * c[r] * (onehot(y)[v] - exp((x[p, v] - m[p]) - log_sum[p]))
//   for v < V, and grad[p, v] = 0 for padded columns V <= v < W and for masked positions.
// Shapes: logits [P, W] T (read), labels [P] L (read), row_max and row_log_sum [P] f32 (read,
//   from token_logps_fwd), seq_coef [2B] f32 (read, from dpo_pairs_fwd), grad [P, W] G
//   (written, every element). grad may be the logits buffer itself when G == T.
// Strides: row p of logits and grad starts at element p * W (int64). Packs start at the
//   logits row's first 16-byte boundary. They are used when the grad row is aligned there to
//   min(16, 16 / sizeof(T) * sizeof(G)) bytes, else the row is written element by element.
// Grid: same split as the forward (block per row for V > 1024, warp per row otherwise); no
//   reduction, so threads of a row are independent.
// Traffic: reads V * sizeof(T) per valid row, 8 bytes of row state per position, labels;
//   writes W * sizeof(G) per position.
// Numerics: f32. The probability is exp((x - m) - log_sum) with the forward's m and log_sum,
//   the same expression as the CPU backend, and the target column gets c * (1 - p), not
//   c - c * p. In place, each element is read by the thread that later overwrites it, before
//   it does so; masked rows are zeroed without being read.
// LIMIT: a label outside [0, V) that is not ignore_index zeroes its row (the host rejects such
//   labels before launch). logits and grad must be aligned to their element size.
// ------------------------------------------------------------------------------------------

/// Writes zeros over columns [0, n) of one grad row, with 16-byte stores where aligned.
template <typename G>
__device__ __forceinline__ void zero_row(G* row, int64_t n, int lane, int team)
{
    constexpr int kWidth = PackWidth<G>::value;
    auto scalar = [&](int64_t col) { row[col] = from_f32<G>(0.0f); };
    auto pack = [&](int64_t col) {
        const float zeros[kWidth] = {};
        store_f32_as(row + col, zeros);
    };
    for_each_column<kWidth>(n, head_before_pack(row, n), lane, team, scalar, pack);
}

/// Backward of one row `pos`, run by the `team` threads of its warp or block.
template <typename T, typename L, typename G>
__device__ __forceinline__ void token_logps_bwd_row(const TokenLogpsBwdParams& p, int64_t pos,
                                                    int lane, int team)
{
    G* grad = static_cast<G*>(p.grad) + pos * p.row_stride;

    // 1. Masked positions (and labels the host would have rejected): zeros, no logits read.
    const int64_t y = static_cast<int64_t>(static_cast<const L*>(p.labels)[pos]);
    if (y == p.ignore_index || y < 0 || y >= p.vocab) {
        zero_row(grad, p.row_stride, lane, team);
        return;
    }

    // 2. Row constants: coef = grad_loss * c[r] with r = pos / T.
    const T* row = static_cast<const T*>(p.logits) + pos * p.row_stride;
    const float max = p.row_max[pos];
    const float log_sum = p.row_log_sum[pos];
    const float coef = p.grad_loss * p.seq_coef[pos / p.seq_len];

    // 3. Packs start at the logits row's 16-byte boundary. The grad row must be aligned there
    //    for its stores (narrower or wider than the loads), else the whole row goes scalar.
    constexpr int kWidth = PackWidth<T>::value;
    constexpr uint64_t kGradAlign = (kWidth * sizeof(G) < 16) ? kWidth * sizeof(G) : 16;
    int64_t head = head_before_pack(row, p.vocab);
    if ((reinterpret_cast<uint64_t>(grad + head) & (kGradAlign - 1)) != 0) {
        head = p.vocab;
    }

    // 4. grad = coef * (onehot - p) over the real columns, each element read then written
    //    by the same thread (in place safe).
    auto gradient = [&](float x, int64_t col) {
        const float prob = expf((x - max) - log_sum);
        return col == y ? coef * (1.0f - prob) : -coef * prob;
    };
    auto scalar = [&](int64_t col) { grad[col] = from_f32<G>(gradient(to_f32(row[col]), col)); };
    auto pack = [&](int64_t col) {
        float values[kWidth];
        load_pack_f32(row + col, values);
#pragma unroll
        for (int i = 0; i < kWidth; ++i) {
            values[i] = gradient(values[i], col + i);
        }
        store_f32_as(grad + col, values);
    };
    for_each_column<kWidth>(p.vocab, head, lane, team, scalar, pack);

    // 5. Padded columns V..W get 0 (usually a handful, so scalar stores).
    for (int64_t col = p.vocab + lane; col < p.row_stride; col += team) {
        grad[col] = from_f32<G>(0.0f);
    }
}

/// Backward over every position: a grid-stride loop over rows, one warp or one block per row.
template <typename T, typename L, typename G>
__device__ void token_logps_bwd(const TokenLogpsBwdParams& p)
{
    if (p.warp_per_row) {
        const int rows_per_block = blockDim.x >> 5;
        const int64_t first = int64_t(blockIdx.x) * rows_per_block + (threadIdx.x >> 5);
        const int64_t step = int64_t(gridDim.x) * rows_per_block;
        for (int64_t pos = first; pos < p.positions; pos += step) {
            token_logps_bwd_row<T, L, G>(p, pos, threadIdx.x & 31, 32);
        }
    } else {
        for (int64_t pos = blockIdx.x; pos < p.positions; pos += gridDim.x) {
            token_logps_bwd_row<T, L, G>(p, pos, threadIdx.x, blockDim.x);
        }
    }
}

// ------------------------------------------------------------------------------------------
// Entries: logits dtype x label dtype for the forward; x grad dtype for the backward.
// ------------------------------------------------------------------------------------------

#define TOKEN_LOGPS_FWD(NAME, T, L)                                                         \
    extern "C" __global__ void NAME(TokenLogpsFwdParams p) { token_logps_fwd<T, L>(p); }

TOKEN_LOGPS_FWD(token_logps_fwd_f32_i32, float, int32_t)
TOKEN_LOGPS_FWD(token_logps_fwd_f32_i64, float, int64_t)
TOKEN_LOGPS_FWD(token_logps_fwd_f16_i32, __half, int32_t)
TOKEN_LOGPS_FWD(token_logps_fwd_f16_i64, __half, int64_t)
TOKEN_LOGPS_FWD(token_logps_fwd_bf16_i32, __nv_bfloat16, int32_t)
TOKEN_LOGPS_FWD(token_logps_fwd_bf16_i64, __nv_bfloat16, int64_t)

#define TOKEN_LOGPS_BWD(NAME, T, L, G)                                                      \
    extern "C" __global__ void NAME(TokenLogpsBwdParams p) { token_logps_bwd<T, L, G>(p); }

TOKEN_LOGPS_BWD(token_logps_bwd_f32_i32_f32, float, int32_t, float)
TOKEN_LOGPS_BWD(token_logps_bwd_f32_i32_f16, float, int32_t, __half)
TOKEN_LOGPS_BWD(token_logps_bwd_f32_i32_bf16, float, int32_t, __nv_bfloat16)
TOKEN_LOGPS_BWD(token_logps_bwd_f32_i64_f32, float, int64_t, float)
TOKEN_LOGPS_BWD(token_logps_bwd_f32_i64_f16, float, int64_t, __half)
TOKEN_LOGPS_BWD(token_logps_bwd_f32_i64_bf16, float, int64_t, __nv_bfloat16)
TOKEN_LOGPS_BWD(token_logps_bwd_f16_i32_f32, __half, int32_t, float)
TOKEN_LOGPS_BWD(token_logps_bwd_f16_i32_f16, __half, int32_t, __half)
TOKEN_LOGPS_BWD(token_logps_bwd_f16_i32_bf16, __half, int32_t, __nv_bfloat16)
TOKEN_LOGPS_BWD(token_logps_bwd_f16_i64_f32, __half, int64_t, float)
TOKEN_LOGPS_BWD(token_logps_bwd_f16_i64_f16, __half, int64_t, __half)
TOKEN_LOGPS_BWD(token_logps_bwd_f16_i64_bf16, __half, int64_t, __nv_bfloat16)
TOKEN_LOGPS_BWD(token_logps_bwd_bf16_i32_f32, __nv_bfloat16, int32_t, float)
TOKEN_LOGPS_BWD(token_logps_bwd_bf16_i32_f16, __nv_bfloat16, int32_t, __half)
TOKEN_LOGPS_BWD(token_logps_bwd_bf16_i32_bf16, __nv_bfloat16, int32_t, __nv_bfloat16)
TOKEN_LOGPS_BWD(token_logps_bwd_bf16_i64_f32, __nv_bfloat16, int64_t, float)
TOKEN_LOGPS_BWD(token_logps_bwd_bf16_i64_f16, __nv_bfloat16, int64_t, __half)
TOKEN_LOGPS_BWD(token_logps_bwd_bf16_i64_bf16, __nv_bfloat16, int64_t, __nv_bfloat16)
