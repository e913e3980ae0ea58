// Deliberately broken kernels, each with one bug that the emulator must catch
// (tests/emulator.rs). `block_sum` is the correct version the reduction bugs are measured
// against. Compiled only into emulator builds; never part of the library's kernels.

#include <cstdint>

/// Arguments of every kernel in this file.
struct BrokenParams {
    const float* in; // [n] f32, read
    float* out;      // [n] or [gridDim.x] f32, written
    int64_t n;       // elements of `in`
    int64_t cols;    // row length for the 2-D kernels
    int64_t stride;  // row stride of `in` and `out` for the 2-D kernels
    int64_t iterations;
};

/// Sums `in[blockIdx.x * blockDim.x + threadIdx.x]` over each block into `out[blockIdx.x]`:
/// every thread stores its value in shared memory, and thread 0 adds them up after the
/// barrier. blockDim.x <= 256.
extern "C" __global__ void block_sum(BrokenParams p)
{
    __shared__ float values[256];
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    values[threadIdx.x] = i < p.n ? p.in[i] : 0.0f;
    __syncthreads();
    if (threadIdx.x == 0) {
        float sum = 0.0f;
        for (unsigned t = 0; t < blockDim.x; ++t) {
            sum += values[t];
        }
        p.out[blockIdx.x] = sum;
    }
}

/// BUG: `block_sum` without its barrier, so thread 0 can read slots other threads have not
/// written yet (poison in the emulator).
extern "C" __global__ void block_sum_missing_barrier(BrokenParams p)
{
    __shared__ float values[256];
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    values[threadIdx.x] = i < p.n ? p.in[i] : 0.0f;
    if (threadIdx.x == 0) {
        float sum = 0.0f;
        for (unsigned t = 0; t < blockDim.x; ++t) {
            sum += values[t];
        }
        p.out[blockIdx.x] = sum;
    }
}

/// BUG: a tree reduction missing the barrier between its halving steps, so a thread can add a
/// partner slot before the partner has updated it.
extern "C" __global__ void tree_sum_missing_barrier(BrokenParams p)
{
    __shared__ float values[256];
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    values[threadIdx.x] = i < p.n ? p.in[i] : 0.0f;
    __syncthreads();
    for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) {
            values[threadIdx.x] += values[threadIdx.x + half];
        }
    }
    if (threadIdx.x == 0) {
        p.out[blockIdx.x] = values[0];
    }
}

/// BUG: a barrier inside a branch that only half of the block takes.
extern "C" __global__ void divergent_barrier(BrokenParams p)
{
    __shared__ float values[256];
    values[threadIdx.x] = 1.0f;
    if (threadIdx.x < blockDim.x / 2) {
        __syncthreads();
    }
    __syncthreads();
    p.out[threadIdx.x] = values[blockDim.x - 1 - threadIdx.x];
}

/// BUG: threads past `n` return before a barrier the others wait at.
extern "C" __global__ void early_exit_barrier(BrokenParams p)
{
    __shared__ float values[256];
    if (threadIdx.x >= p.n) {
        return;
    }
    values[threadIdx.x] = p.in[threadIdx.x];
    __syncthreads();
    p.out[threadIdx.x] = values[p.n - 1 - threadIdx.x];
}

/// BUG: copies `in` to `out` with `<=` in the tail bound, writing one element past the end.
extern "C" __global__ void copy_off_by_one(BrokenParams p)
{
    const int64_t step = int64_t(blockDim.x) * gridDim.x;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i <= p.n; i += step) {
        p.out[i] = p.in[i];
    }
}

/// BUG: copies the first `cols` columns of each row of a `[rows, stride]` matrix but indexes
/// the output rows with `cols` instead of `stride`, so rows land at the wrong offsets.
extern "C" __global__ void copy_rows_wrong_stride(BrokenParams p)
{
    const int64_t row = blockIdx.x;
    for (int64_t col = threadIdx.x; col < p.cols; col += blockDim.x) {
        p.out[row * p.cols + col] = p.in[row * p.stride + col];
    }
}

/// BUG: copies the first `cols` columns of each row of a `[rows, stride]` matrix into a
/// compact `[rows, cols]` output but indexes the output with the input's stride, so the last
/// rows land past the end of the output.
extern "C" __global__ void copy_rows_output_stride(BrokenParams p)
{
    const int64_t row = blockIdx.x;
    for (int64_t col = threadIdx.x; col < p.cols; col += blockDim.x) {
        p.out[row * p.stride + col] = p.in[row * p.stride + col];
    }
}

/// BUG: a warp shuffle with a half-warp mask, which the emulator does not model.
extern "C" __global__ void partial_mask_shuffle(BrokenParams p)
{
    const float v = p.in[threadIdx.x];
    p.out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, v, 1);
}

/// BUG: a full-mask shuffle that only lanes 0-15 reach.
extern "C" __global__ void divergent_shuffle(BrokenParams p)
{
    float v = p.in[threadIdx.x];
    if ((threadIdx.x & 31) < 16) {
        v += __shfl_xor_sync(0xffffffffu, v, 1);
    }
    p.out[threadIdx.x] = v;
}

/// BUG: loops over barriers for `iterations` rounds, far longer than any time limit a test
/// sets.
extern "C" __global__ void endless_barriers(BrokenParams p)
{
    __shared__ float value[1];
    for (int64_t k = 0; k < p.iterations; ++k) {
        if (threadIdx.x == 0) {
            value[0] = float(k);
        }
        __syncthreads();
    }
    p.out[threadIdx.x] = value[0];
}

/// BUG: writes past the dynamic shared memory the launch requested (`n` floats).
extern "C" __global__ void dynamic_shared_overflow(BrokenParams p)
{
    extern __shared__ float tile[];
    tile[threadIdx.x] = p.in[threadIdx.x];
    __syncthreads();
    p.out[threadIdx.x] = tile[threadIdx.x];
}

/// BUG: asserts something false for thread 5.
extern "C" __global__ void failing_assert(BrokenParams p)
{
    assert(threadIdx.x != 5);
    p.out[threadIdx.x] = 0.0f;
}
