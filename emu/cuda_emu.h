// CUDA built-ins for compiling kernel sources as host C++17 with g++, to run them under the CPU
// model of CUDA execution in emu/runtime.cpp.
//
// build.rs includes this header first in every generated translation unit, preprocesses the
// unit, rewrites the `__emu_shared__` and `__emu_global__` markers that `__shared__` and
// `__global__` expand to, and compiles the result. The header is therefore not meant to be
// included by hand: shared-memory declarations only compile after that rewrite.
//
// The header provides execution-space qualifiers, `dim3` and the vector types, the thread
// coordinates (`threadIdx`, `blockIdx`, `blockDim`, `gridDim`, `warpSize`) and the barriers
// `__syncthreads()` and `__syncwarp()`. It also provides the warp shuffles and votes (full mask
// only), `__half` and `__nv_bfloat16` with round-to-nearest-even conversions, bit casts,
// `min`/`max` overloads and the C library's float math. Atomics,
// cooperative groups, textures and inline PTX are not provided, so a kernel using them fails
// to compile here.

#pragma once

// Every standard header a kernel source may pull in is included here, outside the namespace
// that build.rs wraps around each module: a later `#include <cstdint>` inside that namespace
// is then a no-op instead of re-declaring the library inside it.
#include <assert.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------------
// Qualifiers and markers.

#define __host__
#define __device__
#define __constant__
#define __managed__
// Same expansion as the CUDA toolkit's host definition, so `inline __forceinline__` is
// rejected here as it is by the host compiler under nvcc.
#define __forceinline__ __inline__ __attribute__((always_inline))
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
// Markers that build.rs rewrites after preprocessing: `__emu_global__` is removed after the
// kernel entry it marks is recorded, `__emu_shared__` becomes a static in the `emu_shared`
// section, and `extern __emu_shared__ T name[]` becomes a pointer to dynamic shared memory.
#define __global__ __emu_global__
#define __shared__ __emu_shared__

// ---------------------------------------------------------------------------------------------
// Vector types, with the alignment CUDA gives them (a 16-byte vector is 16-byte aligned).

#define EMU_VECTOR_TYPES(name, T, a2, a4)                                                          \
    struct name##1 {                                                                               \
        T x;                                                                                       \
    };                                                                                             \
    struct __attribute__((aligned(a2))) name##2 {                                                  \
        T x, y;                                                                                    \
    };                                                                                             \
    struct name##3 {                                                                               \
        T x, y, z;                                                                                 \
    };                                                                                             \
    struct __attribute__((aligned(a4))) name##4 {                                                  \
        T x, y, z, w;                                                                              \
    };                                                                                             \
    static inline name##1 make_##name##1(T x) { return name##1{x}; }                               \
    static inline name##2 make_##name##2(T x, T y) { return name##2{x, y}; }                       \
    static inline name##3 make_##name##3(T x, T y, T z) { return name##3{x, y, z}; }               \
    static inline name##4 make_##name##4(T x, T y, T z, T w) { return name##4{x, y, z, w}; }

EMU_VECTOR_TYPES(char, signed char, 2, 4)
EMU_VECTOR_TYPES(uchar, unsigned char, 2, 4)
EMU_VECTOR_TYPES(short, short, 4, 8)
EMU_VECTOR_TYPES(ushort, unsigned short, 4, 8)
EMU_VECTOR_TYPES(int, int, 8, 16)
EMU_VECTOR_TYPES(uint, unsigned int, 8, 16)
EMU_VECTOR_TYPES(long, long, 16, 16)
EMU_VECTOR_TYPES(ulong, unsigned long, 16, 16)
EMU_VECTOR_TYPES(longlong, long long, 16, 16)
EMU_VECTOR_TYPES(ulonglong, unsigned long long, 16, 16)
EMU_VECTOR_TYPES(float, float, 8, 16)
EMU_VECTOR_TYPES(double, double, 16, 16)

#undef EMU_VECTOR_TYPES

static_assert(sizeof(float4) == 16 && alignof(float4) == 16, "float4 is one 16-byte access");
static_assert(sizeof(uint4) == 16 && alignof(uint4) == 16, "uint4 is one 16-byte access");
static_assert(sizeof(float2) == 8 && alignof(float2) == 8, "float2 is one 8-byte access");

