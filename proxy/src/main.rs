//! palisade-proxy (see docs/proxy.md).
fn main() {
    eprintln!("palisade-proxy: `run` and `init` are not built yet; see docs/proxy.md");
    std::process::exit(2);
}
