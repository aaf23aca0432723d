//! Memory of the training process, logged as `memory/*` scalars.

/// What is known about this process's memory; `None` where the platform does not tell.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MemoryStats {
    /// Resident set size now (Linux `VmRSS`).
    pub rss_bytes: Option<u64>,
    /// Peak resident set size of the process so far (Linux `VmHWM`).
    pub peak_rss_bytes: Option<u64>,
    /// Peak CUDA memory allocated by the caching allocator (`torch.cuda.max_memory_allocated`).
    /// Not filled here: the trainer sets it on CUDA once it can query the allocator.
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
}
