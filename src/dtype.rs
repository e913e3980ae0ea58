//! Element types of logits and labels.
//!
//! Logits come in f32, f16 or bf16 and all arithmetic widens them to f32 (or f64 for sums).
//! Labels come in i32 or i64. Both traits are sealed so the kernels' dtype list and the Rust
//! dispatch stay in step.

use cudarc::driver::DeviceRepr;
use half::{bf16, f16};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
    impl Sealed for i32 {}
    impl Sealed for i64 {}
}

/// Runtime tag of a logits element type, as written in batch files and error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16 (8 exponent bits, 7 mantissa bits).
    BF16,
}

impl DType {
    /// Returns the size of one element in bytes.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Returns the name used in kernel entry points (`token_logps_fwd_bf16_i64`).
    pub fn kernel_suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        };
        f.write_str(name)
    }
}

/// A logits or gradient element: f32, `half::f16` or `half::bf16`.
///
/// Conversions to f32 are exact. `from_f32` rounds to nearest even, like the CUDA intrinsics
/// `__float2half_rn` and `__float2bfloat16_rn`.
pub trait Element:
    sealed::Sealed + bytemuck::Pod + DeviceRepr + Copy + Send + Sync + Default + std::fmt::Debug
{
    /// Runtime tag of this type.
    const DTYPE: DType;

    /// Widens to f32 (exact).
    fn to_f32(self) -> f32;

    /// Rounds an f32 to this type, to nearest even.
    fn from_f32(value: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;

    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        value
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;

    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        f16::from_f32(value)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;

    #[inline(always)]
    fn to_f32(self) -> f32 {
        // bf16 is the top half of an f32, so widening is a shift. Unlike `bf16::to_f32`, this
        // has no NaN branch, which lets row loops vectorize; NaN stays NaN.
        f32::from_bits((self.to_bits() as u32) << 16)
    }

    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        // Round to nearest even on the top 16 bits, written without branches so that gradient
        // loops vectorize. `bf16::from_f32` gives the same bits for every non-NaN input, and
        // NaN becomes the quiet NaN 0x7FC0 with its sign.
        let bits = value.to_bits();
        let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16;
        let nan = ((bits >> 16) & 0x8000) | 0x7FC0;
        bf16::from_bits(if value.is_nan() { nan } else { rounded } as u16)
    }
}

/// A target label element: i32 or i64.
pub trait Label:
    sealed::Sealed + bytemuck::Pod + DeviceRepr + Copy + Send + Sync + Default + std::fmt::Debug
{
    /// Name used in kernel entry points and messages (`i32`, `i64`).
    const NAME: &'static str;

    /// Widens to i64 (exact).
    fn to_i64(self) -> i64;
}

impl Label for i32 {
    const NAME: &'static str = "i32";

    #[inline(always)]
    fn to_i64(self) -> i64 {
        self as i64
    }
}

impl Label for i64 {
    const NAME: &'static str = "i64";

    #[inline(always)]
    fn to_i64(self) -> i64 {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::Element;
    use half::bf16;

    #[test]
    fn bf16_conversions_match_half() {
        let mut bits = 0u32;
        loop {
            let value = f32::from_bits(bits);
            let ours = <bf16 as Element>::from_f32(value);
            if value.is_nan() {
                assert!(ours.is_nan(), "{bits:#x} must stay NaN");
            } else {
                assert_eq!(
                    ours.to_bits(),
                    bf16::from_f32(value).to_bits(),
                    "input {bits:#x}"
                );
            }
            let widened = <bf16 as Element>::to_f32(ours);
            assert!(widened.to_bits() == ours.to_f32().to_bits() || widened.is_nan());
            match bits.checked_add(65_521) {
                Some(next) => bits = next,
                None => break,
            }
        }
    }
}
