//! Link flags of the shim binary.

fn main() {
    // Packed relative relocations (DT_RELR; binutils >= 2.38, glibc >=
    // 2.36): the loader reads ~10 KiB instead of a ~700 KiB RELA table at
    // every start, and those pages stayed resident for the shim's life.
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    println!("cargo:rerun-if-changed=build.rs");
}
