//! Links the code every backend runs into one place (src/hot_code.ld).

fn main() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/src/hot_code.ld");
    println!("cargo::rerun-if-changed={script}");
    println!("cargo::rustc-cdylib-link-arg=-Wl,-T,{script}");
}
