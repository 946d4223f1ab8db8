//! Link flags for the agent binary (Linux, glibc; the linker is rustc's
//! default lld).

fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os != "linux" || env != "gnu" {
        return;
    }
    // Packed relative relocations (DT_RELR, glibc >= 2.36): a PIE's
    // .rela.dyn shrinks from ~570 KiB, which the loader reads in full at
    // every start (and so keeps resident), to a few KiB. The static guest
    // build also gets this through guest-image's RUSTFLAGS.
    println!("cargo:rustc-link-arg-bin=microvm-agent=-Wl,-z,pack-relative-relocs");
    // The code the agent runs to start and answer its first request, packed
    // at the front of .text. Scattered over the binary it made ~45 distinct
    // 64 KiB fault-around windows resident at idle; packed it is a handful.
    // link/startup-order.sh regenerates the list.
    // Linked from a copy in OUT_DIR: this script's output is reused by a
    // build of another checkout sharing the target dir (cargo's hashes do
    // not depend on the checkout's path), where a path into this checkout
    // would dangle once it is gone.
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("link/startup-order.ld");
    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    let script = std::path::Path::new(&out_dir).join("startup-order.ld");
    std::fs::copy(&source, &script).expect("copy link/startup-order.ld into OUT_DIR");
    println!("cargo:rerun-if-changed=link/startup-order.ld");
    println!("cargo:rerun-if-changed=build.rs");
    println!(
        "cargo:rustc-link-arg-bin=microvm-agent=-Wl,-T,{}",
        script.display()
    );
}
