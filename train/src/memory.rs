//! Memory of the training process, logged as `memory/*` scalars.

/// What is known about this process's memory; `None` where the platform does not tell.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MemoryStats {
    /// Resident set size now (Linux `VmRSS`).
    pub rss_bytes: Option<u64>,
    /// Peak resident set size of the process so far (Linux `VmHWM`).
    pub peak_rss_bytes: Option<u64>,
    /// Peak CUDA memory allocated by the caching allocator (`torch.cuda.max_memory_allocated`).
    /// Not filled here: the trainer sets it on CUDA (`cuda_tensor_bytes`).
    pub cuda_peak_allocated_bytes: Option<u64>,
}

const MIB: f64 = 1024.0 * 1024.0;

impl MemoryStats {
    /// The known values as TensorBoard scalars: `memory/rss_mib`, `memory/peak_rss_mib` and, when
    /// set, `memory/cuda_peak_allocated_mib`.
    pub fn scalars(&self) -> Vec<(&'static str, f64)> {
        [
            ("memory/rss_mib", self.rss_bytes),
            ("memory/peak_rss_mib", self.peak_rss_bytes),
            ("memory/cuda_peak_allocated_mib", self.cuda_peak_allocated_bytes),
        ]
        .into_iter()
        .filter_map(|(tag, bytes)| bytes.map(|b| (tag, b as f64 / MIB)))
        .collect()
    }
}

/// Resident set size and its peak from `/proc/self/status` (both `None` where it cannot be read,
/// e.g. not on Linux: memory logging must never stop a training run).
pub fn process_memory() -> MemoryStats {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    MemoryStats {
        rss_bytes: status_kib(&status, "VmRSS:").map(|kib| kib * 1024),
        peak_rss_bytes: status_kib(&status, "VmHWM:").map(|kib| kib * 1024),
        cuda_peak_allocated_bytes: None,
    }
}

/// Resets the peak resident set size (`VmHWM`) to the current one (Linux `clear_refs` value 5), so
/// that a later `process_memory` reports the peak of what ran in between. Returns whether it
/// could (not on other systems, nor where /proc is read-only).
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

extern "C" {
    fn ofm_count_cpu_allocations();
    fn ofm_cpu_allocated(live: *mut i64, peak: *mut i64);
    fn ofm_reset_cpu_peak();
    fn ofm_cuda_allocated(device: i32, live: *mut i64, peak: *mut i64) -> i32;
    fn ofm_reset_cuda_peak(device: i32);
}

/// Bytes of libtorch's tensors on one device (`allocator_stats.cpp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorBytes {
    /// Alive now.
    pub live: u64,
    /// The most alive at once since `count_cpu_tensors` or the last `reset_cpu_tensor_peak`.
    pub peak: u64,
}

/// From now on, counts the bytes of every CPU tensor libtorch allocates (and frees): libtorch keeps
/// allocator statistics only for CUDA. Tensors allocated before the call are not counted, so call
/// it before loading models. Idempotent.
pub fn count_cpu_tensors() {
    // SAFETY: no arguments; the shim installs its allocator once, under a `std::once_flag`.
    unsafe { ofm_count_cpu_allocations() }
}

/// The counts since `count_cpu_tensors` (zeros before it).
pub fn cpu_tensor_bytes() -> TensorBytes {
    let (mut live, mut peak) = (0i64, 0i64);
    // SAFETY: both pointers are to live locals the shim only writes.
    unsafe { ofm_cpu_allocated(&mut live, &mut peak) };
    TensorBytes { live: live.max(0) as u64, peak: peak.max(0) as u64 }
}

/// Starts a new peak of `cpu_tensor_bytes` from what is alive now.
pub fn reset_cpu_tensor_peak() {
    // SAFETY: no arguments; atomics in the shim.
    unsafe { ofm_reset_cpu_peak() }
}

/// The CUDA caching allocator's bytes on `device` (`torch.cuda.memory_allocated` and
/// `max_memory_allocated`); `None` in a build without CUDA.
pub fn cuda_tensor_bytes(device: usize) -> Option<TensorBytes> {
    let (mut live, mut peak) = (0i64, 0i64);
    // SAFETY: both pointers are to live locals the shim only writes; the device index is checked
    // by libtorch (an invalid one throws inside the shim's CUDA code, which callers rule out by
    // asking only for the device they train on).
    let known = unsafe { ofm_cuda_allocated(device as i32, &mut live, &mut peak) } != 0;
    known.then(|| TensorBytes { live: live.max(0) as u64, peak: peak.max(0) as u64 })
}

/// Starts a new peak of `cuda_tensor_bytes` (`torch.cuda.reset_peak_memory_stats`).
pub fn reset_cuda_tensor_peak(device: usize) {
    // SAFETY: as `cuda_tensor_bytes`.
    unsafe { ofm_reset_cuda_peak(device as i32) }
}

/// The value of a `Key:   1234 kB` line of `/proc/self/status`.
fn status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with(key))?;
    let mut fields = line[key.len()..].split_whitespace();
    let value = fields.next()?.parse().ok()?;
    (fields.next() == Some("kB")).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_status_lines() {
        let status = "Name:\toverfill\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(102400));
        assert_eq!(status_kib(status, "VmHWM:"), Some(204800));
        assert_eq!(status_kib(status, "VmSwap:"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_has_resident_memory() {
        let stats = process_memory();
        let rss = stats.rss_bytes.unwrap();
        assert!(rss > 1024 * 1024, "rss {rss}");
        assert!(stats.peak_rss_bytes.unwrap() >= rss);
        let tags: Vec<_> = stats.scalars().into_iter().map(|(tag, _)| tag).collect();
        assert_eq!(tags, ["memory/rss_mib", "memory/peak_rss_mib"]);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_peak_can_be_reset_to_the_current_resident_set() {
        // 64 MiB touched and freed: the peak stays above the resident set until it is reset.
        let block = vec![1u8; 64 << 20];
        std::hint::black_box(&block);
        drop(block);
        if !reset_peak_rss() {
            eprintln!("skipped: /proc/self/clear_refs is not writable here");
            return;
        }
        let stats = process_memory();
        let (rss, peak) = (stats.rss_bytes.unwrap(), stats.peak_rss_bytes.unwrap());
        assert!(peak < rss + (32 << 20), "peak {peak} vs rss {rss} after the reset");
    }
}
