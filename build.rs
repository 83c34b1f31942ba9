//! With the `cuda` feature, compiles `kernels/*.cu` to PTX with nvcc (candle's own kernels need
//! nvcc at build time anyway), so a kernel that does not compile fails `cargo check`, not a run
//! on a rented GPU. The PTX targets `CUDA_COMPUTE_CAP` (as candle's) or else compute 7.5; the
//! driver compiles it for the GPU at hand when the module loads.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: [&str; 3] = ["wkv7", "optim", "fused"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "75".into());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    for k in KERNELS {
        let src = format!("kernels/{k}.cu");
        println!("cargo:rerun-if-changed={src}");
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=compute_{cap}")])
            .arg(&src)
            .arg("-o")
            .arg(out.join(format!("{k}.ptx")))
            .status()
            .unwrap_or_else(|e| panic!("running {nvcc} for {src}: {e} (the cuda feature needs the CUDA toolkit's nvcc on PATH)"));
        assert!(status.success(), "nvcc failed on {src}");
    }
}
