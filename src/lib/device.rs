//! Which device a command computes on: `--device cpu|cuda|cuda:N|auto` (and the train config's
//! `device` key). `auto` is the GPU when this build has the `cuda` feature and a GPU answers,
//! else the CPU. An explicit cuda request that cannot be met is exit 69 with one line that says
//! why (no GPU support in this build, or no such GPU).

use crate::error::{Error, Result};
use candle_core::Device;

/// A parsed device request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Auto,
    Cpu,
    Cuda(usize),
}

/// Parses `auto`, `cpu`, `cuda` or `cuda:N`.
pub fn parse(spec: &str) -> Result<Request> {
    match spec.trim() {
        "" | "auto" => Ok(Request::Auto),
        "cpu" => Ok(Request::Cpu),
        "cuda" | "gpu" => Ok(Request::Cuda(0)),
        s => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Request::Cuda)
            .ok_or_else(|| {
                Error::Usage(format!(
                    "unknown device '{s}': use cpu, cuda, cuda:N or auto"
                ))
            }),
    }
}

/// For a command that runs on the CPU only (`command`, e.g. tb-chat's decode engine): `cpu` and
/// `auto` pass; a cuda request is exit 69 with one line that says so.
pub fn require_cpu(spec: &str, command: &str) -> Result<()> {
    match parse(spec)? {
        Request::Cuda(_) => Err(Error::Unavailable(format!(
            "device '{spec}': {command} runs on the CPU (it has no GPU path yet); use --device cpu"
        ))),
        _ => Ok(()),
    }
}

/// Opens the device that `spec` asks for (see the module docs).
pub fn open(spec: &str) -> Result<Device> {
    match parse(spec)? {
        Request::Cpu => Ok(Device::Cpu),
        Request::Auto => Ok(cuda(0).unwrap_or(Device::Cpu)),
        Request::Cuda(n) => cuda(n),
    }
}

#[cfg(feature = "cuda")]
fn cuda(n: usize) -> Result<Device> {
    let dev = Device::new_cuda(n).map_err(|e| {
        Error::Unavailable(format!(
            "device cuda:{n} is not available ({}); use --device cpu",
            first_line(&e.to_string())
        ))
    })?;
    if let Device::Cuda(c) = &dev {
        // SAFETY: every kernel of this process runs on the device's one stream (candle's, which
        // our own kernels use too), so the events cudarc records to order uses across streams
        // are never needed; they cost host time on every launch.
        unsafe { c.disable_event_tracking() };
    }
    Ok(dev)
}

#[cfg(not(feature = "cuda"))]
fn cuda(n: usize) -> Result<Device> {
    Err(Error::Unavailable(format!(
        "device cuda:{n} is not available: this build has no GPU support (rebuild with `cargo build --release --features cuda`, see the README); use --device cpu"
    )))
}

#[cfg(feature = "cuda")]
fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// Sets how f32 matrix products are computed on the GPU: `f32` (exact f32, what the parity
/// tests use) or `tf32` (tensor cores, 10-bit mantissa inputs, f32 accumulation; the default
/// for training: several times faster). `auto` is `tf32`. No effect on the CPU. Returns the
/// resolved name.
pub fn set_precision(precision: &str) -> Result<&'static str> {
    let tf32 = match precision {
        "auto" | "tf32" => true,
        "f32" => false,
        p => {
            return Err(Error::Data(format!(
                "precision '{p}' is not known: use f32, tf32 or auto"
            )));
        }
    };
    #[cfg(feature = "cuda")]
    candle_core::cuda_backend::set_gemm_reduced_precision_f32(tf32);
    Ok(if tf32 { "tf32" } else { "f32" })
}

/// How a device is named in records (`cpu`, `cuda:0`).
pub fn name(dev: &Device) -> String {
    match dev.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The memory a step's tensors can live in on `dev`, in bytes: the machine's physical memory
/// for the CPU, the GPU's own memory for a GPU. `None` when it cannot be told (then no bound
/// is applied).
pub fn memory_bytes(dev: &Device) -> Option<u64> {
    match dev {
        #[cfg(feature = "cuda")]
        Device::Cuda(c) => c.cuda_stream().context().total_mem().ok().map(|m| m as u64),
        Device::Cpu => physical_memory(),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// The machine's physical memory in bytes (`None` where the platform does not say).
pub fn physical_memory() -> Option<u64> {
    #[cfg(unix)]
    {
        // SAFETY: sysconf only reads system constants.
        let (pages, size) = unsafe {
            (
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        (pages > 0 && size > 0).then(|| pages as u64 * size as u64)
    }
    #[cfg(windows)]
    {
        use windows_sys::Win32::System::SystemInformation::{GlobalMemoryStatusEx, MEMORYSTATUSEX};
        // SAFETY: a zeroed MEMORYSTATUSEX with its length set is what the call asks for.
        let mut m: MEMORYSTATUSEX = unsafe { std::mem::zeroed() };
        m.dwLength = std::mem::size_of::<MEMORYSTATUSEX>() as u32;
        // SAFETY: `m` is a valid, writable MEMORYSTATUSEX.
        (unsafe { GlobalMemoryStatusEx(&mut m) } != 0 && m.ullTotalPhys > 0)
            .then_some(m.ullTotalPhys)
    }
    #[cfg(not(any(unix, windows)))]
    {
        None
    }
}

/// Whether a GPU is usable in this process (this build has the `cuda` feature and device 0
/// opens). Tests of GPU paths print "skipped: no GPU" when it is not.
pub fn gpu_available() -> bool {
    cfg!(feature = "cuda") && cuda(0).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_cpu_opens() {
        assert_eq!(parse("cpu").unwrap(), Request::Cpu);
        assert_eq!(parse("auto").unwrap(), Request::Auto);
        assert_eq!(parse("cuda").unwrap(), Request::Cuda(0));
        assert_eq!(parse("cuda:3").unwrap(), Request::Cuda(3));
        for bad in ["cuda:x", "tpu", "cuda:-1"] {
            assert_eq!(parse(bad).unwrap_err().exit_code(), 2, "{bad}");
        }
        assert!(open("cpu").unwrap().is_cpu());
        assert_eq!(name(&Device::Cpu), "cpu");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_unavailable() {
        let e = open("cuda").unwrap_err();
        assert_eq!(e.exit_code(), 69);
        assert!(e.to_string().contains("--features cuda"), "{e}");
        assert!(open("auto").unwrap().is_cpu());
    }
}
