// The DPO pair step on the GPU: per-sequence masked sums of the token log-probs, the loss of
// each chosen/rejected pair, rewards, batch metrics and the per-sequence gradient coefficient
// c[r]. c[r] stays on the device for token_logps_bwd, so no host round trip sits in between.
//
// Rows 0..B of the batch are the chosen responses and rows B..2B the rejected responses of the
// same pairs, so pair i is sequences i and B + i.

#include "common.cuh"

// ------------------------------------------------------------------------------------------
// dpo_pairs_fwd
//
// Computes: with valid[r,t] = (status[r*T + t] == VALID),
//   seq[r]  = sum_t valid[r,t] * logp[r,t]   (divided by n[r] = sum_t valid[r,t] when
//             length_normalize and n[r] > 0)
//   z_i     = (seq[i] - ref[i]) - (seq[B+i] - ref[B+i]),   u_i = beta * z_i
//   loss_i  = l(z_i), dz_i = l'(z_i) with l from loss_kind (same formulas as config.rs):
//             sigmoid  (1 - eps) softplus(-u) + eps softplus(u)
//             robust   ((1 - eps) softplus(-u) - eps softplus(u)) / (1 - 2 eps)
//             ipo      (z - 1 / (2 beta))^2
//             hinge    max(0, 1 - u)
//   c[i]    = dz_i / (B * norm_i),  c[B+i] = -dz_i / (B * norm_{B+i})  (norm = n[r] when
//             length-normalised and n[r] > 0, else 1), for an upstream gradient of 1
//   rewards, accuracy (chosen reward strictly greater), margins, mean log-probs and mean
//   logits per half, as in src/cpu/dpo.rs.
// Shapes: read from token_logps_fwd: target_logp, logit_sum [P] f64, status [P] i32 and
//   fault_info [P] i64. Read: reference_logps [2B] f32 or null. Written: seq_coef [2B] f32,
//   seq_valid [2B] i32, pair_out [6B + METRIC_COUNT] f64 and fault_report [3] i64.
// Strides: position (r, t) is element r * T + t; all buffers contiguous.
// Grid: one block of 512 threads. Step 1 gives each warp whole sequences (lanes stride over
//   T), step 3 gives each thread whole pairs. The work is O(P) reads of 12 bytes, tiny next
//   to the logits pass, and one block makes every sum a fixed-order reduction with no atomics
//   and no second launch.
// Traffic: reads 20 bytes per position plus 4 per sequence; writes 8 bytes per sequence and
//   48 bytes per pair.
// Numerics: f64, like the CPU backend's pair step, because the work is O(P) and the host then
//   applies the CPU backend's rounding rules to pair_out (NaN and f32 overflow become errors
//   there). Per-sequence sums are per-lane sums in position order followed by a fixed
//   butterfly, so results are bit-identical run to run. softplus and sigmoid are written in
//   their overflow-free forms, and a loss term whose weight is 0 adds 0 even where the term
//   is infinite (no 0 * inf = NaN). c[r] is rounded to f32 for the backward. If any
//   position has a status other than MASKED or VALID, only fault_report is written: the first
//   such position in index order, its status and its fault_info.
// LIMIT: B * T < 2^63; blockDim.x must be a multiple of 32, at most 1024.
// ------------------------------------------------------------------------------------------

/// Masked sums of one sequence.
struct SeqSums {
    double logp;
    double logit;
    int64_t valid;
    int64_t first_fault; // lowest faulty position, NO_FAULT_COLUMN when none
};

/// Sums over every sequence of the batch, split into chosen and rejected halves.
struct HalfSums {
    double logit_chosen;
    double logit_rejected;
    int64_t valid_chosen;
    int64_t valid_rejected;
    int64_t first_fault;
};

/// Sums over the pairs for the batch metrics.
struct PairSums {
    double loss;
    double rewards_chosen;
    double rewards_rejected;
    double margin;
    double logps_chosen;
    double logps_rejected;
    int64_t correct;
};

__device__ __forceinline__ SeqSums shfl_xor(const SeqSums& a, int mask)
{
    SeqSums out;
    out.logp = __shfl_xor_sync(0xffffffffu, a.logp, mask);
    out.logit = __shfl_xor_sync(0xffffffffu, a.logit, mask);
    out.valid = __shfl_xor_sync(0xffffffffu, a.valid, mask);
    out.first_fault = __shfl_xor_sync(0xffffffffu, a.first_fault, mask);
    return out;
}

__device__ __forceinline__ HalfSums shfl_xor(const HalfSums& a, int mask)
{
    HalfSums out;
    out.logit_chosen = __shfl_xor_sync(0xffffffffu, a.logit_chosen, mask);
    out.logit_rejected = __shfl_xor_sync(0xffffffffu, a.logit_rejected, mask);
    out.valid_chosen = __shfl_xor_sync(0xffffffffu, a.valid_chosen, mask);
    out.valid_rejected = __shfl_xor_sync(0xffffffffu, a.valid_rejected, mask);
    out.first_fault = __shfl_xor_sync(0xffffffffu, a.first_fault, mask);
    return out;
}

