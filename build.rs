//! Links the code every backend runs into one place (src/hot_code.ld), and the unwinder into
//! the library itself (see `unwinder_linked_in`).

use std::path::Path;

fn main() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/src/hot_code.ld");
    println!("cargo::rerun-if-changed={script}");
    println!("cargo::rustc-cdylib-link-arg=-Wl,-T,{script}");
    unwinder_linked_in(Path::new(&std::env::var("OUT_DIR").unwrap()));
}

/// Rust's standard library asks for the unwinder as `-lgcc_s`, a shared library that a
/// PostgreSQL built without it then maps into every backend. A `libgcc_s.so` found first in
/// OUT_DIR, a linker script naming gcc's static unwinder, links it into session_kill.so instead.
fn unwinder_linked_in(out_dir: &Path) {
    std::fs::write(out_dir.join("libgcc_s.so"), "INPUT(-lgcc_eh)\n").unwrap();
    println!("cargo::rustc-link-search=native={}", out_dir.display());
}
