//! Shared build script for every crate that links libtorch (model, train, serve, pipeline): link
//! arguments of a library crate do not reach the binaries and tests of the crates using it, so each
//! crate with a binary or test target linking libtorch runs this itself.
//!
//! tch's own build script gives the final binaries no rpath, and rustc links with `--as-needed`,
//! which silently drops `libtorch_cuda.so` (CUDA then reports unavailable on GPU machines).
//! Both are fixed here for all link targets of the crate (bins, tests, benches); see
//! `../shared/notes/libtorch-build.md`. `LD_LIBRARY_PATH` still wins over the rpath, which is how
//! a binary built here runs against another machine's torch install.
use std::path::PathBuf;

pub fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=../build-support/rpath.rs");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        println!("cargo:warning=LIBTORCH is not set: run `just setup` (binaries will need LD_LIBRARY_PATH)");
        return;
    };
    let lib_dir = PathBuf::from(libtorch).join("lib");
    // The real path, not the `.venv/libtorch` link: the CUDA libraries find their NVIDIA
    // runtime libraries relative to their own real location.
    let lib_dir = std::fs::canonicalize(&lib_dir).unwrap_or(lib_dir);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
