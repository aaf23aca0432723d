//! The counting CPU allocator (`overfill_train::memory::count_cpu_tensors`) against tensors of
//! known size. Its own test binary: the counts are process-wide, and other tests' tensors would
//! move them.
use overfill_train::memory::{count_cpu_tensors, cpu_tensor_bytes, reset_cpu_tensor_peak, TensorBytes};
use tch::{Device, Kind, Tensor};

const MIB: u64 = 1 << 20;

/// The counts equal these, but for libtorch's scalar temporaries (`&a + 1.0` wraps 1.0 in a
/// tensor of a few bytes).
#[track_caller]
fn assert_counts(live: u64, peak: u64) {
    let TensorBytes { live: l, peak: p } = cpu_tensor_bytes();
    assert!(l.abs_diff(live) < 1024 && p.abs_diff(peak) < 1024, "counted live {l}, peak {p}; expected {live}, {peak}");
}

#[test]
fn counts_live_and_peak_bytes_of_cpu_tensors() {
    let before_install = Tensor::zeros([MIB as i64], (Kind::Float, Device::Cpu));
    count_cpu_tensors();
    assert_eq!(cpu_tensor_bytes().live, 0, "tensors allocated before installation are not counted");

    let a = Tensor::ones([4 * MIB as i64], (Kind::Float, Device::Cpu)); // 16 MiB
    let b = Tensor::ones([2 * MIB as i64], (Kind::Double, Device::Cpu)); // 16 MiB
    assert_eq!(cpu_tensor_bytes().live, 32 * MIB);
    let view = a.narrow(0, 0, 1024); // a view allocates nothing
    assert_eq!(cpu_tensor_bytes().live, 32 * MIB);
    let sum = &a + 1.0; // 16 MiB more
    assert_counts(48 * MIB, 48 * MIB);
    drop(a);
    assert_eq!(cpu_tensor_bytes().live, 48 * MIB, "a view keeps its storage alive");
    drop((view, sum));
    assert_counts(16 * MIB, 48 * MIB);
    drop(before_install); // never added, so never subtracted
    assert_eq!(cpu_tensor_bytes().live, 16 * MIB);

    reset_cpu_tensor_peak();
    assert_counts(16 * MIB, 16 * MIB);
    drop(b);
    assert_counts(0, 16 * MIB);
    count_cpu_tensors(); // a second installation changes nothing
    let c = Tensor::ones([MIB as i64], (Kind::Float, Device::Cpu));
    assert_counts(4 * MIB, 16 * MIB);
    drop(c);
    assert_eq!(cpu_tensor_bytes().live, 0);
}