/// Launch dimensions; unspecified components are 1, as in CUDA.
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
        : x(vx), y(vy), z(vz)
    {
    }
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

// ---------------------------------------------------------------------------------------------
// The runtime's side: per-thread coordinates and the synchronising calls (emu/runtime.cpp).

namespace emu {

// Coordinates of the CUDA thread running on this OS thread. The scheduler rewrites them
// before it resumes each CUDA thread, so kernels read them through the const accessors below.
extern __thread uint3 tls_thread_idx;
extern __thread uint3 tls_block_idx;
extern __thread dim3 tls_block_dim;
extern __thread dim3 tls_grid_dim;

inline const uint3& thread_idx() { return tls_thread_idx; }
inline const uint3& block_idx() { return tls_block_idx; }
inline const dim3& block_dim() { return tls_block_dim; }
inline const dim3& grid_dim() { return tls_grid_dim; }

/// The warp-level operations, which all lanes of a warp must reach together.
enum class WarpOp : int {
    ShflIdx = 0,
    ShflUp = 1,
    ShflDown = 2,
    ShflXor = 3,
    VoteAll = 4,
    VoteAny = 5,
    VoteBallot = 6,
    SyncWarp = 7,
};

/// Blocks the calling CUDA thread until every thread of its block reaches the same
/// `__syncthreads()` call (identified by file and line). Throws to unwind the thread when the
/// block is aborted.
void sync_threads(const char* file, int line);

/// Blocks until every lane of the calling thread's warp reaches a warp operation with the same
/// kind, mask and call site, then writes this lane's result into `out`. A shuffle's result is
/// the `size` bytes the source lane passed in `in`; a vote's is 4 bytes (0/1 or the ballot).
/// `arg` is the shuffle's lane, delta or lane mask; `width` is its segment width.
void warp_op(WarpOp op, unsigned int mask, const void* in, void* out, size_t size, int arg,
             int width, const char* file, int line);

/// Reports a failed `assert` in kernel code as a launch error instead of aborting the process.
[[noreturn]] void assert_fail(const char* expression, const char* file, int line);

/// Returns the start of the dynamic shared memory of the running block (16-byte aligned).
unsigned char* dynamic_shared();

/// Runs one shuffle; `arg` is the source lane, delta or lane mask, and `width` the segment
/// width (warpSize unless given, as in CUDA).
template <typename T>
inline T shuffle(WarpOp op, const char* file, int line, unsigned int mask, T var, int arg,
                 int width = 32)
{
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                  "warp shuffles move one value of at most 8 bytes, as on the device");
    T out;
    warp_op(op, mask, &var, &out, sizeof(T), arg, width, file, line);
    return out;
}

inline unsigned int vote(WarpOp op, unsigned int mask, int predicate, const char* file, int line)
{
    const int in = predicate != 0;
    unsigned int out = 0;
    warp_op(op, mask, &in, &out, sizeof(in), 0, 32, file, line);
    return out;
}

/// Entry of the kernel table that build.rs generates for each module.
struct KernelEntry {
    const char* module;      // source file name, e.g. "token_logps.cu"
    const char* name;        // extern "C" entry name
    size_t param_size;       // sizeof the by-value parameter struct
    size_t param_align;      // alignof the parameter struct
    void (*run)(const void*); // copies the parameter bytes into the struct and calls the kernel
};

/// The kernels of one module, as listed in the generated registry.
struct KernelTable {
    const KernelEntry* entries;
    size_t count;
};

} // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())
#define warpSize 32

#define __syncthreads() ::emu::sync_threads(__FILE__, __LINE__)
// `__syncwarp()` and `__syncwarp(mask)`: the call site is captured first, then the optional
// mask is passed to the call operator, whose default argument is CUDA's full mask.
#define __syncwarp(...) ::emu::SyncWarpAt{__FILE__, __LINE__}(__VA_ARGS__)

namespace emu {
struct SyncWarpAt {
    const char* file;
    int line;
    void operator()(unsigned int mask = 0xffffffffu) const
    {
        unsigned int out = 0;
        const int in = 0;
        warp_op(WarpOp::SyncWarp, mask, &in, &out, sizeof(in), 0, 32, file, line);
    }
};
} // namespace emu

