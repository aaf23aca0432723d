//! The C ABI of `shim.cpp` and a safe owner of one c10d process group.
//!
//! Every shim call returns a malloc'd error message or null; `Group` turns that into `Result`.
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::time::Duration;

use anyhow::{anyhow, Result};
use tch::Tensor;

#[repr(C)]
struct OfdGroup {
    _private: [u8; 0],
}

extern "C" {
    fn ofd_free_string(s: *mut c_char);
    fn ofd_free_bytes(b: *mut u8);
    fn ofd_has_nccl() -> c_int;
    fn ofd_group_new(
        backend: *const c_char,
        master_addr: *const c_char,
        master_port: c_int,
        rank: c_int,
        world_size: c_int,
        timeout_ms: i64,
        device_index: c_int,
        out: *mut *mut OfdGroup,
    ) -> *mut c_char;
    fn ofd_group_free(group: *mut OfdGroup);
    fn ofd_broadcast(group: *mut OfdGroup, tensors: *mut *mut c_void, count: usize, root: c_int) -> *mut c_char;
    fn ofd_all_reduce_sum(group: *mut OfdGroup, tensors: *mut *mut c_void, count: usize, bucket_bytes: i64) -> *mut c_char;
    fn ofd_reduce_scatter_sum(group: *mut OfdGroup, output: *mut c_void, input: *mut c_void) -> *mut c_char;
    fn ofd_all_gather(group: *mut OfdGroup, output: *mut c_void, input: *mut c_void) -> *mut c_char;
    fn ofd_barrier(group: *mut OfdGroup) -> *mut c_char;
    fn ofd_store_set(group: *mut OfdGroup, key: *const c_char, value: *const u8, len: usize) -> *mut c_char;
    fn ofd_store_get(group: *mut OfdGroup, key: *const c_char, found: *mut c_int, out: *mut *mut u8, out_len: *mut usize) -> *mut c_char;
}

/// Takes ownership of a shim error message.
fn check(message: *mut c_char) -> Result<()> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: non-null results are NUL-terminated strings malloc'd by the shim, freed once here.
    let text = unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned();
    unsafe { ofd_free_string(message) };
    Err(anyhow!(text))
}

/// Whether this build can create NCCL process groups.
pub fn has_nccl() -> bool {
    // SAFETY: no arguments, no state.
    unsafe { ofd_has_nccl() != 0 }
}

fn tensor_ptr(t: &Tensor) -> *mut c_void {
    // The shim reads the `at::Tensor` handle and writes into its storage, never the handle itself.
    t.as_ptr() as *mut c_void
}

/// One c10d process group (and its TCPStore client or server). Collectives block until done or
/// until the group's timeout.
pub struct Group {
    raw: *mut OfdGroup,
}

// The group is used from one thread at a time (`&mut`-free calls are serialised by the caller:
// the trainer's main thread). c10d process groups are themselves thread-safe.
unsafe impl Send for Group {}
unsafe impl Sync for Group {}

impl Group {
    pub fn new(backend: &str, master_addr: &str, master_port: u16, rank: usize, world_size: usize, timeout: Duration, device_index: usize) -> Result<Self> {
        let backend = CString::new(backend)?;
        let addr = CString::new(master_addr)?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: valid C strings; `raw` is written on success only.
        check(unsafe {
            ofd_group_new(
                backend.as_ptr(),
                addr.as_ptr(),
                master_port as c_int,
                rank as c_int,
                world_size as c_int,
                timeout.as_millis().min(i64::MAX as u128) as i64,
                device_index as c_int,
                &mut raw,
            )
        })?;
        Ok(Group { raw })
    }

    pub fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        let mut ptrs: Vec<*mut c_void> = tensors.iter().map(tensor_ptr).collect();
        // SAFETY: the tensors outlive the call.
        check(unsafe { ofd_broadcast(self.raw, ptrs.as_mut_ptr(), ptrs.len(), root as c_int) })
    }

    pub fn all_reduce_sum(&self, tensors: &[Tensor], bucket_bytes: usize) -> Result<()> {
        let mut ptrs: Vec<*mut c_void> = tensors.iter().map(tensor_ptr).collect();
        // SAFETY: the tensors outlive the call.
        check(unsafe { ofd_all_reduce_sum(self.raw, ptrs.as_mut_ptr(), ptrs.len(), bucket_bytes as i64) })
    }

    pub fn reduce_scatter_sum(&self, output: &Tensor, input: &Tensor) -> Result<()> {
        // SAFETY: both tensors outlive the call.
        check(unsafe { ofd_reduce_scatter_sum(self.raw, tensor_ptr(output), tensor_ptr(input)) })
    }

    pub fn all_gather(&self, output: &Tensor, input: &Tensor) -> Result<()> {
        // SAFETY: both tensors outlive the call.
        check(unsafe { ofd_all_gather(self.raw, tensor_ptr(output), tensor_ptr(input)) })
    }

    pub fn barrier(&self) -> Result<()> {
        // SAFETY: the group is alive.
        check(unsafe { ofd_barrier(self.raw) })
    }

    pub fn store_set(&self, key: &str, value: &[u8]) -> Result<()> {
        let key = CString::new(key)?;
        // SAFETY: valid key and value slice.
        check(unsafe { ofd_store_set(self.raw, key.as_ptr(), value.as_ptr(), value.len()) })
    }

    /// The value under `key`, None when absent (never waits for it to appear).
    pub fn store_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let key = CString::new(key)?;
        let mut found: c_int = 0;
        let mut out: *mut u8 = std::ptr::null_mut();
        let mut len: usize = 0;
        // SAFETY: out-parameters are valid; a found value is malloc'd by the shim, freed here.
        check(unsafe { ofd_store_get(self.raw, key.as_ptr(), &mut found, &mut out, &mut len) })?;
        if found == 0 {
            return Ok(None);
        }
        let value = unsafe { std::slice::from_raw_parts(out, len) }.to_vec();
        unsafe { ofd_free_bytes(out) };
        Ok(Some(value))
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: created by ofd_group_new, freed once.
        unsafe { ofd_group_free(self.raw) };
    }
}
