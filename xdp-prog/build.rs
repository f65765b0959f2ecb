//! Compiles `src/bpf/steer.bpf.c` with clang (`-target bpf`) and generates its libbpf-rs
//! skeleton into `OUT_DIR/steer.skel.rs`.

use std::env;
use std::path::PathBuf;

use libbpf_cargo::SkeletonBuilder;

const SOURCE: &str = "src/bpf/steer.bpf.c";

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR for build scripts"));
    // Debian keeps <asm/types.h> (needed by <linux/bpf.h>) under the multiarch directory,
    // which clang does not search for `-target bpf`.
    let multiarch = format!(
        "-I/usr/include/{}-linux-gnu",
        env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into())
    );
    if let Err(error) = SkeletonBuilder::new()
        .source(SOURCE)
        .clang_args([multiarch.as_str(), "-O2", "-g", "-Wall", "-Werror"])
        .build_and_generate(out.join("steer.skel.rs"))
    {
        panic!(
            "building the XDP program {SOURCE} failed: {error:#}\n\
             It needs clang, libelf-dev, zlib1g-dev, linux-libc-dev and pkg-config: \
             run `. scripts/lab.sh; ensure_xdp_build_deps` as root (or apt-get install -y \
             clang libelf-dev zlib1g-dev linux-libc-dev pkg-config make)"
        );
    }
    println!("cargo:rerun-if-changed={SOURCE}");
}
