// Correct kernels that exercise the emulator's built-ins one at a time: thread and block
// coordinates, warp shuffles and votes, 16-bit float conversions and dynamic shared memory.
// tests/emulator.rs compares their outputs with values computed in Rust. Compiled only into
// emulator builds.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

/// Arguments of `coordinates`.
struct CoordinateParams {
    uint32_t* out; // [grid threads * 8] u32, written
};

/// Writes, for each thread of a 3-D grid, its threadIdx, blockIdx (x, y, z, 3 + 3 values) and
/// blockDim.x * gridDim.z into slot `8 * linear id`, plus warpSize.
extern "C" __global__ void coordinates(CoordinateParams p)
{
    const uint64_t block = (uint64_t(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    const uint64_t threads = uint64_t(blockDim.x) * blockDim.y * blockDim.z;
    const uint64_t thread = (uint64_t(threadIdx.z) * blockDim.y + threadIdx.y) * blockDim.x +
                            threadIdx.x;
    uint32_t* slot = p.out + 8 * (block * threads + thread);
    slot[0] = threadIdx.x;
    slot[1] = threadIdx.y;
    slot[2] = threadIdx.z;
    slot[3] = blockIdx.x;
    slot[4] = blockIdx.y;
    slot[5] = blockIdx.z;
    slot[6] = blockDim.x * gridDim.z;
    slot[7] = warpSize;
}

/// Arguments of `warp_ops`.
struct WarpOpsParams {
    const int32_t* in; // [threads] i32, read
    int32_t* out;      // [threads * 10] i32, written
};

/// Writes ten warp-operation results per thread (see the order below) for input `in`.
extern "C" __global__ void warp_ops(WarpOpsParams p)
{
    const unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
    const int32_t v = p.in[t];
    int32_t* slot = p.out + 10 * t;
    slot[0] = __shfl_xor_sync(0xffffffffu, v, 5);
    slot[1] = __shfl_down_sync(0xffffffffu, v, 3);
    slot[2] = __shfl_up_sync(0xffffffffu, v, 2);
    slot[3] = __shfl_sync(0xffffffffu, v, 7);
    slot[4] = __shfl_down_sync(0xffffffffu, v, 3, 8);
    slot[5] = __shfl_xor_sync(0xffffffffu, v, 8, 8);
    slot[6] = int32_t(__ballot_sync(0xffffffffu, v > 0));
    slot[7] = __any_sync(0xffffffffu, v > 100);
    slot[8] = __all_sync(0xffffffffu, v > -1000);
    // A 64-bit shuffle moves all eight bytes.
    const int64_t wide = (int64_t(v) << 32) | 0x1234;
    const int64_t got = __shfl_xor_sync(0xffffffffu, wide, 1);
    slot[9] = int32_t(got >> 32) + int32_t(got & 0xffff);
    __syncwarp();
}

/// Arguments of `convert_halves`.
struct ConvertParams {
    const float* in;      // [n] f32, read
    uint16_t* half_bits;  // [n] binary16 bits of __float2half_rn(in), written
    uint16_t* bf16_bits;  // [n] bfloat16 bits of __float2bfloat16_rn(in), written
    float* half_back;     // [n] __half2float of the rounded value, written
    float* bf16_back;     // [n] __bfloat162float of the rounded value, written
    int64_t n;
};

/// Rounds each input to __half and __nv_bfloat16 and widens the results back.
extern "C" __global__ void convert_halves(ConvertParams p)
{
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < p.n) {
        const __half h = __float2half_rn(p.in[i]);
        const __nv_bfloat16 b = __float2bfloat16_rn(p.in[i]);
        p.half_bits[i] = __half_as_ushort(h);
        p.bf16_bits[i] = __bfloat16_as_ushort(b);
        p.half_back[i] = __half2float(h);
        p.bf16_back[i] = __bfloat162float(b);
    }
}

/// Arguments of `reverse_in_shared`.
struct ReverseParams {
    const float* in; // [gridDim.x * blockDim.x] f32, read
    float* out;      // [gridDim.x * blockDim.x] f32, written
};

/// Reverses each block's slice through dynamic shared memory (blockDim.x floats, requested
/// at launch) read as 16-byte float4 where the block size allows.
extern "C" __global__ void reverse_in_shared(ReverseParams p)
{
    extern __shared__ __align__(16) float tile[];
    const unsigned base = blockIdx.x * blockDim.x;
    tile[threadIdx.x] = p.in[base + threadIdx.x];
    __syncthreads();
    p.out[base + threadIdx.x] = tile[blockDim.x - 1 - threadIdx.x];
    if (threadIdx.x == 0 && blockDim.x % 4 == 0) {
        // The float4 reads of the tile must return the values this block wrote.
        const float4* packs = reinterpret_cast<const float4*>(tile);
        float check = 0.0f;
        for (unsigned i = 0; i < blockDim.x / 4; ++i) {
            check += packs[i].x + packs[i].y + packs[i].z + packs[i].w;
        }
        float sum = 0.0f;
        for (unsigned i = 0; i < blockDim.x; ++i) {
            sum += p.in[base + i];
        }
        if (check != sum) {
            p.out[base] = -1.0f;
        }
    }
}