#define __shfl_sync(mask, var, ...)                                                                \
    ::emu::shuffle(::emu::WarpOp::ShflIdx, __FILE__, __LINE__, mask, var, __VA_ARGS__)
#define __shfl_up_sync(mask, var, ...)                                                             \
    ::emu::shuffle(::emu::WarpOp::ShflUp, __FILE__, __LINE__, mask, var, __VA_ARGS__)
#define __shfl_down_sync(mask, var, ...)                                                           \
    ::emu::shuffle(::emu::WarpOp::ShflDown, __FILE__, __LINE__, mask, var, __VA_ARGS__)
#define __shfl_xor_sync(mask, var, ...)                                                            \
    ::emu::shuffle(::emu::WarpOp::ShflXor, __FILE__, __LINE__, mask, var, __VA_ARGS__)

#define __all_sync(mask, predicate)                                                                \
    int(::emu::vote(::emu::WarpOp::VoteAll, mask, predicate, __FILE__, __LINE__))
#define __any_sync(mask, predicate)                                                                \
    int(::emu::vote(::emu::WarpOp::VoteAny, mask, predicate, __FILE__, __LINE__))
#define __ballot_sync(mask, predicate)                                                             \
    ::emu::vote(::emu::WarpOp::VoteBallot, mask, predicate, __FILE__, __LINE__)

// A failed device assert ends the launch with an error, as on the device. <assert.h> redefines
// `assert` when a kernel source includes it again, which brings back the host's abort.
#undef assert
#ifdef NDEBUG
#define assert(expression) ((void)0)
#else
#define assert(expression)                                                                         \
    ((expression) ? (void)0 : ::emu::assert_fail(#expression, __FILE__, __LINE__))
#endif

// ---------------------------------------------------------------------------------------------
// __half and __nv_bfloat16: storage types with the conversion intrinsics. Arithmetic operators
// and implicit conversions are left out on purpose, so kernel code that relies on them (and so
// on 16-bit arithmetic on the device) fails to compile here instead of silently using f32.

struct __half_raw {
    unsigned short x;
};
struct __nv_bfloat16_raw {
    unsigned short x;
};

struct __half {
    unsigned short __x;
    __half() = default;
    constexpr __half(__half_raw raw) : __x(raw.x) {}
    constexpr operator __half_raw() const { return __half_raw{__x}; }
};

struct __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    constexpr __nv_bfloat16(__nv_bfloat16_raw raw) : __x(raw.x) {}
    constexpr operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
};

struct __attribute__((aligned(4))) __half2 {
    __half x, y;
};
struct __attribute__((aligned(4))) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};

typedef __half half;
typedef __half2 half2;
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

static_assert(sizeof(__half) == 2 && std::is_trivial<__half>::value, "__half is 2 plain bytes");
static_assert(sizeof(__nv_bfloat16) == 2 && std::is_trivial<__nv_bfloat16>::value,
              "__nv_bfloat16 is 2 plain bytes");

