//! Which kernels the engine's products run: one choice per CPU, made at run time, for the float
//! products (`gemv`), the integer ones (`ternary`) and the scan (`model::wkv`).

/// Which implementation of the products runs, chosen at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Plain Rust: the reference twin of every other kernel.
    Portable,
    /// x86_64 AVX2 + FMA + F16C.
    Avx2,
    /// AVX2 for the float products, AVX-512 VNNI for the ternary ones.
    Avx512,
    /// aarch64: portable float products (which the compiler vectorises), NEON ternary ones.
    Neon,
}

impl Kernel {
    pub const ALL: [Kernel; 4] = [Kernel::Portable, Kernel::Avx2, Kernel::Avx512, Kernel::Neon];

    /// Whether this CPU can run it.
    pub fn supported(self) -> bool {
        let avx2 = || {
            #[cfg(target_arch = "x86_64")]
            return is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            #[allow(unreachable_code)]
            false
        };
        match self {
            Kernel::Portable => true,
            Kernel::Avx2 => avx2(),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => {
                avx2()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The fastest kernel this CPU supports.
    pub fn detect() -> Kernel {
        [Kernel::Avx512, Kernel::Avx2, Kernel::Neon]
            .into_iter()
            .find(|k| k.supported())
            .unwrap_or(Kernel::Portable)
    }

    /// Every kernel this CPU supports (tests compare each with the portable twin).
    pub fn available() -> Vec<Kernel> {
        Kernel::ALL.into_iter().filter(|k| k.supported()).collect()
    }

    /// `self` if this CPU can run it, else the portable kernel.
    pub fn or_portable(self) -> Kernel {
        if self.supported() {
            self
        } else {
            Kernel::Portable
        }
    }

    /// The float kernel family this kernel runs.
    pub(crate) fn float_avx2(self) -> bool {
        matches!(self, Kernel::Avx2 | Kernel::Avx512)
    }

    /// The scan's kernels (`wkv::wkv7_step_head`) for this family.
    pub(crate) fn wkv_isa(self) -> crate::model::wkv::Isa {
        use crate::model::wkv::Isa;
        match self {
            Kernel::Avx2 => Isa::Avx2,
            Kernel::Avx512 if Isa::Avx512.supported() => Isa::Avx512,
            Kernel::Avx512 => Isa::Avx2,
            Kernel::Portable | Kernel::Neon => Isa::Portable,
        }
    }
}