__device__ __forceinline__ PairSums shfl_xor(const PairSums& a, int mask)
{
    PairSums out;
    out.loss = __shfl_xor_sync(0xffffffffu, a.loss, mask);
    out.rewards_chosen = __shfl_xor_sync(0xffffffffu, a.rewards_chosen, mask);
    out.rewards_rejected = __shfl_xor_sync(0xffffffffu, a.rewards_rejected, mask);
    out.margin = __shfl_xor_sync(0xffffffffu, a.margin, mask);
    out.logps_chosen = __shfl_xor_sync(0xffffffffu, a.logps_chosen, mask);
    out.logps_rejected = __shfl_xor_sync(0xffffffffu, a.logps_rejected, mask);
    out.correct = __shfl_xor_sync(0xffffffffu, a.correct, mask);
    return out;
}

__device__ __forceinline__ int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

/// log(1 + exp(x)) without overflow for any x.
__device__ __forceinline__ double softplus(double x) { return fmax(x, 0.0) + log1p(exp(-fabs(x))); }

/// 1 / (1 + exp(-x)) without overflow, because exp only gets a non-positive argument.
__device__ __forceinline__ double sigmoid(double x)
{
    if (x >= 0.0) {
        return 1.0 / (1.0 + exp(-x));
    }
    const double e = exp(x);
    return e / (1.0 + e);
}

/// Returns weight * term, and 0 for a zero weight even when term is infinite.
__device__ __forceinline__ double weighted(double weight, double term)
{
    return weight == 0.0 ? 0.0 : weight * term;
}

/// Loss l(z) and its derivative l'(z) of one pair; `kind` is a DPO_LOSS_* code.
__device__ __forceinline__ void pair_loss(int kind, double beta, double eps, double z,
                                          double& loss, double& dz)
{
    const double u = beta * z;
    switch (kind) {
    case DPO_LOSS_ROBUST: {
        const double norm = 1.0 - 2.0 * eps;
        loss = (weighted(1.0 - eps, softplus(-u)) - weighted(eps, softplus(u))) / norm;
        dz = beta * (-(1.0 - eps) * sigmoid(-u) - eps * sigmoid(u)) / norm;
        break;
    }
    case DPO_LOSS_IPO: {
        const double d = z - 1.0 / (2.0 * beta);
        loss = d * d;
        dz = 2.0 * d;
        break;
    }
    case DPO_LOSS_HINGE:
        loss = u < 1.0 ? 1.0 - u : 0.0;
        dz = u < 1.0 ? -beta : 0.0;
        break;
    default: // DPO_LOSS_SIGMOID
        loss = weighted(1.0 - eps, softplus(-u)) + weighted(eps, softplus(u));
        dz = beta * (-(1.0 - eps) * sigmoid(-u) + eps * sigmoid(u));
        break;
    }
}