namespace emu {

inline uint32_t float_bits(float f)
{
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

inline float bits_float(uint32_t u)
{
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

/// Rounds an f32 to binary16, to nearest even, with overflow to infinity and gradual
/// underflow. Every NaN becomes the quiet NaN 0x7fff (payloads are not kept).
inline unsigned short float_to_half_bits(float f)
{
    const uint32_t u = float_bits(f);
    const unsigned short sign = (unsigned short)((u >> 16) & 0x8000u);
    const uint32_t abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) {
        return 0x7fffu;
    }
    if (abs >= 0x477ff000u) {
        // |f| >= 65520 rounds past the largest finite half (65504): infinity.
        return (unsigned short)(sign | 0x7c00u);
    }
    if (abs < 0x38800000u) {
        // Below the smallest normal half (2^-14): a subnormal half, or zero. The result
        // counts units of 2^-24; align the 24-bit significand to that unit and round.
        if (abs < 0x33000000u) {
            // Less than 2^-25, which is at most half a unit: rounds to zero (the exact half
            // unit 2^-25 rounds to even zero too).
            return sign;
        }
        const uint32_t exponent = abs >> 23;
        const uint32_t significand = (abs & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126u - exponent; // 14..24 for exponents 102..112
        const uint32_t kept = significand >> shift;
        const uint32_t rest = significand & ((1u << shift) - 1u);
        const uint32_t halfway = 1u << (shift - 1u);
        const uint32_t rounded = kept + (rest > halfway || (rest == halfway && (kept & 1u)));
        return (unsigned short)(sign | rounded);
    }
    // Normal range: rebias the exponent (127 -> 15) and round the 23-bit fraction to 10 bits;
    // a carry out of the fraction correctly bumps the exponent.
    const uint32_t rebased = abs - ((127u - 15u) << 23);
    const uint32_t kept = rebased >> 13;
    const uint32_t rest = rebased & 0x1fffu;
    const uint32_t rounded = kept + (rest > 0x1000u || (rest == 0x1000u && (kept & 1u)));
    return (unsigned short)(sign | rounded);
}

/// Widens binary16 bits to f32 (exact).
inline float half_bits_to_float(unsigned short h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu;
    const uint32_t fraction = h & 0x3ffu;
    if (exponent == 0x1fu) {
        return bits_float(sign | 0x7f800000u | (fraction << 13));
    }
    if (exponent == 0) {
        // Zero or subnormal: fraction * 2^-24, exact in f32.
        const float magnitude = (float)fraction * 5.9604644775390625e-8f;
        return sign ? -magnitude : magnitude;
    }
    return bits_float(sign | ((exponent + 112u) << 23) | (fraction << 13));
}

/// Rounds an f32 to bfloat16, to nearest even. Every NaN becomes the quiet NaN 0x7fff.
inline unsigned short float_to_bfloat16_bits(float f)
{
    const uint32_t u = float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return 0x7fffu;
    }
    // Adding 0x7fff plus the lowest kept bit rounds to nearest even. A carry into the
    // exponent is the correct rounding up to the next binade or to infinity.
    const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(rounded >> 16);
}

/// Widens bfloat16 bits to f32 (exact).
inline float bfloat16_bits_to_float(unsigned short b) { return bits_float((uint32_t)b << 16); }

} // namespace emu

inline float __half2float(__half h) { return ::emu::half_bits_to_float(h.__x); }
inline __half __float2half_rn(float f) { return __half_raw{::emu::float_to_half_bits(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return ::emu::bfloat16_bits_to_float(b.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f)
{
    return __nv_bfloat16_raw{::emu::float_to_bfloat16_bits(f)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline __half2 __floats2half2_rn(float a, float b)
{
    return __half2{__float2half_rn(a), __float2half_rn(b)};
}
inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 b)
{
    return float2{__bfloat162float(b.x), __bfloat162float(b.y)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b)
{
    return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }

inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half_raw{u}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16_raw{u}; }

// ---------------------------------------------------------------------------------------------
// Math and bit intrinsics. Float math is the C library's: results can differ from the device's
// by a few ULP (expf, logf, log1pf), and the `__expf`-style fast intrinsics are the accurate
// library functions here, not the device's approximations.

inline int __float_as_int(float f) { return (int)::emu::float_bits(f); }
inline float __int_as_float(int i) { return ::emu::bits_float((uint32_t)i); }
inline unsigned int __float_as_uint(float f) { return ::emu::float_bits(f); }
inline float __uint_as_float(unsigned int u) { return ::emu::bits_float(u); }
inline long long __double_as_longlong(double d)
{
    long long i;
    std::memcpy(&i, &d, sizeof i);
    return i;
}
inline double __longlong_as_double(long long i)
{
    double d;
    std::memcpy(&d, &i, sizeof d);
    return d;
}

inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __saturatef(float x) { return x != x ? 0.0f : fminf(fmaxf(x, 0.0f), 1.0f); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }

inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned int)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }

template <typename T> inline T __ldg(const T* address) { return *address; }

// CUDA's device-side min and max overloads for integer and floating types.
#define EMU_MIN_MAX(T)                                                                             \
    inline T min(T a, T b) { return a < b ? a : b; }                                               \
    inline T max(T a, T b) { return a > b ? a : b; }
EMU_MIN_MAX(int)
EMU_MIN_MAX(unsigned int)
EMU_MIN_MAX(long)
EMU_MIN_MAX(unsigned long)
EMU_MIN_MAX(long long)
EMU_MIN_MAX(unsigned long long)
#undef EMU_MIN_MAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
