//! Checks of the emulated built-ins (`emu/tests/builtins.cu`) against values computed in Rust:
//! thread coordinates, warp shuffles and votes, 16-bit float rounding, dynamic shared memory.

use bytemuck::{Pod, Zeroable};
use dpo_kernels::cuda::emu::{EmuBuffer, EmuRuntime};
use half::{bf16, f16};

fn upload<T: Pod>(runtime: &EmuRuntime, data: &[T]) -> EmuBuffer<T> {
    let mut buf = runtime.alloc_zeroed::<T>(data.len()).unwrap();
    runtime.copy_to_buffer(data, &mut buf).unwrap();
    buf
}

fn download<T: Pod + Default>(runtime: &EmuRuntime, buf: &EmuBuffer<T>) -> Vec<T> {
    let mut host = vec![T::default(); buf.len()];
    runtime.copy_from_buffer(buf, &mut host).unwrap();
    host
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct CoordinateParams {
    out: u64,
}

#[test]
fn coordinates_cover_a_3d_grid() {
    let runtime = EmuRuntime::new();
    let (grid, block) = ((2u32, 3u32, 2u32), (4u32, 2u32, 3u32));
    let blocks = (grid.0 * grid.1 * grid.2) as usize;
    let threads = (block.0 * block.1 * block.2) as usize;
    let out = runtime.alloc_zeroed::<u32>(8 * blocks * threads).unwrap();
    let params = CoordinateParams {
        out: runtime.buffer_address(&out),
    };
    // SAFETY: the kernel writes 8 u32 per thread of the grid, the size of `out`.
    unsafe {
        runtime
            .launch_params("builtins.cu", "coordinates", grid, block, 0, &params)
            .unwrap()
    };
    let got = download(&runtime, &out);
    let mut slot = 0;
    for bz in 0..grid.2 {
        for by in 0..grid.1 {
            for bx in 0..grid.0 {
                for tz in 0..block.2 {
                    for ty in 0..block.1 {
                        for tx in 0..block.0 {
                            let want = [tx, ty, tz, bx, by, bz, block.0 * grid.2, 32];
                            assert_eq!(got[8 * slot..8 * slot + 8], want, "thread slot {slot}");
                            slot += 1;
                        }
                    }
                }
            }
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct WarpOpsParams {
    input: u64,
    out: u64,
}

/// The ten results `warp_ops` writes for lane `lane` of a warp holding `warp`, computed from
/// the CUDA programming guide's definitions.
fn expected_warp_ops(warp: &[i32], lane: usize) -> [i32; 10] {
    let v = warp[lane];
    let ballot = warp
        .iter()
        .enumerate()
        .fold(0u32, |acc, (l, &x)| acc | (u32::from(x > 0) << l));
    let segment = |width: usize| lane / width * width;
    let down_8 = if lane % 8 + 3 < 8 { warp[lane + 3] } else { v };
    // Width 8: lanes with bit 3 clear would read a later segment, so they keep their value.
    let xor_8 = if (lane ^ 8) < segment(8) + 8 {
        warp[lane ^ 8]
    } else {
        v
    };
    [
        warp[lane ^ 5],
        if lane + 3 < 32 { warp[lane + 3] } else { v },
        if lane >= 2 { warp[lane - 2] } else { v },
        warp[7],
        down_8,
        xor_8,
        ballot as i32,
        i32::from(warp.iter().any(|&x| x > 100)),
        i32::from(warp.iter().all(|&x| x > -1000)),
        warp[lane ^ 1] + 0x1234,
    ]
}

#[test]
fn warp_shuffles_and_votes_match_cuda() {
    let runtime = EmuRuntime::new();
    let threads = 64;
    // Warp 1 holds one value above 100; warp 0 holds none.
    let input: Vec<i32> = (0..threads)
        .map(|t| if t == 40 { 500 } else { (t * 7 % 23) - 11 })
        .collect();
    let input_buf = upload(&runtime, &input);
    let out = runtime.alloc_zeroed::<i32>(10 * threads as usize).unwrap();
    let params = WarpOpsParams {
        input: runtime.buffer_address(&input_buf),
        out: runtime.buffer_address(&out),
    };
    // SAFETY: the kernel reads one i32 and writes ten per thread, the buffers' sizes.
    unsafe {
        runtime
            .launch_params("builtins.cu", "warp_ops", (1, 1, 1), (64, 1, 1), 0, &params)
            .unwrap()
    };
    let got = download(&runtime, &out);
    for t in 0..threads as usize {
        let warp = &input[t / 32 * 32..t / 32 * 32 + 32];
        assert_eq!(
            got[10 * t..10 * t + 10],
            expected_warp_ops(warp, t % 32),
            "thread {t}"
        );
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct ConvertParams {
    input: u64,
    half_bits: u64,
    bf16_bits: u64,
    half_back: u64,
    bf16_back: u64,
    n: i64,
}

/// Edge cases of f32 to 16-bit rounding: ties to even, subnormals, overflow, signed zeros,
/// infinities and NaN, plus a sweep of ordinary values.
fn rounding_inputs() -> Vec<f32> {
    let mut values = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        65504.0,
        65519.99,
        65520.0,
        -65520.0,
        1e10,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MIN_POSITIVE,
        6.103_515_6e-5, // smallest normal f16
        5.960_464_5e-8, // smallest subnormal f16
        2.980_232_2e-8, // half of it: ties to zero
        2.980_233e-8,   // just above: rounds up
        8.940_697e-8,   // 1.5 units: ties to even (2 units)
        1.000_976_6,    // 1 + 2^-10: exact in f16
        1.000_488_3,    // 1 + 2^-11: tie, to even (1.0)
        1.001_464_8,    // 1 + 3 * 2^-11: tie, to even (1 + 2^-9)
        1.003_906_3,    // 1 + 2^-8: exact in bf16
        1.001_953_1,    // 1 + 2^-9: tie in bf16, to even (1.0)
        1.005_859_4,    // 1 + 3 * 2^-9: tie in bf16, to even
        3.389_531_4e38, // rounds to bf16 infinity
        f32::MAX,
        -f32::MAX,
        1e-40, // f32 subnormal
        -1e-45,
    ];
    let mut state = 0x9e37_79b9_u32;
    for _ in 0..2000 {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let exponent = (state >> 24) % 60;
        let mantissa = state & 0x7f_ffff;
        let bits = ((exponent + 97) << 23) | mantissa | (state & 0x8000_0000);
        values.push(f32::from_bits(bits));
    }
    values
}

#[test]
fn half_conversions_round_to_nearest_even() {
    let runtime = EmuRuntime::new();
    let input = rounding_inputs();
    let n = input.len();
    let input_buf = upload(&runtime, &input);
    let half_bits = runtime.alloc_zeroed::<u16>(n).unwrap();
    let bf16_bits = runtime.alloc_zeroed::<u16>(n).unwrap();
    let half_back = runtime.alloc_zeroed::<f32>(n).unwrap();
    let bf16_back = runtime.alloc_zeroed::<f32>(n).unwrap();
    let params = ConvertParams {
        input: runtime.buffer_address(&input_buf),
        half_bits: runtime.buffer_address(&half_bits),
        bf16_bits: runtime.buffer_address(&bf16_bits),
        half_back: runtime.buffer_address(&half_back),
        bf16_back: runtime.buffer_address(&bf16_back),
        n: n as i64,
    };
    let blocks = n.div_ceil(256) as u32;
    // SAFETY: the kernel touches element i < n of each buffer, all of length n.
    unsafe {
        runtime
            .launch_params(
                "builtins.cu",
                "convert_halves",
                (blocks, 1, 1),
                (256, 1, 1),
                0,
                &params,
            )
            .unwrap()
    };
    let (got_half, got_bf16) = (
        download(&runtime, &half_bits),
        download(&runtime, &bf16_bits),
    );
    let (back_half, back_bf16) = (
        download(&runtime, &half_back),
        download(&runtime, &bf16_back),
    );
    for (i, &x) in input.iter().enumerate() {
        let (h, b) = (f16::from_f32(x), bf16::from_f32(x));
        if x.is_nan() {
            // The device returns the canonical NaN 0x7fff for both types.
            assert_eq!(got_half[i], 0x7fff, "f16 of NaN");
            assert_eq!(got_bf16[i], 0x7fff, "bf16 of NaN");
            assert!(back_half[i].is_nan() && back_bf16[i].is_nan());
            continue;
        }
        assert_eq!(got_half[i], h.to_bits(), "f16 bits of {x:e} (input {i})");
        assert_eq!(got_bf16[i], b.to_bits(), "bf16 bits of {x:e} (input {i})");
        assert_eq!(
            back_half[i].to_bits(),
            h.to_f32().to_bits(),
            "f16 back of {x:e}"
        );
        assert_eq!(
            back_bf16[i].to_bits(),
            b.to_f32().to_bits(),
            "bf16 back of {x:e}"
        );
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct ReverseParams {
    input: u64,
    out: u64,
}

#[test]
fn dynamic_shared_memory_reverses_blocks() {
    let runtime = EmuRuntime::new();
    let (blocks, threads) = (3usize, 64usize);
    let input: Vec<f32> = (0..blocks * threads).map(|i| i as f32).collect();
    let input_buf = upload(&runtime, &input);
    let out = runtime.alloc_zeroed::<f32>(blocks * threads).unwrap();
    let params = ReverseParams {
        input: runtime.buffer_address(&input_buf),
        out: runtime.buffer_address(&out),
    };
    let shared = (threads * 4) as u32;
    // SAFETY: each thread reads and writes one element of its block's slice.
    unsafe {
        runtime
            .launch_params(
                "builtins.cu",
                "reverse_in_shared",
                (blocks as u32, 1, 1),
                (threads as u32, 1, 1),
                shared,
                &params,
            )
            .unwrap()
    };
    let got = download(&runtime, &out);
    for b in 0..blocks {
        for t in 0..threads {
            let want = (b * threads + threads - 1 - t) as f32;
            assert_eq!(got[b * threads + t], want, "block {b} thread {t}");
        }
    }
}
