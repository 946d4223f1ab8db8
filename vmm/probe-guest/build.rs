//! Link flags for the freestanding guest image only (not for the host unit
//! tests of the library, which link normally).

fn main() {
    // Linked from a copy in OUT_DIR, not this checkout: a build of another
    // checkout sharing the target dir reuses this output (see
    // guest-agent/build.rs).
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".to_owned());
    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    let script = std::path::Path::new(&out_dir).join("link.ld");
    std::fs::copy(std::path::Path::new(&dir).join("link.ld"), &script)
        .expect("copy link.ld into OUT_DIR");
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rerun-if-changed=src/boot.s");
    println!("cargo:rustc-link-arg-bins=-T{}", script.display());
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-Wl,--build-id=none",
        "-Wl,-z,max-page-size=0x1000",
        "-Wl,-z,norelro",
        "-Wl,--no-eh-frame-hdr",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}
