//! Build script of the train crate: libtorch's rpath and CUDA link fix for its test executables
//! (shared with the other crates that link libtorch, `../build-support/rpath.rs`), plus the C++
//! shim over c10d (`src/dist/shim.cpp`) and the allocator statistics (`src/allocator_stats.cpp`: a counting CPU allocator, CUDA peaks), whose static library and libtorch link flags reach every
//! binary linking this crate (the rpath does not: each such crate runs `rpath.rs` itself).
//!
//! The shim always gets Gloo (CPU data parallelism). Its headers are not in the torch wheel; they
//! come from Debian's `libgloo-dev` (installed by `scripts/setup.sh`). The NCCL path (CUDA data
//! parallelism) is compiled only when the NCCL and CUDA headers of the NVIDIA wheels are in the
//! venv (`nvidia/nccl/include`, `nvidia/cu13/include` with `crt/` and `nv/target` from
//! `cuda-toolkit[crt,cccl]`) and libtorch has CUDA; otherwise creating an NCCL group is a runtime
//! error "built without NCCL". See `../shared/notes/libtorch-build.md`.
use std::path::{Path, PathBuf};

#[path = "../build-support/rpath.rs"]
mod rpath;

const GLOO_HEADER: &str = "/usr/include/gloo/config.h";

fn main() {
    rpath::main();
    println!("cargo:rerun-if-changed=src/dist/shim.cpp");
    println!("cargo:rerun-if-changed=src/allocator_stats.cpp");
    println!("cargo:rerun-if-changed={GLOO_HEADER}");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        panic!("LIBTORCH is not set: run `just setup` (the c10d shim needs libtorch's headers)");
    };
    let libtorch = PathBuf::from(libtorch);
    let lib_dir = std::fs::canonicalize(libtorch.join("lib")).unwrap_or_else(|_| libtorch.join("lib"));
    if !Path::new(GLOO_HEADER).exists() {
        panic!(
            "the Gloo headers are missing ({GLOO_HEADER}): run `bash scripts/setup.sh` \
             (or `apt-get install libgloo-dev`); the c10d shim of `overfill launch`/data-parallel training needs them"
        );
    }
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("src/dist/shim.cpp")
        .file("src/allocator_stats.cpp")
        .include(libtorch.join("include"))
        .include(libtorch.join("include/torch/csrc/api/include"))
        .flag("-std=c++20")
        // libtorch's headers are noisy under GCC; the shim's own code is small and reviewed.
        .flag("-w")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        .define("USE_DISTRIBUTED", None);
    let nvidia = libtorch.join("../nvidia");
    let nccl_include = nvidia.join("nccl/include");
    let cuda_include = nvidia.join("cu13/include");
    // Installing the header wheels later (scripts/setup.sh) adds crt/ and nv/ here: rebuild then.
    if cuda_include.is_dir() {
        println!("cargo:rerun-if-changed={}", cuda_include.display());
    }
    let with_nccl = lib_dir.join("libtorch_cuda.so").exists()
        && nccl_include.join("nccl.h").exists()
        && cuda_include.join("crt/host_config.h").exists()
        && cuda_include.join("nv/target").exists();
    if with_nccl {
        build
            .include(&cuda_include)
            .include(&nccl_include)
            .define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None)
            .define("OVERFILL_NCCL", None);
    } else {
        println!("cargo:warning=NCCL/CUDA headers not found under {}: data parallelism on CUDA is unavailable in this build", nvidia.display());
    }
    build.compile("overfill_dist_shim");
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    if with_nccl {
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
}