__device__ void dpo_pairs(const DpoPairsParams& p)
{
    const int64_t B = p.pairs;
    const int64_t T = p.seq_len;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    double* seq_logp = p.pair_out + PAIR_OUT_SEQ_LOGPS * B;

    // 1. One warp per sequence: masked sums in position order per lane, then a butterfly.
    //    Lane 0 of each warp keeps its sequences' half totals; the other lanes keep zeros.
    HalfSums half = {0.0, 0.0, 0, 0, NO_FAULT_COLUMN};
    auto merge_seq = [](const SeqSums& a, const SeqSums& b) {
        SeqSums out = {a.logp + b.logp, a.logit + b.logit, a.valid + b.valid,
                       min_i64(a.first_fault, b.first_fault)};
        return out;
    };
    for (int64_t r = warp; r < 2 * B; r += warps) {
        SeqSums seq = {0.0, 0.0, 0, NO_FAULT_COLUMN};
        for (int64_t t = lane; t < T; t += 32) {
            const int64_t pos = r * T + t;
            const int32_t status = p.status[pos];
            if (status == TOKEN_STATUS_VALID) {
                seq.logp += p.target_logp[pos];
                seq.logit += p.logit_sum[pos];
                seq.valid += 1;
            } else if (status != TOKEN_STATUS_MASKED && pos < seq.first_fault) {
                seq.first_fault = pos;
            }
        }
        seq = warp_reduce(seq, merge_seq);
        half.first_fault = min_i64(half.first_fault, seq.first_fault);
        if (lane == 0) {
            const bool normalize = p.length_normalize && seq.valid > 0;
            seq_logp[r] = normalize ? seq.logp / double(seq.valid) : seq.logp;
            p.seq_valid[r] = int32_t(seq.valid);
            if (r < B) {
                half.logit_chosen += seq.logit;
                half.valid_chosen += seq.valid;
            } else {
                half.logit_rejected += seq.logit;
                half.valid_rejected += seq.valid;
            }
        }
    }

    // 2. Batch totals. The __syncthreads inside block_reduce also make step 1's global writes
    //    (seq_logp, seq_valid) visible to every thread of the block for step 3.
    auto merge_half = [](const HalfSums& a, const HalfSums& b) {
        HalfSums out = {a.logit_chosen + b.logit_chosen, a.logit_rejected + b.logit_rejected,
                        a.valid_chosen + b.valid_chosen, a.valid_rejected + b.valid_rejected,
                        min_i64(a.first_fault, b.first_fault)};
        return out;
    };
    half = block_reduce(half, merge_half);
    if (half.first_fault != NO_FAULT_COLUMN) {
        if (threadIdx.x == 0) {
            p.fault_report[FAULT_REPORT_POSITION] = half.first_fault;
            p.fault_report[FAULT_REPORT_STATUS] = p.status[half.first_fault];
            p.fault_report[FAULT_REPORT_INFO] = p.fault_info[half.first_fault];
        }
        return;
    }

    // 3. One thread per pair: margin, loss, rewards and c[r] of both sequences.
    PairSums sums = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0};
    const double beta = p.beta;
    for (int64_t i = threadIdx.x; i < B; i += blockDim.x) {
        const double ref_chosen = p.reference_logps ? p.reference_logps[i] : 0.0;
        const double ref_rejected = p.reference_logps ? p.reference_logps[B + i] : 0.0;
        const double chosen = seq_logp[i] - ref_chosen;
        const double rejected = seq_logp[B + i] - ref_rejected;
        double loss;
        double dz;
        pair_loss(p.loss_kind, beta, p.label_smoothing, chosen - rejected, loss, dz);
        const double chosen_reward = beta * chosen;
        const double rejected_reward = beta * rejected;
        p.pair_out[PAIR_OUT_LOSSES * B + i] = loss;
        p.pair_out[PAIR_OUT_DLOSS_DMARGIN * B + i] = dz;
        p.pair_out[PAIR_OUT_CHOSEN_REWARDS * B + i] = chosen_reward;
        p.pair_out[PAIR_OUT_REJECTED_REWARDS * B + i] = rejected_reward;

        // z grows with the chosen log-prob and falls with the rejected one.
        const int32_t valid_chosen = p.seq_valid[i];
        const int32_t valid_rejected = p.seq_valid[B + i];
        const bool normalize = p.length_normalize != 0;
        const double norm_chosen = normalize && valid_chosen > 0 ? double(valid_chosen) : 1.0;
        const double norm_rejected =
            normalize && valid_rejected > 0 ? double(valid_rejected) : 1.0;
        p.seq_coef[i] = float(dz / (double(B) * norm_chosen));
        p.seq_coef[B + i] = float(-dz / (double(B) * norm_rejected));

        sums.loss += loss;
        sums.rewards_chosen += chosen_reward;
        sums.rewards_rejected += rejected_reward;
        sums.margin += chosen_reward - rejected_reward;
        sums.logps_chosen += seq_logp[i];
        sums.logps_rejected += seq_logp[B + i];
        sums.correct += chosen_reward > rejected_reward ? 1 : 0;
    }

    // 4. Means over the pairs; logits means over every valid position of each half and V.
    auto merge_pairs = [](const PairSums& a, const PairSums& b) {
        PairSums out = {a.loss + b.loss,
                        a.rewards_chosen + b.rewards_chosen,
                        a.rewards_rejected + b.rewards_rejected,
                        a.margin + b.margin,
                        a.logps_chosen + b.logps_chosen,
                        a.logps_rejected + b.logps_rejected,
                        a.correct + b.correct};
        return out;
    };
    sums = block_reduce(sums, merge_pairs);
    if (threadIdx.x == 0) {
        const double pairs = double(B);
        const double vocab = double(p.vocab);
        double* metrics = p.pair_out + PAIR_OUT_METRICS * B;
        metrics[METRIC_LOSS] = sums.loss / pairs;
        metrics[METRIC_REWARDS_CHOSEN] = sums.rewards_chosen / pairs;
        metrics[METRIC_REWARDS_REJECTED] = sums.rewards_rejected / pairs;
        metrics[METRIC_REWARDS_ACCURACY] = double(sums.correct) / pairs;
        metrics[METRIC_REWARDS_MARGIN] = sums.margin / pairs;
        metrics[METRIC_LOGPS_CHOSEN] = sums.logps_chosen / pairs;
        metrics[METRIC_LOGPS_REJECTED] = sums.logps_rejected / pairs;
        metrics[METRIC_LOGITS_CHOSEN] =
            half.valid_chosen > 0 ? half.logit_chosen / (double(half.valid_chosen) * vocab) : 0.0;
        metrics[METRIC_LOGITS_REJECTED] =
            half.valid_rejected > 0 ? half.logit_rejected / (double(half.valid_rejected) * vocab)
                                    : 0.0;
        p.fault_report[FAULT_REPORT_POSITION] = -1;
        p.fault_report[FAULT_REPORT_STATUS] = 0;
        p.fault_report[FAULT_REPORT_INFO] = -1;
    }
}

extern "C" __global__ void dpo_pairs_fwd(DpoPairsParams p) { dpo_pairs(p); }
